"""What a training run depends on: :class:`TrainConfig`, whose fields are the ``mxa train`` flags.

Each field carries its help text (and choices) in its metadata, and ``mxa train`` builds its flags from
the fields, so that a setting has one default: the field's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import mxa_kernels

from ..data.chexpert import ON_ERROR, UNCERTAINTY_POLICIES
from ..data.loader import workers_flag
from .losses import DISTILL_TYPES

AMP_MODES = ("auto", "bf16", "fp16", "off")
# --resume (or --resume last): continue from OUTPUT/last.pt, which must exist; --resume auto: from it if
# there is one, else afresh (the same command serves the first launch and every torchrun restart)
RESUME_MODES = ("last", "auto")
CLIP_MODES = ("norm", "agc", "value")
# torch.compile's modes: default (Inductor's kernels), reduce-overhead (also CUDA graphs: a step's launches
# replayed at once), max-autotune (also the fastest of several kernel choices, timed at compile time, and
# CUDA graphs)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
BAD_DATA_HELP = ("a malformed CSV row or unreadable image: stop naming it, or skip: check every image up front, "
                 "leave the bad ones out and count them")


def setting(default=dataclasses.MISSING, help: str = "", choices: tuple | None = None, shown: str | None = None,
            bare=None, parse=None):
    """A dataclass field that is also a command-line flag: ``help`` describes it, ``choices`` limit it,
    ``shown`` is how ``--help`` names its default when the value itself says little (None), ``bare`` is
    the value of the flag given without one (None: the flag needs a value), ``parse`` reads the flag's
    value where the annotation's type does not (None: the annotation's)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "shown": shown,
                                                        "bare": bare, "parse": parse})


@dataclass
class TrainConfig:
    """Everything a run depends on; each field is an ``mxa train`` flag (the field's name in kebab case,
    but for those ``mxa_model.cli.TRAIN_FLAGS`` names otherwise)."""

    data: str = setting(help="the CheXpert-v1.0-small folder (holding train.csv, valid.csv), or the folder holding it")
    output: str = setting(help="folder for checkpoints (last.pt, best.pt) and log.csv")
    model: str = setting("mxa_efficientvit_m5", "an MXA model, or densenet121 for the teacher")
    epochs: int = setting(10, "training epochs")
    img_size: int = setting(224, "input side in pixels")
    batch_size: int = setting(32, "images per step, per process")
    teacher: str | None = setting(None, "teacher checkpoint: distill into a dual-head student",
                                  shown="none: supervised training")
    distill_type: str = setting("soft", "distillation targets: soft = sigmoid(teacher / tau), hard = the "
                                "teacher's decisions", DISTILL_TYPES)
    alpha: float = setting(0.5, "weight of the distillation term")
    tau: float = setting(1.0, "distillation temperature")
    lr: float = setting(1e-3, "peak learning rate")
    min_lr: float = setting(1e-5, "final learning rate")
    weight_decay: float = setting(0.025, "AdamW weight decay, not applied to biases, norms and attention biases")
    warmup_epochs: float = setting(1.0, "linear warm-up")
    clip_grad: float | None = setting(None, "clip gradients at this value", shown="off")
    clip_mode: str = setting("norm", "what --clip-grad bounds", CLIP_MODES)
    ema_decay: float | None = setting(None, "keep and evaluate an EMA of the weights, e.g. 0.999", shown="off")
    amp: str = setting("auto", "mixed precision on a GPU: auto = bf16 (fp16 where bf16 is unsupported)", AMP_MODES)
    channels_last: bool = setting(False, "NHWC memory format")
    backend: str | None = setting(None, "kernel backend", mxa_kernels.BACKENDS, shown="auto")
    compile: str | None = setting(None, "torch.compile the model and the teacher: default; reduce-overhead: also "
                                  "CUDA graphs (GPU); max-autotune: also kernels chosen by timing them, and CUDA graphs",
                                  COMPILE_MODES, shown="off", bare="default")
    seed: int = setting(0, "random seed")
    workers: int | str = setting(2, "data loader worker processes, per process (0: load in the main process; "
                                 "auto: the CPUs this process may use, less one)", parse=workers_flag)
    cache: str | None = setting(None, "a decoded cache made by mxa prepare: images read from it, not decoded",
                                shown="off: decode the files")
    roi_mode: str = setting("align", "MXA ROI mode (crop: the authors', whose ROI predictor never trains)",
                            mxa_kernels.ROI_MODES)
    policy: str = setting("ones", "uncertain labels: a default and per-label overrides, e.g. "
                          f"'ones,Cardiomegaly=zeros'; policies: {', '.join(UNCERTAINTY_POLICIES)}")
    views: tuple[str, ...] = setting(("frontal",), "frontal, lateral or frontal,lateral")
    augment: float = setting(1.0, "augmentation strength, 0 = off")
    resume: str | None = setting(None, "continue from OUTPUT/last.pt (an error if there is none); auto: from it "
                                 "if there is one, else start afresh, as under torchrun --max-restarts",
                                 RESUME_MODES, shown="off", bare="last")
    device: str | None = setting(None, "torch device", shown="cuda if available")
    progress: bool = setting(True, "progress bars")
    log_every: int = setting(50, "read the loss and the non-finite checks from the device every N steps (the "
                             "progress bar's figures; --on-nonfinite raise stops there): steps between never wait")
    profile_steps: int | None = setting(None, "trace N steps of the first epoch with torch.profiler into "
                                        "OUTPUT/profile and print the shares of a step's time", shown="off")
    max_steps_per_epoch: int | None = setting(None, "at most this many steps per epoch (tests, smoke runs)",
                                              shown="the whole epoch")
    # "skip": malformed CSV rows and unreadable images are left out and counted
    on_bad_data: str = setting("raise", BAD_DATA_HELP, ON_ERROR)
    # "skip": a batch with a non-finite loss is skipped (no step) and counted
    on_nonfinite: str = setting("raise", "a batch whose loss is NaN or Inf: stop naming the batch and its files, "
                                "or skip it (no step) and count it in log.csv", ON_ERROR)

    def __post_init__(self):
        if isinstance(self.resume, bool):  # the field's type before --resume took a mode
            self.resume = "last" if self.resume else None
        if isinstance(self.compile, bool):  # the field's type before --compile took a mode
            self.compile = "default" if self.compile else None

    def check(self) -> None:
        if self.distill_type not in DISTILL_TYPES:
            raise ValueError(f"--distill-type must be one of {', '.join(DISTILL_TYPES)}, got {self.distill_type!r}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"--amp must be one of {', '.join(AMP_MODES)}, got {self.amp!r}")
        for name in ("on_bad_data", "on_nonfinite"):
            if getattr(self, name) not in ON_ERROR:
                raise ValueError(f"--{name.replace('_', '-')} must be one of {', '.join(ON_ERROR)}, got {getattr(self, name)!r}")
        if self.resume not in (None, *RESUME_MODES):
            raise ValueError(f"--resume must be one of {', '.join(RESUME_MODES)} (or given alone), got {self.resume!r}")
        if self.compile not in (None, *COMPILE_MODES):
            raise ValueError(f"--compile must be one of {', '.join(COMPILE_MODES)} (or given alone), got {self.compile!r}")
        if self.clip_mode not in CLIP_MODES:
            raise ValueError(f"--clip-mode must be one of {', '.join(CLIP_MODES)}, got {self.clip_mode!r}")
        for name in ("epochs", "img_size", "batch_size", "max_steps_per_epoch", "log_every", "profile_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.alpha <= 1 or self.tau <= 0:
            raise ValueError(f"--alpha must be in [0, 1] and --tau positive, got {self.alpha} and {self.tau}")
        if self.teacher is not None and not Path(self.teacher).is_file():
            raise FileNotFoundError(f"teacher checkpoint not found: {self.teacher}")


def model_kwargs(cfg: TrainConfig, num_classes: int) -> dict:
    """Construction arguments of the model ``cfg`` names (stored in checkpoints)."""
    kwargs = {"num_classes": num_classes, "in_chans": 1}
    if cfg.model.startswith("mxa_"):
        kwargs.update(img_size=cfg.img_size, roi_mode=cfg.roi_mode, distilled=cfg.teacher is not None)
    elif cfg.model.startswith("efficientvit_m"):
        # timm's EfficientViT (MSRA) sizes its attention windows for its img_size: at another size its maps
        # would be padded to windows of the default's
        kwargs.update(img_size=cfg.img_size)
    return kwargs


# settings a resumed run must share with the run that wrote the checkpoint (schedule, data, loss)
RESUME_FIELDS = ("epochs", "img_size", "batch_size", "teacher", "distill_type", "alpha", "tau", "lr", "min_lr",
                 "weight_decay", "warmup_epochs", "ema_decay", "seed", "policy", "augment", "max_steps_per_epoch",
                 "on_bad_data")
