"""The eager MXA branch against independent computations: the authors' per-sample loop (crop mode),
torchvision's RoIAlign and finite differences (align mode), nn layers (attention stages)."""

import math

import pytest
import torch
import torchvision

import mxa_kernels
from mxa_kernels import crop_resize_loop, mxa_branch_ref, roi_resample, snap_boxes

from helpers import rel_err

SHAPES = [(4, 192, 14, 14), (3, 5, 9, 13), (1, 7, 4, 4), (2, 24, 7, 7), (2, 3, 1, 1), (2, 6, 2, 5)]


SPECIAL_BOXES = torch.tensor([
    [0.5, 0.5, 0.5, 0.5],      # empty -> whole map
    [0.9, 0.2, 0.1, 0.8],      # inverted in x -> whole map
    [0.0, 0.0, 1.0, 1.0],      # whole map
    [0.0, 0.7, 0.3, 1.0],      # touches the left and bottom borders
    [0.95, 0.0, 1.0, 0.06],    # thin box in the top-right corner
    [0.2, 0.3, 0.21, 0.9],     # narrower than a pixel in x on small maps
])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("boxes_kind", ["random", "special"])
def test_crop_equals_the_authors_loop(shape, boxes_kind):
    boxes = torch.rand(shape[0], 4) if boxes_kind == "random" else SPECIAL_BOXES
    x = torch.randn(len(boxes), *shape[1:])
    torch.testing.assert_close(roi_resample(x, boxes, "crop"), crop_resize_loop(x, boxes), rtol=1e-5, atol=1e-5)


def test_crop_gradient_equals_the_authors_loop():
    x = torch.randn(6, 12, 14, 14, requires_grad=True)
    boxes = SPECIAL_BOXES
    g = torch.randn(6, 12, 14, 14)
    (gx,) = torch.autograd.grad((roi_resample(x, boxes, "crop") * g).sum(), x)
    (gx_ref,) = torch.autograd.grad((crop_resize_loop(x, boxes) * g).sum(), x)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)


def test_crop_passes_no_gradient_to_boxes():
    boxes = torch.rand(3, 4, requires_grad=True)
    out = roi_resample(torch.randn(3, 4, 6, 6), boxes, "crop")
    assert not out.requires_grad


def test_snap_boxes_truncates_clamps_and_falls_back():
    boxes = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.19, 0.0, 0.99, 1.0], [0.3, 0.1, 0.31, 0.2]])
    assert snap_boxes(boxes, 10, 10).tolist() == [[0, 0, 10, 10], [1, 0, 9, 10], [0, 0, 10, 10]]


def half_precision_coordinates(dtype):
    """Every value of ``dtype`` in (0, 1), the range of the ROI predictor's sigmoid."""
    values = torch.arange(1, 2**15, dtype=torch.int16).view(dtype)
    return values[(values > 0) & (values < 1)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_snap_boxes_multiplies_in_float32_whatever_the_boxes_dtype(dtype):
    """The one rule: the product coordinate * size in float32 (exact here), then truncated. A product in
    the box's half precision rounds a few coordinates up to the next pixel (e.g. float16 0.142822265625 * 7
    = 0.99976 in float32, 1.0 in float16): those are the boundary cases."""
    values = half_precision_coordinates(dtype)
    ones = torch.ones_like(values)
    boxes = torch.stack([values, values, ones, ones], dim=1)
    for size in (4, 7, 14):
        want = [math.floor(v * size) for v in values.tolist()]  # Python floats: exact products
        snapped = snap_boxes(boxes, size, size)
        assert snapped[:, 0].tolist() == want and snapped[:, 1].tolist() == want
        in_half = torch.floor((values * size).float()).long()
        assert (size == 4) == bool((in_half == snapped[:, 0]).all())  # 7 and 14 have boundary cases


def roi_align_reference(x, boxes):
    """torchvision's RoIAlign, one sample per bin, aligned: the align mode's definition."""
    batch, _, height, width = x.shape
    scale = torch.tensor([width, height, width, height], dtype=x.dtype)
    rois = torch.cat([torch.arange(batch, dtype=x.dtype)[:, None], boxes.to(x.dtype) * scale], dim=1)
    return torchvision.ops.roi_align(x, rois, (height, width), spatial_scale=1.0, sampling_ratio=1, aligned=True)


def ordered_boxes(batch, min_size=0.05):
    a, b = torch.rand(batch, 2), torch.rand(batch, 2)
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    hi = torch.maximum(hi, lo + min_size).clamp(max=1.0)
    return torch.stack([lo[:, 0], lo[:, 1], hi[:, 0], hi[:, 1]], dim=1)


@pytest.mark.parametrize("shape", SHAPES)
def test_align_equals_roi_align(shape):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    boxes = torch.cat([torch.tensor([[0.0, 0.0, 1.0, 1.0]]), ordered_boxes(shape[0])])[:shape[0]]
    g = torch.randn(shape, dtype=torch.float64)
    ours = roi_resample(x, boxes.double(), "align")
    ref = roi_align_reference(x, boxes.double())
    torch.testing.assert_close(ours, ref)
    (gx,) = torch.autograd.grad((ours * g).sum(), x)
    (gx_ref,) = torch.autograd.grad((ref * g).sum(), x)
    torch.testing.assert_close(gx, gx_ref)


def test_align_of_the_whole_map_is_identity():
    x = torch.randn(2, 3, 9, 13)
    torch.testing.assert_close(roi_resample(x, torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2), "align"), x)


def test_align_box_gradient_matches_finite_differences():
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    boxes = ordered_boxes(2, min_size=0.3).double().requires_grad_()
    torch.autograd.gradcheck(lambda b: roi_resample(x, b, "align"), (boxes,))


def authors_attention(z, reduce_w, expand_w, sa_w):
    """Channel then spatial attention with nn layers, as the authors' Sequentials apply them."""
    channels, hidden = z.shape[1], reduce_w.shape[0]
    ca = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Conv2d(channels, hidden, 1, bias=False),
                             torch.nn.ReLU(), torch.nn.Conv2d(hidden, channels, 1, bias=False), torch.nn.Sigmoid())
    sa = torch.nn.Sequential(torch.nn.Conv2d(2, 1, 7, padding=3, bias=False), torch.nn.Sigmoid())
    ca = ca.to(z.dtype)
    sa = sa.to(z.dtype)
    ca[1].weight, ca[3].weight, sa[0].weight = reduce_w, expand_w, sa_w
    z = z * ca(z)
    return z * sa(torch.cat([torch.max(z, dim=1, keepdim=True)[0], torch.mean(z, dim=1, keepdim=True)], dim=1))


@pytest.mark.parametrize("roi_mode", mxa_kernels.ROI_MODES)
@pytest.mark.parametrize("shape", [(3, 20, 14, 14), (1, 5, 9, 13)])
def test_branch_output_and_every_gradient(roi_mode, shape):
    batch, channels = shape[:2]
    hidden = max(1, channels // 16)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    boxes = ordered_boxes(batch, 0.3).double().requires_grad_(roi_mode == "align")
    weights = [torch.nn.Parameter(torch.randn(*s, dtype=torch.float64) * 0.3)
               for s in [(hidden, channels, 1, 1), (channels, hidden, 1, 1), (1, 2, 7, 7)]]
    inputs = [x, *weights] + ([boxes] if roi_mode == "align" else [])
    g = torch.randn(shape, dtype=torch.float64)

    ours = mxa_kernels.mxa_branch(x, boxes, *weights, roi_mode=roi_mode)
    resampled = crop_resize_loop(x, boxes) if roi_mode == "crop" else roi_align_reference(x, boxes)
    ref = authors_attention(resampled, *weights)
    torch.testing.assert_close(ours, ref)
    grads = torch.autograd.grad((ours * g).sum(), inputs)
    if roi_mode == "align":  # the box gradient: roi_align has none, so check against finite differences
        torch.autograd.gradcheck(lambda b: mxa_branch_ref(x.detach(), b, *[w.detach() for w in weights], "align"),
                                 (boxes.detach().requires_grad_(),), fast_mode=True)
        inputs, grads = inputs[:-1], grads[:-1]
    grads_ref = torch.autograd.grad((ref * g).sum(), inputs)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_runs_close_to_float32(dtype):
    x = torch.randn(2, 16, 7, 7)
    boxes = ordered_boxes(2, 0.3)
    weights = [torch.randn(1, 16, 1, 1), torch.randn(16, 1, 1, 1), torch.randn(1, 2, 7, 7) * 0.2]
    ref = mxa_branch_ref(x, boxes, *weights, "crop")
    low = mxa_branch_ref(x.to(dtype), boxes, *[w.to(dtype) for w in weights], "crop")
    assert low.dtype == dtype
    assert rel_err(low, ref) < 3e-2


def test_bad_arguments_raise_clear_errors():
    x = torch.randn(2, 8, 5, 5)
    w = [torch.randn(1, 8, 1, 1), torch.randn(8, 1, 1, 1), torch.randn(1, 2, 7, 7)]
    boxes = torch.rand(2, 4)
    with pytest.raises(ValueError, match="roi_mode"):
        mxa_kernels.mxa_branch(x, boxes, *w, roi_mode="resize")
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        mxa_kernels.mxa_branch(x[0], boxes, *w)
    with pytest.raises(ValueError, match="empty batch"):
        mxa_kernels.mxa_branch(x[:0], boxes[:0], *w)
    with pytest.raises(ValueError, match="boxes must have shape"):
        mxa_kernels.mxa_branch(x, boxes[:1], *w)
    with pytest.raises(ValueError, match="ca_reduce_weight"):
        mxa_kernels.mxa_branch(x[:, :7], boxes, *w)
    with pytest.raises(TypeError, match="floating-point"):
        mxa_kernels.mxa_branch(x.long(), boxes, *w)
    with pytest.raises(ValueError, match="unknown kernel backend"):
        mxa_kernels.mxa_branch(x, boxes, *w, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("roi_mode", mxa_kernels.ROI_MODES)
def test_eager_branch_makes_no_host_synchronization(roi_mode):
    x = torch.randn(4, 16, 14, 14, device="cuda", requires_grad=True)
    boxes = ordered_boxes(4, 0.3).cuda()
    weights = [torch.randn(1, 16, 1, 1, device="cuda"), torch.randn(16, 1, 1, 1, device="cuda"),
               torch.randn(1, 2, 7, 7, device="cuda")]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        mxa_branch_ref(x, boxes, *weights, roi_mode).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
