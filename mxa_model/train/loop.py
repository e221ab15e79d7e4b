"""The trainer: supervised training (a student, or the DenseNet-121 teacher) and knowledge distillation
into an MXA student, with checkpoints each epoch and an exact ``--resume``.

Each epoch draws its shuffle order (and its data workers' seeds) from a generator seeded by (seed,
epoch), and the checkpoint written at its end holds every RNG state, so a single-process run
interrupted at any point and resumed from its last checkpoint ends with the same weights as an
uninterrupted run (deterministic CPU run). Under DDP each rank seeds its own augmentations; a resumed
DDP run restores rank 0's states only.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3, dispatch_clip_grad
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from ..data import CheXpertDataset, UncertaintyPolicy, eval_transform, train_transform
from ..data.chexpert import ON_ERROR, describe_skipped
from ..metrics import auc_report, format_auc
from . import distributed
from .checkpoint import (CheckpointError, build_model, load_checkpoint, load_weights, model_from_checkpoint, rng_state,
                         save_checkpoint, set_rng_state)
from .losses import DISTILL_TYPES, distillation_loss, supervised_loss

AMP_MODES = ("auto", "bf16", "fp16", "off")
EVAL_POLICY = "ignore"
CLIP_MODES = ("norm", "agc", "value")
LOG_FIELDS = ("epoch", "lr", "train_loss", "images_per_s", "auc_macro", "auc_micro", "auc_competition",
              "ema_auc_macro", "ema_auc_micro", "skipped_batches", "seconds")


@dataclass
class TrainConfig:
    """Everything a run depends on; each field is the ``mxa train`` flag of the same name."""

    data: str
    output: str
    model: str = "mxa_efficientvit_m5"
    epochs: int = 10
    img_size: int = 224
    batch_size: int = 32
    teacher: str | None = None  # a teacher checkpoint: distill into the model
    distill_type: str = "soft"
    alpha: float = 0.5
    tau: float = 1.0
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.025
    warmup_epochs: float = 1.0
    clip_grad: float | None = None
    clip_mode: str = "norm"
    ema_decay: float | None = None
    amp: str = "auto"
    channels_last: bool = False
    backend: str | None = None
    compile: bool = False
    seed: int = 0
    workers: int = 0
    roi_mode: str = "crop"
    policy: str = "ones"
    views: tuple[str, ...] = ("frontal",)
    augment: float = 1.0
    resume: bool = False
    device: str | None = None
    progress: bool = True
    max_steps_per_epoch: int | None = None  # a short run (tests, smoke runs)
    on_bad_data: str = "raise"  # "skip": malformed CSV rows and unreadable images are left out and counted
    on_nonfinite: str = "raise"  # "skip": a batch with a non-finite loss is skipped (no step) and counted

    def check(self) -> None:
        if self.distill_type not in DISTILL_TYPES:
            raise ValueError(f"--distill-type must be one of {', '.join(DISTILL_TYPES)}, got {self.distill_type!r}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"--amp must be one of {', '.join(AMP_MODES)}, got {self.amp!r}")
        for name in ("on_bad_data", "on_nonfinite"):
            if getattr(self, name) not in ON_ERROR:
                raise ValueError(f"--{name.replace('_', '-')} must be one of {', '.join(ON_ERROR)}, got {getattr(self, name)!r}")
        if self.clip_mode not in CLIP_MODES:
            raise ValueError(f"--clip-mode must be one of {', '.join(CLIP_MODES)}, got {self.clip_mode!r}")
        for name in ("epochs", "img_size", "batch_size", "max_steps_per_epoch"):
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
    return kwargs


# settings a resumed run must share with the run that wrote the checkpoint (schedule, data, loss)
RESUME_FIELDS = ("epochs", "img_size", "batch_size", "teacher", "distill_type", "alpha", "tau", "lr", "min_lr",
                 "weight_decay", "warmup_epochs", "ema_decay", "seed", "policy", "augment", "max_steps_per_epoch",
                 "on_bad_data")


def _amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of this run: bf16 (fp16, with a gradient scaler, where bf16 is unsupported or
    asked for) on a GPU; None (no autocast) on the CPU or with --amp off."""
    if device.type != "cuda" or cfg.amp == "off":
        return None
    if cfg.amp == "fp16" or (cfg.amp == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


def _loader(dataset, cfg: TrainConfig, ctx: distributed.Context, epoch: int, train: bool) -> DataLoader:
    generator = torch.Generator().manual_seed((cfg.seed * 100_003 + epoch) * 1009 + ctx.rank)
    sampler = None
    if ctx.distributed:
        sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=train,
                                     seed=cfg.seed, drop_last=train)
        sampler.set_epoch(epoch)
    return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=train and sampler is None, sampler=sampler,
                      generator=generator, num_workers=cfg.workers, drop_last=train and len(dataset) > cfg.batch_size,
                      pin_memory=ctx.device.type == "cuda", persistent_workers=False)


@torch.no_grad()
def predict(model, loader, ctx: distributed.Context, dtype=None, channels_last=False, progress=False, desc="eval"):
    """Sigmoid probabilities, targets, masks and dataset indices of every sample, once each; non-finite
    outputs raise ``FloatingPointError`` naming the images (a :class:`CheXpertDataset` loader)."""
    model.eval()
    rows = {"index": [], "probs": [], "targets": [], "mask": []}
    for images, targets, mask, index in tqdm(loader, desc=desc, disable=not (progress and ctx.main), leave=False):
        images = images.to(ctx.device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(ctx.device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(images)
        rows["probs"].append(torch.sigmoid(logits.float()).cpu())
        rows["targets"].append(targets)
        rows["mask"].append(mask)
        rows["index"].append(index)
    index, probs, targets, mask = distributed.gather_by_index(ctx, *(torch.cat(rows[k]) for k in ("index", "probs", "targets", "mask")))
    bad = (~torch.isfinite(probs).all(dim=1)).nonzero().flatten().tolist()
    if bad:
        records = loader.dataset.records
        files = [str(records[int(index[i])].path) for i in bad[:5]]
        raise FloatingPointError(f"the model gave non-finite outputs for {len(bad)} image(s): {', '.join(files)}"
                                 + (" ..." if len(bad) > 5 else ""))
    return probs, targets, mask, index


def _read_log(path: Path, up_to_epoch: int) -> list[dict]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return [row for row in csv.DictReader(f) if int(row["epoch"]) <= up_to_epoch]


def _write_log(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def train(cfg: TrainConfig) -> dict:
    """Run the training ``cfg`` describes; returns the summary also written to ``OUTPUT/summary.json``."""
    cfg.check()
    ctx = distributed.setup(cfg.device)
    try:
        return _train(cfg, ctx)
    finally:
        distributed.teardown(ctx)


def _train(cfg: TrainConfig, ctx: distributed.Context) -> dict:
    out = Path(cfg.output)
    say = print if ctx.main else (lambda *a, **k: None)
    if ctx.main:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed + ctx.rank)  # each rank its own augmentations
    policy = UncertaintyPolicy.parse(cfg.policy)
    # --on-bad-data skip: every image is decoded once up front, so that a bad one is left out (and
    # counted) before training rather than stopping it halfway
    faults = dict(on_error=cfg.on_bad_data, image_check=cfg.on_bad_data == "skip")
    train_set = CheXpertDataset(cfg.data, "train", policy=policy, views=cfg.views,
                                transform=train_transform(cfg.img_size, cfg.augment), seed=cfg.seed, **faults)
    # validation scores the labelled cells only: uncertain cells are left out, whatever the training policy
    valid_set = CheXpertDataset(cfg.data, "valid", policy=EVAL_POLICY, views=cfg.views,
                                transform=eval_transform(cfg.img_size), seed=cfg.seed, **faults)
    for dataset in (train_set, valid_set):
        if dataset.skipped:
            say(f"--on-bad-data skip: {describe_skipped(dataset.skipped)} of {dataset.csv_path}")
    labels = list(train_set.labels)
    if len(train_set) == 0 or len(valid_set) == 0:
        raise ValueError(f"no images to train on in {cfg.data} after the view filter {cfg.views} "
                         f"({len(train_set)} train, {len(valid_set)} valid)")

    kwargs = model_kwargs(cfg, len(labels))
    model = build_model(cfg.model, kwargs)
    if cfg.backend is not None and hasattr(model, "set_backend"):
        model.set_backend(cfg.backend)
    model.to(ctx.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    teacher = None
    if cfg.teacher is not None:
        teacher, _ = model_from_checkpoint(cfg.teacher)
        teacher.to(ctx.device).eval().requires_grad_(False)
    optimizer = create_optimizer_v2(model, opt="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(_loader(train_set, cfg, ctx, 0, train=True))
    if steps_per_epoch == 0:
        raise ValueError(f"--batch-size {cfg.batch_size} is larger than the {len(train_set) // ctx.world_size} training "
                         f"images each of {ctx.world_size} process(es) gets: lower it")
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    scheduler = CosineLRScheduler(
        optimizer, t_initial=cfg.epochs * steps_per_epoch, lr_min=cfg.min_lr, warmup_t=int(cfg.warmup_epochs * steps_per_epoch),
        warmup_lr_init=cfg.lr * 0.01, t_in_epochs=False)
    amp_dtype = _amp_dtype(cfg, ctx.device)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=amp_dtype == torch.float16)

    start_epoch, best, step = 0, -math.inf, 0
    last, best_path, log_path = out / "last.pt", out / "best.pt", out / "log.csv"
    state = None
    if cfg.resume and ctx.main:
        for stale in out.glob(".*.pt.*.tmp"):  # a checkpoint write cut off by a killed process: never read
            stale.unlink(missing_ok=True)
            say(f"removed {stale}, the partial checkpoint write of the run that was stopped")
    if cfg.resume and last.exists():
        state = load_checkpoint(last)
        if state["model_name"] != cfg.model or state["model_kwargs"] != kwargs:
            raise CheckpointError(f"{last} holds a {state['model_name']} {state['model_kwargs']} run, "
                                  f"not this {cfg.model} {kwargs} one: use another --output")
        saved = state["config"]
        # a setting that a checkpoint predates had its default then
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        wanted = {k: json.loads(json.dumps(getattr(cfg, k), default=str)) for k in RESUME_FIELDS}
        changed = [f"{k} {saved.get(k, defaults[k])} -> {v}" for k, v in wanted.items() if saved.get(k, defaults[k]) != v]
        if changed:
            raise CheckpointError(f"--resume: {last} was written with other settings ({', '.join(changed)}); "
                                  "resume with the same ones, or use another --output")
        load_weights(model, state["model"], last, cfg.model)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, best, step = state["epoch"] + 1, state["best_auc"], state["step"]
        if ctx.main:
            set_rng_state(state["rng"])
        say(f"resumed from {last}: epoch {state['epoch'] + 1} of {cfg.epochs} done")
    elif cfg.resume:
        say(f"--resume: no checkpoint at {last} yet, starting afresh")
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema_decay else None  # built after the weights load
    if ema is not None and state is not None:
        load_weights(ema.module, state["model_ema"], last, cfg.model)
    if start_epoch >= cfg.epochs:
        say(f"nothing to do: all {cfg.epochs} epochs of {out} are done")
    log_rows = _read_log(log_path, start_epoch - 1) if ctx.main else []

    forward_model = model
    if ctx.distributed:
        # the authors' crop never trains its ROI predictor: those parameters get no gradient
        frozen_roi = any(m.roi_mode == "crop" for m in getattr(model, "mxa_modules", list)())
        forward_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
            find_unused_parameters=frozen_roi)
    if cfg.compile:
        forward_model = torch.compile(forward_model)
    writer = _tensorboard(out) if ctx.main else None
    say(f"training {cfg.model} ({sum(p.numel() for p in model.parameters()):,} parameters) on {len(train_set)} "
        f"images, validating on {len(valid_set)}, {ctx.world_size} process(es) on {ctx.device}"
        + (f", distilling from {cfg.teacher}" if teacher is not None else ""))
    summary = {}
    for epoch in range(start_epoch, cfg.epochs):
        started = time.perf_counter()
        train_set.set_epoch(epoch)
        loader = _loader(train_set, cfg, ctx, epoch, train=True)
        model.train()
        total, count, seen, skipped = 0.0, 0, 0, 0
        # --on-nonfinite skip: a skipped batch's forward must not leave its statistics in BatchNorm
        buffers = [b for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                   for b in m.buffers(recurse=False)] if cfg.on_nonfinite == "skip" else []
        bar = tqdm(loader, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not (cfg.progress and ctx.main))
        for batch_no, (images, targets, mask, index) in enumerate(bar):
            if batch_no >= steps_per_epoch:
                break
            images = images.to(ctx.device, non_blocking=True)
            targets, mask = targets.to(ctx.device), mask.to(ctx.device)
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            saved = [b.clone() for b in buffers]
            with torch.autocast(ctx.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                outputs = forward_model(images)
                if teacher is not None:
                    with torch.no_grad():
                        teacher_logits = teacher(images)
                    loss = distillation_loss(outputs, targets, mask, teacher_logits, cfg.alpha, cfg.tau, cfg.distill_type)
                else:
                    loss = supervised_loss(outputs, targets, mask)
            loss_value = loss.item()  # the step's one host sync: the check and the progress figures
            if distributed.any_rank(ctx, not math.isfinite(loss_value)):  # every rank acts alike, none waits
                # each process names its own share of the batch
                if math.isfinite(loss_value):
                    where = f"a non-finite loss in another process at epoch {epoch + 1}, batch {batch_no + 1}"
                else:
                    where = _nonfinite_report(loss_value, images, index, train_set, epoch, batch_no)
                    where = f"process {ctx.rank}: {where}" if ctx.distributed else where
                if cfg.on_nonfinite == "raise":
                    raise FloatingPointError(f"{where} (--on-nonfinite skip skips such batches)")
                skipped += 1
                torch._foreach_copy_(buffers, saved)
                if not math.isfinite(loss_value):
                    print(f"\n--on-nonfinite skip: {where}: batch skipped", flush=True)
                continue
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.clip_grad is not None:
                scaler.unscale_(optimizer)
                dispatch_clip_grad(model.parameters(), cfg.clip_grad, mode=cfg.clip_mode)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            scheduler.step_update(step)
            if ema is not None:
                ema.update(model, step=step)
            total += loss_value * images.shape[0]
            count += images.shape[0]
            seen += images.shape[0] * ctx.world_size
            bar.set_postfix(loss=f"{total / count:.4f}", img_s=f"{seen / (time.perf_counter() - started):.1f}")
        bar.close()
        images_per_s = seen / (time.perf_counter() - started)

        distributed.sync_buffers(ctx, model)  # every rank validates (and rank 0 saves) the same model
        if ema is not None:
            distributed.sync_buffers(ctx, ema.module)
        valid_loader = _loader(valid_set, cfg, ctx, epoch, train=False)
        report = auc_report(*predict(model, valid_loader, ctx, amp_dtype, cfg.channels_last, cfg.progress)[:3], labels)
        ema_report = None
        if ema is not None:
            ema_report = auc_report(*predict(ema.module, valid_loader, ctx, amp_dtype, cfg.channels_last)[:3], labels)
        used = ema_report or report  # the weights eval and predict load (the EMA's, when kept)
        score = -math.inf if used["auc_macro"] is None else used["auc_macro"]
        is_best = score > best or not best_path.exists()
        best = max(best, score)
        save_error = None
        if ctx.main:
            # the log row first: a crash before the checkpoint lands leaves a row that resume drops
            row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], "train_loss": total / count if count else None,
                   "images_per_s": images_per_s, "auc_macro": report["auc_macro"], "auc_micro": report["auc_micro"],
                   "auc_competition": report["auc_competition"],
                   "ema_auc_macro": ema_report and ema_report["auc_macro"],
                   "ema_auc_micro": ema_report and ema_report["auc_micro"], "skipped_batches": skipped,
                   "seconds": time.perf_counter() - started}
            log_rows.append(row)
            _write_log(log_path, log_rows)
            state = {
                "model_name": cfg.model, "model_kwargs": kwargs, "labels": labels,
                "model": model.state_dict(), "model_ema": ema.module.state_dict() if ema is not None else None,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "epoch": epoch, "step": step, "best_auc": best, "rng": rng_state(),
                "config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
                "valid": {k: used[k] for k in ("auc_per_label", "auc_macro", "auc_micro", "auc_competition")},
            }
            try:
                save_checkpoint(last, state)
                if is_best:
                    save_checkpoint(best_path, state)
            except CheckpointError as exc:
                save_error = exc
        if not distributed.broadcast_flag(ctx, save_error is None):  # every rank stops, none waits
            raise save_error or CheckpointError(f"rank 0 could not write its checkpoint in {out}")
        if ctx.main:
            if writer is not None:
                for key in ("train_loss", "auc_macro", "auc_micro", "images_per_s"):
                    if row[key] is not None:
                        writer.add_scalar(key, row[key], epoch + 1)
            shown = format_auc(report["auc_macro"]) + (f", EMA {format_auc(ema_report['auc_macro'])}" if ema_report else "")
            loss_shown = "none (every batch skipped)" if row["train_loss"] is None else f"{row['train_loss']:.4f}"
            say(f"epoch {epoch + 1}/{cfg.epochs}: train loss {loss_shown}, {images_per_s:.1f} images/s, "
                f"valid mean AUC {shown}" + (" (best)" if is_best else ""))
        distributed.barrier(ctx)
        summary = {"output": str(out), "last": str(last), "best": str(best_path),
                   "best_auc_macro": None if best == -math.inf else best, "epochs": cfg.epochs, "valid": used}
    if writer is not None:
        writer.close()
    if ctx.main and summary:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _nonfinite_report(loss_value: float, images: torch.Tensor, index: torch.Tensor, dataset, epoch: int,
                      batch_no: int) -> str:
    """Where a non-finite loss came from: the batch, and the files whose images hold NaN or Inf, or
    that the inputs were finite (the model diverged)."""
    where = f"loss {loss_value} at epoch {epoch + 1}, batch {batch_no + 1}"
    bad = (~torch.isfinite(images).flatten(1).all(dim=1)).nonzero().flatten().tolist()
    if bad:
        files = [str(dataset.records[int(index[i])].path) for i in bad]
        return f"{where}: non-finite input in {', '.join(files[:5])}" + (" ..." if len(files) > 5 else "")
    files = [str(dataset.records[int(i)].path) for i in index[:3]]
    return (f"{where} with finite inputs ({', '.join(files)}{' ...' if len(index) > 3 else ''}): the training "
            "diverged; lower --lr or use --clip-grad")


def _tensorboard(out: Path):
    """A TensorBoard writer when tensorboard is installed (logs under OUTPUT/tensorboard), else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))
