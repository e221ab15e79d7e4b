"""MXA Engine models: MXA-EfficientViT (registered with timm on import) and the MXA branch."""

from __future__ import annotations

import timm
import torch.nn as nn

from .efficientvit import (
    FUSIONS,
    VARIANTS,
    CheckpointMismatchError,
    MXAEfficientVit,
    MXAEfficientVitBlock,
    load_pretrained_file,
)
from .mxa import MedicalXRayAttention
from .cascaded_attention import FusedLocalWindowAttention

__all__ = [
    "FUSIONS", "VARIANTS", "CheckpointMismatchError", "FusedLocalWindowAttention", "MXAEfficientVit",
    "MXAEfficientVitBlock",
    "MedicalXRayAttention", "create_model", "list_models", "load_pretrained_file",
]


def list_models() -> list[str]:
    """Names of the MXA models this package registers with timm."""
    return sorted(VARIANTS)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a model by name: an MXA model (``mxa_efficientvit_m0`` ... ``m5``) or any timm model.

    Keyword arguments go to the model (see :class:`MXAEfficientVit`), e.g. ``num_classes``,
    ``in_chans``, ``img_size``, ``roi_mode``, ``fusion``, ``distilled``, ``backend``, ``pretrained_file``.
    """
    if not timm.is_model(name):
        raise ValueError(f"unknown model {name!r}; MXA models: {', '.join(list_models())} (or any timm model name)")
    return timm.create_model(name, **kwargs)
