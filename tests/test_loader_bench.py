"""``mxa bench --suite loader`` (bench/loader.py): the generated CheXpert-shaped folder, the records and their
figures, the one-line errors. Tiny images and few repeats: no time is compared with a limit."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mxa_bench import loader
from mxa_model import cli
from mxa_model.data import CheXpertDataset, load_image
from mxa_model.data.labels import DATASET_FOLDER, LABELS

N_IMAGES = 12
FIELDS = {"suite", "stage", "ms_per_image", "images_per_s_per_core", "workers_for_target", "target_images_per_s",
          "img_size", "device", "threads", "images", "commit", "date"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return loader.chexpert_like_folder(tmp_path_factory.mktemp("loader-data"), N_IMAGES, seed=3)


def test_the_generated_folder_is_a_chexpert_data_set_of_320_x_390_jpegs(folder, tmp_path):
    assert folder.name == DATASET_FOLDER
    train, valid = CheXpertDataset(folder, "train"), CheXpertDataset(folder, "valid")
    assert (len(train), len(valid)) == (N_IMAGES, min(N_IMAGES, 8))  # every row frontal: the view filter keeps all
    assert not {r.patient for r in train.records} & {r.patient for r in valid.records}
    contents = set()
    for record in train.records + valid.records:
        data = record.path.read_bytes()
        assert data[:3] == b"\xff\xd8\xff" and 10_000 < len(data) < 60_000  # JPEG, about 28 KB
        contents.add(data)
        image = load_image(record.path)
        assert image.dtype == torch.uint8 and image.shape == (1, 390, 320)
    assert len(contents) == len(train) + len(valid)  # every file its own
    target, mask = train.targets()
    assert target.shape == mask.shape == (N_IMAGES, len(LABELS))
    # the same seed gives the same files; a data set already there is never written over
    again = loader.chexpert_like_folder(tmp_path, 2, seed=3, n_valid=1)
    assert (again / "train/patient00001/study1/view1_frontal.jpg").read_bytes() == train.records[0].path.read_bytes()
    with pytest.raises(FileExistsError, match="not empty"):
        loader.chexpert_like_folder(tmp_path, 2)


def test_the_loader_suite_writes_records_of_the_four_stages(folder, tmp_path, capsys):
    out = tmp_path / "loader.json"
    threads = torch.get_num_threads()
    assert cli.main(["bench", "--suite", "loader", "--data", str(folder), "--img-size", "32", "--repeats", "2",
                     "--batch", "8", "--device", "cpu", "--target-images-per-s", "5000", "--json", str(out),
                     "--no-save", "--results-dir", str(tmp_path)]) == 0
    assert torch.get_num_threads() == threads  # restored after the one-thread stages
    printed = capsys.readouterr().out
    records = json.loads(out.read_text())
    assert [r["stage"] for r in records] == ["decode", "worker", "worker_cached", "device_augment"]
    assert not list(tmp_path.glob("*.jsonl"))  # --no-save
    for r in records:
        assert FIELDS <= set(r), FIELDS - set(r)
        assert r["suite"] == "loader" and r["img_size"] == 32 and r["target_images_per_s"] == 5000
        assert r["threads"] == 1 and r["device"].startswith("cpu") and r["commit"] and r["date"]
        assert r["ms_per_image"] > 0 and r["images_per_s_per_core"] == pytest.approx(1000 / r["ms_per_image"])
        assert r["stage"] in printed
        if r["stage"] in ("worker", "worker_cached"):
            assert r["workers_for_target"] == math.ceil(r["target_images_per_s"] * r["ms_per_image"] / 1000)
            assert f"{r['ms_per_image']:.3f}" in printed
        else:
            assert r["workers_for_target"] is None
    assert [r["images"] for r in records] == [2 * N_IMAGES] * 3 + [2 * 8]  # two passes; two batches of 8
    cached = records[2]
    # the cache keeps each image at shorter side 320: the generated 320 x 390 ones as they are
    assert (cached["cache_side"], cached["cache_bytes_per_image"]) == (320, 320 * 390)
    augment = records[3]
    assert augment["batch"] == 8
    assert augment["device_s_per_target"] == pytest.approx(5000 * augment["ms_per_image"] / 1000)


def test_make_data_keeps_the_folder_and_the_records_are_appended(tmp_path, capsys):
    argv = ["bench", "--suite", "loader", "--make-data", str(tmp_path / "data"), "--images", "3", "--img-size", "16",
            "--repeats", "1", "--batch", "2", "--device", "cpu", "--results-dir", str(tmp_path / "results")]
    assert cli.main(argv) == 0
    assert len(CheXpertDataset(tmp_path / "data" / DATASET_FOLDER, "train")) == 3
    [history] = (tmp_path / "results").glob("*_loader.jsonl")
    lines = [json.loads(line) for line in history.read_text().splitlines()]
    assert [r["stage"] for r in lines] == list(loader.STAGES) and lines[0]["images"] == 3
    capsys.readouterr()
    assert cli.main(argv) == 1  # the folder is there now: generating again would write over it
    err = capsys.readouterr().err
    assert err.startswith("mxa: error: ") and "not empty" in err and err.count("\n") == 1


@pytest.mark.parametrize("argv, message", [
    (["--suite", "loader", "--data", "{tmp}"], "no train.csv there"),
    (["--suite", "loader", "--data", "{tmp}/missing"], "no such folder"),
    (["--suite", "loader", "--data", "{tmp}", "--make-data", "{tmp}"], "give one of them"),
    (["--suite", "loader", "--images", "0"], "--images must be at least 1"),
    (["--suite", "loader", "--target-images-per-s", "0"], "--target-images-per-s must be positive"),
    (["--suite", "loader", "--chart", "x.png"], "--chart: not for the loader suite"),
    (["--suite", "smoke", "--data", "{tmp}"], "--data: the loader suite's flags"),
    (["--suite", "cost", "--images", "5"], "--images: the loader suite's flags"),
])
def test_bad_requests_give_one_line_errors(tmp_path, capsys, argv, message):
    assert cli.main(["bench", *(a.format(tmp=tmp_path) for a in argv)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mxa: error: ") and message in err and err.count("\n") == 1, err


def test_workers_and_per_image_timing():
    assert [loader.workers_for(10_000, ms) for ms in (1.151, 1.0, 0.0999)] == [12, 10, 1]
    calls = []
    samples = loader.per_image_ms({name: lambda e, i, name=name: calls.append((name, e, i)) for name in "ab"},
                                  n_images=3, repeats=2, warmup=1)
    # the warm-up (epoch 0, image 0), then the calls in turn for each image, one pass per epoch
    assert calls[:2] == [("a", 0, 0), ("b", 0, 0)]
    assert calls[2:] == [(name, e, i) for e in (1, 2) for i in range(3) for name in "ab"]
    assert {name: len(values) for name, values in samples.items()} == {"a": 6, "b": 6}
    assert all(t >= 0 for values in samples.values() for t in values)
    before = torch.get_num_threads()
    with loader.torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
