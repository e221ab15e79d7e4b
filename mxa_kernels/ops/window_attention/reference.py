"""Eager PyTorch reference of one head of EfficientViT's windowed attention with a learned
relative-position bias (the core of timm's ``CascadedGroupAttention`` inside ``LocalWindowAttention``).

The maps are cut into ``window x window`` tiles; inside each tile every token i attends to every
token j with ``softmax_j(scale * q_i . k_j + bias[bias_idx[i, j]])`` and the output is
``sum_j p_ij v_j``, written back at token i's position. The maps' sides must be multiples of the
window (a module pads its input first, as timm does, so that padded tokens are real tokens).
Kept inside TorchScript's subset: a scripted model runs it.
"""

from __future__ import annotations

import torch


def partition_windows(t: torch.Tensor, window: int) -> torch.Tensor:
    """(B, D, H, W) -> (B * windows, D, window * window), windows in row-major order."""
    batch, depth, height, width = t.shape
    t = t.reshape(batch, depth, height // window, window, width // window, window)
    return t.permute(0, 2, 4, 1, 3, 5).reshape(-1, depth, window * window)


def merge_windows(t: torch.Tensor, batch: int, height: int, width: int, window: int) -> torch.Tensor:
    """The inverse of :func:`partition_windows`: (B * windows, D, window * window) -> (B, D, H, W)."""
    t = t.reshape(batch, height // window, width // window, -1, window, window)
    return t.permute(0, 3, 1, 4, 2, 5).reshape(batch, -1, height, width)


def window_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                         bias_idx: torch.Tensor, window: int, scale: float) -> torch.Tensor:
    """Windowed attention of one head.

    Args:
        q, k: (B, Dk, H, W) queries and keys; v: (B, Dv, H, W) values; H and W multiples of ``window``.
        bias: (num_offsets,) this head's row of the bias table.
        bias_idx: (N, N) int64 offset index of each token pair, N = window * window.
        window: window side; scale: multiplies q . k.
    Returns:
        (B, Dv, H, W).
    """
    batch, _, height, width = q.shape
    # a float32 bias table with half-precision maps (mixed precision) is cast to the maps' dtype
    q_tiles, k_tiles, v_tiles = (partition_windows(t, window) for t in (q, k, v))
    scores = q_tiles.transpose(1, 2) @ k_tiles * scale + bias[bias_idx].to(q.dtype)
    out = v_tiles @ scores.softmax(dim=-1).transpose(1, 2)
    return merge_windows(out, batch, height, width, window)
