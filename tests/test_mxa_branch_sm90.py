"""The fused MXA branch kernels compiled for an NVIDIA H100 (sm_90) without a GPU.

The interpreter runs the kernels' Python, not what the GPU compiler makes of it (a size of 1 turned
into a constant, a layout a batched product cannot take, register spills). Triton's own compiler
and ptxas build every kernel for sm_90 here, for every shipped configuration and dtype, in a
subprocess without TRITON_INTERPRET. Run this file as a script for the register/spill table.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import pytest

DTYPES = ("fp32", "fp16", "bf16")
KERNELS = ("mxa_branch_fwd_kernel", "mxa_branch_bwd_channel_kernel", "mxa_branch_bwd_input_kernel")


def compile_all(block_channels) -> list[dict]:
    """Compile every kernel x dtype x ROI mode in the configurations of ``block_channels``; return
    ptxas's registers and spill bytes per build."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mxa_kernels import mxa_branch_triton as fused

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    builds = []
    for kernel_name in KERNELS:
        kernel = getattr(fused, kernel_name)
        # A size of 1 would otherwise be compiled in as a Python int, which the kernels cannot use.
        assert {p.name for p in kernel.params if p.do_not_specialize} == {"C", "H", "W"}, kernel_name
        for block_c in block_channels:
            block_c, num_warps = fused.SHIPPED_CONFIGS[block_c]
            padded = {16: (16, 16), 8: (16, 32), 4: (32, 32)}[block_c]
            for dtype in DTYPES:
                for align in (True, False):
                    consts = dict(ALIGN=align, BC=block_c, HP=padded[0], WP=padded[1],
                                  PREC="ieee" if dtype == "fp32" else None)
                    if "BCH" in kernel.arg_names:
                        consts["BCH"] = 16
                    # strides of the last dimension are 1 at run time, and Triton makes them constants
                    consts.update({name: 1 for name in kernel.arg_names if re.fullmatch(r"s[a-z]w", name)})
                    signature = {}
                    for name in kernel.arg_names:
                        if name in consts:
                            signature[name] = "constexpr"
                        elif name in ("x_ptr", "out_ptr", "gout_ptr", "gx_ptr"):
                            signature[name] = "*" + dtype
                        elif name == "argmax_ptr":
                            signature[name] = "*i32"
                        else:
                            signature[name] = "*fp32" if name.endswith("_ptr") else "i32"
                    compiled = triton.compile(ASTSource(kernel, signature, constexprs=consts),
                                              target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))
                    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
                        f.write(compiled.asm["ptx"])
                    report = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
                                            capture_output=True, text=True, check=True).stderr
                    os.unlink(f.name)
                    registers = int(re.search(r"Used (\d+) registers", report).group(1))
                    spill = max(int(n) for n in re.findall(r"(\d+) bytes spill", report))
                    builds.append(dict(kernel=kernel_name, block_c=block_c, num_warps=num_warps, map=padded,
                                       dtype=dtype, align=align, registers=registers, spill_bytes=spill))
    return builds


def test_every_kernel_compiles_for_sm90():
    """The configuration of every M0..M5 stage at 224 px (maps padded to 16x16), each dtype and mode;
    ``python tests/test_mxa_branch_sm90.py all`` builds the larger-map configurations too (minutes)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("mxa_branch_")]
    assert len(rows) == len(KERNELS) * len(DTYPES) * 2
    for kernel, _, _, _, dtype, _, _, spill in rows:  # half precision: no register spills
        if dtype in ("fp16", "bf16"):
            assert spill == "0", f"{kernel} {dtype} spills {spill} bytes"


if __name__ == "__main__":
    print("kernel block_c num_warps map dtype align registers spill_bytes")
    for b in compile_all((16, 8, 4) if sys.argv[1:] == ["all"] else (16,)):
        print(b["kernel"], b["block_c"], b["num_warps"], "x".join(map(str, b["map"])), b["dtype"], b["align"],
              b["registers"], b["spill_bytes"], flush=True)
elif os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run with the interpreter's test session; a GPU session compiles the kernels for real",
                allow_module_level=True)
