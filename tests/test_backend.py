import pytest
import torch

import mxa_kernels
from mxa_kernels import backend


def test_default_is_auto_and_auto_serves_cpu_with_eager():
    assert mxa_kernels.get_backend() == "auto"
    assert mxa_kernels.resolve_backend("mxa_branch", None, "cpu") == "eager"


def test_set_get_and_context_restore():
    mxa_kernels.set_backend("eager")
    assert mxa_kernels.get_backend() == "eager"
    with mxa_kernels.use_backend("auto"):
        assert mxa_kernels.get_backend() == "auto"
        with mxa_kernels.use_backend("eager"):
            assert mxa_kernels.get_backend() == "eager"
        assert mxa_kernels.get_backend() == "auto"
    assert mxa_kernels.get_backend() == "eager"


def test_context_restores_after_an_exception():
    with pytest.raises(KeyError):
        with mxa_kernels.use_backend("eager"):
            raise KeyError
    assert mxa_kernels.get_backend() == "auto"


def test_env_var_applies_below_set_backend(monkeypatch):
    monkeypatch.setenv("MXA_BACKEND", "eager")
    assert mxa_kernels.get_backend() == "eager"
    mxa_kernels.set_backend("auto")
    assert mxa_kernels.get_backend() == "auto"


def test_bad_names_raise(monkeypatch):
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        mxa_kernels.set_backend("cuda")
    with pytest.raises(ValueError):
        with mxa_kernels.use_backend("fast"):
            pass
    monkeypatch.setenv("MXA_BACKEND", "fused")
    with pytest.raises(ValueError, match="MXA_BACKEND='fused'"):
        mxa_kernels.get_backend()


def test_per_call_backend_wins_over_global():
    mxa_kernels.set_backend("triton")
    assert mxa_kernels.resolve_backend("mxa_branch", "eager", "cpu") == "eager"


def test_explicit_triton_without_a_kernel_raises_with_the_reason():
    assert "mxa_branch" not in backend._TRITON_OPS
    with pytest.raises(mxa_kernels.BackendUnavailableError, match="no Triton kernel is registered"):
        mxa_kernels.resolve_backend("mxa_branch", "triton", "cpu")


def test_registered_triton_op_is_dispatched_and_auto_keeps_cpu_on_eager(monkeypatch):
    def fake_kernel(*args):
        return "triton"

    monkeypatch.setitem(backend._TRITON_OPS, "probe_op", fake_kernel)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.dispatch("probe_op", "triton", "cpu", lambda *a: "eager")() == "triton"
    assert backend.dispatch("probe_op", "auto", "cpu", lambda *a: "eager")() == "eager"
    assert backend.resolve_backend("probe_op", "auto", "cuda") == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(mxa_kernels.BackendUnavailableError, match="interpreter"):
        backend.resolve_backend("probe_op", "triton", "cpu")


def test_missing_triton_is_reported(monkeypatch):
    monkeypatch.setattr(backend.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setitem(backend._TRITON_OPS, "probe_op", lambda *a: None)
    status = mxa_kernels.available_backends()["triton"]
    assert not status.available and "not installed" in status.reason
    assert backend.resolve_backend("probe_op", "auto", "cuda") == "eager"


def test_available_backends_reports_every_name():
    status = mxa_kernels.available_backends()
    assert set(status) == set(mxa_kernels.BACKENDS)
    assert status["eager"].available and status["auto"].available
    assert status["triton"].available == (status["triton"].reason is None)


def test_module_and_model_backend_argument(monkeypatch):
    import mxa_model

    calls = []
    monkeypatch.setitem(backend._TRITON_OPS, "mxa_branch",
                        lambda x, *args: calls.append(x.shape) or mxa_kernels.mxa_branch_ref(x, *args))
    module = mxa_model.MedicalXRayAttention(8, backend="triton")
    module(torch.randn(2, 8, 5, 5))
    assert calls == [(2, 8, 5, 5)]
    module.backend = "eager"
    module(torch.randn(2, 8, 5, 5))
    assert len(calls) == 1
    with pytest.raises(ValueError):
        mxa_model.MedicalXRayAttention(8, backend="gpu")

    model = mxa_model.create_model("mxa_efficientvit_m0", img_size=64, backend="eager")
    assert {m.backend for m in model.mxa_modules()} == {"eager"}
    model.set_backend(None)
    assert {m.backend for m in model.mxa_modules()} == {None}
    with mxa_kernels.use_backend("triton"):
        model.eval()(torch.randn(1, 1, 64, 64))
    assert len(calls) == 1 + len(model.mxa_modules())
