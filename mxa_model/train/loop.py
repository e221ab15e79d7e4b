"""The trainer: supervised training (a student, or the DenseNet-121 teacher) and knowledge distillation
into an MXA student, with checkpoints each epoch and an exact ``--resume``.

The data order and every augmentation are functions of (seed, epoch, sample index or rank): the shuffle
(:class:`mxa_model.data.loader.EpochSampler`), each image's crop in the loader's workers, and the batched
augmentations on the device, drawn from a generator seeded at each epoch's start; so they have no state
to save, and do not depend on the number of loader workers. The checkpoint written at an epoch's end
holds every process's RNG states all the same (Python, NumPy, torch's CPU and GPU generators). A run
interrupted at any point, even one process of a ``torchrun`` job, and resumed from its last checkpoint
with as many processes ends with the same weights as an uninterrupted run (deterministic CPU run); under
``torchrun --max-restarts N``, ``--resume auto`` makes every restart resume by itself.

A run goes through phases that share one :class:`Run`: the data (:func:`_load_data`), the model and
optimizer (:func:`_build_run`, then :func:`_wrap_for_steps` once the resume has loaded the weights),
the resume (:func:`_resume_from_checkpoint`), and per epoch the training steps (:func:`_train_epoch`),
the validation (:func:`_validate`) and the log row and checkpoints (:func:`_write_epoch`).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3, dispatch_clip_grad
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..data import CheXpertDataset, UncertaintyPolicy, eval_transform, train_transform
from ..data.augment import BatchAugment
from ..data.cache import DecodedCache
from ..data.chexpert import SPLITS, describe_skipped, find_data_dir
from ..data.loader import make_loader, resolve_workers
from ..inference import EVAL_POLICY, predict_loader
from ..metrics import auc_report, format_auc
from . import distributed
from .checkpoint import (CheckpointError, build_model, load_checkpoint, load_weights, model_from_checkpoint, rng_state,
                         save_checkpoint, set_rng_state)
from .config import RESUME_FIELDS, TrainConfig, model_kwargs
from .losses import distillation_loss, supervised_loss
from .profile import StepProfile

# log.csv's columns, one row per epoch; "epoch" counts from 1, as the console's "epoch N/EPOCHS" does;
# images_per_s is the training phase's whole rate, data_wait the share of it spent waiting for the next
# batch, compute_images_per_s the rate of the time left (what faster loading could reach)
LOG_FIELDS = ("epoch", "lr", "train_loss", "images_per_s", "data_wait", "compute_images_per_s", "auc_macro",
              "auc_micro", "auc_competition", "ema_auc_macro", "ema_auc_micro", "skipped_batches", "seconds")


@dataclass
class TrainData:
    """The data phase's result."""

    train_set: CheXpertDataset
    valid_set: CheXpertDataset
    train_loader: DataLoader  # one per split for the whole run: its workers persist across epochs
    valid_loader: DataLoader
    labels: list[str]
    steps_per_epoch: int


@dataclass
class Run:
    """What the phases of one run share: :func:`_build_run` makes it, :func:`_resume_from_checkpoint`
    restores it from a checkpoint, each epoch advances it."""

    cfg: TrainConfig
    ctx: distributed.Context
    data: TrainData
    model_kwargs: dict
    model: torch.nn.Module
    teacher: torch.nn.Module | None
    ema: ModelEmaV3 | None
    optimizer: torch.optim.Optimizer
    scheduler: CosineLRScheduler
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    augment: BatchAugment
    forward_model: torch.nn.Module | None = None  # what the steps call: the model under DDP and torch.compile
    teacher_forward: torch.nn.Module | None = None  # the teacher, compiled with --compile
    start_epoch: int = 0
    step: int = 0
    best_score: float = -math.inf  # the best validation mean AUC so far
    log_rows: list[dict] = field(default_factory=list)
    tensorboard: object = None  # a SummaryWriter on the main process, when tensorboard is installed

    @property
    def out(self) -> Path:
        return Path(self.cfg.output)

    @property
    def last_path(self) -> Path:
        return self.out / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.out / "best.pt"

    @property
    def log_path(self) -> Path:
        return self.out / "log.csv"

    def say(self, *args, **kwargs) -> None:
        """Print, on the main process only."""
        if self.ctx.main:
            print(*args, **kwargs)


@dataclass
class EpochStats:
    """What one epoch's training steps measured."""

    train_loss: float | None  # None when every batch was skipped
    images_per_s: float
    data_wait: float  # the share of the epoch's training time spent waiting for a batch
    compute_images_per_s: float  # images per second of the time not spent waiting
    skipped: int


def _amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of this run: bf16 (fp16, with a gradient scaler, where bf16 is unsupported or
    asked for) on a GPU; None (no autocast) on the CPU or with --amp off."""
    if device.type != "cuda" or cfg.amp == "off":
        return None
    if cfg.amp == "fp16" or (cfg.amp == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


def _read_log(path: Path, up_to_epoch: int) -> list[dict]:
    """The rows of log.csv for epochs 1 to ``up_to_epoch``."""
    if not path.exists():
        return []
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and rows[0]["epoch"] == "0":  # a log written when its rows counted from 0
        rows = [dict(row, epoch=str(int(row["epoch"]) + 1)) for row in rows]
    return [row for row in rows if int(row["epoch"]) <= up_to_epoch]


def _write_log(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def train(cfg: TrainConfig) -> dict:
    """Run the training ``cfg`` describes; returns the summary also written to ``OUTPUT/summary.json`` (on the
    main process; {} on the others and when no epoch was left to run)."""
    cfg.check()
    if os.environ.get("RANK", "0") == "0":  # before joining the process group, where a restart could hang
        for warning in distributed.restart_warnings(cfg.resume):
            print(f"warning: {warning}", file=sys.stderr, flush=True)
    ctx = distributed.setup(cfg.device)
    try:
        return _train(cfg, ctx)
    finally:
        distributed.teardown(ctx)


def _train(cfg: TrainConfig, ctx: distributed.Context) -> dict:
    """The phases, in order; the summary of the last epoch run ({} when none was left to run)."""
    # before any CSV is parsed and OUTPUT is made: a --data without both CSVs fails at once, leaving nothing
    data_dir = find_data_dir(cfg.data, SPLITS, say=print if ctx.main else None)
    if data_dir != Path(cfg.data):
        cfg = dataclasses.replace(cfg, data=str(data_dir))
    if ctx.main:
        Path(cfg.output).mkdir(parents=True, exist_ok=True)
    # the model's initialization, the same in every process: DDP broadcasts rank 0's weights, but each
    # process's EMA starts from its own copy
    torch.manual_seed(cfg.seed)
    run = _build_run(cfg, ctx, _load_data(cfg, ctx))
    torch.manual_seed(cfg.seed + ctx.rank)  # each process's own draws from here on (dropout, drop path)
    _resume_from_checkpoint(run)
    _wrap_for_steps(run)
    run.tensorboard = _tensorboard(run.out) if ctx.main else None
    run.say(f"training {cfg.model} ({sum(p.numel() for p in run.model.parameters()):,} parameters) on "
            f"{len(run.data.train_set)} images, validating on {len(run.data.valid_set)}, {ctx.world_size} "
            f"process(es) on {ctx.device}" + (f", distilling from {cfg.teacher}" if run.teacher is not None else ""))
    summary = {}
    for epoch in range(run.start_epoch, cfg.epochs):
        started = time.perf_counter()
        stats = _train_epoch(run, epoch, started)
        report, ema_report = _validate(run, epoch)
        summary = _write_epoch(run, epoch, started, stats, report, ema_report)
    if run.tensorboard is not None:
        run.tensorboard.close()
    if not ctx.main:
        return {}
    if summary:
        (run.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _load_data(cfg: TrainConfig, ctx: distributed.Context) -> TrainData:
    """The data phase: the training and validation sets, and the steps each epoch takes."""
    policy = UncertaintyPolicy.parse(cfg.policy)
    # --on-bad-data skip: every image is decoded once up front, so that a bad one is left out (and
    # counted) before training rather than stopping it halfway
    faults = dict(on_error=cfg.on_bad_data, image_check=cfg.on_bad_data == "skip")
    caches = {split: DecodedCache(cfg.cache, split) if cfg.cache is not None else None for split in SPLITS}
    train_set = CheXpertDataset(cfg.data, "train", policy=policy, views=cfg.views, cache=caches["train"],
                                transform=train_transform(cfg.img_size, cfg.augment), seed=cfg.seed, **faults)
    # validation scores the labelled cells only: uncertain cells are left out, whatever the training policy
    valid_set = CheXpertDataset(cfg.data, "valid", policy=EVAL_POLICY, views=cfg.views, cache=caches["valid"],
                                transform=eval_transform(cfg.img_size), seed=cfg.seed, **faults)
    for dataset in (train_set, valid_set):
        if dataset.skipped and ctx.main:
            print(f"--on-bad-data skip: {describe_skipped(dataset.skipped)} of {dataset.csv_path}")
    # every one of them, where the console shows three (CheXpert's 223,414 rows could leave out thousands)
    skipped = [f"{error}\n" for dataset in (train_set, valid_set) for error in dataset.skipped]
    listed = Path(cfg.output) / "skipped.txt"
    if ctx.main and skipped:
        listed.write_text("".join(skipped))
        print(f"every row and image left out, with its reason: {listed}")
    elif ctx.main:
        listed.unlink(missing_ok=True)  # an earlier run's list
    if len(train_set) == 0 or len(valid_set) == 0:
        raise ValueError(f"no images to train on in {cfg.data} after the view filter {cfg.views} "
                         f"({len(train_set)} train, {len(valid_set)} valid)")
    for dataset in (train_set, valid_set):
        if dataset.cache is not None:
            dataset.cache.check(dataset.records, cfg.img_size)
    workers = resolve_workers(cfg.workers)
    loaders = [make_loader(dataset, cfg.batch_size, workers, train, cfg.seed, ctx.rank, ctx.world_size,
                           pin_memory=ctx.device.type == "cuda")
               for dataset, train in ((train_set, True), (valid_set, False))]
    steps_per_epoch = len(loaders[0])
    if steps_per_epoch == 0:
        raise ValueError(f"--batch-size {cfg.batch_size} is larger than the {len(train_set) // ctx.world_size} training "
                         f"images each of {ctx.world_size} process(es) gets: lower it")
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    return TrainData(train_set, valid_set, *loaders, list(train_set.labels), steps_per_epoch)


def _build_run(cfg: TrainConfig, ctx: distributed.Context, data: TrainData) -> Run:
    """The model and optimizer phase: the model, the teacher, AdamW, the cosine schedule, the gradient
    scaler and the EMA, freshly initialized (:func:`_resume_from_checkpoint` loads a checkpoint into
    them)."""
    kwargs = model_kwargs(cfg, len(data.labels))
    model = build_model(cfg.model, kwargs)
    if cfg.backend is not None and hasattr(model, "set_backend"):
        model.set_backend(cfg.backend)
    model.to(ctx.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    teacher = None
    if cfg.teacher is not None:
        teacher = prepare_teacher(model_from_checkpoint(cfg.teacher)[0], ctx.device, cfg.channels_last)
    # fused: one kernel per step, and the update skipped on the device where a gradient is not finite
    optimizer = create_optimizer_v2(model, opt="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    steps = data.steps_per_epoch
    scheduler = CosineLRScheduler(
        optimizer, t_initial=cfg.epochs * steps, lr_min=cfg.min_lr, warmup_t=int(cfg.warmup_epochs * steps),
        warmup_lr_init=cfg.lr * 0.01, t_in_epochs=False)
    amp_dtype = _amp_dtype(cfg, ctx.device)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=amp_dtype == torch.float16)
    # a copy of the model's weights as they are now; a resumed run loads the checkpoint's EMA weights into it
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema_decay else None
    return Run(cfg, ctx, data, kwargs, model, teacher, ema, optimizer, scheduler, scaler, amp_dtype,
               BatchAugment(cfg.img_size, cfg.augment))


def prepare_teacher(teacher: torch.nn.Module, device: torch.device, channels_last: bool) -> torch.nn.Module:
    """The distillation teacher as the steps run it (under ``torch.inference_mode`` and the run's autocast):
    on ``device``, in eval mode, without gradients, and channels_last on a GPU (a convolutional network's
    fast layout there) or where asked."""
    teacher.to(device).eval().requires_grad_(False)
    if channels_last or device.type == "cuda":
        teacher.to(memory_format=torch.channels_last)
    return teacher


def _wrap_for_steps(run: Run) -> None:
    """The rest of the model phase, once :func:`_resume_from_checkpoint` has loaded the weights: DDP
    (which broadcasts rank 0's weights as it wraps) and torch.compile around the model, as
    ``run.forward_model``, and torch.compile around the teacher, as ``run.teacher_forward``."""
    forward_model, teacher = run.model, run.teacher
    if run.ctx.distributed:
        # the authors' crop never trains its ROI predictor: those parameters get no gradient (and DDP's search
        # for them copies its map of used parameters to the host each step). Gradients become views of DDP's
        # all-reduce buckets once copied in, not a second copy of them. static_graph is left off: in
        # PyTorch 2.14 its backward reads a value on the host for every parameter, every step
        frozen_roi = any(m.roi_mode == "crop" for m in getattr(run.model, "mxa_modules", list)())
        forward_model = torch.nn.parallel.DistributedDataParallel(
            run.model, device_ids=[run.ctx.device.index] if run.ctx.device.type == "cuda" else None,
            find_unused_parameters=frozen_roi, gradient_as_bucket_view=True)
    if run.cfg.compile is not None:
        mode = None if run.cfg.compile == "default" else run.cfg.compile
        forward_model = torch.compile(forward_model, mode=mode)
        if teacher is not None:
            teacher = torch.compile(teacher, mode=mode)
    run.forward_model, run.teacher_forward = forward_model, teacher


def _resume_from_checkpoint(run: Run) -> None:
    """The resume phase (``--resume``): model, EMA, optimizer, schedule, scaler, counters and this process's
    RNG states from ``OUTPUT/last.pt``, and the log rows of the epochs it holds."""
    cfg, ctx, last = run.cfg, run.ctx, run.last_path
    checkpoint = _find_checkpoint(run) if cfg.resume else None
    if checkpoint is not None:
        _check_resumable(run, checkpoint)
        load_weights(run.model, checkpoint["model"], last, cfg.model)
        if run.ema is not None:
            load_weights(run.ema.module, checkpoint["model_ema"], last, cfg.model)
        # a checkpoint from before the AdamW was fused says unfused: the load would keep its step counts on
        # the host, where the fused AdamW expects them on the parameters' device
        for group in checkpoint["optimizer"]["param_groups"]:
            group.update(fused=True, foreach=None)
        run.optimizer.load_state_dict(checkpoint["optimizer"])
        run.scheduler.load_state_dict(checkpoint["scheduler"])
        run.scaler.load_state_dict(checkpoint["scaler"])
        run.start_epoch, run.best_score, run.step = checkpoint["epoch"] + 1, checkpoint["best_auc"], checkpoint["step"]
        states = checkpoint["rng"]
        states = [states] if isinstance(states, dict) else states  # before per-process states: the main one's
        if ctx.rank < len(states):
            set_rng_state(states[ctx.rank], ctx.device)
        run.say(f"resumed from {last}: epoch {checkpoint['epoch'] + 1} of {cfg.epochs} done")
    if run.start_epoch >= cfg.epochs:
        run.say(f"nothing to do: all {cfg.epochs} epochs of {run.out} are done")
    # start_epoch epochs are done, and log.csv numbers them 1..start_epoch
    run.log_rows = _read_log(run.log_path, run.start_epoch) if run.ctx.main else []


def _find_checkpoint(run: Run) -> dict | None:
    """``OUTPUT/last.pt`` for ``--resume``, read by every process; None where ``--resume auto`` starts
    afresh. Every process must see the same folder (one that all nodes share) and find the same
    checkpoint; all of them stop together, with the same error, where one does not."""
    cfg, ctx, last = run.cfg, run.ctx, run.last_path
    if ctx.main:
        for stale in run.out.glob(".*.pt.*.tmp"):  # a checkpoint write cut off by a killed process: never read
            stale.unlink(missing_ok=True)
            run.say(f"removed {stale}, the partial checkpoint write of the run that was stopped")
    # a file only rank 0 writes: a process that does not see it has another folder at that path
    marker = run.out / f".shared-{distributed.all_gather_objects(ctx, uuid.uuid4().hex)[0]}"
    if ctx.distributed and ctx.main:
        marker.touch()
    distributed.barrier(ctx)
    checkpoint, found = None, "none"
    try:
        if last.exists():
            checkpoint = load_checkpoint(last)
            found = f"epoch {checkpoint['epoch'] + 1}'s (step {checkpoint['step']})"
    except CheckpointError as exc:  # every process reports it rather than leave the others waiting
        found = str(exc)
    sees = distributed.all_gather_objects(ctx, (not ctx.distributed or marker.exists(), found))
    if ctx.main:
        marker.unlink(missing_ok=True)
    by_find = {}
    for rank, (shared, find) in enumerate(sees):
        by_find.setdefault(find if shared else "another folder", []).append(str(rank))
    if len(by_find) > 1:
        seen = "; ".join(f"process(es) {', '.join(ranks)}: {find}" for find, ranks in by_find.items())
        raise CheckpointError(f"--resume: the processes find different checkpoints at {last} ({seen}); "
                              "--output must be a folder that every node shares")
    if checkpoint is None and found != "none":
        raise CheckpointError(found)
    if checkpoint is None:
        if cfg.resume == "last":
            raise CheckpointError(f"--resume: no checkpoint at {last} to continue from (--resume auto starts "
                                  "afresh when there is none)")
        run.say(f"--resume auto: no checkpoint at {last} yet, starting afresh")
    return checkpoint


def _check_resumable(run: Run, checkpoint: dict) -> None:
    """Refuse a checkpoint of another model, or written with other schedule, data or loss settings."""
    cfg, last = run.cfg, run.last_path
    if checkpoint["model_name"] != cfg.model or checkpoint["model_kwargs"] != run.model_kwargs:
        raise CheckpointError(f"{last} holds a {checkpoint['model_name']} {checkpoint['model_kwargs']} run, "
                              f"not this {cfg.model} {run.model_kwargs} one: use another --output")
    # each process's data share, the steps per epoch (and so the schedule) and random states depend on it
    processes = checkpoint.get("world_size", run.ctx.world_size)  # a checkpoint that predates the count: unchecked
    if processes != run.ctx.world_size:
        raise CheckpointError(f"--resume: {last} was written by {processes} process(es), this run has "
                              f"{run.ctx.world_size}; resume with {processes} (torchrun --nnodes, "
                              "--nproc-per-node), or use another --output")
    written_with = checkpoint["config"]
    # a setting that a checkpoint predates had its default then
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    wanted = {k: json.loads(json.dumps(getattr(cfg, k), default=str)) for k in RESUME_FIELDS}
    changed = [f"{k} {written_with.get(k, defaults[k])} -> {v}" for k, v in wanted.items()
               if written_with.get(k, defaults[k]) != v]
    if changed:
        raise CheckpointError(f"--resume: {last} was written with other settings ({', '.join(changed)}); "
                              "resume with the same ones, or use another --output")


def _train_epoch(run: Run, epoch: int, started: float) -> EpochStats:
    """One epoch's training steps (at most ``data.steps_per_epoch``), with a progress bar. The steps queue
    their work and never wait for the device; every ``--log-every`` steps and at the epoch's end a logging
    point (:func:`_read_steps`) reads what they left on it."""
    cfg, ctx, data = run.cfg, run.ctx, run.data
    data.train_loader.sampler.set_epoch(epoch)  # the epoch reaches the workers with each index
    # the batched augmentations' draws: a function of (seed, epoch, rank), like the rest of the epoch's data
    generator = torch.Generator(ctx.device).manual_seed(((cfg.seed * 100_003 + epoch) * 1009 + ctx.rank) % 2**63)
    run.model.train()
    # --on-nonfinite skip: a skipped batch's forward must not leave its statistics in BatchNorm (raise: the
    # run stops at the next logging point, saving nothing)
    bn_guard = BatchNormGuard(run.model) if cfg.on_nonfinite == "skip" else None
    profiling = cfg.profile_steps and epoch == run.start_epoch and ctx.main
    profile = StepProfile(cfg.profile_steps if profiling else 0, data.steps_per_epoch, ctx.device, run.out / "profile")
    tally, pending, waited = EpochTally(), [], 0.0
    bar = tqdm(total=data.steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
               disable=not (cfg.progress and ctx.main))
    batches = iter(data.train_loader)
    for batch_no in range(data.steps_per_epoch):
        profile.step_begins(batch_no)
        asked = time.perf_counter()
        images, targets, mask, index = next(batches)
        wait = time.perf_counter() - asked
        waited += wait
        profile.waited(wait)
        pending.append(_train_step(run, images, targets, mask, index, batch_no, generator, bn_guard, profile))
        bar.update()
        if (line := profile.step_ends(batch_no, epoch)) is not None:
            tqdm.write(line)
        if (batch_no + 1) % cfg.log_every == 0 or batch_no + 1 == data.steps_per_epoch:
            _read_steps(run, pending, tally, epoch)
            pending.clear()
            elapsed = time.perf_counter() - started
            if tally.images:
                seen = tally.images * ctx.world_size
                bar.set_postfix(loss=f"{tally.loss_sum / tally.images:.4f}", img_s=f"{seen / elapsed:.1f}",
                                data_wait=f"{waited / elapsed:.0%}")
    bar.close()
    elapsed = time.perf_counter() - started
    seen = tally.images * ctx.world_size  # the images of the batches kept, on every process
    return EpochStats(tally.loss_sum / tally.images if tally.images else None, seen / elapsed,
                      waited / elapsed, seen / max(elapsed - waited, 1e-9), tally.skipped)


@dataclass
class StepRecord:
    """What the host keeps of a step until the next logging point: the step's tensors stay on the device."""

    batch_no: int
    images: int
    index: torch.Tensor  # the batch's sample indices in the training set (on the host)
    loss: torch.Tensor  # 0-d
    skipped: torch.Tensor  # 0-d float32, 1 where the update was skipped (loss or gradients not finite)
    inputs_finite: torch.Tensor | None  # per image, for a batch that reached the device as floats


@dataclass
class EpochTally:
    """The epoch's figures, as read at its logging points so far."""

    loss_sum: float = 0.0  # over the images of the batches kept, on this process
    images: int = 0
    skipped: int = 0


def _train_step(run: Run, images: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, index: torch.Tensor,
                batch_no: int, generator: torch.Generator, bn_guard: BatchNormGuard | None,
                profile: StepProfile) -> StepRecord:
    """One training step, queued without waiting for the device (no value is read on the host)."""
    cfg, device = run.cfg, run.ctx.device
    if cfg.compile in ("reduce-overhead", "max-autotune"):  # modes that capture CUDA graphs
        torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs may be overwritten
    with profile.phase("augment"):
        images = images.to(device, non_blocking=True)
        # uint8 holds no NaN; a batch of floats (from a dataset that yields them) is checked, to name its files
        inputs_finite = torch.isfinite(images).flatten(1).all(dim=1) if images.is_floating_point() else None
        images = run.augment(images, generator)  # uint8 until here
        targets, mask = targets.to(device, non_blocking=True), mask.to(device, non_blocking=True)
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
    if bn_guard is not None:
        with profile.phase("optimizer"):  # the non-finite bookkeeping
            bn_guard.save()
    loss = _loss(run, images, targets, mask, profile)
    with profile.phase("optimizer"):
        skipped = _optimizer_step(run, loss, bn_guard)
    return StepRecord(batch_no, images.shape[0], index, loss.detach(), skipped, inputs_finite)


def _loss(run: Run, images: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
          profile: StepProfile) -> torch.Tensor:
    """The batch's loss: supervised, or distilled from the teacher; its backward queued."""
    cfg = run.cfg
    with torch.autocast(run.ctx.device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
        with profile.phase("forward"):
            outputs = run.forward_model(images)
        teacher_logits = None
        if run.teacher is not None:
            with profile.phase("teacher"), torch.inference_mode():
                teacher_logits = run.teacher_forward(images)
    with profile.phase("backward"):
        if teacher_logits is None:
            loss = supervised_loss(outputs, targets, mask)
        else:
            loss = distillation_loss(outputs, targets, mask, teacher_logits, cfg.alpha, cfg.tau, cfg.distill_type)
        # a non-finite loss makes every gradient NaN (its gradients could otherwise stay finite, an Inf in a
        # sum): under DDP the average then carries it to every process, and all skip the same update
        poison = torch.where(torch.isfinite(loss.detach()), 1.0, float("nan"))
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss * poison).backward()
    return loss


def _optimizer_step(run: Run, loss: torch.Tensor, bn_guard: BatchNormGuard | None) -> torch.Tensor:
    """Clipping, the AdamW step, the schedule and the EMA, after the backward; returns a 0-d float32 flag on
    the device, 1 where the loss or a gradient is not finite. Such a step is skipped on the device: the fused
    AdamW leaves the weights, its moments and its step count as they were (a float16 run's gradient scaler
    also lowers its scale), the EMA is not moved and BatchNorm's statistics are put back (``bn_guard``);
    the learning-rate schedule, a function of the batch count, moves on. Under DDP the gradients are
    averaged before the check, and a non-finite loss made its gradients NaN (:func:`_loss`): a non-finite
    value on any process makes every process skip."""
    optimizer = run.optimizer
    run.scaler.unscale_(optimizer)  # float16: the gradients divided by the scale (a no-op otherwise)
    skipped = (~torch.isfinite(loss.detach())).float()
    grads = [p.grad for p in run.model.parameters() if p.grad is not None]
    torch._amp_foreach_non_finite_check_and_unscale_(grads, skipped, loss.new_ones((), dtype=torch.float32))
    if run.cfg.clip_grad is not None:
        dispatch_clip_grad(run.model.parameters(), run.cfg.clip_grad, mode=run.cfg.clip_mode)
    if run.scaler.is_enabled():
        run.scaler.step(optimizer)  # hands the fused AdamW the scaler's own found-inf flag
        run.scaler.update()
    else:
        optimizer.found_inf = skipped  # read by the fused AdamW on the device, as GradScaler hands it
        optimizer.step()
        del optimizer.found_inf
    if bn_guard is not None:
        bn_guard.restore(skipped)
    run.step += 1
    run.scheduler.step_update(run.step)
    if run.ema is not None:
        _update_ema(run.ema, run.model, run.ema.get_decay(run.step), skipped)
    return skipped


@torch.no_grad()
def _update_ema(ema: ModelEmaV3, model: torch.nn.Module, decay: float, skipped: torch.Tensor) -> None:
    """timm's ``ModelEmaV3`` update as the trainer builds it (no dtype, device or buffer options): floats
    moved ``1 - decay`` of the way to the model's, the other buffers copied; not moved where ``skipped``
    (a 0-d device flag) is 1. timm's own update takes the weight as a number, which a tensor would be read
    into on the host. At decay 0 (the first step) the EMA becomes the model, as timm's exact copy: a
    skipped first step left the model as it was, and the EMA is a copy of it."""
    pairs = list(zip(ema.module.state_dict().values(), model.state_dict().values()))
    floats = [(e, v) for e, v in pairs if e.is_floating_point()]
    for ema_value, value in pairs:
        if not ema_value.is_floating_point() or decay == 0.0:
            ema_value.copy_(value)
    if decay == 0.0:
        return
    ema_values = [e for e, _ in floats]
    step = torch._foreach_sub([v for _, v in floats], ema_values)
    torch._foreach_mul_(step, (1.0 - skipped) * (1.0 - decay))
    torch._foreach_add_(ema_values, step)


class BatchNormGuard:
    """The BatchNorm statistics of a model as they were before a step, put back on the device where the
    step was skipped: one copy per dtype, and one select (the running means and variances, and the
    batch counts)."""

    def __init__(self, model: torch.nn.Module):
        buffers = [b for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                   for b in m.buffers(recurse=False)]
        self.groups = [[b for b in buffers if b.dtype == dtype] for dtype in dict.fromkeys(b.dtype for b in buffers)]
        self.saved = []

    def save(self) -> None:
        self.saved = [torch.cat([b.flatten() for b in group]) for group in self.groups]

    def restore(self, skipped: torch.Tensor) -> None:
        for group, saved in zip(self.groups, self.saved):
            now = torch.cat([b.flatten() for b in group])
            kept = torch.where(skipped > 0, saved, now).split([b.numel() for b in group])
            torch._foreach_copy_(group, [k.view(b.shape) for k, b in zip(kept, group)])


def _read_steps(run: Run, pending: list[StepRecord], tally: EpochTally, epoch: int) -> None:
    """A logging point: the one read of the device for ``pending``'s steps (under DDP, one all-reduce of
    their flags first, so that every process counts and stops alike), added to ``tally``. A batch whose
    loss is not finite on some process, or whose gradients were not (a float16 run's scaler overflow
    aside), is named: ``--on-nonfinite raise`` stops here, ``skip`` counts it."""
    if not pending:
        return
    losses = torch.stack([r.loss.float() for r in pending])
    bad = ~torch.isfinite(losses)
    if not run.scaler.is_enabled():  # float16 skips a step for an overflow of its scale, not of the batch
        bad |= torch.stack([r.skipped for r in pending]) > 0
    flags = distributed.any_rank(run.ctx, bad.float())
    values = torch.cat([losses, flags]).tolist()
    for record, loss, flag in zip(pending, values[:len(pending)], values[len(pending):]):
        if not flag:
            tally.loss_sum += loss * record.images
            tally.images += record.images
            continue
        tally.skipped += 1
        _skip_or_raise(run, record, loss, epoch)


def _skip_or_raise(run: Run, record: StepRecord, loss: float, epoch: int) -> None:
    """A batch skipped for a non-finite loss or gradient: raise naming it (``--on-nonfinite raise``), or say
    that it was skipped."""
    # each process names its own share of the batch
    batch = f"epoch {epoch + 1}, batch {record.batch_no + 1}"
    if math.isfinite(loss) and run.ctx.distributed:
        where = f"a non-finite loss in another process, or non-finite gradients, at {batch}"
    else:
        where = _nonfinite_report(loss, record, run.data.train_set, batch)
        where = f"process {run.ctx.rank}: {where}" if run.ctx.distributed else where
    if run.cfg.on_nonfinite == "raise":
        raise FloatingPointError(f"{where} (--on-nonfinite skip skips such batches)")
    if not math.isfinite(loss) or run.ctx.main:  # the process that saw it; the main one says it in any case
        print(f"\n--on-nonfinite skip: {where}: batch skipped", flush=True)


def _validate(run: Run, epoch: int) -> tuple[dict, dict | None]:
    """The validation phase: the AUC report of the model, and of its EMA when kept."""
    cfg, ctx = run.cfg, run.ctx
    distributed.sync_buffers(ctx, run.model)  # every rank validates (and rank 0 saves) the same model
    if run.ema is not None:
        distributed.sync_buffers(ctx, run.ema.module)
    valid_loader = run.data.valid_loader
    valid_loader.sampler.set_epoch(epoch)
    report = auc_report(*predict_loader(run.model, valid_loader, ctx, run.amp_dtype, cfg.channels_last, cfg.progress)[:3],
                        run.data.labels)
    ema_report = None
    if run.ema is not None:
        ema_report = auc_report(*predict_loader(run.ema.module, valid_loader, ctx, run.amp_dtype, cfg.channels_last)[:3],
                                run.data.labels)
    return report, ema_report


def _write_epoch(run: Run, epoch: int, started: float, stats: EpochStats, report: dict,
                 ema_report: dict | None) -> dict:
    """The writing phase: the log row, ``last.pt`` and (by validation mean AUC) ``best.pt`` on the main
    process, TensorBoard scalars and the epoch's line; returns the run's summary so far."""
    ctx = run.ctx
    used = ema_report or report  # the weights eval and predict load (the EMA's, when kept)
    score = -math.inf if used["auc_macro"] is None else used["auc_macro"]
    is_best = score > run.best_score or not run.best_path.exists()
    run.best_score = max(run.best_score, score)
    save_error, row = None, None
    rng = distributed.all_gather_objects(ctx, rng_state(ctx.device))  # every process's, for an exact resume
    if ctx.main:
        # the log row first: a crash before the checkpoint lands leaves a row that resume drops
        row = {"epoch": epoch + 1, "lr": run.optimizer.param_groups[0]["lr"], "train_loss": stats.train_loss,
               "images_per_s": stats.images_per_s, "data_wait": stats.data_wait,
               "compute_images_per_s": stats.compute_images_per_s, "auc_macro": report["auc_macro"],
               "auc_micro": report["auc_micro"],
               "auc_competition": report["auc_competition"],
               "ema_auc_macro": ema_report and ema_report["auc_macro"],
               "ema_auc_micro": ema_report and ema_report["auc_micro"], "skipped_batches": stats.skipped,
               "seconds": time.perf_counter() - started}
        run.log_rows.append(row)
        _write_log(run.log_path, run.log_rows)
        save_error = _save_checkpoints(run, epoch, used, is_best, rng)
    if not distributed.broadcast_flag(ctx, save_error is None):  # every rank stops, none waits
        raise save_error or CheckpointError(f"rank 0 could not write its checkpoint in {run.out}")
    if ctx.main:
        _show_epoch(run, epoch, row, report, ema_report, is_best)
    distributed.barrier(ctx)
    return {"output": str(run.out), "last": str(run.last_path), "best": str(run.best_path),
            "best_auc_macro": None if run.best_score == -math.inf else run.best_score, "epochs": run.cfg.epochs,
            "valid": used}


def _save_checkpoints(run: Run, epoch: int, used: dict, is_best: bool, rng: list[dict]) -> CheckpointError | None:
    """Write ``best.pt`` (when the epoch is the best) and ``last.pt`` atomically; the error, if one could not
    be written. ``rng``: every process's RNG states, by rank."""
    snapshot = {
        "model_name": run.cfg.model, "model_kwargs": run.model_kwargs, "labels": run.data.labels,
        "model": run.model.state_dict(), "model_ema": run.ema.module.state_dict() if run.ema is not None else None,
        "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(), "epoch": epoch, "step": run.step, "best_auc": run.best_score,
        "world_size": run.ctx.world_size, "rng": rng,
        "config": json.loads(json.dumps(dataclasses.asdict(run.cfg), default=str)),
        "valid": {k: used[k] for k in ("auc_per_label", "auc_macro", "auc_micro", "auc_competition")},
    }
    try:
        # best.pt first: a process killed between the two writes resumes from the previous last.pt and
        # redoes the epoch; the other order would resume past an epoch whose best.pt was never written
        if is_best:
            save_checkpoint(run.best_path, snapshot)
        save_checkpoint(run.last_path, snapshot)
    except CheckpointError as exc:
        return exc
    return None


def _show_epoch(run: Run, epoch: int, row: dict, report: dict, ema_report: dict | None, is_best: bool) -> None:
    """The epoch's TensorBoard scalars and its one line."""
    if run.tensorboard is not None:
        for key in ("train_loss", "auc_macro", "auc_micro", "images_per_s"):
            if row[key] is not None:
                run.tensorboard.add_scalar(key, row[key], row["epoch"])
    shown = format_auc(report["auc_macro"]) + (f", EMA {format_auc(ema_report['auc_macro'])}" if ema_report else "")
    loss_shown = "none (every batch skipped)" if row["train_loss"] is None else f"{row['train_loss']:.4f}"
    run.say(f"epoch {epoch + 1}/{run.cfg.epochs}: train loss {loss_shown}, {row['images_per_s']:.1f} images/s, "
            f"valid mean AUC {shown}" + (" (best)" if is_best else ""))


def _nonfinite_report(loss: float, record: StepRecord, dataset, batch: str) -> str:
    """Where a non-finite loss (or gradient, with a finite loss) came from: the batch, and the files whose
    images hold NaN or Inf, or that the inputs were finite (the model diverged)."""
    where = f"loss {loss} at {batch}" if not math.isfinite(loss) else f"non-finite gradients at {batch} (loss {loss})"
    finite = record.inputs_finite.tolist() if record.inputs_finite is not None else [True] * len(record.index)
    bad = [i for i, ok in enumerate(finite) if not ok]
    if bad:
        files = [str(dataset.records[int(record.index[i])].path) for i in bad]
        return f"{where}: non-finite input in {', '.join(files[:5])}" + (" ..." if len(files) > 5 else "")
    files = [str(dataset.records[int(i)].path) for i in record.index[:3]]
    return (f"{where} with finite inputs ({', '.join(files)}{' ...' if len(record.index) > 3 else ''}): the "
            "training diverged; lower --lr or use --clip-grad")


def _tensorboard(out: Path):
    """A TensorBoard writer when tensorboard is installed (logs under OUTPUT/tensorboard), else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))
