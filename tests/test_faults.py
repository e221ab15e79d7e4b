"""Faults lose nothing: a training process killed with SIGKILL (mid-step or mid-checkpoint-write) and
resumed ends with the weights of an uninterrupted run; non-finite inputs and losses are named, or
skipped and counted on request; bad data is named, or skipped and counted on request; no code path
evaluates strings from data or unpickles code."""

import ast
import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import FAULT_INJECTION, assert_same_training_state
from mxa_model import cli
from mxa_model.data import CheXpertDataset
from mxa_model.train import checkpoint as ckpt
from mxa_model.train import loop
from mxa_model.train.config import TrainConfig
from mxa_model.train.loop import train

ROOT = Path(__file__).parents[1]


@pytest.fixture
def data(small_data):
    return small_data


def train_args(data, output):
    return ["train", "--data", data, "--output", str(output), "--model", "mxa_efficientvit_m0", "--epochs", "3",
            "--img-size", "48", "--batch-size", "8", "--workers", "0", "--max-steps", "2", "--roi-mode", "align",
            "--ema-decay", "0.9", "--clip-grad", "1.0", "--quiet"]


def run_train(fault: str, n: int, argv: list[str]) -> subprocess.CompletedProcess:
    """``mxa train argv`` in a fresh process, with ``fault`` planted at its Nth occasion (fault_injection.py)."""
    env = dict(os.environ, PYTHONHASHSEED="0", OMP_NUM_THREADS="1")  # one thread: the same arithmetic every run
    return subprocess.run([sys.executable, str(FAULT_INJECTION), fault, str(n), "0", *argv], env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_sigkill_mid_training_or_mid_checkpoint_write_then_resume_gives_the_same_weights(data, tmp_path):
    whole = tmp_path / "whole"
    done = run_train("none", 0, train_args(data, whole))
    assert done.returncode == 0, done.stderr[-2000:]
    for hook, n in (("step", 4), ("save-last", 2)):  # step 2 of epoch 2; epoch 2's last.pt
        out = tmp_path / hook
        killed = run_train(hook, n, train_args(data, out))
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        assert ckpt.load_checkpoint(out / "last.pt")["epoch"] == 0  # epoch 1's checkpoint, intact
        if hook == "save-last":
            assert list(out.glob(".last.pt.*.tmp"))  # the cut-off write, never renamed over last.pt
        resumed = run_train("none", 0, [*train_args(data, out), "--resume"])
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert "resumed from" in resumed.stdout
        assert not list(out.glob(".*.tmp"))  # the leftover was removed
        for name in ("last.pt", "best.pt"):
            assert_same_training_state(ckpt.load_checkpoint(out / name), ckpt.load_checkpoint(whole / name))
        log = list(csv.DictReader((out / "log.csv").open()))
        assert [row["epoch"] for row in log] == ["1", "2", "3"]  # numbered as the console numbers them


def config(data, output, **kw):
    base = dict(data=data, output=str(output), model="mxa_efficientvit_m0", epochs=1, img_size=48, batch_size=8,
                workers=0, progress=False, max_steps_per_epoch=3, roi_mode="align")
    return TrainConfig(**{**base, **kw})


@pytest.fixture
def nan_image(monkeypatch):
    """The 6th training image loaded holds a NaN (as a broken loader could make it): the training images
    load as floats in [0, 1], so that a batch, of one dtype, can hold it. Returns the list that gets the
    sample's index when it is planted."""
    real = CheXpertDataset.__getitem__
    loaded, planted = [], []

    def getitem(self, key):
        image, target, mask, i = real(self, key)
        if self.csv_path.name == "train.csv":
            image = image.float() / 255
            loaded.append(i)
            if len(loaded) == 6:
                image[0, 3, 3] = float("nan")
                planted.append(i)
        return image, target, mask, i
    monkeypatch.setattr(CheXpertDataset, "__getitem__", getitem)
    return planted


def test_a_nan_input_stops_training_naming_the_batch_and_file(data, tmp_path, nan_image):
    with pytest.raises(FloatingPointError) as info:
        train(config(data, tmp_path, augment=0.0))
    message = str(info.value)
    dataset = CheXpertDataset(data, "train")
    assert "at epoch 1, batch 1" in message and "non-finite input in" in message
    assert str(dataset.records[nan_image[0]].path) in message and "--on-nonfinite skip" in message
    assert not (tmp_path / "last.pt").exists()


def test_on_nonfinite_skip_skips_and_counts_the_batch(data, tmp_path, nan_image, capsys):
    train(config(data, tmp_path, augment=0.0, on_nonfinite="skip"))
    log = list(csv.DictReader((tmp_path / "log.csv").open()))
    assert log[0]["skipped_batches"] == "1"
    assert "batch skipped" in capsys.readouterr().out
    state = ckpt.load_checkpoint(tmp_path / "last.pt")
    # 3 batches, the schedule's count; AdamW's own count says it updated twice
    assert state["step"] == 3 and {s["step"].item() for s in state["optimizer"]["state"].values()} == {2.0}
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    # a model gone non-finite is named at evaluation, not fed to the AUC
    state["model"]["head.linear.weight"][0, 0] = float("nan")
    ckpt.save_checkpoint(tmp_path / "nan.pt", state)
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "nan.pt"), "--data", data, "--quiet"]) == 1
    assert "non-finite outputs for 12 image(s): " in capsys.readouterr().err


def test_a_diverged_loss_says_the_inputs_were_finite(data, tmp_path, monkeypatch):
    real_loss = loop.supervised_loss
    monkeypatch.setattr(loop, "supervised_loss", lambda *args: real_loss(*args) * float("inf"))
    with pytest.raises(FloatingPointError, match=r"loss (nan|inf) at epoch 1, batch 1 with finite inputs .*diverged"):
        train(config(data, tmp_path))


@pytest.fixture
def bad_data(data, tmp_path):
    """A copy of the data set with one truncated image and one row holding a bad label value."""
    import shutil

    root = Path(shutil.copytree(data, tmp_path / Path(data).name))
    lines = (root / "train.csv").read_text().splitlines()
    header = lines[0].split(",")
    cells = lines[3].split(",")
    cells[header.index("Edema")] = "maybe"
    lines[3] = ",".join(cells)
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    image = root.parent / lines[5].split(",")[0]
    image.write_bytes(image.read_bytes()[:200])
    return str(root), image


def test_bad_data_is_named_or_skipped_and_counted_on_request(bad_data, tmp_path, capsys):
    root, truncated = bad_data
    args = ["--data", root, "--model", "mxa_efficientvit_m0", "--epochs", "1", "--img-size", "48",
            "--batch-size", "8", "--workers", "0", "--max-steps", "1", "--quiet"]
    assert cli.main(["train", *args, "--output", str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err
    assert "train.csv" in err and "row 4" in err and "Edema" in err and "maybe" in err
    assert cli.main(["train", *args, "--output", str(tmp_path / "b"), "--on-bad-data", "skip"]) == 0
    out = capsys.readouterr().out
    assert "left out 2 row(s) or image(s)" in out and str(truncated) in out
    listed = (tmp_path / "b" / "skipped.txt").read_text().splitlines()
    assert len(listed) == 2 and any("row 4" in line and "maybe" in line for line in listed)
    assert any(str(truncated) in line for line in listed)
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "b" / "last.pt"), "--data", root, "--split", "train",
                     "--on-bad-data", "skip", "--quiet"]) == 0
    assert "left out 2 row(s) or image(s)" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["truncated", "not DICOM", "no pixel data"])
def test_an_unreadable_dicom_names_the_file(tmp_path, damage):
    import pydicom
    from pydicom.data import get_testdata_file

    from mxa_model.data import ImageReadError, load_image

    source = Path(get_testdata_file("RG1_UNCR.dcm", download=False))
    path = tmp_path / "scan.dcm"
    if damage == "truncated":
        path.write_bytes(source.read_bytes()[:4000])
    elif damage == "not DICOM":
        path.write_bytes(b"DICM" + b"\x00" * 500)
    else:
        ds = pydicom.dcmread(source)
        del ds.PixelData
        ds.save_as(path)
    with pytest.raises(ImageReadError) as info:
        load_image(path)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            yield name, node


def test_no_code_path_evaluates_strings_or_unpickles():
    """Static check of the package sources: no eval/exec, no pickle, marshal or yaml loading (by name,
    imported name or alias), no shell, every torch.load with weights_only=True, no allow_pickle."""
    sources = [p for d in ("mxa_model", "mxa_kernels", "bench") for p in (ROOT / d).rglob("*.py")]
    assert len(sources) > 20
    found = []
    unsafe_modules = ("pickle", "marshal", "yaml", "dill", "shelve")
    for path in sources:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in unsafe_modules:
                found.append(f"{where} from {node.module} import ...")
            if isinstance(node, ast.Import):
                found += [f"{where} import {a.name} as {a.asname}" for a in node.names
                          if a.name in unsafe_modules and a.asname not in (None, a.name)]
            if isinstance(node, ast.Attribute) and node.attr in ("Unpickler", "load_module"):
                found.append(f"{where} .{node.attr}")
            if isinstance(node, ast.Attribute) and node.attr == "load" and getattr(node.value, "attr", "") == "serialization":
                found.append(f"{where} torch.serialization.load")
        for name, node in _calls(tree):
            keywords = {k.arg: k.value for k in node.keywords}
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if isinstance(node.func, ast.Name) and name in ("eval", "exec", "compile", "__import__"):
                found.append(f"{where} {name}")
            if name in ("system", "popen") and getattr(getattr(node.func, "value", None), "id", "") == "os":
                found.append(f"{where} os.{name}")
            if name in ("load", "loads") and isinstance(node.func, ast.Attribute) and getattr(
                    node.func.value, "id", "") in ("pickle", "yaml", "marshal", "dill"):
                found.append(f"{where} {node.func.value.id}.{name}")
            if name == "load" and getattr(getattr(node.func, "value", None), "id", "") == "torch" and not (
                    isinstance(keywords.get("weights_only"), ast.Constant) and keywords["weights_only"].value is True):
                found.append(f"{where} torch.load without weights_only=True")
            for flag in ("shell", "allow_pickle"):
                if isinstance(keywords.get(flag), ast.Constant) and keywords[flag].value:
                    found.append(f"{where} {flag}=True")
    assert found == []
