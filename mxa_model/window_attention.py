"""timm's LocalWindowAttention, with its attention core served by the fused windowed-attention op."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.efficientvit_msra import LocalWindowAttention

import mxa_kernels


def _per_window(conv: torch.nn.Module, t: torch.Tensor, window: int) -> torch.Tensor:
    """Apply ``conv`` to each window of ``t`` on its own (zero padding at window borders), as timm's
    windowed attention applies its query convolution."""
    batch, depth, height, width = t.shape
    if height == window and width == window:
        return conv(t)
    n_h, n_w = height // window, width // window
    tiles = t.reshape(batch, depth, n_h, window, n_w, window).permute(0, 2, 4, 1, 3, 5)
    out = conv(tiles.reshape(batch * n_h * n_w, depth, window, window))
    out = out.reshape(batch, n_h, n_w, -1, window, window).permute(0, 3, 1, 4, 2, 5)
    return out.reshape(batch, -1, height, width)


class FusedLocalWindowAttention(LocalWindowAttention):
    """timm's ``LocalWindowAttention`` (same parameters, buffers and results) whose per-head attention
    runs as :func:`mxa_kernels.window_attention` when the kernel backend resolves to Triton.

    With the Triton backend the cascade works on the whole (padded) map instead of on window copies:
    the 1x1 projections and their BatchNorms are pointwise, so they see the same values; the query's
    depthwise convolution still runs per window; the attention op reads q, k and v in place. With the
    eager backend the forward is timm's own.
    """

    backend: str | None = None  # None: follow the global selection (mxa_kernels.set_backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.attn
        window = attn.resolution
        if mxa_kernels.resolve_backend("window_attention", self.backend, x.device) == "eager":
            return super().forward(x)
        # what the op will be asked (dtype, device, head sizes, window), to pick the path up front
        like_q, like_v = x.new_empty(1, attn.key_dim, 1, 1), x.new_empty(1, attn.val_dim, 1, 1)
        probe = (like_q, like_q, like_v, attn.attention_biases[0], attn.attention_bias_idxs, window, attn.scale)
        if mxa_kernels.resolve_backend("window_attention", self.backend, x.device, probe) == "eager":
            return super().forward(x)
        _, _, height, width = x.shape
        pad_b, pad_r = -height % window, -width % window
        if pad_b or pad_r:
            x = F.pad(x, (0, pad_r, 0, pad_b))
        feats_in = x.chunk(len(attn.qkvs), dim=1)
        feats_out = []
        feat = feats_in[0]
        for head, (qkv, dws) in enumerate(zip(attn.qkvs, attn.dws)):
            if head > 0:
                feat = feat + feats_in[head]
            q, k, v = qkv(feat).split([attn.key_dim, attn.key_dim, attn.val_dim], dim=1)
            q = _per_window(dws, q, window)
            feat = mxa_kernels.window_attention(q, k, v, attn.attention_biases[head], attn.attention_bias_idxs,
                                                window, attn.scale, backend="triton")
            feats_out.append(feat)
        out = attn.proj(torch.cat(feats_out, dim=1))
        return out[:, :, :height, :width].contiguous() if (pad_b or pad_r) else out
