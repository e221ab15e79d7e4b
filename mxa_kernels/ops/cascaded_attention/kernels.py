"""Fused Triton kernel of EfficientViT's whole windowed cascaded group attention at inference (see
:func:`cascaded_attention_infer_ref` for the definition): **one launch per block**, one program per
window.

Each program reads its window of the (B, C, H, W) input in place (the zero padding to whole windows
and the window partition are folded into the indexing) and keeps the cascade in registers: for each
head the feature sum, the q/k/v projection (BatchNorm folded), the depthwise convolution on q, the
scores with the bias gathered through the offset index, a numerically stable softmax and the
weighted sum of values. Two small per-window scratch buffers, which stay in L1/L2, carry what a
program's registers cannot hold in a shape Triton can index:

- q, so that the depthwise convolution can read each token's neighbours (a barrier orders the
  write and the reads within the program);
- the heads' ReLU'd outputs, read back by the output projection in blocks of output channels.

The projection writes the window's tokens that lie inside the map straight to the (B, C, H, W)
output. Inference only: there is no backward (training needs batch statistics for the BatchNorms,
see ``FusedLocalWindowAttention``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import alloc
from ...backend import kernel_dtype_reason, register_triton_op
from ...launch import BUILD_DTYPES, MAX_HEAD_DIM, MAX_WINDOW_SIDE, LaunchConfig, dot_precision, kernel_build, padded

# Launch configurations, by padded head width (DVP <= 64 or 128): output channels per projection
# block, warps. Chosen by ptxas's sm_90 register report (tests/test_kernels_sm90.py): at 4 warps, or
# wider projection blocks, the kernel spills more; "wide" still spills about 1 KB per thread.
SHIPPED_CONFIGS = {"narrow": LaunchConfig("narrow", 8, {"COB": 16}), "wide": LaunchConfig("wide", 8, {"COB": 32})}


@triton.jit
def _head_input(x_tile, heads_buf, head, CG, sxc, in_map, dv, NP: tl.constexpr, DVP: tl.constexpr):
    """(NP, DVP) input of ``head``: its channels of x (0 on the padding) plus the previous head's output."""
    f = tl.load(x_tile + (head * CG + dv)[None, :] * sxc, mask=in_map[:, None] & (dv[None, :] < CG), other=0.0)
    if head > 0:
        f += tl.load(heads_buf + (head - 1) * NP * DVP)
    return f


@triton.jit(do_not_specialize=["H", "W", "n_wh", "n_ww", "WS", "C", "CG", "DK", "DV", "HEADS", "OFFSETS"])
def cascaded_attention_infer_kernel(
    x_ptr, qkv_w_ptr, qkv_b_ptr, dw_w_ptr, dw_b_ptr, bias_ptr, idx_ptr, proj_w_ptr, proj_b_ptr,
    q_buf_ptr, heads_buf_ptr, out_ptr,
    H, W, n_wh, n_ww, WS, C, CG, DK, DV, HEADS, OFFSETS, scale,
    sxb, sxc, sxh, sxw, sob, soc, soh, sow,
    KS: tl.constexpr, DKP: tl.constexpr, DVP: tl.constexpr, NP: tl.constexpr, COB: tl.constexpr,
    PREC: tl.constexpr,
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
    dv = tl.arange(0, DVP)
    dt = x_ptr.dtype.element_ty
    scale32 = tl.cast(scale, tl.float32)
    q_buf = q_buf_ptr + window_id.to(tl.int64) * NP * DKP + dk[None, :]  # (NP, DKP) rows: tokens
    heads_buf = heads_buf_ptr + window_id.to(tl.int64) * HEADS * NP * DVP + n[:, None] * DVP + dv[None, :]
    x_tile = x_ptr + b * sxb + y[:, None] * sxh + x[:, None] * sxw

    q_w_mask = (dv[:, None] < CG) & (dk[None, :] < DK)
    v_w_mask = (dv[:, None] < CG) & (dv[None, :] < DV)
    for head in range(HEADS):
        # this head's projection weights as (in, out) tiles of the (2 Dk + Dv, CG) matrix
        w_head = qkv_w_ptr + head * (2 * DK + DV) * CG + dv[:, None]
        b_head = qkv_b_ptr + head * (2 * DK + DV)
        # The head's input (its chunk of x plus the previous head's output) is read again, from cache,
        # for each of q, k and v: holding it, or q, k and v, in registers across the depthwise
        # convolution and the softmax makes the compiler spill.
        f = _head_input(x_tile, heads_buf, head, CG, sxc, in_map, dv, NP, DVP)
        q = tl.dot(f, tl.load(w_head + dk[None, :] * CG, mask=q_w_mask, other=0.0), input_precision=PREC)
        q += tl.load(b_head + dk, mask=dk < DK, other=0.0)[None, :]

        # depthwise convolution of q over the window, zero outside it
        tl.store(q_buf + n[:, None] * DKP, q)
        tl.debug_barrier()
        q_dw = tl.zeros((NP, DKP), dtype=tl.float32) + tl.load(dw_b_ptr + head * DK + dk, mask=dk < DK, other=0.0)[None, :]
        for tap in range(KS * KS):
            src_row = row + (tap // KS - KS // 2)
            src_col = col + (tap % KS - KS // 2)
            ok = in_window & (src_row >= 0) & (src_row < WS) & (src_col >= 0) & (src_col < WS)
            neighbour = tl.load(q_buf + (src_row * WS + src_col)[:, None] * DKP, mask=ok[:, None], other=0.0)
            tap_w = tl.load(dw_w_ptr + (head * DK + dk) * (KS * KS) + tap, mask=dk < DK, other=0.0)
            q_dw += neighbour * tap_w[None, :]
        tl.debug_barrier()  # every read of q_buf is done before the next head overwrites it

        f = _head_input(x_tile, heads_buf, head, CG, sxc, in_map, dv, NP, DVP)
        k = tl.dot(f, tl.load(w_head + (DK + dk)[None, :] * CG, mask=q_w_mask, other=0.0), input_precision=PREC)
        k += tl.load(b_head + DK + dk, mask=dk < DK, other=0.0)[None, :]
        s = tl.dot(q_dw.to(dt), tl.trans(k.to(dt)), input_precision=PREC) * scale32
        pair_ok = in_window[:, None] & in_window[None, :]
        idx = tl.load(idx_ptr + n[:, None] * (WS * WS) + n[None, :], mask=pair_ok, other=0)
        # an offset outside the table gives a NaN score: the table is never read past
        in_table = (idx >= 0) & (idx < OFFSETS)
        s += tl.where(pair_ok & ~in_table, float("nan"),
                      tl.load(bias_ptr + head * OFFSETS + idx, mask=pair_ok & in_table, other=0.0))
        s = tl.where(in_window[None, :], s, float("-inf"))
        p = tl.exp(s - tl.max(s, axis=1)[:, None])
        p = p / tl.sum(p, axis=1)[:, None]

        f = _head_input(x_tile, heads_buf, head, CG, sxc, in_map, dv, NP, DVP)
        v = tl.dot(f, tl.load(w_head + (2 * DK + dv)[None, :] * CG, mask=v_w_mask, other=0.0), input_precision=PREC)
        v += tl.load(b_head + 2 * DK + dv, mask=dv < DV, other=0.0)[None, :]
        out_head = tl.dot(p.to(dt), v.to(dt), input_precision=PREC)
        # zero on the padding (tokens past the window, columns past Dv), which a NaN or Inf in the
        # window's real tokens would otherwise reach through the products and carry to every token
        out_head = tl.where(in_window[:, None] & (dv[None, :] < DV), out_head, 0.0)
        tl.store(heads_buf + head * NP * DVP, out_head.to(dt))
        tl.debug_barrier()  # the next head reads this output as part of its input

    # output projection over the concatenated heads, COB output channels at a time
    co = tl.arange(0, COB)
    for c0 in range(0, C, COB):
        c_ok = (c0 + co) < C
        acc = tl.zeros((NP, COB), dtype=tl.float32) + tl.load(proj_b_ptr + c0 + co, mask=c_ok, other=0.0)[None, :]
        for head in range(HEADS):
            # the ReLU before the projection; NaN stays NaN as in torch.relu (tl.maximum's default drops it)
            a = tl.maximum(tl.load(heads_buf + head * NP * DVP), 0.0, propagate_nan=tl.PropagateNan.ALL).to(dt)
            w_proj = tl.load(proj_w_ptr + (c0 + co)[None, :] * (HEADS * DV) + (head * DV + dv)[:, None],
                             mask=(dv[:, None] < DV) & c_ok[None, :], other=0.0)
            acc += tl.dot(a, w_proj, input_precision=PREC)
        out = out_ptr + b * sob + (c0 + co)[None, :] * soc + y[:, None] * soh + x[:, None] * sow
        tl.store(out, acc.to(dt), mask=in_map[:, None] & c_ok[None, :])


def launch_config(dv_padded: int) -> LaunchConfig:
    """The shipped configuration for heads whose padded width is ``dv_padded``."""
    return SHIPPED_CONFIGS["narrow" if dv_padded <= 64 else "wide"]


def cascaded_attention_infer_forward(x, qkv_weight, qkv_bias, dw_weight, dw_bias, attention_biases, bias_idx,
                                     proj_weight, proj_bias, window: int, scale: float, config: str | None = None):
    """Launch the kernel (``config``: a key of SHIPPED_CONFIGS, or None to pick by head width)."""
    batch, channels, height, width = x.shape
    heads, qkv_out, group = qkv_weight.shape
    key_dim, kernel = dw_weight.shape[1], dw_weight.shape[-1]
    val_dim = qkv_out - 2 * key_dim
    n_wh, n_ww = -(-height // window), -(-width // window)
    windows = batch * n_wh * n_ww
    sizes = dict(KS=kernel, DKP=padded(key_dim), DVP=padded(max(group, val_dim)), NP=padded(window ** 2))
    launch = SHIPPED_CONFIGS[config] if config is not None else launch_config(sizes["DVP"])
    out = alloc.empty(x.shape, dtype=x.dtype, device=x.device)
    q_buf = alloc.empty((windows, sizes["NP"], sizes["DKP"]), dtype=torch.float32, device=x.device)
    heads_buf = alloc.empty((windows, heads, sizes["NP"], sizes["DVP"]), dtype=x.dtype, device=x.device)
    qkv_b, dw_w, dw_b, table, proj_b = (t.float().contiguous()
                                        for t in (qkv_bias, dw_weight, dw_bias, attention_biases, proj_bias))
    with alloc.on_device(x):
        cascaded_attention_infer_kernel[(windows,)](
            x, qkv_weight.to(x.dtype).contiguous(), qkv_b, dw_w, dw_b, table, bias_idx.to(torch.int32).contiguous(),
            proj_weight.to(x.dtype).contiguous(), proj_b, q_buf, heads_buf, out,
            height, width, n_wh, n_ww, window, channels, group, key_dim, val_dim, heads, attention_biases.shape[1], scale,
            *x.stride(), *out.stride(), **sizes, PREC=dot_precision(x.dtype), **launch.options(),
        )
    return out


def builds(all_configs: bool = False) -> list:
    """The kernel x dtype in each shipped configuration, for GPU targets without a GPU: 7x7 windows, a 5x5
    depthwise kernel, 16-wide keys, heads as wide as the configuration serves at 224 px (``all_configs``
    adds none)."""
    head_widths = {"narrow": 64, "wide": 128}
    return [kernel_build(cascaded_attention_infer_kernel, f"{name}: 7x7 windows, heads {width} wide", dtype,
                         SHIPPED_CONFIGS[name], dict(KS=5, DKP=16, DVP=width, NP=64),
                         sizes=("H", "W", "n_wh", "n_ww", "WS", "C", "CG", "DK", "DV", "HEADS", "OFFSETS"),
                         feature_pointers={"x_ptr", "out_ptr", "qkv_w_ptr", "proj_w_ptr", "heads_buf_ptr"},
                         index_pointers={"idx_ptr"})
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
                                window: int, scale: float) -> torch.Tensor:
    return cascaded_attention_infer_forward(x, qkv_weight, qkv_bias, dw_weight, dw_bias, attention_biases, bias_idx,
                                            proj_weight, proj_bias, window, scale)


@cascaded_attention_infer_op.register_fake
def _(x, qkv_weight, qkv_bias, dw_weight, dw_bias, attention_biases, bias_idx, proj_weight, proj_bias, window, scale):
    return x.new_empty(x.shape)


def cascaded_attention_infer_triton(*args):
    """The fused inference kernel; same arguments and result as :func:`cascaded_attention_infer_ref`."""
    return torch.ops.mxa.cascaded_attention_infer(*args)


def unsupported_reason(x, qkv_weight, qkv_bias, dw_weight, dw_bias, attention_biases, bias_idx, proj_weight,
                       proj_bias, window, scale) -> str | None:
    """Why the fused kernel cannot serve these arguments, or None."""
    what = "the fused cascaded group attention"
    if window > MAX_WINDOW_SIDE:
        return f"{what} serves windows up to {MAX_WINDOW_SIDE}x{MAX_WINDOW_SIDE}, got {window}x{window}"
    key_dim, kernel = dw_weight.shape[1], dw_weight.shape[-1]
    if kernel % 2 == 0:
        return f"{what} serves odd depthwise kernel sizes, got {kernel}"
    widths = (key_dim, qkv_weight.shape[1] - 2 * key_dim, qkv_weight.shape[2])
    if max(widths) > MAX_HEAD_DIM:
        return f"{what} serves key, value and group widths up to {MAX_HEAD_DIM}, got {widths}"
    return kernel_dtype_reason(x, what)


register_triton_op("cascaded_attention_infer", cascaded_attention_infer_triton, unsupported_reason)
