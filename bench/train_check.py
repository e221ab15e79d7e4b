"""The distilled training run the project is built for, as ``bench/gpu_check.sh`` makes it on a GPU:
MXA-EfficientViT-M5 at batch 256 and 224 px, distilled from a DenseNet-121 teacher, ``--backend triton
--compile reduce-overhead``, one epoch with ``--profile-steps``: its images/s (the epoch's line and
``log.csv``) and the shares of a step's time (the profile line).

The data is a CheXpert-shaped folder of generated radiographs (:func:`mxa_bench.loader.chexpert_like_folder`,
which needs no pydicom), the teacher one step of supervised training on it (its weights do not matter
to the time).

    python -m mxa_bench.train_check FOLDER [--images N] [--batch-size B] [--img-size S] [--model M]
                                           [--backend B] [--compile MODE|none] [--profile-steps N]
                                           [--workers W]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mxa_kernels
from mxa_model.data.loader import workers_flag
from mxa_model.train.config import COMPILE_MODES, TrainConfig
from mxa_model.train.loop import train

from .loader import chexpert_like_folder


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mxa_bench.train_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="an empty folder for the data, the teacher and the run")
    parser.add_argument("--images", type=int, default=12 * 256, help="training images (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=256, help="(default: %(default)s)")
    parser.add_argument("--img-size", type=int, default=224, help="(default: %(default)s)")
    parser.add_argument("--model", default="mxa_efficientvit_m5", help="the student (default: %(default)s)")
    parser.add_argument("--backend", choices=mxa_kernels.BACKENDS, default="triton", help="(default: %(default)s)")
    parser.add_argument("--compile", choices=(*COMPILE_MODES, "none"), default="reduce-overhead",
                        help="(default: %(default)s)")
    parser.add_argument("--profile-steps", type=int, default=6, help="(default: %(default)s)")
    parser.add_argument("--workers", type=workers_flag, default="auto", help="loader workers (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)
    folder = Path(args.folder)
    print(f"writing {args.images} generated radiographs under {folder}", flush=True)
    data = chexpert_like_folder(folder, args.images, n_valid=64)
    common = dict(data=str(data), epochs=1, img_size=args.img_size, workers=args.workers, progress=False)
    train(TrainConfig(output=str(folder / "teacher"), model="densenet121", batch_size=min(args.batch_size, 64),
                      max_steps_per_epoch=1, **common))
    train(TrainConfig(output=str(folder / "student"), model=args.model, batch_size=args.batch_size,
                      teacher=str(folder / "teacher" / "last.pt"), backend=args.backend,
                      compile=None if args.compile == "none" else args.compile, profile_steps=args.profile_steps,
                      **common))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
