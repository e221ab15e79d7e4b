"""Evaluation of a checkpoint on a CheXpert-format split: AUCs, ROC plot, and for MXA models the ROI boxes
each MXA block samples, scored (on the embedded data set) against the boxes of the planted findings."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import torch

from .data import CheXpertDataset, eval_transform, load_image
from .data.cache import DecodedCache
from .data.chexpert import find_data_dir
from .data.labels import FINDINGS_FILE
from .data.loader import make_loader, resolve_workers
from .data.transforms import eval_crop, normalize
from .inference import EVAL_POLICY, predict_loader
from .metrics import auc_report, box_iou, plot_roc
from .train import distributed
from .train.checkpoint import model_from_checkpoint


@torch.no_grad()
def sampled_boxes(model, images: torch.Tensor) -> torch.Tensor:
    """(blocks, B, 4) normalized boxes the MXA blocks of ``model`` sample for ``images``."""
    modules = model.mxa_modules()
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda m, args: inputs.__setitem__(m, args[0])) for m in modules]
    try:
        model.eval()(images)
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack([m.sampled_boxes(inputs[m]).cpu() for m in modules])


def read_findings(data_dir: str | Path) -> dict[str, list[tuple[str, tuple[float, ...]]]]:
    """CSV path -> [(label, pixel box)] from the data folder's findings file ({} when there is none)."""
    path = Path(data_dir) / FINDINGS_FILE
    if not path.is_file():
        return {}
    found = defaultdict(list)
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            found[row["Path"]].append((row["Label"], tuple(float(row[k]) for k in ("x0", "y0", "x1", "y1"))))
    return dict(found)


def planted_box(box: tuple[float, ...], height: int, width: int) -> tuple[float, ...]:
    """A planted box (pixels of a ``height`` x ``width`` image, x1 and y1 exclusive) normalized to the centre
    square that :func:`eval_transform` keeps, the model's input: its part inside that square, degenerate (an
    edge) when it lies wholly outside."""
    left, top, side = eval_crop(height, width)
    return tuple(min(max(v, 0.0), 1.0) for v in ((box[0] - left) / side, (box[1] - top) / side,
                                                  (box[2] - left) / side, (box[3] - top) / side))


def roi_iou(model, dataset: CheXpertDataset, findings: dict, device, batch_size: int = 32) -> dict:
    """Mean over the images with planted findings of the best IoU between a block's sampled box and any
    planted box (coordinates normalized to the centre square that :func:`eval_transform` keeps), per MXA
    block; and the same for the whole image, the box a crop that never moved samples."""
    with_findings = [i for i, r in enumerate(dataset.records) if r.csv_path in findings]
    if not with_findings:
        return {}
    per_block, whole = [], []
    for start in range(0, len(with_findings), batch_size):
        chunk = with_findings[start:start + batch_size]
        images = normalize(torch.stack([dataset[i][0] for i in chunk]).to(device))
        boxes = sampled_boxes(model, images)  # (blocks, B, 4)
        for j, i in enumerate(chunk):
            record = dataset.records[i]
            height, width = load_image(record.path).shape[-2:]
            # a box wholly outside the part of the image the model saw still counts (IoU 0)
            planted = [planted_box(b, height, width) for _, b in findings[record.csv_path]]
            per_block.append([max(box_iou(box.tolist(), p) for p in planted) for box in boxes[:, j]])
            whole.append(max(box_iou((0.0, 0.0, 1.0, 1.0), p) for p in planted))
    blocks = torch.tensor(per_block).mean(dim=0).tolist()
    return {"images": len(per_block), "iou_per_block": blocks, "iou_mean": sum(blocks) / len(blocks),
            "iou_best_block": max(blocks), "iou_whole_image": sum(whole) / len(whole)}


def evaluate(checkpoint: str | Path, data: str | Path, split: str = "valid", json_path: str | Path | None = None,
             report_dir: str | Path | None = None, batch_size: int = 64, workers: int | str = 2,
             device: str | None = None, backend: str | None = None, progress: bool = True, on_bad_data: str = "raise",
             cache: str | Path | None = None) -> dict:
    """Evaluate the model in ``checkpoint`` (its EMA weights when it has them) on ``split`` of ``data``, the
    data set folder or the folder holding it (:func:`~mxa_model.data.chexpert.find_data_dir`).
    ``on_bad_data="skip"`` checks every image first and leaves out (and lists in ``skipped``) the
    malformed CSV rows and unreadable images instead of stopping at the first. ``cache``: a decoded cache
    (``mxa prepare``) holding the split, read instead of the image files."""
    data = find_data_dir(data, [split])  # before anything loads: a --data without the CSV fails at once
    model, state = model_from_checkpoint(checkpoint)
    config = state.get("config", {})
    img_size = config.get("img_size", 224)
    ctx = distributed.Context(device=distributed.default_device(device))
    if backend is not None and hasattr(model, "set_backend"):
        model.set_backend(backend)
    model.to(ctx.device).eval()
    # only labelled cells are scored: uncertain cells are left out, whatever the training policy
    dataset = CheXpertDataset(data, split, policy=EVAL_POLICY, views=tuple(config.get("views", ("frontal",))),
                              transform=eval_transform(img_size), on_error=on_bad_data,
                              image_check=on_bad_data == "skip",
                              cache=DecodedCache(cache, split) if cache is not None else None)
    if len(dataset) == 0:
        raise ValueError(f"split {split!r} of {data} holds no image after the view filter")
    if dataset.cache is not None:
        dataset.cache.check(dataset.records, img_size)
    loader = make_loader(dataset, batch_size, resolve_workers(workers), train=False, seed=0,
                         pin_memory=ctx.device.type == "cuda", persistent=False)  # one pass
    probs, targets, mask, _ = predict_loader(model, loader, ctx, progress=progress)
    labels = list(state.get("labels", dataset.labels))
    result = {"checkpoint": str(checkpoint), "model": state["model_name"], "split": split, "data": str(data),
              **auc_report(probs, targets, mask, labels), "skipped": [str(e) for e in dataset.skipped]}
    if hasattr(model, "mxa_modules"):
        result["roi_mode"] = state["model_kwargs"].get("roi_mode")
        findings = read_findings(data)
        if findings:
            result["roi_iou"] = roi_iou(model, dataset, findings, ctx.device)
    if report_dir is not None:
        report_dir = Path(report_dir)
        report_dir.mkdir(parents=True, exist_ok=True)
        plot_roc(probs, targets, mask, labels, report_dir / "roc.png", title=f"{state['model_name']} on {split}")
        result["roc_png"] = str(report_dir / "roc.png")
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2))
    return result
