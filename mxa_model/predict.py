"""Applying a trained model: per-finding probabilities for image or DICOM files, overlays of the ROI boxes
and a class-activation heatmap (Grad-CAM, see :func:`grad_cam`), and export to TorchScript or ONNX."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from .data import eval_transform, load_image
from .data.transforms import MEAN, STD, normalize
from .train.distributed import default_device
from .train.checkpoint import model_from_checkpoint

EXPORT_FORMATS = ("torchscript", "onnx")
BOX_COLOURS = ("#00e5ff", "#ffd400", "#ff3d8b", "#7cff4d")  # cycled over the MXA blocks


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


def _overlay(image: torch.Tensor, cam: torch.Tensor, boxes: torch.Tensor | None, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt

    side_h, side_w = image.shape[-2:]
    fig, ax = plt.subplots(figsize=(5, 5.4))
    ax.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=1)
    heat = plt.get_cmap("inferno")(cam.numpy())
    heat[..., 3] = 0.55 * cam.numpy()  # opaque where the activation is high, clear where it is zero
    ax.imshow(heat)
    if boxes is not None:
        for b, box in enumerate(boxes.tolist()):
            x1, y1, x2, y2 = box[0] * side_w, box[1] * side_h, box[2] * side_w, box[3] * side_h
            ax.add_patch(patches.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, linewidth=1.2,
                                           edgecolor=BOX_COLOURS[b % len(BOX_COLOURS)]))
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def predict_files(checkpoint: str | Path, files: list[str | Path], overlay_dir: str | Path | None = None,
                  device: str | None = None) -> list[dict]:
    """Probabilities per finding for each file (JPEG, PNG or DICOM); with ``overlay_dir`` one PNG per file
    showing the Grad-CAM of the most probable finding and the ROI box of each MXA block."""
    from .evaluate import sampled_boxes

    model, state = model_from_checkpoint(checkpoint)
    labels = state["labels"]
    device = default_device(device)
    model.to(device).eval()
    transform = eval_transform(state.get("config", {}).get("img_size", 224))
    results = []
    for file in files:
        image = normalize(transform(load_image(file)).to(device))
        with torch.no_grad():
            probs = torch.sigmoid(model(image[None]).float())[0].cpu()
        result = {"file": str(file), "probabilities": dict(zip(labels, probs.tolist()))}
        if overlay_dir is not None:
            overlay_dir = Path(overlay_dir)
            overlay_dir.mkdir(parents=True, exist_ok=True)
            top = int(probs.argmax())
            boxes = sampled_boxes(model, image[None])[:, 0] if hasattr(model, "mxa_modules") else None
            # CheXpert files share names (view1_frontal.jpg): name the overlay after patient and study too
            target = overlay_dir / ("_".join(Path(file).with_suffix("").parts[-3:]) + "_overlay.png")
            shown = image.cpu() * STD + MEAN  # undo the normalization for display
            _overlay(shown.clamp(0, 1), grad_cam(model, image, top).cpu(), boxes.cpu() if boxes is not None else None,
                     f"{Path(file).name}: {labels[top]} {probs[top]:.2f}", target)
            result["overlay"] = str(target)
        results.append(result)
    return results


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
