"""Helpers shared by the attention tests."""

import torch

from mxa_model.window_attention import randomized  # noqa: F401 - shared with the benchmarks


def rel_err(got, want):
    """||got - want|| / ||want|| in float64; non-finite values fail (an element a kernel never wrote)."""
    assert torch.isfinite(got).all(), "non-finite values (an unwritten element?)"
    return ((got.double() - want.double()).norm() / want.double().norm().clamp(min=1e-12)).item()
