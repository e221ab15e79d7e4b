"""Benchmark cases: what is timed, on which inputs, by which providers.

A case builds its inputs once and hands the runner, for every provider and mode, a call with no
arguments. Providers:

- ``eager``: the eager PyTorch reference (kernel level), timm's module (windowed-attention block), the
  MXA block or model on the eager backend;
- ``triton``: the fused Triton kernels (the op, or the module / model on the triton backend);
- ``triton+compile``: ``torch.compile`` (full graph) of the triton provider: the fused ops inside a
  compiled graph (they are ``torch.library`` ops, so Inductor compiles the PyTorch code around them);
- ``torch.compile`` and ``torch.compile max-autotune``: ``torch.compile`` of the eager provider;
- ``per-sample loop``: the authors' MXA branch, one crop and resize per sample (crop mode only);
- ``sdpa``: ``F.scaled_dot_product_attention`` on window copies with the bias as its mask;
- ``timm plain``: timm's EfficientViT of the same variant without MXA (model level).

The ``densenet121_teacher`` case times the distillation teacher's forward as a distilled training step
runs it, beside the student's step: ``eager`` is the teacher without ``--compile``, ``torch.compile``
with it.

Modes: ``forward`` and ``forward+backward`` (kernels and blocks; backward with a fixed output
gradient), ``inference`` (eval mode under ``torch.inference_mode``), ``train`` (models: forward,
backward and an AdamW step). Forward and inference calls return their output, the others the
gradients they computed; the runner compares them with the first provider's.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import timm
import torch
import torch.nn.functional as F
from timm.models.efficientvit_msra import LocalWindowAttention

import mxa_kernels
import mxa_model
from mxa_kernels.ops.window_attention import partition_windows
from mxa_model.cascaded_attention import FusedLocalWindowAttention
from mxa_model.mxa import MedicalXRayAttention

# providers whose outputs are not the reference's computation (another model), so not compared with it
OTHER_MODELS = ("timm plain",)
PROVIDERS = ("eager", "triton", "triton+compile", "torch.compile", "torch.compile max-autotune", "per-sample loop",
             "sdpa", "timm plain")
# torch.compile of the eager provider, by mode
COMPILE_MODES = {"torch.compile": "default", "torch.compile max-autotune": "max-autotune"}
TRITON_COMPILE = "triton+compile"
TRITON_PROVIDERS = ("triton", TRITON_COMPILE)  # the providers that run the fused kernels
COMPILED = (*COMPILE_MODES, TRITON_COMPILE)  # the providers whose calls run compiled code


class Stage(NamedTuple):
    channels: int
    side: int  # the map's side at 224 px
    heads: int
    value_dim: int  # one head's value width


# MXA-EfficientViT-M5's attention stages (timm's efficientvit_m5: embed_dim, num_heads; 16-wide keys)
M5_STAGES = (Stage(192, 14, 3, 64), Stage(288, 7, 3, 96), Stage(384, 4, 4, 96))
KEY_DIM = 16
M5_KERNELS = (7, 5, 3, 3)  # each head's query depthwise kernel (timm's efficientvit_m5: kernels)


def window_side(side: int) -> int:
    """EfficientViT's 7x7 attention windows; the whole map when it is smaller."""
    return min(7, side)


@dataclass
class Workload:
    """A built case: ``calls[provider][mode]`` is one call; ``skipped[provider]`` says why a provider
    cannot run here; ``bytes_moved[mode]`` is the least traffic a kernel must make (kernel cases)."""

    calls: dict[str, dict[str, Callable[[], object]]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    bytes_moved: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Case:
    name: str
    level: str  # "kernel", "block" or "model"
    shape: tuple[int, ...]  # the main input's shape
    dtype: str
    modes: tuple[str, ...]
    providers: tuple[str, ...]  # the first is the reference the others are compared with
    build: Callable[["Case", torch.device, tuple[str, ...]], Workload]
    op: str | None = None  # the fused op whose triton provider it times (mxa_kernels.OPS); None for models
    repeats: int = 10  # CPU timing repeats (on a GPU do_bench chooses)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def batch(self) -> int:
        return self.shape[0]


def _tensor_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _compiled(fn, provider: str) -> Callable:
    """``torch.compile`` of ``fn`` (a function or module) for ``provider`` (one of COMPILED; the fused
    ops' graph must be whole: a graph break is an error). max-autotune also captures CUDA graphs, whose
    runs must be marked so that one step's outputs are not taken for the previous step's."""
    if provider == TRITON_COMPILE:
        compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    else:
        compiled = torch.compile(fn, mode=COMPILE_MODES[provider], dynamic=False)

    def call(*args):
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args)

    return call


def _op_calls(fn: Callable, inputs: list[torch.Tensor], grad_out: torch.Tensor, differentiable: tuple[bool, ...],
              extra: tuple = ()) -> dict[str, Callable]:
    """Forward and forward+backward calls of ``fn(*inputs, *extra)``; the inputs flagged in
    ``differentiable`` get gradients, which the forward+backward call returns."""
    leaves = [t.detach().requires_grad_(flag) for t, flag in zip(inputs, differentiable)]

    def forward():
        with torch.no_grad():
            return fn(*inputs, *extra)

    def forward_backward():
        for t in leaves:
            t.grad = None
        fn(*leaves, *extra).backward(grad_out)
        return [t.grad for t in leaves if t.requires_grad]

    return {"forward": forward, "forward+backward": forward_backward}


# --- kernel level -------------------------------------------------------------------------------

def authors_mxa_branch(x, boxes, ca_reduce_weight, ca_expand_weight, sa_weight):
    """The authors' MXA branch: a per-sample crop and resize loop, then channel and spatial attention."""
    return mxa_kernels.channel_spatial_attention(mxa_kernels.crop_resize_loop(x, boxes), ca_reduce_weight,
                                                 ca_expand_weight, sa_weight)


def build_mxa_branch(case: Case, device: torch.device, providers: tuple[str, ...]) -> Workload:
    roi_mode = case.name.removeprefix("mxa_branch_")
    batch, channels, _, _ = case.shape
    hidden = max(1, channels // 16)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(case.shape, generator=gen).to(device, case.torch_dtype)
    lo = torch.rand(batch, 2, generator=gen) * 0.5
    boxes = torch.cat([lo, lo + 0.3 + 0.2 * torch.rand(batch, 2, generator=gen)], dim=1).to(device)
    weights = [(torch.randn(hidden, channels, 1, 1, generator=gen) * channels ** -0.5).to(device),
               (torch.randn(channels, hidden, 1, 1, generator=gen) * hidden ** -0.5).to(device),
               (torch.randn(1, 2, 7, 7, generator=gen) * 0.2).to(device)]
    grad_out = torch.randn(case.shape, generator=gen).to(device, case.torch_dtype)

    def eager(*args):
        return mxa_kernels.mxa_branch(*args, roi_mode=roi_mode, backend="eager")

    def fused(*args):
        return mxa_kernels.mxa_branch(*args, roi_mode=roi_mode, backend="triton")

    work = Workload(bytes_moved={"forward": 2 * _tensor_bytes(x), "forward+backward": 5 * _tensor_bytes(x)})
    inputs = [x, boxes, *weights]
    for provider in providers:
        if provider == "eager":
            fn = eager
        elif provider in TRITON_PROVIDERS:
            if (reason := mxa_kernels.triton_unavailable_reason(case.op, device)) is not None:
                work.skipped[provider] = reason
                continue
            fn = fused if provider == "triton" else _compiled(fused, provider)
        elif provider in COMPILE_MODES:
            fn = _compiled(eager, provider)
        elif provider == "per-sample loop":
            if roi_mode != "crop":
                work.skipped[provider] = "the authors' loop is crop mode only"
                continue
            fn = authors_mxa_branch
        else:
            raise ValueError(f"case {case.name} has no provider {provider!r}")
        # crop mode snaps the boxes to pixels: they get no gradient there (nor do they in the model)
        differentiable = (True, roi_mode == "align", True, True, True)
        work.calls[provider] = _op_calls(fn, inputs, grad_out, differentiable)
    return work


def sdpa_window_attention(q, k, v, bias, bias_idx, window, scale):
    """One head's windowed attention by ``F.scaled_dot_product_attention``: window copies in, the
    gathered bias as an additive mask."""
    batch, _, height, width = q.shape
    qw, kw, vw = (partition_windows(t, window).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qw, kw, vw, attn_mask=bias[bias_idx].to(q.dtype), scale=scale)
    out = out.transpose(1, 2).reshape(batch, height // window, width // window, -1, window, window)
    return out.permute(0, 3, 1, 4, 2, 5).reshape(batch, -1, height, width)


def build_window_attention(case: Case, device: torch.device, providers: tuple[str, ...]) -> Workload:
    """One head's attention core; ``case.shape`` is (B, value dim, side, side), window 7 (4 on 4x4 maps)."""
    batch, value_dim, side, _ = case.shape
    window, key_dim = window_side(side), KEY_DIM
    gen = torch.Generator().manual_seed(0)
    idx = LocalWindowAttention(value_dim, key_dim, 1, value_dim / key_dim, side, window).attn.attention_bias_idxs.to(device)
    bias = torch.randn(int(idx.max()) + 1, generator=gen).to(device)
    q, k = (torch.randn(batch, key_dim, side, side, generator=gen).to(device, case.torch_dtype) for _ in range(2))
    v = torch.randn(case.shape, generator=gen).to(device, case.torch_dtype)
    grad_out = torch.randn(case.shape, generator=gen).to(device, case.torch_dtype)
    work = Workload(bytes_moved={"forward": _tensor_bytes(q, k, v, v),
                                 "forward+backward": _tensor_bytes(q, k, v, v) + 2 * _tensor_bytes(q, k, v) + _tensor_bytes(v)})
    for provider in providers:
        if provider == "eager":
            fn = mxa_kernels.window_attention_ref
        elif provider in TRITON_PROVIDERS:
            if (reason := mxa_kernels.triton_unavailable_reason(case.op, device)) is not None:
                work.skipped[provider] = reason
                continue
            fn = functools.partial(mxa_kernels.window_attention, backend="triton")
            fn = fn if provider == "triton" else _compiled(fn, provider)
        elif provider in COMPILE_MODES:
            fn = _compiled(mxa_kernels.window_attention_ref, provider)
        elif provider == "sdpa":
            fn = sdpa_window_attention
        else:
            raise ValueError(f"case {case.name} has no provider {provider!r}")
        work.calls[provider] = _op_calls(fn, [q, k, v, bias], grad_out, (True,) * 4, extra=(idx, window, 0.25))
    return work


# --- block level --------------------------------------------------------------------------------

def _module_calls(module: torch.nn.Module, runner: Callable, x: torch.Tensor) -> dict[str, Callable]:
    """Training-mode forward+backward (a fixed random output gradient; returns the input's and the
    parameters' gradients) and eval-mode inference of ``module``, run through ``runner`` (the module
    or its compiled form). Not the output's sum: through a closing BatchNorm in training mode its
    weight's gradient is then zero, and two providers' rounding noise around zero differs entirely."""
    leaf = x.detach().requires_grad_()
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.device)  # output shape = input's

    def forward_backward():
        module.train()
        module.zero_grad(set_to_none=True)
        leaf.grad = None
        runner(leaf).float().backward(grad_out)
        return [leaf.grad, *(p.grad for p in module.parameters() if p.grad is not None)]

    def inference():
        module.eval()
        with torch.inference_mode():
            return runner(x)

    return {"forward+backward": forward_backward, "inference": inference}


def _block_providers(case: Case, device, providers, make_module) -> Workload:
    """The module (the whole module cast to the case's dtype, BatchNorms included) per provider."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(case.shape, generator=gen).to(device, case.torch_dtype)
    torch.manual_seed(0)
    reference = make_module().to(device, case.torch_dtype)
    work = Workload()
    for provider in providers:
        module = copy.deepcopy(reference)
        if provider == "eager":
            module.backend = "eager"
        elif provider in TRITON_PROVIDERS:
            if (reason := mxa_kernels.triton_unavailable_reason(case.op, device)) is not None:
                work.skipped[provider] = reason
                continue
            module.backend = "triton"
        elif provider in COMPILE_MODES:
            module.backend = "eager"
        else:
            raise ValueError(f"case {case.name} has no provider {provider!r}")
        runner = _compiled(module, provider) if provider in COMPILED else module
        work.calls[provider] = _module_calls(module, runner, x)
    return work


def build_mxa_block(case: Case, device: torch.device, providers: tuple[str, ...]) -> Workload:
    """The MXA block (ROI predictor and branch) on (B, C, H, W) features."""
    roi_mode = case.name.removeprefix("mxa_block_")
    return _block_providers(case, device, providers, lambda: MedicalXRayAttention(case.shape[1], roi_mode=roi_mode))


def randomized(module: LocalWindowAttention) -> LocalWindowAttention:
    """Random values for every BatchNorm (affine and statistics) and the bias table of a
    ``LocalWindowAttention``, for benchmarks and tests: timm zero-initializes the output projection's
    BatchNorm (so the block's output and every upstream gradient start as zeros) and the bias table."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.normal_()
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
        module.attn.attention_biases.normal_()
    return module


def build_cascaded_attention_block(case: Case, device: torch.device, providers: tuple[str, ...]) -> Workload:
    """EfficientViT's ``LocalWindowAttention`` (16-wide keys, M5's heads and query kernels per stage); eager is
    timm's module, triton ``FusedLocalWindowAttention`` (its inference is the fused cascade). BatchNorms and
    bias table are randomized: timm's zero initialization would make the output all zeros."""
    dim, side = case.shape[1], case.shape[2]
    heads = next((stage.heads for stage in M5_STAGES if stage.channels == dim), 2)
    window = window_side(side)
    return _block_providers(case, device, providers, lambda: randomized(
        FusedLocalWindowAttention(dim, KEY_DIM, heads, dim / (KEY_DIM * heads), side, window,
                                  kernels=list(M5_KERNELS))))


# --- model level --------------------------------------------------------------------------------

def build_model(case: Case, device: torch.device, providers: tuple[str, ...]) -> Workload:
    """``case.name`` is ``efficientvit_mN``: the MXA model vs timm's plain one, 14 labels, 1 channel.
    Half-precision dtypes run under autocast with float32 weights, as the trainer's ``--amp`` does."""
    variant = case.name
    batch, in_chans, size, _ = case.shape
    common = dict(in_chans=in_chans, num_classes=14, img_size=size)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(case.shape, generator=gen).to(device)
    labels = (torch.rand(batch, 14, generator=gen) < 0.3).float().to(device)
    autocast = functools.partial(_autocast, case, device)
    torch.manual_seed(0)
    mxa = mxa_model.create_model(f"mxa_{variant}", roi_mode="crop", **common).to(device)  # the authors' model
    work = Workload()
    for provider in providers:
        if provider == "timm plain":
            torch.manual_seed(0)
            model = timm.create_model(variant, **common).to(device)
        elif provider in ("eager", *TRITON_PROVIDERS, *COMPILE_MODES):
            reasons = (mxa_kernels.triton_unavailable_reason(op, device) for op in mxa_kernels.OPS)
            reason = next((r for r in reasons if r is not None), None) if provider in TRITON_PROVIDERS else None
            if reason is not None:
                work.skipped[provider] = reason
                continue
            model = copy.deepcopy(mxa)
            model.set_backend("triton" if provider in TRITON_PROVIDERS else "eager")
        else:
            raise ValueError(f"case {case.name} has no provider {provider!r}")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        runner = _compiled(model, provider) if provider in COMPILED else model

        def train(model=model, runner=runner, optimizer=optimizer):
            model.train()
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                loss = F.binary_cross_entropy_with_logits(runner(images).float(), labels)
            loss.backward()
            optimizer.step()
            return [p.grad for p in model.parameters() if p.grad is not None]

        def inference(model=model, runner=runner):
            model.eval()
            with torch.inference_mode(), autocast():
                return runner(images).float()

        work.calls[provider] = {"train": train, "inference": inference}
    return work



def _autocast(case: Case, device: torch.device):
    """Autocast to a half-precision case's dtype (float32 weights, as the trainer's ``--amp``)."""
    if case.torch_dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=case.torch_dtype)


def build_teacher(case: Case, device: torch.device, providers: tuple[str, ...]) -> Workload:
    """``densenet121``, 14 labels, 1 channel: the distillation teacher's forward as the trainer runs it
    (:func:`mxa_model.train.loop.prepare_teacher`, under ``torch.inference_mode`` and autocast)."""
    from mxa_model.train.checkpoint import build_model as build_named_model
    from mxa_model.train.loop import prepare_teacher

    images = torch.randn(case.shape, generator=torch.Generator().manual_seed(0)).to(device)
    torch.manual_seed(0)
    teacher = prepare_teacher(build_named_model("densenet121", {"num_classes": 14, "in_chans": case.shape[1]}),
                              device, channels_last=False)
    work = Workload()
    for provider in providers:
        if provider not in ("eager", *COMPILE_MODES):
            raise ValueError(f"case {case.name} has no provider {provider!r}")
        runner = _compiled(teacher, provider) if provider in COMPILE_MODES else teacher

        def inference(runner=runner):
            with torch.inference_mode(), _autocast(case, device):
                return runner(images).float()

        work.calls[provider] = {"inference": inference}
    return work
