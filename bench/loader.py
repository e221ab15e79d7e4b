"""``mxa bench --suite loader``: what the input pipeline costs per image, and how many loader workers it takes
to feed a training rate.

Per image, in milliseconds, on ONE thread (``torch.set_num_threads(1)``, as in a DataLoader worker process),
the three CPU stages timed image by image, in turn for each image (interleaved, so that machine noise falls
on all of them alike):

- ``decode``: :func:`mxa_model.data.images.load_image` of the image's file alone;
- ``worker``: everything a loader worker does per training image, ``dataset[(epoch, i)]`` of a
  :class:`~mxa_model.data.chexpert.CheXpertDataset` with ``transform=train_transform(img_size)``: read and
  decode, the random resized crop in uint8, the targets;
- ``worker_cached``: the same reading the pixels from a decoded cache
  (:func:`~mxa_model.data.cache.prepare_cache` at shorter side ``max(320, img_size)``, made for the timed images
  in a temporary folder first) instead of decoding the JPEG;

and ``device_augment``: :class:`~mxa_model.data.augment.BatchAugment` on a batch of the workers' uint8 crops
on ``--device`` (CUDA: CUDA events after a warm-up; CPU: one thread), per image.

Each stage reports its median, the images per second of one core (``1000 / ms``) and, for the two worker
stages, the worker processes a ``--target-images-per-s`` rate takes: ``ceil(target * ms / 1000)``; the device
augmentation reports the seconds of the device per ``target`` images, the fraction of every second it holds
the device at the target rate (over 1: the device alone cannot keep up). The generated files and the cache
were just written, so they are read from the page cache; with ``--data`` each file is read as the OS holds
it (a cold disk shows in ``decode`` and ``worker`` of the first pass; ``--repeats 2`` for a warm second one).

A record (``--json``, and appended to ``--results-dir``/``DEVICE_loader.jsonl`` unless ``--no-save``) has
``suite`` ("loader"), ``stage``, ``ms_per_image`` (the median), ``p10_ms_per_image`` and ``p90_ms_per_image``,
``images_per_s_per_core``, ``workers_for_target`` (the worker stages; else null), ``device_s_per_target``
(``device_augment``; else null), ``target_images_per_s``, ``img_size``, ``device`` (as the other suites name
it: ``timing.environment``), ``device_type``, ``threads`` (1; null for a GPU), ``images`` (timed) and
``timed_calls``, ``commit``, ``date``, ``torch``, ``data`` (null for a temporary generated folder),
``generated``, ``jpeg_bytes_per_image``; ``worker_cached`` adds ``cache_side`` and ``cache_bytes_per_image``,
``device_augment`` its ``batch``.

Without ``--data`` the images come from :func:`chexpert_like_folder`: grey 320 x 390 JPEGs of about 27 KB,
CheXpert-v1.0-small's shape, made from a real radiograph (pydicom's test file ``RG1_UNCR.dcm``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image

from mxa_model.data.augment import BatchAugment
from mxa_model.data.cache import DEFAULT_SIDE, DecodedCache, prepare_cache
from mxa_model.data.chexpert import CheXpertDataset, Record, find_data_dir, resolve_path, write_csv
from mxa_model.data.images import load_image
from mxa_model.data.labels import DATASET_FOLDER
from mxa_model.data.transforms import train_transform

from . import timing
from .csv_read import chexpert_like_csv
from .runner import BenchError, _slug

STAGES = ("decode", "worker", "worker_cached", "device_augment")
DEFAULT_IMG_SIZE = 224
DEFAULT_IMAGES = 200
DEFAULT_TARGET = 10_000.0
DEFAULT_BATCH = 256
DEFAULT_AUGMENT_BATCHES = {"cpu": 5, "cuda": 20}
WARMUP_IMAGES = 5  # per-image stages: untimed calls first (imports, allocator, the cache's index)
WARMUP_BATCHES = {"cpu": 1, "cuda": 3}

# the generated images: CheXpert-v1.0-small's shape (width 320, height about 390, grey JPEG of about 27 KB)
IMAGE_HEIGHT, IMAGE_WIDTH = 390, 320
JPEG_QUALITY = 90
MARGIN = 0.08  # of each side: the room for each image's own crop offset
NOISE_STD = 3.5  # grey levels: a radiograph's grain (it brings the files to about 27 KB at quality 90)
RADIOGRAPH = "RG1_UNCR.dcm"  # a chest radiograph among pydicom's test files


# --------------------------------------------------------------------------------------------------
# the data


def _base_size() -> list[int]:
    return [round(IMAGE_HEIGHT * (1 + 2 * MARGIN)), round(IMAGE_WIDTH * (1 + 2 * MARGIN))]


def radiograph_file() -> str | None:
    """pydicom's test chest radiograph (``RG1_UNCR.dcm``, 1841 x 1955 pixels), or None where pydicom or its
    test data is not installed."""
    try:
        from pydicom.data import get_testdata_file

        return get_testdata_file(RADIOGRAPH, download=False)
    except ImportError:
        return None


def _base_radiograph() -> torch.Tensor:
    """The image every generated one is cut from, float (1, H, W) grey levels, at least the generated
    images' size plus their margin: pydicom's test chest radiograph, resized with its aspect ratio kept;
    where pydicom or its test data is not installed (the GPU machine), a procedural stand-in (smooth shading
    at three scales) whose JPEGs are about as large, so that the decoder has about as much to do."""
    path = radiograph_file()
    if path is not None:  # its aspect ratio kept: it covers the size, and the crops take their part of it
        image = load_image(path)
        scale = max(want / have for want, have in zip(_base_size(), image.shape[1:]))
        size = [max(want, round(have * scale)) for want, have in zip(_base_size(), image.shape[1:])]
        return TF.resize(image, size, antialias=True).float()
    generator = torch.Generator().manual_seed(0)

    def shading(height: int, width: int, amplitude: float) -> torch.Tensor:
        noise = torch.randn(1, 1, height, width, generator=generator)
        return amplitude * F.interpolate(noise, size=_base_size(), mode="bicubic", align_corners=False)[0]

    return 150.0 + shading(6, 5, 40.0) + shading(24, 20, 15.0) + shading(90, 74, 6.0)


def _variant(base: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One generated image, uint8 (1, 390, 320): the radiograph at its own crop offset, contrast and
    brightness, with grain."""
    def uniform(low: float, high: float) -> float:
        return low + (high - low) * torch.rand(1, generator=generator).item()

    top = int(uniform(0, base.shape[1] - IMAGE_HEIGHT + 1))
    left = int(uniform(0, base.shape[2] - IMAGE_WIDTH + 1))
    image = base[:, top:top + IMAGE_HEIGHT, left:left + IMAGE_WIDTH]
    image = (image - 128.0) * uniform(0.9, 1.3) + 128.0 + uniform(-25.0, 5.0)
    image = image + NOISE_STD * torch.randn(image.shape, generator=generator)
    return image.round().clamp(0, 255).to(torch.uint8)


def _frontal_rows(csv_path: Path, n_rows: int, seed: int, split: str, first_patient: int) -> list[list[str]]:
    """``n_rows`` rows of :func:`mxa_bench.csv_read.chexpert_like_csv` (its mix of sexes, ages and label
    cells), made frontal (a lateral row's blank AP/PA becomes AP) and named
    ``split/patientNNNNN/studyN/view1_frontal.jpg``, three studies a patient from ``first_patient`` on;
    the header first."""
    chexpert_like_csv(csv_path, n_rows, seed=seed)
    with open(csv_path, newline="", encoding="utf-8") as f:
        header, *rows = list(csv.reader(f))
    path_, view, projection = (header.index(name) for name in ("Path", "Frontal/Lateral", "AP/PA"))
    for i, row in enumerate(rows):
        row[path_] = f"{DATASET_FOLDER}/{split}/patient{first_patient + i // 3:05d}/study{i % 3 + 1}/view1_frontal.jpg"
        row[view] = "Frontal"
        row[projection] = row[projection] or "AP"
    return [header, *rows]


def chexpert_like_folder(path: str | os.PathLike, n_images: int, seed: int = 0, n_valid: int | None = None) -> Path:
    """Write a CheXpert-shaped data set under ``path`` and return its data folder,
    ``path/CheXpert-v1.0-small``: ``n_images`` training images (and ``n_valid``, by default
    ``min(n_images, 8)``, validation ones) as CheXpert-v1.0-small has them,
    ``{train,valid}/patientNNNNN/studyN/view1_frontal.jpg``, grey JPEGs of 320 x 390 pixels (width x height;
    about 27 KB each at quality 90), each the real chest radiograph of pydicom's test files at its own crop
    offset, contrast and brightness, with grain; and ``train.csv`` and ``valid.csv`` in CheXpert's format,
    every row frontal, with :func:`~mxa_bench.csv_read.chexpert_like_csv`'s mix of label cells, sexes and
    ages. The same ``seed`` gives the same files. Refuses (FileExistsError) a ``path`` whose
    ``CheXpert-v1.0-small`` folder exists and is not empty: it never writes over a data set.
    """
    if n_images < 1:
        raise ValueError(f"the generated data set needs at least 1 image, got {n_images}")
    n_valid = min(n_images, 8) if n_valid is None else n_valid
    if n_valid < 1:
        raise ValueError(f"the generated data set needs at least 1 validation image, got {n_valid}")
    data_dir = Path(path) / DATASET_FOLDER
    if data_dir.is_dir() and any(data_dir.iterdir()):
        raise FileExistsError(f"{data_dir}: exists and is not empty: measure it with --data, or generate into "
                              "another folder")
    data_dir.mkdir(parents=True, exist_ok=True)
    base = _base_radiograph()
    first_patient = 1
    for split, n_rows, split_seed in (("train", n_images, seed), ("valid", n_valid, seed + 1)):
        csv_path = data_dir / f"{split}.csv"
        rows = _frontal_rows(csv_path, n_rows, split_seed, split, first_patient)
        with open(csv_path, "w", newline="", encoding="utf-8") as f:
            csv.writer(f, lineterminator="\n").writerows(rows)
        generator = torch.Generator().manual_seed(2 * seed + (split == "valid"))
        column = rows[0].index("Path")
        for row in rows[1:]:
            file = resolve_path(row[column], data_dir)
            file.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(_variant(base, generator)[0].numpy(), "L").save(file, "JPEG", quality=JPEG_QUALITY)
        first_patient += math.ceil(n_rows / 3)  # the validation patients are not the training ones
    return data_dir


def _training_records(data_dir: Path, n_images: int) -> list[Record]:
    """The first ``n_images`` frontal training records of the data set (fewer when it has fewer)."""
    records = CheXpertDataset(data_dir, "train").records[:n_images]
    if not records:
        raise BenchError(f"{data_dir / 'train.csv'}: no frontal training image to time")
    return records


def _cache_of(records: list[Record], data_dir: Path, folder: Path, side: int) -> DecodedCache:
    """A decoded cache of ``records``' images at shorter side ``side``, prepared in ``folder``: from a
    data folder of their own there (their rows in a ``train.csv``, a link to each image where its Path cell
    leads), so that a large data set is not cached whole."""
    subset = folder / "data" / data_dir.name
    subset.mkdir(parents=True)
    for record in records:
        try:
            link = resolve_path(record.csv_path, subset)
        except ValueError as e:  # an absolute Path cell: it names the data set's own folder
            raise BenchError(f"{record.file}: cannot be cached apart from its data set ({e})") from None
        if not link.exists():  # rows naming the same image share one link
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.abspath(record.file))
    write_csv(subset / "train.csv", records)
    cache_dir = prepare_cache(subset, folder / "cache", side=side, splits=("train",), workers=0, progress=False)
    cache = DecodedCache(cache_dir, "train")
    cache.check(records, side)
    return cache


# --------------------------------------------------------------------------------------------------
# timing


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """``torch.set_num_threads(n)`` inside, the previous count restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def per_image_ms(calls: dict[str, Callable[[int, int], object]], n_images: int, repeats: int,
                 warmup: int = WARMUP_IMAGES) -> dict[str, list[float]]:
    """Milliseconds of every call ``fn(epoch, i)`` of each of ``calls`` for images ``i`` of ``range(n_images)``,
    ``repeats`` passes (epochs 1, 2, ...), the calls made in turn for each image; the first ``warmup`` images
    called once before, untimed (epoch 0)."""
    for i in range(min(warmup, n_images)):
        for fn in calls.values():
            fn(0, i)
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for epoch in range(1, repeats + 1):
        for i in range(n_images):
            for name, fn in calls.items():
                start = time.perf_counter()
                fn(epoch, i)
                samples[name].append((time.perf_counter() - start) * 1e3)
    return samples


def augment_batch_ms(images: torch.Tensor, img_size: int, batches: int, warmup: int) -> list[float]:
    """Milliseconds of each of ``batches`` calls of ``BatchAugment(img_size)`` on the uint8 batch ``images``
    (on its device), after ``warmup`` calls: CUDA events on a GPU, the wall clock on the CPU."""
    device = images.device
    augment = BatchAugment(img_size)
    generator = torch.Generator(device=device).manual_seed(0)
    for _ in range(warmup):
        augment(images, generator)
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(batches):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            augment(images, generator)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(batches):
            start = time.perf_counter()
            augment(images, generator)
            times.append((time.perf_counter() - start) * 1e3)
    return times


def workers_for(target_images_per_s: float, ms_per_image: float) -> int:
    """The worker processes that feed ``target_images_per_s`` when each takes ``ms_per_image`` an image."""
    return math.ceil(target_images_per_s * ms_per_image / 1000)


def stage_record(stage: str, samples_ms: list[float], per_batch: int, target: float, common: dict,
                 **fields) -> dict:
    """The record of one stage from its timed calls (``per_batch`` images a call): the median per image,
    the images per second of one core (of the device, for the device augmentation), the workers for the
    target (the worker stages) or the device's seconds per target images (the device augmentation)."""
    ms = statistics.median(samples_ms) / per_batch
    record = dict(common, stage=stage, ms_per_image=ms, images_per_s_per_core=1000 / ms,
                  workers_for_target=workers_for(target, ms) if stage in ("worker", "worker_cached") else None,
                  device_s_per_target=target * ms / 1000 if stage == "device_augment" else None,
                  p10_ms_per_image=_quantile(samples_ms, 0.1) / per_batch,
                  p90_ms_per_image=_quantile(samples_ms, 0.9) / per_batch,
                  timed_calls=len(samples_ms), images=len(samples_ms) * per_batch)
    record.update(fields)
    return record


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# --------------------------------------------------------------------------------------------------
# the report


NOTES = {
    "decode": "load_image: read + JPEG decode to uint8",
    "worker": "dataset[(epoch, i)]: decode + random resized crop (uint8) + targets",
    "worker_cached": "the same from the decoded cache",
    "device_augment": "BatchAugment: flip/rotation/affine/elastic + blur, normalized",
}


def format_table(records: list[dict]) -> str:
    target = records[0]["target_images_per_s"]
    head = f"workers for {target:,.0f}/s"
    lines = [f"{'stage':<15} {'ms/image':>9} {'p10-p90':>13} {'images/s/core':>13} {head:>20}  what"]
    for r in records:
        workers = "-" if r["workers_for_target"] is None else str(r["workers_for_target"])
        note = NOTES[r["stage"]]
        if r["stage"] == "worker_cached":
            note += f" (side {r['cache_side']}, {r['cache_bytes_per_image']:,.0f} B/image)"
        if r["stage"] == "device_augment":
            where = r["device_type"] + (f", {r['threads']} thread" if r["threads"] else "")
            note += f"; batch {r['batch']} on {where}: {r['device_s_per_target']:.3f} s per {target:,.0f} images"
        spread = f"{r['p10_ms_per_image']:.3f}-{r['p90_ms_per_image']:.3f}"
        lines.append(f"{r['stage']:<15} {r['ms_per_image']:>9.3f} {spread:>13} {r['images_per_s_per_core']:>13,.0f} "
                     f"{workers:>20}  {note}")
    return "\n".join(lines)


def _options(args: argparse.Namespace) -> dict:
    """The loader suite's settings from the flags, checked: ValueError (BenchError), one line."""
    refused = [flag for name, flag in (("stage", "--stage"), ("cases", "--cases"), ("providers", "--providers"),
                                       ("baseline", "--baseline"), ("write_baseline", "--write-baseline"),
                                       ("chart", "--chart"), ("from_json", "--from-json"), ("list", "--list"),
                                       ("time_budget", "--time-budget"))
               if getattr(args, name, None) not in (None, False)]
    if refused:
        raise BenchError(f"{', '.join(refused)}: not for the loader suite (its flags: --data or --make-data, "
                         "--img-size, --images, --target-images-per-s, --batch, --repeats, --device)")
    options = {"img_size": args.img_size or DEFAULT_IMG_SIZE, "images": args.images or DEFAULT_IMAGES,
               "target": args.target_images_per_s or DEFAULT_TARGET, "batch": args.batch or DEFAULT_BATCH,
               "repeats": args.repeats}
    for flag, value in (("--img-size", args.img_size), ("--images", args.images), ("--batch", args.batch),
                        ("--repeats", args.repeats)):
        if value is not None and value < 1:
            raise BenchError(f"{flag} must be at least 1, got {value}")
    if args.target_images_per_s is not None and not args.target_images_per_s > 0:
        raise BenchError(f"--target-images-per-s must be positive, got {args.target_images_per_s}")
    if args.data and args.make_data:
        raise BenchError("--data measures a data set, --make-data generates one: give one of them")
    return options


def run(args: argparse.Namespace) -> list[dict]:
    """Measure the four stages and return their records (printing the table as it goes)."""
    opts = _options(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda asked for, but no CUDA device is available")
    img_size, n_images, target, batch = opts["img_size"], opts["images"], opts["target"], opts["batch"]
    data_dir = find_data_dir(args.data, ("train",)) if args.data else None  # checked before any work
    with tempfile.TemporaryDirectory(prefix="mxa-loader-bench-") as scratch:
        scratch = Path(scratch)
        if data_dir is None:
            start = time.perf_counter()
            data_dir = chexpert_like_folder(args.make_data or scratch / "generated", n_images)
            source = f"pydicom's {RADIOGRAPH}" if radiograph_file() else "a procedural image (no pydicom test data)"
            print(f"generated {n_images} CheXpert-shaped training images (grey JPEG {IMAGE_WIDTH} x {IMAGE_HEIGHT}, "
                  f"quality {JPEG_QUALITY}, from {source}) in {time.perf_counter() - start:.1f} s: "
                  f"{data_dir if args.make_data else 'a temporary folder'}", flush=True)
        records = _training_records(data_dir, n_images)
        sizes = [os.stat(r.file).st_size for r in records]
        side = max(DEFAULT_SIDE, img_size)
        start = time.perf_counter()
        cache = _cache_of(records, data_dir, scratch / "cache", side)
        print(f"prepared a decoded cache of the {len(records)} images at side {side} in "
              f"{time.perf_counter() - start:.1f} s", flush=True)
        with torch_threads(1):
            cpu_env = timing.environment(torch.device("cpu"))
            env = cpu_env if device.type == "cpu" else timing.environment(device)
            common = {"suite": "loader", "commit": env["commit"], "date": env["date"], "torch": env["torch"],
                      "target_images_per_s": target, "img_size": img_size,
                      "data": str(data_dir) if args.data or args.make_data else None,
                      "generated": not args.data, "jpeg_bytes_per_image": statistics.mean(sizes)}
            where = cpu_env["device"] + ("" if env is cpu_env else f" and {env['device']}")
            print(f"suite loader on {where} (torch {env['torch']}, commit {env['commit']}): {len(records)} "
                  f"training images of {common['data'] or 'the generated folder'} (mean JPEG "
                  f"{statistics.mean(sizes) / 1e3:.1f} KB), crops of {img_size} px; per-image stages on one "
                  f"thread, as a loader worker runs them; "
                  + ("the files as the OS holds them (a cold disk shows in the first pass), the cache just written"
                     if args.data else "files and cache just written (read from the page cache)"), flush=True)
            transform = train_transform(img_size)
            plain = CheXpertDataset(None, records=records, transform=transform)
            cached = CheXpertDataset(None, records=records, transform=transform, cache=cache)
            samples = per_image_ms({"decode": lambda epoch, i: load_image(records[i].path),
                                    "worker": lambda epoch, i: plain[(epoch, i)],
                                    "worker_cached": lambda epoch, i: cached[(epoch, i)]},
                                   len(records), opts["repeats"] or 1)
            cpu = dict(common, device=cpu_env["device"], device_type="cpu", threads=1)
            found = [stage_record(stage, samples[stage], 1, target, cpu) for stage in STAGES[:2]]
            found.append(stage_record("worker_cached", samples["worker_cached"], 1, target, cpu, cache_side=side,
                                      cache_bytes_per_image=cache.nbytes / len(cache)))
            crops = [plain[(0, i)][0] for i in range(min(batch, len(records)))]
            images = torch.stack([crops[i % len(crops)] for i in range(batch)]).to(device)
            times = augment_batch_ms(images, img_size, opts["repeats"] or DEFAULT_AUGMENT_BATCHES[device.type],
                                     WARMUP_BATCHES[device.type])
            found.append(stage_record("device_augment", times, batch, target,
                                      dict(common, device=env["device"], device_type=device.type,
                                           threads=1 if device.type == "cpu" else None), batch=batch))
    print(format_table(found), flush=True)
    return found


def main(args: argparse.Namespace) -> int:
    """``mxa bench --suite loader``: measure, print the table, write --json, append to --results-dir."""
    records = run(args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(records, indent=2) + "\n")
        print(f"wrote {args.json}")
    if not args.no_save:
        device = records[-1]["device"]  # the run's device, as the other suites name their files
        history = Path(args.results_dir) / f"{_slug(device)}_loader.jsonl"
        history.parent.mkdir(parents=True, exist_ok=True)
        with history.open("a") as f:
            f.writelines(json.dumps(record) + "\n" for record in records)
        print(f"appended {len(records)} records to {history}")
    return 0
