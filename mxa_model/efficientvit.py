"""MXA-EfficientViT: timm's EfficientViT (MSRA) with an MXA branch beside every attention block.

The backbone is built from timm's ``efficientvit_msra`` modules, so its parameter names and shapes are
timm's and a timm ``efficientvit_m*`` state_dict loads with only the MXA-specific keys missing.
Registered with timm as ``mxa_efficientvit_m0`` ... ``mxa_efficientvit_m5`` on ``import mxa_model``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from typing import Sequence

import torch
import torch.nn as nn
from timm.layers import get_device_dtype, to_2tuple
from timm.models import adapt_input_conv, build_model_with_cfg, load_state_dict, resolve_pretrained_cfg
from timm.models._registry import generate_default_cfgs, register_model
from timm.models.efficientvit_msra import (
    EfficientVitBlock,
    EfficientVitMsra,
    NormLinear,
    checkpoint_filter_fn,
)

import mxa_kernels
from .cascaded_attention import FusedLocalWindowAttention
from .mxa import MedicalXRayAttention

FUSIONS = ("sum", "gate", "authors", "authors-gate")


class CheckpointMismatchError(ValueError):
    """A checkpoint file does not hold weights for the model it is loaded into."""


class MXAEfficientVitBlock(EfficientVitBlock):
    """timm's EfficientViT block whose token mixer also runs an MXA branch in parallel.

    The attention is :class:`FusedLocalWindowAttention`, timm's ``LocalWindowAttention`` with the same
    parameters and buffers, so that the kernel backend can serve its per-head attention.

    The mixer computes ``x + attn(x) + mxa(x)`` (``fusion="sum"``) or
    ``x + s * attn(x) + (1 - s) * mxa(x)`` with ``s = sigmoid(alpha)`` (``fusion="gate"``; ``alpha``
    starts at 0.5 as in the authors' code). timm's ``mixer`` (a residual around its
    ``LocalWindowAttention``) keeps its parameter names; the residual sum is formed here.

    ``fusion="authors"`` computes what the authors' trained block computes, to run their weights:
    ``x1 = (x + attn(x)) + (x + mxa(x))`` (the identity counted twice), then timm's whole sandwich
    with the same attention again: ``ffn1(dw1(mixer(ffn0(dw0(x1)))))``, each a residual.
    ``"authors-gate"`` is their revision with ``x1 = s * (x + attn(x)) + (1 - s) * (x + mxa(x))``.
    """

    def __init__(
        self,
        dim: int,
        key_dim: int,
        num_heads: int,
        attn_ratio: float,
        resolution: int,
        window_resolution: int,
        kernels: Sequence[int],
        fusion: str = "sum",
        roi_mode: str = "align",
        mxa_reduction: int = 16,
        backend: str | None = None,
        device=None,
        dtype=None,
    ):
        dd = {"device": device, "dtype": dtype}
        super().__init__(dim, key_dim, num_heads, attn_ratio, resolution, window_resolution, list(kernels), **dd)
        # timm's attention, whose per-head core the kernel backend can serve with the fused op
        self.mixer.m = FusedLocalWindowAttention(dim, key_dim, num_heads, attn_ratio, resolution,
                                                 window_resolution, list(kernels), **dd)
        self.mixer.m.backend = backend
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; expected one of {', '.join(FUSIONS)}")
        self.fusion = fusion
        self.mxa = MedicalXRayAttention(dim, mxa_reduction, roi_mode=roi_mode, backend=backend, **dd)
        # a None parameter in "sum" fusion: the attribute exists (TorchScript compiles both branches
        # below) but stays out of the state_dict
        gated = fusion in ("gate", "authors-gate")
        self.register_parameter("alpha", nn.Parameter(torch.tensor(0.5, **dd)) if gated else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fusion.startswith("authors"):
            return self._authors_forward(x)
        x = self.ffn0(self.dw0(x))
        # timm's ResidualDrop around the attention is bypassed to form the three-way sum; timm never
        # gives it a drop rate, and MXAEfficientVit does not either.
        attn, local = self.mixer.m(x), self.mxa(x)
        alpha = self.alpha
        if alpha is None:
            x = x + attn + local
        else:
            s = torch.sigmoid(alpha)
            x = x + s * attn + (1 - s) * local
        return self.ffn1(self.dw1(x))

    def _authors_forward(self, x: torch.Tensor) -> torch.Tensor:
        with_attn, with_mxa = self.mixer(x), x + self.mxa(x)  # timm's mixer is x + attn(x)
        alpha = self.alpha
        if alpha is None:
            x = with_attn + with_mxa
        else:
            s = torch.sigmoid(alpha)
            x = s * with_attn + (1 - s) * with_mxa
        return self.ffn1(self.dw1(self.mixer(self.ffn0(self.dw0(x)))))


class MXAEfficientVit(EfficientVitMsra):
    """EfficientViT (MSRA) with MXA in every attention block, for multi-label chest X-ray classification.

    Args (beyond timm's ``EfficientVitMsra``):
        roi_mode: MXA ROI mode, ``"align"`` (differentiable, the default) or ``"crop"`` (the authors',
            whose ROI predictor never trains).
        fusion: how attention and MXA join, ``"sum"`` or ``"gate"``, or the authors' block, ``"authors"``
            or ``"authors-gate"``, to run their weights (see :class:`MXAEfficientVitBlock`).
        mxa_reduction: channel-attention reduction of the MXA branches.
        distilled: add a second (distillation) head, DeiT-style: in training the forward returns
            ``(class_logits, distillation_logits)``, in eval their average.
        backend: kernel backend for every fused op of the model, or None to follow the global selection.

    Inputs must be ``(B, in_chans, *img_size)``; :meth:`set_input_size` changes the size.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 1,
        num_classes: int = 14,
        roi_mode: str = "align",
        fusion: str = "sum",
        mxa_reduction: int = 16,
        distilled: bool = False,
        backend: str | None = None,
        device=None,
        dtype=None,
        **kwargs,
    ):
        dd = {"device": device, "dtype": dtype}
        super().__init__(img_size=img_size, in_chans=in_chans, num_classes=num_classes, **kwargs, **dd)
        self.input_hw = to_2tuple(img_size)
        # timm's stages build plain blocks; each is replaced by an MXA block of the same configuration
        # (built anew, so timm's initialization applies to it as to the block it replaces).
        for stage in self.stages:
            stage.blocks = nn.Sequential(*(
                self._mxa_block(block, fusion, roi_mode, mxa_reduction, backend, dd) for block in stage.blocks
            ))
        self.head_dist = self._new_head_dist() if distilled else None

    @staticmethod
    def _mxa_block(block: EfficientVitBlock, fusion, roi_mode, mxa_reduction, backend, dd) -> MXAEfficientVitBlock:
        """An MXA block with the same attention configuration as timm's ``block``."""
        window_attn = block.mixer.m
        attn = window_attn.attn
        return MXAEfficientVitBlock(
            window_attn.dim, attn.key_dim, window_attn.num_heads, attn.attn_ratio, window_attn.resolution,
            window_attn.window_resolution, [dw.conv.kernel_size[0] for dw in attn.dws],
            fusion=fusion, roi_mode=roi_mode, mxa_reduction=mxa_reduction, backend=backend, **dd,
        )

    @property
    def distilled(self) -> bool:
        return self.head_dist is not None

    def mxa_modules(self) -> list[MedicalXRayAttention]:
        return [m for m in self.modules() if isinstance(m, MedicalXRayAttention)]

    def mxa_block_names(self) -> list[str]:
        """The block of each of :meth:`mxa_modules`, in its order (every block has one): ``"stage S block B"``,
        both counted from 1."""
        return [f"stage {s} block {b}" for s, stage in enumerate(self.stages, 1)
                for b in range(1, len(stage.blocks) + 1)]

    def set_backend(self, backend: str | None) -> None:
        """Set the kernel backend of every fused op in the model (None: follow the global selection)."""
        if backend is not None:
            mxa_kernels.check_backend_name(backend)
        served = tuple(cls for op in mxa_kernels.OPS.values() for cls in op.module_classes())
        for module in self.modules():
            if isinstance(module, served):
                module.backend = backend

    def set_input_size(self, img_size=None) -> None:
        super().set_input_size(img_size)
        if img_size is not None:
            self.input_hw = to_2tuple(img_size)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """timm's, except that a classifier put back on a model whose pooling was removed
        (``global_pool=""``) brings average pooling back with it instead of failing: the heads
        (BatchNorm1d, Linear) need pooled features."""
        if global_pool is None and num_classes > 0 and not self.global_pool.pool_type:
            global_pool = "avg"
        super().reset_classifier(num_classes, global_pool)
        if self.head_dist is not None:
            self.head_dist = self._new_head_dist()
            self.head_dist.train(self.training)

    def _new_head_dist(self) -> nn.Module:
        if self.num_classes == 0:  # a feature extractor: both heads are identities, as in timm
            return nn.Identity()
        return NormLinear(self.head_hidden_size, self.num_classes, drop=self.drop_rate, **get_device_dtype(self))

    def _check_input(self, x: torch.Tensor) -> None:
        """One-line errors for inputs the model cannot take (written in TorchScript's subset)."""
        if x.dim() != 4:
            raise ValueError(f"expected a batch of images (B, C, H, W), got shape {list(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError("got an empty batch (B = 0)")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"the model was built for {self.in_chans}-channel images (in_chans), "
                             f"got {x.shape[1]} channels")
        if not x.is_floating_point():
            raise TypeError(f"expected floating-point images, got {x.dtype}")
        h, w = self.input_hw
        if x.shape[2] != h or x.shape[3] != w:
            raise ValueError(f"the model was built for {h}x{w} images, got {x.shape[2]}x{x.shape[3]}: "
                             f"resize the images, or build the model with img_size=({x.shape[2]}, {x.shape[3]}) "
                             f"or call model.set_input_size(({x.shape[2]}, {x.shape[3]}))")
        weight = self.patch_embed.conv1.conv.weight
        if x.device != weight.device:
            raise ValueError(f"the images are on {x.device} but the model is on {weight.device}")

    def _check_images(self, x) -> None:
        """Check ``x`` when it holds values: FX tracing passes a ``Proxy``, whose shape is symbolic."""
        if isinstance(x, torch.fx.Proxy):
            return
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a tensor of images, got {type(x).__name__}")
        self._check_input(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # timm's forward_features without super(), which TorchScript lacks
            self._check_input(x)
            return self.stages(self.patch_embed(x))
        self._check_images(x)
        return super().forward_features(x)

    def forward_intermediates(self, x: torch.Tensor, *args, **kwargs):
        self._check_images(x)
        return super().forward_intermediates(x, *args, **kwargs)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        x = self.global_pool(x)
        if pre_logits:
            return x
        logits = self.head(x)
        if self.head_dist is None:
            return logits
        if self.num_classes == 0:
            return logits
        dist_logits = self.head_dist(x)
        if not torch.jit.is_scripting():  # a scripted model serves inference: one output, the average
            if self.training:
                return logits, dist_logits
        return (logits + dist_logits) / 2


def _is_optional_key(key: str) -> bool:
    """Keys a checkpoint may lack: the MXA additions, the classifier heads, BatchNorm batch counters."""
    return (".mxa." in key or key.endswith((".alpha", "num_batches_tracked"))
            or key.startswith(("head.", "head_dist.")))


def load_pretrained_file(model: MXAEfficientVit, path: str | os.PathLike, use_ema: bool = True) -> dict[str, list[str]]:
    """Load a timm ``efficientvit_m*``, project or authors' checkpoint (``torch.save`` or safetensors) into
    ``model``.

    The authors' checkpoints (Microsoft's Cream EfficientViT layout with ``mxa`` residuals, see
    :func:`authors_state_dict`) load into a model built to compute what theirs computed:
    ``fusion="authors"`` (``"authors-gate"`` for those with a per-block ``alpha``), ``roi_mode="crop"``,
    and ``distilled`` when they hold a distillation head; another model is refused. A Cream checkpoint
    without MXA (Microsoft's EfficientViT) loads as timm's does.

    Checkpoints are read with ``weights_only=True`` (an ``argparse.Namespace`` of training arguments,
    as the authors' files hold, is allowed); a file holding ``model``/``state_dict`` and EMA
    weights (``model_ema``/``state_dict_ema``) gives the EMA weights unless ``use_ema=False``. A
    3-channel stem is adapted to ``in_chans`` (timm's ``adapt_input_conv``); attention biases of
    another window size are resized; classifier, distillation-head and gate weights that do not fit
    the model (another class count, no such head) are left out. Any other difference raises
    :class:`CheckpointMismatchError` naming the keys, and leaves the model unchanged. Returns the keys
    left at initialization (``missing``) and the checkpoint keys left out (``skipped``).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        with _allowing_namespaces():
            state = load_state_dict(path, use_ema=use_ema)
    except Exception as exc:
        raise CheckpointMismatchError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointMismatchError(f"checkpoint {path} does not hold a state_dict of tensors")
    if any(key.startswith("blocks1.") for key in state):  # Microsoft's Cream layout
        state = authors_state_dict(state)
        if any(".mxa." in key for key in state):  # the authors' model, not a plain Cream EfficientViT
            _check_fits_the_authors_model(model, state, path)
    target = model.state_dict()
    stem = "patch_embed.conv1.conv.weight"
    skipped = []
    for key in list(state):
        if key in target and state[key].shape == target[key].shape:
            continue
        if key.startswith(("head.", "head_dist.")) or key.endswith(".alpha"):
            skipped.append(key)  # another class count, or a head or gate this model does not have
            del state[key]
        elif key in target:
            have, want = state[key].shape, target[key].shape
            adaptable_stem = key == stem and have[0] == want[0] and have[2:] == want[2:]
            resizable_biases = key.endswith("attention_biases") and have[0] == want[0]
            if not (adaptable_stem or resizable_biases):
                raise CheckpointMismatchError(
                    f"checkpoint {path} does not fit this model: {key} has shape {tuple(have)}, "
                    f"the model expects {tuple(want)} (another EfficientViT variant?)")
    state = checkpoint_filter_fn(state, model)  # resizes attention biases to the model's windows
    if stem in state and state[stem].shape[1] != model.in_chans:
        state[stem] = adapt_input_conv(model.in_chans, state[stem], base_chans=state[stem].shape[1])
    # Checked before loading, so that a refused checkpoint leaves the model untouched.
    unexpected = [k for k in state if k not in target]
    missing = [k for k in target if k not in state]
    not_ours = [k for k in missing if not _is_optional_key(k)]
    if unexpected or not_ours:
        keys = unexpected or not_ours
        kind = "unexpected keys" if unexpected else "missing backbone keys"
        raise CheckpointMismatchError(f"checkpoint {path} is not an EfficientViT checkpoint for this model: "
                                      f"{len(keys)} {kind} ({', '.join(keys[:5])}, ...)")
    model.load_state_dict(state, strict=False)
    return {"missing": missing, "skipped": skipped}


def _allowing_namespaces():
    """A context in which ``weights_only`` loads accept ``argparse.Namespace`` (the training arguments
    the authors' checkpoints hold); torch 2.4 has no such context, only a process-wide allowance."""
    if hasattr(torch.serialization, "safe_globals"):
        return torch.serialization.safe_globals([argparse.Namespace])
    torch.serialization.add_safe_globals([argparse.Namespace])
    return contextlib.nullcontext()


def _check_fits_the_authors_model(model: MXAEfficientVit, state: dict, path: str) -> None:
    """Refuse a model that would load the authors' weights but compute something else than their model."""
    block = model.stages[0].blocks[0]
    wanted = {"fusion": "authors-gate" if any(key.endswith(".alpha") for key in state) else "authors",
              "roi_mode": "crop", "distilled": any(key.startswith("head_dist.") for key in state)}
    have = {"fusion": block.fusion, "roi_mode": block.mxa.roi_mode, "distilled": model.distilled}
    wrong = [f"{name}={wanted[name]!r}" for name in wanted if have[name] != wanted[name]]
    if wrong:
        raise CheckpointMismatchError(f"checkpoint {path} holds the authors' model, which this one would not "
                                      f"compute: build it with {', '.join(wrong)} to run it")


# the authors' blocksN.0 / .1 / .2 of stages 2 and 3: timm's downsampling parts
_AUTHORS_DOWNSAMPLE = ("downsample.res1", "downsample.patchmerge", "downsample.res2")


def authors_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The authors' checkpoint keys in this model's names.

    Their model is Microsoft's Cream EfficientViT: ``patch_embed.0/2/4/6``; ``blocks1``, ``blocks2``,
    ``blocks3``, where ``blocks2`` and ``blocks3`` start with the downsampling (a residual depthwise
    convolution and feed-forward pair, the patch merging, another pair); ``c`` and ``bn`` in each
    convolution-BatchNorm pair; ``head.l`` (and ``head_dist``); the MXA branch as ``mxa.m`` (a
    residual), its ROI predictor named ``poi_predictor`` in one revision. The attention-bias index
    buffers (which this model computes) are left out.
    """
    renamed = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[-1] == "attention_bias_idxs":
            continue
        if parts[0] == "patch_embed":
            parts[1] = f"conv{int(parts[1]) // 2 + 1}"
        elif parts[0] in ("blocks1", "blocks2", "blocks3"):
            stage, index = int(parts[0][-1]) - 1, int(parts[1])
            if stage == 0 or index >= len(_AUTHORS_DOWNSAMPLE):
                where = ["blocks", str(index - (0 if stage == 0 else len(_AUTHORS_DOWNSAMPLE)))]
            else:
                where = _AUTHORS_DOWNSAMPLE[index].split(".")
            parts = ["stages", str(stage), *where, *parts[2:]]
        parts = [{"c": "conv", "l": "linear", "poi_predictor": "roi_predictor"}.get(p, p) for p in parts]
        renamed[".".join(parts).replace(".mxa.m.", ".mxa.")] = value
    return renamed


def _cfg(**kwargs):
    return {
        "url": "",
        "num_classes": 14,
        "input_size": (1, 224, 224),
        "mean": (0.0,),
        "std": (1.0,),
        "first_conv": "patch_embed.conv1.conv",
        "classifier": "head.linear",
        "fixed_input_size": True,
        "pool_size": (4, 4),
        "license": "apache-2.0",
        **kwargs,
    }


# The EfficientViT-M0..M5 configurations (timm's efficientvit_m* and the EfficientViT paper).
VARIANTS = {
    "mxa_efficientvit_m0": dict(embed_dim=(64, 128, 192), depth=(1, 2, 3), num_heads=(4, 4, 4), kernels=(5, 5, 5, 5)),
    "mxa_efficientvit_m1": dict(embed_dim=(128, 144, 192), depth=(1, 2, 3), num_heads=(2, 3, 3), kernels=(7, 5, 3, 3)),
    "mxa_efficientvit_m2": dict(embed_dim=(128, 192, 224), depth=(1, 2, 3), num_heads=(4, 3, 2), kernels=(7, 5, 3, 3)),
    "mxa_efficientvit_m3": dict(embed_dim=(128, 240, 320), depth=(1, 2, 3), num_heads=(4, 3, 4), kernels=(5, 5, 5, 5)),
    "mxa_efficientvit_m4": dict(embed_dim=(128, 256, 384), depth=(1, 2, 3), num_heads=(4, 4, 4), kernels=(7, 5, 3, 3)),
    "mxa_efficientvit_m5": dict(embed_dim=(192, 288, 384), depth=(1, 3, 4), num_heads=(3, 3, 4), kernels=(7, 5, 3, 3)),
}

default_cfgs = generate_default_cfgs({name: _cfg() for name in VARIANTS})


def _create(variant: str, pretrained: bool = False, pretrained_file: str | None = None, **kwargs) -> MXAEfficientVit:
    if pretrained:
        # timm passes the weights' source in pretrained_cfg for "local-dir:DIR" and "hf-hub:ID" names
        cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
        if not (cfg.source in ("local-dir", "hf-hub") or cfg.file or cfg.state_dict or cfg.url or cfg.hf_hub_id):
            raise ValueError(f"no pretrained weights are published for {variant}; pass pretrained_file=PATH "
                             "(a timm efficientvit_m* or project checkpoint), or load a model saved with "
                             "timm.models.save_for_hf by the name 'local-dir:DIR' or 'hf-hub:ID'")
        pretrained_file = None  # the saved weights replace all (its saved arguments may still name the file)
    out_indices = kwargs.pop("out_indices", (0, 1, 2))
    model = build_model_with_cfg(
        MXAEfficientVit, variant, pretrained=pretrained,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        **dict(VARIANTS[variant], **kwargs),
    )
    if pretrained_file is not None:
        load_pretrained_file(model, pretrained_file)
    if isinstance(model, MXAEfficientVit):  # not a features_only wrapper
        # timm's create_model records the arguments it was given (save_for_hf writes them); the block's
        # design is recorded even when left at its default, so that a saved model keeps it if a default changes
        model._model_args = {"roi_mode": model.mxa_modules()[0].roi_mode, "fusion": model.stages[0].blocks[0].fusion}
    return model


@register_model
def mxa_efficientvit_m0(pretrained=False, **kwargs):
    return _create("mxa_efficientvit_m0", pretrained, **kwargs)


@register_model
def mxa_efficientvit_m1(pretrained=False, **kwargs):
    return _create("mxa_efficientvit_m1", pretrained, **kwargs)


@register_model
def mxa_efficientvit_m2(pretrained=False, **kwargs):
    return _create("mxa_efficientvit_m2", pretrained, **kwargs)


@register_model
def mxa_efficientvit_m3(pretrained=False, **kwargs):
    return _create("mxa_efficientvit_m3", pretrained, **kwargs)


@register_model
def mxa_efficientvit_m4(pretrained=False, **kwargs):
    return _create("mxa_efficientvit_m4", pretrained, **kwargs)


@register_model
def mxa_efficientvit_m5(pretrained=False, **kwargs):
    return _create("mxa_efficientvit_m5", pretrained, **kwargs)
