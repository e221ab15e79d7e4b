"""Eager PyTorch reference of the MXA local-detail branch after the ROI predictor.

The branch takes a feature map ``x`` (B, C, H, W) and one box per sample, normalized
``(x1, y1, x2, y2)``, and computes

1. ROI resample: the box's content resized back to H x W (bilinear),
2. channel attention: ``z * sigmoid(W2 relu(W1 mean_hw(z)))``,
3. spatial attention: ``z * sigmoid(conv7x7([max_c z, mean_c z]))``.

ROI modes:

- ``"crop"``, the authors' semantics: ``x1 = int(x1 * W)`` etc. (truncation), clamped to the map;
  when the box is empty the whole map is used; the crop is resized with ``F.interpolate`` bilinear,
  ``align_corners=False``. The integer snapping passes no gradient to the boxes. The product
  ``x1 * W`` is formed in float32 whatever the boxes' dtype (a half-precision coordinate is exact in
  float32, and so is its product with a side up to 2**13): the authors' float32 training computed
  exactly this. Their code multiplies in the box's own dtype, which under float16 / bfloat16 autocast
  rounds a few products up to the next pixel (float16 0.142822265625 * 7 is 0.99976, 1.0 in float16):
  the project does not follow that, on any backend.
- ``"align"``, differentiable: the box is continuous (already ordered, ``x1 < x2``, ``y1 < y2``) and
  sampled RoIAlign-style (one bilinear sample per output pixel centre, ``aligned=True``, border
  clamped). Gradients reach the features and the box coordinates.

Both modes express the resample of each axis as a (B, out, in) interpolation matrix, so the whole
batch is two batched matrix products: no loop over samples, no host synchronization.

The functions the model calls are kept inside TorchScript's subset: a scripted model runs them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ROI_MODES = ("crop", "align")
SPATIAL_KERNEL = 7  # the spatial attention's convolution is SPATIAL_KERNEL x SPATIAL_KERNEL, over 2 maps


def snap_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pixel boxes (B, 4) int64 ``(x1, y1, x2, y2)``, half-open, as the authors' crop computes them.

    Truncation of ``coordinate * size`` (in float32), clamping to the map, and the whole map when the
    box is empty.
    """
    boxes = boxes.detach().float()
    # float32 products truncated by .long(), as int() truncates them (Python scalars: no host sync)
    x1, y1 = (boxes[:, 0] * width).long().clamp(min=0), (boxes[:, 1] * height).long().clamp(min=0)
    x2, y2 = (boxes[:, 2] * width).long().clamp(max=width), (boxes[:, 3] * height).long().clamp(max=height)
    empty = (x2 <= x1) | (y2 <= y1)
    return torch.stack([torch.where(empty, 0, x1), torch.where(empty, 0, y1),
                        torch.where(empty, width, x2), torch.where(empty, height, y2)], dim=1)


def _two_tap_matrix(i0: torch.Tensor, i1: torch.Tensor, lam: torch.Tensor, size: int) -> torch.Tensor:
    """(B, out, size) rows with weight 1 - lam at column i0 and lam at column i1."""
    columns = torch.arange(size, device=i0.device)
    return ((columns == i0[..., None]) * (1 - lam)[..., None]) + ((columns == i1[..., None]) * lam[..., None])


def crop_resize_matrix(start: torch.Tensor, length: torch.Tensor, size: int, dtype: torch.dtype) -> torch.Tensor:
    """Interpolation matrix (B, size, size) of ``F.interpolate(bilinear, align_corners=False)``
    resizing the pixels ``[start, start + length)`` of an axis of ``size`` pixels to ``size`` pixels,
    its positions computed in ``dtype`` as F.interpolate computes them."""
    out = torch.arange(size, device=start.device, dtype=dtype)
    ratio = length.to(dtype)[:, None] / size
    src = (ratio * (out + 0.5) - 0.5).clamp(min=0)
    last = (length - 1)[:, None]
    i0 = torch.minimum(src.long(), last)
    lam = (src - i0).clamp(0, 1)
    i1 = i0 + (i0 < last).long()
    return _two_tap_matrix(start[:, None] + i0, start[:, None] + i1, lam, size)


def align_resize_matrix(lo: torch.Tensor, hi: torch.Tensor, size: int, dtype: torch.dtype) -> torch.Tensor:
    """Interpolation matrix (B, size, size) sampling the normalized interval ``[lo, hi]`` of an axis of
    ``size`` pixels at ``size`` bin centres (RoIAlign, aligned=True, one sample per bin), computed in
    ``dtype`` and differentiable in ``lo`` and ``hi``."""
    out = torch.arange(size, device=lo.device, dtype=dtype)
    lo, hi = lo.to(dtype)[:, None], hi.to(dtype)[:, None]
    src = (lo * size - 0.5 + (out + 0.5) * (hi - lo)).clamp(0, size - 1)
    i0 = src.detach().floor().long().clamp(0, size - 1)  # the clamp keeps a NaN box from indexing out of range
    lam = src - i0  # carries the gradient to lo and hi
    i1 = (i0 + 1).clamp(max=size - 1)
    return _two_tap_matrix(i0, i1, lam, size)


def roi_resample(x: torch.Tensor, boxes: torch.Tensor, roi_mode: str) -> torch.Tensor:
    """The content of each sample's box resized to the map's own H x W (see the module docstring)."""
    _, _, height, width = x.shape
    dtype = torch.promote_types(x.dtype, torch.float32)  # interpolation positions in at least fp32
    if roi_mode == "crop":
        px = snap_boxes(boxes, height, width)
        rows = crop_resize_matrix(px[:, 1], px[:, 3] - px[:, 1], height, dtype)
        cols = crop_resize_matrix(px[:, 0], px[:, 2] - px[:, 0], width, dtype)
    elif roi_mode == "align":
        rows = align_resize_matrix(boxes[:, 1], boxes[:, 3], height, dtype)
        cols = align_resize_matrix(boxes[:, 0], boxes[:, 2], width, dtype)
    else:
        raise ValueError(f"unknown roi_mode '{roi_mode}'; expected 'crop' or 'align'")  # TorchScript: no global tuples
    rows, cols = rows.to(x.dtype), cols.to(x.dtype)
    # out[b, c] = rows[b] @ x[b, c] @ cols[b]^T; the column pass is one bmm over all (c, h) rows
    batch, channels = x.shape[:2]
    resized_cols = torch.bmm(x.reshape(batch, channels * height, width), cols.transpose(1, 2))
    return torch.einsum("bph,bchw->bcpw", rows, resized_cols.view(batch, channels, height, width))


def crop_resize_loop(x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """The authors' crop and resize: a Python loop over the batch, one slice and one ``F.interpolate``
    per sample, with a host synchronization per coordinate. Kept as the historical reference that the
    tests and benchmarks compare ``roi_resample(..., "crop")`` with; the model never calls it."""
    _, _, height, width = x.shape
    out = []
    for i in range(x.shape[0]):
        x1, y1, x2, y2 = boxes[i]
        x1, y1, x2, y2 = int(x1 * width), int(y1 * height), int(x2 * width), int(y2 * height)
        x1, y1 = max(0, x1), max(0, y1)
        x2, y2 = min(width, x2), min(height, y2)
        crop = x[i, :, y1:y2, x1:x2] if (x2 > x1 and y2 > y1) else x[i]
        out.append(F.interpolate(crop[None], size=(height, width), mode="bilinear", align_corners=False))
    return torch.cat(out)


def mxa_branch_ref(
    x: torch.Tensor,
    boxes: torch.Tensor,
    ca_reduce_weight: torch.Tensor,
    ca_expand_weight: torch.Tensor,
    sa_weight: torch.Tensor,
    roi_mode: str = "crop",
) -> torch.Tensor:
    """ROI resample, channel attention and spatial attention of the MXA branch.

    Args:
        x: features (B, C, H, W).
        boxes: (B, 4) normalized ``(x1, y1, x2, y2)``.
        ca_reduce_weight: (C // r, C, 1, 1) weight of the channel attention's first 1x1 conv.
        ca_expand_weight: (C, C // r, 1, 1) weight of its second 1x1 conv.
        sa_weight: (1, 2, SPATIAL_KERNEL, SPATIAL_KERNEL) weight of the spatial attention's conv.
        roi_mode: ``"crop"`` or ``"align"``.
    """
    return channel_spatial_attention(roi_resample(x, boxes, roi_mode), ca_reduce_weight, ca_expand_weight, sa_weight)


def channel_spatial_attention(
    z: torch.Tensor, ca_reduce_weight: torch.Tensor, ca_expand_weight: torch.Tensor, sa_weight: torch.Tensor
) -> torch.Tensor:
    """The MXA branch after the ROI resample: channel attention, then spatial attention, on ``z``."""
    # Weights of another dtype (float32 weights with half-precision features, as in mixed precision)
    # are cast to the features' dtype.
    ca_reduce_weight, ca_expand_weight = ca_reduce_weight.to(z.dtype), ca_expand_weight.to(z.dtype)
    sa_weight = sa_weight.to(z.dtype)
    pooled = z.mean(dim=(2, 3), keepdim=True)
    channel_w = torch.sigmoid(F.conv2d(F.relu(F.conv2d(pooled, ca_reduce_weight)), ca_expand_weight))
    z = z * channel_w
    # max with indices, as the authors take it: its gradient goes to one maximal channel per pixel
    stats = torch.cat([z.max(dim=1, keepdim=True).values, z.mean(dim=1, keepdim=True)], dim=1)
    spatial_w = torch.sigmoid(F.conv2d(stats, sa_weight, padding=sa_weight.shape[-1] // 2))
    return z * spatial_w
