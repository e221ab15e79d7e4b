"""The fused ops, one entry each: what every part of the project that iterates the ops reads.

The sm_90 build test builds each op's kernels from its ``builds()``; the fuzz tests hold a table of
bad arguments per op; the benchmark suites tie each case to an op; ``set_backend`` on a model sets
the backend of every module an op serves; ``mxa backends`` reports each op; the README's table of
fused ops matches this list (tests/test_readme.py). A new op is a package under ``mxa_kernels/ops/``
and one entry here; a package or kernel without its entry fails a test.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from .backend import triton_import_error
from .ops.cascaded_attention import cascaded_attention_infer, cascaded_attention_infer_ref
from .ops.mxa_branch import mxa_branch, mxa_branch_ref
from .ops.window_attention import window_attention, window_attention_ref


@dataclass(frozen=True)
class FusedOp:
    """One fused op. ``kernels`` is the module of its Triton kernels (with ``builds()``, the kernel
    builds for a GPU target without a GPU, and the backend registration); ``serves`` the model modules
    whose forward calls the op, as ``module:Class``; ``tests`` its test files; ``bench_cases`` the
    benchmark cases that time it (bench/suites.py)."""

    name: str
    summary: str
    function: Callable
    reference: Callable
    kernels: str
    serves: tuple[str, ...]
    tests: tuple[str, ...]
    bench_cases: tuple[str, ...]

    @property
    def package(self) -> str:
        """The op's package, e.g. ``mxa_kernels.ops.mxa_branch``."""
        return self.kernels.rpartition(".")[0]

    def kernels_module(self):
        """The kernels module (imports Triton)."""
        return importlib.import_module(self.kernels)

    def module_classes(self) -> tuple[type, ...]:
        """The model module classes the op serves (imports them)."""
        classes = []
        for path in self.serves:
            module, _, name = path.partition(":")
            classes.append(getattr(importlib.import_module(module), name))
        return tuple(classes)


OPS: dict[str, FusedOp] = {op.name: op for op in (
    FusedOp("mxa_branch", "ROI resample (crop or align), channel attention, spatial attention, scaling",
            mxa_branch, mxa_branch_ref, "mxa_kernels.ops.mxa_branch.kernels",
            serves=("mxa_model.mxa:MedicalXRayAttention",),
            tests=("tests/test_mxa_branch_ref.py", "tests/test_mxa_branch_triton.py"),
            bench_cases=("mxa_branch_crop", "mxa_branch_align", "mxa_block_crop", "mxa_block_align")),
    FusedOp("window_attention", "one head of EfficientViT's windowed attention with the learned "
            "relative-position bias (window partition and reverse folded into the indexing)",
            window_attention, window_attention_ref, "mxa_kernels.ops.window_attention.kernels",
            serves=("mxa_model.cascaded_attention:FusedLocalWindowAttention",),
            tests=("tests/test_window_attention.py",),
            bench_cases=("window_attention",)),
    FusedOp("cascaded_attention_infer", "a whole `LocalWindowAttention` block at inference, BatchNorms folded "
            "(zero padding, window partition, every head's q/k/v projection, query depthwise convolution and "
            "attention in cascade, ReLU, output projection)",
            cascaded_attention_infer, cascaded_attention_infer_ref, "mxa_kernels.ops.cascaded_attention.kernels",
            serves=("mxa_model.cascaded_attention:FusedLocalWindowAttention",),
            tests=("tests/test_cascaded_attention.py",),
            bench_cases=("cascaded_attention_block",)),
)}


def load_kernels() -> None:
    """Import every op's kernels module, which registers its Triton implementation with the backend
    switch; nothing where Triton does not import (the eager references serve then)."""
    if triton_import_error() is None:
        for op in OPS.values():
            op.kernels_module()


load_kernels()
