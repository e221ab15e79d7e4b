"""The GPU cost report (``mxa bench --suite cost``): figures of every fused op on a GPU target, computed
on any machine without a GPU, deterministically.

For each op of the registry (``mxa_kernels.OPS``), pass (forward, backward) and case (M5's stage shapes
at batch 256 in bfloat16), on meta tensors, so that batch 256 costs nothing:

- **launches and bytes**: the eager path is the op's reference (its backward by autograd); every
  non-view ATen op that is not an allocation counts as one launch, moving the bytes of its tensor
  inputs and outputs. The fused path is the op's launchers: each Triton launch is recorded instead of
  run (grid, warps, constexprs; its compulsory bytes are every tensor argument once, scratch
  included), and the PyTorch ops between the launches count as above;
- **per Triton launch, per target** (sm_90: H100, sm_80: A100): registers, spill bytes and shared
  memory from building the kernel with Triton's compiler and ptxas as a launch with these arguments
  would build it, then resident programs per SM from those limits and waves over the target's SMs.

These are static figures of the code, not measurements: no time is reported.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import mxa_kernels

from .cases import KEY_DIM, M5_STAGES, window_side

BATCH = 256
DTYPE = torch.bfloat16
# ATen ops that launch no kernel: allocations, and _unsafe_view (a view its schema does not mark as one)
NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_unsafe_view"}


@dataclass(frozen=True)
class Target:
    """The per-SM limits that decide how many programs are resident at once (CUDA occupancy rules)."""

    name: str
    capability: int
    sms: int
    registers: int = 65536  # per SM
    shared_bytes: int = 228 * 1024  # per SM
    max_warps: int = 64  # per SM
    max_programs: int = 32  # resident blocks per SM
    register_unit: int = 256  # registers are given to a warp in units of this many
    # constants of the roofline model only (see roofline_us)
    copy_bytes_per_s: float = 3.0e12  # achievable HBM copy bandwidth
    bf16_flops_per_s: float = 989e12  # dense bf16 tensor-core peak
    launch_s: float = 3e-6  # per launch: launch latency and the tail of a short kernel


TARGETS = {"sm_90": Target("H100", 90, 132),
           "sm_80": Target("A100", 80, 108, shared_bytes=164 * 1024, copy_bytes_per_s=1.4e12, bf16_flops_per_s=312e12)}


def roofline_us(bytes_moved: int, flops: int, launches: int, target: Target) -> float:
    """A lower bound of a path's time on ``target`` in a roofline model, in microseconds: its bytes at the
    copy bandwidth or its FLOPs at the bf16 peak, whichever is longer, plus a fixed cost per launch. A
    model with the constants of :class:`Target`, never a measurement."""
    return 1e6 * (max(bytes_moved / target.copy_bytes_per_s, flops / target.bf16_flops_per_s) + launches * target.launch_s)


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _is_view(func) -> bool:
    """Whether an ATen op returns an alias of an input (a view: no kernel, no traffic)."""
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


@dataclass
class OpCount:
    """The ATen ops of a call that launch a GPU kernel (no views, allocations or non-tensor results) and
    the bytes each reads and writes."""

    ops: list[tuple[str, int]] = field(default_factory=list)

    @property
    def launches(self) -> int:
        return len(self.ops)

    @property
    def bytes(self) -> int:
        return sum(b for _, b in self.ops)


class LaunchCounter(TorchDispatchMode):
    """Records each launching ATen op with the bytes of its tensor inputs and outputs."""

    def __init__(self, count: OpCount):
        super().__init__()
        self.count = count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        produced = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        if produced and not _is_view(func) and name not in NO_KERNEL:  # (promote_types returns a dtype)
            consumed = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            self.count.ops.append((name, sum(tensor_bytes(t) for t in consumed + produced)))
        return out


@dataclass
class TritonLaunch:
    """One Triton launch, recorded instead of run."""

    kernel: object
    grid: tuple[int, ...]
    args: dict[str, object]  # by the kernel's argument names
    options: dict[str, object]  # constexprs and num_warps

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    @property
    def programs(self) -> int:
        return math.prod(self.grid)

    @property
    def bytes(self) -> int:
        """Compulsory traffic: every tensor argument read or written once."""
        unique = {id(t): t for t in self.args.values() if isinstance(t, torch.Tensor)}
        return sum(tensor_bytes(t) for t in unique.values())


@contextlib.contextmanager
def recording_triton_launches(launches: list[TritonLaunch]):
    """Triton launches inside the block are recorded in ``launches`` and not run (compiled kernels, and
    the interpreter's, so that the counts can be taken in a test session too)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    def record(self, *args, grid, warmup, **kwargs):
        grid = grid(kwargs) if callable(grid) else grid
        launches.append(TritonLaunch(self, tuple(grid), dict(zip(self.arg_names, args)), kwargs))

    originals = {cls: cls.run for cls in (JITFunction, InterpretedFunction)}
    for cls in originals:
        cls.run = record
    try:
        yield
    finally:
        for cls, run in originals.items():
            cls.run = run


# --- the cases: each op's arguments on meta tensors at M5's stage shapes ----------------------------------------

def _meta(*shape, dtype=torch.float32):
    return torch.empty(shape, device="meta", dtype=dtype)


def mxa_branch_cases(batch: int = BATCH):
    for channels, side, _, _ in M5_STAGES:
        for roi_mode in ("crop", "align"):
            hidden = channels // 16
            args = (_meta(batch, channels, side, side, dtype=DTYPE), _meta(batch, 4), _meta(hidden, channels, 1, 1),
                    _meta(channels, hidden, 1, 1), _meta(1, 2, 7, 7), roi_mode)
            yield f"{roi_mode} {batch}x{channels}x{side}x{side}", args


def window_attention_cases(batch: int = BATCH):
    for _, side, _, value_dim in M5_STAGES:
        window = window_side(side)
        tokens = window * window
        q, k = (_meta(batch, KEY_DIM, side, side, dtype=DTYPE) for _ in range(2))
        args = (q, k, _meta(batch, value_dim, side, side, dtype=DTYPE), _meta(tokens),
                _meta(tokens, tokens, dtype=torch.int64), window, KEY_DIM ** -0.5)
        yield f"{batch}x{value_dim}x{side}x{side} window {window}", args


def cascaded_attention_cases(batch: int = BATCH):
    for channels, side, heads, value_dim in M5_STAGES:
        window = window_side(side)
        tokens, kernel, qkv_out = window * window, 5, 2 * KEY_DIM + value_dim
        args = (_meta(batch, channels, side, side, dtype=DTYPE), _meta(heads, qkv_out, channels // heads, dtype=DTYPE),
                _meta(heads, qkv_out), _meta(heads, KEY_DIM, kernel, kernel), _meta(heads, KEY_DIM),
                _meta(heads, tokens), _meta(tokens, tokens, dtype=torch.int32),
                _meta(channels, heads * value_dim, dtype=DTYPE), _meta(channels), window, KEY_DIM ** -0.5)
        yield f"{batch}x{channels}x{side}x{side} heads {heads}", args


CASES: dict[str, Callable] = {"mxa_branch": mxa_branch_cases, "window_attention": window_attention_cases,
                              "cascaded_attention_infer": cascaded_attention_cases}


# --- counting -----------------------------------------------------------------------------------

def eager_passes(op, args: tuple) -> dict[str, Callable[[], None]]:
    """The reference's forward and, for ops with a fused backward, its autograd backward."""
    leaves = [a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    result = {}

    def forward():
        result["out"] = op.reference(*leaves)

    def backward():
        inputs = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
        torch.autograd.grad(result["out"], inputs, torch.empty_like(result["out"]), allow_unused=True)

    return {"forward": forward, "backward": backward}


def count_pass(fn: Callable[[], None]) -> tuple[OpCount, list[TritonLaunch]]:
    """The launching ATen ops and the Triton launches of one call of ``fn``. The tests' NaN poisoning of
    kernel buffers (MXA_POISON_EMPTY) is off meanwhile: it is no part of an op."""
    count, launches = OpCount(), []
    poison = os.environ.pop("MXA_POISON_EMPTY", None)
    try:
        with recording_triton_launches(launches), LaunchCounter(count):
            fn()
    finally:
        if poison is not None:
            os.environ["MXA_POISON_EMPTY"] = poison
    return count, launches


def op_figures(name: str, batch: int = BATCH) -> list[dict]:
    """Every case and pass of op ``name``: the eager and the fused path's launches and bytes, and the
    fused path's Triton launches."""
    op = mxa_kernels.OPS[name]
    module = op.kernels_module()
    rows = []
    for case, args in CASES[name](batch):
        fused = module.launch_passes(*args)
        eager = eager_passes(op, args)
        for pass_name, fused_fn in fused.items():  # in order: a backward uses its forward's outputs
            flops = FlopCounterMode(display=False)
            with flops:  # the useful matrix-product FLOPs, the same math on both paths
                eager_count, _ = count_pass(eager[pass_name])
            torch_ops, triton = count_pass(fused_fn)
            rows.append(dict(op=name, case=case, pass_=pass_name, flops=flops.get_total_flops(),
                             eager_launches=eager_count.launches,
                             eager_bytes=eager_count.bytes, fused_launches=torch_ops.launches + len(triton),
                             fused_bytes=torch_ops.bytes + sum(t.bytes for t in triton),
                             torch_ops=[n for n, _ in torch_ops.ops], triton=triton))
    return rows


# --- building a recorded launch for a target --------------------------------------------------------------------

TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32",
                torch.int64: "i64"}


def launch_build(launch: TritonLaunch) -> tuple[dict, dict]:
    """The signature and constexprs a launch with these arguments compiles: tensors by dtype, ints of
    value 1 specialized to constants unless the kernel keeps them run-time values, as Triton does."""
    runtime = {p.name for p in launch.kernel.params if p.do_not_specialize}
    constexprs = {k: v for k, v in launch.options.items() if k in launch.kernel.arg_names}
    signature = {}
    for param in launch.kernel.params:
        value = launch.args.get(param.name, constexprs.get(param.name))
        if param.is_constexpr:
            signature[param.name] = "constexpr"
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + TRITON_TYPES[value.dtype]
        elif isinstance(value, bool) or (isinstance(value, int) and value == 1 and param.name not in runtime):
            signature[param.name], constexprs[param.name] = "constexpr", value
        elif isinstance(value, int):
            signature[param.name] = "i32"
        else:
            signature[param.name] = "fp32"
    return signature, constexprs


def compile_for_target(kernel, signature: dict, constexprs: dict, num_warps: int, target: Target) -> dict:
    """Registers, spill bytes and shared memory of ``kernel`` built for ``target`` (Triton's compiler
    and ptxas, no GPU)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(kernel, signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", target.capability, 32), options=dict(num_warps=num_warps))
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    arch = f"sm_{target.capability}" + ("a" if target.capability >= 90 else "")
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "kernel.ptx"), os.path.join(tmp, "kernel.cubin")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        report = subprocess.run([os.path.join(tools, "ptxas"), "-v", f"--gpu-name={arch}", ptx, "-o", cubin],
                                capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", cubin], capture_output=True, text=True,
                              check=True).stdout
    return dict(registers=int(re.search(r"Used (\d+) registers", report).group(1)),
                spill_bytes=max(int(n) for n in re.findall(r"(\d+) bytes spill", report)),
                shared_bytes=int(compiled.metadata.shared),
                # static SASS instructions, a size figure: lines like "/*0a30*/  FFMA R4, R5, R6, R4 ;"
                sass_instructions=len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+\S", sass, re.M)))


def occupancy(registers: int, shared_bytes: int, num_warps: int, programs: int, target: Target) -> dict:
    """Programs resident per SM (the least the registers, warps, shared memory and block limit allow)
    and waves of the grid over the target's SMs."""
    warp_registers = -(-registers * 32 // target.register_unit) * target.register_unit
    limits = [target.registers // (warp_registers * num_warps), target.max_warps // num_warps, target.max_programs]
    if shared_bytes:
        limits.append(target.shared_bytes // shared_bytes)
    resident = min(limits)
    return dict(resident=resident, waves=math.ceil(programs / (resident * target.sms)) if resident else None)


# --- the report ---------------------------------------------------------------------------------

def launch_figures(launch: TritonLaunch, targets: dict[str, Target], built: dict) -> dict:
    """The launch's grid and warps, and per target its build and occupancy (``built`` caches builds)."""
    signature, constexprs = launch_build(launch)
    num_warps = launch.options.get("num_warps", 4)
    figures = dict(kernel=launch.name, grid=list(launch.grid), programs=launch.programs, num_warps=num_warps,
                   bytes=launch.bytes)
    for name, target in targets.items():
        key = (launch.name, tuple(sorted(signature.items())), tuple(sorted(map(str, constexprs.items()))), num_warps,
               name)
        if key not in built:
            built[key] = compile_for_target(launch.kernel, signature, constexprs, num_warps, target)
        figures[name] = dict(built[key], **occupancy(built[key]["registers"], built[key]["shared_bytes"], num_warps,
                                                     launch.programs, target))
    return figures


def report(ops=None, targets=None, batch: int = BATCH, progress=print) -> list[dict]:
    """Records of every op (or ``ops``), case and pass: launches and bytes of both paths, and the fused
    path's Triton launches with their figures per target."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("the cost report builds the kernels for GPU targets, which the Triton interpreter "
                           "cannot: run it without TRITON_INTERPRET=1")
    targets = {name: TARGETS[name] for name in (targets or TARGETS)}
    built, records = {}, []
    for name in ops or mxa_kernels.OPS:
        for row in op_figures(name, batch):
            triton = [launch_figures(launch, targets, built) for launch in row.pop("triton")]
            row["pass"] = row.pop("pass_")
            model = {name: {path: round(roofline_us(row[f"{path}_bytes"], row["flops"], row[f"{path}_launches"], t), 1)
                            for path in ("eager", "fused")} for name, t in targets.items()}
            records.append(dict(row, byte_ratio=row["eager_bytes"] / row["fused_bytes"], triton=triton,
                                dtype=str(DTYPE).removeprefix("torch."), targets=sorted(targets),
                                roofline_model_us=model))
            progress(format_record(records[-1]))
    return records


def format_record(r: dict) -> str:
    head = (f"{r['op']:<24} {r['case']:<28} {r['pass']:<8} launches eager {r['eager_launches']:>3} fused "
            f"{r['fused_launches']:>2} | MB eager {r['eager_bytes'] / 1e6:8.1f} fused {r['fused_bytes'] / 1e6:7.1f} "
            f"(x{r['byte_ratio']:.1f})")
    model = "; ".join(f"{n} eager {m['eager']} fused {m['fused']}" for n, m in r["roofline_model_us"].items())
    lines = [head, f"    roofline model, a lower bound in us, not a measurement: {model}"]
    for t in r["triton"]:
        per_target = "; ".join(f"{name} regs {t[name]['registers']} spill {t[name]['spill_bytes']} smem "
                               f"{t[name]['shared_bytes']} resident {t[name]['resident']} waves {t[name]['waves']} "
                               f"sass {t[name]['sass_instructions']}" for name in r["targets"])
        lines.append(f"    {t['kernel']:<32} grid {'x'.join(map(str, t['grid'])):<8} warps {t['num_warps']} | {per_target}")
    return "\n".join(lines)


# --- the gate -----------------------------------------------------------------------------------

BASELINE = os.path.join(os.path.dirname(__file__), "baselines", "cost.json")
# per Triton launch and target: which way each figure gets worse
LAUNCH_WORSE = {"registers": "higher", "spill_bytes": "higher", "resident": "lower"}


def _key(r: dict) -> tuple:
    return r["op"], r["case"], r["pass"]


def regressions(records: list[dict], baseline: list[dict], complete: bool = True) -> tuple[list[str], list[str]]:
    """(worse, better): each figure of ``records`` worse or better than the baseline's. Worse: more
    launches or bytes on either path, another kernel, a smaller grid, and per target more registers,
    more spill bytes or fewer resident programs. ``complete``: the run covers every baseline record."""
    base = {_key(r): r for r in baseline}
    worse, better = [], []

    def compare(what: str, new, old, worse_if: str) -> None:
        if new != old:
            got_worse = (new > old) == (worse_if == "higher")
            (worse if got_worse else better).append(f"{what}: {old} -> {new}")

    for r in records:
        name = " ".join(_key(r))
        if _key(r) not in base:
            worse.append(f"{name}: not in the baseline (write it with --write-baseline)")
            continue
        b = base.pop(_key(r))
        for field_name in ("eager_launches", "eager_bytes", "fused_launches", "fused_bytes"):
            compare(f"{name} {field_name}", r[field_name], b[field_name], "higher")
        if [t["kernel"] for t in r["triton"]] != [t["kernel"] for t in b["triton"]]:
            worse.append(f"{name}: Triton launches {[t['kernel'] for t in b['triton']]} -> "
                         f"{[t['kernel'] for t in r['triton']]}")
            continue
        for t, bt in zip(r["triton"], b["triton"]):
            compare(f"{name} {t['kernel']} programs", t["programs"], bt["programs"], "lower")
            for target in sorted(set(r["targets"]) & set(b["targets"])):
                for figure, worse_if in LAUNCH_WORSE.items():
                    compare(f"{name} {t['kernel']} {target} {figure}", t[target][figure], bt[target][figure], worse_if)
    if complete:
        worse += [f"{' '.join(k)}: in the baseline, not measured" for k in base]
    return worse, better


def write_baseline(path: str, records: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(records, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def main(args) -> int:
    """``mxa bench --suite cost``: print the report, write --json, compare with the committed baseline
    (or --baseline); exit 1 when a figure got worse."""
    ops = args.cases.split(",") if args.cases else None
    unknown = sorted(set(ops or ()) - set(mxa_kernels.OPS))
    if unknown:
        raise ValueError(f"--cases for the cost suite names fused ops ({', '.join(mxa_kernels.OPS)}), got {unknown}")
    batch = args.batch or BATCH
    print(f"cost report: static figures of the fused ops at batch {batch}, {str(DTYPE).removeprefix('torch.')}, no "
          "GPU: launches and bytes on meta tensors, registers, spills and shared memory from Triton's compiler "
          "and ptxas; not measurements\ntargets: " + "; ".join(
              f"{n} ({t.name}: {t.sms} SMs, {t.registers} registers, {t.shared_bytes // 1024} KB shared memory, "
              f"{t.max_warps} warps per SM)" for n, t in TARGETS.items())
          + "\nroofline model (a lower bound, not a measurement): max(bytes / copy bandwidth, useful FLOPs / bf16 "
          "peak) + launches x a launch cost; " + "; ".join(
              f"{n}: {t.copy_bytes_per_s / 1e12:.1f} TB/s, {t.bf16_flops_per_s / 1e12:.0f} TFLOP/s, "
              f"{t.launch_s * 1e6:.0f} us per launch" for n, t in TARGETS.items()), flush=True)
    records = report(ops, batch=batch, progress=lambda line: print(line, flush=True))
    if args.json:
        write_baseline(args.json, records)
        print(f"wrote {args.json}")
    if args.write_baseline:
        write_baseline(args.write_baseline, records)
        print(f"wrote the baseline {args.write_baseline}")
        return 0
    if batch != BATCH:
        print(f"(the baseline holds batch {BATCH}: not compared at --batch {batch})")
        return 0
    with open(args.baseline or BASELINE) as f:
        worse, better = regressions(records, json.load(f), complete=ops is None)
    for line in better:
        print(f"better: {line} (update the baseline: --write-baseline {os.path.relpath(BASELINE)})")
    for line in worse:
        print(f"regression: {line}")
    print(f"{len(worse)} figure(s) worse and {len(better)} better than {args.baseline or os.path.relpath(BASELINE)}")
    return 1 if worse else 0
