"""timm's LocalWindowAttention (windowed cascaded group attention) served by the fused ops: the whole block by
``cascaded_attention_infer`` at inference, each head's attention by ``window_attention`` otherwise."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from timm.models.efficientvit_msra import LocalWindowAttention

import mxa_kernels


def _per_window(t: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], padding: int,
                window: int) -> torch.Tensor:
    """The depthwise convolution of timm's query ``ConvNorm`` (``weight``, ``bias``, ``padding``) applied
    to each window of ``t`` on its own (zero padding at window borders), as timm's windowed attention
    applies it, without copying windows out and back: the map seen as (B, C * rows of windows, window,
    columns of windows, window) is a view (of an NCHW map), and a depthwise 3-D convolution with a
    (k, 1, k) kernel keeps the windows of a row apart (its middle axis) and those of a column too
    (their channels)."""
    batch, depth, height, width = t.shape
    if height == window and width == window:
        return F.conv2d(t, weight, bias, padding=padding, groups=depth)
    n_h, n_w = height // window, width // window
    weight = weight.repeat_interleave(n_h, dim=0).unsqueeze(3)  # (C * n_h, 1, k, 1, k)
    if bias is not None:
        bias = bias.repeat_interleave(n_h)
    out = F.conv3d(t.reshape(batch, depth * n_h, window, n_w, window), weight, bias, padding=[padding, 0, padding],
                   groups=depth * n_h)
    return out.view(batch, depth, height, width)


def _fold(conv_norm: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias of timm's ``ConvNorm`` (a convolution, then BatchNorm) as one convolution,
    with the BatchNorm's running statistics (eval mode)."""
    bn = conv_norm.bn
    gain = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    return conv_norm.conv.weight * gain[:, None, None, None], bn.bias - bn.running_mean * gain


@register_notrace_module  # as timm registers LocalWindowAttention: FX cannot trace the dispatch or the padding
class FusedLocalWindowAttention(LocalWindowAttention):
    """timm's ``LocalWindowAttention`` (same parameters, buffers and results) served by the fused
    kernels when the kernel backend resolves to Triton.

    - Inference (eval mode, gradients off: ``torch.no_grad()`` or ``torch.inference_mode()``): the
      whole block is :func:`mxa_kernels.cascaded_attention_infer` (two launches and a GEMM), with the BatchNorms
      folded into the convolutions (see :meth:`folded_parameters`).
    - Otherwise (training, or gradients wanted in eval mode): the cascade works on the whole (padded)
      map instead of on window copies: the 1x1 projections and their BatchNorms are pointwise, so they
      see the same values; the query's depthwise convolution runs per window through a view of the
      map (no copy); each head's attention is :func:`mxa_kernels.window_attention`, which reads q, k
      and v in place.

    With the eager backend the forward is timm's own. Under TorchScript (which cannot call the Python
    dispatch or timm's forward through ``super()``) it is the whole-map cascade above with the eager
    reference of :func:`mxa_kernels.window_attention`.
    """

    backend: Optional[str] = None  # None: follow the global selection (mxa_kernels.set_backend)
    # used only on the Python paths (the backend, the Triton inference path's cache): TorchScript skips them
    __jit_ignored_attributes__ = ["backend", "_folded", "_folded_key"]
    _folded: Optional[tuple[torch.Tensor, ...]] = None
    _folded_key: Optional[tuple] = None

    def folded_parameters(self, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """The block in eval mode as the arguments of :func:`mxa_kernels.cascaded_attention_infer` after
        ``x``: q/k/v projections, query depthwise convolutions (zero-padded to the largest kernel:
        :attr:`query_kernel_sizes` gives each head's), bias table and index, output projection, with
        the BatchNorms folded in; the two projection weights and the output projection's bias in
        ``dtype``. Cached until a parameter or BatchNorm statistic changes (PyTorch's version counters
        track in-place updates, but not writes through ``.data``)."""
        tensors = (*self.parameters(), *self.buffers())
        compiling = torch.compiler.is_compiling()
        key = None if compiling else (dtype, *((t.data_ptr(), t._version) for t in tensors))
        if key is not None and key == self._folded_key:
            return self._folded
        attn = self.attn
        with torch.no_grad():
            qkv_weight, qkv_bias = zip(*(_fold(qkv) for qkv in attn.qkvs))
            dws = [_fold(dw) for dw in attn.dws]
            kernel = max(w.shape[-1] for w, _ in dws)
            dw_weight = torch.stack([F.pad(w[:, 0], ((kernel - w.shape[-1]) // 2,) * 4) for w, _ in dws])
            proj_weight, proj_bias = _fold(attn.proj[1])
            folded = (torch.stack(qkv_weight)[..., 0, 0].to(dtype), torch.stack(qkv_bias), dw_weight,
                      torch.stack([b for _, b in dws]), attn.attention_biases.detach(),
                      attn.attention_bias_idxs.to(torch.int32),  # the kernel's index type: no copy per call
                      proj_weight[..., 0, 0].to(dtype), proj_bias.to(dtype))
        if key is not None:
            self._folded, self._folded_key = folded, key
        return folded

    @property
    def query_kernel_sizes(self) -> list[int]:
        """Each head's depthwise kernel size on its query (``kernel_sizes`` of
        :func:`mxa_kernels.cascaded_attention_infer`; :meth:`folded_parameters` pads them to the largest)."""
        return [dw.conv.kernel_size[0] for dw in self.attn.dws]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.attn
        window = attn.resolution
        if not torch.jit.is_scripting():  # TorchScript runs the cascade below with the eager reference
            if mxa_kernels.resolve_backend("window_attention", self.backend, x.device) == "eager":
                return super().forward(x)
            if not self.training and not torch.is_grad_enabled():
                args = (x, *self.folded_parameters(x.dtype), window, attn.scale, self.query_kernel_sizes)
                if mxa_kernels.triton_unavailable_reason("cascaded_attention_infer", x.device, args) is None:
                    return mxa_kernels.cascaded_attention_infer(*args, backend="triton")
            # what the op will be asked (dtype, device, head sizes, window), to pick the path up front
            like_q, like_v = x.new_empty(1, attn.key_dim, 1, 1), x.new_empty(1, attn.val_dim, 1, 1)
            probe = (like_q, like_q, like_v, attn.attention_biases[0], attn.attention_bias_idxs, window, attn.scale)
            if mxa_kernels.resolve_backend("window_attention", self.backend, x.device, probe) == "eager":
                return super().forward(x)
        height, width = x.shape[2], x.shape[3]
        pad_b, pad_r = -height % window, -width % window
        if pad_b or pad_r:
            x = F.pad(x, [0, pad_r, 0, pad_b])
        feats_in = x.chunk(len(attn.qkvs), dim=1)
        feats_out = []
        feat = feats_in[0]
        head = 0
        for qkv, dws in zip(attn.qkvs, attn.dws):
            if head > 0:
                feat = feat + feats_in[head]
            q, k, v = qkv(feat).split([attn.key_dim, attn.key_dim, attn.val_dim], dim=1)
            q = dws.bn(_per_window(q, dws.conv.weight, dws.conv.bias, dws.conv.padding[0], window))
            if torch.jit.is_scripting():
                feat = mxa_kernels.window_attention_ref(q, k, v, attn.attention_biases[head], attn.attention_bias_idxs,
                                                        window, attn.scale)
            else:
                feat = mxa_kernels.window_attention(q, k, v, attn.attention_biases[head], attn.attention_bias_idxs,
                                                    window, attn.scale, backend="triton")
            feats_out.append(feat)
            head += 1
        out = attn.proj(torch.cat(feats_out, dim=1))
        return out[:, :, :height, :width].contiguous() if (pad_b or pad_r) else out
