"""A GPU time model, calibrated on published measurements (``mxa bench --suite predict``).

No GPU has run this project; timm publishes inference throughput for its models on several cards
(``bench/published/``, rows copied verbatim with their source). This module predicts the time of a
model's forward (and training step) on a named card from two inputs only: the model's operations
(counted on meta tensors, as the cost report counts them: every launching ATen op with the bytes of its
tensor inputs and outputs and its FLOPs) and the card's table (:data:`CARDS`). It stores no measured
figure of any model.

**The model.** Each operation costs the longest of its memory time, its tensor-core time and, for a grouped
or depthwise convolution, its CUDA-core time; the first two have a start-up term that grows with the
card's SM count (a small operation cannot fill a large GPU):

    t_op = max((bytes + bytes_per_sm * SMs) / (bandwidth * bandwidth_share),
               (tc_flops + flops_per_sm * SMs) / (tensor_flops * tensor_share),
               cuda_flops / (cuda_flops_of_the_card * cuda_share))

``tc_flops`` are the FLOPs of matrix products, attention and non-grouped convolutions, ``cuda_flops``
those of grouped convolutions, whose share differs between NCHW maps (eager) and the channels_last
layout ``torch.compile`` gives convolutions. Six constants (:class:`TimeModel`) are fitted, shared by
every card. ``torch.compile`` is modelled by Inductor's fusion of the operations between two matrix
products or convolutions into one kernel that moves as many bytes as the largest of them (the
intermediates stay on chip). A per-launch cost and an L2-cache term were tried: the fit set both to
zero at batch 1024, and they were removed.

**Calibration and validation, apart.** The constants are fitted on the RTX 4090 tables (eager and
``torch.compile``) for the models of :data:`FIT_FAMILIES` only; the errors are reported on the other
cards' tables (RTX 5090, RTX Pro 6000 Max-Q: same PyTorch 2.9.1; RTX 3090: PyTorch 2.4) and on the
model families left out of the fit, beside three naive predictors fitted on the same rows.

The counts approximate timm's AMP benchmark: the model reparameterized where timm can (the published
figures of MobileOne and RepVGG match their fused inference forms: counted with their training-time
branches, MobileOne-S0 came out six times too slow) and in float16 (autocast keeps norms and softmax in float32, and casts weights
each call: both left out), ``F.scaled_dot_product_attention`` as one fused kernel. A training step is
its forward, backward and fused AdamW pass counted the same way; the published tables hold inference
only, so the training figures carry the inference calibration's error, unvalidated.
"""

from __future__ import annotations

import csv
import functools
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from .cost import CASES, NO_KERNEL, _is_view, eager_passes, recording_triton_launches, tensor_bytes, unpoisoned_buffers
from .cases import M5_STAGES

PUBLISHED = Path(__file__).with_name("published")


@dataclass(frozen=True)
class Card:
    name: str
    sms: int
    bandwidth: float  # memory bandwidth, bytes/s
    tensor_flops: float  # dense float16 tensor-core FLOP/s with float32 accumulation (what AMP's products use)
    cuda_flops: float  # float32 FLOP/s of the CUDA cores (grouped and depthwise convolutions run there)
    source: str


CARDS = {
    "H100": Card("NVIDIA H100 SXM5 80 GB", 132, 3.35e12, 989.4e12, 67e12,
                 "NVIDIA H100 Tensor Core GPU datasheet: 3.35 TB/s, BF16/FP16 1,979 TFLOPS with sparsity"),
    "H200": Card("NVIDIA H200 SXM 141 GB", 132, 4.8e12, 989.4e12, 67e12,
                 "NVIDIA H200 Tensor Core GPU datasheet: 4.8 TB/s, BF16/FP16 1,979 TFLOPS with sparsity"),
    "A100": Card("NVIDIA A100 SXM4 80 GB", 108, 2.039e12, 312e12, 19.5e12,
                 "NVIDIA A100 Tensor Core GPU datasheet: 2,039 GB/s, BF16/FP16 312 TFLOPS"),
    "L4": Card("NVIDIA L4", 58, 300e9, 121e12, 30.3e12, "NVIDIA L4 datasheet: 300 GB/s, FP16 242 TFLOPS with sparsity"),
    "RTX3090": Card("NVIDIA GeForce RTX 3090", 82, 936e9, 71e12, 35.6e12,
                    "NVIDIA Ampere GA102 GPU architecture whitepaper: 936 GB/s, FP16 tensor with FP32 "
                    "accumulate 71 TFLOPS dense"),
    "RTX4090": Card("NVIDIA GeForce RTX 4090", 128, 1008e9, 165.2e12, 82.6e12,
                    "NVIDIA Ada GPU architecture whitepaper: 1,008 GB/s, FP16 tensor with FP32 accumulate "
                    "165.2 TFLOPS dense"),
    "RTX5090": Card("NVIDIA GeForce RTX 5090", 170, 1792e9, 209.5e12, 104.8e12,
                    "NVIDIA RTX Blackwell GPU architecture whitepaper: 1,792 GB/s, FP16 tensor with FP32 "
                    "accumulate 209.5 TFLOPS dense"),
    # a 300 W card: the throughputs at its base clock (1,590 MHz), which it holds under a sustained load,
    # from the 600 W card's at 2,617 MHz (503.8 TFLOPS FP16 tensor with FP32 accumulate, 126 TFLOPS FP32)
    "RTXPRO6000MAXQ": Card("NVIDIA RTX PRO 6000 Blackwell Max-Q", 188, 1792e9, 306e12, 76.5e12,
                           "NVIDIA RTX PRO 6000 Blackwell Max-Q Workstation Edition datasheet: 188 SMs, 1,792 GB/s, "
                           "300 W, base clock 1,590 MHz; throughputs scaled from the 600 W edition's"),
}

# the published tables (their names give the PyTorch and CUDA releases): file, card, compiled (torch.compile)
TABLES = (
    ("benchmark-infer-amp-nchw-pt291-cu128-4090.csv", "RTX4090", False),
    ("benchmark-infer-amp-nchw-pt291-cu128-4090-dynamo.csv", "RTX4090", True),
    ("benchmark-infer-amp-nchw-pt291-cu130-5090.csv", "RTX5090", False),
    ("benchmark-infer-amp-nchw-pt291-cu130-5090-dynamo.csv", "RTX5090", True),
    ("benchmark-infer-amp-nchw-pt291-cu130-pro6000maxq.csv", "RTXPRO6000MAXQ", False),
    ("benchmark-infer-amp-nchw-pt291-cu130-pro6000maxq-dynamo.csv", "RTXPRO6000MAXQ", True),
    ("benchmark-infer-amp-nchw-pt240-cu124-rtx3090.csv", "RTX3090", False),
)
FIT_CARD = "RTX4090"
FEATURE_BATCH = 1024  # the batch the timm models' operations are counted at (the tables' usual batch)
# the model families the constants are fitted on (name prefixes); every other family is held out
FIT_FAMILIES = ("resnet", "resnext", "wide_resnet", "seresnet", "regnet", "efficientnet", "tf_efficientnetv2",
                "mobilenetv2", "mobilenetv3", "convnext", "vit_", "deit_", "mixer", "vgg", "dla", "ghostnet",
                "mnasnet", "rexnet", "hgnetv2", "lcnet")


def family_fitted(model: str) -> bool:
    return model.startswith(FIT_FAMILIES)


class Op(NamedTuple):
    name: str
    bytes: int
    tc_flops: int  # FLOPs on the tensor cores (matrix products, non-grouped convolutions)
    cuda_flops: int = 0  # FLOPs of grouped and depthwise convolutions, on the CUDA cores

    @property
    def product(self) -> bool:
        return self.tc_flops > 0 or self.cuda_flops > 0


_PRODUCTS = {"mm", "addmm", "bmm", "baddbmm", "convolution", "convolution_backward"}


class OpCounter(TorchDispatchMode):
    """Records each launching ATen op (no views or allocations) with its bytes and tensor-core FLOPs;
    ``F.scaled_dot_product_attention`` (which a GPU runs as one fused kernel, and meta tensors as its math)
    is recorded as one operation, by :class:`AttentionAsOneOp`."""

    def __init__(self):
        super().__init__()
        self.ops: list[Op] = []
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        produced = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        if produced and not _is_view(func) and name not in NO_KERNEL and not self.paused:
            consumed = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            flops = 0
            grouped = name in ("convolution", "convolution_backward") and _groups(name, args, kwargs) > 1
            if name in _PRODUCTS and func.overloadpacket in flop_registry:
                flops = int(flop_registry[func.overloadpacket](*args, **kwargs, out_val=out))
            moved = sum(tensor_bytes(t) for t in consumed + produced)
            self.ops.append(Op(name, moved, 0, flops) if grouped else Op(name, moved, flops))
        return out


class AttentionAsOneOp(TorchFunctionMode):
    """``F.scaled_dot_product_attention`` as one operation of ``counter``: its query, key, value and output
    bytes and its two products' FLOPs (a fused attention kernel's), its math uncounted."""

    def __init__(self, counter: OpCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) != "scaled_dot_product_attention":
            return func(*args, **kwargs)
        q, k, v = args[:3]
        self.counter.paused = True
        try:
            out = func(*args, **kwargs)
        finally:
            self.counter.paused = False
        flops = 2 * q.shape[:-1].numel() * k.shape[-2] * (q.shape[-1] + v.shape[-1])
        self.counter.ops.append(Op("attention", sum(tensor_bytes(t) for t in (q, k, v, out)), flops))
        return out


def _groups(name: str, args, kwargs) -> int:
    # convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups);
    # convolution_backward(grad, input, weight, bias_sizes, stride, padding, dilation, transposed, output_padding,
    # groups, output_mask)
    index = 8 if name == "convolution" else 9
    return int(args[index]) if len(args) > index else int(kwargs.get("groups", 1))


def count_ops(model: torch.nn.Module, shape: tuple[int, ...], train: bool = False,
              counter: OpCounter | None = None) -> list[Op]:
    """The operations of ``model``'s forward (and, with ``train``, backward) on a float16 batch of
    ``shape``, on meta tensors: ``model`` must be on the meta device, in float16."""
    x = torch.empty(shape, device="meta", dtype=torch.float16)
    counter = counter or OpCounter()
    if train:
        model.train()
        with AttentionAsOneOp(counter), counter:
            out = model(x)
            out = out[0] if isinstance(out, (tuple, list)) else out
            out.float().sum().backward()
    else:
        model.eval()
        with torch.no_grad(), AttentionAsOneOp(counter), counter:
            model(x)
    return counter.ops


@functools.cache
def timm_ops(name: str, batch: int) -> tuple[int, list[Op]]:
    """The input side of timm's ``name`` (its default configuration's, as timm's benchmark runs it) and
    :func:`count_ops` of it there (3 channels)."""
    import timm

    from timm.utils.model import reparameterize_model

    side = timm.get_pretrained_cfg(name).input_size[-1]
    with torch.device("meta"):
        # reparameterized: the published figures of MobileOne, RepVGG, FastViT... are those of their fused
        # inference forms (see the module's docstring)
        model = reparameterize_model(timm.create_model(name).eval()).half()
    return side, count_ops(model, (batch, 3, side, side))


@dataclass(frozen=True)
class TimeModel:
    """The fitted constants (shared by every card)."""

    bandwidth_share: float = 0.8
    bytes_per_sm: float = 2e5
    tensor_share: float = 0.6
    flops_per_sm: float = 2e8
    cuda_share: float = 0.3  # of grouped convolutions in channels_last, as torch.compile lays them out
    cuda_share_nchw: float = 0.4  # of grouped convolutions on NCHW maps (eager), cuDNN's other kernels

    def seconds(self, ops: "OpArrays", card: Card, scale: float = 1.0, compiled: bool = False) -> float:
        """The time of ``ops`` on ``card``, their bytes and FLOPs times ``scale`` (another batch size)."""
        memory = (ops.bytes * scale + self.bytes_per_sm * card.sms) / (card.bandwidth * self.bandwidth_share)
        compute = (ops.tc_flops * scale + self.flops_per_sm * card.sms) / (card.tensor_flops * self.tensor_share)
        compute = compute * (ops.tc_flops > 0)
        cores = ops.cuda_flops * scale / (card.cuda_flops * (self.cuda_share if compiled else self.cuda_share_nchw))
        return float(np.maximum(np.maximum(memory, compute), cores).sum())


def ops_seconds(model: TimeModel, ops: list[Op], card: Card, compiled: bool = False) -> float:
    """The time of ``ops`` on ``card``, eager or as torch.compile fuses them."""
    return model.seconds(OpArrays.of(fuse_for_compile(ops) if compiled else ops), card, compiled=compiled)


class OpArrays(NamedTuple):
    """A list of operations as arrays, for the time model."""

    bytes: np.ndarray
    tc_flops: np.ndarray
    cuda_flops: np.ndarray

    @classmethod
    def of(cls, ops: list[Op]) -> "OpArrays":
        return cls(*(np.array(column, dtype=float) for column in zip(*[(o.bytes, o.tc_flops, o.cuda_flops)
                                                                          for o in ops])))


def fuse_for_compile(ops: list[Op]) -> list[Op]:
    """Inductor's fusion, as modelled: the operations between two matrix products become one kernel that
    moves as many bytes as the largest of them."""
    fused, run = [], []
    for op in ops + [None]:
        if op is not None and not op.product:
            run.append(op)
            continue
        if run:
            fused.append(Op("fused", max(o.bytes for o in run), 0))
            run = []
        if op is not None:
            fused.append(op)
    return fused


class Row(NamedTuple):
    """One published measurement."""

    model: str
    img_size: int
    images_per_s: float
    batch: int
    gmacs: float
    macts: float  # millions of activations per image
    card: str
    compiled: bool


def published_rows() -> list[Row]:
    rows = []
    for table, card, compiled in TABLES:
        with (PUBLISHED / table).open(newline="") as f:
            for r in csv.DictReader(f):
                rows.append(Row(r["model"], int(r["infer_img_size"]), float(r["infer_samples_per_sec"]),
                                int(r["infer_batch_size"]), float(r["infer_gmacs"]), float(r["infer_macts"]), card,
                                compiled))
    return rows


def features(ops: list[Op]) -> dict[bool, OpArrays]:
    """A model's operations for the time model, eager (False) and as ``torch.compile`` fuses them (True),
    made once for the fit's many evaluations."""
    return {False: OpArrays.of(ops), True: OpArrays.of(fuse_for_compile(ops))}


def fit(rows: list[Row], model_features: dict, start: TimeModel = TimeModel()) -> TimeModel:
    """The constants that minimize the squared log error of images/s over ``rows`` (``model_features``:
    :func:`features` by (model, side))."""
    from scipy.optimize import least_squares

    names = [f.name for f in fields(TimeModel)]

    def residuals(logs):
        model = TimeModel(**dict(zip(names, np.exp(logs))))
        return [math.log(predicted_images_per_s(model, row, model_features) / row.images_per_s) for row in rows]

    x0 = np.log([getattr(start, n) for n in names])
    found = least_squares(residuals, x0, bounds=(x0 - 12, x0 + 12))
    return TimeModel(**{n: float(v) for n, v in zip(names, np.exp(found.x))})


def predicted_images_per_s(model: TimeModel, row: Row, model_features: dict) -> float:
    """``model_features`` were counted at FEATURE_BATCH images: a row of another batch scales their bytes
    and FLOPs (the weights' share of the bytes, which does not grow with the batch, is negligible there)."""
    ops = model_features[(row.model, row.img_size)][row.compiled]
    return row.batch / model.seconds(ops, CARDS[row.card], row.batch / FEATURE_BATCH, row.compiled)


# --- the naive predictors the time model must beat, fitted on the same rows -------------------------------------

def _log_mean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


class Naive:
    """images/s = k / GMACs (scaled to a card by its tensor throughput), k / activations (by its
    bandwidth), or 1 / (a GMACs + b activations + c) by least squares (by its bandwidth); one fit for the
    eager rows and one for the compiled ones."""

    def __init__(self, rows: list[Row]):
        assert len({r.card for r in rows}) == 1, "fitted on one card's rows"
        self.k_macs, self.k_acts, self.linear = {}, {}, {}
        for compiled in (False, True):
            part = [r for r in rows if r.compiled == compiled]
            card = CARDS[part[0].card]
            self.k_macs[compiled] = _log_mean(r.images_per_s * r.gmacs / card.tensor_flops for r in part)
            self.k_acts[compiled] = _log_mean(r.images_per_s * r.macts / card.bandwidth for r in part)
            a = np.array([[r.gmacs, r.macts, 1.0] for r in part])
            t = np.array([1.0 / r.images_per_s * card.bandwidth for r in part])
            self.linear[compiled] = np.linalg.lstsq(a, t, rcond=None)[0]

    def predict(self, row: Row) -> dict[str, float]:
        card = CARDS[row.card]
        a, b, c = self.linear[row.compiled]
        time = (a * row.gmacs + b * row.macts + c) / card.bandwidth
        return {"1/GMACs": self.k_macs[row.compiled] * card.tensor_flops / row.gmacs,
                "1/activations": self.k_acts[row.compiled] * card.bandwidth / row.macts,
                "linear": 1.0 / time if time > 0 else float("inf")}


def error_stats(errors: list[float]) -> dict:
    """Median and 90th percentile of absolute relative errors."""
    ordered = sorted(errors)
    if not ordered:
        return {"rows": 0, "median": None, "p90": None}

    def quantile(q: float) -> float:  # numpy's default (linear) interpolation, without inf - inf
        position = q * (len(ordered) - 1)
        low = math.floor(position)
        share = position - low
        return ordered[low] if share == 0 else ordered[low] * (1 - share) + ordered[low + 1] * share

    return {"rows": len(ordered), "median": quantile(0.5), "p90": quantile(0.9)}


# --- calibration, validation and the project's predictions ----------------------------------------------------

# the rows by what the fit saw of them: the fitting rows; other families on the fitting card; the fitted
# families on the other cards; neither the family nor the card
GROUPS = ("fitted", "held-out families, RTX 4090", "fitted families, other cards", "held-out families, other cards")
PREDICTORS = ("time model", "linear", "1/GMACs", "1/activations")


def _group(row: Row) -> str:
    fitted_family, fitting_card = family_fitted(row.model), row.card == FIT_CARD
    if fitting_card:
        return "fitted" if fitted_family else "held-out families, RTX 4090"
    return "fitted families, other cards" if fitted_family else "held-out families, other cards"


def calibrate(progress=print) -> dict:
    """Count every published model's operations, fit the constants on the fitting rows, and measure every
    predictor's error by group and mode: ``{"constants", "rows", "errors": {mode: {group: {predictor:
    stats}}}}``."""
    rows = published_rows()
    model_features = {}
    for name in sorted({r.model for r in rows}):
        side, ops = timm_ops(name, FEATURE_BATCH)
        model_features[(name, side)] = features(ops)
    progress(f"counted the operations of {len(model_features)} timm models")
    rows = [r for r in rows if (r.model, r.img_size) in model_features]  # each model at its default side
    fitting = [r for r in rows if _group(r) == "fitted"]
    model = fit(fitting, model_features)
    naive = Naive(fitting)
    errors: dict = {}
    for row in rows:
        predicted = {"time model": predicted_images_per_s(model, row, model_features), **naive.predict(row)}
        by_predictor = errors.setdefault("compiled" if row.compiled else "eager", {}).setdefault(_group(row), {})
        for name, value in predicted.items():
            by_predictor.setdefault(name, []).append(abs(value - row.images_per_s) / row.images_per_s)
    stats = {mode: {group: {name: error_stats(values) for name, values in by_predictor.items()}
                    for group, by_predictor in groups.items()} for mode, groups in errors.items()}
    return {"constants": model, "rows": len(rows), "fitting_rows": len(fitting), "errors": stats}


def format_calibration(result: dict) -> str:
    lines = [f"calibrated on {result['fitting_rows']} rows (RTX 4090, eager and torch.compile, families "
             f"{', '.join(f.rstrip('_') for f in FIT_FAMILIES)}); {result['rows']} published rows in all",
             "constants: " + ", ".join(f"{f.name} {getattr(result['constants'], f.name):.3g}"
                                       for f in fields(TimeModel)),
             "absolute error of images/s, median / 90th percentile:",
             f"{'mode':9s}{'rows':34s}{'n':>5s}" + "".join(f"{p:>17s}" for p in PREDICTORS)]
    for mode in ("eager", "compiled"):
        for group in GROUPS:
            by = result["errors"][mode].get(group)
            if not by:
                continue
            cells = "".join(f"{by[p]['median']:>9.0%} / {by[p]['p90']:<5.0%}" for p in PREDICTORS)
            lines.append(f"{mode:9s}{group:34s}{by['time model']['rows']:>5d}{cells}")
    return "\n".join(lines)


PROJECT_MODELS = ("mxa_efficientvit_m5",)


@functools.cache  # predictions, triton_seconds and op_verdicts ask for the same counts
def project_ops(name: str, batch: int, train: bool) -> tuple[list[Op], dict[str, list[range]]]:
    """The operations of one of the project's models (1 channel, 14 labels, 224 px, eager backend) on
    ``batch`` images, and in inference where each fused op's work is among them: the positions of each
    MXA branch call's operations and of each attention block's (what the cascade replaces), in block
    order. A training step adds the fused AdamW's pass over the weights (the weights, gradients and two
    moments read, three written: 28 bytes a float32 parameter)."""
    import mxa_kernels
    import mxa_model
    from mxa_model.cascaded_attention import FusedLocalWindowAttention

    with torch.device("meta"):
        model = mxa_model.create_model(name, num_classes=14, in_chans=1, img_size=224).half()
    model.set_backend("eager")
    counter, spans = OpCounter(), {"mxa_branch": [], "cascaded_attention_infer": []}

    def spanned(key, fn):
        def call(*args, **kwargs):
            start = len(counter.ops)
            out = fn(*args, **kwargs)
            spans[key].append(range(start, len(counter.ops)))
            return out
        return call

    attention = [m for m in model.modules() if isinstance(m, FusedLocalWindowAttention)]
    real_branch = mxa_kernels.mxa_branch
    for module in attention:
        module.forward = spanned("cascaded_attention_infer", module.forward)
    mxa_kernels.mxa_branch = spanned("mxa_branch", real_branch)
    try:
        ops = count_ops(model, (batch, 1, 224, 224), train=train, counter=counter)
    finally:
        mxa_kernels.mxa_branch = real_branch
    if train:
        ops.append(Op("adamw", 28 * sum(p.numel() for p in model.parameters()), 0))
    return ops, spans


@functools.cache
def fused_cases(batch: int, train: bool) -> dict[str, list[tuple[str, list[tuple[list[Op], list[Op]]]]]]:
    """MXA-EfficientViT-M5's fused ops at its stage shapes (the cost report's cases, align mode): per op
    (the MXA branch; the cascade in inference, each head's windowed attention in training) and per stage,
    the case's name and, per pass (forward, and backward in training), the operations of the op's eager
    reference and those of its fused path: its Triton launches with their compulsory bytes, sharing the
    product FLOPs the PyTorch ops between them leave, and those ops."""
    import mxa_kernels

    found = {}
    for name in ("mxa_branch", "window_attention") if train else ("mxa_branch", "cascaded_attention_infer"):
        op = mxa_kernels.OPS[name]
        kernels = op.kernels_module()
        for shape in M5_STAGES:
            case, args = next((case, args) for case, args in CASES[name](batch, [shape], dtype=torch.float16)
                              if name != "mxa_branch" or case.startswith("align"))
            eager, fused = eager_passes(op, args), kernels.launch_passes(*args)
            passes = []
            for pass_name in ("forward", "backward") if train else ("forward",):
                eager_ops, _ = _count_with_launches(eager[pass_name])
                torch_ops, launches = _count_with_launches(fused[pass_name])
                flops = max(0, sum(o.tc_flops for o in eager_ops) - sum(o.tc_flops for o in torch_ops))
                moved = sum(t.bytes for t in launches)
                passes.append((eager_ops, torch_ops + [Op(t.name, t.bytes, flops * t.bytes // moved)
                                                       for t in launches]))
            found.setdefault(name, []).append((case, passes))
    return found


def _count_with_launches(fn) -> tuple[list[Op], list]:
    counter, launches = OpCounter(), []
    with unpoisoned_buffers(), recording_triton_launches(launches), counter:
        fn()
    return counter.ops, launches


def triton_seconds(model: TimeModel, card: Card, batch: int, train: bool, compiled: bool) -> float:
    """MXA-EfficientViT-M5's step on the triton backend. In inference each MXA branch call's and each
    attention block's operations are replaced by the fused path's (the cascade takes the whole block).
    In a training step, whose backward operations cannot be told apart by block, each fused op call
    changes the time by its fused path's minus its eager reference's (whose operations stand for the
    model's own)."""
    from mxa_model.efficientvit import VARIANTS

    ops, spans = project_ops("mxa_efficientvit_m5", batch, train)
    cases = fused_cases(batch, train)
    depth = VARIANTS["mxa_efficientvit_m5"]["depth"]
    stage_of_block = [stage for stage, blocks in enumerate(depth) for _ in range(blocks)]
    if not train:
        replaced = {i for calls in spans.values() for call in calls for i in call}
        kept = [op for i, op in enumerate(ops) if i not in replaced]
        for name, calls in spans.items():
            assert len(calls) == len(stage_of_block), (name, len(calls))  # one call per block
            kept += [o for block in range(len(calls)) for o in cases[name][stage_of_block[block]][1][0][1]]
        return ops_seconds(model, kept, card, compiled)
    heads = VARIANTS["mxa_efficientvit_m5"]["num_heads"]
    change = 0.0
    for name, per_stage in cases.items():
        for stage, (_, passes) in enumerate(per_stage):
            calls = depth[stage] * (heads[stage] if name == "window_attention" else 1)
            for eager_ops, fused_ops in passes:
                change += calls * (ops_seconds(model, fused_ops, card, compiled)
                                   - ops_seconds(model, eager_ops, card, compiled))
    return ops_seconds(model, ops, card, compiled) + change


def predictions(card: str, names, batch: int, result: dict) -> list[dict]:
    """Predicted images/s of each model, inference and training step, by provider (eager, torch.compile;
    MXA-EfficientViT-M5 also triton and triton+compile: :func:`triton_seconds`), with the calibration's
    error on held-out rows of the same mode beside each."""
    model, found = result["constants"], []
    for name in names:
        project = name.startswith("mxa_")  # the project's models (VARIANTS), counted with a training step
        for train in (False, True) if project else (False,):
            ops = project_ops(name, batch, train)[0] if project else timm_ops(name, batch)[1]
            for compiled in (False, True):
                providers = {"torch.compile" if compiled else "eager":
                             ops_seconds(model, ops, CARDS[card], compiled)}
                if name == "mxa_efficientvit_m5":
                    providers["triton+compile" if compiled else "triton"] = triton_seconds(
                        model, CARDS[card], batch, train, compiled)
                band = result["errors"]["compiled" if compiled else "eager"]["held-out families, other cards"]
                for provider, time in providers.items():
                    found.append(dict(model=name, card=card, batch=batch, mode="train" if train else "inference",
                                      provider=provider, images_per_s=batch / time,
                                      error_median=band["time model"]["median"], error_p90=band["time model"]["p90"],
                                      fitted=family_fitted(name), kind="prediction"))
    return found


def op_verdicts(card: str, batch: int, model: TimeModel) -> list[dict]:
    """Each fused op at MXA-EfficientViT-M5's stage shapes: the time model's microseconds per call of its
    eager reference and of its fused path (launches and the PyTorch ops between them), per pass."""
    found = []
    for train in (True, False):
        for name, per_stage in fused_cases(batch, train).items():
            if not train and name == "mxa_branch":  # its forward is the training cases' already
                continue
            for case, passes in per_stage:
                for pass_name, (eager_ops, fused_ops) in zip(("forward", "backward"), passes):
                    found.append(dict(op=name, case=case, pass_=pass_name,
                                      eager_us=1e6 * ops_seconds(model, eager_ops, CARDS[card]),
                                      fused_us=1e6 * ops_seconds(model, fused_ops, CARDS[card]),
                                      eager_ops=len(eager_ops), fused_ops=len(fused_ops)))
    return found


def format_verdicts(records: list[dict]) -> str:
    lines = [f"{'op':26s}{'case':30s}{'pass':10s}{'eager us':>10s}{'fused us':>10s}  operations"]
    for r in records:
        lines.append(f"{r['op']:26s}{r['case']:30s}{r['pass_']:10s}{r['eager_us']:>10.1f}{r['fused_us']:>10.1f}  "
                     f"{r['eager_ops']} -> {r['fused_ops']}")
    return "\n".join(lines)


def format_predictions(records: list[dict]) -> str:
    lines = [f"{'model':24s}{'mode':11s}{'provider':15s}{'images/s':>10s}   {'held-out error':>22s}  fitted"]
    for r in records:
        lines.append(f"{r['model']:24s}{r['mode']:11s}{r['provider']:15s}{r['images_per_s']:>10,.0f}   "
                     f"median {r['error_median']:.0%}, p90 {r['error_p90']:.0%}   {'yes' if r['fitted'] else 'no'}")
    return "\n".join(lines)


def baseline_of(result: dict) -> dict:
    """What ``--write-baseline`` keeps of a calibration: the constants and the time model's errors."""
    return {"constants": vars(result["constants"]),
            "errors": {mode: {group: by["time model"] for group, by in groups.items()}
                       for mode, groups in result["errors"].items()}}


def main(args) -> int:
    """``mxa bench --suite predict``: calibrate, print the calibration table, predict."""
    import timm

    from mxa_model.efficientvit import VARIANTS

    from .runner import BenchError

    card, batch = args.card or "H100", 256 if args.batch is None else args.batch
    if card not in CARDS:
        raise BenchError(f"--card {card}: not a card of the table; one of {', '.join(CARDS)}")
    if batch < 1:
        raise BenchError(f"--batch must be at least 1, got {batch}")
    names = args.models.split(",") if args.models else list(PROJECT_MODELS)
    unknown = [n for n in names if n not in VARIANTS and not (timm.is_model(n) and timm.get_pretrained_cfg(n))]
    if unknown:
        raise BenchError(f"--models: {', '.join(unknown)}: neither the project's models ({', '.join(VARIANTS)}) "
                         "nor timm's with a default configuration")
    result = calibrate()
    print(format_calibration(result))
    records = predictions(card, names, batch, result)
    print(f"\npredicted on {CARDS[card].name} ({CARDS[card].source}); a model's prediction, not a measurement:")
    print(format_predictions(records))
    verdicts = op_verdicts(card, batch, result["constants"])
    print(f"\nthe fused ops at MXA-EfficientViT-M5's stage shapes on {CARDS[card].name}, the model's time per call:")
    print(format_verdicts(verdicts))
    if args.json:
        Path(args.json).write_text(json.dumps({"calibration": {**result, "constants": vars(result["constants"])},
                                               "predictions": records, "fused_ops": verdicts},
                                              indent=2, default=str) + "\n")
    if args.write_baseline:
        Path(args.write_baseline).write_text(json.dumps(baseline_of(result), indent=2) + "\n")
        print(f"wrote {args.write_baseline}")
    return 0
