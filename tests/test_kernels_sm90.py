"""The fused kernels compiled for an NVIDIA H100 (sm_90) without a GPU.

The interpreter runs the kernels' Python, not what the GPU compiler makes of it (a size of 1 turned
into a constant, a layout a batched product cannot take, register spills). Triton's own compiler
and ptxas build every kernel of every op in the registry for sm_90 here, in the builds its module
lists (shipped configurations x dtypes), in a subprocess without TRITON_INTERPRET. Run this file as a
script for the register/spill table.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Spill bytes allowed in half precision, by launch configuration: none but in the wide inference cascade
# in float16 (88 bytes; none in bfloat16) with the Triton the project is tested with (3.8); Triton
# 3.6's allocator, the GPU machine's, spills up to 188 bytes in the window attention's kernels and
# none in the others' (bench/README.md, "The GPU run"); 3.7, not measured, gets 3.6's limits.
HALF_PRECISION_SPILL_BYTES = {"3.8": {"other": 0, "wide": 96}, "3.6": {"other": 256}}
pytestmark = pytest.mark.slow


def triton_version() -> tuple[int, int]:
    from importlib.metadata import version

    return tuple(int(part) for part in version("triton").split(".")[:2])


def launched_kernels(module) -> set[str]:
    """The names of the module's kernels that launchers call (the @triton.jit functions named *_kernel)."""
    import triton

    return {name for name, value in vars(module).items()
            if isinstance(value, triton.runtime.JITFunction) and name.endswith("_kernel")}


def all_builds(all_configs: bool) -> list:
    """Every registered op's kernel builds; an op's launched kernel missing from its builds fails."""
    import mxa_kernels

    builds = []
    for op in mxa_kernels.OPS.values():
        module = op.kernels_module()
        op_builds = module.builds(all_configs)
        missing = launched_kernels(module) - {b.kernel.fn.__name__ for b in op_builds}
        assert not missing, f"{op.name}: kernels without a build in {module.__name__}.builds(): {sorted(missing)}"
        builds += op_builds
    return builds


def test_every_kernel_compiles_for_sm90():
    """Every registered op's builds: the MXA branch in the configuration of every M0..M5 stage at 224 px
    (maps padded to 16x16), the windowed attention and the inference cascade, each dtype;
    ``python tests/test_kernels_sm90.py all`` builds the MXA branch's larger-map configurations too (minutes)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [[cell.strip() for cell in line.split("|")] for line in result.stdout.splitlines() if "_kernel" in line]
    expected = [(b.kernel.fn.__name__, b.config, b.dtype) for b in all_builds(False)]
    assert [(kernel, config, dtype) for kernel, config, _, dtype, _, _ in rows] == expected
    allowed = HALF_PRECISION_SPILL_BYTES["3.8" if triton_version() >= (3, 8) else "3.6"]
    for (kernel, config, _, dtype, _, spill), build in zip(rows, all_builds(False)):
        if dtype in ("fp16", "bf16"):
            limit = allowed.get(build.launch.name, allowed["other"])
            assert int(spill) <= limit, f"{kernel} {config} {dtype} spills {spill} bytes"


if __name__ == "__main__":
    from mxa_bench.cost import TARGETS, compile_for_target

    print("kernel | configuration | num_warps | dtype | registers | spill bytes")
    for build in all_builds(sys.argv[1:] == ["all"]):
        built = compile_for_target(build.kernel, build.signature, build.constexprs, build.launch.num_warps,
                                   TARGETS["sm_90"])
        print(" | ".join(str(v) for v in (build.kernel.fn.__name__, build.config, build.launch.num_warps, build.dtype,
                                          built["registers"], built["spill_bytes"])), flush=True)
elif os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run with the interpreter's test session; a GPU session compiles the kernels for real",
                allow_module_level=True)
