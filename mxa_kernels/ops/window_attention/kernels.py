"""Fused Triton kernels of one head of EfficientViT's windowed attention with a learned
relative-position bias, forward and backward (see :func:`window_attention_ref` for the definition).

Both kernels run one program per window and read q, k, v straight from the (B, D, H, W) maps (any
strides: channel slices of the qkv projection need no copy), with the window partition and its
reverse folded into the indexing; tokens are padded to a power of two (49 -> 64) and masked.

- forward: **one** launch per head. Scores, bias gather through the offset index, a numerically
  stable softmax and the weighted sum stay in registers; besides the output it writes each score
  row's maximum and exponential sum (windows x 2 x N floats) so that the backward recomputes the
  probabilities as exp(s - max) / sum, as accurately as the forward (a stored log-sum-exp would lose
  the digits of the largest scores).
- backward: **one** launch per head, plus a PyTorch sum. Each program writes its window's bias
  gradient, the score gradients summed per table entry; the sum over windows is a PyTorch
  reduction, so the bias-table gradient is deterministic (no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import alloc
from ...backend import kernel_dtype_reason, register_triton_op
from ...launch import BUILD_DTYPES, MAX_HEAD_DIM, MAX_WINDOW_SIDE, LaunchConfig, dot_precision, kernel_build, padded

# one configuration: one window per program; every block size follows from the window and head widths
SHIPPED_CONFIGS = {"window": LaunchConfig("window", 4)}


@triton.jit
def _window_tile(ptr, window_id, n_wh, n_ww, WS, stride_b, stride_d, stride_h, stride_w, D, DP: tl.constexpr, NP: tl.constexpr):
    """Offsets and mask of the (DP, NP) tile [feature, token] of one window in a (B, D, H, W) map."""
    per_image = n_wh * n_ww
    b = (window_id // per_image).to(tl.int64)
    wh = (window_id % per_image) // n_ww
    ww = window_id % n_ww
    n = tl.arange(0, NP)
    y = wh * WS + n // WS
    x = ww * WS + n % WS
    d = tl.arange(0, DP)
    offs = b * stride_b + d[:, None] * stride_d + y[None, :] * stride_h + x[None, :] * stride_w
    return offs, (d[:, None] < D) & (n[None, :] < WS * WS)


@triton.jit
def _scores(q_ptr, k_ptr, bias_ptr, idx_ptr, window_id, n_wh, n_ww, WS, sqb, sqd, sqh, sqw, skb, skd, skh, skw,
            DK, OFFSETS, scale, DKP: tl.constexpr, NP: tl.constexpr, PREC: tl.constexpr):
    """scale * q^T k + bias[idx] of one window, (NP, NP), padded key columns at -inf; and q, k.
    An offset outside the table of OFFSETS entries gives a NaN score (the table is never read past)."""
    q_offs, q_mask = _window_tile(q_ptr, window_id, n_wh, n_ww, WS, sqb, sqd, sqh, sqw, DK, DKP, NP)
    k_offs, k_mask = _window_tile(k_ptr, window_id, n_wh, n_ww, WS, skb, skd, skh, skw, DK, DKP, NP)
    q = tl.load(q_ptr + q_offs, mask=q_mask, other=0.0)
    k = tl.load(k_ptr + k_offs, mask=k_mask, other=0.0)
    n = tl.arange(0, NP)
    pair_ok = (n[:, None] < WS * WS) & (n[None, :] < WS * WS)
    idx = tl.load(idx_ptr + n[:, None] * (WS * WS) + n[None, :], mask=pair_ok, other=0)
    in_table = (idx >= 0) & (idx < OFFSETS)
    bias = tl.load(bias_ptr + idx, mask=pair_ok & in_table, other=0.0)
    bias = tl.where(pair_ok & ~in_table, float("nan"), bias)
    s = tl.dot(tl.trans(q), k, input_precision=PREC) * tl.cast(scale, tl.float32) + bias
    s = tl.where((n[None, :] < WS * WS), s, float("-inf"))
    return s, q, k, idx, pair_ok


@triton.jit(do_not_specialize=["n_wh", "n_ww", "WS", "DK", "DV", "OFFSETS"])
def window_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, idx_ptr, out_ptr, rows_ptr,
    n_wh, n_ww, WS, DK, DV, OFFSETS, scale,
    sqb, sqd, sqh, sqw, skb, skd, skh, skw, svb, svd, svh, svw, sob, sod, soh, sow,
    DKP: tl.constexpr, DVP: tl.constexpr, NP: tl.constexpr, PREC: tl.constexpr,
):
    window_id = tl.program_id(0)
    s, _, _, _, _ = _scores(q_ptr, k_ptr, bias_ptr, idx_ptr, window_id, n_wh, n_ww, WS, sqb, sqd, sqh, sqw,
                            skb, skd, skh, skw, DK, OFFSETS, scale, DKP, NP, PREC)
    row_max = tl.max(s, axis=1)
    p = tl.exp(s - row_max[:, None])
    row_sum = tl.sum(p, axis=1)
    p = p / row_sum[:, None]
    v_offs, v_mask = _window_tile(v_ptr, window_id, n_wh, n_ww, WS, svb, svd, svh, svw, DV, DVP, NP)
    v = tl.load(v_ptr + v_offs, mask=v_mask, other=0.0)
    out = tl.dot(v, tl.trans(p).to(v.dtype), input_precision=PREC)  # (DVP, NP): out[:, i] = sum_j v_j p_ij
    o_offs, _ = _window_tile(out_ptr, window_id, n_wh, n_ww, WS, sob, sod, soh, sow, DV, DVP, NP)
    tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=v_mask)
    n = tl.arange(0, NP)
    tl.store(rows_ptr + window_id.to(tl.int64) * 2 * NP + n, row_max)
    tl.store(rows_ptr + window_id.to(tl.int64) * 2 * NP + NP + n, row_sum)


@triton.jit(do_not_specialize=["n_wh", "n_ww", "WS", "DK", "DV", "OFFSETS"])
def window_attention_bwd_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, idx_ptr, rows_ptr, gout_ptr, gq_ptr, gk_ptr, gv_ptr, gbias_ptr,
    n_wh, n_ww, WS, DK, DV, OFFSETS, scale,
    sqb, sqd, sqh, sqw, skb, skd, skh, skw, svb, svd, svh, svw, sgb, sgd, sgh, sgw,
    sdkb, sdkd, sdkh, sdkw, sdvb, sdvd, sdvh, sdvw,
    DKP: tl.constexpr, DVP: tl.constexpr, NP: tl.constexpr, PREC: tl.constexpr,
):
    window_id = tl.program_id(0)
    s, q, k, idx, pair_ok = _scores(q_ptr, k_ptr, bias_ptr, idx_ptr, window_id, n_wh, n_ww, WS, sqb, sqd, sqh, sqw,
                                    skb, skd, skh, skw, DK, OFFSETS, scale, DKP, NP, PREC)
    n = tl.arange(0, NP)
    row_max = tl.load(rows_ptr + window_id.to(tl.int64) * 2 * NP + n)
    row_sum = tl.load(rows_ptr + window_id.to(tl.int64) * 2 * NP + NP + n)
    p = tl.where(pair_ok, tl.exp(s - row_max[:, None]) / row_sum[:, None], 0.0)
    v_offs, v_mask = _window_tile(v_ptr, window_id, n_wh, n_ww, WS, svb, svd, svh, svw, DV, DVP, NP)
    v = tl.load(v_ptr + v_offs, mask=v_mask, other=0.0)
    g_offs, _ = _window_tile(gout_ptr, window_id, n_wh, n_ww, WS, sgb, sgd, sgh, sgw, DV, DVP, NP)
    g_out = tl.load(gout_ptr + g_offs, mask=v_mask, other=0.0)

    g_v = tl.dot(g_out, p.to(g_out.dtype), input_precision=PREC)               # (DVP, NP)
    g_p = tl.dot(tl.trans(g_out), v, input_precision=PREC)                     # (NP, NP)
    g_s = p * (g_p - tl.sum(p * g_p, axis=1)[:, None])                         # softmax backward
    scale32 = tl.cast(scale, tl.float32)
    g_q = tl.dot(k, tl.trans(g_s).to(k.dtype), input_precision=PREC) * scale32  # (DKP, NP)
    g_k = tl.dot(q, g_s.to(q.dtype), input_precision=PREC) * scale32            # (DKP, NP)

    gqk_offs, gqk_mask = _window_tile(gq_ptr, window_id, n_wh, n_ww, WS, sdkb, sdkd, sdkh, sdkw, DK, DKP, NP)
    tl.store(gq_ptr + gqk_offs, g_q.to(gq_ptr.dtype.element_ty), mask=gqk_mask)
    tl.store(gk_ptr + gqk_offs, g_k.to(gk_ptr.dtype.element_ty), mask=gqk_mask)
    gv_offs, _ = _window_tile(gv_ptr, window_id, n_wh, n_ww, WS, sdvb, sdvd, sdvh, sdvw, DV, DVP, NP)
    tl.store(gv_ptr + gv_offs, g_v.to(gv_ptr.dtype.element_ty), mask=v_mask)

    # this window's bias gradient: the score gradients summed per table entry
    for o in range(0, OFFSETS):
        g_entry = tl.sum(tl.sum(tl.where(pair_ok & (idx == o), g_s, 0.0), axis=1), axis=0)
        tl.store(gbias_ptr + window_id.to(tl.int64) * OFFSETS + o, g_entry)


def _launch_options(q: torch.Tensor, v: torch.Tensor, window: int) -> dict:
    """The launch's constexprs and warps: the padded head widths and window tokens, the precision."""
    return dict(SHIPPED_CONFIGS["window"].options(), DKP=padded(q.shape[1]), DVP=padded(v.shape[1]),
                NP=padded(window * window), PREC=dot_precision(q.dtype))


def window_attention_forward(q, k, v, bias, bias_idx, window: int, scale: float):
    """Launch the forward kernel; returns the output and the score rows' maxima and sums."""
    batch, _, height, width = q.shape
    n_wh, n_ww = height // window, width // window
    windows = batch * n_wh * n_ww
    config = _launch_options(q, v, window)
    out = alloc.empty((batch, v.shape[1], height, width), dtype=v.dtype, device=v.device)
    rows = alloc.empty((windows, 2, config["NP"]), dtype=torch.float32, device=q.device)
    with alloc.on_device(q):
        window_attention_fwd_kernel[(windows,)](
            q, k, v, bias.float().contiguous(), bias_idx.to(torch.int32).contiguous(), out, rows,
            n_wh, n_ww, window, q.shape[1], v.shape[1], bias.shape[0], scale,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), **config,
        )
    return out, rows


def window_attention_backward(grad_out, q, k, v, bias, bias_idx, rows, window: int, scale: float):
    """Launch the backward kernel; returns the gradients of q, k, v and the bias row."""
    batch, _, height, width = q.shape
    n_wh, n_ww = height // window, width // window
    windows = batch * n_wh * n_ww
    g_q, g_k = (alloc.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(2))
    g_v = alloc.empty(v.shape, dtype=v.dtype, device=v.device)
    g_bias_per_window = alloc.empty((windows, bias.shape[0]), dtype=torch.float32, device=q.device)
    with alloc.on_device(q):
        window_attention_bwd_kernel[(windows,)](
            q, k, v, bias.float().contiguous(), bias_idx.to(torch.int32).contiguous(), rows, grad_out,
            g_q, g_k, g_v, g_bias_per_window,
            n_wh, n_ww, window, q.shape[1], v.shape[1], bias.shape[0], scale,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *g_q.stride(), *g_v.stride(),
            **_launch_options(q, v, window),
        )
    return g_q, g_k, g_v, g_bias_per_window.sum(dim=0).to(bias.dtype)


def builds(all_configs: bool = False) -> list:
    """Both kernels x dtype for GPU targets without a GPU, for 7x7 windows of a 64-wide value head
    (one configuration: ``all_configs`` adds none)."""
    return [kernel_build(kernel, "7x7 windows, Dv 64", dtype, SHIPPED_CONFIGS["window"], dict(DKP=16, DVP=64, NP=64),
                         sizes=("n_wh", "n_ww", "WS", "DK", "DV"), feature_pointers={"q_ptr", "k_ptr", "v_ptr", "out_ptr", "gout_ptr", "gq_ptr", "gk_ptr", "gv_ptr"},
                         index_pointers={"idx_ptr"})
            for kernel in (window_attention_fwd_kernel, window_attention_bwd_kernel) for dtype in BUILD_DTYPES]


def launch_passes(q, k, v, bias, bias_idx, window, scale, grad_like=torch.empty_like) -> dict:
    """The fused forward and backward as calls of the launchers, in order (the backward takes the
    forward's outputs and the gradient ``grad_like(out)``), for the cost report (bench/cost.py), which
    records their launches."""
    saved = []

    def forward():
        saved[:] = window_attention_forward(q, k, v, bias, bias_idx, window, scale)

    def backward():
        out, rows = saved
        window_attention_backward(grad_like(out), q, k, v, bias, bias_idx, rows, window, scale)

    return {"forward": forward, "backward": backward}


# torch.library registration: torch.compile traces through these ops without graph breaks.

@torch.library.custom_op("mxa::window_attention_fwd", mutates_args=())
def window_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                         bias_idx: torch.Tensor, window: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return window_attention_forward(q, k, v, bias, bias_idx, window, scale)


@window_attention_fwd.register_fake
def _(q, k, v, bias, bias_idx, window, scale):
    batch, _, height, width = q.shape
    windows = batch * (height // window) * (width // window)
    return (v.new_empty((batch, v.shape[1], height, width)),
            q.new_empty((windows, 2, _launch_options(q, v, window)["NP"]), dtype=torch.float32))


@torch.library.custom_op("mxa::window_attention_bwd", mutates_args=())
def window_attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         bias: torch.Tensor, bias_idx: torch.Tensor, rows: torch.Tensor, window: int, scale: float
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return window_attention_backward(grad_out, q, k, v, bias, bias_idx, rows, window, scale)


@window_attention_bwd.register_fake
def _(grad_out, q, k, v, bias, bias_idx, rows, window, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), torch.empty_like(bias)


def _setup_context(ctx, inputs, output):
    q, k, v, bias, bias_idx, window, scale = inputs
    _, rows = output
    ctx.mark_non_differentiable(rows)
    ctx.save_for_backward(q, k, v, bias, bias_idx, rows)
    ctx.window, ctx.scale = window, scale


def _backward(ctx, grad_out, _grad_rows):
    q, k, v, bias, bias_idx, rows = ctx.saved_tensors
    g_q, g_k, g_v, g_bias = torch.ops.mxa.window_attention_bwd(grad_out, q, k, v, bias, bias_idx, rows,
                                                               ctx.window, ctx.scale)
    return g_q, g_k, g_v, g_bias, None, None, None


window_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def window_attention_triton(q, k, v, bias, bias_idx, window, scale):
    """The fused windowed attention; same arguments and result as :func:`window_attention_ref`."""
    return torch.ops.mxa.window_attention_fwd(q, k, v, bias, bias_idx, window, scale)[0]


def unsupported_reason(q, k, v, bias, bias_idx, window, scale) -> str | None:
    """Why the fused kernel cannot serve these arguments, or None."""
    if window > MAX_WINDOW_SIDE:
        return (f"the fused windowed attention serves windows up to {MAX_WINDOW_SIDE}x{MAX_WINDOW_SIDE}, "
                f"got {window}x{window}")
    if max(q.shape[1], v.shape[1]) > MAX_HEAD_DIM:
        return (f"the fused windowed attention serves head dimensions up to {MAX_HEAD_DIM}, got {q.shape[1]} "
                f"and {v.shape[1]}")
    return kernel_dtype_reason(q, "the fused windowed attention")


register_triton_op("window_attention", window_attention_triton, unsupported_reason)
