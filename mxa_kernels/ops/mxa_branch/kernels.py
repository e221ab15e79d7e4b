"""Fused Triton kernels of the MXA branch after the ROI predictor: ROI resample (crop or align),
channel attention, spatial attention and the final scaling; forward and backward.

Launches:

- forward: **one** launch, one program per sample. The program makes three passes over its sample's
  channels (the first reduces the channel-attention input, the second the channel max/mean for the
  spatial attention, the third writes the output), re-reading the features from L2; the 7x7 conv of
  the spatial attention runs in registers between the second and third pass. The resized crop and the
  scaled maps are never written to memory: besides the output it writes only per-sample vectors for
  the backward (pooled features, hidden layer, channel weights: B x C; channel max/mean, argmax and
  spatial weights: B x H x W).
- backward: **two** launches plus a few tiny matrix products on (B, C) tensors. Launch 1 (one program
  per sample) reduces over channels: the spatial-attention gradients (incl. the 7x7 weight, a per-sample
  partial) and the gradient of the channel weights. The channel-attention MLP backward is then a handful
  of (B, C) x (C, C/r) products in PyTorch. Launch 2 (one program per sample and channel block) writes
  the feature gradient and, in align mode, per-block partials of the box gradient. Weight and box
  partials are summed in PyTorch, so every gradient is deterministic (no atomics).

The resample of each sample is two small matrix products, ``rows @ x[c] @ cols^T``, with the (H, H)
and (W, W) interpolation matrices built in registers from the box; both run as batched ``tl.dot`` over
a block of channels. The 7x7 conv is ``sum_i shift_i @ (max @ band_0i + mean @ band_1i)`` with banded
(Toeplitz) matrices of the kernel rows. Maps up to 32 x 32 are served (padded to 16 or 32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import alloc
from ...backend import kernel_dtype_reason, register_triton_op
from ...launch import BUILD_DTYPES, LaunchConfig, dot_precision, kernel_build, padded
from .reference import SPATIAL_KERNEL

MAX_MAP_SIDE = 32
# Channels per tile (BC) and warps per program, by channels per tile (16 for maps padded to 16x16; 8
# for 16x32 or 32x16; 4 for 32x32). Warps split the channel axis of the batched products, so a
# 4-channel tile gets 4 warps; 8 warps keep the 16x16 bf16/fp16 kernels free of register spills
# (ptxas, sm_90).
SHIPPED_CONFIGS = {block_c: LaunchConfig(f"BC {block_c}", num_warps, {"BC": block_c})
                   for block_c, num_warps in ((16, 8), (8, 8), (4, 4))}

# The spatial attention's convolution, as the kernels' constants: a 7x7 kernel (zero padding 3) over two
# maps, channel max and channel mean, so 49 weights per map and 98 in all; kernel rows padded to 8
# where a block needs a power of two.
SA_SIDE = tl.constexpr(SPATIAL_KERNEL)
SA_PAD = tl.constexpr(SPATIAL_KERNEL // 2)
SA_SIDE_P2 = tl.constexpr(padded(SPATIAL_KERNEL, least=1))
SA_TAPS = tl.constexpr(SPATIAL_KERNEL * SPATIAL_KERNEL)
SA_WEIGHTS = tl.constexpr(2 * SPATIAL_KERNEL * SPATIAL_KERNEL)


def _clamp_gradient_at_bounds() -> bool:
    """Whether torch.clamp passes the gradient at its bounds: PyTorch used to (subgradient 1), newer
    releases give the minimum-norm subgradient 0. The eager reference clamps each RoIAlign sample
    position to the map, so a position exactly on the border (a box edge at 0 or 1, for example)
    moves with the box or not by this rule; the kernel's box gradient follows it."""
    with torch.inference_mode(False), torch.enable_grad():
        position = torch.zeros((), requires_grad=True)
        (grad,) = torch.autograd.grad(position.clamp(0.0, 1.0), position)
    return bool(grad != 0)


# a global constexpr, read by the backward kernel (its signature stays the same)
CLAMP_GRADIENT_AT_BOUNDS = tl.constexpr(_clamp_gradient_at_bounds())


@triton.jit
def _snap_axis(lo, hi, n):
    """The authors' integer crop of one axis: truncated, clamped start and end (end may be <= start)."""
    nf = n.to(tl.float32)
    # Clamp before the int conversion so that huge or NaN boxes stay defined; truncation is unchanged.
    start = tl.maximum(tl.minimum(tl.maximum(lo * nf, -1.0), nf + 1.0).to(tl.int32), 0)
    end = tl.minimum(tl.minimum(tl.maximum(hi * nf, -1.0), nf + 1.0).to(tl.int32), n)
    return start, end


@triton.jit
def _crop_taps(start, length, n, NP: tl.constexpr):
    """F.interpolate(bilinear, align_corners=False) of [start, start + length) to n samples."""
    o = tl.arange(0, NP).to(tl.float32)
    ratio = length.to(tl.float32) / n.to(tl.float32)
    src = tl.maximum(ratio * (o + 0.5) - 0.5, 0.0)
    i0 = tl.minimum(src.to(tl.int32), length - 1)
    lam = tl.minimum(tl.maximum(src - i0.to(tl.float32), 0.0), 1.0)
    i1 = i0 + (i0 < length - 1).to(tl.int32)
    return start + i0, start + i1, lam


@triton.jit
def _align_taps(lo, hi, n, NP: tl.constexpr, AT_BOUNDS: tl.constexpr):
    """RoIAlign (aligned, one sample per bin, border clamped) of the normalized interval [lo, hi].
    ``moves``: where the sample position follows the box; a position exactly on the clamp's bounds
    moves if AT_BOUNDS, as torch.clamp's gradient says (see CLAMP_GRADIENT_AT_BOUNDS)."""
    o = tl.arange(0, NP).to(tl.float32)
    nf = n.to(tl.float32)
    src_raw = lo * nf - 0.5 + (o + 0.5) * (hi - lo)
    src = tl.minimum(tl.maximum(src_raw, 0.0), nf - 1.0)  # (a NaN position becomes 0 here: no NaN index)
    i0 = tl.minimum(tl.maximum(tl.floor(src).to(tl.int32), 0), n - 1)
    # a NaN position (a NaN or infinite box) gives NaN weights, as in the eager reference
    lam = tl.where(src_raw != src_raw, src_raw, src - i0.to(tl.float32))
    i1 = tl.minimum(i0 + 1, n - 1)
    if AT_BOUNDS:
        moves = (src_raw >= 0.0) & (src_raw <= nf - 1.0)
    else:
        moves = (src_raw > 0.0) & (src_raw < nf - 1.0)
    return i0, i1, lam, moves


@triton.jit
def _interp_matrix(i0, i1, lam, n, NP: tl.constexpr):
    """(NP out, NP in) matrix with 1 - lam at column i0 and lam at column i1 of rows < n."""
    col = tl.arange(0, NP)[None, :]
    rows_ok = (tl.arange(0, NP) < n)[:, None]
    m = tl.where(col == i0[:, None], 1.0 - lam[:, None], 0.0) + tl.where(col == i1[:, None], lam[:, None], 0.0)
    return tl.where(rows_ok, m, 0.0)


@triton.jit
def _tap_derivative_matrix(i0, i1, moves, n, NP: tl.constexpr):
    """d(interpolation matrix)/d(sample position): +1 at i1, -1 at i0, in rows whose position moves."""
    col = tl.arange(0, NP)[None, :]
    rows_ok = ((tl.arange(0, NP) < n) & moves)[:, None]
    m = tl.where(col == i1[:, None], 1.0, 0.0) - tl.where(col == i0[:, None], 1.0, 0.0)
    return tl.where(rows_ok, m, 0.0)


@triton.jit
def _sample_matrices(box_ptr, H, W, ALIGN: tl.constexpr, HP: tl.constexpr, WP: tl.constexpr):
    """Row matrix (HP, HP), column matrix (WP, WP), each [output, input], for one sample's box."""
    bx1 = tl.load(box_ptr + 0)
    by1 = tl.load(box_ptr + 1)
    bx2 = tl.load(box_ptr + 2)
    by2 = tl.load(box_ptr + 3)
    if ALIGN:
        r0, r1, rlam, _ = _align_taps(by1, by2, H, HP, True)
        c0, c1, clam, _ = _align_taps(bx1, bx2, W, WP, True)
    else:
        x1, x2 = _snap_axis(bx1, bx2, W)
        y1, y2 = _snap_axis(by1, by2, H)
        empty = (x2 <= x1) | (y2 <= y1)  # the authors fall back to the whole map
        x1 = tl.where(empty, 0, x1)
        x2 = tl.where(empty, W, x2)
        y1 = tl.where(empty, 0, y1)
        y2 = tl.where(empty, H, y2)
        r0, r1, rlam = _crop_taps(y1, y2 - y1, H, HP)
        c0, c1, clam = _crop_taps(x1, x2 - x1, W, WP)
    return _interp_matrix(r0, r1, rlam, H, HP), _interp_matrix(c0, c1, clam, W, WP)


@triton.jit
def _tile_offsets(b, c0, C, H, W, stride_b, stride_c, stride_h, stride_w, BC: tl.constexpr, HP: tl.constexpr, WP: tl.constexpr):
    c = c0 + tl.arange(0, BC)[:, None, None]
    h = tl.arange(0, HP)[None, :, None]
    w = tl.arange(0, WP)[None, None, :]
    return b * stride_b + c * stride_c + h * stride_h + w * stride_w, (c < C) & (h < H) & (w < W)


@triton.jit
def _resample(x, rows, cols, BC: tl.constexpr, HP: tl.constexpr, WP: tl.constexpr, PREC: tl.constexpr):
    """rows @ x[c] @ cols^T for a (BC, HP, WP) tile; returns it and x[c] @ cols^T, both float32."""
    cols_t = tl.broadcast_to(tl.trans(cols).to(x.dtype)[None, :, :], (BC, WP, WP))
    rows_b = tl.broadcast_to(rows.to(x.dtype)[None, :, :], (BC, HP, HP))
    t = tl.dot(x, cols_t, input_precision=PREC)
    return tl.dot(rows_b, t.to(x.dtype), input_precision=PREC), t


@triton.jit
def _load_resampled(x_ptr, b, c0, C, H, W, sxb, sxc, sxh, sxw, rows, cols,
                    BC: tl.constexpr, HP: tl.constexpr, WP: tl.constexpr, PREC: tl.constexpr):
    """The resampled tile of channels [c0, c0 + BC) of sample b, and the tile's mask."""
    offs, mask = _tile_offsets(b, c0, C, H, W, sxb, sxc, sxh, sxw, BC, HP, WP)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    z, _ = _resample(x, rows, cols, BC, HP, WP, PREC)
    return z, mask


@triton.jit
def _grad_scaled_map(g, spatial, cc, C, best_c, g_best, g_mean):
    """d loss / d(z * cw) from the output gradient g: the spatial weights' share, and the shares of the
    channel max (to the first maximal channel) and mean that fed the spatial attention."""
    g_u = g * spatial[None, :, :] + tl.where(cc[:, None, None] == best_c[None, :, :], g_best[None, :, :], 0.0)
    return g_u + g_mean[None, :, :] / C


@triton.jit
def _channel_weights(w2_ptr, hid, cc, C, CH, BCH: tl.constexpr):
    """sigmoid(W2 @ relu-ed hidden) for the channels cc."""
    j = tl.arange(0, BCH)
    w2 = tl.load(w2_ptr + cc[:, None] * CH + j[None, :], mask=(cc[:, None] < C) & (j[None, :] < CH), other=0.0)
    return tl.sigmoid(tl.sum(w2 * hid[None, :], axis=1))


@triton.jit
def _row_shift(i, H, HP: tl.constexpr):
    """(HP, HP) matrix S with (S @ m)[p] = m[p + i - SA_PAD] (zero outside the map)."""
    p = tl.arange(0, HP)[:, None]
    h = tl.arange(0, HP)[None, :]
    return tl.where((h == p + i - SA_PAD) & (h < H), 1.0, 0.0)


@triton.jit
def _kernel_band(sa_w_ptr, k, i, WP: tl.constexpr):
    """(WP, WP) matrix B with (m @ B)[:, q] = sum_j sa_w[k, i, j] m[:, q + j - SA_PAD]."""
    w = tl.arange(0, WP)[:, None]
    q = tl.arange(0, WP)[None, :]
    d = w - q + SA_PAD
    return tl.load(sa_w_ptr + k * SA_TAPS + i * SA_SIDE + d, mask=(d >= 0) & (d < SA_SIDE), other=0.0)


@triton.jit(do_not_specialize=["C", "H", "W"])  # sizes of 1 would become Python ints without .to
def mxa_branch_fwd_kernel(
    x_ptr, box_ptr, w1_ptr, w2_ptr, sa_w_ptr, out_ptr,
    pooled_ptr, hidden_ptr, cw_ptr, stats_ptr, argmax_ptr, spatial_ptr,
    C, H, W, CH,
    sxb, sxc, sxh, sxw, sob, soc, soh, sow,
    ALIGN: tl.constexpr, BC: tl.constexpr, HP: tl.constexpr, WP: tl.constexpr, BCH: tl.constexpr,
    PREC: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    rows, cols = _sample_matrices(box_ptr + b * 4, H, W, ALIGN, HP, WP)
    inv_hw = 1.0 / (H * W).to(tl.float32)
    j = tl.arange(0, BCH)

    # Pass 1: channel means of the resampled map, mean(rows @ x @ cols^T) = colsum(rows) . x . colsum(cols),
    # and the channel attention's hidden layer.
    row_w = tl.sum(rows, axis=0)
    col_w = tl.sum(cols, axis=0)
    hidden = tl.zeros((BCH,), tl.float32)
    for c0 in range(0, C, BC):
        offs, mask = _tile_offsets(b, c0, C, H, W, sxb, sxc, sxh, sxw, BC, HP, WP)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        pooled = tl.sum(tl.sum(x * row_w[None, :, None] * col_w[None, None, :], axis=2), axis=1) * inv_hw
        cc = c0 + tl.arange(0, BC)
        tl.store(pooled_ptr + b * C + cc, pooled, mask=cc < C)
        w1 = tl.load(w1_ptr + j[:, None] * C + cc[None, :], mask=(j[:, None] < CH) & (cc[None, :] < C), other=0.0)
        hidden += tl.sum(w1 * pooled[None, :], axis=1)
    tl.store(hidden_ptr + b * CH + j, hidden, mask=j < CH)
    # ReLU; NaN stays NaN as in torch.relu (tl.maximum's default drops it), the padding stays 0
    hidden = tl.where(j < CH, tl.maximum(hidden, 0.0, propagate_nan=tl.PropagateNan.ALL), 0.0)

    # Pass 2: channel weights, then the channel max (first maximal channel) and mean of the scaled map.
    best = tl.full((HP, WP), float("-inf"), tl.float32)
    best_c = tl.zeros((HP, WP), tl.int32)
    total = tl.zeros((HP, WP), tl.float32)
    for c0 in range(0, C, BC):
        z, mask = _load_resampled(x_ptr, b, c0, C, H, W, sxb, sxc, sxh, sxw, rows, cols, BC, HP, WP, PREC)
        cc = c0 + tl.arange(0, BC)
        cw = _channel_weights(w2_ptr, hidden, cc, C, CH, BCH)
        tl.store(cw_ptr + b * C + cc, cw, mask=cc < C)
        u = z * cw[:, None, None]
        in_c = (cc < C)[:, None, None]
        u_max = tl.where(in_c, u, float("-inf"))
        block_best, block_best_c = tl.max(u_max, axis=0, return_indices=True)
        block_best_c = block_best_c.to(tl.int32) + c0
        better = block_best > best
        best_c = tl.where(better, block_best_c, best_c)
        best = tl.where(better, block_best, best)
        total += tl.sum(tl.where(in_c, u, 0.0), axis=0)
    mean = total / C
    p = tl.arange(0, HP)[:, None]
    q = tl.arange(0, WP)[None, :]
    pix = (p < H) & (q < W)
    best = tl.where(pix, best, 0.0)  # the conv's zero padding
    tl.store(stats_ptr + b * 2 * H * W + p * W + q, best, mask=pix)
    tl.store(stats_ptr + b * 2 * H * W + H * W + p * W + q, mean, mask=pix)
    tl.store(argmax_ptr + b * H * W + p * W + q, best_c, mask=pix)

    # Spatial attention: 7x7 conv of (max, mean) as row shifts of banded matrix products.
    s = tl.zeros((HP, WP), tl.float32)
    for i in tl.static_range(SA_SIDE):
        band_sum = tl.dot(best, _kernel_band(sa_w_ptr, 0, i, WP), input_precision="ieee")
        band_sum += tl.dot(mean, _kernel_band(sa_w_ptr, 1, i, WP), input_precision="ieee")
        s += tl.dot(_row_shift(i, H, HP), band_sum, input_precision="ieee")
    spatial = tl.sigmoid(s)
    tl.store(spatial_ptr + b * H * W + p * W + q, spatial, mask=pix)

    # Pass 3: the output.
    for c0 in range(0, C, BC):
        z, mask = _load_resampled(x_ptr, b, c0, C, H, W, sxb, sxc, sxh, sxw, rows, cols, BC, HP, WP, PREC)
        cw = _channel_weights(w2_ptr, hidden, c0 + tl.arange(0, BC), C, CH, BCH)
        out = z * cw[:, None, None] * spatial[None, :, :]
        out_offs, _ = _tile_offsets(b, c0, C, H, W, sob, soc, soh, sow, BC, HP, WP)
        tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["C", "H", "W"])  # sizes of 1 would become Python ints without .to
def mxa_branch_bwd_channel_kernel(
    x_ptr, gout_ptr, box_ptr, sa_w_ptr, cw_ptr, stats_ptr, argmax_ptr, spatial_ptr,
    gcw_ptr, gstats_ptr, g_sa_w_ptr,
    C, H, W,
    sxb, sxc, sxh, sxw, sgb, sgc, sgh, sgw,
    ALIGN: tl.constexpr, BC: tl.constexpr, HP: tl.constexpr, WP: tl.constexpr, PREC: tl.constexpr,
):
    """Per sample: gradients of the spatial attention (maps and 7x7 weight) and of the channel weights."""
    b = tl.program_id(0).to(tl.int64)
    rows, cols = _sample_matrices(box_ptr + b * 4, H, W, ALIGN, HP, WP)
    p = tl.arange(0, HP)[:, None]
    q = tl.arange(0, WP)[None, :]
    pix = (p < H) & (q < W)
    spatial = tl.load(spatial_ptr + b * H * W + p * W + q, mask=pix, other=0.0)

    # d loss / d spatial weights = sum_c grad * (z * cw)
    g_spatial = tl.zeros((HP, WP), tl.float32)
    for c0 in range(0, C, BC):
        z, mask = _load_resampled(x_ptr, b, c0, C, H, W, sxb, sxc, sxh, sxw, rows, cols, BC, HP, WP, PREC)
        cc = c0 + tl.arange(0, BC)
        cw = tl.load(cw_ptr + b * C + cc, mask=cc < C, other=0.0)
        g_offs, _ = _tile_offsets(b, c0, C, H, W, sgb, sgc, sgh, sgw, BC, HP, WP)
        g = tl.load(gout_ptr + g_offs, mask=mask, other=0.0).to(tl.float32)
        g_spatial += tl.sum(g * z * cw[:, None, None], axis=0)
    g_s = tl.where(pix, g_spatial * spatial * (1.0 - spatial), 0.0)

    # Back through s = sum_i shift_i @ (max @ band_0i + mean @ band_1i).
    best = tl.load(stats_ptr + b * 2 * H * W + p * W + q, mask=pix, other=0.0)
    mean = tl.load(stats_ptr + b * 2 * H * W + H * W + p * W + q, mask=pix, other=0.0)
    g_best = tl.zeros((HP, WP), tl.float32)
    g_mean = tl.zeros((HP, WP), tl.float32)
    # band diagonal of each (w, q) entry, against the kernel's columns (padded to a power of two)
    diag = tl.arange(0, WP)[:, None] - tl.arange(0, WP)[None, :] + SA_PAD
    on_diag = diag[None, :, :] == tl.arange(0, SA_SIDE_P2)[:, None, None]
    kernel_col = tl.arange(0, SA_SIDE_P2)
    for i in tl.static_range(SA_SIDE):
        shift = _row_shift(i, H, HP)
        g_band_sum = tl.dot(tl.trans(shift), g_s, input_precision="ieee")
        g_best += tl.dot(g_band_sum, tl.trans(_kernel_band(sa_w_ptr, 0, i, WP)), input_precision="ieee")
        g_mean += tl.dot(g_band_sum, tl.trans(_kernel_band(sa_w_ptr, 1, i, WP)), input_precision="ieee")
        # d loss / d band_ki = (shift_i @ map_k)^T @ g_s; each band diagonal is one kernel weight.
        g_band_0 = tl.dot(tl.trans(tl.dot(shift, best, input_precision="ieee")), g_s, input_precision="ieee")
        g_band_1 = tl.dot(tl.trans(tl.dot(shift, mean, input_precision="ieee")), g_s, input_precision="ieee")
        g_row_0 = tl.sum(tl.sum(tl.where(on_diag, g_band_0[None, :, :], 0.0), axis=2), axis=1)
        g_row_1 = tl.sum(tl.sum(tl.where(on_diag, g_band_1[None, :, :], 0.0), axis=2), axis=1)
        row_0 = g_sa_w_ptr + b * SA_WEIGHTS + i * SA_SIDE + kernel_col
        tl.store(row_0, g_row_0, mask=kernel_col < SA_SIDE)
        tl.store(row_0 + SA_TAPS, g_row_1, mask=kernel_col < SA_SIDE)
    tl.store(gstats_ptr + b * 2 * H * W + p * W + q, g_best, mask=pix)
    tl.store(gstats_ptr + b * 2 * H * W + H * W + p * W + q, g_mean, mask=pix)

    # d loss / d channel weights = sum_hw d loss / d(z * cw) * z
    best_c = tl.load(argmax_ptr + b * H * W + p * W + q, mask=pix, other=-1)
    for c0 in range(0, C, BC):
        z, mask = _load_resampled(x_ptr, b, c0, C, H, W, sxb, sxc, sxh, sxw, rows, cols, BC, HP, WP, PREC)
        cc = c0 + tl.arange(0, BC)
        g_offs, _ = _tile_offsets(b, c0, C, H, W, sgb, sgc, sgh, sgw, BC, HP, WP)
        g = tl.load(gout_ptr + g_offs, mask=mask, other=0.0).to(tl.float32)
        g_u = _grad_scaled_map(g, spatial, cc, C, best_c, g_best, g_mean)
        tl.store(gcw_ptr + b * C + cc, tl.sum(tl.sum(g_u * z, axis=2), axis=1), mask=cc < C)


@triton.jit(do_not_specialize=["C", "H", "W"])  # sizes of 1 would become Python ints without .to
def mxa_branch_bwd_input_kernel(
    x_ptr, gout_ptr, box_ptr, cw_ptr, argmax_ptr, spatial_ptr, gstats_ptr, gpooled_ptr,
    gx_ptr, gbox_ptr,
    C, H, W,
    sxb, sxc, sxh, sxw, sgb, sgc, sgh, sgw, sdb, sdc, sdh, sdw,
    ALIGN: tl.constexpr, BC: tl.constexpr, HP: tl.constexpr, WP: tl.constexpr, PREC: tl.constexpr,
):
    """Per sample and channel block: the feature gradient and, in align mode, the box-gradient partial."""
    b = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    c0 = block * BC
    rows, cols = _sample_matrices(box_ptr + b * 4, H, W, ALIGN, HP, WP)
    p = tl.arange(0, HP)[:, None]
    q = tl.arange(0, WP)[None, :]
    pix = (p < H) & (q < W)
    inv_hw = 1.0 / (H * W).to(tl.float32)
    spatial = tl.load(spatial_ptr + b * H * W + p * W + q, mask=pix, other=0.0)
    best_c = tl.load(argmax_ptr + b * H * W + p * W + q, mask=pix, other=-1)
    g_best = tl.load(gstats_ptr + b * 2 * H * W + p * W + q, mask=pix, other=0.0)
    g_mean = tl.load(gstats_ptr + b * 2 * H * W + H * W + p * W + q, mask=pix, other=0.0)
    cc = c0 + tl.arange(0, BC)
    cw = tl.load(cw_ptr + b * C + cc, mask=cc < C, other=0.0)
    g_pooled = tl.load(gpooled_ptr + b * C + cc, mask=cc < C, other=0.0)

    offs, mask = _tile_offsets(b, c0, C, H, W, sxb, sxc, sxh, sxw, BC, HP, WP)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    g_offs, _ = _tile_offsets(b, c0, C, H, W, sgb, sgc, sgh, sgw, BC, HP, WP)
    g = tl.load(gout_ptr + g_offs, mask=mask, other=0.0).to(tl.float32)
    g_u = _grad_scaled_map(g, spatial, cc, C, best_c, g_best, g_mean)
    g_z = tl.where(mask, g_u * cw[:, None, None], 0.0)

    # x gradient: rows^T @ g_z @ cols, plus the channel mean's share, spread by the same weights.
    rows_t = tl.broadcast_to(tl.trans(rows).to(x.dtype)[None, :, :], (BC, HP, HP))
    cols_b = tl.broadcast_to(cols.to(x.dtype)[None, :, :], (BC, WP, WP))
    g_x = tl.dot(rows_t, tl.dot(g_z.to(x.dtype), cols_b, input_precision=PREC).to(x.dtype), input_precision=PREC)
    row_w = tl.sum(rows, axis=0)
    col_w = tl.sum(cols, axis=0)
    g_x += g_pooled[:, None, None] * inv_hw * row_w[None, :, None] * col_w[None, None, :]
    gx_offs, _ = _tile_offsets(b, c0, C, H, W, sdb, sdc, sdh, sdw, BC, HP, WP)
    tl.store(gx_ptr + gx_offs, g_x.to(gx_ptr.dtype.element_ty), mask=mask)

    if ALIGN:
        # Box gradient: the sample positions move with the box; d z / d position = (d rows) @ x @ cols^T.
        bx1 = tl.load(box_ptr + b * 4 + 0)
        by1 = tl.load(box_ptr + b * 4 + 1)
        bx2 = tl.load(box_ptr + b * 4 + 2)
        by2 = tl.load(box_ptr + b * 4 + 3)
        r0, r1, _, r_moves = _align_taps(by1, by2, H, HP, CLAMP_GRADIENT_AT_BOUNDS)
        k0, k1, _, k_moves = _align_taps(bx1, bx2, W, WP, CLAMP_GRADIENT_AT_BOUNDS)
        d_rows = _tap_derivative_matrix(r0, r1, r_moves, H, HP)
        d_cols = _tap_derivative_matrix(k0, k1, k_moves, W, WP)
        g_full = tl.where(mask, g_z + g_pooled[:, None, None] * inv_hw, 0.0)
        _, x_cols = _resample(x, rows, cols, BC, HP, WP, PREC)
        d_rows_b = tl.broadcast_to(d_rows.to(x.dtype)[None, :, :], (BC, HP, HP))
        dz_drow = tl.dot(d_rows_b, x_cols.to(x.dtype), input_precision=PREC)
        g_row_pos = tl.sum(tl.sum(g_full * dz_drow, axis=2), axis=0)  # (HP,)
        dz_dcol, _ = _resample(x, rows, d_cols, BC, HP, WP, PREC)
        g_col_pos = tl.sum(tl.sum(g_full * dz_dcol, axis=1), axis=0)  # (WP,)
        o_h = tl.arange(0, HP).to(tl.float32) + 0.5
        o_w = tl.arange(0, WP).to(tl.float32) + 0.5
        base = gbox_ptr + (b * tl.num_programs(1) + block) * 4
        # position = lo * n - 0.5 + (o + 0.5) (hi - lo): d/d lo = n - (o + 0.5), d/d hi = o + 0.5
        tl.store(base + 0, tl.sum(g_col_pos * (W.to(tl.float32) - o_w)))
        tl.store(base + 1, tl.sum(g_row_pos * (H.to(tl.float32) - o_h)))
        tl.store(base + 2, tl.sum(g_col_pos * o_w))
        tl.store(base + 3, tl.sum(g_row_pos * o_h))


def _padded_side(n: int) -> int:
    return 16 if n <= 16 else 32


def block_channels(height: int, width: int) -> int:
    """Channels per program tile, so that a (channels, padded H, padded W) tile holds 4096 elements."""
    return 4096 // (_padded_side(height) * _padded_side(width))


def unsupported_reason(x, boxes, ca_reduce_weight, ca_expand_weight, sa_weight, roi_mode) -> str | None:
    """Why the fused kernel cannot serve these arguments, or None."""
    if max(x.shape[2:]) > MAX_MAP_SIDE:
        return f"the fused MXA branch serves maps up to {MAX_MAP_SIDE}x{MAX_MAP_SIDE}, got {x.shape[2]}x{x.shape[3]}"
    return kernel_dtype_reason(x, "the fused MXA branch")


def _launch_options(x: torch.Tensor, block_c: int | None) -> dict:
    """The launch's constexprs and warps: a shipped configuration (by ``block_c``, or chosen by map size)
    and the padded map."""
    height, width = x.shape[2:]
    launch = SHIPPED_CONFIGS[block_c or block_channels(height, width)]
    return dict(launch.options(), HP=_padded_side(height), WP=_padded_side(width), PREC=dot_precision(x.dtype))


def _flat_weights(ca_reduce_weight, ca_expand_weight, sa_weight):
    hidden, channels = ca_reduce_weight.shape[:2]
    return (ca_reduce_weight.reshape(hidden, channels).float().contiguous(),
            ca_expand_weight.reshape(channels, hidden).float().contiguous(),
            sa_weight.reshape(2, SA_SIDE.value, SA_SIDE.value).float().contiguous())


def mxa_branch_forward(x, boxes, ca_reduce_weight, ca_expand_weight, sa_weight, align: bool, block_c=None):
    """Launch the forward kernel; returns the output and what the backward needs."""
    batch, channels, height, width = x.shape
    w1, w2, sa_w = _flat_weights(ca_reduce_weight, ca_expand_weight, sa_weight)
    hidden_channels = w1.shape[0]
    f32 = dict(device=x.device, dtype=torch.float32)
    out = alloc.empty_like(x)
    pooled = alloc.empty((batch, channels), **f32)
    hidden = alloc.empty((batch, hidden_channels), **f32)
    cw = alloc.empty((batch, channels), **f32)
    stats = alloc.empty((batch, 2, height, width), **f32)
    argmax = alloc.empty((batch, height, width), device=x.device, dtype=torch.int32)
    spatial = alloc.empty((batch, height, width), **f32)
    with alloc.on_device(x):
        mxa_branch_fwd_kernel[(batch,)](
            x, boxes.float().contiguous(), w1, w2, sa_w, out, pooled, hidden, cw, stats, argmax, spatial,
            channels, height, width, hidden_channels, *x.stride(), *out.stride(),
            ALIGN=align, BCH=triton.next_power_of_2(hidden_channels), **_launch_options(x, block_c),
        )
    return out, pooled, hidden, cw, stats, argmax, spatial


def mxa_branch_backward(grad_out, x, boxes, ca_reduce_weight, ca_expand_weight, sa_weight,
                        pooled, hidden, cw, stats, argmax, spatial, align: bool, block_c=None):
    """Launch the two backward kernels; returns the gradients of x, boxes and the three weights."""
    batch, channels, height, width = x.shape
    w1, w2, sa_w = _flat_weights(ca_reduce_weight, ca_expand_weight, sa_weight)
    config = _launch_options(x, block_c)
    boxes32 = boxes.float().contiguous()
    f32 = dict(device=x.device, dtype=torch.float32)
    g_cw = alloc.empty((batch, channels), **f32)
    g_stats = alloc.empty((batch, 2, height, width), **f32)
    g_sa_w_per_sample = alloc.empty((batch, SA_WEIGHTS.value), **f32)
    with alloc.on_device(x):
        mxa_branch_bwd_channel_kernel[(batch,)](
            x, grad_out, boxes32, sa_w, cw, stats, argmax, spatial, g_cw, g_stats, g_sa_w_per_sample,
            channels, height, width, *x.stride(), *grad_out.stride(), ALIGN=align, **config,
        )
    # The channel-attention MLP on (B, C): cw = sigmoid(W2 relu(W1 pooled)).
    g_logits = g_cw * cw * (1 - cw)
    g_w2 = g_logits.T @ hidden.clamp(min=0)
    g_hidden = (g_logits @ w2) * (hidden > 0)
    g_w1 = g_hidden.T @ pooled
    g_pooled = (g_hidden @ w1).contiguous()

    blocks = triton.cdiv(channels, config["BC"])
    g_x = alloc.empty_like(x)
    g_box_per_block = alloc.empty((batch, blocks, 4), **f32) if align else g_cw  # unused in crop mode
    with alloc.on_device(x):
        mxa_branch_bwd_input_kernel[(batch, blocks)](
            x, grad_out, boxes32, cw, argmax, spatial, g_stats, g_pooled, g_x, g_box_per_block,
            channels, height, width, *x.stride(), *grad_out.stride(), *g_x.stride(), ALIGN=align, **config,
        )
    g_boxes = g_box_per_block.sum(dim=1) if align else torch.zeros_like(boxes32)
    return (g_x, g_boxes.to(boxes.dtype), g_w1.reshape(ca_reduce_weight.shape).to(ca_reduce_weight.dtype),
            g_w2.reshape(ca_expand_weight.shape).to(ca_expand_weight.dtype),
            g_sa_w_per_sample.sum(dim=0).reshape(sa_weight.shape).to(sa_weight.dtype))


def builds(all_configs: bool = False) -> list:
    """Every kernel x dtype x ROI mode, for GPU targets without a GPU: in the configuration of 16x16
    padded maps (every EfficientViT stage at 224 px), or ``all_configs``: the larger maps' too."""
    padded_maps = {16: (16, 16), 8: (16, 32), 4: (32, 32)}
    result = []
    for kernel in (mxa_branch_fwd_kernel, mxa_branch_bwd_channel_kernel, mxa_branch_bwd_input_kernel):
        for dtype in BUILD_DTYPES:
            for block_c in (16, 8, 4) if all_configs else (16,):
                height, width = padded_maps[block_c]
                for align in (True, False):
                    constexprs = dict(ALIGN=align, HP=height, WP=width)
                    if "BCH" in kernel.arg_names:
                        constexprs["BCH"] = 16
                    result.append(kernel_build(
                        kernel, f"BC {block_c} map {height}x{width} {'align' if align else 'crop'}", dtype,
                        SHIPPED_CONFIGS[block_c], constexprs, sizes=("C", "H", "W"),
                        feature_pointers={"x_ptr", "out_ptr", "gout_ptr", "gx_ptr"}, index_pointers={"argmax_ptr"}))
    return result


def launch_passes(x, boxes, ca_reduce_weight, ca_expand_weight, sa_weight, roi_mode="crop",
                  grad_like=torch.empty_like) -> dict:
    """The fused forward and backward as calls of the launchers, in order (the backward takes the
    forward's outputs and the gradient ``grad_like(out)``), for the cost report (bench/cost.py), which
    records their launches."""
    align, saved = roi_mode == "align", []

    def forward():
        saved[:] = mxa_branch_forward(x, boxes, ca_reduce_weight, ca_expand_weight, sa_weight, align)

    def backward():
        mxa_branch_backward(grad_like(saved[0]), x, boxes, ca_reduce_weight, ca_expand_weight, sa_weight,
                            *saved[1:], align)

    return {"forward": forward, "backward": backward}


# torch.library registration: torch.compile traces through these ops without graph breaks.

@torch.library.custom_op("mxa::mxa_branch_fwd", mutates_args=())
def mxa_branch_fwd(x: torch.Tensor, boxes: torch.Tensor, ca_reduce_weight: torch.Tensor,
                   ca_expand_weight: torch.Tensor, sa_weight: torch.Tensor, align: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                              torch.Tensor]:
    return mxa_branch_forward(x, boxes, ca_reduce_weight, ca_expand_weight, sa_weight, align)


@mxa_branch_fwd.register_fake
def _(x, boxes, ca_reduce_weight, ca_expand_weight, sa_weight, align):
    batch, channels, height, width = x.shape
    f32 = dict(dtype=torch.float32)
    return (torch.empty_like(x), x.new_empty((batch, channels), **f32),
            x.new_empty((batch, ca_reduce_weight.shape[0]), **f32), x.new_empty((batch, channels), **f32),
            x.new_empty((batch, 2, height, width), **f32), x.new_empty((batch, height, width), dtype=torch.int32),
            x.new_empty((batch, height, width), **f32))


@torch.library.custom_op("mxa::mxa_branch_bwd", mutates_args=())
def mxa_branch_bwd(grad_out: torch.Tensor, x: torch.Tensor, boxes: torch.Tensor, ca_reduce_weight: torch.Tensor,
                   ca_expand_weight: torch.Tensor, sa_weight: torch.Tensor, pooled: torch.Tensor,
                   hidden: torch.Tensor, cw: torch.Tensor, stats: torch.Tensor, argmax: torch.Tensor,
                   spatial: torch.Tensor, align: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return mxa_branch_backward(grad_out, x, boxes, ca_reduce_weight, ca_expand_weight, sa_weight,
                               pooled, hidden, cw, stats, argmax, spatial, align)


@mxa_branch_bwd.register_fake
def _(grad_out, x, boxes, ca_reduce_weight, ca_expand_weight, sa_weight, pooled, hidden, cw, stats, argmax, spatial,
      align):
    return (torch.empty_like(x), torch.empty_like(boxes), torch.empty_like(ca_reduce_weight),
            torch.empty_like(ca_expand_weight), torch.empty_like(sa_weight))


def _setup_context(ctx, inputs, output):
    x, boxes, ca_reduce_weight, ca_expand_weight, sa_weight, align = inputs
    _, pooled, hidden, cw, stats, argmax, spatial = output
    ctx.mark_non_differentiable(pooled, hidden, cw, stats, argmax, spatial)
    ctx.save_for_backward(x, boxes, ca_reduce_weight, ca_expand_weight, sa_weight, pooled, hidden, cw, stats,
                          argmax, spatial)
    ctx.align = align


def _backward(ctx, grad_out, *_aux_grads):
    g_x, g_boxes, g_w1, g_w2, g_sa_w = torch.ops.mxa.mxa_branch_bwd(grad_out, *ctx.saved_tensors, ctx.align)
    return g_x, (g_boxes if ctx.align else None), g_w1, g_w2, g_sa_w, None


mxa_branch_fwd.register_autograd(_backward, setup_context=_setup_context)


def mxa_branch_triton(x, boxes, ca_reduce_weight, ca_expand_weight, sa_weight, roi_mode="crop"):
    """The fused MXA branch; same arguments and result as :func:`mxa_branch_ref`."""
    return torch.ops.mxa.mxa_branch_fwd(x, boxes, ca_reduce_weight, ca_expand_weight, sa_weight,
                                        roi_mode == "align")[0]


register_triton_op("mxa_branch", mxa_branch_triton, unsupported_reason)
