"""Fused kernels of the MXA block and the switch between them and their eager references."""

from __future__ import annotations

import numbers

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


# Argument checks of the public ops. Every error is one line, a ValueError (shape, size, range, device)
# or a TypeError (type, dtype), and names the argument. They read shapes, dtypes and devices only (no
# host synchronization on a GPU, nothing that breaks a torch.compile graph), except the range of an
# offset index on the CPU (see _check_index).

def _check_tensor(op: str, name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _check_float(op: str, name: str, t) -> torch.Tensor:
    if not _check_tensor(op, name, t).is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    return t


def _check_rank(op: str, name: str, t: torch.Tensor, rank: int, layout: str) -> None:
    if t.dim() != rank:
        raise ValueError(f"{op}: {name} must have shape {layout}, got shape {tuple(t.shape)}")


def _check_devices(op: str, ref_name: str, ref: torch.Tensor, named: dict) -> None:
    for name, t in named.items():
        if t.device != ref.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")


def _check_window(op: str, window) -> None:
    if isinstance(window, bool) or not isinstance(window, (numbers.Integral, torch.SymInt)):
        raise TypeError(f"{op}: window must be an int, got {type(window).__name__}")
    if window < 1:
        raise ValueError(f"{op}: window must be at least 1, got {window}")


def _check_scale(op: str, scale) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (numbers.Real, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"{op}: scale must be a Python number, got {type(scale).__name__}")


def _check_index(op: str, bias_idx: torch.Tensor, window: int, table_size: int, table: str) -> None:
    """bias_idx: an (N, N) integer tensor whose entries index a bias table of ``table_size`` entries.

    The range is checked for CPU tensors only: on a GPU it would synchronize with the host. There the
    fused kernels give NaN scores for an offset outside the table (they never read outside it), and
    the eager reference fails with a device-side assertion."""
    tokens = window * window
    if bias_idx.shape != (tokens, tokens):
        raise ValueError(f"{op}: bias_idx must have shape {(tokens, tokens)} for a {window}x{window} window, "
                         f"got {tuple(bias_idx.shape)}")
    if bias_idx.is_floating_point() or bias_idx.is_complex() or bias_idx.dtype == torch.bool:
        raise TypeError(f"{op}: bias_idx must be an integer tensor, got {bias_idx.dtype}")
    if bias_idx.device.type == "cpu" and bias_idx.numel() and not torch.compiler.is_compiling():
        low, high = int(bias_idx.min()), int(bias_idx.max())
        if low < 0 or high >= table_size:
            raise ValueError(f"{op}: bias_idx holds offsets {low}..{high}, outside {table} of {table_size} "
                             f"entries (0..{table_size - 1})")


def _check_mxa_branch_args(x, boxes, ca_reduce_weight, ca_expand_weight, sa_weight, roi_mode) -> None:
    op = "mxa_branch"
    if not isinstance(roi_mode, str) or roi_mode not in ROI_MODES:
        raise ValueError(f"{op}: unknown roi_mode {roi_mode!r}; expected one of {', '.join(ROI_MODES)}")
    _check_tensor(op, "x", x)
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be features of shape (B, C, H, W), got shape {tuple(x.shape)}")
    batch, channels = x.shape[:2]
    if batch == 0:
        raise ValueError(f"{op} got an empty batch (B = 0) in x")
    if 0 in x.shape[1:]:
        raise ValueError(f"{op}: x has no channels or an empty map, shape {tuple(x.shape)}")
    _check_float(op, "x", x)
    _check_tensor(op, "boxes", boxes)
    if boxes.shape != (batch, 4):
        raise ValueError(f"{op}: boxes must have shape ({batch}, 4) for a batch of {batch}, got {tuple(boxes.shape)}")
    _check_float(op, "boxes", boxes)
    _check_tensor(op, "ca_reduce_weight", ca_reduce_weight)
    _check_rank(op, "ca_reduce_weight", ca_reduce_weight, 4, f"(hidden, {channels}, 1, 1)")
    hidden = ca_reduce_weight.shape[0]
    if hidden == 0:
        raise ValueError(f"{op}: ca_reduce_weight has no hidden channels, shape {tuple(ca_reduce_weight.shape)}")
    expected = {
        "ca_reduce_weight": (ca_reduce_weight, (hidden, channels, 1, 1)),
        "ca_expand_weight": (ca_expand_weight, (channels, hidden, 1, 1)),
        "sa_weight": (sa_weight, (1, 2, 7, 7)),
    }
    for name, (tensor, shape) in expected.items():
        _check_tensor(op, name, tensor)
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{op}: {name} must have shape {shape} for {channels} channels, got {tuple(tensor.shape)}")
        _check_float(op, name, tensor)
    _check_devices(op, "x", x, {"boxes": boxes, **{n: t for n, (t, _) in expected.items()}})


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
    the backend that ``backend`` (or the global selection, see :mod:`mxa_kernels.backend`) resolves to.

    x and the weights: floating point, any strides (weights of another floating dtype are cast to x's);
    boxes: floating point, any values (degenerate boxes follow the ROI mode's rules).
    Non-finite values are not checked (that would cost a pass over the data and, on a GPU, a host
    synchronization): NaN and Inf in x, the boxes and the channel-attention weights propagate to the
    output as in the eager reference. Two differences of the fused kernel: a non-finite 7x7 spatial
    weight makes its output NaN wherever eager's is and possibly elsewhere (its conv is a matrix
    product over the zero padding), and in crop mode a +Inf box coordinate counts as a huge one
    (eager's float->int64 cast of it is platform-defined).
    """
    _check_mxa_branch_args(x, boxes, ca_reduce_weight, ca_expand_weight, sa_weight, roi_mode)
    args = (x, boxes, ca_reduce_weight, ca_expand_weight, sa_weight, roi_mode)
    return _backend.dispatch("mxa_branch", backend, mxa_branch_ref, args)(*args)


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
    op = "window_attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(op, name, t)
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[0::2] != q.shape[0::2] or v.shape[3] != q.shape[3]:
        raise ValueError(f"{op} expects q and k of one shape (B, Dk, H, W) and v of shape (B, Dv, H, W), "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[0] == 0:
        raise ValueError(f"{op} got an empty batch (B = 0) in q, k and v")
    if 0 in (*q.shape[1:], v.shape[1]):
        raise ValueError(f"{op}: q, k and v have no channels or an empty map, shapes {tuple(q.shape)} "
                         f"and {tuple(v.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_float(op, name, t)
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"{op}: q, k and v must have one dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    _check_window(op, window)
    if q.shape[2] % window or q.shape[3] % window:
        raise ValueError(f"{op}: the maps ({q.shape[2]}x{q.shape[3]}) must be cut into whole {window}x{window} "
                         f"windows (window = {window}); pad them first")
    _check_scale(op, scale)
    _check_tensor(op, "bias", bias)
    _check_tensor(op, "bias_idx", bias_idx)
    _check_rank(op, "bias", bias, 1, "(num_offsets,)")
    _check_float(op, "bias", bias)
    _check_devices(op, "q", q, {"k": k, "v": v, "bias": bias, "bias_idx": bias_idx})
    _check_index(op, bias_idx, window, bias.shape[0], "the bias table")
    args = (q, k, v, bias, bias_idx, window, scale)
    return _backend.dispatch("window_attention", backend, window_attention_ref, args)(*args)


def cascaded_attention_infer(x: torch.Tensor, qkv_weight: torch.Tensor, qkv_bias: torch.Tensor, dw_weight: torch.Tensor,
                             dw_bias: torch.Tensor, attention_biases: torch.Tensor, bias_idx: torch.Tensor,
                             proj_weight: torch.Tensor, proj_bias: torch.Tensor, window: int, scale: float,
                             backend: str | None = None) -> torch.Tensor:
    """EfficientViT's whole windowed cascaded group attention at inference, BatchNorms folded (see
    :func:`cascaded_attention_infer_ref` for the arguments), served by the backend that ``backend`` (or
    the global selection) resolves to. Inference only: the fused kernel has no backward.

    x and the parameters: floating point (parameters of another floating dtype are cast); bias_idx: an
    integer (N, N) index into each head's row of attention_biases.
    Non-finite values are not checked (that would cost a pass over the data and, on a GPU, a host
    synchronization): NaN and Inf in the inputs propagate to the output as in the eager reference.
    """
    op = "cascaded_attention_infer"
    _check_tensor(op, "x", x)
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be features of shape (B, C, H, W), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{op} got an empty batch (B = 0) in x")
    if 0 in x.shape[1:]:
        raise ValueError(f"{op}: x has no channels or an empty map, shape {tuple(x.shape)}")
    _check_float(op, "x", x)
    params = {"qkv_weight": qkv_weight, "qkv_bias": qkv_bias, "dw_weight": dw_weight, "dw_bias": dw_bias,
              "attention_biases": attention_biases, "bias_idx": bias_idx, "proj_weight": proj_weight,
              "proj_bias": proj_bias}
    for name, t in params.items():
        _check_tensor(op, name, t)
    _check_rank(op, "qkv_weight", qkv_weight, 3, "(heads, 2 Dk + Dv, C / heads)")
    _check_rank(op, "dw_weight", dw_weight, 4, "(heads, Dk, K, K)")
    _check_rank(op, "attention_biases", attention_biases, 2, "(heads, num_offsets)")
    _check_window(op, window)
    _check_scale(op, scale)
    heads, qkv_out, group = qkv_weight.shape
    if heads == 0:
        raise ValueError(f"{op}: qkv_weight has no heads, shape {tuple(qkv_weight.shape)}")
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
            raise ValueError(f"{op}: {name} must have shape {shape} for {x.shape[1]} channels and {heads} heads, "
                             f"got {tuple(tensor.shape)}")
        if tensor.device != x.device:
            raise ValueError(f"{op}: {name} is on {tensor.device} but x is on {x.device}")
        if name != "bias_idx":
            _check_float(op, name, tensor)
    if x.shape[1] % heads or (heads > 1 and val_dim != group) or val_dim < 1 or key_dim < 1 or kernel % 2 == 0:
        raise ValueError(f"{op}: {heads} heads of {group} input channels, key width {key_dim}, value width "
                         f"{val_dim} and a {kernel}x{kernel} depthwise kernel (qkv_weight, dw_weight) do not form "
                         "a cascade (the channels must split evenly, each head's output feeds the next head's "
                         "input, the widths must be positive, the kernel odd)")
    _check_index(op, bias_idx, window, attention_biases.shape[1], "each head's row of attention_biases")
    args = (x, qkv_weight, qkv_bias, dw_weight, dw_bias, attention_biases, bias_idx, proj_weight, proj_bias, window,
            scale)
    fn = _backend.dispatch("cascaded_attention_infer", backend, cascaded_attention_infer_ref, args)
    if fn is not cascaded_attention_infer_ref and torch.is_grad_enabled() and any(
            t.requires_grad for t in args if isinstance(t, torch.Tensor)):
        raise RuntimeError("the fused cascaded group attention is inference only (no backward): call it under "
                           "torch.no_grad() or torch.inference_mode(), or use the eager backend")
    return fn(*args)
