"""Helpers shared by the attention tests."""

import torch

from mxa_model.window_attention import randomized  # noqa: F401 - shared with the benchmarks


def rel_err(got, want):
    """||got - want|| / ||want|| in float64; non-finite values fail (an element a kernel never wrote)."""
    assert torch.isfinite(got).all(), "non-finite values (an unwritten element?)"
    return ((got.double() - want.double()).norm() / want.double().norm().clamp(min=1e-12)).item()


def mxa_run(fn, x, boxes, weights, grad, roi_mode):
    """Output and gradients (x, the weights, boxes in align mode) of ``fn``."""
    x = x.detach().requires_grad_()
    boxes = boxes.detach().requires_grad_(roi_mode == "align")
    weights = [w.detach().requires_grad_() for w in weights]
    out = fn(x, boxes, *weights, roi_mode)
    inputs = [x, *weights] + ([boxes] if roi_mode == "align" else [])
    return [out, *torch.autograd.grad(out, inputs, grad)]
