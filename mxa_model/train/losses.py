"""Multi-label losses with an uncertainty mask, and the knowledge-distillation loss (DeiT dual head).

Every term is a binary cross-entropy averaged over the (sample, label) cells whose mask is 1: a label
masked out by the U-Ignore policy counts in neither the supervised nor the distillation term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DISTILL_TYPES = ("soft", "hard")


def masked_bce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy over the cells where ``mask`` is 1 (0 when no cell is)."""
    loss = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    return (loss * mask).sum() / mask.sum().clamp(min=1)


def distillation_loss(outputs, targets: torch.Tensor, mask: torch.Tensor, teacher_logits: torch.Tensor,
                      alpha: float = 0.5, tau: float = 1.0, kind: str = "soft") -> torch.Tensor:
    """``(1 - alpha) * BCE(class head, labels) + alpha * KD(distillation head, teacher)``.

    ``outputs``: the student's ``(class_logits, distillation_logits)`` (a DeiT dual head in training),
    or one tensor used for both terms. ``kind="soft"``: the KD term is the BCE of
    ``distillation_logits / tau`` against ``sigmoid(teacher_logits / tau)``, times ``tau**2`` (so that
    its gradient does not shrink with the temperature); ``"hard"``: against the teacher's decisions
    ``teacher_logits > 0``.
    """
    if kind not in DISTILL_TYPES:
        raise ValueError(f"unknown distillation type {kind!r}; expected one of {', '.join(DISTILL_TYPES)}")
    class_logits, dist_logits = outputs if isinstance(outputs, (tuple, list)) else (outputs, outputs)
    supervised = masked_bce(class_logits, targets, mask)
    teacher_logits = teacher_logits.detach().float()
    if kind == "soft":
        kd = masked_bce(dist_logits / tau, torch.sigmoid(teacher_logits / tau), mask) * tau ** 2
    else:
        kd = masked_bce(dist_logits, (teacher_logits > 0).float(), mask)
    return (1 - alpha) * supervised + alpha * kd


def supervised_loss(outputs, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked BCE; a dual-head output trains both heads on the labels (no teacher)."""
    if isinstance(outputs, (tuple, list)):
        return sum(masked_bce(o, targets, mask) for o in outputs) / len(outputs)
    return masked_bce(outputs, targets, mask)
