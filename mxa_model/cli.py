"""The ``mxa`` command line: thin argument parsing over the library's functions."""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
import types
import typing

import torch

import mxa_kernels
import mxa_model
from mxa_model.train.distributed import default_device


# where a flag's name is not the --kebab-case of its config field (the spellings users, tests and the
# README know); an on-by-default bool field's flag turns it off
TRAIN_FLAGS = {"max_steps_per_epoch": "--max-steps", "progress": "--quiet"}
DEMO_FLAGS = {"student": "--model", "student_epochs": "--epochs", "progress": "--quiet"}
# the least value of each count or size, whatever the command (the exit status is 2 below it)
AT_LEAST = {"batch_size": 1, "steps": 1, "img_size": 1, "num_classes": 1, "in_chans": 1, "epochs": 1,
            "student_epochs": 1, "n_train": 1, "n_valid": 1, "teacher_epochs": 1, "max_steps_per_epoch": 1,
            "workers": 0, "seeds": 1, "log_every": 1, "profile_steps": 1}


def comma_list(text: str) -> tuple[str, ...]:
    """``frontal,lateral`` -> ``("frontal", "lateral")``."""
    return tuple(v.strip() for v in text.split(","))


def add_config_flags(parser: argparse.ArgumentParser, config_class: type, flags: dict[str, str]) -> None:
    """One flag per field of the dataclass ``config_class`` (fields made with
    :func:`mxa_model.train.config.setting`): ``--kebab-case`` of the field's name, or ``flags[name]``;
    parsed into ``args.<name>``, typed by the annotation, with the field's help, choices and default."""
    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        flag = flags.get(f.name, "--" + f.name.replace("_", "-"))
        parser.add_argument(flag, dest=f.name, **_flag_options(f, hints[f.name], flag))


def _flag_options(f: dataclasses.Field, hint, flag: str) -> dict:
    """argparse options of the flag of field ``f``: a bool is a switch (one that turns an on-by-default
    setting off, when True is its default); ``X | None`` takes an X; ``tuple[str, ...]`` a comma list; a
    field with a ``bare`` value takes its value optionally."""
    help = f.metadata["help"].replace("%", "%%")
    if f.default is dataclasses.MISSING:
        return dict(required=True, type=hint, help=help)
    if hint is bool:
        return dict(action="store_false" if f.default else "store_true", default=f.default,
                    help=f"{'no ' if f.default else ''}{help} (default: off)")
    kind, options = hint, dict(default=f.default, choices=f.metadata.get("choices"))
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        kind = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is tuple:
        kind = comma_list
    kind = f.metadata.get("parse") or kind
    if options["choices"] is None:
        options["metavar"] = flag.lstrip("-").replace("-", "_").upper()
    if f.metadata.get("bare") is not None:
        options.update(nargs="?", const=f.metadata["bare"])
        help = f"{help}; {flag} alone means {flag} {f.metadata['bare']}"
    shown = f.metadata.get("shown") or (",".join(f.default) if isinstance(f.default, tuple) else f.default)
    return dict(options, type=kind, help=f"{help} (default: {str(shown).replace('%', '%%')})")


def config_from_args(config_class: type, args: argparse.Namespace):
    """The ``config_class`` the flags of :func:`add_config_flags` describe."""
    return config_class(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)})


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="mxa_efficientvit_m5", help="model name (default: %(default)s)")
    parser.add_argument("--img-size", type=int, default=224, help="input side in pixels (default: %(default)s)")
    parser.add_argument("--num-classes", type=int, default=14, help="number of labels (default: %(default)s)")
    parser.add_argument("--in-chans", type=int, default=1, help="input channels (default: %(default)s)")
    parser.add_argument("--roi-mode", choices=mxa_kernels.ROI_MODES, default="align",
                        help="MXA ROI mode (crop: the authors', whose ROI predictor never trains; "
                             "default: %(default)s)")
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
        try:
            served = mxa_kernels.resolve_backend(name, None, device)
        except mxa_kernels.BackendUnavailableError:  # the selected backend cannot serve it: say why
            served = f"nothing: {mxa_kernels.triton_unavailable_reason(name, device)}"
        print(f"  {name:26s} {served:7s} ({op.package.replace('.', '/')}/)")
    return 0


def demo(args: argparse.Namespace) -> int:
    """The main job on the embedded data, no download: generate the data set, train a DenseNet-121 teacher
    briefly, distill an MXA student, evaluate it and write a report (AUC table, ROC curves, ROI overlays)."""
    from .pipeline import DemoConfig, run_demo

    run_demo(config_from_args(DemoConfig, args))
    return 0


def ablate(args: argparse.Namespace) -> int:
    """The ablation study on the embedded data: timm's plain EfficientViT, MXA with the authors' crop and
    with align, each with and without distillation, over several seeds; writes ablation.json, ablation.png
    and prints the table (docs/ablation.md)."""
    from .ablation import AblationConfig, run_ablation

    run_ablation(config_from_args(AblationConfig, args))
    return 0


def synth(args: argparse.Namespace) -> int:
    """Write the embedded CheXpert-format data set (synthetic findings planted on a real radiograph)."""
    from .data.synth import generate

    folder = generate(args.output, n_train=args.n_train, n_valid=args.n_valid, img_size=args.img_size, seed=args.seed,
                      workers=args.workers, progress=not args.quiet)
    print(f"data set written to {folder} (use it as --data)")
    return 0


def prepare(args: argparse.Namespace) -> int:
    """Decode a CheXpert-format folder's images once into a memory-mapped uint8 cache at a fixed shorter side,
    so that training and evaluation read pixels without decoding a JPEG. A run cut short continues where it
    stopped; a cache that is up to date is left alone."""
    from .data.cache import DecodedCache, prepare_cache
    from .data.loader import resolve_workers

    start = time.perf_counter()
    output = prepare_cache(args.data, args.output, side=args.size, splits=args.splits,
                           workers=resolve_workers(args.workers),
                           progress=not args.quiet, on_error=args.on_bad_data)
    caches = [DecodedCache(output, split) for split in args.splits]
    left_out = sum(len(cache.unreadable) for cache in caches)
    print(f"cached {sum(len(cache) for cache in caches)} images ({sum(cache.nbytes for cache in caches):,} bytes) "
          f"at side {args.size}{f', {left_out} unreadable left out' if left_out else ''} in "
          f"{time.perf_counter() - start:.1f} s: {output}")
    return 0


def train(args: argparse.Namespace) -> int:
    """Train a model (supervised, or distilled from --teacher) on a CheXpert-format folder."""
    from .train.config import TrainConfig
    from .train.loop import train as run

    cfg = config_from_args(TrainConfig, args)
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
                 progress=not args.quiet, on_bad_data=args.on_bad_data, cache=args.cache)
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

    results = predict_files(args.checkpoint, args.files, overlay_dir=args.overlay_dir, device=args.device,
                            findings=args.findings)
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


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    from .pipeline import DemoConfig

    add_config_flags(p, DemoConfig, DEMO_FLAGS)


def _ablate_arguments(p: argparse.ArgumentParser) -> None:
    from .ablation import AblationConfig

    add_config_flags(p, AblationConfig, {"progress": "--quiet", "max_steps_per_epoch": "--max-steps"})


def _synth_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", required=True, help="folder to write CheXpert-v1.0-small/ into")
    p.add_argument("--n-train", type=int, default=2000, help="training images (default: %(default)s)")
    p.add_argument("--n-valid", type=int, default=300, help="validation images (default: %(default)s)")
    p.add_argument("--img-size", type=int, default=224, help="image side in pixels (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _prepare_arguments(p: argparse.ArgumentParser) -> None:
    from .data.cache import DEFAULT_SIDE
    from .data.chexpert import ON_ERROR, SPLITS
    from .data.loader import workers_flag

    p.add_argument("--data", required=True, help="the CheXpert-v1.0-small folder, or the folder holding it")
    p.add_argument("--output", required=True, help="the cache folder (made if needed)")
    p.add_argument("--size", type=int, default=DEFAULT_SIDE,
                   help="the shorter side of the cached images, at least the --img-size they serve "
                        "(default: %(default)s)")
    p.add_argument("--splits", type=comma_list, default=SPLITS,
                   help="the splits to cache, comma-separated (default: %s)" % ",".join(SPLITS))
    p.add_argument("--workers", type=workers_flag, default=2,
                   help="decoding processes, 0: none; auto: the CPUs this process may use, less one "
                        "(default: %(default)s)")
    p.add_argument("--on-bad-data", choices=ON_ERROR, default="raise",
                   help="an unreadable image: stop naming it, or leave it out of the cache (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _train_arguments(p: argparse.ArgumentParser) -> None:
    from .train.config import TrainConfig

    add_config_flags(p, TrainConfig, TRAIN_FLAGS)


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    from .data.chexpert import ON_ERROR
    from .data.loader import workers_flag
    from .train.config import BAD_DATA_HELP

    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="the CheXpert-v1.0-small folder, or the folder holding it")
    p.add_argument("--split", default="valid", help="train, valid, or a CSV file (default: %(default)s)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--report-dir", default=None, help="write roc.png here")
    p.add_argument("--batch-size", type=int, default=64, help="(default: %(default)s)")
    p.add_argument("--workers", type=workers_flag, default=2,
                   help="data loader worker processes, or auto: the CPUs this process may use, less one "
                        "(default: %(default)s)")
    p.add_argument("--cache", default=None, help="a decoded cache made by mxa prepare: images read from it, not "
                                                 "decoded (default: off)")
    p.add_argument("--device", default=None)
    p.add_argument("--backend", choices=mxa_kernels.BACKENDS, default=None)
    p.add_argument("--on-bad-data", choices=ON_ERROR, default="raise", help=BAD_DATA_HELP + " (default: %(default)s)")
    p.add_argument("--quiet", action="store_true")


def _predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", help="JPEG, PNG or DICOM files")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--json", default=None, help="write the probabilities to this JSON file")
    p.add_argument("--overlay-dir", default=None, help="write an overlay PNG per file here: the model's input with "
                                                       "the Grad-CAM heatmap of the most probable finding, each MXA "
                                                       "block's ROI box and a legend")
    p.add_argument("--findings", default=None, metavar="DATA",
                   help="a CheXpert-v1.0-small folder with a findings.csv (the embedded data set's): the overlays of "
                        "its images show the boxes of their planted findings, dashed (default: none)")
    p.add_argument("--device", default=None)


def _export_arguments(p: argparse.ArgumentParser) -> None:
    from .predict import EXPORT_FORMATS

    p.add_argument("--checkpoint", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--format", choices=EXPORT_FORMATS, default="torchscript",
                   help="onnx needs the onnx package; both take any batch size (default: %(default)s)")


def _step_time_arguments(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--batch-size", type=int, default=8, help="images per step (default: %(default)s)")
    p.add_argument("--steps", type=int, default=5, help="training steps to time (default: %(default)s)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    # the flags of `mxa bench` come from a module that imports neither torch nor the benchmark runner
    from mxa_bench.arguments import add_arguments as bench_arguments

    parser = argparse.ArgumentParser(prog="mxa", description="MXA Engine: MXA-EfficientViT chest X-ray classifiers.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, fn, help, add_arguments in (
        ("demo", demo, "the main job on the embedded data (generate, teacher, distill, evaluate, report)",
         _demo_arguments),
        ("ablate", ablate, "the ablation study on the embedded data (plain, MXA crop/align, distillation)",
         _ablate_arguments),
        ("synth", synth, "write the embedded CheXpert-format data set", _synth_arguments),
        ("prepare", prepare, "decode a CheXpert-format folder once into a memory-mapped cache", _prepare_arguments),
        ("train", train, "train or distill a model on a CheXpert-format folder", _train_arguments),
        ("eval", evaluate, "evaluate a checkpoint: per-label AUC, macro and micro means", _eval_arguments),
        ("predict", predict, "per-finding probabilities for image or DICOM files", _predict_arguments),
        ("export", export, "export a checkpoint's model to TorchScript or ONNX", _export_arguments),
        ("step-time", step_time, "build a model and time training steps on random data", _step_time_arguments),
        ("bench", bench, "benchmark kernels, blocks and models: eager, triton, torch.compile, references",
         bench_arguments),
        ("backends", backends, "list the kernel backends and why any is unusable", None),
    ):
        p = commands.add_parser(name, help=help, description=fn.__doc__)
        p.set_defaults(func=fn)
        if add_arguments is not None:
            add_arguments(p)
    return parser


def _too_small(args: argparse.Namespace) -> str | None:
    """The first count or size below its least value (AT_LEAST), as an error message."""
    flags = {**TRAIN_FLAGS, **DEMO_FLAGS}
    for name, least in AT_LEAST.items():
        value = getattr(args, name, None)
        if isinstance(value, (int, float)) and value < least:  # --workers may be "auto"
            return f"{flags.get(name, '--' + name.replace('_', '-'))} must be at least {least}"
    return None


def main(argv: list[str] | None = None) -> int:
    # the data package's errors (DataFormatError, ImageReadError) are ValueErrors and OSErrors
    from .train.checkpoint import CheckpointError

    args = build_parser().parse_args(argv)
    problem = _too_small(args)
    if problem is not None:
        print(f"mxa: error: {problem}", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError, ModuleNotFoundError, FloatingPointError, CheckpointError,
            mxa_kernels.BackendUnavailableError) as exc:  # ModuleNotFoundError: an optional package is missing
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
