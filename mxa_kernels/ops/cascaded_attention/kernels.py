"""Fused Triton kernels of EfficientViT's whole windowed cascaded group attention at inference (see
:func:`cascaded_attention_infer_ref` for the definition): **three launches per block**: the heads'
dense bias tiles (one small program per head, ``window_bias_tiles``), the cascade (one program per
window), and the output projection as one batched GEMM over all tokens.

Each cascade program reads its window of the (B, C, H, W) input in place (the zero padding to whole
windows and the window partition are folded into the indexing) and keeps the cascade in registers:
for each head it loads its input once (the head's channels of x plus the previous head's output,
which stays in registers), projects it to q, k and v (BatchNorm folded), filters q with the head's
own depthwise kernel (its neighbours gathered in registers; the taps are walked from the centre
outwards, ring by ring, so that a smaller kernel's taps come first and the loop passes the rest
without a load or a product), adds the head's bias tile to the scores,
and takes a numerically stable softmax (one reciprocal per row) and the weighted sum of values. It
writes the heads' ReLU'd outputs at the window's tokens inside the map, (B, heads * Dv, H, W) in the
input's dtype; the projection and its bias are one ``torch.baddbmm`` over them.

Moving the projection out of the kernel costs the heads' outputs written and read once (2 x B x
heads * Dv x H x W elements); it frees the registers that held the projection's blocks (bench/README.md,
the cost report). Inference only: there is no backward (training needs batch statistics for the
BatchNorms, see ``FusedLocalWindowAttention``).
"""

from __future__ import annotations

from functools import cache

import torch
import triton
import triton.language as tl

from ... import alloc
from ...backend import kernel_dtype_reason, register_triton_op
from ..window_attention.kernels import window_bias_tiles
from ...launch import BUILD_DTYPES, MAX_HEAD_DIM, MAX_WINDOW_SIDE, LaunchConfig, dot_precision, kernel_build, padded

# Launch configurations, by padded head width (DVP <= 64 or 128): warps per program, chosen by ptxas's
# register report for sm_90 (tests/test_kernels_sm90.py, Triton 3.8): two programs per SM without a
# spill in bfloat16 (sm_80: the wide one spills 168 bytes).
SHIPPED_CONFIGS = {"narrow": LaunchConfig("narrow", 4), "wide": LaunchConfig("wide", 4)}


@triton.jit
def _input_half(x_base, x_tokens, channel0, d, sxc, in_map, group, previous):
    """(NP, DVH) half of a head's input: its channels channel0 + d of x (0 on the padding, and past the
    group's width, d >= group) plus that half of the previous head's output."""
    f = tl.load(x_base + (x_tokens[:, None] + ((channel0 + d) * sxc)[None, :]),
                mask=in_map[:, None] & (d[None, :] < group), other=0.0)
    return f + previous  # in the input's dtype, as the reference adds them


@triton.jit
def _project(f_lo, f_hi, w_ptr, rows, dh, CG, DVH: tl.constexpr, group, rows_ok, PREC: tl.constexpr):
    """f @ W[rows]^T over both halves of the input: (NP, len(rows)) float32."""
    w_lo = tl.load(w_ptr + (dh[:, None] + (rows * CG)[None, :]), mask=(dh[:, None] < group) & rows_ok[None, :],
                   other=0.0)
    out = tl.dot(f_lo, w_lo, input_precision=PREC)
    w_hi = tl.load(w_ptr + ((dh + DVH)[:, None] + (rows * CG)[None, :]),
                   mask=((dh + DVH)[:, None] < group) & rows_ok[None, :], other=0.0)
    return tl.dot(f_hi, w_hi, acc=out, input_precision=PREC)


@triton.jit
def _output_half(p, v, out_base, out_tokens, channel0, d, shc, in_window, in_map, value, PREC: tl.constexpr):
    """A half of the head's output p @ v (its columns d): stored ReLU'd at the map's tokens (channels
    channel0 + d of the heads' outputs), returned for the next head's input."""
    out = tl.dot(p, v, input_precision=PREC)
    # zero on the padding (tokens past the window, columns past Dv), which a NaN or Inf in the
    # window's real tokens would otherwise reach through the products and carry to every token
    out = tl.where(in_window[:, None] & (d[None, :] < value), out, 0.0).to(v.dtype)
    # the ReLU before the projection; NaN stays NaN as in torch.relu (tl.maximum's default drops it)
    relu = tl.maximum(out, 0.0, propagate_nan=tl.PropagateNan.ALL)
    tl.store(out_base + (out_tokens[:, None] + ((channel0 + d) * shc)[None, :]), relu,
             mask=in_map[:, None] & (d[None, :] < value))
    return out


@triton.jit(do_not_specialize=["H", "W", "n_wh", "n_ww", "WS", "CG", "DK", "DV", "HEADS"])
def cascaded_attention_infer_kernel(
    x_ptr, qkv_w_ptr, qkv_b_ptr, dw_w_ptr, dw_b_ptr, head_sizes_ptr, ring_ptr, tiles_ptr, heads_ptr,
    H, W, n_wh, n_ww, WS, CG, DK, DV, HEADS, scale,
    sxb, sxc, sxh, sxw, shb, shc, shh, shw,
    KS: tl.constexpr, DKP: tl.constexpr, DVH: tl.constexpr, NP: tl.constexpr, PREC: tl.constexpr,
):
    window_id = tl.program_id(0)
    per_image = n_wh * n_ww
    b = (window_id // per_image).to(tl.int64)
    n = tl.arange(0, NP)  # token of the window, row-major
    row, col = n // WS, n % WS
    y = (window_id % per_image) // n_ww * WS + row
    x = window_id % n_ww * WS + col
    in_window = n < WS * WS
    in_map = in_window & (y < H) & (x < W)  # tokens of the zero padding are in the window, not the map
    dk = tl.arange(0, DKP)
    dt = x_ptr.dtype.element_ty
    scale32 = tl.cast(scale, tl.float32)
    # 32-bit offsets of the tokens, the channels' added in the loop: pointer tiles made once and kept
    # across the heads would hold two registers per element
    x_base, x_tokens = x_ptr + b * sxb, y * sxh + x * sxw
    out_base, out_tokens = heads_ptr + b * shb, y * shh + x * shw

    # The head widths in two halves (DVH = DVP / 2): the input, its projection's weights, v, the output
    # and the previous head's output as (tokens, DVH) tiles, which keeps a 128-wide head's tiles small
    # enough for two programs per SM.
    dh = tl.arange(0, DVH)
    previous_lo = tl.zeros((NP, DVH), dtype=dt)  # the previous head's output: none before the first
    previous_hi = tl.zeros((NP, DVH), dtype=dt)
    for head in range(HEADS):
        # The head's sizes (its taps, and CG, DK, DV again), read from a table in the loop: the 2-D masks
        # made from them are then made in the loop; masks made before it would each hold a register per
        # element across the loop (the 128-wide heads spill).
        taps_h = tl.load(head_sizes_ptr + 4 * head)
        group_h = tl.load(head_sizes_ptr + 4 * head + 1)
        key_h = tl.load(head_sizes_ptr + 4 * head + 2)
        value_h = tl.load(head_sizes_ptr + 4 * head + 3)
        f_lo = _input_half(x_base, x_tokens, head * CG, dh, sxc, in_map, group_h, previous_lo)
        f_hi = _input_half(x_base, x_tokens, head * CG, dh + DVH, sxc, in_map, group_h, previous_hi)
        # this head's projection weights as (in, out) tiles of its (2 Dk + Dv, CG) matrix, by halves of
        # the input (the head's rows of the weights, 1-D, then the 2-D tile: an offset tile that does not
        # depend on the head would be kept in registers across the loop)
        first = head * (2 * DK + DV)
        b_head = qkv_b_ptr + first
        q = _project(f_lo, f_hi, qkv_w_ptr, first + dk, dh, CG, DVH, group_h, dk < key_h, PREC)
        q = (q + tl.load(b_head + dk, mask=dk < DK, other=0.0)[None, :]).to(dt)  # as the reference rounds it
        k = _project(f_lo, f_hi, qkv_w_ptr, first + DK + dk, dh, CG, DVH, group_h, dk < key_h, PREC)
        k = (k + tl.load(b_head + DK + dk, mask=dk < DK, other=0.0)[None, :]).to(dt)

        # the head's depthwise convolution of q over the window, zero outside it: its taps are the
        # first taps_h of the KS x KS taps in ring order (centre first)
        q_dw = tl.zeros((NP, DKP), dtype=tl.float32) + tl.load(dw_b_ptr + head * DK + dk, mask=dk < DK, other=0.0)[None, :]
        for ring_tap in range(KS * KS):
            if ring_tap < taps_h:
                tap = tl.load(ring_ptr + ring_tap)  # its place in the row-major KS x KS kernel
                src_row = row + (tap // KS - KS // 2)
                src_col = col + (tap % KS - KS // 2)
                ok = in_window & (src_row >= 0) & (src_row < WS) & (src_col >= 0) & (src_col < WS)
                src = tl.broadcast_to(tl.where(ok, src_row * WS + src_col, 0)[:, None], (NP, DKP))
                neighbour = tl.where(ok[:, None], tl.gather(q, src, 0), 0.0)
                tap_w = tl.load(dw_w_ptr + (head * DK + dk) * (KS * KS) + tap, mask=dk < DK, other=0.0)
                q_dw += neighbour * tap_w[None, :]

        s = tl.dot(q_dw.to(dt), tl.trans(k), input_precision=PREC) * scale32
        s += tl.load(tiles_ptr + ((head * NP + n) * NP)[:, None] + n[None, :]).to(tl.float32)  # padded keys: -inf
        p = tl.exp(s - tl.max(s, axis=1)[:, None])
        p = (p * (1.0 / tl.sum(p, axis=1))[:, None]).to(dt)
        # v after the softmax: fewer tiles live at once
        v_lo = _project(f_lo, f_hi, qkv_w_ptr, first + 2 * DK + dh, dh, CG, DVH, group_h, dh < value_h, PREC)
        v_lo = (v_lo + tl.load(b_head + 2 * DK + dh, mask=dh < DV, other=0.0)[None, :]).to(dt)
        v_hi = _project(f_lo, f_hi, qkv_w_ptr, first + 2 * DK + DVH + dh, dh, CG, DVH, group_h, dh + DVH < value_h,
                        PREC)
        v_hi = (v_hi + tl.load(b_head + 2 * DK + DVH + dh, mask=dh + DVH < DV, other=0.0)[None, :]).to(dt)
        previous_lo = _output_half(p, v_lo, out_base, out_tokens, head * DV, dh, shc, in_window, in_map, value_h, PREC)
        previous_hi = _output_half(p, v_hi, out_base, out_tokens, head * DV, dh + DVH, shc, in_window, in_map,
                                   value_h, PREC)


def launch_config(dv_padded: int) -> LaunchConfig:
    """The shipped configuration for heads whose padded width is ``dv_padded``."""
    return SHIPPED_CONFIGS["narrow" if dv_padded <= 64 else "wide"]


@cache
def _ring_order(kernel: int, device: torch.device) -> torch.Tensor:
    """The taps of a ``kernel`` x ``kernel`` depthwise kernel (row-major places) from the centre outwards,
    ring by ring, so that the first k * k are the centred k x k kernel; int32, on ``device``."""
    half = kernel // 2
    taps = sorted(range(kernel * kernel), key=lambda t: (max(abs(t // kernel - half), abs(t % kernel - half)), t))
    return torch.tensor(taps, dtype=torch.int32, device=device)


@cache
def _head_sizes(kernel_sizes: tuple[int, ...], group: int, key_dim: int, val_dim: int, device: torch.device
                ) -> torch.Tensor:
    """Each head's taps (its kernel size squared), group, key and value widths: (heads, 4) int32 on ``device``."""
    return torch.tensor([(k * k, group, key_dim, val_dim) for k in kernel_sizes], dtype=torch.int32, device=device)


def cascaded_attention_infer_heads(x, qkv_weight, qkv_bias, dw_weight, dw_bias, attention_biases, bias_idx,
                                   window: int, scale: float, kernel_sizes, config: str | None = None):
    """Launch the kernel (``config``: a key of SHIPPED_CONFIGS, or None to pick by head width): the heads'
    ReLU'd outputs, (B, heads * Dv, H, W)."""
    batch, channels, height, width = x.shape
    heads, qkv_out, group = qkv_weight.shape
    key_dim, kernel = dw_weight.shape[1], dw_weight.shape[-1]
    val_dim = qkv_out - 2 * key_dim
    n_wh, n_ww = -(-height // window), -(-width // window)
    windows = batch * n_wh * n_ww
    sizes = dict(KS=kernel, DKP=padded(key_dim), DVH=padded(max(group, val_dim), 32) // 2, NP=padded(window ** 2))
    launch = SHIPPED_CONFIGS[config] if config is not None else launch_config(2 * sizes["DVH"])
    heads_out = alloc.empty((batch, heads * val_dim, height, width), dtype=x.dtype, device=x.device)
    qkv_b, dw_w, dw_b = (t.float().contiguous() for t in (qkv_bias, dw_weight, dw_bias))
    tiles = window_bias_tiles(attention_biases, bias_idx, window, x.dtype)
    with alloc.on_device(x):
        cascaded_attention_infer_kernel[(windows,)](
            x, qkv_weight.to(x.dtype).contiguous(), qkv_b, dw_w, dw_b,
            _head_sizes(tuple(kernel_sizes), group, key_dim, val_dim, x.device), _ring_order(kernel, x.device), tiles,
            heads_out,
            height, width, n_wh, n_ww, window, group, key_dim, val_dim, heads, scale,
            *x.stride(), *heads_out.stride(), **sizes, PREC=dot_precision(x.dtype), **launch.options(),
        )
    return heads_out


def cascaded_attention_infer_forward(x, qkv_weight, qkv_bias, dw_weight, dw_bias, attention_biases, bias_idx,
                                     proj_weight, proj_bias, window: int, scale: float, kernel_sizes,
                                     config: str | None = None):
    """The kernel, then the output projection as one batched GEMM over every token."""
    heads_out = cascaded_attention_infer_heads(x, qkv_weight, qkv_bias, dw_weight, dw_bias, attention_biases,
                                               bias_idx, window, scale, kernel_sizes, config)
    batch, channels, height, width = x.shape
    out = torch.baddbmm(proj_bias.to(x.dtype)[None, :, None].expand(batch, channels, height * width),
                        proj_weight.to(x.dtype).expand(batch, *proj_weight.shape), heads_out.flatten(2))
    return out.view(x.shape)


def builds(all_configs: bool = False) -> list:
    """The kernel x dtype in each shipped configuration, for GPU targets without a GPU: 7x7 windows, 7x7
    depthwise kernels at most, 16-wide keys, heads as wide as the configuration serves at 224 px
    (``all_configs`` adds none)."""
    head_widths = {"narrow": 64, "wide": 128}
    return [kernel_build(cascaded_attention_infer_kernel, f"{name}: 7x7 windows, heads {width} wide", dtype,
                         SHIPPED_CONFIGS[name], dict(KS=7, DKP=16, DVH=width // 2, NP=64),
                         sizes=("H", "W", "n_wh", "n_ww", "WS", "CG", "DK", "DV", "HEADS"),
                         feature_pointers={"x_ptr", "qkv_w_ptr", "heads_ptr", "tiles_ptr"},
                         index_pointers={"head_sizes_ptr", "ring_ptr"})
            for dtype in BUILD_DTYPES for name, width in head_widths.items()]


def launch_passes(*args, grad_like=None) -> dict:
    """The fused forward as a call of the launcher, for the cost report (bench/cost.py), which records
    its launches. Inference only: no backward, so ``grad_like`` (the other ops' gradient) is not used."""
    return {"forward": lambda: cascaded_attention_infer_forward(*args)}


# torch.library registration: torch.compile traces through this op without graph breaks.

@torch.library.custom_op("mxa::cascaded_attention_infer", mutates_args=())
def cascaded_attention_infer_op(x: torch.Tensor, qkv_weight: torch.Tensor, qkv_bias: torch.Tensor,
                                dw_weight: torch.Tensor, dw_bias: torch.Tensor, attention_biases: torch.Tensor,
                                bias_idx: torch.Tensor, proj_weight: torch.Tensor, proj_bias: torch.Tensor,
                                window: int, scale: float, kernel_sizes: list[int]) -> torch.Tensor:
    return cascaded_attention_infer_forward(x, qkv_weight, qkv_bias, dw_weight, dw_bias, attention_biases, bias_idx,
                                            proj_weight, proj_bias, window, scale, kernel_sizes)


@cascaded_attention_infer_op.register_fake
def _(x, qkv_weight, qkv_bias, dw_weight, dw_bias, attention_biases, bias_idx, proj_weight, proj_bias, window, scale,
      kernel_sizes):
    return x.new_empty(x.shape)


def cascaded_attention_infer_triton(*args):
    """The fused inference kernel; same arguments and result as :func:`cascaded_attention_infer_ref`."""
    return torch.ops.mxa.cascaded_attention_infer(*args)


def unsupported_reason(x, qkv_weight, qkv_bias, dw_weight, dw_bias, attention_biases, bias_idx, proj_weight,
                       proj_bias, window, scale, kernel_sizes) -> str | None:
    """Why the fused kernel cannot serve these arguments, or None."""
    what = "the fused cascaded group attention"
    if window > MAX_WINDOW_SIDE:
        return f"{what} serves windows up to {MAX_WINDOW_SIDE}x{MAX_WINDOW_SIDE}, got {window}x{window}"
    widths = (dw_weight.shape[1], qkv_weight.shape[1] - 2 * dw_weight.shape[1], qkv_weight.shape[2])
    if max(widths) > MAX_HEAD_DIM:
        return f"{what} serves key, value and group widths up to {MAX_HEAD_DIM}, got {widths}"
    return kernel_dtype_reason(x, what)


register_triton_op("cascaded_attention_infer", cascaded_attention_infer_triton, unsupported_reason)
