"""What the kernel launchers of every op share: the launch-configuration type, the padding of sizes
to Triton's block shapes, the matrix-product precision, and the description of a kernel build for a
GPU target that Triton's compiler can make without a GPU (see tests/test_kernels_sm90.py). Imported by
the kernels modules only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import triton

# What the attention kernels (one window per program, tokens and head widths padded to powers of
# two) serve: windows up to 8 x 8 and heads up to 128 wide, with every block in registers.
MAX_WINDOW_SIDE = 8
MAX_HEAD_DIM = 128
# the dtypes a kernel is built for, by the names Triton's signatures use
BUILD_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class LaunchConfig:
    """A shipped launch configuration: its name, the warps per program and the tile sizes (constexprs)
    it fixes; the sizes that follow from the problem (padded maps, head widths) are not part of it."""

    name: str
    num_warps: int
    tiles: dict[str, int] = field(default_factory=dict)

    def options(self) -> dict:
        """The keyword arguments of a launch: the tile constexprs and ``num_warps``."""
        return {**self.tiles, "num_warps": self.num_warps}


@dataclass(frozen=True)
class KernelBuild:
    """One kernel in one configuration and dtype, as Triton's compiler takes it: ``signature`` maps each
    argument to its Triton type ("*fp16", "i32", "constexpr", ...), ``constexprs`` holds the values.
    ``sizes`` are the size arguments the kernel needs as run-time values (``do_not_specialize``): a
    launch would otherwise compile a size of 1 in as a Python int, on which the kernel's ``.to`` fails."""

    kernel: object  # a triton.JITFunction
    config: str  # what the configuration serves, for the report
    dtype: str  # a key of BUILD_DTYPES
    launch: LaunchConfig
    signature: dict[str, str]
    constexprs: dict[str, object]
    sizes: tuple[str, ...]


def padded(n: int, least: int = 16) -> int:
    """The power of two a size is padded to in a block, at least ``least`` (tl.dot's smallest side)."""
    return max(least, triton.next_power_of_2(n))


def dot_precision(dtype: torch.dtype) -> str | None:
    """tl.dot's input_precision: float32 products exact ("ieee"), not TF32; the default otherwise."""
    return "ieee" if dtype == torch.float32 else None


def kernel_build(kernel, config: str, dtype: str, launch: LaunchConfig, constexprs: dict, *, sizes: tuple[str, ...],
                 feature_pointers: set[str], index_pointers: set[str] = frozenset()) -> KernelBuild:
    """The build of ``kernel`` with its pointer types given by the op's module: ``feature_pointers`` (the
    names, among the module's kernels' arguments) point to tensors in the features' dtype,
    ``index_pointers`` to int32, every other pointer to float32; scalars named
    ``scale`` are fp32, other scalars i32. Strides of the last dimension (``s..w``) are 1 at run time,
    which Triton makes constants, so they are built as such."""
    constexprs = {name: value for name, value in {
        **constexprs, **launch.tiles, "PREC": dot_precision(BUILD_DTYPES[dtype]),
        **{n: 1 for n in kernel.arg_names if re.fullmatch(r"s[a-z]+w", n)}}.items() if name in kernel.arg_names}
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in feature_pointers:
            signature[name] = "*" + dtype
        elif name in index_pointers:
            signature[name] = "*i32"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32"
        else:
            signature[name] = "fp32" if name == "scale" else "i32"
    return KernelBuild(kernel, config, dtype, launch, signature, constexprs, sizes)
