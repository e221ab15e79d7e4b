"""A decoded cache: a data set's images decoded once into a memory-mapped uint8 file, so that the epochs of
training and evaluation read pixels without decoding a JPEG.

:func:`prepare_cache` (``mxa prepare``) decodes each image of a split's CSV with
:func:`~mxa_model.data.images.load_image`, resizes its shorter side to exactly ``side`` with
:func:`~mxa_model.data.transforms.resize_shorter_side` (always, up or down: every cached image has shorter
side ``side``, so that whatever reads the cache sees one scale), and appends its pixels to one flat file per
split. :class:`DecodedCache` reads them back, after :meth:`DecodedCache.check` has made sure that the cache
holds every record, at a large enough side, made from the files as they are now.

On disk, in the output folder, per split (``train``, ``valid``):

- ``<split>.u8``: the pixels of every cached image, one after the other, each ``height * width`` bytes in
  row-major order, no header;
- ``<split>.index.json``: the metadata (``format`` version, ``split``, ``side``, ``data_dir``, the CSV's
  ``file``, ``size`` and ``mtime_ns``, ``complete``, ``bytes``: the end of the last image in the ``.u8`` file,
  ``unparsed_rows``: the errors of CSV rows that did not parse, which are not cached, ``unreadable``: key ->
  error of the images left out with ``on_error="skip"``) and the index ``entries``, in CSV order, as columns:
  ``key``, ``offset`` (byte offset in the ``.u8`` file; -1 for an unreadable image), ``height``, ``width``,
  ``size`` and ``mtime_ns`` (the source file's, as :func:`os.stat` gave them just before it was decoded).

The key of a row (:func:`cache_key`) is its Path cell as written in the CSV (:attr:`Record.csv_path`),
normalised: backslashes become ``/``, and empty and ``.`` components go. It names the image the same way
whatever folder the data set is read from, and the CSVs derived from CheXpert's (a patient split written by
:func:`~mxa_model.data.chexpert.write_csv`) keep it. Rows naming the same image share one entry.

Resuming: the index is rewritten (to a temporary file, then renamed over the old one, after the ``.u8`` file
is flushed to disk) every :data:`COMMIT_SECONDS` and when the run stops, for whatever reason. A run that is
cut short, even killed, so leaves a consistent index of the images done; the next run keeps the longest
prefix of its entries that still matches (same key in CSV order, same source size and mtime), truncates the
``.u8`` file after them (a killed run may have appended more) and decodes the rest. A complete cache that
matches entirely is reported up to date and left alone. A different ``side`` or format version starts over.
Two runs must not write the same folder at once.

Size, CheXpert-v1.0-small at the default side 320: its images are about 320 x 390 pixels (shorter side
320), so each is cached at about 320 * 390 = 124,800 bytes (in general about 390 / 320 * side**2 bytes);
223,414 training rows make 223,414 * 124,800 = 27.88e9 bytes (26 GiB), and 234 validation rows 29.2e6 bytes:
about 27.9 GB in all, against about 11 GB of JPEGs. The size goes with ``side**2``: 27.9 GB * (256/320)**2
= 17.9 GB at 256, 13.7 GB at 224. The index adds about 120 bytes a row (27 MB for the training split).
Reading an image from the cache is a memory copy when the file is in the page cache, and one random read
of about 125 KB from disk when it is not (a shuffled epoch over a cache larger than the memory).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .chexpert import ON_ERROR, SPLITS, Record, describe_skipped, find_data_dir, read_csv, split_csv
from .images import ImageReadError, load_image
from .transforms import resize_shorter_side

FORMAT_VERSION = 1
DEFAULT_SIDE = 320
COMMIT_SECONDS = 10.0  # how often the index is saved: a killed run redoes at most this much decoding
_COLUMNS = ("key", "offset", "height", "width", "size", "mtime_ns")


class CacheMismatchError(ValueError):
    """A cache that cannot serve a data set as it is: ``str(error)`` is one line saying what differs."""


class CachePaths(NamedTuple):
    """The files of one split's cache: the pixels and the index (metadata and entries)."""

    pixels: Path
    index: Path


def cache_paths(cache_dir: str | os.PathLike, split: str) -> CachePaths:
    """The ``<split>.u8`` and ``<split>.index.json`` files of ``split`` in the cache folder ``cache_dir``."""
    cache_dir = Path(cache_dir)
    return CachePaths(cache_dir / f"{split}.u8", cache_dir / f"{split}.index.json")


def cache_key(record: Record) -> str:
    """The key of a record's image in the cache: its Path cell, with ``/`` separators and without empty or
    ``.`` components (a leading ``/`` is kept)."""
    cell = record.csv_path.replace("\\", "/")
    parts = [part for part in cell.split("/") if part not in ("", ".")]
    return ("/" if cell.startswith("/") else "") + "/".join(parts)


def read_index(cache_dir: str | os.PathLike, split: str) -> dict:
    """The index file of ``split`` as a dict (see the module's docstring); CacheMismatchError, one line,
    when it is missing, unreadable, or of another format version."""
    path = cache_paths(cache_dir, split).index
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except FileNotFoundError:
        raise CacheMismatchError(f"{path}: no such cache index: run mxa prepare --output {cache_dir}") from None
    except (OSError, ValueError) as e:  # ValueError: not JSON (JSONDecodeError, UnicodeDecodeError)
        raise CacheMismatchError(f"{path}: unreadable cache index ({' '.join(str(e).split())}): "
                                 f"run mxa prepare again") from None
    version = index.get("format") if isinstance(index, dict) else None
    if version != FORMAT_VERSION:
        raise CacheMismatchError(f"{path}: cache format version {version}, this program reads version "
                                 f"{FORMAT_VERSION}: run mxa prepare again")
    return index


# --------------------------------------------------------------------------------------------------
# reading


class DecodedCache:
    """The decoded images of one split of a cache folder made by :func:`prepare_cache`.

    Check it against the records a data set uses (:meth:`check`) before reading them (:meth:`read`).
    Pickling keeps only the folder and the split, so that DataLoader workers started by spawn get it
    cheaply (forked workers inherit what the parent loaded): each process loads the index and maps the pixel
    file itself, when it first needs them.
    """

    def __init__(self, cache_dir: str | os.PathLike, split: str):
        self.cache_dir = Path(cache_dir)
        self.split = split
        self.paths = cache_paths(self.cache_dir, split)
        self._index: dict | None = None  # the metadata, without the entries
        self._rows: dict[str, int] | None = None  # key -> entry number
        self._columns: dict[str, np.ndarray] | None = None  # offset, height, width, size, mtime_ns
        self._pixels: np.memmap | None = None

    def __getstate__(self) -> dict:
        return {"cache_dir": self.cache_dir, "split": self.split}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["cache_dir"], state["split"])

    def __repr__(self) -> str:
        return f"DecodedCache({str(self.cache_dir)!r}, {self.split!r})"

    @property
    def metadata(self) -> dict:
        """The index file's metadata (everything but the entries)."""
        self._load()
        return self._index

    @property
    def side(self) -> int:
        """The shorter side of every cached image."""
        return self.metadata["side"]

    @property
    def nbytes(self) -> int:
        """The size of the cached pixels."""
        return self.metadata["bytes"]

    @property
    def unreadable(self) -> dict[str, str]:
        """Key -> error of the images that ``on_error="skip"`` left out."""
        return self.metadata["unreadable"]

    def left_out(self, record: Record) -> str | None:
        """Why ``prepare_cache(on_error="skip")`` left ``record``'s image out (its error), or None."""
        return self.unreadable.get(cache_key(record))

    def __len__(self) -> int:
        """The number of cached images."""
        self._load()
        return int((self._columns["offset"] >= 0).sum())

    def __contains__(self, record: Record) -> bool:
        """Whether the record's image is cached (it may still be stale: see :meth:`check`)."""
        self._load()
        row = self._rows.get(cache_key(record))
        return row is not None and self._columns["offset"][row] >= 0

    def check(self, records: Iterable[Record], min_side: int) -> None:
        """Make sure the cache serves ``records`` at image size ``min_side``: CacheMismatchError, one line,
        when the cache is incomplete, its side is less than ``min_side``, a record is not in it (or was left
        out as unreadable), or a record's file has another size or mtime than when it was cached.

        Cost: one :func:`os.stat` per record (2 microseconds measured from the OS's inode cache, so about
        half a second for CheXpert's 223,414 training rows; a cold network file system may take far longer)
        and a key look-up.
        """
        self._load()
        index, paths = self._index, self.paths
        if not index["complete"]:
            raise CacheMismatchError(f"{paths.index}: the cache is incomplete (mxa prepare was cut short): "
                                     f"run mxa prepare again")
        try:
            pixel_bytes = os.stat(paths.pixels).st_size
        except OSError as e:
            raise CacheMismatchError(f"{paths.pixels}: {e.strerror}: run mxa prepare again") from None
        if pixel_bytes < index["bytes"]:
            raise CacheMismatchError(f"{paths.pixels}: {pixel_bytes} bytes where the index needs {index['bytes']}: "
                                     f"the cache is incomplete: run mxa prepare again")
        if index["side"] < min_side:
            raise CacheMismatchError(f"{paths.index}: images cached at side {index['side']}, less than the image "
                                     f"size {min_side}: run mxa prepare --size {min_side} (or more)")
        rows, columns = self._rows, self._columns
        offsets = columns["offset"].tolist()  # Python ints: the loop below runs once per record
        sizes, mtimes = columns["size"].tolist(), columns["mtime_ns"].tolist()
        for record in records:
            row = rows.get(cache_key(record))
            if row is None:
                raise CacheMismatchError(f"CSV row {record.row} ({record.csv_path}) is not in the {self.split} "
                                         f"cache {paths.index} (made from {index['csv']['file']})")
            if offsets[row] < 0:
                raise CacheMismatchError(f"CSV row {record.row} ({record.csv_path}) was left out of the cache "
                                         f"{paths.index}: {index['unreadable'].get(cache_key(record))}")
            try:
                stat = os.stat(record.file)
            except OSError as e:
                raise CacheMismatchError(f"{record.file}: changed since the cache was made ({e.strerror}): "
                                         f"run mxa prepare again") from None
            if stat.st_size != sizes[row] or stat.st_mtime_ns != mtimes[row]:
                raise CacheMismatchError(f"{record.file}: changed since the cache was made: run mxa prepare again")

    def read(self, record: Record) -> torch.Tensor:
        """The cached pixels of ``record``'s image: uint8 (1, h, w), a tensor of its own (a copy)."""
        self._load()
        row = self._rows.get(cache_key(record))
        if row is None or self._columns["offset"][row] < 0:
            raise CacheMismatchError(f"CSV row {record.row} ({record.csv_path}) is not in the cache "
                                     f"{self.paths.index}")
        offset, height, width = (int(self._columns[name][row]) for name in ("offset", "height", "width"))
        if self._pixels is None:  # here, in each process: a mapping does not travel through pickle
            self._pixels = np.memmap(self.paths.pixels, dtype=np.uint8, mode="r")
        pixels = np.array(self._pixels[offset:offset + height * width])  # a copy: the batch outlives the mapping
        return torch.from_numpy(pixels).view(1, height, width)

    def _load(self) -> None:
        """Read the index, once per process."""
        if self._index is not None:
            return
        index = read_index(self.cache_dir, self.split)
        entries = index.pop("entries")
        self._rows = {key: row for row, key in enumerate(entries["key"])}
        self._columns = {name: np.asarray(entries[name], dtype=np.int64) for name in _COLUMNS[1:]}
        self._index = index


# --------------------------------------------------------------------------------------------------
# preparing


def prepare_cache(data_dir: str | os.PathLike, output: str | os.PathLike, side: int = DEFAULT_SIDE,
                  splits: Sequence[str] = SPLITS, workers: int = 2, progress: bool = True,
                  on_error: str = "raise") -> Path:
    """Decode the images of ``splits`` of the data set folder ``data_dir`` into the cache folder ``output``
    (made if needed) at shorter side ``side``; returns ``output`` as a Path. See the module's docstring for
    the layout, the key and resuming.

    ``data_dir`` is the ``CheXpert-v1.0-small`` folder or the folder holding it (as ``mxa train --data``).
    Every CSV row that parses is cached; rows that do not are left out (a data set with them is refused by
    :meth:`DecodedCache.check`). An unreadable image raises :class:`ImageReadError` naming the file and
    its CSV row (the images done so far are kept for the next run), or, with ``on_error="skip"``, is left
    out and counted in the index's ``unreadable``. ``workers`` processes decode (DataLoader workers) while
    this one writes in order; 0 decodes here. ``progress`` shows a progress bar and a line per split.
    """
    if side < 1:
        raise ValueError(f"cache side {side} must be at least 1")
    if workers < 0:
        raise ValueError(f"workers {workers} must be at least 0")
    if on_error not in ON_ERROR:
        raise ValueError(f"unknown on_error {on_error!r} (choose from {', '.join(ON_ERROR)})")
    for split in splits:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} (a cache holds {' and '.join(SPLITS)})")
    say = print if progress else None
    data_dir = find_data_dir(data_dir, splits, say=say)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    for split in splits:
        _prepare_split(data_dir, output, split, side, workers, progress, on_error, say or (lambda message: None))
    return output


class _Job(NamedTuple):
    key: str
    file: str
    row: int


def _prepare_split(data_dir: Path, output: Path, split: str, side: int, workers: int, progress: bool,
                   on_error: str, say: Callable[[str], object]) -> None:
    paths = cache_paths(output, split)
    csv_file = split_csv(data_dir, split)
    records, unparsed = read_csv(csv_file, data_dir, on_error="skip")
    csv_stat = os.stat(csv_file)
    jobs, seen = [], set()
    for record in records:  # one entry per image, in CSV order
        key = cache_key(record)
        if key not in seen:
            seen.add(key)
            jobs.append(_Job(key, record.file, record.row))
    metadata = {"format": FORMAT_VERSION, "split": split, "side": side, "data_dir": str(data_dir.resolve()),
                "csv": {"file": str(csv_file.resolve()), "size": csv_stat.st_size, "mtime_ns": csv_stat.st_mtime_ns},
                "complete": False, "bytes": 0, "unparsed_rows": [str(e) for e in unparsed], "unreadable": {}}
    if unparsed:
        say(f"{split}: {describe_skipped(unparsed)}; they are not cached")

    old = _old_index(output, split, side)
    kept = _matching_prefix(old, jobs, paths.pixels, on_error) if old is not None else 0
    entries = {name: (old["entries"][name][:kept] if kept else []) for name in _COLUMNS}
    unreadable = {key: old["unreadable"][key] for key, offset in zip(entries["key"], entries["offset"]) if offset < 0}
    end = _end(entries)
    if old is not None and old["complete"] and kept == len(jobs) == len(old["entries"]["key"]):
        if {k: v for k, v in old.items() if k != "entries"} != {**metadata, "complete": True, "bytes": end,
                                                                 "unreadable": unreadable}:
            _commit(paths.index, {**metadata, "complete": True, "bytes": end, "unreadable": unreadable}, entries)
        say(f"{split}: up to date ({paths.pixels}, {kept - len(unreadable)} images at side {side})")
        return
    if kept:
        say(f"{split}: resuming after {kept} of {len(jobs)} images")

    with open(paths.pixels, "r+b" if kept else "wb") as pixels:
        pixels.truncate(end)  # what a killed run wrote after its last index
        pixels.seek(end)

        def commit(complete: bool) -> None:
            pixels.flush()
            os.fsync(pixels.fileno())  # the pixels are on disk before an index that points at them
            _commit(paths.index, {**metadata, "complete": complete, "bytes": _end(entries),
                                  "unreadable": unreadable}, entries)

        todo = jobs[kept:]
        loader = DataLoader(_Decoder([job.file for job in todo], side), batch_size=None, num_workers=workers,
                            collate_fn=_as_is)
        last_commit = time.monotonic()
        complete = False
        try:
            with tqdm(total=len(jobs), initial=kept, unit="img", desc=f"caching {split}", disable=not progress) as bar:
                for job, (size, mtime_ns, image, reason) in zip(todo, loader):
                    if image is None:
                        error = ImageReadError(job.file, f"{reason} ({csv_file} row {job.row})")
                        if on_error == "raise":
                            raise error
                        unreadable[job.key] = str(error)
                        offset, height, width = -1, 0, 0
                    else:
                        offset = pixels.tell()
                        height, width = image.shape[-2:]
                        pixels.write(image.numpy().data)
                    for name, value in zip(_COLUMNS, (job.key, offset, height, width, size, mtime_ns)):
                        entries[name].append(value)
                    bar.update()
                    if time.monotonic() - last_commit > COMMIT_SECONDS:
                        commit(False)
                        last_commit = time.monotonic()
            complete = True
        finally:  # stopped, by an error or an interrupt, or done: save what is done
            commit(complete)
    if unreadable:
        say(f"{split}: {describe_skipped(list(unreadable.values()))}")


def _old_index(output: Path, split: str, side: int) -> dict | None:
    """The index an earlier run left, when it may be resumed: same format and side."""
    try:
        old = read_index(output, split)
    except CacheMismatchError:
        return None
    return old if old.get("side") == side else None


def _matching_prefix(old: dict, jobs: list[_Job], pixel_file: Path, on_error: str) -> int:
    """How many of the old index's first entries stand as they are: those of the jobs' images in the same
    order, whose files have the same size and mtime, and whose pixels the file holds. An image left out as
    unreadable is tried again unless ``on_error`` is skip. One :func:`os.stat` per entry."""
    try:
        available = os.stat(pixel_file).st_size
    except OSError:
        return 0
    columns = [old["entries"][name] for name in _COLUMNS]
    kept = 0
    for job, (key, offset, height, width, size, mtime_ns) in zip(jobs, zip(*columns)):
        if key != job.key or offset + height * width > available or (offset < 0 and on_error != "skip"):
            break
        try:
            stat = os.stat(job.file)
            now = stat.st_size, stat.st_mtime_ns
        except OSError:
            now = -1, -1  # as _Decoder records a file it cannot stat
        if now != (size, mtime_ns):
            break
        kept += 1
    return kept


def _end(entries: dict[str, list]) -> int:
    """The end of the last cached image's pixels (0 when none is)."""
    for offset, height, width in zip(reversed(entries["offset"]), reversed(entries["height"]),
                                     reversed(entries["width"])):
        if offset >= 0:
            return offset + height * width
    return 0


def _commit(index_file: Path, metadata: dict, entries: dict[str, list]) -> None:
    """Write the index atomically: a temporary file, flushed to disk, renamed over the old one."""
    temporary = index_file.with_name(index_file.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump({**metadata, "entries": entries}, f, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, index_file)


def _as_is(sample):
    """The DataLoader's per-sample conversion: none (a module function, so that workers can pickle it)."""
    return sample


class _Decoder(Dataset):
    """Image ``i`` of ``files`` as ``(size, mtime_ns, pixels, None)``: the file's size and mtime from just
    before it was read, and its pixels with the shorter side at ``side``; or ``(size, mtime_ns, None,
    reason)`` when it cannot be read (-1 for what is not known)."""

    def __init__(self, files: list[str], side: int):
        self.files, self.side = files, side

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        size = mtime_ns = -1
        try:
            stat = os.stat(self.files[i])  # before reading: a file changed in between reads as changed later
            size, mtime_ns = stat.st_size, stat.st_mtime_ns
            return size, mtime_ns, resize_shorter_side(load_image(self.files[i]), self.side).contiguous(), None
        except ImageReadError as e:
            return size, mtime_ns, None, e.reason
        except OSError as e:  # os.stat's: no such file, no permission
            return size, mtime_ns, None, e.strerror or str(e)
