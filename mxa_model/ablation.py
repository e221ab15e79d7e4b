"""The ablation study on the embedded data (``mxa ablate``): does MXA help, does the trainable ROI (align)
help over the authors' crop, does distillation help?

Six arms, each trained with the same budget (data, epochs, batch, schedule, augmentation) over several
seeds: timm's plain EfficientViT of the student's width, MXA with the authors' crop, MXA with align, and
each of those distilled from one frozen DenseNet-121 teacher (trained once, before the arms). Every run
is evaluated on the validation split with its last weights (not the best epoch's: choosing an epoch by
the validation AUC would favour the arms whose curve is noisier). The plain model has one head, so its
distilled arm puts both loss terms on it; the MXA arms' distilled students get DeiT's second head (so the
distillation effects of the MXA arms include that head). Training speed is the median of the epochs'
images/s after the first, and a distilled arm's includes the teacher's forward pass.

Results: ``OUTPUT/ablation.json`` (each run, each arm's mean and spread, and the paired differences
between arms over the seeds), ``OUTPUT/ablation.png`` (AUC per arm with error bars) and the table printed
at the end. A run whose ``result.json`` already holds these settings is not trained again, so an
interrupted study continues where it stopped.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import mxa_kernels

from .evaluate import evaluate
from .pipeline import embedded_data
from .train.checkpoint import model_from_checkpoint
from .data.loader import workers_flag
from .train.config import TrainConfig, setting
from .train.loop import train

# name: (MXA ROI mode or None for timm's plain model, distilled)
ARMS = {
    "plain": (None, False), "plain+kd": (None, True),
    "mxa-crop": ("crop", False), "mxa-crop+kd": ("crop", True),
    "mxa-align": ("align", False), "mxa-align+kd": ("align", True),
}
METRICS = ("auc_macro", "auc_micro", "auc_competition", "roi_iou", "params", "images_per_s")
# the questions the study answers: (arm, arm it is compared with)
EFFECTS = (("mxa-crop", "plain"), ("mxa-align", "plain"), ("mxa-align", "mxa-crop"),
           ("plain+kd", "plain"), ("mxa-crop+kd", "mxa-crop"), ("mxa-align+kd", "mxa-align"))


@dataclass
class AblationConfig:
    """The study's settings; each field is an ``mxa ablate`` flag (kebab case; ``--quiet`` turns
    ``progress`` off)."""

    output: str = setting("mxa-ablation", "folder for data, runs, ablation.json and ablation.png")
    variant: str = setting("m0", "EfficientViT width of every arm (timm's efficientvit_VARIANT and "
                           "mxa_efficientvit_VARIANT)", ("m0", "m1", "m2", "m3", "m4", "m5"))
    seeds: int = setting(5, "seeds per arm (0, 1, ...)")
    arms: tuple[str, ...] = setting(tuple(ARMS), f"arms to run, comma-separated, of {', '.join(ARMS)}")
    n_train: int = setting(1600, "training images to generate")
    n_valid: int = setting(300, "validation images to generate")
    img_size: int = setting(64, "image side in pixels")
    epochs: int = setting(6, "epochs of every arm")
    teacher_epochs: int = setting(3, "epochs of the DenseNet-121 teacher")
    batch_size: int = setting(32, "images per step")
    max_steps_per_epoch: int | None = setting(None, "cap on the steps of an epoch (a quick check of the command)")
    augment: float = setting(0.5, "augmentation strength, 0 = off")
    workers: int | str = setting(2, "data loader worker processes (0: load in the main process; auto: the CPUs "
                                 "this process may use, less one)", parse=workers_flag)
    backend: str | None = setting(None, "kernel backend", mxa_kernels.BACKENDS, shown="auto")
    progress: bool = setting(True, "progress bars")


def run_ablation(cfg: AblationConfig) -> dict:
    unknown = [arm for arm in cfg.arms if arm not in ARMS]
    if unknown:
        raise ValueError(f"unknown arm(s) {', '.join(unknown)}; arms: {', '.join(ARMS)}")
    if len(set(cfg.arms)) != len(cfg.arms):
        raise ValueError(f"an arm is named twice in --arms {','.join(cfg.arms)}")
    if cfg.seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {cfg.seeds}")
    out = Path(cfg.output)
    started = time.perf_counter()
    data = embedded_data(out / "data", cfg.n_train, cfg.n_valid, cfg.img_size, 0, cfg.progress)
    # what a run's result depends on beyond its TrainConfig: the data set's and the teacher's settings
    depends = {"data": json.loads((out / "data" / "generated.json").read_text())}
    common = dict(data=str(data), img_size=cfg.img_size, batch_size=cfg.batch_size, workers=cfg.workers,
                  progress=cfg.progress, backend=cfg.backend, lr=2e-3, warmup_epochs=0.5, augment=cfg.augment,
                  max_steps_per_epoch=cfg.max_steps_per_epoch)
    teacher = None
    if any(ARMS[arm][1] for arm in cfg.arms):
        teacher_cfg = TrainConfig(output=str(out / "teacher"), model="densenet121", epochs=cfg.teacher_epochs,
                                  seed=0, **common)
        teacher_record = _run(teacher_cfg, "the DenseNet-121 teacher", depends)
        teacher, depends["teacher"] = teacher_record["last"], teacher_record["settings"]
    runs = []
    for seed in range(cfg.seeds):
        for arm in cfg.arms:
            roi_mode, distilled = ARMS[arm]
            run_cfg = TrainConfig(
                output=str(out / "runs" / arm / f"seed{seed}"), epochs=cfg.epochs, seed=seed,
                model=f"{'mxa_' if roi_mode else ''}efficientvit_{cfg.variant}", roi_mode=roi_mode or "align",
                teacher=teacher if distilled else None, **common)
            runs.append(_run(run_cfg, f"{arm}, seed {seed}", depends, arm=arm))
    arms = {arm: _summary([r for r in runs if r["arm"] == arm]) for arm in cfg.arms}
    effects = [_effect(runs, a, b) for a, b in EFFECTS if a in cfg.arms and b in cfg.arms]
    result = {"config": dataclasses.asdict(cfg), "runs": runs, "arms": arms, "effects": effects,
              "seconds": time.perf_counter() - started}
    (out / "ablation.json").write_text(json.dumps(result, indent=2))
    plot_ablation(arms, out / "ablation.png")
    print("\n" + format_table(arms) + "\n\n" + format_effects(effects))
    print(f"\nablation done in {result['seconds'] / 60:.1f} min: {out / 'ablation.json'}, {out / 'ablation.png'}")
    return result


def _run(cfg: TrainConfig, name: str, depends: dict, arm: str | None = None) -> dict:
    """Train ``cfg`` (unless its result.json holds these settings and its checkpoint is there) and, for an
    arm, evaluate its last weights; the run's record."""
    record_path = Path(cfg.output) / "result.json"
    # as result.json gives them back (lists, not tuples); neither progress bars, loader processes nor the
    # resume mode change a result (resume: the constant that records have held since it was a bool)
    settings = json.loads(json.dumps(dict(dataclasses.asdict(cfg), progress=None, workers=None, resume=False,
                                          **depends)))
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record["settings"] == settings and Path(record["last"]).is_file():
            print(f"{name}: done before ({record_path})")
            return record
    print(f"\n== {name} ==", flush=True)
    started = time.perf_counter()
    summary = train(cfg)
    record = {"settings": settings, "last": summary["last"], "train_seconds": time.perf_counter() - started}
    if arm is not None:
        report = evaluate(summary["last"], cfg.data, "valid", workers=cfg.workers, progress=False)
        model, _ = model_from_checkpoint(summary["last"])
        with open(Path(cfg.output) / "log.csv", newline="") as f:
            speeds = [float(row["images_per_s"]) for row in csv.DictReader(f)]
        speeds = speeds[1:] or speeds  # the first epoch also pays for warm-up (allocations, compilation)
        record.update(arm=arm, seed=cfg.seed, auc_macro=report["auc_macro"], auc_micro=report["auc_micro"],
                      auc_competition=report["auc_competition"],
                      roi_iou=(report.get("roi_iou") or {}).get("iou_mean"),
                      roi_iou_whole_image=(report.get("roi_iou") or {}).get("iou_whole_image"),
                      params=sum(p.numel() for p in model.parameters()), images_per_s=statistics.median(speeds))
    tmp = record_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(record_path)  # atomic: a study killed here redoes this run, never reads half a record
    return record


def _spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), n; None values (undefined) are left out."""
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def _summary(runs: list[dict]) -> dict:
    return {metric: _spread([r[metric] for r in runs]) for metric in METRICS}


def _effect(runs: list[dict], arm: str, baseline: str) -> dict:
    """``arm`` minus ``baseline``, seed by seed (the same seed: the same order of the training images;
    initializations differ with the architectures), for each AUC: the mean difference, its spread over
    the seeds, and on how many seeds it was positive."""
    by_seed = {(r["arm"], r["seed"]): r for r in runs}
    seeds = sorted(s for a, s in by_seed if a == arm and (baseline, s) in by_seed)
    effect = {"arm": arm, "baseline": baseline, "seeds": len(seeds)}
    for metric in ("auc_macro", "auc_micro", "auc_competition"):
        diffs = [by_seed[arm, s][metric] - by_seed[baseline, s][metric] for s in seeds
                 if by_seed[arm, s][metric] is not None and by_seed[baseline, s][metric] is not None]
        effect[metric] = dict(_spread(diffs), positive=sum(d > 0 for d in diffs))
    return effect


def _shown(stat: dict, digits: int = 3) -> str:
    if stat["mean"] is None:
        return "n/a"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}" if stat["n"] > 1 else f"{stat['mean']:.{digits}f}"


def format_table(arms: dict) -> str:
    """The per-arm table (mean ± sample standard deviation over the seeds), in Markdown."""
    lines = ["| arm | seeds | AUC macro | AUC micro | AUC competition | ROI IoU | parameters | training images/s |",
             "|---|---|---|---|---|---|---|---|"]
    for arm, s in arms.items():
        params = "n/a" if s["params"]["mean"] is None else f"{s['params']['mean']:,.0f}"
        lines.append(f"| {arm} | {s['auc_macro']['n']} | {_shown(s['auc_macro'])} | {_shown(s['auc_micro'])} | "
                     f"{_shown(s['auc_competition'])} | {_shown(s['roi_iou'])} | {params} | "
                     f"{_shown(s['images_per_s'], 0)} |")
    return "\n".join(lines)


def format_effects(effects: list[dict]) -> str:
    """The paired differences between arms (mean ± spread over the seeds, seeds where positive), in Markdown."""
    lines = ["| comparison | AUC macro | AUC micro | AUC competition |", "|---|---|---|---|"]
    for e in effects:
        cells = [f"{_shown(e[m])} ({e[m]['positive']}/{e[m]['n']} seeds > 0)" if e[m]["n"] else "n/a"
                 for m in ("auc_macro", "auc_micro", "auc_competition")]
        lines.append(f"| {e['arm']} − {e['baseline']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_ablation(arms: dict, path: Path) -> None:
    """AUC per arm (macro, micro, competition) with error bars (one sample standard deviation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(arms)
    metrics = (("auc_macro", "macro"), ("auc_micro", "micro"), ("auc_competition", "competition five"))
    fig, ax = plt.subplots(figsize=(1.4 * len(names) + 2, 4))
    width = 0.8 / len(metrics)
    for i, (metric, label) in enumerate(metrics):
        means = [arms[a][metric]["mean"] if arms[a][metric]["mean"] is not None else math.nan for a in names]
        stds = [arms[a][metric]["std"] or 0.0 for a in names]
        ax.bar([x + (i - 1) * width for x in range(len(names))], means, width, yerr=stds, capsize=3, label=label)
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set_ylabel("validation ROC-AUC")
    n = max(arms[a]["auc_macro"]["n"] for a in names)
    ax.set_title(f"AUC per arm, mean and standard deviation over {n} seed(s)")
    low = min((arms[a][m]["mean"] for a in names for m, _ in metrics if arms[a][m]["mean"] is not None), default=0.5)
    ax.set_ylim(max(0.0, low - 0.1), 1.0)
    ax.legend(loc="upper left", ncols=len(metrics))  # above the bars: the AUCs stay below 0.95
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
