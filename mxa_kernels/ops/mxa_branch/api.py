"""The public MXA-branch op: its argument checks and the backend dispatch."""

from __future__ import annotations

import torch

from ...backend import dispatch
from ...checks import check_devices, check_features, check_float, check_rank, check_tensor
from .reference import ROI_MODES, SPATIAL_KERNEL, mxa_branch_ref

OP = "mxa_branch"


def check_mxa_branch_args(x, boxes, ca_reduce_weight, ca_expand_weight, sa_weight, roi_mode) -> None:
    if not isinstance(roi_mode, str) or roi_mode not in ROI_MODES:
        raise ValueError(f"{OP}: unknown roi_mode {roi_mode!r}; expected one of {', '.join(ROI_MODES)}")
    check_features(OP, x)
    batch, channels = x.shape[:2]
    check_tensor(OP, "boxes", boxes)
    if boxes.shape != (batch, 4):
        raise ValueError(f"{OP}: boxes must have shape ({batch}, 4) for a batch of {batch}, got {tuple(boxes.shape)}")
    check_float(OP, "boxes", boxes)
    check_tensor(OP, "ca_reduce_weight", ca_reduce_weight)
    check_rank(OP, "ca_reduce_weight", ca_reduce_weight, 4, f"(hidden, {channels}, 1, 1)")
    hidden = ca_reduce_weight.shape[0]
    if hidden == 0:
        raise ValueError(f"{OP}: ca_reduce_weight has no hidden channels, shape {tuple(ca_reduce_weight.shape)}")
    expected = {
        "ca_reduce_weight": (ca_reduce_weight, (hidden, channels, 1, 1)),
        "ca_expand_weight": (ca_expand_weight, (channels, hidden, 1, 1)),
        "sa_weight": (sa_weight, (1, 2, SPATIAL_KERNEL, SPATIAL_KERNEL)),
    }
    for name, (tensor, shape) in expected.items():
        check_tensor(OP, name, tensor)
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{OP}: {name} must have shape {shape} for {channels} channels, got {tuple(tensor.shape)}")
        check_float(OP, name, tensor)
    check_devices(OP, "x", x, {"boxes": boxes, **{n: t for n, (t, _) in expected.items()}})


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
    output as in the eager reference. A non-finite 7x7 spatial weight reaches the outputs whose taps
    land on the map, as the eager convolution on the CPU; on a GPU, eager's convolution may also
    multiply it with the zero padding and give NaN in more places. In crop mode a +Inf box
    coordinate counts as a huge one (eager's float->int64 cast of it is platform-defined).
    """
    check_mxa_branch_args(x, boxes, ca_reduce_weight, ca_expand_weight, sa_weight, roi_mode)
    args = (x, boxes, ca_reduce_weight, ca_expand_weight, sa_weight, roi_mode)
    return dispatch(OP, backend, mxa_branch_ref, args)(*args)
