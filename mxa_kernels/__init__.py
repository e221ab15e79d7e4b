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
    use_backend,
)
from .mxa_branch_ref import ROI_MODES, crop_resize_loop, mxa_branch_ref, roi_resample, snap_boxes
from .window_attention_ref import window_attention_ref
from . import backend as _backend

if _backend.triton_import_error() is None:
    # register the fused ops with torch.library and the backend switch
    from . import mxa_branch_triton, window_attention_triton  # noqa: F401

__all__ = [
    "BACKENDS", "BackendStatus", "BackendUnavailableError", "ROI_MODES", "available_backends",
    "check_backend_name", "crop_resize_loop", "get_backend", "mxa_branch", "mxa_branch_ref", "resolve_backend", "roi_resample",
    "set_backend", "snap_boxes", "use_backend", "window_attention", "window_attention_ref",
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
