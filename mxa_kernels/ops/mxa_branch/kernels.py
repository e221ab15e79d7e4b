"""Fused Triton kernels of the MXA branch after the ROI predictor: ROI resample (crop or align),
channel attention, spatial attention and the final scaling; forward and backward.

The channel axis is the grid's: every launch but two runs one program per (sample, block of
channels), so that at batch 256 a launch has thousands of programs at every EfficientViT stage. The
branch's two reductions over channels per sample (the channel means feeding the channel attention's
MLP, and the per-pixel channel max and mean feeding the spatial attention) are split in two phases:
each block writes its partials, and the next launch combines them in block order (deterministic, no
atomics). The MLP and the 7x7 convolution are tiny and recomputed or run per sample.

- forward, **four** launches:
  1. ``fwd_pool`` (samples x blocks): the resampled map's channel means, with no product (each input
     pixel's weight in the mean follows from the box), and the block's share of the MLP's hidden layer;
  2. ``fwd_stats`` (samples x blocks): the hidden layer from the shares, the block's channel weights,
     the resampled tile scaled by them, and its per-pixel max (with the first maximal channel) and sum;
  3. ``fwd_spatial`` (samples): the channel max and mean from the blocks' partials, the 7x7
     convolution one tap at a time over the stored maps, its sigmoid. A launch of one program per
     sample, as the work is a few thousand operations per sample;
  4. ``fwd_out`` (samples x blocks): the output, resampled again rather than stored.
- backward, **five** launches and no PyTorch operation between them: ``bwd_spatial_part`` (samples x
  blocks: each block's share of the spatial weights' gradient), ``bwd_spatial`` (samples: the 7x7
  convolution's backward, per-sample shares of its weight gradient), ``bwd_channel`` (samples x blocks:
  the channel-weight logits' gradient and each block's share of the hidden layer's), ``bwd_input``
  (samples x blocks: the feature gradient and, in align mode, each block's share of the box gradient),
  and ``bwd_weights`` (blocks of channels, plus one program: the sums over the batch, in sample order).

The resample of a sample's box: maps of at most KRON_MAX_PIXELS pixels (7x7 and 4x4 at 224 px) are
flattened and multiplied by the Kronecker product of the row and column interpolation matrices (one
``tl.dot`` of a 16-channel block by a 64x64 or 16x16 matrix, rather than 7x7 and 4x4 maps padded to
16x16); larger maps (up to 32 x 32) use ``rows @ x[c] @ cols^T`` on tiles padded to 16 or 32. A box
that resamples to the identity (the whole map: in crop mode what nearly every sample gets) skips the
products: the reference's resample of it is exactly its input.
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
# Maps of at most this many pixels (8x8, 7x7, 4x4: EfficientViT's stages 2 and 3 at 224 px) are
# resampled as one product of the flattened map (16 to 64 pixels) with the Kronecker matrix of the row
# and column interpolation, instead of two products on a map padded to 16x16.
KRON_MAX_PIXELS = 64
# The channel attention's hidden layer (C / 16 in MXA: 24 at M5's widest stage) is held in registers
# whole, up to this width; wider ones fall back to eager.
MAX_HIDDEN_CHANNELS = 64
# Channels per tile (BC) and warps per program, by channels per tile (16 for maps padded to 16x16; 8
# for 16x32 or 32x16; 4 for 32x32). Warps split the channel axis of the batched products, so a
# 4-channel tile gets 4 warps; 8 warps keep the 16x16 bf16/fp16 kernels free of register spills
# (ptxas, sm_90).
SHIPPED_CONFIGS = {block_c: LaunchConfig(f"BC {block_c}", num_warps, {"BC": block_c})
                   for block_c, num_warps in ((16, 8), (8, 8), (4, 4))}
# the per-sample spatial attention, forward and backward: vectors of a map's pixels
SPATIAL_CONFIG = LaunchConfig("per sample", 4)
# the backward's sums over the batch: 32 channels and 8 samples at a time
WEIGHTS_CONFIG = LaunchConfig("batch sums", 4, {"WBC": 32, "BB": 8})

# The spatial attention's convolution, as the kernels' constants: a 7x7 kernel (zero padding 3) over two
# maps, channel max and channel mean, so 49 weights per map and 98 in all; kernel rows padded to 8
# where a block needs a power of two.
SA_SIDE = tl.constexpr(SPATIAL_KERNEL)
SA_PAD = tl.constexpr(SPATIAL_KERNEL // 2)
SA_TAPS = tl.constexpr(SPATIAL_KERNEL * SPATIAL_KERNEL)
SA_WEIGHTS = tl.constexpr(2 * SPATIAL_KERNEL * SPATIAL_KERNEL)
SA_WEIGHTS_P2 = tl.constexpr(padded(2 * SPATIAL_KERNEL * SPATIAL_KERNEL, least=1))


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
def _crop_taps(start, length, n, out):
    """F.interpolate(bilinear, align_corners=False) of [start, start + length) to n samples, at the
    output indices ``out``."""
    o = out.to(tl.float32)
    ratio = length.to(tl.float32) / n.to(tl.float32)
    src = tl.maximum(ratio * (o + 0.5) - 0.5, 0.0)
    i0 = tl.minimum(src.to(tl.int32), length - 1)
    lam = tl.minimum(tl.maximum(src - i0.to(tl.float32), 0.0), 1.0)
    i1 = i0 + (i0 < length - 1).to(tl.int32)
    return start + i0, start + i1, lam


@triton.jit
def _align_taps(lo, hi, n, out, AT_BOUNDS: tl.constexpr):
    """RoIAlign (aligned, one sample per bin, border clamped) of the normalized interval [lo, hi], at the
    output indices ``out``. ``moves``: where the sample position follows the box; a position exactly
    on the clamp's bounds moves if AT_BOUNDS, as torch.clamp's gradient says (see
    CLAMP_GRADIENT_AT_BOUNDS)."""
    o = out.to(tl.float32)
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
def _box_taps(box_ptr, H, W, ALIGN: tl.constexpr, out_h, out_w):
    """The two taps and the weight of each output row ``out_h`` and column ``out_w`` of one sample's box."""
    bx1 = tl.load(box_ptr + 0)
    by1 = tl.load(box_ptr + 1)
    bx2 = tl.load(box_ptr + 2)
    by2 = tl.load(box_ptr + 3)
    if ALIGN:
        r0, r1, rlam, _ = _align_taps(by1, by2, H, out_h, True)
        c0, c1, clam, _ = _align_taps(bx1, bx2, W, out_w, True)
    else:
        x1, x2 = _snap_axis(bx1, bx2, W)
        y1, y2 = _snap_axis(by1, by2, H)
        empty = (x2 <= x1) | (y2 <= y1)  # the authors fall back to the whole map
        x1 = tl.where(empty, 0, x1)
        x2 = tl.where(empty, W, x2)
        y1 = tl.where(empty, 0, y1)
        y2 = tl.where(empty, H, y2)
        r0, r1, rlam = _crop_taps(y1, y2 - y1, H, out_h)
        c0, c1, clam = _crop_taps(x1, x2 - x1, W, out_w)
    return r0, r1, rlam, c0, c1, clam


@triton.jit
def _is_identity(i0, lam, out, valid):
    """Whether the taps of the valid outputs are each output's own pixel with weight 1 (a whole-map box)."""
    return tl.sum(tl.where(valid & ((i0 != out) | (lam != 0.0)), 1, 0)) == 0


@triton.jit
def _identity(t):
    """The product of a (BC, NPIX) tile with an identity matrix: the tile, except that a channel holding
    Inf or NaN is NaN everywhere, as in the products (Inf times the matrix's zeros)."""
    return t + tl.sum(t * 0.0, axis=1)[:, None]


@triton.jit
def _pixels(H, W, KRON: tl.constexpr, WP: tl.constexpr, NPIX: tl.constexpr):
    """Row, column and validity of the NPIX pixel slots of a tile: the map flattened row-major
    (KRON), or an HP x WP grid flattened."""
    f = tl.arange(0, NPIX)
    if KRON:
        return f // W, f % W, f < H * W
    return f // WP, f % WP, (f // WP < H) & (f % WP < W)


@triton.jit
def _pixel_weights(box_ptr, H, W, ALIGN: tl.constexpr, KRON: tl.constexpr, ph, pw, valid, HP: tl.constexpr,
                   WP: tl.constexpr, NPIX: tl.constexpr):
    """How much each input pixel contributes to the resampled map's sum: colsum(rows)[h] colsum(cols)[w],
    so that mean(rows @ x @ cols^T) = sum(x * weights) / (H W) with no product."""
    r0, r1, rlam, c0, c1, clam = _box_taps(box_ptr, H, W, ALIGN, tl.arange(0, HP), tl.arange(0, WP))
    if KRON:  # each flattened pixel against the (at most 8) output rows and columns
        rows_ok = (tl.arange(0, HP) < H)[:, None]
        cols_ok = (tl.arange(0, WP) < W)[:, None]
        row_w = tl.sum(tl.where(rows_ok & (ph[None, :] == r0[:, None]), 1.0 - rlam[:, None], 0.0)
                       + tl.where(rows_ok & (ph[None, :] == r1[:, None]), rlam[:, None], 0.0), axis=0)
        col_w = tl.sum(tl.where(cols_ok & (pw[None, :] == c0[:, None]), 1.0 - clam[:, None], 0.0)
                       + tl.where(cols_ok & (pw[None, :] == c1[:, None]), clam[:, None], 0.0), axis=0)
        weights = row_w * col_w
    else:  # the HP x WP grid: the outer product of the two column sums
        row_w = tl.sum(_interp_matrix(r0, r1, rlam, H, HP), axis=0)
        col_w = tl.sum(_interp_matrix(c0, c1, clam, W, WP), axis=0)
        weights = tl.reshape(row_w[:, None] * col_w[None, :], (NPIX,))
    return tl.where(valid, weights, 0.0)


@triton.jit
def _kron_matrix(r0, r1, rlam, c0, c1, clam, ph, pw, valid):
    """(NPIX out, NPIX in) interpolation matrix of the flattened map: rows (x) cols, from each output
    pixel's row and column taps."""
    in_h = ph[None, :]
    in_w = pw[None, :]
    row = tl.where(in_h == r0[:, None], 1.0 - rlam[:, None], 0.0) + tl.where(in_h == r1[:, None], rlam[:, None], 0.0)
    col = tl.where(in_w == c0[:, None], 1.0 - clam[:, None], 0.0) + tl.where(in_w == c1[:, None], clam[:, None], 0.0)
    return tl.where(valid[:, None] & valid[None, :], row * col, 0.0)


@triton.jit
def _resampled_tile(x_ptr, box_ptr, b, c0, C, H, W, sxb, sxc, sxh, sxw, ALIGN: tl.constexpr, KRON: tl.constexpr,
                    BC: tl.constexpr, HP: tl.constexpr, WP: tl.constexpr, NPIX: tl.constexpr, PREC: tl.constexpr):
    """The resampled channels [c0, c0 + BC) of sample b as a (BC, NPIX) float32 tile. Small maps (KRON):
    one product of the flattened map with the (NPIX, NPIX) Kronecker matrix, so that no side is padded
    to 16; larger maps: rows @ x @ cols^T on HP x WP tiles. A whole-map box (the identity) skips both."""
    if KRON:
        ph, pw, valid = _pixels(H, W, KRON, WP, NPIX)
        cc = c0 + tl.arange(0, BC)
        mask = (cc[:, None] < C) & valid[None, :]
        x = tl.load(x_ptr + b * sxb + cc[:, None] * sxc + ph[None, :] * sxh + pw[None, :] * sxw, mask=mask, other=0.0)
        r0, r1, rlam, k0, k1, klam = _box_taps(box_ptr, H, W, ALIGN, ph, pw)
        if _is_identity(r0, rlam, ph, valid) & _is_identity(k0, klam, pw, valid):
            z = _identity(x.to(tl.float32))
        else:
            kron = _kron_matrix(r0, r1, rlam, k0, k1, klam, ph, pw, valid)
            z = tl.dot(x, tl.trans(kron).to(x.dtype), input_precision=PREC)
    else:
        offs, mask = _tile_offsets(b, c0, C, H, W, sxb, sxc, sxh, sxw, BC, HP, WP)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        out_h = tl.arange(0, HP)
        out_w = tl.arange(0, WP)
        r0, r1, rlam, k0, k1, klam = _box_taps(box_ptr, H, W, ALIGN, out_h, out_w)
        if _is_identity(r0, rlam, out_h, out_h < H) & _is_identity(k0, klam, out_w, out_w < W):
            z3 = tl.reshape(_identity(tl.reshape(x.to(tl.float32), (BC, NPIX))), (BC, HP, WP))
        else:
            z3, _ = _resample(x, _interp_matrix(r0, r1, rlam, H, HP), _interp_matrix(k0, k1, klam, W, WP),
                              BC, HP, WP, PREC)
        z = tl.reshape(z3, (BC, NPIX))
    return z


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
def _channel_weights(w2_ptr, hid, cc, C, CH, BCH: tl.constexpr):
    """sigmoid(W2 @ relu-ed hidden) for the channels cc."""
    j = tl.arange(0, BCH)
    w2 = tl.load(w2_ptr + cc[:, None] * CH + j[None, :], mask=(cc[:, None] < C) & (j[None, :] < CH), other=0.0)
    return tl.sigmoid(tl.sum(w2 * hid[None, :], axis=1))


@triton.jit(do_not_specialize=["C", "H", "W", "CH"])  # sizes of 1 would become Python ints without .to
def mxa_branch_fwd_pool_kernel(
    x_ptr, box_ptr, w1_ptr, pooled_ptr, hidden_part_ptr,
    C, H, W, CH, sxb, sxc, sxh, sxw,
    ALIGN: tl.constexpr, KRON: tl.constexpr, BC: tl.constexpr, HP: tl.constexpr, WP: tl.constexpr,
    NPIX: tl.constexpr, BCH: tl.constexpr,
):
    """Per sample and channel block: the resampled map's channel means, and the block's share of the
    channel attention's hidden layer (W1 @ means over the block's channels)."""
    b = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    c0 = block * BC
    ph, pw, valid = _pixels(H, W, KRON, WP, NPIX)
    cc = c0 + tl.arange(0, BC)
    x = _tile(x_ptr, b, c0, C, sxb, sxc, sxh, sxw, ph, pw, valid, BC)
    weights = _pixel_weights(box_ptr + b * 4, H, W, ALIGN, KRON, ph, pw, valid, HP, WP, NPIX)
    pooled = tl.sum(x * weights[None, :], axis=1) / (H * W).to(tl.float32)
    tl.store(pooled_ptr + b * C + cc, pooled, mask=cc < C)
    j = tl.arange(0, BCH)
    w1 = tl.load(w1_ptr + j[:, None] * C + cc[None, :], mask=(j[:, None] < CH) & (cc[None, :] < C), other=0.0)
    part = tl.sum(w1 * pooled[None, :], axis=1)
    tl.store(hidden_part_ptr + (b * tl.num_programs(1) + block) * CH + j, part, mask=j < CH)


@triton.jit(do_not_specialize=["C", "H", "W", "CH"])  # sizes of 1 would become Python ints without .to
def mxa_branch_fwd_stats_kernel(
    x_ptr, box_ptr, w2_ptr, hidden_part_ptr, hidden_ptr, cw_ptr, part_max_ptr, part_arg_ptr, part_sum_ptr,
    C, H, W, CH, sxb, sxc, sxh, sxw,
    ALIGN: tl.constexpr, KRON: tl.constexpr, BC: tl.constexpr, HP: tl.constexpr, WP: tl.constexpr,
    NPIX: tl.constexpr, BCH: tl.constexpr, PREC: tl.constexpr,
):
    """Per sample and channel block: the channel weights (the hidden layer summed over the blocks'
    shares, in block order), and the block's per-pixel maximum (with its first channel) and sum of
    the scaled map z * cw, the partials of the spatial attention's channel max and mean."""
    b = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    blocks = tl.num_programs(1)
    c0 = block * BC
    j = tl.arange(0, BCH)
    hidden = tl.zeros((BCH,), tl.float32)
    for other in range(0, blocks):
        hidden += tl.load(hidden_part_ptr + (b * blocks + other) * CH + j, mask=j < CH, other=0.0)
    if block == 0:
        tl.store(hidden_ptr + b * CH + j, hidden, mask=j < CH)
    # ReLU; NaN stays NaN as in torch.relu (tl.maximum's default drops it), the padding stays 0
    hidden = tl.where(j < CH, tl.maximum(hidden, 0.0, propagate_nan=tl.PropagateNan.ALL), 0.0)
    cc = c0 + tl.arange(0, BC)
    cw = _channel_weights(w2_ptr, hidden, cc, C, CH, BCH)
    tl.store(cw_ptr + b * C + cc, cw, mask=cc < C)
    z = _resampled_tile(x_ptr, box_ptr + b * 4, b, c0, C, H, W, sxb, sxc, sxh, sxw, ALIGN, KRON, BC, HP, WP, NPIX,
                        PREC)
    u = z * cw[:, None]
    in_c = (cc < C)[:, None]
    best, best_c = tl.max(tl.where(in_c, u, float("-inf")), axis=0, return_indices=True)
    ph, pw, valid = _pixels(H, W, KRON, WP, NPIX)
    part = (b * blocks + block) * H * W + ph * W + pw
    tl.store(part_max_ptr + part, best, mask=valid)
    tl.store(part_arg_ptr + part, best_c.to(tl.int32) + c0, mask=valid)
    tl.store(part_sum_ptr + part, tl.sum(tl.where(in_c, u, 0.0), axis=0), mask=valid)


@triton.jit(do_not_specialize=["C", "H", "W", "BLOCKS"])  # sizes of 1 would become Python ints without .to
def mxa_branch_fwd_spatial_kernel(
    part_max_ptr, part_arg_ptr, part_sum_ptr, sa_w_ptr, stats_ptr, argmax_ptr, spatial_ptr,
    C, H, W, BLOCKS, HWP: tl.constexpr,
):
    """Per sample: the channel max (first maximal channel) and mean from the blocks' partials, in block
    order, then the spatial attention's 7x7 convolution of them, one tap at a time over the stored maps
    (zero outside the map), and its sigmoid."""
    b = tl.program_id(0).to(tl.int64)
    f = tl.arange(0, HWP)
    valid = f < H * W
    best = tl.full((HWP,), float("-inf"), tl.float32)
    best_c = tl.zeros((HWP,), tl.int32)
    total = tl.zeros((HWP,), tl.float32)
    for block in range(0, BLOCKS):
        part = (b * BLOCKS + block) * H * W + f
        block_best = tl.load(part_max_ptr + part, mask=valid, other=float("-inf"))
        better = block_best > best
        best_c = tl.where(better, tl.load(part_arg_ptr + part, mask=valid, other=0), best_c)
        best = tl.where(better, block_best, best)
        total += tl.load(part_sum_ptr + part, mask=valid, other=0.0)
    stats = stats_ptr + b * 2 * H * W
    tl.store(stats + f, best, mask=valid)
    tl.store(stats + H * W + f, total / C, mask=valid)
    tl.store(argmax_ptr + b * H * W + f, best_c, mask=valid)
    tl.debug_barrier()  # the maps just stored are read back shifted, by other threads of the program
    ph = f // W
    pw = f % W
    s = tl.zeros((HWP,), tl.float32)
    for i in range(0, SA_SIDE):
        for j in range(0, SA_SIDE):
            h = ph + i - SA_PAD
            w = pw + j - SA_PAD
            inside = valid & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            tap = sa_w_ptr + i * SA_SIDE + j
            # taps outside the map add nothing, not weight x 0 (a NaN weight reaches what eager's reaches)
            s += tl.where(inside, tl.load(tap) * tl.load(stats + h * W + w, mask=inside, other=0.0), 0.0)
            s += tl.where(inside, tl.load(tap + SA_TAPS) * tl.load(stats + H * W + h * W + w, mask=inside, other=0.0),
                          0.0)
    tl.store(spatial_ptr + b * H * W + f, tl.sigmoid(s), mask=valid)


@triton.jit(do_not_specialize=["C", "H", "W"])  # sizes of 1 would become Python ints without .to
def mxa_branch_fwd_out_kernel(
    x_ptr, box_ptr, cw_ptr, spatial_ptr, out_ptr,
    C, H, W, sxb, sxc, sxh, sxw, sob, soc, soh, sow,
    ALIGN: tl.constexpr, KRON: tl.constexpr, BC: tl.constexpr, HP: tl.constexpr, WP: tl.constexpr,
    NPIX: tl.constexpr, PREC: tl.constexpr,
):
    """Per sample and channel block: the output z * cw * spatial."""
    b = tl.program_id(0).to(tl.int64)
    c0 = tl.program_id(1) * BC
    z = _resampled_tile(x_ptr, box_ptr + b * 4, b, c0, C, H, W, sxb, sxc, sxh, sxw, ALIGN, KRON, BC, HP, WP, NPIX,
                        PREC)
    ph, pw, valid = _pixels(H, W, KRON, WP, NPIX)
    cc = c0 + tl.arange(0, BC)
    cw = tl.load(cw_ptr + b * C + cc, mask=cc < C, other=0.0)
    spatial = tl.load(spatial_ptr + b * H * W + ph * W + pw, mask=valid, other=0.0)
    out = z * cw[:, None] * spatial[None, :]
    tl.store(out_ptr + b * sob + cc[:, None] * soc + ph[None, :] * soh + pw[None, :] * sow,
             out.to(out_ptr.dtype.element_ty), mask=(cc[:, None] < C) & valid[None, :])


@triton.jit
def _tile(ptr, b, c0, C, sb, sc, sh, sw, ph, pw, valid, BC: tl.constexpr):
    """Channels [c0, c0 + BC) of sample b of a (B, C, H, W) tensor as a (BC, NPIX) float32 tile."""
    cc = c0 + tl.arange(0, BC)
    return tl.load(ptr + b * sb + cc[:, None] * sc + ph[None, :] * sh + pw[None, :] * sw,
                   mask=(cc[:, None] < C) & valid[None, :], other=0.0).to(tl.float32)


@triton.jit
def _grad_scaled_map(g_ptr, b, c0, C, H, W, sgb, sgc, sgh, sgw, spatial_ptr, argmax_ptr, gstats_ptr, ph, pw, valid,
                     BC: tl.constexpr):
    """d loss / d(z * cw) for a (BC, NPIX) tile, from the output gradient: the spatial weights' share,
    and the shares of the channel max (to the first maximal channel) and mean that fed the spatial
    attention."""
    pix = ph * W + pw
    g = _tile(g_ptr, b, c0, C, sgb, sgc, sgh, sgw, ph, pw, valid, BC)
    spatial = tl.load(spatial_ptr + b * H * W + pix, mask=valid, other=0.0)
    best_c = tl.load(argmax_ptr + b * H * W + pix, mask=valid, other=-1)
    g_best = tl.load(gstats_ptr + b * 2 * H * W + pix, mask=valid, other=0.0)
    g_mean = tl.load(gstats_ptr + b * 2 * H * W + H * W + pix, mask=valid, other=0.0)
    cc = c0 + tl.arange(0, BC)
    g_u = g * spatial[None, :] + tl.where(cc[:, None] == best_c[None, :], g_best[None, :], 0.0)
    return g_u + g_mean[None, :] / C


@triton.jit(do_not_specialize=["C", "H", "W"])  # sizes of 1 would become Python ints without .to
def mxa_branch_bwd_spatial_part_kernel(
    x_ptr, gout_ptr, box_ptr, cw_ptr, part_ptr,
    C, H, W, sxb, sxc, sxh, sxw, sgb, sgc, sgh, sgw,
    ALIGN: tl.constexpr, KRON: tl.constexpr, BC: tl.constexpr, HP: tl.constexpr, WP: tl.constexpr,
    NPIX: tl.constexpr, PREC: tl.constexpr,
):
    """Per sample and channel block: the block's share of d loss / d spatial weights, sum_c g z cw."""
    b = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    c0 = block * BC
    z = _resampled_tile(x_ptr, box_ptr + b * 4, b, c0, C, H, W, sxb, sxc, sxh, sxw, ALIGN, KRON, BC, HP, WP, NPIX,
                        PREC)
    ph, pw, valid = _pixels(H, W, KRON, WP, NPIX)
    g = _tile(gout_ptr, b, c0, C, sgb, sgc, sgh, sgw, ph, pw, valid, BC)
    cc = c0 + tl.arange(0, BC)
    cw = tl.load(cw_ptr + b * C + cc, mask=cc < C, other=0.0)
    tl.store(part_ptr + (b * tl.num_programs(1) + block) * H * W + ph * W + pw, tl.sum(g * z * cw[:, None], axis=0),
             mask=valid)


@triton.jit(do_not_specialize=["H", "W", "BLOCKS"])  # sizes of 1 would become Python ints without .to
def mxa_branch_bwd_spatial_kernel(
    part_ptr, spatial_ptr, stats_ptr, sa_w_ptr, gpre_ptr, gstats_ptr, g_sa_w_part_ptr,
    H, W, BLOCKS, HWP: tl.constexpr,
):
    """Per sample: back through the spatial attention. Its pre-sigmoid gradient from the blocks' shares
    (in block order), stored and read back shifted for the gradients of the channel max and mean (the
    7x7 convolution transposed, one tap at a time) and of each of the 98 weights (this sample's share)."""
    b = tl.program_id(0).to(tl.int64)
    f = tl.arange(0, HWP)
    valid = f < H * W
    g_spatial = tl.zeros((HWP,), tl.float32)
    for block in range(0, BLOCKS):
        g_spatial += tl.load(part_ptr + (b * BLOCKS + block) * H * W + f, mask=valid, other=0.0)
    spatial = tl.load(spatial_ptr + b * H * W + f, mask=valid, other=0.0)
    g_pre = tl.where(valid, g_spatial * spatial * (1.0 - spatial), 0.0)
    g_pre_map = gpre_ptr + b * H * W
    tl.store(g_pre_map + f, g_pre, mask=valid)
    tl.debug_barrier()  # read back shifted, by other threads of the program
    stats = stats_ptr + b * 2 * H * W
    ph = f // W
    pw = f % W
    g_best = tl.zeros((HWP,), tl.float32)
    g_mean = tl.zeros((HWP,), tl.float32)
    for i in range(0, SA_SIDE):
        for j in range(0, SA_SIDE):
            tap = i * SA_SIDE + j
            # s[h, w] takes stats[h + i - 3, w + j - 3]: so stats[p, q] gave to s[p - i + 3, q - j + 3]
            h = ph - i + SA_PAD
            w = pw - j + SA_PAD
            inside = valid & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            g_s = tl.load(g_pre_map + h * W + w, mask=inside, other=0.0)
            g_best += tl.where(inside, tl.load(sa_w_ptr + tap) * g_s, 0.0)
            g_mean += tl.where(inside, tl.load(sa_w_ptr + SA_TAPS + tap) * g_s, 0.0)
            h = ph + i - SA_PAD
            w = pw + j - SA_PAD
            inside = valid & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            best = tl.load(stats + h * W + w, mask=inside, other=0.0)
            mean = tl.load(stats + H * W + h * W + w, mask=inside, other=0.0)
            tl.store(g_sa_w_part_ptr + b * 2 * SA_TAPS + tap, tl.sum(tl.where(inside, g_pre * best, 0.0)))
            tl.store(g_sa_w_part_ptr + b * 2 * SA_TAPS + SA_TAPS + tap, tl.sum(tl.where(inside, g_pre * mean, 0.0)))
    tl.store(gstats_ptr + b * 2 * H * W + f, g_best, mask=valid)
    tl.store(gstats_ptr + b * 2 * H * W + H * W + f, g_mean, mask=valid)


@triton.jit(do_not_specialize=["C", "H", "W", "CH"])  # sizes of 1 would become Python ints without .to
def mxa_branch_bwd_channel_kernel(
    x_ptr, gout_ptr, box_ptr, w2_ptr, cw_ptr, spatial_ptr, argmax_ptr, gstats_ptr, g_logit_ptr, g_hidden_part_ptr,
    C, H, W, CH, sxb, sxc, sxh, sxw, sgb, sgc, sgh, sgw,
    ALIGN: tl.constexpr, KRON: tl.constexpr, BC: tl.constexpr, HP: tl.constexpr, WP: tl.constexpr,
    NPIX: tl.constexpr, BCH: tl.constexpr, PREC: tl.constexpr,
):
    """Per sample and channel block: d loss / d channel-weight logits, sum_hw d loss / d(z cw) z times
    the sigmoid's slope, and the block's share of the hidden layer's gradient, W2^T over the block."""
    b = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    c0 = block * BC
    z = _resampled_tile(x_ptr, box_ptr + b * 4, b, c0, C, H, W, sxb, sxc, sxh, sxw, ALIGN, KRON, BC, HP, WP, NPIX,
                        PREC)
    ph, pw, valid = _pixels(H, W, KRON, WP, NPIX)
    g_u = _grad_scaled_map(gout_ptr, b, c0, C, H, W, sgb, sgc, sgh, sgw, spatial_ptr, argmax_ptr, gstats_ptr,
                           ph, pw, valid, BC)
    cc = c0 + tl.arange(0, BC)
    cw = tl.load(cw_ptr + b * C + cc, mask=cc < C, other=0.0)
    g_logit = tl.sum(g_u * z, axis=1) * cw * (1.0 - cw)
    tl.store(g_logit_ptr + b * C + cc, g_logit, mask=cc < C)
    j = tl.arange(0, BCH)
    w2 = tl.load(w2_ptr + cc[:, None] * CH + j[None, :], mask=(cc[:, None] < C) & (j[None, :] < CH), other=0.0)
    tl.store(g_hidden_part_ptr + (b * tl.num_programs(1) + block) * CH + j, tl.sum(w2 * g_logit[:, None], axis=0),
             mask=j < CH)


@triton.jit
def _kron_derivatives(r0, r1, rlam, r_moves, c0, c1, clam, c_moves, ph, pw, valid):
    """d(Kronecker interpolation matrix) / d(each output pixel's row position), and / d(its column
    position): +1 at the second tap, -1 at the first, where the position moves with the box."""
    in_h = ph[None, :]
    in_w = pw[None, :]
    row = tl.where(in_h == r0[:, None], 1.0 - rlam[:, None], 0.0) + tl.where(in_h == r1[:, None], rlam[:, None], 0.0)
    col = tl.where(in_w == c0[:, None], 1.0 - clam[:, None], 0.0) + tl.where(in_w == c1[:, None], clam[:, None], 0.0)
    d_row = tl.where(in_h == r1[:, None], 1.0, 0.0) - tl.where(in_h == r0[:, None], 1.0, 0.0)
    d_col = tl.where(in_w == c1[:, None], 1.0, 0.0) - tl.where(in_w == c0[:, None], 1.0, 0.0)
    ok = valid[:, None] & valid[None, :]
    return tl.where(ok & r_moves[:, None], d_row * col, 0.0), tl.where(ok & c_moves[:, None], row * d_col, 0.0)


@triton.jit(do_not_specialize=["C", "H", "W", "CH"])  # sizes of 1 would become Python ints without .to
def mxa_branch_bwd_input_kernel(
    x_ptr, gout_ptr, box_ptr, w1_ptr, hidden_ptr, cw_ptr, spatial_ptr, argmax_ptr, gstats_ptr, g_hidden_part_ptr,
    g_hidden_ptr, gx_ptr, g_box_part_ptr,
    C, H, W, CH, sxb, sxc, sxh, sxw, sgb, sgc, sgh, sgw, sdb, sdc, sdh, sdw,
    ALIGN: tl.constexpr, KRON: tl.constexpr, BC: tl.constexpr, HP: tl.constexpr, WP: tl.constexpr,
    NPIX: tl.constexpr, BCH: tl.constexpr, PREC: tl.constexpr,
):
    """Per sample and channel block: the hidden layer's gradient (the blocks' shares in block order,
    through the ReLU), the channel means' gradient W1^T of it, then the feature gradient: the resample
    transposed of d loss / d z, plus the channel means' share spread by the pixels' weights; in align
    mode, the block's share of the box gradient."""
    b = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    blocks = tl.num_programs(1)
    c0 = block * BC
    j = tl.arange(0, BCH)
    g_hidden = tl.zeros((BCH,), tl.float32)
    for other in range(0, blocks):
        g_hidden += tl.load(g_hidden_part_ptr + (b * blocks + other) * CH + j, mask=j < CH, other=0.0)
    hidden = tl.load(hidden_ptr + b * CH + j, mask=j < CH, other=0.0)
    g_hidden = tl.where(hidden <= 0.0, 0.0, g_hidden)  # as torch's threshold_backward: a NaN hidden passes
    if block == 0:
        tl.store(g_hidden_ptr + b * CH + j, g_hidden, mask=j < CH)
    cc = c0 + tl.arange(0, BC)
    w1 = tl.load(w1_ptr + j[:, None] * C + cc[None, :], mask=(j[:, None] < CH) & (cc[None, :] < C), other=0.0)
    g_pooled = tl.sum(w1 * g_hidden[:, None], axis=0) / (H * W).to(tl.float32)  # per pixel weight of the mean

    ph, pw, valid = _pixels(H, W, KRON, WP, NPIX)
    g_u = _grad_scaled_map(gout_ptr, b, c0, C, H, W, sgb, sgc, sgh, sgw, spatial_ptr, argmax_ptr, gstats_ptr,
                           ph, pw, valid, BC)
    cw = tl.load(cw_ptr + b * C + cc, mask=cc < C, other=0.0)
    in_tile = (cc[:, None] < C) & valid[None, :]
    g_z = tl.where(in_tile, g_u * cw[:, None], 0.0)
    box = box_ptr + b * 4
    if KRON:
        r0, r1, rlam, k0, k1, klam = _box_taps(box, H, W, ALIGN, ph, pw)
        if _is_identity(r0, rlam, ph, valid) & _is_identity(k0, klam, pw, valid):
            g_x = g_z
        else:
            kron = _kron_matrix(r0, r1, rlam, k0, k1, klam, ph, pw, valid)
            g_x = tl.dot(g_z.to(x_ptr.dtype.element_ty), kron.to(x_ptr.dtype.element_ty), input_precision=PREC)
    else:
        out_h = tl.arange(0, HP)
        out_w = tl.arange(0, WP)
        r0, r1, rlam, k0, k1, klam = _box_taps(box, H, W, ALIGN, out_h, out_w)
        if _is_identity(r0, rlam, out_h, out_h < H) & _is_identity(k0, klam, out_w, out_w < W):
            g_x = g_z
        else:
            dt = x_ptr.dtype.element_ty
            rows_t = tl.broadcast_to(tl.trans(_interp_matrix(r0, r1, rlam, H, HP)).to(dt)[None, :, :], (BC, HP, HP))
            cols_b = tl.broadcast_to(_interp_matrix(k0, k1, klam, W, WP).to(dt)[None, :, :], (BC, WP, WP))
            g_z3 = tl.reshape(g_z, (BC, HP, WP)).to(dt)
            g_x3 = tl.dot(rows_t, tl.dot(g_z3, cols_b, input_precision=PREC).to(dt), input_precision=PREC)
            g_x = tl.reshape(g_x3, (BC, NPIX))
    weights = _pixel_weights(box, H, W, ALIGN, KRON, ph, pw, valid, HP, WP, NPIX)
    g_x += g_pooled[:, None] * weights[None, :]
    tl.store(gx_ptr + b * sdb + cc[:, None] * sdc + ph[None, :] * sdh + pw[None, :] * sdw,
             g_x.to(gx_ptr.dtype.element_ty), mask=in_tile)

    if ALIGN:
        # Box gradient: the sample positions move with the box; d z / d position is the resample with
        # the derivative of the interpolation matrix, over the gradient of z and of the channel means.
        g_full = tl.where(in_tile, g_z + g_pooled[:, None], 0.0)
        bx1 = tl.load(box + 0)
        by1 = tl.load(box + 1)
        bx2 = tl.load(box + 2)
        by2 = tl.load(box + 3)
        if KRON:
            x = tl.load(x_ptr + b * sxb + cc[:, None] * sxc + ph[None, :] * sxh + pw[None, :] * sxw, mask=in_tile,
                        other=0.0)
            r0, r1, rlam, r_moves = _align_taps(by1, by2, H, ph, CLAMP_GRADIENT_AT_BOUNDS)
            k0, k1, klam, k_moves = _align_taps(bx1, bx2, W, pw, CLAMP_GRADIENT_AT_BOUNDS)
            d_row, d_col = _kron_derivatives(r0, r1, rlam, r_moves, k0, k1, klam, k_moves, ph, pw, valid)
            g_row_pos = tl.sum(g_full * tl.dot(x, tl.trans(d_row).to(x.dtype), input_precision=PREC), axis=0)
            g_col_pos = tl.sum(g_full * tl.dot(x, tl.trans(d_col).to(x.dtype), input_precision=PREC), axis=0)
            o_h = ph.to(tl.float32) + 0.5  # each output pixel's row and column bin centres
            o_w = pw.to(tl.float32) + 0.5
        else:
            offs, mask = _tile_offsets(b, c0, C, H, W, sxb, sxc, sxh, sxw, BC, HP, WP)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0)
            r0, r1, rlam, r_moves = _align_taps(by1, by2, H, tl.arange(0, HP), CLAMP_GRADIENT_AT_BOUNDS)
            k0, k1, klam, k_moves = _align_taps(bx1, bx2, W, tl.arange(0, WP), CLAMP_GRADIENT_AT_BOUNDS)
            rows = _interp_matrix(r0, r1, rlam, H, HP)
            cols = _interp_matrix(k0, k1, klam, W, WP)
            d_rows = _tap_derivative_matrix(r0, r1, r_moves, H, HP)
            d_cols = _tap_derivative_matrix(k0, k1, k_moves, W, WP)
            g_full3 = tl.reshape(g_full, (BC, HP, WP))
            _, x_cols = _resample(x, rows, cols, BC, HP, WP, PREC)
            d_rows_b = tl.broadcast_to(d_rows.to(x.dtype)[None, :, :], (BC, HP, HP))
            dz_drow = tl.dot(d_rows_b, x_cols.to(x.dtype), input_precision=PREC)
            g_row_pos = tl.sum(tl.sum(g_full3 * dz_drow, axis=2), axis=0)  # (HP,)
            dz_dcol, _ = _resample(x, rows, d_cols, BC, HP, WP, PREC)
            g_col_pos = tl.sum(tl.sum(g_full3 * dz_dcol, axis=1), axis=0)  # (WP,)
            o_h = tl.arange(0, HP).to(tl.float32) + 0.5
            o_w = tl.arange(0, WP).to(tl.float32) + 0.5
        base = g_box_part_ptr + (b * blocks + block) * 4
        # position = lo * n - 0.5 + (o + 0.5) (hi - lo): d/d lo = n - (o + 0.5), d/d hi = o + 0.5
        tl.store(base + 0, tl.sum(g_col_pos * (W.to(tl.float32) - o_w)))
        tl.store(base + 1, tl.sum(g_row_pos * (H.to(tl.float32) - o_h)))
        tl.store(base + 2, tl.sum(g_col_pos * o_w))
        tl.store(base + 3, tl.sum(g_row_pos * o_h))


@triton.jit(do_not_specialize=["B", "C", "CH", "BLOCKS"])  # sizes of 1 would become Python ints without .to
def mxa_branch_bwd_weights_kernel(
    g_hidden_ptr, pooled_ptr, g_logit_ptr, hidden_ptr, g_sa_w_part_ptr, g_box_part_ptr,
    g_w1_ptr, g_w2_ptr, g_sa_w_ptr, g_box_ptr,
    B, C, CH, BLOCKS,
    ALIGN: tl.constexpr, WBC: tl.constexpr, BB: tl.constexpr, BCH: tl.constexpr,
):
    """The sums over the batch, in sample order, (BB samples at a time): per block of WBC channels the
    channel attention's weight gradients, g_hidden^T pooled and g_logit^T relu(hidden); the last
    program the 7x7 weight's gradient and each sample's box gradient (its blocks' shares, in order)."""
    pid = tl.program_id(0)
    rows = tl.arange(0, BB)
    j = tl.arange(0, BCH)
    if pid < tl.num_programs(0) - 1:
        cc = pid * WBC + tl.arange(0, WBC)
        g_w1 = tl.zeros((BCH, WBC), tl.float32)
        g_w2 = tl.zeros((WBC, BCH), tl.float32)
        for b0 in range(0, B, BB):
            bb = (b0 + rows)[:, None]
            in_b = bb < B
            g_hidden = tl.load(g_hidden_ptr + bb * CH + j[None, :], mask=in_b & (j[None, :] < CH), other=0.0)
            hidden = tl.load(hidden_ptr + bb * CH + j[None, :], mask=in_b & (j[None, :] < CH), other=0.0)
            pooled = tl.load(pooled_ptr + bb * C + cc[None, :], mask=in_b & (cc[None, :] < C), other=0.0)
            g_logit = tl.load(g_logit_ptr + bb * C + cc[None, :], mask=in_b & (cc[None, :] < C), other=0.0)
            g_w1 += tl.sum(g_hidden[:, :, None] * pooled[:, None, :], axis=0)
            relu = tl.maximum(hidden, 0.0, propagate_nan=tl.PropagateNan.ALL)
            g_w2 += tl.sum(g_logit[:, :, None] * relu[:, None, :], axis=0)
        tl.store(g_w1_ptr + j[:, None] * C + cc[None, :], g_w1, mask=(j[:, None] < CH) & (cc[None, :] < C))
        tl.store(g_w2_ptr + cc[:, None] * CH + j[None, :], g_w2, mask=(cc[:, None] < C) & (j[None, :] < CH))
    else:
        taps = tl.arange(0, SA_WEIGHTS_P2)
        g_sa_w = tl.zeros((SA_WEIGHTS_P2,), tl.float32)
        for b0 in range(0, B, BB):
            bb = (b0 + rows)[:, None]
            g_sa_w += tl.sum(tl.load(g_sa_w_part_ptr + bb * SA_WEIGHTS + taps[None, :],
                                     mask=(bb < B) & (taps[None, :] < SA_WEIGHTS), other=0.0), axis=0)
        tl.store(g_sa_w_ptr + taps, g_sa_w, mask=taps < SA_WEIGHTS)
        coords = tl.arange(0, 4)[None, :]
        for b0 in range(0, B, BB):
            bb = (b0 + rows)[:, None]
            g_box = tl.zeros((BB, 4), tl.float32)
            if ALIGN:
                for block in range(0, BLOCKS):
                    g_box += tl.load(g_box_part_ptr + (bb * BLOCKS + block) * 4 + coords, mask=bb < B, other=0.0)
            tl.store(g_box_ptr + bb * 4 + coords, g_box, mask=bb < B)


def _padded_side(n: int) -> int:
    return 16 if n <= 16 else 32


def block_channels(height: int, width: int) -> int:
    """Channels per program tile, so that a (channels, padded H, padded W) tile holds 4096 elements."""
    return 4096 // (_padded_side(height) * _padded_side(width))


def unsupported_reason(x, boxes, ca_reduce_weight, ca_expand_weight, sa_weight, roi_mode) -> str | None:
    """Why the fused kernel cannot serve these arguments, or None."""
    if max(x.shape[2:]) > MAX_MAP_SIDE:
        return f"the fused MXA branch serves maps up to {MAX_MAP_SIDE}x{MAX_MAP_SIDE}, got {x.shape[2]}x{x.shape[3]}"
    if ca_reduce_weight.shape[0] > MAX_HIDDEN_CHANNELS:
        return (f"the fused MXA branch serves channel attention up to {MAX_HIDDEN_CHANNELS} hidden channels, got "
                f"{ca_reduce_weight.shape[0]}")
    return kernel_dtype_reason(x, "the fused MXA branch")


def _launch_options(x: torch.Tensor, block_c: int | None) -> dict:
    """The constexprs and warps of the kernels over samples x channel blocks. Maps of at most
    KRON_MAX_PIXELS pixels are flattened and resampled by one product with their Kronecker matrix, 16
    channels per program (tl.dot's least side); larger maps are padded to HP x WP tiles, in a shipped
    configuration (by ``block_c``, or chosen by map size)."""
    height, width = x.shape[2:]
    if height * width <= KRON_MAX_PIXELS:
        return dict(SHIPPED_CONFIGS[16].options(), KRON=True, HP=triton.next_power_of_2(height),
                    WP=triton.next_power_of_2(width), NPIX=padded(height * width), PREC=dot_precision(x.dtype))
    launch = SHIPPED_CONFIGS[block_c or block_channels(height, width)]
    height_p, width_p = _padded_side(height), _padded_side(width)
    return dict(launch.options(), KRON=False, HP=height_p, WP=width_p, NPIX=height_p * width_p,
                PREC=dot_precision(x.dtype))


def _flat_weights(ca_reduce_weight, ca_expand_weight, sa_weight):
    hidden, channels = ca_reduce_weight.shape[:2]
    return (ca_reduce_weight.reshape(hidden, channels).float().contiguous(),
            ca_expand_weight.reshape(channels, hidden).float().contiguous(),
            sa_weight.reshape(2, SA_SIDE.value, SA_SIDE.value).float().contiguous())


def mxa_branch_forward(x, boxes, ca_reduce_weight, ca_expand_weight, sa_weight, align: bool, block_c=None):
    """Launch the four forward kernels, each (but the per-sample spatial attention) over samples x
    channel blocks; returns the output and what the backward needs."""
    batch, channels, height, width = x.shape
    w1, w2, sa_w = _flat_weights(ca_reduce_weight, ca_expand_weight, sa_weight)
    hidden_channels = w1.shape[0]
    options = _launch_options(x, block_c)
    blocks = triton.cdiv(channels, options["BC"])
    f32 = dict(device=x.device, dtype=torch.float32)
    i32 = dict(device=x.device, dtype=torch.int32)
    out = alloc.empty_like(x)
    pooled, cw = (alloc.empty((batch, channels), **f32) for _ in range(2))
    hidden = alloc.empty((batch, hidden_channels), **f32)
    stats = alloc.empty((batch, 2, height, width), **f32)
    argmax = alloc.empty((batch, height, width), **i32)
    spatial = alloc.empty((batch, height, width), **f32)
    hidden_part = alloc.empty((batch, blocks, hidden_channels), **f32)
    part_max, part_sum = (alloc.empty((batch, blocks, height, width), **f32) for _ in range(2))
    part_arg = alloc.empty((batch, blocks, height, width), **i32)
    boxes32 = boxes.float().contiguous()
    hidden_block = triton.next_power_of_2(hidden_channels)
    no_dot = {k: v for k, v in options.items() if k != "PREC"}
    with alloc.on_device(x):
        mxa_branch_fwd_pool_kernel[(batch, blocks)](
            x, boxes32, w1, pooled, hidden_part, channels, height, width, hidden_channels, *x.stride(),
            ALIGN=align, BCH=hidden_block, **no_dot)
        mxa_branch_fwd_stats_kernel[(batch, blocks)](
            x, boxes32, w2, hidden_part, hidden, cw, part_max, part_arg, part_sum, channels, height, width,
            hidden_channels, *x.stride(), ALIGN=align, BCH=hidden_block, **options)
        mxa_branch_fwd_spatial_kernel[(batch,)](
            part_max, part_arg, part_sum, sa_w, stats, argmax, spatial, channels, height, width, blocks,
            HWP=triton.next_power_of_2(height * width), **SPATIAL_CONFIG.options())
        mxa_branch_fwd_out_kernel[(batch, blocks)](
            x, boxes32, cw, spatial, out, channels, height, width, *x.stride(), *out.stride(), ALIGN=align,
            **options)
    return out, pooled, hidden, cw, stats, argmax, spatial


def mxa_branch_backward(grad_out, x, boxes, ca_reduce_weight, ca_expand_weight, sa_weight,
                        pooled, hidden, cw, stats, argmax, spatial, align: bool, block_c=None):
    """Launch the five backward kernels (no PyTorch op between them); returns the gradients of x, boxes
    and the three weights. Every sum runs in a fixed order: the gradients are deterministic."""
    batch, channels, height, width = x.shape
    w1, w2, sa_w = _flat_weights(ca_reduce_weight, ca_expand_weight, sa_weight)
    hidden_channels = w1.shape[0]
    options = _launch_options(x, block_c)
    blocks = triton.cdiv(channels, options["BC"])
    boxes32 = boxes.float().contiguous()
    f32 = dict(device=x.device, dtype=torch.float32)
    part = alloc.empty((batch, blocks, height, width), **f32)
    g_pre = alloc.empty((batch, height, width), **f32)
    g_stats = alloc.empty((batch, 2, height, width), **f32)
    g_sa_w_part = alloc.empty((batch, SA_WEIGHTS.value), **f32)
    g_logit = alloc.empty((batch, channels), **f32)
    g_hidden_part = alloc.empty((batch, blocks, hidden_channels), **f32)
    g_hidden = alloc.empty((batch, hidden_channels), **f32)
    g_box_part = alloc.empty((batch, blocks, 4), **f32)
    g_x = alloc.empty_like(x)
    g_w1, g_w2 = alloc.empty(tuple(w1.shape), **f32), alloc.empty(tuple(w2.shape), **f32)
    g_sa_w = alloc.empty((SA_WEIGHTS.value,), **f32)
    g_boxes = alloc.empty((batch, 4), **f32)
    sizes = (channels, height, width)
    hidden_block = triton.next_power_of_2(hidden_channels)
    grid = (batch, blocks)
    with alloc.on_device(x):
        mxa_branch_bwd_spatial_part_kernel[grid](
            x, grad_out, boxes32, cw, part, *sizes, *x.stride(), *grad_out.stride(), ALIGN=align, **options)
        mxa_branch_bwd_spatial_kernel[(batch,)](
            part, spatial, stats, sa_w, g_pre, g_stats, g_sa_w_part, height, width, blocks,
            HWP=triton.next_power_of_2(height * width), **SPATIAL_CONFIG.options())
        mxa_branch_bwd_channel_kernel[grid](
            x, grad_out, boxes32, w2, cw, spatial, argmax, g_stats, g_logit, g_hidden_part, *sizes, hidden_channels,
            *x.stride(), *grad_out.stride(), ALIGN=align, BCH=hidden_block, **options)
        mxa_branch_bwd_input_kernel[grid](
            x, grad_out, boxes32, w1, hidden, cw, spatial, argmax, g_stats, g_hidden_part, g_hidden, g_x, g_box_part,
            *sizes, hidden_channels, *x.stride(), *grad_out.stride(), *g_x.stride(), ALIGN=align, BCH=hidden_block,
            **options)
        mxa_branch_bwd_weights_kernel[(triton.cdiv(channels, WEIGHTS_CONFIG.tiles["WBC"]) + 1,)](
            g_hidden, pooled, g_logit, hidden, g_sa_w_part, g_box_part, g_w1, g_w2, g_sa_w, g_boxes,
            batch, channels, hidden_channels, blocks, ALIGN=align, BCH=hidden_block, **WEIGHTS_CONFIG.options())
    return (g_x, g_boxes.to(boxes.dtype), g_w1.reshape(ca_reduce_weight.shape).to(ca_reduce_weight.dtype),
            g_w2.reshape(ca_expand_weight.shape).to(ca_expand_weight.dtype),
            g_sa_w.reshape(sa_weight.shape).to(sa_weight.dtype))


def builds(all_configs: bool = False) -> list:
    """Every kernel x dtype x ROI mode, for GPU targets without a GPU: those over channel blocks on
    flattened 7x7 and 4x4 maps and on 16x16 padded ones (every EfficientViT stage at 224 px), or
    ``all_configs``: the larger maps' too; the per-sample ones on 14x14 maps; the batch sums."""
    padded_maps = {16: (16, 16), 8: (16, 32), 4: (32, 32)}
    layouts = [(16, "map 7x7 flattened", dict(KRON=True, HP=8, WP=8, NPIX=64)),
               (16, "map 4x4 flattened", dict(KRON=True, HP=4, WP=4, NPIX=16))]
    layouts += [(block_c, f"BC {block_c} map {h}x{w}", dict(KRON=False, HP=h, WP=w, NPIX=h * w))
                for block_c, (h, w) in padded_maps.items() if all_configs or block_c == 16]
    per_block = (mxa_branch_fwd_pool_kernel, mxa_branch_fwd_stats_kernel, mxa_branch_fwd_out_kernel,
                 mxa_branch_bwd_spatial_part_kernel, mxa_branch_bwd_channel_kernel, mxa_branch_bwd_input_kernel)
    pointers = dict(feature_pointers={"x_ptr", "out_ptr", "gout_ptr", "gx_ptr"},
                    index_pointers={"argmax_ptr", "part_arg_ptr"})

    def build(kernel, config, dtype, launch, constexprs):
        sizes = tuple(n for n in ("B", "C", "H", "W", "CH", "BLOCKS") if n in kernel.arg_names)
        return kernel_build(kernel, config, dtype, launch, constexprs, sizes=sizes, **pointers)

    result = [build(kernel, "map 14x14", "fp32", SPATIAL_CONFIG, dict(HWP=256))
              for kernel in (mxa_branch_fwd_spatial_kernel, mxa_branch_bwd_spatial_kernel)]
    for align in (True, False):
        mode = "align" if align else "crop"
        result.append(build(mxa_branch_bwd_weights_kernel, f"hidden 16 {mode}", "fp32", WEIGHTS_CONFIG,
                            dict(ALIGN=align, BCH=16)))
        for dtype in BUILD_DTYPES:
            for block_c, layout, constexprs in layouts:
                result += [build(kernel, f"{layout} {mode}", dtype, SHIPPED_CONFIGS[block_c],
                                 dict(constexprs, ALIGN=align, BCH=16)) for kernel in per_block]
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
    ctx.set_materialize_grads(False)  # no zero gradients made for the outputs saved for the backward
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
