"""Helpers shared by the attention tests."""

import torch


def rel_err(got, want):
    """||got - want|| / ||want|| in float64; non-finite values fail (an element a kernel never wrote)."""
    assert torch.isfinite(got).all(), "non-finite values (an unwritten element?)"
    return ((got.double() - want.double()).norm() / want.double().norm().clamp(min=1e-12)).item()


def randomized(module):
    """timm zero-initializes the projection's BatchNorm (which zeroes every upstream gradient) and the
    bias table: give every BatchNorm and the table of a LocalWindowAttention random values."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.normal_()
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
        module.attn.attention_biases.normal_()
    return module
