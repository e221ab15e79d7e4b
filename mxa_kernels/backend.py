"""The kernel backend switch: which implementation serves each fused op.

Backend names:

- ``"eager"``: the PyTorch reference implementations (``mxa_kernels/ops/<op>/reference.py``); always available.
- ``"triton"``: the fused Triton kernels. Served for CUDA tensors, and for CPU tensors when
  ``TRITON_INTERPRET=1`` was set before Triton was imported (the interpreter the tests use).
  An explicit request that cannot be served raises :class:`BackendUnavailableError` saying why.
- ``"auto"``: Triton for CUDA tensors when it can serve the op, eager otherwise. Never raises.

Which name applies to a call, highest precedence first: the ``backend=`` argument of the op (modules
pass their own ``backend=`` here), the innermost :func:`use_backend` block, :func:`set_backend`, the
``MXA_BACKEND`` environment variable, and finally ``"auto"``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
from typing import Callable, Iterator, NamedTuple

import torch

BACKENDS = ("eager", "triton", "auto")
ENV_VAR = "MXA_BACKEND"


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot serve the call."""


class BackendStatus(NamedTuple):
    available: bool
    reason: str | None  # why the backend is unusable; None when it is available


class _TritonOp(NamedTuple):
    fn: Callable
    unsupported: Callable[..., str | None] | None  # why the kernel cannot serve given arguments, or None


# Triton implementations, by op name, registered by the kernel modules (one file per fused op).
_TRITON_OPS: dict[str, _TritonOp] = {}
_selected: str | None = None  # set by set_backend; None defers to the environment variable
_in_block: contextvars.ContextVar[str | None] = contextvars.ContextVar("mxa_backend_block", default=None)


def check_backend_name(name: str) -> str:
    """Return ``name`` if it names a backend, else raise ValueError listing the valid names."""
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


def set_backend(name: str) -> None:
    """Select the backend for every op call that does not pass its own ``backend=`` and is not inside
    a :func:`use_backend` block."""
    global _selected
    _selected = check_backend_name(name)


def get_backend() -> str:
    """The backend that applies to calls without their own ``backend=`` argument."""
    name = _in_block.get()
    if name is not None:
        return name
    if _selected is not None:
        return _selected
    env = os.environ.get(ENV_VAR)
    if env:
        if env not in BACKENDS:
            raise ValueError(f"environment variable {ENV_VAR}={env!r} is not a kernel backend; "
                             f"expected one of {', '.join(BACKENDS)}")
        return env
    return "auto"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Select ``name`` inside a ``with`` block (per thread and task; nested blocks stack)."""
    token = _in_block.set(check_backend_name(name))
    try:
        yield
    finally:
        _in_block.reset(token)


def register_triton_op(name: str, fn: Callable, unsupported: Callable[..., str | None] | None = None) -> None:
    """Called by a kernel module to make its fused implementation of op ``name`` available.

    ``unsupported(*args)`` says why the kernel cannot serve particular arguments (None if it can):
    an explicit "triton" request then raises with that reason, "auto" falls back to eager.
    """
    _TRITON_OPS[name] = _TritonOp(fn, unsupported)


@functools.cache
def triton_import_error() -> str | None:
    """Why triton cannot be imported here, or None (checked once per process)."""
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed (pip install triton; Linux only)"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # an installed but broken triton must not break the eager path
        return f"triton failed to import: {exc}"
    return None


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_dtype_reason(t: torch.Tensor, what: str) -> str | None:
    """Why a Triton kernel cannot take ``t``'s dtype (the kernels take float32, float16 and bfloat16;
    bfloat16 products need sm_80 or newer), or None."""
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"{what} serves float32, float16 and bfloat16, got {t.dtype}"
    if t.dtype == torch.bfloat16 and t.is_cuda and torch.cuda.get_device_capability(t.device) < (8, 0):
        return "bfloat16 matrix products need a GPU of compute capability 8.0 or newer"
    return None


def triton_unavailable_reason(op: str, device: torch.device | str, args: tuple = ()) -> str | None:
    """Why the Triton backend cannot serve ``op`` on ``device`` (with arguments ``args``), or None."""
    if op not in _TRITON_OPS:
        return triton_import_error() or f"no Triton kernel is registered for op {op!r}"
    device = torch.device(device)
    if device.type == "cpu" and not _interpreter_on():
        return ("the tensors are on the CPU: Triton kernels run on CUDA devices, or on the CPU through "
                "the interpreter when TRITON_INTERPRET=1 is set before triton is imported")
    if device.type not in ("cpu", "cuda"):
        return f"Triton kernels do not run on {device.type} devices"
    unsupported = _TRITON_OPS[op].unsupported
    return unsupported(*args) if unsupported is not None and args else None


def resolve_backend(op: str, requested: str | None, device: torch.device | str, args: tuple = ()) -> str:
    """The implementation ("eager" or "triton") that serves one call of ``op`` on ``device``."""
    name = check_backend_name(requested) if requested is not None else get_backend()
    if name == "eager":
        return "eager"
    if name == "auto" and torch.device(device).type != "cuda":
        return "eager"
    reason = triton_unavailable_reason(op, device, args)
    if name == "triton" and reason is not None:
        raise BackendUnavailableError(f"kernel backend 'triton' cannot serve {op} on {device}: {reason}")
    return "eager" if reason is not None else "triton"


def dispatch(op: str, requested: str | None, eager_fn: Callable, args: tuple) -> Callable:
    """The function that serves one call of ``op`` with ``args`` (the first is a tensor): ``eager_fn``
    or the registered Triton implementation."""
    if resolve_backend(op, requested, args[0].device, args) == "eager":
        return eager_fn
    return _TRITON_OPS[op].fn


def available_backends() -> dict[str, BackendStatus]:
    """Each backend name and whether it can serve anything on this machine (if not, why)."""
    triton_reason = triton_import_error()
    if triton_reason is None and not _TRITON_OPS:
        triton_reason = "no Triton kernel is registered"
    if triton_reason is None and not (torch.cuda.is_available() or _interpreter_on()):
        triton_reason = "no CUDA device, and the Triton interpreter is off (TRITON_INTERPRET=1)"
    return {
        "eager": BackendStatus(True, None),
        "triton": BackendStatus(triton_reason is None, triton_reason),
        "auto": BackendStatus(True, None),
    }
