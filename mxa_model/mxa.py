"""The Medical X-ray Attention (MXA) local-detail branch, as a module that owns its parameters."""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import register_notrace_module

import mxa_kernels


@register_notrace_module  # FX keeps the branch whole: its backend dispatch and crop mode's no_grad are Python
class MedicalXRayAttention(nn.Module):
    """MXA local-detail branch: ROI predictor -> ROI resample -> channel attention -> spatial attention.

    ``forward(x)`` returns the branch output (no residual), the same shape as ``x`` (B, C, H, W).
    Submodules are laid out like the authors' (``roi_predictor.{0,2}``, ``channel_attention.{1,3}``,
    ``spatial_attention.0``), so their ``state_dict`` keys match. Everything after the ROI predictor
    runs as one op, :func:`mxa_kernels.mxa_branch`, served by the kernel backend switch: the pooling,
    activation and sigmoid layers of ``channel_attention`` / ``spatial_attention`` are kept for that
    layout and for reading, and the op applies the same functions. Under TorchScript the op's eager
    reference runs; FX tracing keeps the module whole (a leaf, as timm registers its own such modules).

    Args:
        in_channels: C.
        reduction: channel-attention reduction; its hidden width is ``max(1, C // reduction)``.
        roi_mode: ``"align"`` (the default) or ``"crop"``.

            - ``"crop"`` reproduces the authors' semantics: the predicted ``(x1, y1, x2, y2)`` in (0, 1)
              are truncated to pixels, clamped, replaced by the whole map when empty, and the crop is
              resized bilinearly (``align_corners=False``). The ROI predictor gets no gradient (it runs
              under ``no_grad``), exactly as in the paper, where it never trains.
            - ``"align"`` is differentiable. With the predictor's outputs ``(a1, b1, a2, b2)``, each axis
              is ordered, ``lo = min(a1, a2)``, ``hi = max(a1, a2)``, and mapped to a box with a minimum
              size ``m = min_box_size``: ``x1 = lo * (1 - m)``, ``x2 = m + hi * (1 - m)`` (same for y).
              So ``0 <= x1 < x2 <= 1`` and ``x2 - x1 >= m``, continuously in the predictions. The box is
              sampled RoIAlign-style (one bilinear sample per output pixel, border clamped) and
              gradients reach the features and, through the box, the ROI predictor. The predictor's
              last bias starts at (-2, -2, 2, 2), so the first boxes cover most of the map, as the
              authors' crop does at initialization (its empty boxes fall back to the whole map).
        min_box_size: ``m`` above, a fraction of the map side (align mode only).
        backend: kernel backend for this module (``"eager"``, ``"triton"``, ``"auto"``), or None to
            follow the global selection (:func:`mxa_kernels.set_backend`).
    """

    def __init__(
        self,
        in_channels: int,
        reduction: int = 16,
        roi_mode: str = "align",
        min_box_size: float = 0.25,
        backend: str | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if roi_mode not in mxa_kernels.ROI_MODES:
            raise ValueError(f"unknown roi_mode {roi_mode!r}; expected one of {', '.join(mxa_kernels.ROI_MODES)}")
        if not 0.0 < min_box_size <= 1.0:
            raise ValueError(f"min_box_size must be in (0, 1], got {min_box_size}")
        if backend is not None:
            mxa_kernels.check_backend_name(backend)
        dd = {"device": device, "dtype": dtype}
        self.in_channels = in_channels
        self.roi_mode = roi_mode
        self.min_box_size = min_box_size
        self.backend = backend
        roi_hidden = max(1, in_channels // 2)
        ca_hidden = max(1, in_channels // reduction)
        self.roi_predictor = nn.Sequential(
            nn.Conv2d(in_channels, roi_hidden, 3, padding=1, bias=False, **dd),
            nn.ReLU(),
            nn.Conv2d(roi_hidden, 4, 1, bias=True, **dd),
            nn.Sigmoid(),
        )
        self.channel_attention = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, ca_hidden, 1, bias=False, **dd),
            nn.ReLU(),
            nn.Conv2d(ca_hidden, in_channels, 1, bias=False, **dd),
            nn.Sigmoid(),
        )
        self.spatial_attention = nn.Sequential(
            nn.Conv2d(2, 1, 7, padding=3, bias=False, **dd),
            nn.Sigmoid(),
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialize the align-mode start box (the layers reset their own parameters)."""
        if self.roi_mode == "align":
            with torch.no_grad():
                self.roi_predictor[2].bias.copy_(torch.tensor([-2.0, -2.0, 2.0, 2.0]))

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, roi_mode={self.roi_mode!r}, backend={self.backend!r}"

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"MedicalXRayAttention expects (B, C, H, W) features, got shape {list(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"MedicalXRayAttention was built for {self.in_channels} channels, got {x.shape[1]}")
        if x.shape[0] == 0:
            raise ValueError("MedicalXRayAttention got an empty batch (B = 0)")

    def roi_boxes(self, x: torch.Tensor) -> torch.Tensor:
        """The (B, 4) normalized boxes ``(x1, y1, x2, y2)`` the branch samples for features ``x``.

        In crop mode these are the predictor's raw outputs, which the crop snaps to pixels
        (:func:`mxa_kernels.snap_boxes` gives the pixel box); in align mode the continuous box.
        """
        self._check_input(x)
        if self.roi_mode == "crop":
            with torch.no_grad():
                return self.roi_predictor(x).mean(dim=(2, 3))
        predicted = self.roi_predictor(x).mean(dim=(2, 3))
        a1, b1, a2, b2 = predicted[:, 0], predicted[:, 1], predicted[:, 2], predicted[:, 3]
        m = self.min_box_size
        x1, x2 = torch.minimum(a1, a2) * (1 - m), m + torch.maximum(a1, a2) * (1 - m)
        y1, y2 = torch.minimum(b1, b2) * (1 - m), m + torch.maximum(b1, b2) * (1 - m)
        return torch.stack([x1, y1, x2, y2], dim=1)

    def sampled_boxes(self, x: torch.Tensor) -> torch.Tensor:
        """The (B, 4) normalized boxes ``(x1, y1, x2, y2)`` the branch actually resamples: in crop mode
        the snapped pixel box (the whole map when it is empty) over the map size; in align mode the box
        clipped to the map."""
        boxes = self.roi_boxes(x).detach()
        if self.roi_mode == "align":
            return boxes.clamp(0, 1)
        height, width = x.shape[-2:]
        scale = torch.tensor([width, height, width, height], device=x.device, dtype=torch.float32)
        return mxa_kernels.snap_boxes(boxes, height, width).float() / scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        boxes = self.roi_boxes(x)
        if torch.jit.is_scripting():  # TorchScript cannot call the Python backend dispatch
            return mxa_kernels.mxa_branch_ref(x, boxes, self.channel_attention[1].weight,
                                              self.channel_attention[3].weight, self.spatial_attention[0].weight,
                                              self.roi_mode)
        return mxa_kernels.mxa_branch(
            x,
            boxes,
            self.channel_attention[1].weight,
            self.channel_attention[3].weight,
            self.spatial_attention[0].weight,
            roi_mode=self.roi_mode,
            backend=self.backend,
        )
