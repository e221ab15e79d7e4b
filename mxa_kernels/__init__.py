"""Fused kernels of the MXA block and the switch between them and their eager references."""

from __future__ import annotations

import torch

from .backend import (
    BACKENDS,
    BackendStatus,
    BackendUnavailableError,
    available_backends,
    check_backend_name,
    get_backend,
    resolve_backend,
    set_backend,
    triton_unavailable_reason,
    use_backend,
)
from .cascaded_attention_ref import cascaded_attention_infer_ref
from .mxa_branch_ref import ROI_MODES, channel_spatial_attention, crop_resize_loop, mxa_branch_ref, roi_resample, snap_boxes
from .window_attention_ref import window_attention_ref
from . import backend as _backend

if _backend.triton_import_error() is None:
    # register the fused ops with torch.library and the backend switch
    from . import cascaded_attention_triton, mxa_branch_triton, window_attention_triton  # noqa: F401

__all__ = [
    "BACKENDS", "BackendStatus", "BackendUnavailableError", "ROI_MODES", "available_backends",
    "cascaded_attention_infer", "cascaded_attention_infer_ref", "channel_spatial_attention", "check_backend_name", "crop_resize_loop", "get_backend",
    "mxa_branch", "mxa_branch_ref", "resolve_backend", "roi_resample", "set_backend", "snap_boxes",
    "triton_unavailable_reason", "use_backend", "window_attention", "window_attention_ref",
]


def _check_mxa_branch_args(x, boxes, ca_reduce_weight, ca_expand_weight, sa_weight, roi_mode) -> None:
    if roi_mode not in ROI_MODES:
        raise ValueError(f"unknown roi_mode {roi_mode!r}; expected one of {', '.join(ROI_MODES)}")
    if x.dim() != 4:
        raise ValueError(f"mxa_branch expects features of shape (B, C, H, W), got shape {tuple(x.shape)}")
    batch, channels = x.shape[:2]
    if batch == 0:
        raise ValueError("mxa_branch got an empty batch (B = 0)")
    if not x.is_floating_point():
        raise TypeError(f"mxa_branch expects floating-point features, got {x.dtype}")
    if boxes.shape != (batch, 4):
        raise ValueError(f"boxes must have shape ({batch}, 4) for a batch of {batch}, got {tuple(boxes.shape)}")
    hidden = ca_reduce_weight.shape[0]
    expected = {
        "ca_reduce_weight": (ca_reduce_weight, (hidden, channels, 1, 1)),
        "ca_expand_weight": (ca_expand_weight, (channels, hidden, 1, 1)),
        "sa_weight": (sa_weight, (1, 2, 7, 7)),
    }
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} for {channels} channels, got {tuple(tensor.shape)}")
    for name, tensor in (("boxes", boxes), *((n, t) for n, (t, _) in expected.items())):
        if tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device} but the features are on {x.device}")


def mxa_branch(
    x: torch.Tensor,
    boxes: torch.Tensor,
    ca_reduce_weight: torch.Tensor,
    ca_expand_weight: torch.Tensor,
    sa_weight: torch.Tensor,
    roi_mode: str = "crop",
    backend: str | None = None,
) -> torch.Tensor:
    """The MXA branch after the ROI predictor (see :func:`mxa_branch_ref` for the arguments), served by
    the backend that ``backend`` (or the global selection, see :mod:`mxa_kernels.backend`) resolves to."""
    _check_mxa_branch_args(x, boxes, ca_reduce_weight, ca_expand_weight, sa_weight, roi_mode)
    args = (x, boxes, ca_reduce_weight, ca_expand_weight, sa_weight, roi_mode)
    return _backend.dispatch("mxa_branch", backend, mxa_branch_ref, args)(*args)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, bias_idx: torch.Tensor,
                     window: int, scale: float, backend: str | None = None) -> torch.Tensor:
    """One head of windowed attention with a relative-position bias (see :func:`window_attention_ref` for
    the arguments), served by the backend that ``backend`` (or the global selection) resolves to."""
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[0::2] != q.shape[0::2] or v.shape[3] != q.shape[3]:
        raise ValueError(f"window_attention expects q and k of one shape (B, Dk, H, W) and v of shape (B, Dv, H, W), "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[0] == 0:
        raise ValueError("window_attention got an empty batch (B = 0)")
    if window < 1 or q.shape[2] % window or q.shape[3] % window:
        raise ValueError(f"the maps ({q.shape[2]}x{q.shape[3]}) must be cut into whole {window}x{window} windows; "
                         "pad them first")
    if bias_idx.shape != (window * window, window * window):
        raise ValueError(f"bias_idx must have shape {(window * window,) * 2}, got {tuple(bias_idx.shape)}")
    args = (q, k, v, bias, bias_idx, window, scale)
    return _backend.dispatch("window_attention", backend, window_attention_ref, args)(*args)


def cascaded_attention_infer(x: torch.Tensor, qkv_weight: torch.Tensor, qkv_bias: torch.Tensor, dw_weight: torch.Tensor,
                             dw_bias: torch.Tensor, attention_biases: torch.Tensor, bias_idx: torch.Tensor,
                             proj_weight: torch.Tensor, proj_bias: torch.Tensor, window: int, scale: float,
                             backend: str | None = None) -> torch.Tensor:
    """EfficientViT's whole windowed cascaded group attention at inference, BatchNorms folded (see
    :func:`cascaded_attention_infer_ref` for the arguments), served by the backend that ``backend`` (or
    the global selection) resolves to. Inference only: the fused kernel has no backward."""
    if x.dim() != 4:
        raise ValueError(f"cascaded_attention_infer expects features of shape (B, C, H, W), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("cascaded_attention_infer got an empty batch (B = 0)")
    heads, qkv_out, group = qkv_weight.shape
    key_dim, kernel = dw_weight.shape[1], dw_weight.shape[-1]
    val_dim = qkv_out - 2 * key_dim
    expected = {
        "qkv_weight": (qkv_weight, (heads, qkv_out, x.shape[1] // heads)),
        "qkv_bias": (qkv_bias, (heads, qkv_out)),
        "dw_weight": (dw_weight, (heads, key_dim, kernel, kernel)),
        "dw_bias": (dw_bias, (heads, key_dim)),
        "attention_biases": (attention_biases, (heads, attention_biases.shape[-1])),
        "bias_idx": (bias_idx, (window * window, window * window)),
        "proj_weight": (proj_weight, (x.shape[1], heads * val_dim)),
        "proj_bias": (proj_bias, (x.shape[1],)),
    }
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} for {x.shape[1]} channels and {heads} heads, "
                             f"got {tuple(tensor.shape)}")
        if tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device} but the features are on {x.device}")
    if x.shape[1] % heads or (heads > 1 and val_dim != group) or val_dim < 1 or kernel % 2 == 0:
        raise ValueError(f"{heads} heads of {group} input channels, value width {val_dim} and a {kernel}x{kernel} "
                         "depthwise kernel do not form a cascade (the channels must split evenly, each head's "
                         "output feeds the next head's input, the kernel must be odd)")
    args = (x, qkv_weight, qkv_bias, dw_weight, dw_bias, attention_biases, bias_idx, proj_weight, proj_bias, window,
            scale)
    fn = _backend.dispatch("cascaded_attention_infer", backend, cascaded_attention_infer_ref, args)
    if fn is not cascaded_attention_infer_ref and torch.is_grad_enabled() and any(
            t.requires_grad for t in args if isinstance(t, torch.Tensor)):
        raise RuntimeError("the fused cascaded group attention is inference only (no backward): call it under "
                           "torch.no_grad() or torch.inference_mode(), or use the eager backend")
    return fn(*args)
