"""Applying a trained model: per-finding probabilities for image or DICOM files, overlays of the ROI boxes
and a class-activation heatmap (Grad-CAM, see :func:`grad_cam`) with a legend and, on the embedded data, the
planted findings' boxes (:func:`overlay_figure`), and export to TorchScript or ONNX."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from .data import eval_transform, load_image
from .data.chexpert import resolve_path
from .data.labels import FINDINGS_FILE
from .data.transforms import MEAN, STD, normalize
from .train.distributed import default_device
from .train.checkpoint import model_from_checkpoint

EXPORT_FORMATS = ("torchscript", "onnx")
# one per MXA block (M5 has 8), light so that they show on the radiograph and on the heatmap
BOX_COLOURS = ("#00e5ff", "#ffd400", "#ff3d8b", "#7cff4d", "#b266ff", "#4d8bff", "#ff8c00", "#00c896")
PLANTED_COLOUR = "#ffffff"  # the planted findings' boxes, dashed


def grad_cam(model, image: torch.Tensor, label: int, min_side: int = 4) -> torch.Tensor:
    """(H, W) Grad-CAM in [0, 1] of logit ``label``, upsampled to the image. It uses the last stage's
    feature map that is at least ``min_side`` pixels wide (a small input leaves the last stage 1x1, whose
    CAM is a constant), or the last feature map for models without stages."""
    model.eval()
    stages = getattr(model, "stages", None) or getattr(model, "features", None)
    maps = []
    hooks = [m.register_forward_hook(lambda m, args, out: maps.append(out)) for m in (stages or [])]
    try:
        with torch.enable_grad():
            image = image[None].detach().requires_grad_()  # so that every stage's output is in the graph
            logit = model(image)[0, label]
            maps = [f for f in maps if isinstance(f, torch.Tensor) and f.dim() == 4]
            wide = [f for f in maps if min(f.shape[-2:]) >= min_side]
            features = (wide or maps)[-1]
            (grad,) = torch.autograd.grad(logit, features)
    finally:
        for hook in hooks:
            hook.remove()
    cam = torch.relu((grad.mean(dim=(2, 3), keepdim=True) * features.detach()).sum(dim=1, keepdim=True))
    cam = torch.nn.functional.interpolate(cam, size=image.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    return cam / cam.max() if cam.max() > 0 else cam


def overlay_figure(image: torch.Tensor, cam: torch.Tensor, cam_label: str, boxes: torch.Tensor | None = None,
                   block_names: Sequence[str] = (), planted: Sequence[tuple[str, tuple[float, ...]]] = (),
                   title: str = ""):
    """The overlay figure of :func:`predict_files`: ``image`` (1, S, S) in [0, 1] in grey under the heatmap
    ``cam`` (S, S) in [0, 1], whose legend entry is ``cam_label``; the ROI box of each MXA block, ``boxes``
    (blocks, 4) normalized, in :data:`BOX_COLOURS`, named ``block_names``; and ``planted``, (label, normalized
    box) of planted findings, dashed in :data:`PLANTED_COLOUR` with their label. The legend is beside the image."""
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    side_h, side_w = image.shape[-2:]
    fig = Figure(figsize=(8.4, 5.4), layout="constrained")  # no pyplot: nothing global to switch to Agg or close
    ax = fig.subplots()
    ax.set_anchor("W")  # the square image at the left of its box, where the layout left room for the legend
    ax.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=1)
    heat = matplotlib.colormaps["inferno"](cam.numpy())
    heat[..., 3] = 0.55 * cam.numpy()  # opaque where the activation is high, clear where it is zero
    ax.imshow(heat)
    handles = [Patch(color=matplotlib.colormaps["inferno"](0.75), label=cam_label)]

    def rectangle(box, **style):
        x1, y1, x2, y2 = box[0] * side_w, box[1] * side_h, box[2] * side_w, box[3] * side_h
        return ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, **style))

    for b, (box, name) in enumerate(zip(boxes.tolist() if boxes is not None else [], block_names, strict=True)):
        colour = BOX_COLOURS[b % len(BOX_COLOURS)]
        rectangle(box, linewidth=1.2, edgecolor=colour)
        handles.append(Patch(fill=False, edgecolor=colour, label=f"ROI box of MXA {name}"))
    same_box = {}  # one box, one text: a Lung Opacity's boxes are those of its specific findings
    for label, box in planted:
        same_box.setdefault(tuple(box), []).append(label)
    for box, labels in same_box.items():
        patch = rectangle(box, linewidth=1.2, edgecolor=PLANTED_COLOUR, linestyle="--")
        ax.text(patch.get_x() + 0.5, patch.get_y() + 0.5, ", ".join(labels), color=PLANTED_COLOUR, fontsize=7,
                va="top", bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "linewidth": 0})
    if planted:
        handles.append(Patch(fill=False, edgecolor=PLANTED_COLOUR, linestyle="--",
                             label=f"planted finding ({FINDINGS_FILE})"))
    # beside the image, on a dark ground like the image's, where the light box colours show
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8, facecolor="#202020",
              labelcolor="white", framealpha=1)
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    return fig


def predict_files(checkpoint: str | Path, files: list[str | Path], overlay_dir: str | Path | None = None,
                  device: str | None = None, findings: str | Path | None = None) -> list[dict]:
    """Probabilities per finding for each file (JPEG, PNG or DICOM); with ``overlay_dir`` one PNG per file
    (:func:`overlay_figure`) showing, on the model's input, the Grad-CAM of the most probable finding, the
    ROI box of each MXA block and a legend. ``findings``: a data set folder whose findings.csv lists planted
    findings (the embedded data set's); the overlay of a file that is one of its images (a Path cell of that
    file resolved as the data set's CSVs are) shows their boxes too. No other file's."""
    from .evaluate import planted_box, sampled_boxes

    model, state = model_from_checkpoint(checkpoint)
    labels = state["labels"]
    device = default_device(device)
    model.to(device).eval()
    transform = eval_transform(state.get("config", {}).get("img_size", 224))
    planted_at = _planted_by_file(findings) if findings is not None else {}
    results = []
    for file in files:
        raw = load_image(file)
        image = normalize(transform(raw).to(device))
        with torch.no_grad():
            probs = torch.sigmoid(model(image[None]).float())[0].cpu()
        result = {"file": str(file), "probabilities": dict(zip(labels, probs.tolist()))}
        if overlay_dir is not None:
            overlay_dir = Path(overlay_dir)
            overlay_dir.mkdir(parents=True, exist_ok=True)
            top = int(probs.argmax())
            mxa = hasattr(model, "mxa_modules")
            boxes = sampled_boxes(model, image[None])[:, 0] if mxa else None
            # mapped through the resize and crop that made the model's input; those wholly outside it left out
            planted = [(label, planted_box(box, *raw.shape[-2:]))
                       for label, box in planted_at.get(Path(file).resolve(), [])]
            planted = [(label, box) for label, box in planted if box[2] > box[0] and box[3] > box[1]]
            # CheXpert files share names (view1_frontal.jpg): name the overlay after patient and study too
            target = overlay_dir / ("_".join(Path(file).with_suffix("").parts[-3:]) + "_overlay.png")
            shown = image.cpu() * STD + MEAN  # undo the normalization for display
            fig = overlay_figure(shown.clamp(0, 1), grad_cam(model, image, top).cpu(),
                                 f"Grad-CAM of {labels[top]} (p = {probs[top]:.2f})", boxes,
                                 model.mxa_block_names() if mxa else [], planted, "/".join(Path(file).parts[-3:]))
            fig.savefig(target, dpi=100)
            result["overlay"] = str(target)
        results.append(result)
    return results


def _planted_by_file(data: str | Path) -> dict[Path, list[tuple[str, tuple[float, ...]]]]:
    """Resolved image path -> [(label, pixel box)] of the planted findings in the findings.csv of the data set
    folder ``data``."""
    from .evaluate import read_findings

    data = Path(data)
    findings = read_findings(data)
    if not findings:
        raise FileNotFoundError(f"{data / FINDINGS_FILE}: no such file, or no planted finding in it")
    return {resolve_path(path, data).resolve(): boxes for path, boxes in findings.items()}


def format_predictions(results: list[dict]) -> str:
    """A table: one row per finding, one column per file."""
    labels = list(results[0]["probabilities"])
    names = [Path(r["file"]).name[:18] for r in results]
    lines = [f"{'finding':28s}" + "".join(f"{n:>20s}" for n in names)]
    for label in labels:
        lines.append(f"{label:28s}" + "".join(f"{r['probabilities'][label]:20.3f}" for r in results))
    return "\n".join(lines)


def export(checkpoint: str | Path, output: str | Path, fmt: str = "torchscript") -> Path:
    """Export the model (eager kernels, eval mode, one (1, 1, S, S) input) to TorchScript or ONNX."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {', '.join(EXPORT_FORMATS)}")
    # without onnx, torch's exporter raises a RuntimeError that names no remedy
    if fmt == "onnx" and importlib.util.find_spec("onnx") is None:
        raise ModuleNotFoundError("ONNX export needs the onnx package (pip install onnx)")
    model, state = model_from_checkpoint(checkpoint)
    if hasattr(model, "set_backend"):
        model.set_backend("eager")
    model.eval()
    side = state.get("config", {}).get("img_size", 224)
    example = torch.randn(1, 1, side, side)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        if fmt == "torchscript":
            torch.jit.save(torch.jit.trace(model, example), str(output))
        else:
            # the TorchScript-based exporter: torch.export's (dynamo=True) took 15-25 s instead of 4 s for M0
            # at 64 px, and fixes a batch-1 example's batch axis at 1 (torch 2.14)
            torch.onnx.export(model, (example,), str(output), input_names=["image"], output_names=["logits"],
                              dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    return output


def write_json(results, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=2))
