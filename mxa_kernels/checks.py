"""Argument checks shared by the public ops.

Every error is one line, a ValueError (shape, size, range, device) or a TypeError (type, dtype), and
names the op and the argument. The checks read shapes, dtypes and devices only (no host
synchronization on a GPU, nothing that breaks a torch.compile graph), except the range of an offset
index on the CPU (see :func:`check_bias_index`).
"""

from __future__ import annotations

import numbers

import torch


def check_tensor(op: str, name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_float(op: str, name: str, t) -> torch.Tensor:
    if not check_tensor(op, name, t).is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    return t


def check_rank(op: str, name: str, t: torch.Tensor, rank: int, layout: str) -> None:
    if t.dim() != rank:
        raise ValueError(f"{op}: {name} must have shape {layout}, got shape {tuple(t.shape)}")


def check_features(op: str, x) -> None:
    """x: a non-empty floating-point (B, C, H, W) map."""
    check_tensor(op, "x", x)
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be features of shape (B, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{op} got an empty batch (B = 0) in x")
    if 0 in x.shape[1:]:
        raise ValueError(f"{op}: x has no channels or an empty map, shape {tuple(x.shape)}")
    check_float(op, "x", x)


def check_devices(op: str, ref_name: str, ref: torch.Tensor, named: dict) -> None:
    for name, t in named.items():
        if t.device != ref.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")


def check_window(op: str, window) -> None:
    if isinstance(window, bool) or not isinstance(window, (numbers.Integral, torch.SymInt)):
        raise TypeError(f"{op}: window must be an int, got {type(window).__name__}")
    if window < 1:
        raise ValueError(f"{op}: window must be at least 1, got {window}")


def check_scale(op: str, scale) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (numbers.Real, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"{op}: scale must be a Python number, got {type(scale).__name__}")


def check_bias_index(op: str, bias_idx: torch.Tensor, window: int, table_size: int, table: str) -> None:
    """bias_idx: an (N, N) integer tensor whose entries index a bias table of ``table_size`` entries.

    The range is checked for CPU tensors only: on a GPU it would synchronize with the host. There the
    fused kernels give NaN scores for an offset outside the table (they never read outside it), and
    the eager reference fails with a device-side assertion."""
    tokens = window * window
    if bias_idx.shape != (tokens, tokens):
        raise ValueError(f"{op}: bias_idx must have shape {(tokens, tokens)} for a {window}x{window} window, "
                         f"got {tuple(bias_idx.shape)}")
    if bias_idx.is_floating_point() or bias_idx.is_complex() or bias_idx.dtype == torch.bool:
        raise TypeError(f"{op}: bias_idx must be an integer tensor, got {bias_idx.dtype}")
    if bias_idx.device.type == "cpu" and bias_idx.numel() and not torch.compiler.is_compiling():
        low, high = int(bias_idx.min()), int(bias_idx.max())
        if low < 0 or high >= table_size:
            raise ValueError(f"{op}: bias_idx holds offsets {low}..{high}, outside {table} of {table_size} "
                             f"entries (0..{table_size - 1})")
