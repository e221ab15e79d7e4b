"""The ``mxa`` command line: thin argument parsing over the library's functions."""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import mxa_kernels
import mxa_model
from mxa_model.train.distributed import default_device


BAD_DATA_HELP = ("a malformed CSV row or unreadable image: stop naming it, or skip: check every image up front, "
                 "leave the bad ones out and count them (default: %(default)s)")


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="mxa_efficientvit_m5", help="model name (default: %(default)s)")
    parser.add_argument("--img-size", type=int, default=224, help="input side in pixels (default: %(default)s)")
    parser.add_argument("--num-classes", type=int, default=14, help="number of labels (default: %(default)s)")
    parser.add_argument("--in-chans", type=int, default=1, help="input channels (default: %(default)s)")
    parser.add_argument("--roi-mode", choices=mxa_kernels.ROI_MODES, default="crop",
                        help="MXA ROI mode (default: %(default)s)")
    parser.add_argument("--fusion", choices=mxa_model.FUSIONS, default="sum",
                        help="how attention and MXA join (default: %(default)s)")
    parser.add_argument("--backend", choices=mxa_kernels.BACKENDS, default=None,
                        help="kernel backend (default: $MXA_BACKEND, else auto)")


def step_time(args: argparse.Namespace) -> int:
    """Build a model and time training steps (forward, backward, AdamW) on random images and labels."""
    torch.manual_seed(args.seed)
    device = default_device(args.device)
    if args.backend is not None:
        mxa_kernels.set_backend(args.backend)
    model = mxa_model.create_model(args.model, img_size=args.img_size, num_classes=args.num_classes,
                                   in_chans=args.in_chans, roi_mode=args.roi_mode, fusion=args.fusion).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    served = mxa_kernels.resolve_backend("mxa_branch", None, device)
    print(f"model {args.model}: {n_params:,} parameters; input {args.batch_size} x {args.in_chans} x "
          f"{args.img_size} x {args.img_size} on {device}; kernel backend {mxa_kernels.get_backend()} "
          f"(MXA branch served by {served})")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.025)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    images = torch.randn(args.batch_size, args.in_chans, args.img_size, args.img_size, device=device)
    labels = (torch.rand(args.batch_size, args.num_classes, device=device) < 0.3).float()
    model.train()
    times = []
    for step in range(1, args.steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(images), labels)
        loss.backward()
        optimizer.step()
        loss_value = loss.item()  # also waits for the device
        elapsed = time.perf_counter() - start
        times.append(elapsed)
        print(f"step {step}/{args.steps}: loss {loss_value:.4f}, {elapsed * 1e3:.1f} ms "
              f"({args.batch_size / elapsed:.1f} images/s)", flush=True)
    measured = times[1:] or times  # the first step includes one-off allocation and warm-up
    median = statistics.median(measured)
    print(f"median train step (forward + backward + AdamW) over {len(measured)} step(s) after warm-up: "
          f"{median * 1e3:.1f} ms, {median / args.batch_size * 1e3:.2f} ms per image")
    return 0


def bench(args: argparse.Namespace) -> int:
    """Run a benchmark suite (see bench/README.md): print its table, append its records under --results-dir,
    check its key ratios against --baseline, draw --chart. Exit status 1 on a regression or a failed call."""
    from mxa_bench.runner import main as run

    return run(args)


def backends(args: argparse.Namespace) -> int:
    """Print each kernel backend and whether it can serve here, then each fused op and what serves it on
    this machine's default device."""
    print(f"selected: {mxa_kernels.get_backend()}")
    for name, status in mxa_kernels.available_backends().items():
        print(f"{name:7s} {'available' if status.available else 'unavailable: ' + status.reason}")
    device = default_device(None)
    print(f"fused ops, served on {device} by:")
    for name, op in mxa_kernels.OPS.items():
        print(f"  {name:26s} {mxa_kernels.resolve_backend(name, None, device):7s} ({op.package.replace('.', '/')}/)")
    return 0


def demo(args: argparse.Namespace) -> int:
    """The main job on the embedded data, no download: generate the data set, train a DenseNet-121 teacher
    briefly, distill an MXA student, evaluate it and write a report (AUC table, ROC curves, ROI overlays)."""
    from .pipeline import DemoConfig, run_demo

    run_demo(DemoConfig(output=args.output, n_train=args.n_train, n_valid=args.n_valid, img_size=args.img_size,
                        teacher_epochs=args.teacher_epochs, student_epochs=args.epochs, student=args.model,
                        roi_mode=args.roi_mode, batch_size=args.batch_size, workers=args.workers, seed=args.seed,
                        backend=args.backend, progress=not args.quiet))
    return 0


def synth(args: argparse.Namespace) -> int:
    """Write the embedded CheXpert-format data set (synthetic findings planted on a real radiograph)."""
    from .data.synth import generate

    folder = generate(args.output, n_train=args.n_train, n_valid=args.n_valid, img_size=args.img_size, seed=args.seed,
                      workers=args.workers, progress=not args.quiet)
    print(f"data set written to {folder} (use it as --data)")
    return 0


def train(args: argparse.Namespace) -> int:
    """Train a model (supervised, or distilled from --teacher) on a CheXpert-format folder."""
    from .train.loop import TrainConfig, train as run

    cfg = TrainConfig(
        data=args.data, output=args.output, model=args.model, epochs=args.epochs, img_size=args.img_size,
        batch_size=args.batch_size, teacher=args.teacher, distill_type=args.distill_type, alpha=args.alpha,
        tau=args.tau, lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
        clip_grad=args.clip_grad, clip_mode=args.clip_mode, ema_decay=args.ema_decay, amp=args.amp,
        channels_last=args.channels_last, backend=args.backend, compile=args.compile, seed=args.seed,
        workers=args.workers, roi_mode=args.roi_mode, policy=args.policy, views=tuple(v.strip() for v in args.views.split(",")),
        augment=args.augment, resume=args.resume, device=args.device, progress=not args.quiet,
        max_steps_per_epoch=args.max_steps, on_bad_data=args.on_bad_data, on_nonfinite=args.on_nonfinite)
    summary = run(cfg)
    if summary:
        print(f"checkpoints: {summary['last']} (last), {summary['best']} (best by validation mean AUC)")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    """Evaluate a checkpoint on a split: per-label ROC-AUC, macro and micro means, thresholds, ROI IoU."""
    from .data.chexpert import describe_skipped
    from .evaluate import evaluate as run
    from .metrics import format_auc_table

    result = run(args.checkpoint, args.data, args.split, json_path=args.json, report_dir=args.report_dir,
                 batch_size=args.batch_size, workers=args.workers, device=args.device, backend=args.backend,
                 progress=not args.quiet, on_bad_data=args.on_bad_data)
    if result["skipped"]:
        print(f"--on-bad-data skip: {describe_skipped(result['skipped'])}")
    print(format_auc_table(result))
    if "roi_iou" in result:
        roi = result["roi_iou"]
        print(f"ROI IoU with the planted findings: {roi['iou_mean']:.3f} (mean over blocks), "
              f"{roi['iou_best_block']:.3f} (best block), whole image {roi['iou_whole_image']:.3f}")
    if args.json:
        print(f"written to {args.json}")
    return 0


def predict(args: argparse.Namespace) -> int:
    """Per-finding probabilities for image or DICOM files, with optional ROI/heatmap overlays."""
    from .predict import format_predictions, predict_files, write_json

    results = predict_files(args.checkpoint, args.files, overlay_dir=args.overlay_dir, device=args.device)
    print(format_predictions(results))
    if args.json:
        write_json(results, args.json)
        print(f"written to {args.json}")
    return 0


def export(args: argparse.Namespace) -> int:
    """Export a checkpoint's model (eager kernels) to TorchScript or ONNX."""
    from .predict import export as run

    print(f"exported to {run(args.checkpoint, args.output, args.format)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .data.chexpert import ON_ERROR, UNCERTAINTY_POLICIES
    from .predict import EXPORT_FORMATS
    from .train.loop import AMP_MODES, CLIP_MODES
    from .train.losses import DISTILL_TYPES
    from mxa_bench.runner import add_arguments as bench_arguments

    parser = argparse.ArgumentParser(prog="mxa", description="MXA Engine: MXA-EfficientViT chest X-ray classifiers.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, fn, help):
        p = commands.add_parser(name, help=help, description=fn.__doc__)
        p.set_defaults(func=fn)
        return p

    p = command("demo", demo, "the main job on the embedded data (generate, teacher, distill, evaluate, report)")
    p.add_argument("--output", default="mxa-demo", help="folder for data, checkpoints and report (default: %(default)s)")
    p.add_argument("--model", default="mxa_efficientvit_m0", help="student model (default: %(default)s)")
    p.add_argument("--roi-mode", choices=mxa_kernels.ROI_MODES, default="align", help="student ROI mode (default: %(default)s)")
    p.add_argument("--n-train", type=int, default=1600, help="training images to generate (default: %(default)s)")
    p.add_argument("--n-valid", type=int, default=300, help="validation images to generate (default: %(default)s)")
    p.add_argument("--img-size", type=int, default=64, help="image side in pixels (default: %(default)s)")
    p.add_argument("--teacher-epochs", type=int, default=3, help="teacher epochs (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=5, help="student epochs (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="images per step (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="data loader workers (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--backend", choices=mxa_kernels.BACKENDS, default=None, help="kernel backend (default: auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = command("synth", synth, "write the embedded CheXpert-format data set")
    p.add_argument("--output", required=True, help="folder to write CheXpert-v1.0-small/ into")
    p.add_argument("--n-train", type=int, default=2000, help="training images (default: %(default)s)")
    p.add_argument("--n-valid", type=int, default=300, help="validation images (default: %(default)s)")
    p.add_argument("--img-size", type=int, default=224, help="image side in pixels (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = command("train", train, "train or distill a model on a CheXpert-format folder")
    p.add_argument("--data", required=True, help="the CheXpert-v1.0-small folder (holding train.csv, valid.csv)")
    p.add_argument("--output", required=True, help="folder for checkpoints (last.pt, best.pt) and log.csv")
    p.add_argument("--model", default="mxa_efficientvit_m5", help="an MXA model, or densenet121 for the teacher "
                                                                   "(default: %(default)s)")
    p.add_argument("--epochs", type=int, default=10, help="(default: %(default)s)")
    p.add_argument("--img-size", type=int, default=224, help="(default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="per process (default: %(default)s)")
    p.add_argument("--teacher", default=None, help="teacher checkpoint: distill into a dual-head student")
    p.add_argument("--distill-type", choices=DISTILL_TYPES, default="soft", help="(default: %(default)s)")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the distillation term (default: %(default)s)")
    p.add_argument("--tau", type=float, default=1.0, help="distillation temperature (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: %(default)s)")
    p.add_argument("--min-lr", type=float, default=1e-5, help="final learning rate (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=0.025, help="AdamW weight decay, not applied to "
                                                                       "biases, norms and attention biases (default: %(default)s)")
    p.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up (default: %(default)s)")
    p.add_argument("--clip-grad", type=float, default=None, help="clip gradients at this value (default: off)")
    p.add_argument("--clip-mode", choices=CLIP_MODES, default="norm", help="(default: %(default)s)")
    p.add_argument("--ema-decay", type=float, default=None, help="keep and evaluate an EMA of the weights, e.g. 0.999")
    p.add_argument("--amp", choices=AMP_MODES, default="auto", help="mixed precision on a GPU: auto = bf16 "
                                                                      "(default: %(default)s)")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format")
    p.add_argument("--backend", choices=mxa_kernels.BACKENDS, default=None, help="kernel backend (default: auto)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="data loader workers (default: %(default)s)")
    p.add_argument("--roi-mode", choices=mxa_kernels.ROI_MODES, default="crop", help="MXA ROI mode (default: %(default)s)")
    p.add_argument("--policy", default="ones", help="uncertain labels: a default and per-label overrides, e.g. "
                   f"'ones,Cardiomegaly=zeros'; policies: {', '.join(UNCERTAINTY_POLICIES)} (default: %(default)s)")
    p.add_argument("--views", default="frontal", help="frontal, lateral or frontal,lateral (default: %(default)s)")
    p.add_argument("--augment", type=float, default=1.0, help="augmentation strength, 0 = off (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/last.pt")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument("--max-steps", type=int, default=None, help="at most this many steps per epoch (smoke runs)")
    p.add_argument("--on-bad-data", choices=ON_ERROR, default="raise", help=BAD_DATA_HELP)
    p.add_argument("--on-nonfinite", choices=ON_ERROR, default="raise",
                   help="a batch whose loss is NaN or Inf: stop naming the batch and its files, or skip it "
                        "(no step) and count it in log.csv (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = command("eval", evaluate, "evaluate a checkpoint: per-label AUC, macro and micro means")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="the CheXpert-v1.0-small folder")
    p.add_argument("--split", default="valid", help="train, valid, or a CSV file (default: %(default)s)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--report-dir", default=None, help="write roc.png here")
    p.add_argument("--batch-size", type=int, default=64, help="(default: %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="(default: %(default)s)")
    p.add_argument("--device", default=None)
    p.add_argument("--backend", choices=mxa_kernels.BACKENDS, default=None)
    p.add_argument("--on-bad-data", choices=ON_ERROR, default="raise", help=BAD_DATA_HELP)
    p.add_argument("--quiet", action="store_true")

    p = command("predict", predict, "per-finding probabilities for image or DICOM files")
    p.add_argument("files", nargs="+", help="JPEG, PNG or DICOM files")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--json", default=None, help="write the probabilities to this JSON file")
    p.add_argument("--overlay-dir", default=None, help="write an ROI box and heatmap overlay PNG per file here")
    p.add_argument("--device", default=None)

    p = command("export", export, "export a checkpoint's model to TorchScript or ONNX")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--format", choices=EXPORT_FORMATS, default="torchscript", help="(default: %(default)s)")

    p = command("step-time", step_time, "build a model and time training steps on random data")
    _add_model_args(p)
    p.add_argument("--batch-size", type=int, default=8, help="images per step (default: %(default)s)")
    p.add_argument("--steps", type=int, default=5, help="training steps to time (default: %(default)s)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")

    p = command("bench", bench, "benchmark kernels, blocks and models: eager, triton, torch.compile, references")
    bench_arguments(p)

    p = command("backends", backends, "list the kernel backends and why any is unusable")
    return parser


def main(argv: list[str] | None = None) -> int:
    # the data package's errors (DataFormatError, ImageReadError) are ValueErrors and OSErrors
    from .train.checkpoint import CheckpointError

    args = build_parser().parse_args(argv)
    for name in ("batch_size", "steps", "img_size", "num_classes", "in_chans", "epochs", "n_train", "n_valid",
                 "teacher_epochs", "max_steps", "workers"):
        value, least = getattr(args, name, None), 0 if name == "workers" else 1
        if value is not None and value < least:
            print(f"mxa: error: --{name.replace('_', '-')} must be at least {least}", file=sys.stderr)
            return 2
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError, FloatingPointError, CheckpointError,
            mxa_kernels.BackendUnavailableError) as exc:
        # one line: an error raised in a data-loader worker arrives with the worker's traceback before it
        lines = [line for line in str(exc).splitlines() if line.strip()]
        print(f"mxa: error: {lines[-1] if lines else type(exc).__name__}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        hint = "; the same command with --resume continues from the last checkpoint" if args.command == "train" else ""
        print(f"mxa: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
