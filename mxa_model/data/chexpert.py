"""The CheXpert data set: CSV reading, uncertainty policies, view filters, patient split, Dataset.

A CheXpert CSV (``train.csv``, ``valid.csv``) has the columns :data:`COLUMNS`: ``Path, Sex, Age,
Frontal/Lateral, AP/PA`` and the 14 findings of :data:`LABELS`. A label cell is ``1.0`` (positive),
``0.0`` (negative), ``-1.0`` (uncertain) or blank (not mentioned). Paths are relative to the folder
that holds ``CheXpert-v1.0-small`` (see :func:`resolve_path`).
"""

from __future__ import annotations

import csv
import math
import operator
import os
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from .images import ImageReadError, load_image
from .labels import COLUMNS, DATASET_FOLDER, LABELS, NEGATIVE, POSITIVE, UNCERTAIN
from .transforms import sample_generator

VIEWS = ("Frontal", "Lateral")
PROJECTIONS = ("AP", "PA", "LL", "RL")
UNCERTAINTY_POLICIES = ("ignore", "zeros", "ones", "smooth-zeros", "smooth-ones")
DEFAULT_POLICY = "ones"
SMOOTH_ZEROS = (0.0, 0.3)  # the range of the uniform draw of "smooth-zeros"
SMOOTH_ONES = (0.55, 0.85)  # and of "smooth-ones"
BLANK_POLICIES = ("zeros", "ignore")
ON_ERROR = ("raise", "skip")
SPLITS = ("train", "valid")  # the splits CheXpert keeps as train.csv and valid.csv in its folder
_LABEL_CELLS = {POSITIVE, NEGATIVE, UNCERTAIN}
_LABEL_CELL_VALUES = {"1.0": POSITIVE, "0.0": NEGATIVE, "-1.0": UNCERTAIN, "": math.nan}  # as CheXpert writes them
_PATIENT_STUDY = re.compile(r"(?:^|/)(patient\d+)/(study\d+)/")


class DataFormatError(ValueError):
    """A CSV that does not follow the CheXpert format: one line naming the file, the row and the culprit.

    ``path`` is the CSV file, ``row`` its line number (the header is row 1; None for the whole file),
    ``reason`` what is wrong.
    """

    def __init__(self, path: str | os.PathLike, row: int | None = None, reason: str | None = None):
        self.path, self.row, self.reason = path, row, reason
        if reason is None:  # one argument: a whole message (how a DataLoader worker's error is re-raised)
            message = str(path)
        else:
            message = f"{path}: {reason}" if row is None else f"{path}: row {row}: {reason}"
        super().__init__(message)

    def __reduce__(self):
        return type(self), (self.path, self.row, self.reason)


# --------------------------------------------------------------------------------------------------
# uncertainty policy


@dataclass(frozen=True)
class UncertaintyPolicy:
    """How label cells become a training target and a loss mask, per label.

    ``policies`` has one entry per label of :data:`LABELS`, for the uncertain (``-1.0``) cells:

    - ``"ignore"`` (U-Ignore): target 0, mask 0, so the cell is left out of the loss;
    - ``"zeros"`` / ``"ones"`` (U-Zeros / U-Ones): target 0 / 1;
    - ``"smooth-zeros"`` / ``"smooth-ones"`` (label smoothing): a target drawn uniformly in
      ``smooth_zeros`` / ``smooth_ones``; the draw is a function of the sample index, the seed and
      the epoch (see :meth:`targets`), so that training is reproducible.

    ``blank`` is for blank (not mentioned) cells: ``"zeros"`` (target 0, mask 1, the usual reading
    as negative) or ``"ignore"`` (mask 0). Positive and negative cells always give target 1 / 0,
    mask 1. Build one with :meth:`parse`.
    """

    policies: tuple[str, ...] = (DEFAULT_POLICY,) * len(LABELS)
    blank: str = "zeros"
    smooth_zeros: tuple[float, float] = SMOOTH_ZEROS
    smooth_ones: tuple[float, float] = SMOOTH_ONES

    def __post_init__(self):
        if len(self.policies) != len(LABELS):
            raise ValueError(f"{len(self.policies)} uncertainty policies for {len(LABELS)} labels")
        for policy in self.policies:
            _check_choice(policy, UNCERTAINTY_POLICIES, "uncertainty policy")
        _check_choice(self.blank, BLANK_POLICIES, "blank-cell policy")
        for name, (low, high) in (("smooth_zeros", self.smooth_zeros), ("smooth_ones", self.smooth_ones)):
            if not 0.0 <= low <= high <= 1.0:
                raise ValueError(f"{name} range ({low}, {high}) is not within [0, 1] in order")

    @classmethod
    def parse(cls, spec: str = DEFAULT_POLICY, overrides: Mapping[str, str] | None = None, *,
              blank: str = "zeros") -> UncertaintyPolicy:
        """A policy from a default and per-label overrides.

        ``spec`` is the command-line form: comma-separated items, at most one bare policy (the
        default, :data:`DEFAULT_POLICY` when absent) and ``Label=policy`` items, e.g.
        ``"ones,Cardiomegaly=zeros,Edema=smooth-ones"``. ``overrides`` maps label names to policies
        and wins over ``spec``. Label names match case-insensitively. An unknown policy or label, or
        two defaults, raise ValueError naming it.
        """
        default, per_label = None, {}
        for item in (part.strip() for part in spec.split(",")):
            if not item:
                continue
            if "=" in item:
                label, policy = (s.strip() for s in item.split("=", 1))
                per_label[_canonical(label, LABELS, "label")] = policy
            elif default is not None:
                raise ValueError(f"two default uncertainty policies in {spec!r}: {default!r} and {item!r}")
            else:
                default = item
        for label, policy in (overrides or {}).items():
            per_label[_canonical(label, LABELS, "label")] = policy
        default = default or DEFAULT_POLICY
        return cls(tuple(per_label.get(label, default) for label in LABELS), blank=blank)

    def __str__(self) -> str:
        """The :meth:`parse` form: the most common policy, then the labels that differ from it."""
        default = max(UNCERTAINTY_POLICIES, key=self.policies.count)
        return ",".join([default] + [f"{label}={p}" for label, p in zip(LABELS, self.policies) if p != default])

    @property
    def smoothing(self) -> bool:
        """Whether some label draws its uncertain targets at random."""
        return any(p.startswith("smooth-") for p in self.policies)

    def targets(self, labels: np.ndarray, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(target, mask), float32 arrays of ``labels``' shape (..., 14), from raw cell values.

        ``labels`` holds 1 / 0 / -1 and NaN for blank. ``rng`` draws the smoothed targets: one
        uniform number per label, taken from ``rng`` whatever the cells hold, so that the draws
        of a row depend on the generator only; it may be None when :attr:`smoothing` is False.
        """
        labels = np.asarray(labels, dtype=np.float32)
        low, high, uncertain_mask = self._uncertain_arrays()
        draw = rng.random(labels.shape, dtype=np.float32) if self.smoothing else np.zeros(labels.shape, np.float32)
        uncertain_target = low + (high - low) * draw
        blank = np.isnan(labels)
        uncertain = labels == UNCERTAIN
        target = np.where(uncertain, uncertain_target, (labels == POSITIVE).astype(np.float32))
        mask = np.where(uncertain, uncertain_mask, np.float32(1.0))
        if self.blank == "ignore":
            mask = np.where(blank, np.float32(0.0), mask)
        return target.astype(np.float32), mask.astype(np.float32)

    def _uncertain_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per label: the low and high end of the uncertain target's range, and its mask."""
        ranges = {"ignore": (0.0, 0.0), "zeros": (0.0, 0.0), "ones": (1.0, 1.0),
                  "smooth-zeros": self.smooth_zeros, "smooth-ones": self.smooth_ones}
        low, high = np.array([ranges[p] for p in self.policies], dtype=np.float32).T
        mask = np.array([p != "ignore" for p in self.policies], dtype=np.float32)
        return low, high, mask


def _check_choice(value: str, choices: Sequence[str], what: str) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r} (choose from {', '.join(choices)})")


def _canonical(name: str, choices: Sequence[str], what: str) -> str:
    """The choice that ``name`` names, case-insensitively."""
    for choice in choices:
        if choice.lower() == name.lower():
            return choice
    raise ValueError(f"unknown {what} {name!r} (choose from {', '.join(choices)})")


# --------------------------------------------------------------------------------------------------
# CSV


@dataclass(frozen=True, slots=True)
class Record:
    """One CSV row: an image and its metadata and labels.

    ``file`` is the resolved image file (:func:`resolve_path`) as a string, :attr:`path` the same
    as a Path; ``csv_path`` is the Path cell as written; ``patient`` and ``study`` come from the path
    (``patient00001``, ``study1``); ``age`` is None when blank; ``view`` is ``"Frontal"`` or
    ``"Lateral"``, ``projection`` one of :data:`PROJECTIONS` or ``""``; ``labels`` holds the 14 cells
    in :data:`LABELS` order as 1.0 / 0.0 / -1.0, NaN for blank; ``row`` is the line number in the CSV
    (the header is row 1).
    """

    # a string, not a Path: building 223,414 Paths (and their garbage collector traversals) took half
    # of read_csv's time on CheXpert's train.csv
    file: str
    csv_path: str
    patient: str
    study: str
    sex: str
    age: int | None
    view: str
    projection: str
    labels: tuple[float, ...]
    row: int

    @property
    def path(self) -> Path:
        return Path(self.file)


def describe_skipped(skipped: Sequence[object]) -> str:
    """One line for the rows and images a skip mode left out (their errors, or the errors' texts): how
    many, and the first three."""
    return (f"left out {len(skipped)} row(s) or image(s): " + "; ".join(str(e) for e in skipped[:3])
            + (" ..." if len(skipped) > 3 else ""))


class ReadResult(NamedTuple):
    """What :func:`read_csv` returns: the records, and the errors of the rows it skipped."""

    records: list[Record]
    skipped: list[DataFormatError]


def split_csv(data_dir: str | os.PathLike | None, split: str | os.PathLike) -> Path:
    """The CSV of ``split``: ``data_dir/train.csv`` or ``data_dir/valid.csv`` for :data:`SPLITS`, else
    ``split`` itself, the path of a CSV file."""
    if split not in SPLITS:
        return Path(split)
    if data_dir is None:
        raise ValueError(f"split {split!r} needs data_dir")
    return Path(data_dir) / f"{split}.csv"


def find_data_dir(data_dir: str | os.PathLike, splits: Sequence[str | os.PathLike] = SPLITS,
                  say: Callable[[str], object] | None = print) -> Path:
    """The data set folder that ``data_dir`` names, once the CSVs of ``splits`` (:func:`split_csv`) are
    found to exist; it reads nothing, so that a command can check its data before it parses a CSV or
    makes its output folder.

    ``data_dir`` should be the ``CheXpert-v1.0-small`` folder; when it lacks the split CSVs but the
    :data:`DATASET_FOLDER` folder inside it holds them (the folder above the data set was given), that
    folder is returned, and ``say`` tells so. Otherwise FileNotFoundError, one line naming the folder
    and the files expected.
    """
    data_dir = Path(data_dir)
    for split in splits:
        if split not in SPLITS and not Path(split).is_file():
            raise FileNotFoundError(f"{split}: no such CSV file (a split is {' or '.join(SPLITS)} or a CSV file)")
    wanted = [f"{split}.csv" for split in splits if split in SPLITS]
    inside = data_dir / DATASET_FOLDER
    if data_dir.is_dir() and all((data_dir / name).is_file() for name in wanted):
        if wanted or not inside.is_dir():  # CSV splits only: their paths start with the inner folder's name
            return data_dir
    if inside.is_dir() and all((inside / name).is_file() for name in wanted):
        if say is not None:
            say(f"using {inside}, the {DATASET_FOLDER} folder inside --data {data_dir}")
        return inside
    # name the folder that was meant: the one inside when the given one holds none of the CSVs
    meant = inside if inside.is_dir() and not any((data_dir / name).is_file() for name in wanted) else data_dir
    missing = [name for name in wanted if not (meant / name).is_file()]
    found = f"no {' or '.join(missing)} there" if meant.is_dir() else (
        "not a folder" if meant.exists() else "no such folder")
    raise FileNotFoundError(f"{meant}: {found}; the data folder (--data) must be the {DATASET_FOLDER} folder "
                            f"holding {' and '.join(wanted) or 'the images'}, or the folder holding it")


def resolve_path(cell: str, data_dir: str | os.PathLike) -> Path:
    """The image file that a Path cell names, given the data set folder ``data_dir``.

    Backslashes are separators too (a CSV written on Windows). CheXpert paths start with the data set
    folder's name (``CheXpert-v1.0-small/train/...``): a first component equal to ``data_dir``'s name (or
    to :data:`DATASET_FOLDER`, for a renamed copy) is replaced by ``data_dir``; any other relative path is
    relative to ``data_dir``'s parent, the folder holding the data set. An absolute path is kept when it
    lies inside ``data_dir`` (as given, or with its symbolic links resolved). ``..``, and absolute paths
    (POSIX or Windows) elsewhere, raise ValueError: they would leave the data.
    """
    return Path(_resolve(cell, Path(data_dir)))


def _resolve(cell: str, data_dir: Path) -> str:
    """:func:`resolve_path` as a string (see :attr:`Record.file`)."""
    normalised = cell.replace("\\", "/")
    parts = [part for part in normalised.split("/") if part not in ("", ".")]  # as pathlib splits it
    if ".." in parts:
        raise ValueError(f"path {cell!r} escapes the data folder")
    if normalised.startswith("/") or normalised[1:2] == ":":  # a root, a Windows drive or share
        path = Path(normalised)
        if path.is_absolute() and (path.is_relative_to(os.path.abspath(data_dir))
                                   or path.is_relative_to(data_dir.resolve())):
            return str(path)
        raise ValueError(f"path {cell!r} escapes the data folder")
    if not parts:
        raise ValueError("empty path")
    if parts[0] in (data_dir.name, DATASET_FOLDER):
        return os.path.join(str(data_dir), "/".join(parts[1:]))
    return os.path.join(str(data_dir.parent), "/".join(parts))


def read_csv(csv_path: str | os.PathLike, data_dir: str | os.PathLike | None = None,
             on_error: str = "raise") -> ReadResult:
    """Read a CheXpert CSV into :class:`Record` s, checking every cell.

    ``data_dir`` is the data set folder (``CheXpert-v1.0-small``) that image paths resolve against
    (:func:`resolve_path`); by default the CSV's own folder, where CheXpert keeps its CSVs. Columns
    are found by name (extra columns are ignored); missing ones raise :class:`DataFormatError`. A
    malformed row (a label cell other than 1.0 / 0.0 / -1.0 / blank (``1``, ``0``, ``-1`` are
    accepted too), a wrong number of cells, an unknown view or projection, a bad age, a path
    escaping the data folder or without ``patientN/studyN`` folders) raises
    :class:`DataFormatError` naming the row and the culprit, or with ``on_error="skip"`` is left
    out and its error listed in the result's ``skipped``. Blank lines are ignored.

    Returns ``ReadResult(records, skipped)``, a named tuple: ``records, skipped = read_csv(...)``.
    """
    _check_choice(on_error, ON_ERROR, "on_error")
    csv_path = Path(csv_path)
    data_dir = csv_path.parent if data_dir is None else Path(data_dir)
    records, skipped = [], []
    with open(csv_path, newline="", encoding="utf-8-sig") as f:  # -sig: tolerate a byte-order mark
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                raise DataFormatError(csv_path, reason="empty file, no header row")
            header = [name.strip() for name in header]
            missing = [name for name in COLUMNS if name not in header]
            if missing:
                raise DataFormatError(csv_path, reason=f"missing column(s): {', '.join(missing)}")
            columns = operator.itemgetter(*(header.index(name) for name in COLUMNS))
            for cells in reader:
                if not cells:
                    continue
                try:
                    records.append(_parse_row(cells, len(header), columns, data_dir, reader.line_num))
                except ValueError as e:
                    error = DataFormatError(csv_path, reader.line_num, str(e))
                    if on_error == "raise":
                        raise error from None
                    skipped.append(error)
        except (csv.Error, UnicodeDecodeError) as e:  # not a text CSV: no row after this one is trustworthy
            raise DataFormatError(csv_path, reader.line_num, f"unreadable CSV: {e}") from None
    return ReadResult(records, skipped)


def _parse_row(cells: list[str], n_columns: int, columns: operator.itemgetter, data_dir: Path, row: int) -> Record:
    """The record of one CSV row (``columns`` picks the cells of :data:`COLUMNS`); ValueError naming the
    culprit cell if it is malformed."""
    if len(cells) != n_columns:
        raise ValueError(f"{len(cells)} cells where the header has {n_columns}")
    cells = columns(cells)
    path_cell, sex, age, view, projection = map(str.strip, cells[:5])
    label_cells = cells[5:]
    ids = _PATIENT_STUDY.search(path_cell.replace("\\", "/"))  # backslashes: a CSV written on Windows
    if ids is None:
        raise ValueError(f"Path {path_cell!r} has no patientN/studyN folders")
    file = _resolve(path_cell, data_dir)
    if view not in VIEWS:
        raise ValueError(f"Frontal/Lateral value {view!r} (expected Frontal or Lateral)")
    if projection not in (*PROJECTIONS, ""):
        raise ValueError(f"AP/PA value {projection!r} (expected AP, PA, LL, RL or blank)")
    # a dictionary look-up of the cells as CheXpert writes them; any other spelling (or a bad cell) goes
    # through _parse_label, which reads it or names it
    labels = tuple(map(_LABEL_CELL_VALUES.get, label_cells))
    if None in labels:
        labels = tuple(_parse_label(cell.strip(), label) for cell, label in zip(label_cells, LABELS))
    return Record(file=file, csv_path=path_cell, patient=ids[1], study=ids[2], sex=sex, age=_parse_age(age),
                  view=view, projection=projection, row=row, labels=labels)


def _parse_age(cell: str) -> int | None:
    try:
        age = float(cell) if cell else None
    except ValueError:
        age = math.nan
    if age is not None and not (age.is_integer() and age >= 0):
        raise ValueError(f"Age value {cell!r} (expected a whole number or blank)")
    return None if age is None else int(age)


def _parse_label(cell: str, label: str) -> float:
    if not cell:
        return math.nan
    try:
        value = float(cell)
    except ValueError:
        value = math.nan
    if value not in _LABEL_CELLS:  # NaN is in no set: so "nan", "yes", "2.0" all fail here
        raise ValueError(f"{label} value {cell!r} (expected 1.0, 0.0, -1.0 or blank)")
    return value


def write_csv(csv_path: str | os.PathLike, records: Iterable[Record]) -> None:
    """Write records as a CheXpert CSV (the Path cells as read, labels as 1.0 / 0.0 / -1.0 / blank),
    e.g. to keep a patient split: :func:`read_csv` reads it back to the same records."""
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for r in records:
            labels = ["" if math.isnan(v) else f"{v:.1f}" for v in r.labels]
            writer.writerow([r.csv_path, r.sex, "" if r.age is None else r.age, r.view, r.projection, *labels])


# --------------------------------------------------------------------------------------------------
# selections


def filter_views(records: Iterable[Record], views: Iterable[str] | str | None = ("frontal",),
                 projections: Iterable[str] | str | None = None) -> list[Record]:
    """The records whose view is in ``views`` ("frontal", "lateral") and whose projection is in
    ``projections`` ("AP", "PA", "LL", "RL"); None keeps all. Names match case-insensitively, an
    unknown one raises ValueError. A projection filter drops the rows with a blank AP/PA cell
    (CheXpert's lateral views)."""
    keep_views = None if views is None else {_canonical(v, VIEWS, "view") for v in _names(views)}
    keep_projections = (None if projections is None
                        else {_canonical(p, PROJECTIONS, "projection") for p in _names(projections)})
    return [r for r in records
            if (keep_views is None or r.view in keep_views)
            and (keep_projections is None or r.projection in keep_projections)]


def _names(names: Iterable[str] | str) -> Iterable[str]:
    return (names,) if isinstance(names, str) else names  # one name, not its letters


def patient_split(records: Sequence[Record], valid_fraction: float, seed: int = 0) -> tuple[list[Record], list[Record]]:
    """Split records into (train, valid) by patient, so that no patient is in both.

    ``round(valid_fraction * n_patients)`` patients, drawn with ``seed``, go to valid (at least one
    and at most n - 1 when 0 < valid_fraction < 1 and there are two patients or more). The split
    depends on the set of patients and the seed only, not on the records' order; each side keeps
    the records' order.
    """
    if not 0.0 <= valid_fraction <= 1.0:
        raise ValueError(f"valid_fraction {valid_fraction} is not in [0, 1]")
    patients = sorted({r.patient for r in records})
    random.Random(seed).shuffle(patients)
    n_valid = round(valid_fraction * len(patients))
    if 0.0 < valid_fraction < 1.0 and len(patients) >= 2:
        n_valid = min(max(n_valid, 1), len(patients) - 1)
    valid_patients = set(patients[:n_valid])
    train = [r for r in records if r.patient not in valid_patients]
    valid = [r for r in records if r.patient in valid_patients]
    return train, valid


# --------------------------------------------------------------------------------------------------
# Dataset


class CheXpertDataset(Dataset):
    """CheXpert images with their targets and loss masks under an :class:`UncertaintyPolicy`.

    ``dataset[i]`` is ``(image, target, mask, i)``: the image from :func:`load_image` (or from ``cache``),
    (1, H, W) uint8, passed through ``transform`` when given (see :mod:`mxa_model.data.transforms`;
    without one the images keep their own sizes, which a DataLoader cannot batch); ``target`` and
    ``mask`` float32 (14,) in :data:`LABELS` order (the loss is ``mask * bce(logits, target)``);
    ``i`` the sample index. ``dataset[(epoch, i)]`` is the same for that epoch: the key
    :class:`mxa_model.data.loader.EpochSampler` yields, so that persistent loader workers, whose copy
    of the dataset keeps the epoch it had when they started, draw each epoch's crops and smoothed
    targets. ``transform(image, generator)`` draws from a generator seeded by (``seed``, epoch, ``i``)
    (:func:`mxa_model.data.transforms.sample_generator`).

    Args:
        data_dir: the data set folder (``CheXpert-v1.0-small``); image paths resolve against it. May
            be None with ``records`` or a CSV path (then the CSV's folder).
        split: ``"train"`` or ``"valid"`` (``data_dir/train.csv``, ``data_dir/valid.csv``) or the
            path of a CSV in the CheXpert format; ignored with ``records``.
        policy: the uncertainty policy, or its :meth:`UncertaintyPolicy.parse` string (default: U-Ones
            for every label, blanks negative).
        views, projections: the :func:`filter_views` selection (default: frontal views).
        transform: applied to each image tensor, ``transform(image, generator)``.
        cache: a :class:`mxa_model.data.cache.DecodedCache` to read the images from instead of their
            files (checked against the records by the caller).
        records: use these (from :func:`read_csv`, :func:`patient_split`, ...) instead of reading a
            CSV; the view selection still applies.
        on_error: ``"raise"``: a malformed CSV row raises :class:`DataFormatError`; ``"skip"``: it is
            left out and listed in :attr:`skipped`.
        image_check: decode every image once up front (minutes on the full training set), so that a
            missing or corrupt image is found before training: it raises :class:`ImageReadError`, or
            with ``on_error="skip"`` is dropped and listed in :attr:`skipped`. With a ``cache``, nothing is
            decoded: the images the cache left out as unreadable are the bad ones. Without the check, an
            image that cannot be read raises :class:`ImageReadError` (naming the file and its CSV
            row) when it is loaded, whatever ``on_error``.
        seed: with the sample index and the epoch (:meth:`set_epoch`, or the key's), seeds the smoothed
            targets and the transform's draws (non-negative).

    Attributes: ``records`` (the :class:`Record` s, in sample order), ``labels`` (:data:`LABELS`),
    ``csv_path`` (None with ``records``), ``skipped`` (the errors of the rows and images left out).
    Picklable, so it works with DataLoader workers.
    """

    labels = LABELS

    def __init__(self, data_dir: str | os.PathLike | None, split: str | os.PathLike = "train",
                 policy: UncertaintyPolicy | str | None = None, views: Iterable[str] | str | None = ("frontal",),
                 projections: Iterable[str] | str | None = None, transform=None,
                 records: Sequence[Record] | None = None, on_error: str = "raise", image_check: bool = False,
                 seed: int = 0, cache=None):
        _check_choice(on_error, ON_ERROR, "on_error")
        self.policy = UncertaintyPolicy.parse(policy) if isinstance(policy, str) else policy or UncertaintyPolicy()
        self.transform, self.cache = transform, cache
        self.seed, self.epoch = seed, 0
        if records is None:
            self.csv_path = split_csv(data_dir, split)
            records, self.skipped = read_csv(self.csv_path, data_dir, on_error)
        else:
            self.csv_path, self.skipped = None, []
        records = filter_views(records, views, projections)
        if image_check:
            records = self._readable(records, on_error)
        self.records = records
        self._labels = np.array([r.labels for r in records], dtype=np.float32).reshape(len(records), len(LABELS))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        index = range(len(self))[index]  # IndexError when out of range; a negative index counts from the end
        record = self.records[index]
        try:
            image = load_image(record.path) if self.cache is None else self.cache.read(record)
        except ImageReadError as e:
            raise self._image_error(e, record) from e
        if self.transform is not None:
            image = self.transform(image, sample_generator(self.seed, epoch, index))
        target, mask = self.target(index, epoch)
        return image, target, mask, index

    def set_epoch(self, epoch: int) -> None:
        """Draw the smoothed targets of this epoch (each epoch draws afresh, reproducibly)."""
        self.epoch = epoch

    def target(self, index: int, epoch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(target, mask) of sample ``index`` in ``epoch`` (default: :meth:`set_epoch`'s), float32 (14,),
        without loading its image."""
        target, mask = self.policy.targets(self._labels[index], self._rng(index, epoch))
        return torch.from_numpy(target), torch.from_numpy(mask)

    def targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(target, mask) of every sample, float32 (N, 14), as :meth:`target` gives them."""
        if not self.policy.smoothing:  # no draws: one vectorized call
            target, mask = self.policy.targets(self._labels)
        else:  # one generator per sample, as in target()
            target, mask = np.empty_like(self._labels), np.empty_like(self._labels)
            for i in range(len(self)):
                target[i], mask[i] = self.policy.targets(self._labels[i], self._rng(i))
        return torch.from_numpy(target), torch.from_numpy(mask)

    def label_matrix(self) -> torch.Tensor:
        """The raw label cells, float32 (N, 14): 1 / 0 / -1, NaN for blank."""
        return torch.from_numpy(self._labels.copy())

    def _rng(self, index: int, epoch: int | None = None) -> np.random.Generator | None:
        if not self.policy.smoothing:
            return None
        return np.random.default_rng([self.seed, self.epoch if epoch is None else epoch, index])

    def _image_error(self, error: ImageReadError, record: Record) -> ImageReadError:
        where = f"{self.csv_path} row {record.row}" if self.csv_path else f"CSV row {record.row}"
        return ImageReadError(record.path, f"{error.reason} ({where})")

    def _readable(self, records: list[Record], on_error: str) -> list[Record]:
        """The records whose image decodes (or was decoded into the cache); the others raise or, with
        on_error="skip", go to skipped."""
        kept = []
        for record in records:
            try:
                if self.cache is None:
                    load_image(record.path)
                elif (reason := self.cache.left_out(record)) is not None:
                    raise ImageReadError(record.path, f"left out of the decoded cache: {reason}")
            except ImageReadError as e:
                if on_error == "raise":
                    raise self._image_error(e, record) from e
                self.skipped.append(self._image_error(e, record))
            else:
                kept.append(record)
        return kept
