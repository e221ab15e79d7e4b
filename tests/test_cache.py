"""The decoded cache (mxa_model/data/cache.py, ``mxa prepare``): its pixels are the decoder's, resized; it
refuses a data set it cannot serve as it is, with one line naming why; a cut-short run resumes where it
stopped; an up-to-date cache is left alone; it pickles cheaply for DataLoader workers."""

import dataclasses
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mxa_model import cli
from mxa_model.data import cache as cache_module
from mxa_model.data.cache import (CacheMismatchError, DecodedCache, cache_key, cache_paths, prepare_cache,
                                  read_index)
from mxa_model.data.chexpert import CheXpertDataset, read_csv, split_csv
from mxa_model.data.images import ImageReadError, load_image
from mxa_model.data.transforms import resize_shorter_side

SIDE = 32  # the synthetic images are 48 x 48: cached smaller, so that the resize matters


def prepare(data, output, **options):
    return prepare_cache(data, output, **{"side": SIDE, "workers": 0, "progress": False, **options})


def records(data, split="train"):
    return read_csv(split_csv(data, split), data).records


@pytest.fixture
def data(small_data, tmp_path):
    """A copy of the synthetic data set that a test may change (mtimes kept)."""
    return str(shutil.copytree(small_data, tmp_path / "data" / Path(small_data).name))


@pytest.fixture
def count_decodes(monkeypatch):
    """Counts the images the cache decodes (with workers=0); ``calls["interrupt_at"] = k`` makes the k-th
    decode raise KeyboardInterrupt, as a ^C would."""
    calls = {"n": 0, "interrupt_at": None}

    def counting(path):
        calls["n"] += 1
        if calls["n"] == calls["interrupt_at"]:
            raise KeyboardInterrupt
        return load_image(path)

    monkeypatch.setattr(cache_module, "load_image", counting)
    return calls


def assert_same_cache(a, b, splits=("train", "valid")):
    for split in splits:
        assert cache_paths(a, split).pixels.read_bytes() == cache_paths(b, split).pixels.read_bytes()
        index_a, index_b = read_index(a, split), read_index(b, split)
        assert index_a["entries"] == index_b["entries"]
        assert index_a["complete"] and index_b["complete"] and index_a["bytes"] == index_b["bytes"]


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_cached_pixels_are_the_decoded_images_resized_and_the_index_describes_them(small_data, tmp_path):
    out = prepare(small_data, tmp_path / "cache")
    for split, n in (("train", 32), ("valid", 12)):
        rows = records(small_data, split)
        assert len(rows) == n
        cache = DecodedCache(out, split)
        cache.check(rows, min_side=SIDE)
        for record in rows:  # the same functions applied directly
            expected = resize_shorter_side(load_image(record.file), SIDE)
            image = cache.read(record)
            assert image.dtype == torch.uint8 and image.shape == (1, SIDE, SIDE)
            assert torch.equal(image, expected)
        index = read_index(out, split)
        entries = index["entries"]
        assert entries["key"] == [cache_key(r) for r in rows] == [r.csv_path for r in rows]
        assert entries["height"] == entries["width"] == [SIDE] * n
        assert entries["offset"] == [i * SIDE * SIDE for i in range(n)]
        assert entries["size"] == [os.stat(r.file).st_size for r in rows]
        assert entries["mtime_ns"] == [os.stat(r.file).st_mtime_ns for r in rows]
        assert index["complete"] and index["side"] == SIDE and index["bytes"] == n * SIDE * SIDE
        assert index["csv"]["size"] == os.stat(split_csv(small_data, split)).st_size
        assert index["data_dir"] == str(Path(small_data).resolve())
        assert cache_paths(out, split).pixels.stat().st_size == n * SIDE * SIDE
        assert len(cache) == n and cache.nbytes == n * SIDE * SIDE and cache.side == SIDE


def test_the_shorter_side_is_always_resized_to_side_up_or_down(data, tmp_path):
    rows = records(data, "valid")
    Image.new("L", (60, 40), 77).save(rows[0].file, format="JPEG")  # landscape, shorter side 40
    out = prepare(data, tmp_path / "cache", side=56, splits=("valid",))  # enlarged: every shorter side is 56
    cache = DecodedCache(out, "valid")
    assert cache.read(rows[0]).shape == (1, 56, 84) and cache.read(rows[1]).shape == (1, 56, 56)
    assert torch.equal(cache.read(rows[0]), resize_shorter_side(load_image(rows[0].file), 56))


def test_check_refuses_a_changed_source_file_naming_it(data, tmp_path):
    out = prepare(data, tmp_path / "cache")
    rows, cache = records(data), DecodedCache(out, "train")
    cache.check(rows, SIDE)
    stat = os.stat(rows[3].file)
    os.utime(rows[3].file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # touched
    with pytest.raises(CacheMismatchError) as excinfo:
        cache.check(rows, SIDE)
    assert one_line_error(excinfo) == f"{rows[3].file}: changed since the cache was made: run mxa prepare again"
    os.utime(rows[3].file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    cache.check(rows, SIDE)
    before = os.stat(rows[5].file)
    Image.new("L", (48, 48), 200).save(rows[5].file, format="JPEG")  # other bytes, the same mtime
    os.utime(rows[5].file, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(rows[5].file).st_size != before.st_size
    with pytest.raises(CacheMismatchError, match="changed since the cache was made") as excinfo:
        cache.check(rows, SIDE)
    assert rows[5].file in one_line_error(excinfo)
    os.remove(rows[7].file)
    with pytest.raises(CacheMismatchError) as excinfo:
        cache.check(rows[6:], SIDE)
    assert one_line_error(excinfo).startswith(f"{rows[7].file}: changed since the cache was made (No such file")


def test_check_refuses_a_record_not_in_the_cache_a_small_side_and_another_format(small_data, tmp_path):
    out = prepare(small_data, tmp_path / "cache")
    rows, cache = records(small_data), DecodedCache(out, "train")
    stranger = dataclasses.replace(rows[0], csv_path="CheXpert-v1.0-small/train/patient99999/study1/view1_frontal.jpg",
                                   row=99)
    assert rows[0] in cache and stranger not in cache
    with pytest.raises(CacheMismatchError) as excinfo:
        cache.check([*rows, stranger], SIDE)
    assert one_line_error(excinfo).startswith(f"CSV row 99 ({stranger.csv_path}) is not in the train cache")
    with pytest.raises(CacheMismatchError) as excinfo:
        cache.read(stranger)
    with pytest.raises(CacheMismatchError) as excinfo:
        cache.check(rows, SIDE + 1)
    assert "images cached at side 32, less than the image size 33" in one_line_error(excinfo)
    cache.check(rows, SIDE - 8)  # a larger cache serves a smaller image size

    with pytest.raises(CacheMismatchError, match="not in the valid cache"):  # another split's rows
        DecodedCache(out, "valid").check(rows[:1], SIDE)
    index_file = cache_paths(out, "train").index
    index_file.write_text(index_file.read_text().replace('"format":1,', '"format":99,'))
    with pytest.raises(CacheMismatchError) as excinfo:
        DecodedCache(out, "train").check(rows, SIDE)
    assert "cache format version 99, this program reads version 1" in one_line_error(excinfo)
    with pytest.raises(CacheMismatchError, match="no such cache index"):
        DecodedCache(tmp_path / "nowhere", "train").check(rows, SIDE)


def test_backslash_and_dot_paths_share_the_key(small_data):
    record = records(small_data)[0]
    windows = dataclasses.replace(record, csv_path="./" + record.csv_path.replace("/", "\\"))
    assert cache_key(windows) == cache_key(record) == record.csv_path


def test_an_interrupted_prepare_resumes_without_decoding_again_and_ends_as_one_run(small_data, tmp_path,
                                                                                   count_decodes):
    whole = prepare(small_data, tmp_path / "whole")
    assert count_decodes["n"] == 44
    count_decodes.update(n=0, interrupt_at=11)  # the 11th image of train.csv: 10 done
    with pytest.raises(KeyboardInterrupt):
        prepare(small_data, tmp_path / "cut")
    index = read_index(tmp_path / "cut", "train")
    assert not index["complete"] and len(index["entries"]["key"]) == 10
    with pytest.raises(CacheMismatchError) as excinfo:
        DecodedCache(tmp_path / "cut", "train").check(records(small_data), SIDE)
    assert "the cache is incomplete (mxa prepare was cut short)" in one_line_error(excinfo)

    count_decodes.update(n=0, interrupt_at=None)
    prepare(small_data, tmp_path / "cut")
    assert count_decodes["n"] == 44 - 10
    assert_same_cache(whole, tmp_path / "cut")
    DecodedCache(tmp_path / "cut", "train").check(records(small_data), SIDE)


def test_a_killed_prepare_resumes_after_its_last_saved_index(small_data, tmp_path, count_decodes, monkeypatch):
    whole = prepare(small_data, tmp_path / "whole")
    monkeypatch.setattr(cache_module, "COMMIT_SECONDS", -1.0)  # save the index after every image
    counting, killed = cache_module.load_image, tmp_path / "killed"

    def snapshot(path):  # the files as a SIGKILL before the 12th image would leave them
        if count_decodes["n"] == 11:
            shutil.copytree(tmp_path / "running", killed)
        return counting(path)

    monkeypatch.setattr(cache_module, "load_image", snapshot)
    count_decodes["n"] = 0
    prepare(small_data, tmp_path / "running")
    index = read_index(killed, "train")
    assert not index["complete"] and len(index["entries"]["key"]) == 11
    with open(cache_paths(killed, "train").pixels, "ab") as f:  # and pixels past the index's end
        f.write(b"\xab" * (40 * SIDE * SIDE))
    monkeypatch.setattr(cache_module, "load_image", counting)
    count_decodes["n"] = 0
    prepare(small_data, killed)
    assert count_decodes["n"] == 44 - 11
    assert_same_cache(whole, killed)


def test_an_up_to_date_cache_is_not_redone_and_a_changed_image_redoes_from_it(data, tmp_path, count_decodes, capsys):
    out = prepare(data, tmp_path / "cache")
    stamps = {p: p.stat().st_mtime_ns for p in Path(out).iterdir()}
    count_decodes["n"] = 0
    prepare(data, out, progress=True)
    assert count_decodes["n"] == 0
    assert {p: p.stat().st_mtime_ns for p in Path(out).iterdir()} == stamps
    said = capsys.readouterr().out
    assert "train: up to date" in said and "valid: up to date" in said

    rows = records(data)
    Image.new("L", (40, 60), 9).save(rows[20].file, format="JPEG")  # portrait: 32 x 48 when cached
    with pytest.raises(CacheMismatchError, match="changed since"):
        DecodedCache(out, "train").check(rows, SIDE)
    prepare(data, out)
    assert count_decodes["n"] == 32 - 20  # from the changed image on
    cache = DecodedCache(out, "train")
    cache.check(rows, SIDE)
    assert torch.equal(cache.read(rows[20]), resize_shorter_side(load_image(rows[20].file), SIDE))
    assert cache.read(rows[20]).shape == (1, 48, 32)
    assert torch.equal(cache.read(rows[21]), resize_shorter_side(load_image(rows[21].file), SIDE))

    count_decodes["n"] = 0
    prepare(data, out, side=SIDE + 8)  # another side: starts over
    assert count_decodes["n"] == 44 and DecodedCache(out, "valid").side == SIDE + 8


def test_an_unreadable_image_stops_naming_it_or_is_skipped_and_counted(data, tmp_path):
    rows = records(data)
    Path(rows[4].file).write_bytes(b"\xff\xd8\xff not a JPEG")
    with pytest.raises(ImageReadError) as excinfo:
        prepare(data, tmp_path / "cache")
    message = one_line_error(excinfo)
    assert message.startswith(f"{rows[4].file}: cannot read image")
    assert message.endswith(f"train.csv row {rows[4].row})")
    assert len(read_index(tmp_path / "cache", "train")["entries"]["key"]) == 4  # kept for the next run

    prepare(data, tmp_path / "cache", on_error="skip")
    cache = DecodedCache(tmp_path / "cache", "train")
    assert len(cache) == 31 and list(cache.unreadable) == [rows[4].csv_path]
    assert rows[4] not in cache and rows[5] in cache
    cache.check(rows[:4] + rows[5:], SIDE)
    with pytest.raises(CacheMismatchError) as excinfo:
        cache.check(rows, SIDE)
    assert one_line_error(excinfo).startswith(f"CSV row {rows[4].row} ({rows[4].csv_path}) was left out of the cache")
    assert torch.equal(cache.read(rows[5]), resize_shorter_side(load_image(rows[5].file), SIDE))
    # a data set checking its images against this cache (--on-bad-data skip --cache) decodes none of them:
    # the cache's left-out image is the bad one
    def no_decode(path):
        raise AssertionError(f"decoded {path}")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("mxa_model.data.chexpert.load_image", no_decode)
        dataset = CheXpertDataset(data, "train", views=None, cache=cache, on_error="skip", image_check=True)
    assert dataset.records == rows[:4] + rows[5:] and len(dataset.skipped) == 1
    assert "left out of the decoded cache: " in str(dataset.skipped[0]) and rows[4].file in str(dataset.skipped[0])


def test_the_cache_pickles_cheaply_and_reads_after_unpickling_and_in_loader_workers(small_data, tmp_path):
    out = prepare(small_data, tmp_path / "cache")
    rows, cache = records(small_data, "valid"), DecodedCache(out, "valid")
    cache.check(rows, SIDE)
    cache.read(rows[0])  # loaded and mapped: none of it travels
    pickled = pickle.dumps(cache)
    assert len(pickled) < 300
    copy = pickle.loads(pickled)
    assert all(torch.equal(copy.read(r), cache.read(r)) for r in rows)

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return copy.read(rows[i])

    for workers in (0, 2):
        batches = list(DataLoader(Images(), batch_size=5, num_workers=workers))
        assert torch.equal(torch.cat(batches), torch.stack([cache.read(r) for r in rows]))


def test_decoding_in_worker_processes_writes_the_same_cache(small_data, tmp_path):
    assert_same_cache(prepare(small_data, tmp_path / "here", workers=0), prepare(small_data, tmp_path / "workers",
                                                                                 workers=2))


def test_mxa_prepare_end_to_end(small_data, tmp_path, capsys):
    out = tmp_path / "cache"
    argv = ["prepare", "--data", str(Path(small_data).parent), "--output", str(out), "--size", str(SIDE),
            "--workers", "0", "--quiet"]
    assert cli.main(argv) == 0
    said = capsys.readouterr().out.strip()
    assert "\n" not in said
    assert said.startswith(f"cached 44 images ({44 * SIDE * SIDE:,} bytes) at side {SIDE} in ")
    assert said.endswith(f" s: {out}")
    assert_same_cache(out, prepare(small_data, tmp_path / "direct"))

    assert cli.main([*argv[:2], str(tmp_path / "nowhere"), *argv[3:]]) == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and error.startswith(f"mxa: error: {tmp_path / 'nowhere'}: no such folder")
    assert cli.main([*argv, "--splits", "test"]) == 1
    assert capsys.readouterr().err.strip() == "mxa: error: unknown split 'test' (a cache holds train and valid)"
