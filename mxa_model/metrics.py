"""Multi-label evaluation on top of scikit-learn: per-label ROC-AUC (undefined labels reported as such,
never as 0 or 0.5), macro and micro means, the competition mean, Youden thresholds, ROC plots and
box IoU."""

from __future__ import annotations

import os

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from .data.labels import COMPETITION_LABELS


def _cells(probs, targets, mask, j):
    keep = mask[:, j] > 0
    return probs[keep, j], targets[keep, j] >= 0.5


def auc_report(probs, targets, mask, labels) -> dict:
    """ROC-AUC per label over the unmasked cells (targets >= 0.5 count as positive).

    Returns ``auc_per_label`` (label -> AUC, or None when the cells hold one class only; the reason is in
    ``undefined``), ``auc_macro`` (mean of the defined AUCs), ``auc_micro`` (all unmasked cells pooled,
    the paper's metric), ``auc_competition`` (mean over the five CheXpert competition findings that
    are defined), ``youden_threshold`` per label, and ``n_samples``/``positives`` per label.
    """
    probs, targets, mask = (np.asarray(torch.as_tensor(a, dtype=torch.float64)) for a in (probs, targets, mask))
    per_label, thresholds, undefined, positives = {}, {}, {}, {}
    for j, label in enumerate(labels):
        p, y = _cells(probs, targets, mask, j)
        positives[label] = int(y.sum())
        if y.all() or not y.any():
            per_label[label] = thresholds[label] = None
            undefined[label] = (f"{'no negative' if y.any() else 'no positive'} among {len(y)} labelled samples"
                                if len(y) else "no labelled samples")
            continue
        per_label[label] = float(roc_auc_score(y, p))
        fpr, tpr, cuts = roc_curve(y, p)
        thresholds[label] = float(min(cuts[np.argmax(tpr - fpr)], 1.0))
    defined = [v for v in per_label.values() if v is not None]
    keep = mask > 0
    pooled = targets[keep] >= 0.5
    competition = [per_label[c] for c in COMPETITION_LABELS if per_label.get(c) is not None]
    return {
        "auc_per_label": per_label,
        "auc_macro": float(np.mean(defined)) if defined else None,
        "auc_micro": float(roc_auc_score(pooled, probs[keep])) if 0 < pooled.sum() < pooled.size else None,
        "auc_competition": float(np.mean(competition)) if competition else None,
        "undefined": undefined,
        "youden_threshold": thresholds,
        "positives": positives,
        "n_samples": int(probs.shape[0]),
    }


def plot_roc(probs, targets, mask, labels, path: str | os.PathLike, title: str = "ROC curves") -> None:
    """One PNG with the ROC curve of every label whose AUC is defined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probs, targets, mask = (np.asarray(torch.as_tensor(a, dtype=torch.float64)) for a in (probs, targets, mask))
    fig, ax = plt.subplots(figsize=(7, 7))
    for j, label in enumerate(labels):
        p, y = _cells(probs, targets, mask, j)
        if y.all() or not y.any():
            continue
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, label=f"{label} ({roc_auc_score(y, p):.3f})", linewidth=1.2)
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def box_iou(a, b) -> float:
    """IoU of two (x0, y0, x1, y1) boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0.0) * max(h, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def format_auc(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.3f}"


def format_auc_table(report: dict) -> str:
    """The per-label AUCs and the means as a Markdown table."""
    rows = ["| finding | AUC | positives |", "| --- | ---: | ---: |"]
    for label, auc in report["auc_per_label"].items():
        rows.append(f"| {label} | {format_auc(auc)} | {report['positives'][label]} |")
    for key in ("auc_macro", "auc_micro", "auc_competition"):
        rows.append(f"| **{key}** | {format_auc(report[key])} | |")
    return "\n".join(rows)
