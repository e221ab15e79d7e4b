"""Fused Triton kernels of one head of EfficientViT's windowed attention with a learned
relative-position bias, forward and backward (see :func:`window_attention_ref` for the definition).

The attention kernels run one program per window and read q, k, v straight from the (B, D, H, W)
maps (any strides: channel slices of the qkv projection need no copy), with the window partition and
its reverse folded into the indexing; tokens are padded to a power of two (49 -> 64) and masked.

- forward: **two** launches per head. A small kernel gathers the bias through the offset index once
  per call (a dense (NP, NP) tile in the features' dtype, -inf on the padded keys, NaN for an offset
  outside the table; the inference cascade uses it too, one program per head); the attention kernel
  adds the tile to the scores, keeps a numerically stable softmax (one reciprocal per row) and the
  weighted sum in registers, and writes each score row's maximum and reciprocal exponential sum
  (windows x 2 x NP floats) so that the backward recomputes the probabilities exactly as the forward
  made them (a stored log-sum-exp would lose the digits of the largest scores).
- backward: **one** launch per head, plus a PyTorch sum. Each program sums its window's score
  gradients per table entry without a walk over the table: it gathers them in the order of a plan
  (the token pairs sorted by offset, made once per offset index by a few PyTorch ops and cached,
  see :func:`bias_gradient_plan`), and sums each offset's run of pairs from whole chunks of sorted
  pairs and prefix sums within the chunks at its ends. The sum over windows is a PyTorch reduction,
  so the bias-table gradient is deterministic (no atomics, every sum in a fixed order).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import triton
import triton.language as tl

from ... import alloc
from ...backend import kernel_dtype_reason, register_triton_op
from ...launch import BUILD_DTYPES, MAX_HEAD_DIM, MAX_WINDOW_SIDE, LaunchConfig, dot_precision, kernel_build, padded

# Launch configurations, chosen by ptxas's register report for sm_90 and sm_80 (tests/test_kernels_sm90.py,
# Triton 3.8): 4 warps but for the backward of value heads wider than 64 (padded to 128), which spills at
# 4 warps on sm_80 (8 warps: no spill on either target, one program resident per SM on sm_90). The
# narrow backward still spills 88 bytes on sm_80 (none on sm_90).
SHIPPED_CONFIGS = {"forward": LaunchConfig("forward", 4), "backward narrow": LaunchConfig("backward narrow", 4),
                   "backward wide": LaunchConfig("backward wide", 8)}
# The fused op serves bias tables of fewer entries: each backward program holds one gradient per entry
# (the forward alone would not need the limit, but one backend serves both passes of a call).
MAX_BIAS_TABLE = 1024


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


@triton.jit(do_not_specialize=["WS", "OFFSETS"])
def window_bias_kernel(bias_ptr, idx_ptr, tile_ptr, WS, OFFSETS, NP: tl.constexpr):
    """Program r: the dense bias tile (NP, NP) of row r of the (rows, OFFSETS) table, bias[r, idx]."""
    row = tl.program_id(0)
    n = tl.arange(0, NP)
    pair_ok = (n[:, None] < WS * WS) & (n[None, :] < WS * WS)
    idx = tl.load(idx_ptr + n[:, None] * (WS * WS) + n[None, :], mask=pair_ok, other=0)  # any integer dtype
    in_table = pair_ok & (idx >= 0) & (idx < OFFSETS)
    bias = tl.load(bias_ptr + row * OFFSETS + idx, mask=in_table, other=0.0)
    # an offset outside the table gives a NaN score (the table is never read past); padded keys -inf
    bias = tl.where(pair_ok & ~in_table, float("nan"), bias)
    bias = tl.where(n[None, :] < WS * WS, bias, float("-inf"))
    tl.store(tile_ptr + row * NP * NP + n[:, None] * NP + n[None, :], bias.to(tile_ptr.dtype.element_ty))


@triton.jit
def _scores(q_ptr, k_ptr, tile_ptr, window_id, n_wh, n_ww, WS, sqb, sqd, sqh, sqw, skb, skd, skh, skw, DK, scale,
            DKP: tl.constexpr, NP: tl.constexpr, PREC: tl.constexpr):
    """scale * q^T k + the bias tile of one window, (NP, NP), padded key columns at -inf; and q, k."""
    q_offs, q_mask = _window_tile(q_ptr, window_id, n_wh, n_ww, WS, sqb, sqd, sqh, sqw, DK, DKP, NP)
    k_offs, k_mask = _window_tile(k_ptr, window_id, n_wh, n_ww, WS, skb, skd, skh, skw, DK, DKP, NP)
    q = tl.load(q_ptr + q_offs, mask=q_mask, other=0.0)
    k = tl.load(k_ptr + k_offs, mask=k_mask, other=0.0)
    n = tl.arange(0, NP)
    bias = tl.load(tile_ptr + n[:, None] * NP + n[None, :]).to(tl.float32)
    s = tl.dot(tl.trans(q), k, input_precision=PREC) * tl.cast(scale, tl.float32) + bias
    return s, q, k


@triton.jit
def _run_sums(values, first, last, NP: tl.constexpr):
    """For each offset, the sum of its run [first, last] (-1: none) of the (NP, NP) values, the token pairs
    sorted by offset in chunks of NP: whole chunks' totals plus prefix sums within the chunks at the
    run's ends (no running sum longer than a chunk, whose values' magnitudes bound the digits lost)."""
    within = tl.reshape(tl.cumsum(values, 1), (NP * NP,))
    chunk = tl.arange(0, NP)
    whole = (chunk[None, :] >= first[:, None] // NP) & (chunk[None, :] < last[:, None] // NP)
    sums = tl.sum(tl.where(whole, tl.sum(values, 1)[None, :], 0.0), 1) + tl.gather(within, tl.maximum(last, 0), 0)
    return sums - tl.where(first % NP > 0, tl.gather(within, tl.maximum(first - 1, 0), 0), 0.0)


@triton.jit(do_not_specialize=["n_wh", "n_ww", "WS", "DK", "DV"])
def window_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, tile_ptr, out_ptr, rows_ptr,
    n_wh, n_ww, WS, DK, DV, scale,
    sqb, sqd, sqh, sqw, skb, skd, skh, skw, svb, svd, svh, svw, sob, sod, soh, sow,
    DKP: tl.constexpr, DVP: tl.constexpr, NP: tl.constexpr, PREC: tl.constexpr,
):
    window_id = tl.program_id(0)
    s, _, _ = _scores(q_ptr, k_ptr, tile_ptr, window_id, n_wh, n_ww, WS, sqb, sqd, sqh, sqw, skb, skd, skh, skw,
                      DK, scale, DKP, NP, PREC)
    row_max = tl.max(s, axis=1)
    p = tl.exp(s - row_max[:, None])
    row_inv = 1.0 / tl.sum(p, axis=1)
    p = p * row_inv[:, None]
    v_offs, v_mask = _window_tile(v_ptr, window_id, n_wh, n_ww, WS, svb, svd, svh, svw, DV, DVP, NP)
    v = tl.load(v_ptr + v_offs, mask=v_mask, other=0.0)
    out = tl.dot(v, tl.trans(p).to(v.dtype), input_precision=PREC)  # (DVP, NP): out[:, i] = sum_j v_j p_ij
    o_offs, _ = _window_tile(out_ptr, window_id, n_wh, n_ww, WS, sob, sod, soh, sow, DV, DVP, NP)
    tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=v_mask)
    n = tl.arange(0, NP)
    tl.store(rows_ptr + window_id.to(tl.int64) * 2 * NP + n, row_max)
    tl.store(rows_ptr + window_id.to(tl.int64) * 2 * NP + NP + n, row_inv)


@triton.jit(do_not_specialize=["n_wh", "n_ww", "WS", "DK", "DV"])
def window_attention_bwd_kernel(
    q_ptr, k_ptr, v_ptr, tile_ptr, plan_ptr, rows_ptr, gout_ptr, gq_ptr, gk_ptr, gv_ptr, gbias_ptr,
    n_wh, n_ww, WS, DK, DV, scale,
    sqb, sqd, sqh, sqw, skb, skd, skh, skw, svb, svd, svh, svw, sgb, sgd, sgh, sgw,
    sdkb, sdkd, sdkh, sdkw, sdvb, sdvd, sdvh, sdvw,
    DKP: tl.constexpr, DVP: tl.constexpr, NP: tl.constexpr, OP: tl.constexpr, PREC: tl.constexpr,
):
    window_id = tl.program_id(0)
    s, q, k = _scores(q_ptr, k_ptr, tile_ptr, window_id, n_wh, n_ww, WS, sqb, sqd, sqh, sqw, skb, skd, skh, skw,
                      DK, scale, DKP, NP, PREC)
    n = tl.arange(0, NP)
    pair_ok = (n[:, None] < WS * WS) & (n[None, :] < WS * WS)
    row_max = tl.load(rows_ptr + window_id.to(tl.int64) * 2 * NP + n)
    row_inv = tl.load(rows_ptr + window_id.to(tl.int64) * 2 * NP + NP + n)
    p = tl.where(pair_ok, tl.exp(s - row_max[:, None]) * row_inv[:, None], 0.0)
    v_offs, v_mask = _window_tile(v_ptr, window_id, n_wh, n_ww, WS, svb, svd, svh, svw, DV, DVP, NP)
    v = tl.load(v_ptr + v_offs, mask=v_mask, other=0.0)
    g_offs, _ = _window_tile(gout_ptr, window_id, n_wh, n_ww, WS, sgb, sgd, sgh, sgw, DV, DVP, NP)
    g_out = tl.load(gout_ptr + g_offs, mask=v_mask, other=0.0)

    g_v = tl.dot(g_out, p.to(g_out.dtype), input_precision=PREC)               # (DVP, NP)
    gv_offs, _ = _window_tile(gv_ptr, window_id, n_wh, n_ww, WS, sdvb, sdvd, sdvh, sdvw, DV, DVP, NP)
    tl.store(gv_ptr + gv_offs, g_v.to(gv_ptr.dtype.element_ty), mask=v_mask)
    g_p = tl.dot(tl.trans(g_out), v, input_precision=PREC)                     # (NP, NP)
    g_s = p * (g_p - tl.sum(p * g_p, axis=1)[:, None])                         # softmax backward
    scale32 = tl.cast(scale, tl.float32)
    g_q = tl.dot(k, tl.trans(g_s).to(k.dtype), input_precision=PREC) * scale32  # (DKP, NP)
    g_k = tl.dot(q, g_s.to(q.dtype), input_precision=PREC) * scale32            # (DKP, NP)
    gqk_offs, gqk_mask = _window_tile(gq_ptr, window_id, n_wh, n_ww, WS, sdkb, sdkd, sdkh, sdkw, DK, DKP, NP)
    tl.store(gq_ptr + gqk_offs, g_q.to(gq_ptr.dtype.element_ty), mask=gqk_mask)
    tl.store(gk_ptr + gqk_offs, g_k.to(gk_ptr.dtype.element_ty), mask=gqk_mask)

    # this window's bias gradient: the score gradients summed per table entry, in the plan's order
    g_sorted = tl.reshape(tl.gather(tl.reshape(g_s, (NP * NP,)), tl.load(plan_ptr + tl.arange(0, NP * NP)), 0),
                          (NP, NP))
    o = tl.arange(0, OP)
    first = tl.load(plan_ptr + NP * NP + o)
    last = tl.load(plan_ptr + NP * NP + OP + o)
    # the finite values' sums, and counts of NaN, +Inf and -Inf: an offset's total is non-finite as
    # eager's is, and a non-finite value never reaches another offset through the prefix sums
    is_finite = (g_sorted == g_sorted) & (tl.abs(g_sorted) != float("inf"))
    finite = _run_sums(tl.where(is_finite, g_sorted, 0.0), first, last, NP)
    nans = _run_sums((g_sorted != g_sorted).to(tl.float32), first, last, NP)
    above = _run_sums((g_sorted == float("inf")).to(tl.float32), first, last, NP)
    below = _run_sums((g_sorted == float("-inf")).to(tl.float32), first, last, NP)
    g_entry = tl.where(above > 0, float("inf"), tl.where(below > 0, float("-inf"), finite))
    g_entry = tl.where((nans > 0) | ((above > 0) & (below > 0)), float("nan"), g_entry)
    tl.store(gbias_ptr + window_id.to(tl.int64) * OP + o, tl.where(last >= 0, g_entry, 0.0))


def launch_config(backward: bool, dv_padded: int) -> LaunchConfig:
    """The shipped configuration of a pass for value heads whose padded width is ``dv_padded``."""
    if not backward:
        return SHIPPED_CONFIGS["forward"]
    return SHIPPED_CONFIGS["backward narrow" if dv_padded <= 64 else "backward wide"]


def _launch_options(q: torch.Tensor, v: torch.Tensor, window: int, backward: bool) -> dict:
    """An attention launch's constexprs and warps: the padded head widths and window tokens, the precision."""
    dv_padded = padded(v.shape[1])
    return dict(launch_config(backward, dv_padded).options(), DKP=padded(q.shape[1]), DVP=dv_padded,
                NP=padded(window * window), PREC=dot_precision(q.dtype))


def _table_padded(table: torch.Tensor) -> int:
    """The plan's offsets: the table's entries and the sentinel past them, to a power of two."""
    return padded(table.shape[-1] + 1)


def window_bias_tiles(table, bias_idx, window: int, dtype: torch.dtype):
    """Launch the bias kernel over the rows of ``table`` (one row, (OFFSETS,), or (rows, OFFSETS)): the
    dense bias tiles, (NP, NP) or (rows, NP, NP), in ``dtype`` (the features': the references cast the
    bias to it)."""
    tokens = padded(window * window)
    rows = table.shape[0] if table.dim() == 2 else 1
    tiles = alloc.empty((*table.shape[:-1], tokens, tokens), dtype=dtype, device=table.device)
    with alloc.on_device(table):
        window_bias_kernel[(rows,)](table.float().contiguous(), bias_idx.contiguous(), tiles, window, table.shape[-1],
                                    NP=tokens)
    return tiles


# The backward's plans, by offset index: (the index itself, held so that its memory is not reused, its
# version, the plan); a module passes the same index buffer every step.
_PLANS: OrderedDict[tuple, tuple[torch.Tensor, int, torch.Tensor]] = OrderedDict()
_PLANS_KEPT = 32


def bias_gradient_plan(bias_idx: torch.Tensor, window: int, offsets: int) -> torch.Tensor:
    """The backward's plan for an offset index (int32, on its device): the NP * NP token pairs (i * NP + j)
    sorted by offset (stable; the padding and offsets outside the table last), then for each of the
    padded table's offsets the positions of its first and of its last pair among them (-1: none). A few
    small PyTorch ops; cached per index tensor and version."""
    key = (bias_idx.data_ptr(), bias_idx.device, bias_idx.dtype, window, offsets)
    cached = _PLANS.get(key)
    if cached is not None and cached[0] is bias_idx and cached[1] == bias_idx._version:
        _PLANS.move_to_end(key)
        return cached[2]
    tokens = window * window
    keys = torch.full((padded(tokens), padded(tokens)), offsets, dtype=torch.int64, device=bias_idx.device)
    idx = bias_idx.to(torch.int64)
    keys[:tokens, :tokens] = torch.where((idx >= 0) & (idx < offsets), idx, offsets)
    sorted_keys, order = torch.sort(keys.flatten(), stable=True)
    table = torch.arange(padded(offsets + 1), device=bias_idx.device)
    first = torch.searchsorted(sorted_keys, table)
    last = torch.searchsorted(sorted_keys, table, right=True) - 1
    present = last >= first
    plan = torch.cat([order, torch.where(present, first, -1), torch.where(present, last, -1)])
    plan = plan.to(torch.int32)
    _PLANS[key] = (bias_idx, bias_idx._version, plan)
    if len(_PLANS) > _PLANS_KEPT:
        _PLANS.popitem(last=False)
    return plan


def window_attention_forward(q, k, v, bias, bias_idx, window: int, scale: float):
    """Launch the forward kernels; returns the output, the score rows' maxima and reciprocal sums, and
    the bias tile (for the backward)."""
    batch, _, height, width = q.shape
    n_wh, n_ww = height // window, width // window
    windows = batch * n_wh * n_ww
    config = _launch_options(q, v, window, backward=False)
    tile = window_bias_tiles(bias, bias_idx, window, q.dtype)
    out = alloc.empty((batch, v.shape[1], height, width), dtype=v.dtype, device=v.device)
    rows = alloc.empty((windows, 2, config["NP"]), dtype=torch.float32, device=q.device)
    with alloc.on_device(q):
        window_attention_fwd_kernel[(windows,)](
            q, k, v, tile, out, rows, n_wh, n_ww, window, q.shape[1], v.shape[1], scale,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), **config,
        )
    return out, rows, tile


def window_attention_backward(grad_out, q, k, v, bias, bias_idx, tile, rows, window: int, scale: float):
    """Launch the backward kernel; returns the gradients of q, k, v and the bias row."""
    plan = bias_gradient_plan(bias_idx, window, bias.shape[0])
    batch, _, height, width = q.shape
    n_wh, n_ww = height // window, width // window
    windows = batch * n_wh * n_ww
    g_q, g_k = (alloc.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(2))
    g_v = alloc.empty(v.shape, dtype=v.dtype, device=v.device)
    table = _table_padded(bias)
    g_bias_per_window = alloc.empty((windows, table), dtype=torch.float32, device=q.device)
    with alloc.on_device(q):
        window_attention_bwd_kernel[(windows,)](
            q, k, v, tile, plan, rows, grad_out, g_q, g_k, g_v, g_bias_per_window,
            n_wh, n_ww, window, q.shape[1], v.shape[1], scale,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *g_q.stride(), *g_v.stride(),
            OP=table, **_launch_options(q, v, window, backward=True),
        )
    return g_q, g_k, g_v, g_bias_per_window.sum(dim=0)[:bias.shape[0]].to(bias.dtype)


def builds(all_configs: bool = False) -> list:
    """The kernels x dtype for GPU targets without a GPU: the attention kernels for 7x7 windows and value
    heads 64 and 128 wide (M5's stage 1, stages 2-3) in their shipped configurations, the bias kernel for
    7x7 windows and timm's 49-entry table (``all_configs`` adds none)."""
    pointers = dict(feature_pointers={"q_ptr", "k_ptr", "v_ptr", "out_ptr", "gout_ptr", "gq_ptr", "gk_ptr", "gv_ptr",
                                      "tile_ptr"},
                    index_pointers={"idx_ptr", "plan_ptr"})
    builds = [kernel_build(window_bias_kernel, "7x7 windows, 49 offsets", dtype, LaunchConfig("bias", 4), dict(NP=64),
                           sizes=("WS", "OFFSETS"), **pointers) for dtype in BUILD_DTYPES]
    for kernel, backward in ((window_attention_fwd_kernel, False), (window_attention_bwd_kernel, True)):
        builds += [kernel_build(kernel, f"7x7 windows, Dv {width}", dtype, launch_config(backward, width),
                                dict(DKP=16, DVP=width, NP=64, OP=64), sizes=("n_wh", "n_ww", "WS", "DK", "DV"),
                                **pointers)
                   for width in (64, 128) for dtype in BUILD_DTYPES]
    return builds


def launch_passes(q, k, v, bias, bias_idx, window, scale, grad_like=torch.empty_like) -> dict:
    """The fused forward and backward as calls of the launchers, in order (the backward takes the
    forward's outputs and the gradient ``grad_like(out)``), for the cost report (bench/cost.py), which
    records their launches. The backward's plan is made here, outside them: it is made once per offset
    index, not per call."""
    bias_gradient_plan(bias_idx, window, bias.shape[0])
    saved = []

    def forward():
        saved[:] = window_attention_forward(q, k, v, bias, bias_idx, window, scale)

    def backward():
        out, rows, tile = saved
        window_attention_backward(grad_like(out), q, k, v, bias, bias_idx, tile, rows, window, scale)

    return {"forward": forward, "backward": backward}


# torch.library registration: torch.compile traces through these ops without graph breaks.

@torch.library.custom_op("mxa::window_attention_fwd", mutates_args=())
def window_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                         bias_idx: torch.Tensor, window: int, scale: float
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return window_attention_forward(q, k, v, bias, bias_idx, window, scale)


@window_attention_fwd.register_fake
def _(q, k, v, bias, bias_idx, window, scale):
    batch, _, height, width = q.shape
    windows = batch * (height // window) * (width // window)
    tokens = padded(window * window)
    return (v.new_empty((batch, v.shape[1], height, width)),
            q.new_empty((windows, 2, tokens), dtype=torch.float32), q.new_empty((tokens, tokens)))


@torch.library.custom_op("mxa::window_attention_bwd", mutates_args=())
def window_attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         bias: torch.Tensor, bias_idx: torch.Tensor, tile: torch.Tensor, rows: torch.Tensor,
                         window: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return window_attention_backward(grad_out, q, k, v, bias, bias_idx, tile, rows, window, scale)


@window_attention_bwd.register_fake
def _(grad_out, q, k, v, bias, bias_idx, tile, rows, window, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), torch.empty_like(bias)


def _setup_context(ctx, inputs, output):
    q, k, v, bias, bias_idx, window, scale = inputs
    _, rows, tile = output
    ctx.mark_non_differentiable(rows, tile)
    ctx.set_materialize_grads(False)  # no zero gradients made for the outputs saved for the backward
    ctx.save_for_backward(q, k, v, bias, bias_idx, tile, rows)
    ctx.window, ctx.scale = window, scale


def _backward(ctx, grad_out, _grad_rows, _grad_tile):
    q, k, v, bias, bias_idx, tile, rows = ctx.saved_tensors
    g_q, g_k, g_v, g_bias = torch.ops.mxa.window_attention_bwd(grad_out, q, k, v, bias, bias_idx, tile, rows,
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
    if bias.shape[0] >= MAX_BIAS_TABLE:
        return (f"the fused windowed attention serves bias tables of fewer than {MAX_BIAS_TABLE} entries, got "
                f"{bias.shape[0]}")
    return kernel_dtype_reason(q, "the fused windowed attention")


register_triton_op("window_attention", window_attention_triton, unsupported_reason)
