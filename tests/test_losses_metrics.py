"""The masked multi-label losses and the distillation loss against hand computations; the AUC report
against scikit-learn with undefined labels left out."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from mxa_model.data.labels import COMPETITION_LABELS, LABELS
from mxa_model.metrics import auc_report, box_iou
from mxa_model.train.losses import distillation_loss, masked_bce, supervised_loss


def bce(logit, target):
    p = 1 / (1 + math.exp(-logit))
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


def sigmoid(z):
    return 1 / (1 + math.exp(-z))


LOGITS = [[0.3, -1.2, 2.0], [-0.7, 0.4, 1.1]]
DIST = [[0.1, -0.5, 1.5], [0.9, -0.2, -1.0]]
TEACHER = [[1.0, -2.0, 0.5], [-0.3, 0.8, -1.5]]
TARGETS = [[1.0, 0.0, 0.7], [0.0, 1.0, 1.0]]
MASK = [[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]  # one U-Ignore cell


def cells():
    return [(i, j) for i in range(2) for j in range(3) if MASK[i][j]]


def test_masked_bce_averages_over_unmasked_cells():
    want = sum(bce(LOGITS[i][j], TARGETS[i][j]) for i, j in cells()) / len(cells())
    got = masked_bce(torch.tensor(LOGITS), torch.tensor(TARGETS), torch.tensor(MASK))
    assert got.item() == pytest.approx(want, rel=1e-6)
    assert masked_bce(torch.tensor(LOGITS), torch.tensor(TARGETS), torch.zeros(2, 3)).item() == 0


@pytest.mark.parametrize("alpha,tau", [(0.5, 1.0), (0.3, 2.0)])
def test_soft_distillation_against_a_hand_computation(alpha, tau):
    sup = sum(bce(LOGITS[i][j], TARGETS[i][j]) for i, j in cells()) / len(cells())
    kd = sum(bce(DIST[i][j] / tau, sigmoid(TEACHER[i][j] / tau)) for i, j in cells()) / len(cells()) * tau ** 2
    got = distillation_loss((torch.tensor(LOGITS), torch.tensor(DIST)), torch.tensor(TARGETS), torch.tensor(MASK),
                            torch.tensor(TEACHER), alpha=alpha, tau=tau)
    assert got.item() == pytest.approx((1 - alpha) * sup + alpha * kd, rel=1e-6)


def test_hard_distillation_and_single_head():
    kd = sum(bce(LOGITS[i][j], float(TEACHER[i][j] > 0)) for i, j in cells()) / len(cells())
    sup = sum(bce(LOGITS[i][j], TARGETS[i][j]) for i, j in cells()) / len(cells())
    got = distillation_loss(torch.tensor(LOGITS), torch.tensor(TARGETS), torch.tensor(MASK), torch.tensor(TEACHER),
                            alpha=0.25, kind="hard")
    assert got.item() == pytest.approx(0.75 * sup + 0.25 * kd, rel=1e-6)
    with pytest.raises(ValueError, match="unknown distillation type"):
        distillation_loss(torch.tensor(LOGITS), torch.tensor(TARGETS), torch.tensor(MASK), torch.tensor(TEACHER), kind="x")


def test_distillation_gradients_reach_both_heads_but_not_the_teacher():
    logits, dist, teacher = (torch.tensor(t, requires_grad=True) for t in (LOGITS, DIST, TEACHER))
    distillation_loss((logits, dist), torch.tensor(TARGETS), torch.tensor(MASK), teacher).backward()
    assert logits.grad.abs().sum() > 0 and dist.grad.abs().sum() > 0 and teacher.grad is None
    assert logits.grad[0, 2] == 0 and dist.grad[0, 2] == 0  # the masked cell trains neither term


def test_supervised_loss_of_a_dual_head_is_the_mean_of_both():
    a, b = torch.tensor(LOGITS), torch.tensor(DIST)
    t, m = torch.tensor(TARGETS), torch.tensor(MASK)
    assert supervised_loss((a, b), t, m).item() == pytest.approx(((masked_bce(a, t, m) + masked_bce(b, t, m)) / 2).item())


def test_auc_report_leaves_undefined_labels_out_of_the_means():
    rng = np.random.default_rng(0)
    n = 200
    targets = (rng.random((n, len(LABELS))) < 0.3).astype(float)
    targets[:, LABELS.index("Fracture")] = 0  # no positive: undefined, as on CheXpert valid
    probs = np.clip(targets * 0.3 + rng.random((n, len(LABELS))) * 0.7, 0, 1)
    mask = np.ones_like(targets)
    mask[:50, 0] = 0  # masked cells are left out
    report = auc_report(probs, targets, mask, LABELS)
    assert report["auc_per_label"]["Fracture"] is None and "no positive" in report["undefined"]["Fracture"]
    defined = {k: v for k, v in report["auc_per_label"].items() if v is not None}
    assert len(defined) == len(LABELS) - 1
    assert defined["No Finding"] == pytest.approx(roc_auc_score(targets[50:, 0], probs[50:, 0]))
    assert report["auc_macro"] == pytest.approx(np.mean(list(defined.values())))
    keep = mask > 0
    assert report["auc_micro"] == pytest.approx(roc_auc_score(targets[keep], probs[keep]))
    assert report["auc_competition"] == pytest.approx(np.mean([defined[c] for c in COMPETITION_LABELS]))
    assert 0 < report["youden_threshold"]["Edema"] <= 1


def test_box_iou():
    assert box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0
    assert box_iou((0, 0, 1, 1), (0, 0, 1, 1)) == 1
