"""The whole windowed cascaded group attention at inference (BatchNorms folded, two launches and a GEMM):
the eager reference and the fused Triton op (interpreter on CPU, a GPU when present) against timm's
own LocalWindowAttention in eval mode."""

import pytest
import torch
from timm.models.efficientvit_msra import LocalWindowAttention

import mxa_kernels
import mxa_model
from mxa_kernels import cascaded_attention_infer_ref
from mxa_kernels.ops.cascaded_attention import kernels as cascaded_kernels
from mxa_model.cascaded_attention import FusedLocalWindowAttention

from helpers import DEVICE, HALF_DTYPES, randomized, rel_err, within_twice_eager


# (dim, heads, attn_ratio, map H, W, window, resolution the module is built for, query kernels):
# M5's stage-1 head sizes on a 14x14 map; one 7x7 window of 64-wide heads; a 4x4 map that timm
# gives a 4x4 window; maps needing padding, one of them smaller than its window; window 4; 20-wide
# heads (C = 40, not a power of two); two query kernel sizes in one block; 128-wide heads
CASES = [(48, 3, 1, 14, 14, 7, 14, (5, 5, 5)), (192, 3, 4, 7, 7, 7, 7, (5, 5, 5)), (64, 2, 2, 4, 4, 7, 4, (5, 5)),
         (40, 2, 1.25, 10, 10, 7, 10, (5, 5)), (32, 2, 1, 15, 9, 7, 15, (5, 5)), (32, 2, 1, 4, 5, 7, 14, (5, 5)),
         (32, 2, 1, 10, 6, 4, 10, (3, 3)), (48, 3, 1, 9, 9, 7, 9, (5, 3, 1)), (256, 2, 8, 7, 7, 7, 7, (5, 5))]
IDS = [f"C{c[0]}-h{c[1]}-{c[3]}x{c[4]}-w{c[5]}-k{''.join(map(str, c[7]))}" for c in CASES]


def make_module(dim, heads, ratio, height, width, window, resolution, kernels, dtype=torch.float32):
    module = FusedLocalWindowAttention(dim, 16, heads, ratio, resolution, window, kernels=kernels)
    return randomized(module).to(device=DEVICE, dtype=dtype).eval()


def timm_forward(module, x):
    """timm's own LocalWindowAttention.forward on the same module."""
    return LocalWindowAttention.forward(module, x)


def folded_args(module, x):
    return (x, *module.folded_parameters(x.dtype), module.attn.resolution, module.attn.scale,
            module.query_kernel_sizes)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reference_equals_timm(case):
    module = make_module(*case, dtype=torch.float64)
    x = torch.randn(2, case[0], case[3], case[4], device=DEVICE, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(cascaded_attention_infer_ref(*folded_args(module, x)), timm_forward(module, x))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_module_inference_runs_the_fused_op_and_equals_timm(case, monkeypatch):
    module = make_module(*case)
    module.backend = "triton"
    calls = []
    original = mxa_kernels.cascaded_attention_infer
    monkeypatch.setattr(mxa_kernels, "cascaded_attention_infer",
                        lambda *a, **k: calls.append(a[0].shape) or original(*a, **k))
    batch = 1 if case[3] * case[4] > 100 else 2
    x = torch.randn(batch, case[0], case[3], case[4], device=DEVICE)
    with torch.no_grad():
        want = timm_forward(module, x)
    with torch.inference_mode():
        got = module(x)
    assert calls == [x.shape]
    assert rel_err(got, want) < 1e-6


@pytest.mark.parametrize("config", sorted(cascaded_kernels.SHIPPED_CONFIGS))
def test_every_shipped_configuration(config):
    module = make_module(40, 2, 1.25, 9, 8, 7, 9, (5, 5))
    x = torch.randn(1, 40, 9, 8, device=DEVICE)
    with torch.no_grad():
        got = cascaded_kernels.cascaded_attention_infer_forward(*folded_args(module, x), config=config)
        assert rel_err(got, timm_forward(module, x)) < 1e-6


def test_launch_configuration_follows_the_head_width():
    """Padded heads up to 64 wide get "narrow", wider ones "wide": the pairing the sm_90 builds check
    for spills (tests/test_kernels_sm90.py builds each with heads as wide as it serves)."""
    chosen = {width: cascaded_kernels.launch_config(width).name for width in (16, 32, 64, 128)}
    assert chosen == {16: "narrow", 32: "narrow", 64: "narrow", 128: "wide"}
    served = {build.launch.name: 2 * build.constexprs["DVH"] for build in cascaded_kernels.builds()}
    assert all(cascaded_kernels.launch_config(width).name == name for name, width in served.items())


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_low_precision(dtype):
    module = make_module(192, 3, 4, 7, 7, 7, 7, (5, 5, 5), dtype=torch.float64)
    x = torch.randn(2, 192, 7, 7, device=DEVICE, dtype=torch.float64)
    with torch.no_grad():
        exact = timm_forward(module, x)
        args = folded_args(module, x)
        low = (x.to(dtype), *(t.to(dtype) if t.is_floating_point() else t for t in args[1:-3]), *args[-3:])
        eager = cascaded_attention_infer_ref(*low)
        got = mxa_kernels.cascaded_attention_infer(*low, backend="triton")
    assert got.dtype == dtype
    assert within_twice_eager(rel_err(got, exact), rel_err(eager, exact), dtype)


def test_folded_weights_follow_parameter_changes():
    module = make_module(32, 2, 1, 7, 7, 7, 7, (5, 5))
    module.backend = "triton"
    x = torch.randn(1, 32, 7, 7, device=DEVICE)
    with torch.no_grad():
        module(x)
        cached = module.folded_parameters(x.dtype)
        assert module.folded_parameters(x.dtype) is cached
        # new weights through load_state_dict, an optimizer step and a BatchNorm statistic
        other = make_module(32, 2, 1, 7, 7, 7, 7, (5, 5))
        module.load_state_dict(other.state_dict())
        assert rel_err(module(x), timm_forward(other, x)) < 1e-6
    module.attn.attention_biases.grad = torch.ones_like(module.attn.attention_biases)
    torch.optim.SGD(module.parameters(), lr=0.5).step()
    with torch.no_grad():
        module.attn.proj[1].bn.running_mean.add_(0.25)
        assert rel_err(module(x), timm_forward(module, x)) < 1e-6
        assert module.folded_parameters(torch.float16)[0].dtype == torch.float16


def test_gradients_in_eval_mode_take_the_training_path(monkeypatch):
    module = make_module(32, 2, 1, 7, 7, 7, 7, (5, 5))
    module.backend = "triton"
    monkeypatch.setattr(mxa_kernels, "cascaded_attention_infer", None)  # must not be called
    x = torch.randn(1, 32, 7, 7, device=DEVICE, requires_grad=True)
    out = module(x)
    out.square().sum().backward()
    assert x.grad is not None and module.attn.attention_biases.grad is not None


def test_library_registration_passes_opcheck():
    module = make_module(32, 2, 1, 5, 6, 4, 6, (3, 3))
    with torch.no_grad():
        args = folded_args(module, torch.randn(1, 32, 5, 6, device=DEVICE))
    torch.library.opcheck(torch.ops.mxa.cascaded_attention_infer.default, args,
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.slow
def test_torch_compile_traces_the_module_without_graph_breaks():
    module = make_module(32, 2, 1, 5, 6, 4, 6, (3, 3))
    module.backend = "triton"
    x = torch.randn(1, 32, 5, 6, device=DEVICE)
    with torch.no_grad():
        got = torch.compile(module, fullgraph=True)(x)
        assert rel_err(got, timm_forward(module, x)) < 1e-6


def test_bad_arguments_and_unsupported_blocks():
    module = make_module(32, 2, 1, 5, 6, 4, 6, (3, 3))
    x = torch.randn(1, 32, 5, 6, device=DEVICE)
    args = folded_args(module, x)
    with torch.no_grad():
        with pytest.raises(ValueError, match="empty batch"):
            mxa_kernels.cascaded_attention_infer(x[:0], *args[1:])
        with pytest.raises(ValueError, match=r"qkv_weight must have shape \(2, 48, 24\)"):
            mxa_kernels.cascaded_attention_infer(torch.randn(1, 48, 5, 6, device=DEVICE), *args[1:])
        with pytest.raises(ValueError, match="bias_idx must have shape"):
            mxa_kernels.cascaded_attention_infer(*args[:-3], 5, *args[-2:])
        with pytest.raises(ValueError, match=r"kernel_sizes must give each of the 2 heads an odd depthwise kernel "
                                             r"size of at most 3 \(dw_weight's\), got \[3, 5\]"):
            mxa_kernels.cascaded_attention_infer(*args[:-1], [3, 5])
        with pytest.raises(mxa_kernels.BackendUnavailableError, match="float32, float16 and bfloat16"):
            mxa_kernels.cascaded_attention_infer(x.double(), *args[1:], backend="triton")
    with pytest.raises(RuntimeError, match="inference only"):
        mxa_kernels.cascaded_attention_infer(x.requires_grad_(), *args[1:], backend="triton")
    big = make_module(32, 2, 1, 9, 9, 9, 9, (3, 3))
    big_args = folded_args(big, torch.randn(1, 32, 9, 9, device=DEVICE))
    assert mxa_kernels.resolve_backend("cascaded_attention_infer", "auto", "cuda", big_args) == "eager"
    with torch.no_grad(), pytest.raises(mxa_kernels.BackendUnavailableError, match="windows up to 8x8"):
        mxa_kernels.cascaded_attention_infer(*big_args, backend="triton")


@pytest.mark.slow
def test_the_model_at_inference_equals_eager(monkeypatch):
    calls = []
    original = mxa_kernels.cascaded_attention_infer
    monkeypatch.setattr(mxa_kernels, "cascaded_attention_infer",
                        lambda *a, **k: calls.append(a[0].shape) or original(*a, **k))
    model = mxa_model.create_model("mxa_efficientvit_m0", img_size=64, roi_mode="align")
    for block in model.modules():
        if isinstance(block, FusedLocalWindowAttention):
            randomized(block)
    model = model.to(DEVICE).eval()
    x = torch.randn(2, 1, 64, 64, device=DEVICE)
    with torch.no_grad():
        model.set_backend("triton")
        got = model(x)
        model.set_backend("eager")
        exact = model.double()(x.double())
    assert len(calls) == sum(isinstance(m, FusedLocalWindowAttention) for m in model.modules())
    # against the float64 model: 2.7e-7 to 4.1e-7 here (eager float32's own error 1.6e-7 to 2.1e-7), so
    # the limit leaves room for another processor's float32 rounding, not for a wrong block
    assert rel_err(got, exact) < 1e-5
