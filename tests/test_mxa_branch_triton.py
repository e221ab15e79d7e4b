"""The fused MXA branch (Triton; interpreter on CPU, a GPU when present) against its eager reference:
output and every gradient, both ROI modes, the stage shapes of M0..M5, odd shapes, every launch
configuration, low precision, memory layouts, torch.library registration and torch.compile."""

import pytest
import torch

import mxa_kernels
import mxa_model
from mxa_kernels import mxa_branch_ref
from mxa_kernels.ops.mxa_branch import kernels as fused

from helpers import DEVICE, HALF_DTYPES, mxa_run, rel_err, within_twice_eager

# (C, H, W) of the attention stages of EfficientViT-M0..M5 at 224 px
STAGE_SHAPES = sorted({(64, 14, 14), (128, 14, 14), (192, 14, 14), (128, 7, 7), (144, 7, 7), (192, 7, 7),
                       (240, 7, 7), (256, 7, 7), (288, 7, 7), (192, 4, 4), (224, 4, 4), (320, 4, 4), (384, 4, 4)})
ODD_SHAPES = [(5, 9, 13), (17, 13, 9), (3, 1, 1), (24, 2, 2), (7, 5, 3)]
CROP_BOXES = torch.tensor([
    [0.5, 0.5, 0.5, 0.5],      # empty -> whole map
    [0.9, 0.2, 0.1, 0.8],      # inverted -> whole map
    [0.0, 0.0, 1.0, 1.0],      # whole map
    [0.0, 0.7, 0.3, 1.0],      # on the left and bottom borders
    [0.95, 0.0, 1.0, 0.06],    # a thin box in a corner
    [0.2, 0.3, 0.21, 0.9],     # narrower than a pixel on small maps
    [-0.3, 0.4, 1.7, 0.6],     # outside the map, clamped
])


def make_inputs(batch, channels, height, width, roi_mode, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = max(1, channels // 16)
    x = torch.randn(batch, channels, height, width, generator=gen)
    if roi_mode == "crop":
        boxes = torch.cat([CROP_BOXES, torch.rand(batch, 4, generator=gen)])[:batch]
    else:
        lo, size = torch.rand(batch, 2, generator=gen) * 0.6, 0.2 + torch.rand(batch, 2, generator=gen) * 0.4
        boxes = torch.cat([lo, (lo + size).clamp(max=1.0)], dim=1)
        # Boxes on the borders: the first and last sample positions are clamped. (Not the whole map
        # exactly: all its sample positions are integers, where the box gradient is one-sided.)
        boxes[0] = torch.tensor([0.0, 0.03, 0.97, 1.0])
    weights = [torch.randn(hidden, channels, 1, 1, generator=gen) * channels ** -0.5,
               torch.randn(channels, hidden, 1, 1, generator=gen) * hidden ** -0.5,
               torch.randn(1, 2, 7, 7, generator=gen) * 0.2]
    grad = torch.randn(batch, channels, height, width, generator=gen)
    to = dict(device=DEVICE)
    return (x.to(dtype=dtype, **to), boxes.to(**to), [w.to(**to) for w in weights], grad.to(dtype=dtype, **to))


def reference(x, boxes, weights, grad, roi_mode):
    """The eager reference in float64."""
    return mxa_run(mxa_branch_ref, x.double(), boxes.double(), [w.double() for w in weights], grad.double(), roi_mode)


def fused_op(x, boxes, w1, w2, ws, roi_mode):
    return mxa_kernels.mxa_branch(x, boxes, w1, w2, ws, roi_mode=roi_mode, backend="triton")


def assert_close_rel(got, want, tol, name):
    assert got.shape == want.shape and got.dtype != torch.float64, name
    err = rel_err(got, want)
    assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


NAMES = ["out", "grad x", "grad ca_reduce_weight", "grad ca_expand_weight", "grad sa_weight", "grad boxes"]


def check(batch, channels, height, width, roi_mode, block_c=None, tol=(2e-6, 2e-5)):
    x, boxes, weights, grad = make_inputs(batch, channels, height, width, roi_mode)
    if block_c is None:
        got = mxa_run(fused_op, x, boxes, weights, grad, roi_mode)
    else:
        def launch(x, boxes, w1, w2, ws, roi_mode):
            align = roi_mode == "align"
            return _WithConfig.apply(x, boxes, w1, w2, ws, align, block_c)
        got = mxa_run(launch, x, boxes, weights, grad, roi_mode)
    want = reference(x, boxes, weights, grad, roi_mode)
    for name, g, w, t in zip(NAMES, got, want, (tol[0],) + (tol[1],) * 5):
        assert_close_rel(g, w, t, name)


class _WithConfig(torch.autograd.Function):
    """The launchers with an explicit channel block, so that every shipped configuration is tested."""

    @staticmethod
    def forward(ctx, x, boxes, w1, w2, ws, align, block_c):
        out, *saved = fused.mxa_branch_forward(x, boxes, w1, w2, ws, align, block_c=block_c)
        ctx.save_for_backward(x, boxes, w1, w2, ws, *saved)
        ctx.align, ctx.block_c = align, block_c
        return out

    @staticmethod
    def backward(ctx, grad_out):
        g_x, g_boxes, g_w1, g_w2, g_ws = fused.mxa_branch_backward(
            grad_out, *ctx.saved_tensors, ctx.align, block_c=ctx.block_c)
        return g_x, g_boxes if ctx.align else None, g_w1, g_w2, g_ws, None, None


@pytest.mark.slow
@pytest.mark.parametrize("roi_mode", mxa_kernels.ROI_MODES)
@pytest.mark.parametrize("shape", STAGE_SHAPES)
def test_stage_shapes(shape, roi_mode):
    check(2, *shape, roi_mode)


@pytest.mark.parametrize("roi_mode", mxa_kernels.ROI_MODES)
@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_odd_shapes(shape, roi_mode):
    check(3, *shape, roi_mode)


@pytest.mark.parametrize("roi_mode", mxa_kernels.ROI_MODES)
def test_single_sample(roi_mode):
    check(1, 20, 14, 14, roi_mode)


def test_degenerate_and_border_boxes():
    check(len(CROP_BOXES), 12, 14, 14, "crop")
    check(len(CROP_BOXES), 12, 4, 4, "crop")


def test_align_boxes_outside_empty_or_inverted():
    # (no sample position may fall exactly on a pixel, where the box gradient is one-sided)
    boxes = torch.tensor([[-0.2, 0.13, 0.5, 1.3], [0.33, 0.41, 0.33, 0.41], [0.8, 0.6, 0.2, 0.1]], device=DEVICE)
    x, _, weights, grad = make_inputs(3, 9, 7, 10, "align")
    got = mxa_run(fused_op, x, boxes, weights, grad, "align")
    want = reference(x, boxes, weights, grad, "align")
    for name, g, w in zip(NAMES, got, want):
        assert_close_rel(g, w, 2e-5, name)


# Every configuration the launcher can choose: channel blocks 16, 8 and 4 for padded maps of
# 16x16, 16x32 / 32x16 and 32x32.
@pytest.mark.parametrize("roi_mode", mxa_kernels.ROI_MODES)
@pytest.mark.parametrize("height,width", [(9, 13), (10, 20), (20, 10), (17, 31)])
def test_every_launch_configuration(height, width, roi_mode):
    block_c = fused.block_channels(height, width)
    assert block_c in fused.SHIPPED_CONFIGS
    check(2, 3 * block_c + 1, height, width, roi_mode)


@pytest.mark.parametrize("block_c", fused.SHIPPED_CONFIGS)
def test_each_channel_block_on_one_shape(block_c):
    check(2, 37, 9, 13, "align", block_c=block_c)  # (maps of more than 64 pixels take a channel block)


@pytest.mark.parametrize("height,width,kron", [(7, 7, True), (4, 4, True), (8, 8, True), (5, 13, False),
                                               (14, 14, False)])
def test_small_maps_resample_through_the_kronecker_matrix(height, width, kron):
    options = fused._launch_options(torch.empty(1, 16, height, width), None)
    assert options["KRON"] == kron
    check(2, 19, height, width, "align")



@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_whole_map_boxes_resample_to_their_input_exactly(dtype):
    """The kernels skip the resample of a box whose taps are the identity: the reference's resample of
    such a box (a whole-map, empty or inverted crop; the whole map in align mode) is its input, bit for
    bit, so the skip changes nothing."""
    x = torch.randn(4, 6, 7, 9).to(dtype)
    crop = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.5, 0.5], [0.9, 0.2, 0.1, 0.8], [-0.1, 0.0, 1.2, 1.0]])
    assert torch.equal(mxa_kernels.ops.mxa_branch.reference.roi_resample(x, crop, "crop"), x)
    whole = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(4, 1)
    assert torch.equal(mxa_kernels.ops.mxa_branch.reference.roi_resample(x, whole, "align"), x)


def test_launch_configurations_are_the_shipped_ones():
    sides = range(1, fused.MAX_MAP_SIDE + 1)
    assert {fused.block_channels(h, w) for h in sides for w in sides} == set(fused.SHIPPED_CONFIGS)


def test_channels_last_half_precision_equals_nchw():
    x, boxes, weights, grad = make_inputs(2, 24, 7, 9, "align", dtype=torch.float16)
    nchw = mxa_run(fused_op, x, boxes, weights, grad, "align")
    x_cl, grad_cl = (t.to(memory_format=torch.channels_last) for t in (x, grad))
    channels_last = mxa_run(fused_op, x_cl, boxes, weights, grad_cl, "align")
    for name, a, b in zip(NAMES, channels_last, nchw):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("roi_mode", mxa_kernels.ROI_MODES)
def test_channels_last_and_expanded_gradients(roi_mode):
    x, boxes, weights, _ = make_inputs(3, 24, 7, 9, roi_mode)
    x_cl = x.to(memory_format=torch.channels_last).requires_grad_()
    out = fused_op(x_cl, boxes, *weights, roi_mode)
    assert out.is_contiguous(memory_format=torch.channels_last)
    out.sum().backward()  # an expanded (stride-0) gradient
    x_ref = x.double().requires_grad_()
    ref = mxa_branch_ref(x_ref, boxes.double(), *[w.double() for w in weights], roi_mode)
    ref.sum().backward()
    assert_close_rel(out, ref.detach(), 2e-6, "out")
    assert_close_rel(x_cl.grad, x_ref.grad, 2e-5, "grad x")


@pytest.mark.parametrize("shape", [(48, 14, 14), (12, 20, 20)])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("roi_mode", mxa_kernels.ROI_MODES)
def test_low_precision(dtype, roi_mode, shape):
    x, boxes, weights, grad = make_inputs(2, *shape, roi_mode, dtype=dtype)
    exact = reference(x, boxes, weights, grad, roi_mode)
    got = mxa_run(fused_op, x, boxes, weights, grad, roi_mode)
    eager_low = mxa_run(mxa_branch_ref, x, boxes, weights, grad, roi_mode)
    for name, g, e, w in zip(NAMES, got, eager_low, exact):
        assert g.dtype == e.dtype
        err_fused, err_eager = rel_err(g, w), rel_err(e, w)
        assert within_twice_eager(err_fused, err_eager, dtype), (name, err_fused, err_eager)


@pytest.mark.slow
def test_library_registration_passes_opcheck():
    x, boxes, weights, _ = make_inputs(2, 20, 7, 7, "align")
    for align in (False, True):
        args = (x.requires_grad_(), boxes.requires_grad_(align), *[w.requires_grad_() for w in weights], align)
        torch.library.opcheck(torch.ops.mxa.mxa_branch_fwd.default, args)


def test_torch_compile_traces_through_without_graph_breaks():
    x, boxes, weights, grad = make_inputs(2, 20, 7, 7, "align")

    @torch.compile(fullgraph=True)
    def compiled(x, boxes, w1, w2, ws, roi_mode):
        return fused_op(x, boxes, w1, w2, ws, roi_mode) * 2

    got = mxa_run(compiled, x, boxes, weights, grad, "align")
    want = mxa_run(lambda *a: fused_op(*a) * 2, x, boxes, weights, grad, "align")
    for name, g, w in zip(NAMES, got, want):
        torch.testing.assert_close(g, w, msg=name)


@pytest.mark.parametrize("roi_mode", mxa_kernels.ROI_MODES)
def test_torch_compile_of_the_module(roi_mode):
    module = mxa_model.MedicalXRayAttention(24, roi_mode=roi_mode, backend="triton").to(DEVICE)
    x = torch.randn(2, 24, 7, 7, device=DEVICE)
    compiled = torch.compile(module, fullgraph=True)
    torch.testing.assert_close(compiled(x), module(x))
    compiled(x).square().sum().backward()
    assert module.spatial_attention[0].weight.grad is not None


@pytest.mark.parametrize("roi_mode", mxa_kernels.ROI_MODES)
def test_module_uses_the_kernel_through_the_backend_switch(roi_mode):
    eager = mxa_model.MedicalXRayAttention(40, roi_mode=roi_mode, backend="eager").to(DEVICE)
    triton_module = mxa_model.MedicalXRayAttention(40, roi_mode=roi_mode, backend="triton").to(DEVICE)
    triton_module.load_state_dict(eager.state_dict())
    x = torch.randn(2, 40, 7, 7, device=DEVICE)
    torch.testing.assert_close(triton_module(x), eager(x), rtol=1e-4, atol=1e-5)
    triton_module(x).square().sum().backward()
    eager(x).square().sum().backward()
    for (name, p), q in zip(triton_module.named_parameters(), eager.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("side", [7, 14])
def test_crop_snaps_half_precision_boxes_in_float32_as_the_reference(side):
    """The float16 coordinates whose product with the side rounds up to the next pixel in float16 but not
    in float32 (the boundary cases of the snapping rule): the kernel crops where the reference does."""
    values = torch.arange(1, 2**15, dtype=torch.int16).view(torch.float16)
    values = values[(values > 0) & (values < 1)]
    values = values[torch.floor((values * side).float()) != torch.floor(values.float() * side)]
    ones = torch.ones_like(values)
    boxes = torch.stack([values, values * 0, ones, ones], dim=1).to(DEVICE)  # x1 at the boundary
    x, _, weights, _ = make_inputs(len(values), 8, side, side, "crop")
    want = mxa_branch_ref(x, boxes, *weights, "crop")
    torch.testing.assert_close(fused_op(x, boxes, *weights, "crop"), want, rtol=1e-4, atol=1e-5)
    shifted = mxa_branch_ref(x, boxes + torch.tensor([1 / (2 * side), 0, 0, 0], device=DEVICE), *weights, "crop")
    assert not torch.allclose(shifted, want)  # half a pixel further is another crop: the test can tell


def test_maps_beyond_the_kernel_fall_back_or_raise():
    x, boxes, weights, _ = make_inputs(1, 4, fused.MAX_MAP_SIDE + 1, 8, "crop")
    args = (x, boxes, *weights, "crop")
    assert mxa_kernels.resolve_backend("mxa_branch", "auto", "cuda", args) == "eager"
    with pytest.raises(mxa_kernels.BackendUnavailableError, match="maps up to 32x32"):
        mxa_kernels.mxa_branch(*args, backend="triton")
    assert fused.unsupported_reason(*make_inputs(1, 4, 32, 32, "crop")[:2], *weights, "crop") is None


def test_auto_serves_cpu_tensors_with_eager_and_cuda_with_triton():
    x, boxes, weights, _ = make_inputs(1, 4, 7, 7, "crop")
    args = (x, boxes, *weights, "crop")
    assert mxa_kernels.resolve_backend("mxa_branch", "auto", "cpu", args) == "eager"
    assert mxa_kernels.resolve_backend("mxa_branch", "auto", "cuda", args) == "triton"
