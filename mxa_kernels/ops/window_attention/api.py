"""The public windowed-attention op: its argument checks and the backend dispatch."""

from __future__ import annotations

import torch

from ...backend import dispatch
from ...checks import (check_bias_index, check_devices, check_float, check_rank, check_scale, check_tensor,
                       check_window)
from .reference import window_attention_ref

OP = "window_attention"


def check_window_attention_args(q, k, v, bias, bias_idx, window, scale) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(OP, name, t)
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[0::2] != q.shape[0::2] or v.shape[3] != q.shape[3]:
        raise ValueError(f"{OP} expects q and k of one shape (B, Dk, H, W) and v of shape (B, Dv, H, W), "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[0] == 0:
        raise ValueError(f"{OP} got an empty batch (B = 0) in q, k and v")
    if 0 in (*q.shape[1:], v.shape[1]):
        raise ValueError(f"{OP}: q, k and v have no channels or an empty map, shapes {tuple(q.shape)} "
                         f"and {tuple(v.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(OP, name, t)
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"{OP}: q, k and v must have one dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    check_window(OP, window)
    if q.shape[2] % window or q.shape[3] % window:
        raise ValueError(f"{OP}: the maps ({q.shape[2]}x{q.shape[3]}) must be cut into whole {window}x{window} "
                         f"windows (window = {window}); pad them first")
    check_scale(OP, scale)
    check_tensor(OP, "bias", bias)
    check_tensor(OP, "bias_idx", bias_idx)
    check_rank(OP, "bias", bias, 1, "(num_offsets,)")
    check_float(OP, "bias", bias)
    check_devices(OP, "q", q, {"k": k, "v": v, "bias": bias, "bias_idx": bias_idx})
    check_bias_index(OP, bias_idx, window, bias.shape[0], "the bias table")


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, bias_idx: torch.Tensor,
                     window: int, scale: float, backend: str | None = None) -> torch.Tensor:
    """One head of windowed attention with a relative-position bias (see :func:`window_attention_ref` for
    the arguments), served by the backend that ``backend`` (or the global selection) resolves to.

    q, k and v: one floating dtype, any strides (channel slices of one projection need no copy); bias:
    a floating (num_offsets,) table (a float32 table with half-precision maps is cast); bias_idx: an
    integer (N, N) index into it.
    Non-finite values are not checked (that would cost a pass over the data and, on a GPU, a host
    synchronization): NaN and Inf in the inputs propagate to the output as in the eager reference.
    bias_idx's range is checked for CPU tensors only; on a GPU the fused kernel gives NaN scores
    for an offset outside the table (never reading past it).
    """
    check_window_attention_args(q, k, v, bias, bias_idx, window, scale)
    args = (q, k, v, bias, bias_idx, window, scale)
    return dispatch(OP, backend, window_attention_ref, args)(*args)
