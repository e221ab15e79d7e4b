"""The ``mxa`` command line: thin argument parsing over the library's functions."""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import mxa_kernels
import mxa_model


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


def demo(args: argparse.Namespace) -> int:
    """Build a model and time training steps (forward, backward, AdamW) on random images and labels."""
    torch.manual_seed(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
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


def backends(args: argparse.Namespace) -> int:
    """Print each kernel backend and whether it can serve here."""
    print(f"selected: {mxa_kernels.get_backend()}")
    for name, status in mxa_kernels.available_backends().items():
        print(f"{name:7s} {'available' if status.available else 'unavailable: ' + status.reason}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mxa", description="MXA Engine: MXA-EfficientViT chest X-ray classifiers.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("demo", help="build a model and time training steps on random data",
                            description=demo.__doc__)
    _add_model_args(p)
    p.add_argument("--batch-size", type=int, default=8, help="images per step (default: %(default)s)")
    p.add_argument("--steps", type=int, default=5, help="training steps to time (default: %(default)s)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.set_defaults(func=demo)

    p = commands.add_parser("backends", help="list the kernel backends and why any is unusable",
                            description=backends.__doc__)
    p.set_defaults(func=backends)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("batch_size", "steps", "img_size", "num_classes", "in_chans"):
        if getattr(args, name, 1) < 1:
            print(f"mxa: error: --{name.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError, mxa_kernels.BackendUnavailableError) as exc:
        print(f"mxa: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
