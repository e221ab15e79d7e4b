"""The ``mxa bench`` flags, apart from the runner: the ``mxa`` command line builds its parser from this
module, which imports only the standard library (not torch, nor the runner, cases or suites).

The suite and provider names are plain tuples here; the tests check that they equal
``tuple(mxa_bench.suites.SUITES)`` (and the two suites of their own modules, ``cost`` and ``loader``) and
``mxa_bench.cases.PROVIDERS``.
"""

from __future__ import annotations

import argparse

SUITE_NAMES = ("smoke", "full", "cost", "loader", "predict")
PROVIDER_NAMES = ("eager", "triton", "triton+compile", "torch.compile", "torch.compile max-autotune",
                  "per-sample loop", "sdpa", "timm plain")


def stage(text: str) -> tuple[int, int, int, int]:
    """``--stage C,SIDE,HEADS,DV``: four positive integers."""
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 4 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected CHANNELS,SIDE,HEADS,VALUE_DIM, four positive integers; got {text!r}")
    return sizes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", choices=sorted(SUITE_NAMES), default="smoke",
                        help="smoke: CPU-sized, what CI runs; full: M5 shapes, batch 256, bf16, for a GPU; cost: "
                             "static GPU figures of the fused ops, no GPU needed, checked against "
                             "bench/baselines/cost.json; loader: the input pipeline's cost per image, on one thread "
                             "as a loader worker runs it, and the batched augmentation on --device; predict: a "
                             "GPU time model calibrated on timm's published tables, and its predictions for --card "
                             "(default: %(default)s)")
    parser.add_argument("--json", metavar="FILE", help="write this run's records to FILE (a JSON list; the predict "
                        "suite: an object with the calibration and the predictions)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--cases", help="only these cases (comma list; --list shows them; the cost suite: fused ops)")
    parser.add_argument("--providers", help=f"only these providers (comma list of: {', '.join(PROVIDER_NAMES)})")
    parser.add_argument("--batch", type=int, help="another batch size for every case (the loader suite: the "
                        "batch of its device augmentation, default 256)")
    parser.add_argument("--stage", type=stage, action="append", metavar="C,SIDE,HEADS,DV",
                        help="the cost suite: a stage shape to report instead of M5's (repeatable): channels, map "
                             "side, attention heads, value width per head; e.g. --stage 128,14,4,32")
    parser.add_argument("--repeats", type=int, help="CPU timing repeats per call (default: each case's; the loader "
                        "suite: passes over its images, default 1, and timed batches of its device augmentation, "
                        "default 5 on the CPU, 20 on CUDA)")
    # the current directory, never the package's folder: a run (or the tests) must not write into the source
    # tree or the installation; committed records go to bench/results/ by passing it
    parser.add_argument("--results-dir", default=".",
                        help="append the records to DEVICE_SUITE.jsonl in this folder (default: the current "
                             "directory; bench/results/ of the checkout holds the committed ones)")
    parser.add_argument("--no-save", action="store_true", help="append nothing under --results-dir")
    parser.add_argument("--baseline", metavar="FILE",
                        help="also compare the key ratios with FILE, a baseline written on this machine by "
                             "--write-baseline (the cost suite: its figures, instead of the committed baseline); "
                             "exit 1 on a regression")
    parser.add_argument("--write-baseline", metavar="FILE",
                        help="write this run's key ratios (the cost suite: its figures) to FILE as a baseline")
    parser.add_argument("--tolerance", type=float, default=0.3,
                        help="relative tolerance written by --write-baseline (default: %(default)s)")
    parser.add_argument("--chart", metavar="PNG", help="draw the speed-ups per case to PNG")
    parser.add_argument("--from-json", metavar="FILE",
                        help="run nothing: read the records of FILE (JSON list or JSON lines) for --chart, --baseline")
    parser.add_argument("--time-budget", type=float, metavar="SECONDS",
                        help="start no case (after the first) once this many seconds have passed; the run "
                             "still writes its outputs")
    parser.add_argument("--list", action="store_true", help="list the suite's cases and exit")
    # the loader suite's own flags (the other suites refuse them)
    loader = parser.add_argument_group("loader suite (--suite loader)")
    loader.add_argument("--data", metavar="DIR",
                        help="the CheXpert-v1.0-small folder (or the folder holding it) whose training images "
                             "are read (default: a generated CheXpert-shaped folder, see --make-data)")
    loader.add_argument("--make-data", metavar="DIR",
                        help="without --data: generate the CheXpert-shaped folder (grey 320 x 390 JPEGs made "
                             "from a real radiograph, train.csv, valid.csv) in DIR and keep it (default: in a "
                             "temporary folder, deleted after the run)")
    loader.add_argument("--img-size", type=int, metavar="N", help="the crop side in pixels (default: 224)")
    loader.add_argument("--images", type=int, metavar="N",
                        help="the images timed per stage, and generated without --data (default: 200)")
    predict = parser.add_argument_group("predict suite (--suite predict)")
    predict.add_argument("--card", help="the card to predict for (default: H100; the cards of "
                         "mxa_bench.predict.CARDS: H100, H200, A100, L4, RTX3090, RTX4090, RTX5090, RTXPRO6000MAXQ)")
    predict.add_argument("--models", help="models to predict (comma list of the project's or timm's names; "
                         "default: mxa_efficientvit_m5)")
    loader.add_argument("--target-images-per-s", type=float, metavar="R",
                        help="the training rate to feed: the worker processes it takes are reported "
                             "(default: 10000)")
