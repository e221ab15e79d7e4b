"""Eager PyTorch reference of EfficientViT's whole windowed cascaded group attention at inference,
with every BatchNorm folded into the convolution before it (timm's ``LocalWindowAttention`` in eval
mode, see ``FusedLocalWindowAttention.folded_parameters``).

The map is zero-padded to whole windows (padded tokens are real tokens: their projections are the
folded biases, as in timm) and cut into ``window x window`` tiles. In each tile, head ``h`` takes
``feat = chunk_h(x) + out_{h-1}`` (the cascade; ``out_{-1} = 0``), projects it to q, k, v with a 1x1
convolution, filters q with a depthwise convolution zero-padded at the tile's border, and attends
with the relative-position bias. The heads' outputs go through a ReLU and a 1x1 projection.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..window_attention.reference import merge_windows, partition_windows


def cascaded_attention_infer_ref(x: torch.Tensor, qkv_weight: torch.Tensor, qkv_bias: torch.Tensor,
                                 dw_weight: torch.Tensor, dw_bias: torch.Tensor, attention_biases: torch.Tensor,
                                 bias_idx: torch.Tensor, proj_weight: torch.Tensor, proj_bias: torch.Tensor,
                                 window: int, scale: float, kernel_sizes: Sequence[int] | None = None) -> torch.Tensor:
    """Windowed cascaded group attention with folded BatchNorms.

    Args:
        x: (B, C, H, W) features, any H and W.
        qkv_weight: (heads, 2 Dk + Dv, C / heads) and qkv_bias: (heads, 2 Dk + Dv), each head's q, k, v projection.
        dw_weight: (heads, Dk, K, K) and dw_bias: (heads, Dk), the depthwise convolution on q (K odd).
        attention_biases: (heads, num_offsets) bias table; bias_idx: (N, N) offset index, N = window * window.
        proj_weight: (C, heads * Dv) and proj_bias: (C,), the output projection after the ReLU.
        window: window side; scale: multiplies q . k.
        kernel_sizes: each head's depthwise kernel size, odd, at most K: the head uses the centre of its
            (K, K) weights (None: all of them).
    Returns:
        (B, C, H, W).
    """
    batch, _, height, width = x.shape
    heads, key_dim, kernel = dw_weight.shape[0], dw_weight.shape[1], dw_weight.shape[-1]
    qkv_weight, qkv_bias, dw_weight, dw_bias, proj_weight, proj_bias = (
        t.to(x.dtype) for t in (qkv_weight, qkv_bias, dw_weight, dw_bias, proj_weight, proj_bias))
    pad_b, pad_r = -height % window, -width % window
    tiles = partition_windows(F.pad(x, (0, pad_r, 0, pad_b)), window)  # (B * windows, C, N)
    bias = attention_biases[:, bias_idx].to(x.dtype)  # (heads, N, N)
    feats_in = tiles.chunk(heads, dim=1)
    feat, feats_out = feats_in[0], []
    for head in range(heads):
        if head > 0:
            feat = feat + feats_in[head]
        q, k, v = (qkv_weight[head] @ feat + qkv_bias[head][:, None]).split(
            [key_dim, key_dim, qkv_weight.shape[1] - 2 * key_dim], dim=1)
        size = kernel if kernel_sizes is None else kernel_sizes[head]
        crop = slice((kernel - size) // 2, (kernel + size) // 2)
        q = F.conv2d(q.unflatten(2, (window, window)), dw_weight[head, :, crop, crop].unsqueeze(1), dw_bias[head],
                     padding=size // 2, groups=key_dim).flatten(2)
        attn = (q.transpose(1, 2) @ k * scale + bias[head]).softmax(dim=-1)
        feat = v @ attn.transpose(1, 2)
        feats_out.append(feat)
    out = proj_weight @ torch.relu(torch.cat(feats_out, dim=1)) + proj_bias[:, None]
    out = merge_windows(out, batch, height + pad_b, width + pad_r, window)
    return out[:, :, :height, :width] if (pad_b or pad_r) else out
