"""Helpers shared by the tests: the device, the relative error, the half-precision rule, the attention
bias index, the MXA branch's output and gradients, and the comparison of two training states."""

import itertools
from collections import Counter
from functools import cache
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from mxa_bench.cases import randomized  # noqa: F401 - random BatchNorms and bias table, shared with the benchmarks

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bf16 tl.dot is wrong in the Triton interpreter: bf16 products are tested on a GPU that has them
BF16_PRODUCTS = DEVICE == "cuda" and torch.cuda.get_device_capability() >= (8, 0)
HALF_DTYPES = [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]
# The least error a fused result is allowed in each dtype, whatever the eager error (see within_twice_eager),
# in proportion to its rounding unit (bfloat16 keeps 8 bits, float16 11).
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
# the script that runs `mxa train` with a fault planted (its docstring lists them)
FAULT_INJECTION = Path(__file__).with_name("fault_injection.py")


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


def assert_same_training_state(got: dict, want: dict) -> None:
    """Two training states (checkpoints, or the per-rank files of fault_injection.py) hold bit-identical
    weights, EMA weights and optimizer state, at the same epoch and step."""
    assert (got["epoch"], got["step"]) == (want["epoch"], want["step"])
    for part in ("model", "model_ema"):
        assert (got[part] is None) == (want[part] is None), part
        for key, value in (want[part] or {}).items():
            assert torch.equal(got[part][key], value), f"{part} {key}"
    assert got["optimizer"]["state"].keys() == want["optimizer"]["state"].keys()
    for slot, state in want["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(got["optimizer"]["state"][slot][name], value), f"optimizer {slot} {name}"


class HostSyncs:
    """Counts, while entered, the calls that make the host wait for a GPU: reads of a tensor's values
    (``.item()``, ``bool()``, ``int()``, ``float()``: ATen's ``_local_scalar_dense``; ``.tolist()``,
    ``.numpy()``, ``.cpu()``, ``torch.equal``), copies from a device to the host (``.to("cpu")``,
    ``copy_``), the operations whose output size depends on values (``nonzero``, indexing with a boolean
    mask, ``masked_select``, ``unique``), ``torch.cuda.synchronize``, and ``torch.distributed``'s
    collectives (a flag shared across processes needs one; DDP's own broadcasts and gradient all-reduces
    are not these Python functions). Counted by what is asked, on any device: on the CPU, where nothing
    waits, a test still sees every call that would wait on a GPU (a read of a tensor that lives on the host
    there too, such as the unfused AdamW's step counts, is counted all the same). ``events``: the counts
    by name."""

    READS = {"tolist", "numpy", "cpu"}  # Tensor methods that copy values to the host without an ATen read
    WAITING_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive",
                   "equal"}
    COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "all_gather_object",
                   "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_to_all",
                   "gather", "scatter", "barrier")

    def __init__(self):
        self.events = Counter()
        counter = self

        class Functions(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if getattr(func, "__name__", None) in HostSyncs.READS:
                    counter.events[func.__name__] += 1
                return func(*args, **(kwargs or {}))

        class Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                out = func(*args, **(kwargs or {}))
                if name in HostSyncs.WAITING_OPS or (name == "index" and any(
                        isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])):
                    counter.events[name] += 1
                elif name in ("_to_copy", "copy_") and isinstance(out, torch.Tensor) and out.device.type == "cpu" \
                        and args[1 if name == "copy_" else 0].device.type != "cpu":
                    counter.events[f"{name} to the host"] += 1
                return out

        self._modes = (Functions(), Dispatch())
        self._collectives = {}

    def _counted(self, name: str, collective):
        def call(*args, **kwargs):
            self.events[name] += 1
            return collective(*args, **kwargs)
        return call

    @property
    def count(self) -> int:
        return sum(self.events.values())

    def __enter__(self):
        import torch.distributed as dist

        for name in self.COLLECTIVES:
            self._collectives[name] = getattr(dist, name)
            setattr(dist, name, self._counted(name, self._collectives[name]))
        self._synchronize = torch.cuda.synchronize
        torch.cuda.synchronize = self._counted("cuda.synchronize", self._synchronize)
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist

        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        for name, collective in self._collectives.items():
            setattr(dist, name, collective)
        torch.cuda.synchronize = self._synchronize
