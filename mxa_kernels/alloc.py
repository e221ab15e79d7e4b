"""Buffers the kernel launchers allocate for a kernel to fill, and the device a launch runs on.

With ``MXA_POISON_EMPTY=1`` in the environment (the tests set it) they are filled with NaN, or the
most negative integer, instead of left uninitialized, so that an element a kernel fails to write
cannot pass a comparison by luck.
"""

from __future__ import annotations

import contextlib
import os

import torch


def _poison(t: torch.Tensor) -> torch.Tensor:
    if os.environ.get("MXA_POISON_EMPTY") == "1":
        t.fill_(float("nan") if t.is_floating_point() else torch.iinfo(t.dtype).min)
    return t


def empty(shape, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return _poison(torch.empty(shape, dtype=dtype, device=device))


def empty_like(t: torch.Tensor) -> torch.Tensor:
    """Same shape, dtype, device and memory format (NCHW or channels_last) as ``t``."""
    return _poison(torch.empty_like(t))


def on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: a context that makes it ``t``'s device."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
