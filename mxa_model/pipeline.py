"""The main job on the embedded data: generate the data set, train a DenseNet-121 teacher briefly, distill
an MXA student, evaluate it, and write a report (AUC table, ROC curves, ROI overlays)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import mxa_kernels

from .data.labels import DATASET_FOLDER
from .data.loader import workers_flag
from .evaluate import evaluate, read_findings
from .metrics import format_auc, format_auc_table
from .predict import predict_files
from .train.config import setting
from .train.config import TrainConfig
from .train.loop import train


@dataclass
class DemoConfig:
    """The main job's settings; each field is an ``mxa demo`` flag (the field's name in kebab case, but for
    those ``mxa_model.cli.DEMO_FLAGS`` names otherwise)."""

    output: str = setting("mxa-demo", "folder for data, checkpoints and report")
    n_train: int = setting(1600, "training images to generate")
    n_valid: int = setting(300, "validation images to generate")
    img_size: int = setting(64, "image side in pixels")
    teacher_epochs: int = setting(3, "teacher epochs")
    student_epochs: int = setting(5, "student epochs")
    student: str = setting("mxa_efficientvit_m0", "student model")
    roi_mode: str = setting("align", "student ROI mode", mxa_kernels.ROI_MODES)
    batch_size: int = setting(32, "images per step")
    # milder than for real data: the generator already varies pose and exposure
    augment: float = setting(0.5, "augmentation strength of both trainings, 0 = off")
    workers: int | str = setting(2, "data loader worker processes (0: load in the main process; auto: the CPUs "
                                 "this process may use, less one)", parse=workers_flag)
    seed: int = setting(0, "random seed")
    backend: str | None = setting(None, "kernel backend", mxa_kernels.BACKENDS, shown="auto")
    progress: bool = setting(True, "progress bars")


def embedded_data(folder: Path, n_train: int, n_valid: int, img_size: int, seed: int, progress: bool,
                  stage=lambda name, fn: fn()) -> Path:
    """The embedded data set under ``folder`` (its ``CheXpert-v1.0-small``), generated unless one made
    completely with these settings is there already; ``stage(name, fn)`` runs the generation."""
    # here, not at the top: `mxa` builds its parser from DemoConfig, and `mxa bench` runs without pydicom
    from .data.synth import generate

    data = folder / DATASET_FOLDER
    marker = folder / "generated.json"
    settings = {"n_train": n_train, "n_valid": n_valid, "img_size": img_size, "seed": seed}
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        print(f"using the data set already at {data}")
    else:
        marker.unlink(missing_ok=True)
        stage("generate the embedded data set", lambda: generate(folder, n_train=n_train, n_valid=n_valid,
                                                                  img_size=img_size, seed=seed, progress=progress))
        marker.write_text(json.dumps(settings))
    return data


def run_demo(cfg: DemoConfig) -> dict:
    out = Path(cfg.output)
    started = time.perf_counter()
    timings = {}

    def stage(name: str, fn):
        print(f"\n== {name} ==", flush=True)
        t = time.perf_counter()
        result = fn()
        timings[name] = time.perf_counter() - t
        return result

    data = embedded_data(out / "data", cfg.n_train, cfg.n_valid, cfg.img_size, cfg.seed, cfg.progress, stage)
    common = dict(data=str(data), img_size=cfg.img_size, batch_size=cfg.batch_size, workers=cfg.workers,
                  seed=cfg.seed, progress=cfg.progress, backend=cfg.backend, lr=2e-3, warmup_epochs=0.5,
                  augment=cfg.augment)
    teacher = TrainConfig(output=str(out / "teacher"), model="densenet121", epochs=cfg.teacher_epochs, **common)
    stage("train the DenseNet-121 teacher", lambda: train(teacher))
    student = TrainConfig(output=str(out / "student"), model=cfg.student, epochs=cfg.student_epochs,
                          teacher=str(out / "teacher" / "best.pt"), roi_mode=cfg.roi_mode, **common)
    stage(f"distill the {cfg.student} student", lambda: train(student))

    report_dir = out / "report"
    result = stage("evaluate the student", lambda: evaluate(out / "student" / "best.pt", data, "valid",
                                                            json_path=report_dir / "eval.json", report_dir=report_dir,
                                                            workers=cfg.workers, backend=cfg.backend,
                                                            progress=cfg.progress))
    teacher_result = evaluate(out / "teacher" / "best.pt", data, "valid", workers=cfg.workers, progress=False)
    files = [data.parent / p for p in sorted(read_findings(data)) if p.split("/")[1] == "valid"][:4]
    overlays = predict_files(out / "student" / "best.pt", files, overlay_dir=report_dir / "overlays",
                             findings=data) if files else []
    total = time.perf_counter() - started
    _write_report(report_dir / "report.md", cfg, result, teacher_result, overlays, timings, total)
    summary = {"report": str(report_dir / "report.md"), "eval_json": str(report_dir / "eval.json"),
               "roc_png": result.get("roc_png"), "overlays": [o["overlay"] for o in overlays],
               "student_checkpoint": str(out / "student" / "best.pt"), "auc_macro": result["auc_macro"],
               "auc_micro": result["auc_micro"], "seconds": total}
    (report_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n" + format_auc_table(result))
    print(f"\nmain job done in {total / 60:.1f} min. Report: {report_dir / 'report.md'}\n"
          f"ROC curves: {result.get('roc_png')}\noverlays: {report_dir / 'overlays'}\n"
          f"student checkpoint: {out / 'student' / 'best.pt'}")
    return summary


def _write_report(path: Path, cfg: DemoConfig, result: dict, teacher: dict, overlays: list, timings: dict,
                  total: float) -> None:
    roi = result.get("roi_iou") or {}
    lines = [
        "# MXA Engine main job on the embedded data",
        "",
        f"Student `{cfg.student}` (roi_mode `{cfg.roi_mode}`), distilled for {cfg.student_epochs} epochs from a "
        f"DenseNet-121 teacher trained for {cfg.teacher_epochs} epochs, on {cfg.n_train} synthetic training "
        f"images at {cfg.img_size} px; validation on {result['n_samples']} images.",
        "",
        "## Student: validation ROC-AUC",
        "",
        format_auc_table(result),
        "",
        f"Teacher: mean AUC {format_auc(teacher['auc_macro'])}, micro AUC {format_auc(teacher['auc_micro'])}.",
        "",
        "![ROC curves](roc.png)",
        "",
    ]
    if result["undefined"]:
        lines += ["Undefined AUCs (left out of the means): "
                  + "; ".join(f"{k}: {v}" for k, v in result["undefined"].items()), ""]
    if roi:
        lines += ["## ROI boxes against the planted findings", "",
                  f"Mean IoU over {roi['images']} validation images with planted findings: "
                  f"{roi['iou_mean']:.3f} averaged over the MXA blocks, {roi['iou_best_block']:.3f} for the best "
                  f"block; the whole image scores {roi['iou_whole_image']:.3f}.", ""]
    for o in overlays:
        lines.append(f"![{Path(o['file']).name}](overlays/{Path(o['overlay']).name})")
    lines += ["", "## Time", ""] + [f"- {k}: {v:.0f} s" for k, v in timings.items()] + [f"- total: {total:.0f} s"]
    path.write_text("\n".join(lines) + "\n")
