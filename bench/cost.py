"""The GPU cost report (``mxa bench --suite cost``): figures of every fused op on a GPU target, computed
on any machine without a GPU, deterministically.

For each op of the registry (``mxa_kernels.OPS``), pass (forward, backward) and case (M5's stage shapes,
or others, at batch 256 in bfloat16), on meta tensors, so that batch 256 costs nothing:

- **launches and bytes**: the eager path is the op's reference (its backward by autograd); every
  non-view ATen op that is not an allocation counts as one launch, moving the bytes of its tensor
  inputs and outputs. The fused path is the op's launchers: each Triton launch is recorded instead of
  run (grid, warps, constexprs; its compulsory bytes are every tensor argument once, scratch
  included), and the PyTorch ops between the launches count as above;
- **per Triton launch, per target** (sm_90: H100, sm_80: A100): registers, spill bytes and shared
  memory from building the kernel with Triton's compiler and ptxas as a launch with these arguments
  would build it, then resident programs per SM from those limits and waves over the target's SMs;
- **per Triton launch**: the trips of every loop in one program (the kernel's source, its bounds
  evaluated with the launch's arguments) and the useful and padded multiply-adds of its ``tl.dot``
  tiles (counted in Triton's interpreter at batch 1, in a child process);
- **a roofline lower bound** of each path per target, a model whose constants are printed with it.

These are static figures of the code, not measurements: no time is reported.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import json
import math
import operator
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import mxa_kernels

from .cases import KEY_DIM, M5_KERNELS, M5_STAGES, Stage, window_side

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
    """The bytes of the distinct elements of ``t``: an expanded (stride 0) dimension is read once."""
    if not t.numel():
        return 0
    return math.prod(size for size, stride in zip(t.shape, t.stride()) if stride != 0) * t.element_size()


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


# --- the cases: each op's arguments at M5's stage shapes (or others), on meta tensors ---------------------------

def _tensor(device: str, *shape, dtype=torch.float32, below: int | None = None) -> torch.Tensor:
    """An argument of a case: empty on the meta device; on the CPU (the interpreted run, see
    :func:`interpreted_dots`) standard normal values, or integers in ``[0, below)``."""
    if device == "meta":
        return torch.empty(shape, device="meta", dtype=dtype)
    if below is not None:
        return torch.randint(0, below, shape, dtype=dtype)
    return torch.randn(shape).to(dtype)


def _boxes(device: str, batch: int) -> torch.Tensor:
    """One box per sample, (x1, y1, x2, y2). On the CPU one just inside the map: the whole map would
    resample to the identity, which the kernels skip; this one takes the products, in align mode on
    every pixel (crop mode snaps it to a crop one pixel short of the right and bottom borders)."""
    if device == "meta":
        return _tensor(device, batch, 4)
    return torch.tensor([[0.01, 0.01, 0.99, 0.99]]).repeat(batch, 1)


def mxa_branch_cases(batch: int, stages, device: str = "meta", dtype=DTYPE):
    for channels, side, _, _ in stages:
        for roi_mode in ("crop", "align"):
            hidden = channels // 16
            args = (_tensor(device, batch, channels, side, side, dtype=dtype), _boxes(device, batch),
                    _tensor(device, hidden, channels, 1, 1), _tensor(device, channels, hidden, 1, 1),
                    _tensor(device, 1, 2, 7, 7), roi_mode)
            yield f"{roi_mode} {batch}x{channels}x{side}x{side}", args


def window_attention_cases(batch: int, stages, device: str = "meta", dtype=DTYPE):
    for _, side, _, value_dim in stages:
        window = window_side(side)
        tokens = window * window
        q, k = (_tensor(device, batch, KEY_DIM, side, side, dtype=dtype) for _ in range(2))
        args = (q, k, _tensor(device, batch, value_dim, side, side, dtype=dtype), _tensor(device, tokens),
                _tensor(device, tokens, tokens, dtype=torch.int64, below=tokens), window, KEY_DIM ** -0.5)
        yield f"{batch}x{value_dim}x{side}x{side} window {window}", args


def cascaded_attention_cases(batch: int, stages, device: str = "meta", dtype=DTYPE):
    for channels, side, heads, value_dim in stages:
        window = window_side(side)
        tokens, kernel, qkv_out = window * window, 7, 2 * KEY_DIM + value_dim
        args = (_tensor(device, batch, channels, side, side, dtype=dtype),
                _tensor(device, heads, qkv_out, channels // heads, dtype=dtype), _tensor(device, heads, qkv_out),
                _tensor(device, heads, KEY_DIM, kernel, kernel), _tensor(device, heads, KEY_DIM),
                _tensor(device, heads, tokens), _tensor(device, tokens, tokens, dtype=torch.int32, below=tokens),
                _tensor(device, channels, heads * value_dim, dtype=dtype), _tensor(device, channels, dtype=dtype),
                window, KEY_DIM ** -0.5, list(M5_KERNELS[:heads]))
        yield f"{batch}x{channels}x{side}x{side} heads {heads}", args


CASES: dict[str, Callable] = {"mxa_branch": mxa_branch_cases, "window_attention": window_attention_cases,
                              "cascaded_attention_infer": cascaded_attention_cases}


def check_stages(stages) -> None:
    """A clear error for a stage the ops cannot take (the ops check the rest)."""
    for stage in stages:
        channels, side, heads, value_dim = stage
        if min(stage) < 1 or channels % heads or channels < 16:
            raise ValueError(f"a stage is CHANNELS,SIDE,HEADS,VALUE_DIM with positive sizes, CHANNELS at least 16 "
                             f"(the channel attention reduces it 16-fold) and a multiple of HEADS; got "
                             f"{','.join(map(str, stage))}")


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


@contextlib.contextmanager
def unpoisoned_buffers():
    """The tests' NaN poisoning of kernel buffers (MXA_POISON_EMPTY) off meanwhile: it is no part of an op."""
    poison = os.environ.pop("MXA_POISON_EMPTY", None)
    try:
        yield
    finally:
        if poison is not None:
            os.environ["MXA_POISON_EMPTY"] = poison


def count_pass(fn: Callable[[], None]) -> tuple[OpCount, list[TritonLaunch]]:
    """The launching ATen ops and the Triton launches of one call of ``fn``."""
    count, launches = OpCount(), []
    with unpoisoned_buffers(), recording_triton_launches(launches), LaunchCounter(count):
        fn()
    return count, launches


def op_figures(name: str, batch: int = BATCH, stages=M5_STAGES) -> list[dict]:
    """Every case and pass of op ``name``: the eager and the fused path's launches and bytes, and the
    fused path's Triton launches."""
    op = mxa_kernels.OPS[name]
    module = op.kernels_module()
    rows = []
    for case, args in CASES[name](batch, stages):
        fused = module.launch_passes(*args)
        eager = eager_passes(op, args)
        for pass_name, fused_fn in fused.items():  # in order: a backward uses its forward's outputs
            flops = FlopCounterMode(display=False)
            with flops:  # the useful matrix-product FLOPs, the same math on both paths
                eager_count, _ = count_pass(eager[pass_name])
            torch_ops, triton = count_pass(fused_fn)
            rows.append(dict(op=name, case=case, pass_=pass_name, eager_flops=flops.get_total_flops(),
                             eager_launches=eager_count.launches,
                             eager_bytes=eager_count.bytes, fused_launches=torch_ops.launches + len(triton),
                             fused_bytes=torch_ops.bytes + sum(t.bytes for t in triton),
                             torch_ops=[n for n, _ in torch_ops.ops], triton=triton))
    return rows


# --- per program: loop trip counts and the tl.dot tiles' useful products ----------------------------------------

_LOOP_CALLS = {"range", "tl.range", "tl.static_range"}
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
              ast.Mod: operator.mod}


_GRID = "<grid>"  # the key of the launch's grid among the names


def _evaluate(node: ast.expr, names: dict) -> int:
    """An integer loop bound: names, constants, + - * // %, unary minus, ``tl.cdiv`` / ``triton.cdiv``
    and ``tl.num_programs`` (KeyError: something else)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.Name) and node.id in names:
        return names[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_evaluate(node.left, names), _evaluate(node.right, names))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_evaluate(node.operand, names)
    if isinstance(node, ast.Call) and ast.unparse(node.func) in ("tl.cdiv", "triton.cdiv") and len(node.args) == 2:
        numerator, denominator = (_evaluate(a, names) for a in node.args)
        return -(-numerator // denominator)
    if isinstance(node, ast.Call) and ast.unparse(node.func) == "tl.num_programs" and len(node.args) == 1:
        grid = names[_GRID]
        axis = _evaluate(node.args[0], names)
        return grid[axis] if axis < len(grid) else 1
    raise KeyError(ast.unparse(node))


def loop_trips(launch: TritonLaunch) -> list[dict]:
    """Each ``for`` loop of the launched kernel: its source line, its iterable, its trip count with
    this launch's arguments and grid (``range``, ``tl.range`` and ``tl.static_range`` bounds, evaluated,
    with the kernel's top-level scalar assignments) and the iterations of its body in one program
    (times the trips of the loops around it)."""
    import triton.language as tl

    fn = launch.kernel.fn
    lines, first = inspect.getsourcelines(fn)
    tree = ast.parse(textwrap.dedent("".join(lines)))
    names = {k: v.value for k, v in fn.__globals__.items() if isinstance(v, tl.constexpr)}
    names.update({k: v for k, v in {**launch.args, **launch.options}.items() if isinstance(v, (int, float))})
    names[_GRID] = launch.grid
    for statement in tree.body[0].body:  # the kernel's top-level scalar assignments, where they evaluate
        if isinstance(statement, ast.Assign) and len(statement.targets) == 1 and isinstance(statement.targets[0],
                                                                                               ast.Name):
            try:
                names[statement.targets[0].id] = _evaluate(statement.value, names)
            except KeyError:
                names.pop(statement.targets[0].id, None)
    for node in ast.walk(tree):  # a helper's loops would need its arguments: none has one, and none may
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            helper = fn.__globals__.get(node.func.id)
            if hasattr(helper, "fn") and any(isinstance(n, ast.For) for n in ast.walk(
                    ast.parse(textwrap.dedent(inspect.getsource(helper.fn))))):
                raise NotImplementedError(f"{launch.name} calls {node.func.id}, which has a loop: the cost "
                                          "report counts loops in kernels only")
    loops = []

    def visit(node, outer: int) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.For):
                call = child.iter
                if not (isinstance(call, ast.Call) and ast.unparse(call.func) in _LOOP_CALLS):
                    raise NotImplementedError(f"{launch.name} line {first + child.lineno - 1}: a loop over "
                                              f"{ast.unparse(call)}, not a range")
                try:
                    bounds = [_evaluate(a, names) for a in call.args]
                except KeyError as exc:
                    raise NotImplementedError(f"{launch.name} line {first + child.lineno - 1}: the bound of "
                                              f"{ast.unparse(call)} is not a function of the kernel's "
                                              f"arguments ({exc.args[0]})") from exc
                trips = len(range(*bounds))
                loops.append(dict(line=first + child.lineno - 1, loop=ast.unparse(call), trips=trips,
                                  per_program=outer * trips))
                visit(child, outer * trips)
            else:
                visit(child, outer)

    visit(tree, 1)
    return loops


@contextlib.contextmanager
def recording_dots(launches: list[dict]):
    """In Triton's interpreter (TRITON_INTERPRET=1), each launch inside the block appends to ``launches``
    its kernel, its programs and, over all its programs, the padded multiply-adds of its ``tl.dot``
    tiles (M x K x N each) and the useful ones: a row of A, a column of B or an index of the inner
    dimension whose operand slice holds only zeros or non-finite values is padding (masked loads fill
    padding with zeros; a padded row of scores, all -inf, becomes NaN after its softmax)."""
    import numpy as np
    from triton.runtime import interpreter

    builder = type(interpreter.interpreter_builder)
    run, set_grid_dim, create_dot = interpreter.GridExecutor.__call__, builder.set_grid_dim, builder.create_dot

    def recorded_run(self, *args, **kwargs):
        launches.append(dict(kernel=self.fn.__name__, programs=0, padded=0, useful=0))
        return run(self, *args, **kwargs)

    def recorded_grid(self, nx, ny, nz):
        launches[-1]["programs"] = nx * ny * nz
        return set_grid_dim(self, nx, ny, nz)

    def recorded_dot(self, a, b, d, *args):
        nonzero_a, nonzero_b = ((t.data != 0) & np.isfinite(t.data) for t in (a, b))
        rows, cols = nonzero_a.any(-1).sum(-1), nonzero_b.any(-2).sum(-1)
        inner = (nonzero_a.any(-2) & nonzero_b.any(-1)).sum(-1)
        launches[-1]["padded"] += int(np.prod(a.data.shape)) * b.data.shape[-1]
        launches[-1]["useful"] += int(np.sum(rows * inner * cols))
        return create_dot(self, a, b, d, *args)

    interpreter.GridExecutor.__call__, builder.set_grid_dim, builder.create_dot = (recorded_run, recorded_grid,
                                                                                     recorded_dot)
    try:
        yield
    finally:
        interpreter.GridExecutor.__call__, builder.set_grid_dim, builder.create_dot = run, set_grid_dim, create_dot


def interpreted_dots(ops, stages) -> list[list[dict]]:
    """The launches of every case of ``ops`` (per op, case and pass, in report order) with their
    ``tl.dot`` figures (:func:`recording_dots`), run in Triton's interpreter at batch 1 on CPU tensors
    of random values and boxes just inside the map (see :func:`_boxes`). In
    float16, which numpy holds, for bfloat16, which the interpreter multiplies wrongly: the same kernels."""
    torch.manual_seed(0)
    figures = []
    for name in ops:
        module = mxa_kernels.OPS[name].kernels_module()
        for _, args in CASES[name](1, stages, device="cpu", dtype=torch.float16):
            # an uninitialized gradient would make the useful products depend on memory
            for pass_fn in module.launch_passes(*args, grad_like=torch.randn_like).values():
                launches = []
                # numpy warns of the padding's inf and NaN
                with recording_dots(launches), warnings.catch_warnings(action="ignore", category=RuntimeWarning):
                    pass_fn()
                figures.append(launches)
    return figures


def dot_figures(ops, stages) -> list[list[dict]]:
    """:func:`interpreted_dots` in a child process with the interpreter on (this one builds for GPUs)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("MXA_POISON_EMPTY", None)
    result = subprocess.run([sys.executable, "-m", "mxa_bench.cost", "--interpreted-dots", ",".join(ops),
                             json.dumps([list(s) for s in stages])], capture_output=True, text=True, env=env)
    if result.returncode:
        raise RuntimeError(f"the interpreted run of the cost report's tl.dot figures failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout)


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

def launch_figures(launch: TritonLaunch, dots: dict, batch: int, targets: dict[str, Target], built: dict) -> dict:
    """The launch's grid and warps, its loops, its tl.dot products (``dots``: the launch's interpreted
    figures at batch 1, times ``batch``), and per target its build and occupancy (``built`` caches builds)."""
    scales = dots["programs"] * batch == launch.programs or not dots["padded"]  # (a launch without tl.dot: 0)
    if dots["kernel"] != launch.name or not scales:
        raise RuntimeError(f"the interpreted run launched {dots['kernel']} on {dots['programs']} programs at batch 1, "
                           f"the recorded one {launch.name} on {launch.programs} at batch {batch}: the tl.dot "
                           "figures would not be this launch's")
    signature, constexprs = launch_build(launch)
    num_warps = launch.options.get("num_warps", 4)
    loops = loop_trips(launch)
    figures = dict(kernel=launch.name, grid=list(launch.grid), programs=launch.programs, num_warps=num_warps,
                   bytes=launch.bytes, loops=loops, longest_loop=max((loop["per_program"] for loop in loops), default=0),
                   dot_macs_padded=dots["padded"] * batch, dot_macs_useful=dots["useful"] * batch,
                   dot_efficiency=dots["useful"] / dots["padded"] if dots["padded"] else None)
    for name, target in targets.items():
        key = (launch.name, tuple(sorted(signature.items())), tuple(sorted(map(str, constexprs.items()))), num_warps,
               name)
        if key not in built:
            built[key] = compile_for_target(launch.kernel, signature, constexprs, num_warps, target)
        figures[name] = dict(built[key], **occupancy(built[key]["registers"], built[key]["shared_bytes"], num_warps,
                                                     launch.programs, target))
    return figures


def report(ops=None, targets=None, batch: int = BATCH, stages=M5_STAGES, progress=print) -> list[dict]:
    """Records of every op (or ``ops``), case and pass: launches and bytes of both paths, and the fused
    path's Triton launches with their figures per target."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("the cost report builds the kernels for GPU targets, which the Triton interpreter "
                           "cannot: run it without TRITON_INTERPRET=1")
    check_stages(stages)
    ops = list(ops or mxa_kernels.OPS)
    targets = {name: TARGETS[name] for name in (targets or TARGETS)}
    dots = iter(dot_figures(ops, stages))
    built, records = {}, []
    for name in ops:
        for row in op_figures(name, batch, stages):
            recorded = row.pop("triton")
            interpreted = next(dots)
            if len(interpreted) != len(recorded):
                raise RuntimeError(f"{name} {row['case']}: the interpreted run launched {len(interpreted)} kernels, "
                                   f"the recorded one {len(recorded)}")
            triton = [launch_figures(launch, d, batch, targets, built) for launch, d in zip(recorded, interpreted)]
            row["pass"] = row.pop("pass_")
            # the fused path's FLOPs: its padded tile products, or the useful FLOPs where those are fewer
            row["fused_flops"] = max(row["eager_flops"], 2 * sum(t["dot_macs_padded"] for t in triton))
            model = {name: {path: round(roofline_us(row[f"{path}_bytes"], row[f"{path}_flops"],
                                                    row[f"{path}_launches"], t), 1)
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
        dots = (f"tl.dot {t['dot_efficiency']:.0%} useful of {t['dot_macs_padded'] / 1e9:.2f} G MACs"
                if t["dot_macs_padded"] else "no tl.dot")
        loops = ", ".join(f"{loop['loop']} x{loop['per_program']}" for loop in t["loops"]) or "none"
        lines.append(f"    {t['kernel']:<32} grid {'x'.join(map(str, t['grid'])):<8} warps {t['num_warps']} | {per_target}")
        lines.append(f"    {'':<32} {dots}; loop trips per program: {loops}")
    return "\n".join(lines)


# --- the gate -----------------------------------------------------------------------------------

BASELINE = os.path.join(os.path.dirname(__file__), "baselines", "cost.json")
# which way each figure gets worse: per Triton launch, and per launch and target
LAUNCH_WORSE = {"programs": "lower", "longest_loop": "higher", "dot_macs_padded": "higher", "dot_efficiency": "lower"}
TARGET_WORSE = {"registers": "higher", "spill_bytes": "higher", "resident": "lower"}


_MISSING = object()


def _key(r: dict) -> tuple:
    return r["op"], r["case"], r["pass"]


def regressions(records: list[dict], baseline: list[dict], complete: bool = True) -> tuple[list[str], list[str]]:
    """(worse, better): each figure of ``records`` worse or better than the baseline's. Worse: more
    launches or bytes on either path, another kernel, and per target more registers,
    more spill bytes or fewer resident programs, and per launch a smaller grid, a longer loop, more
    padded tl.dot products or a smaller useful share of them. ``complete``: the run covers every baseline record."""
    base = {_key(r): r for r in baseline}
    worse, better = [], []

    def compare(what: str, new, old, worse_if: str) -> None:
        if old is _MISSING:
            worse.append(f"{what}: not in the baseline (write it with --write-baseline)")
        elif new != old and None not in (new, old):  # (a kernel without tl.dot has no dot efficiency)
            got_worse = (new > old) == (worse_if == "higher")
            (worse if got_worse else better).append(f"{what}: {old} -> {new}")

    for r in records:
        name = " ".join(_key(r))
        if _key(r) not in base:
            worse.append(f"{name}: not in the baseline (write it with --write-baseline)")
            continue
        b = base.pop(_key(r))
        for field_name in ("eager_launches", "eager_bytes", "fused_launches", "fused_bytes"):
            compare(f"{name} {field_name}", r[field_name], b.get(field_name, _MISSING), "higher")
        if [t["kernel"] for t in r["triton"]] != [t["kernel"] for t in b["triton"]]:
            worse.append(f"{name}: Triton launches {[t['kernel'] for t in b['triton']]} -> "
                         f"{[t['kernel'] for t in r['triton']]}")
            continue
        for t, bt in zip(r["triton"], b["triton"]):
            for figure, worse_if in LAUNCH_WORSE.items():
                compare(f"{name} {t['kernel']} {figure}", t[figure], bt.get(figure, _MISSING), worse_if)
            for target in sorted(set(r["targets"]) & set(b["targets"])):
                for figure, worse_if in TARGET_WORSE.items():
                    compare(f"{name} {t['kernel']} {target} {figure}", t[target][figure], bt[target].get(figure, _MISSING), worse_if)
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
    batch = BATCH if args.batch is None else args.batch
    if batch < 1:
        raise ValueError(f"--batch must be at least 1, got {batch}")
    stages = tuple(Stage(*s) for s in args.stage) if args.stage else M5_STAGES
    check_stages(stages)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise ValueError("the cost suite builds the kernels for GPU targets, which the Triton interpreter cannot: "
                         "run it without TRITON_INTERPRET=1")
    print(f"cost report: static figures of the fused ops at batch {batch}, {str(DTYPE).removeprefix('torch.')}, "
          f"stages (channels, side, heads, value dim) {', '.join('x'.join(map(str, s)) for s in stages)}; no GPU: "
          "launches and bytes on meta tensors, registers, spills and shared memory from Triton's compiler and "
          "ptxas, loop trips from the kernels' source, tl.dot products in Triton's interpreter; not "
          "measurements\ntargets: " + "; ".join(
              f"{n} ({t.name}: {t.sms} SMs, {t.registers} registers, {t.shared_bytes // 1024} KB shared memory, "
              f"{t.max_warps} warps per SM)" for n, t in TARGETS.items())
          + "\nroofline model (a lower bound, not a measurement): max(bytes / copy bandwidth, FLOPs / bf16 peak) "
          "+ launches x a launch cost, FLOPs: eager the useful ones, fused the padded tl.dot ones; " + "; ".join(
              f"{n}: {t.copy_bytes_per_s / 1e12:.1f} TB/s, {t.bf16_flops_per_s / 1e12:.0f} TFLOP/s, "
              f"{t.launch_s * 1e6:.0f} us per launch" for n, t in TARGETS.items()), flush=True)
    records = report(ops, batch=batch, stages=stages, progress=lambda line: print(line, flush=True))
    if args.json:
        write_baseline(args.json, records)
        print(f"wrote {args.json}")
    if args.write_baseline:
        write_baseline(args.write_baseline, records)
        print(f"wrote the baseline {args.write_baseline}")
        return 0
    if batch != BATCH or stages != M5_STAGES:
        print(f"(the baseline holds M5's stages at batch {BATCH}: not compared)")
        return 0
    with open(args.baseline or BASELINE) as f:
        worse, better = regressions(records, json.load(f), complete=ops is None)
    for line in better:
        print(f"better: {line} (update the baseline: --write-baseline {os.path.relpath(BASELINE)})")
    for line in worse:
        print(f"regression: {line}")
    print(f"{len(worse)} figure(s) worse and {len(better)} better than {args.baseline or os.path.relpath(BASELINE)}")
    return 1 if worse else 0


if __name__ == "__main__":  # the interpreted run of dot_figures: --interpreted-dots OPS STAGES_JSON
    if len(sys.argv) != 4 or sys.argv[1] != "--interpreted-dots":
        sys.exit("usage: python -m mxa_bench.cost --interpreted-dots OP[,OP...] '[[C, SIDE, HEADS, DV], ...]'")
    print(json.dumps(interpreted_dots(sys.argv[2].split(","), [Stage(*s) for s in json.loads(sys.argv[3])])))
