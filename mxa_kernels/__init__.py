"""Fused kernels of the MXA block and the switch between them and their eager references.

Each op lives in its package under ``mxa_kernels/ops/`` and is listed in ``mxa_kernels.registry``;
this module re-exports the public names.
"""

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
from .ops.cascaded_attention import cascaded_attention_infer, cascaded_attention_infer_ref
from .ops.mxa_branch import (ROI_MODES, channel_spatial_attention, crop_resize_loop, mxa_branch, mxa_branch_ref,
                             roi_resample, snap_boxes)
from .ops.window_attention import window_attention, window_attention_ref
from .registry import OPS, FusedOp

__all__ = [
    "BACKENDS", "BackendStatus", "BackendUnavailableError", "FusedOp", "OPS", "ROI_MODES", "available_backends",
    "cascaded_attention_infer", "cascaded_attention_infer_ref", "channel_spatial_attention", "check_backend_name",
    "crop_resize_loop", "get_backend", "mxa_branch", "mxa_branch_ref", "resolve_backend", "roi_resample",
    "set_backend", "snap_boxes", "triton_unavailable_reason", "use_backend", "window_attention",
    "window_attention_ref",
]
