from pathlib import Path

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
        with mxa_kernels.use_backend("triton"):
            assert mxa_kernels.get_backend() == "triton"
        assert mxa_kernels.get_backend() == "auto"
        mxa_kernels.set_backend("triton")  # the block still wins, and the global choice outlives it
        assert mxa_kernels.get_backend() == "auto"
    assert mxa_kernels.get_backend() == "triton"


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


def test_per_call_backend_wins_over_block_and_global():
    mxa_kernels.set_backend("triton")
    assert mxa_kernels.resolve_backend("mxa_branch", "eager", "cpu") == "eager"
    with mxa_kernels.use_backend("triton"):
        assert mxa_kernels.resolve_backend("mxa_branch", "eager", "cpu") == "eager"


def test_explicit_triton_without_a_kernel_raises_with_the_reason(monkeypatch):
    monkeypatch.delitem(backend._TRITON_OPS, "mxa_branch", raising=False)
    with pytest.raises(mxa_kernels.BackendUnavailableError, match="no Triton kernel is registered"):
        mxa_kernels.resolve_backend("mxa_branch", "triton", "cpu")


def _probe(unsupported=None):
    return backend._TritonOp(lambda *args: "triton", unsupported)


def test_registered_triton_op_is_dispatched_and_auto_keeps_cpu_on_eager(monkeypatch):
    monkeypatch.setitem(backend._TRITON_OPS, "probe_op", _probe())
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    args = (torch.zeros(1),)
    assert backend.dispatch("probe_op", "triton", lambda *a: "eager", args)() == "triton"
    assert backend.dispatch("probe_op", "auto", lambda *a: "eager", args)() == "eager"
    assert backend.resolve_backend("probe_op", "auto", "cuda") == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(mxa_kernels.BackendUnavailableError, match="interpreter"):
        backend.resolve_backend("probe_op", "triton", "cpu")


def test_arguments_the_kernel_cannot_serve(monkeypatch):
    monkeypatch.setitem(backend._TRITON_OPS, "probe_op", _probe(lambda x: "maps too large" if x > 1 else None))
    assert backend.resolve_backend("probe_op", "auto", "cuda", (1,)) == "triton"
    assert backend.resolve_backend("probe_op", "auto", "cuda", (2,)) == "eager"
    with pytest.raises(mxa_kernels.BackendUnavailableError, match="maps too large"):
        backend.resolve_backend("probe_op", "triton", "cuda", (2,))


def test_missing_triton_is_reported(monkeypatch):
    monkeypatch.setattr(backend, "triton_import_error", lambda: "the triton package is not installed")
    monkeypatch.setattr(backend, "_TRITON_OPS", {})
    status = mxa_kernels.available_backends()["triton"]
    assert not status.available and "not installed" in status.reason
    assert backend.resolve_backend("mxa_branch", "auto", "cuda") == "eager"
    with pytest.raises(mxa_kernels.BackendUnavailableError, match="not installed"):
        backend.resolve_backend("mxa_branch", "triton", "cuda")


def test_available_backends_without_kernels_or_device(monkeypatch):
    monkeypatch.setattr(backend, "_TRITON_OPS", {})
    assert mxa_kernels.available_backends()["triton"].reason == "no Triton kernel is registered"
    monkeypatch.setitem(backend._TRITON_OPS, "probe_op", _probe())
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA device" in mxa_kernels.available_backends()["triton"].reason
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert mxa_kernels.available_backends()["triton"] == (True, None)
    assert mxa_kernels.available_backends()["eager"].available


def test_module_and_model_backend_argument(monkeypatch):
    import mxa_model

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the probe serves CPU tensors as the interpreter would
    calls = []
    monkeypatch.setitem(backend._TRITON_OPS, "mxa_branch", backend._TritonOp(
        lambda x, *args: calls.append(x.shape) or mxa_kernels.mxa_branch_ref(x, *args), None))
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


def test_set_backend_reaches_every_module_a_registered_op_serves():
    """set_backend iterates the registry: every module of the model that holds a kernel backend is one
    the registry says an op serves, and each gets the backend."""
    import mxa_model

    served = tuple(cls for op in mxa_kernels.OPS.values() for cls in op.module_classes())
    assert {cls.__name__ for cls in served} == {"MedicalXRayAttention", "FusedLocalWindowAttention"}
    model = mxa_model.create_model("mxa_efficientvit_m0", img_size=64)
    model.set_backend("eager")
    with_backend = [m for m in model.modules() if hasattr(m, "backend")]
    assert with_backend and all(isinstance(m, served) and m.backend == "eager" for m in with_backend)
    assert {type(m) for m in with_backend} == set(served)


def test_registry_entries_are_whole():
    """Each registered op: its public function dispatches to its reference under the eager backend, its
    kernels module registers it with the switch, its test files exist."""
    root = Path(__file__).parents[1]
    for name, op in mxa_kernels.OPS.items():
        assert op.function.__name__ == name and getattr(mxa_kernels, name) is op.function
        assert getattr(mxa_kernels, op.reference.__name__) is op.reference
        assert op.kernels_module().__name__ == op.kernels and name in backend._TRITON_OPS
        assert op.tests and all((root / path).is_file() for path in op.tests), op.tests


def test_every_op_package_is_registered():
    """A package under mxa_kernels/ops/ without its registry entry (or the reverse) fails here."""
    ops_dir = Path(mxa_kernels.__file__).parent / "ops"
    packages = {p.name for p in ops_dir.iterdir() if (p / "__init__.py").is_file()}
    assert packages == {op.package.rpartition(".")[2] for op in mxa_kernels.OPS.values()}
    assert all((ops_dir / name / "kernels.py").is_file() for name in packages)


def test_kernel_sizes_stay_run_time_values():
    """Each build's size arguments are in its kernel's do_not_specialize: a launch with a size of 1 (B = 1,
    a 1x1 map, one head) would otherwise compile it in as a Python int, which the kernels cannot use.
    The interpreter never specializes, so only this check and a GPU see it."""
    for op in mxa_kernels.OPS.values():
        for build in op.kernels_module().builds():
            if hasattr(build.kernel, "params"):  # a JITFunction
                runtime = {p.name for p in build.kernel.params if p.do_not_specialize}
            else:  # the interpreter's wrapper, which keeps triton.jit's arguments
                runtime = set(build.kernel.kwargs["do_not_specialize"])
            assert build.sizes and set(build.sizes) <= runtime, (build.kernel.fn.__name__, set(build.sizes) - runtime)
