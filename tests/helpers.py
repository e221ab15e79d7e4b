"""Helpers shared by the tests: the device, the relative error, the half-precision rule, the attention
bias index, the MXA branch's output and gradients."""

import itertools
from functools import cache

import pytest
import torch

from mxa_bench.cases import randomized  # noqa: F401 - random BatchNorms and bias table, shared with the benchmarks

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bf16 tl.dot is wrong in the Triton interpreter: bf16 products are tested on a GPU that has them
BF16_PRODUCTS = DEVICE == "cuda" and torch.cuda.get_device_capability() >= (8, 0)
HALF_DTYPES = [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]
# The least error a fused result is allowed in each dtype, whatever the eager error (see within_twice_eager),
# in proportion to its rounding unit (bfloat16 keeps 8 bits, float16 11).
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def rel_err(got, want):
    """||got - want|| / ||want|| in float64; non-finite values fail (an element a kernel never wrote)."""
    assert torch.isfinite(got).all(), "non-finite values (an unwritten element?)"
    return ((got.double() - want.double()).norm() / want.double().norm().clamp(min=1e-12)).item()


def within_twice_eager(err_fused: float, err_eager: float, dtype: torch.dtype) -> bool:
    """flash-attention's rule for a fused result in ``dtype``: at most twice the error (against a float64
    computation) of the eager computation in that dtype, or the dtype's floor, for results the eager
    path happens to get nearly exact."""
    return err_fused <= max(2 * err_eager, FLOOR[dtype])


@cache
def bias_index(window):
    """timm's relative-offset index of a window (CascadedGroupAttention.attention_bias_idxs), built here
    independently of timm (tests/test_fuzz.py checks that it is timm's)."""
    points = list(itertools.product(range(window), range(window)))
    offsets, idx = {}, []
    for p1, p2 in itertools.product(points, points):
        offset = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
        idx.append(offsets.setdefault(offset, len(offsets)))
    return torch.tensor(idx).view(len(points), len(points))


def mxa_run(fn, x, boxes, weights, grad, roi_mode):
    """Output and gradients (x, the weights, boxes in align mode) of ``fn``."""
    x = x.detach().requires_grad_()
    boxes = boxes.detach().requires_grad_(roi_mode == "align")
    weights = [w.detach().requires_grad_() for w in weights]
    out = fn(x, boxes, *weights, roi_mode)
    inputs = [x, *weights] + ([boxes] if roi_mode == "align" else [])
    return [out, *torch.autograd.grad(out, inputs, grad)]
