"""The ``mxa`` command line: smoke runs of every subcommand on a tiny embedded data set, the eval JSON
contract, and one-line errors that name the culprit."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mxa_kernels
from mxa_model import cli
from mxa_model.data import LABELS
from mxa_model.train.distributed import default_device


def test_step_time_runs_and_reports(capsys):
    assert cli.main(["step-time", "--model", "mxa_efficientvit_m0", "--img-size", "64", "--batch-size", "2",
                     "--steps", "2", "--roi-mode", "align", "--fusion", "gate"]) == 0
    out = capsys.readouterr().out
    assert "mxa_efficientvit_m0" in out and "parameters" in out
    assert "step 2/2" in out and "ms per image" in out


def test_backends_lists_every_backend(capsys):
    assert cli.main(["backends"]) == 0
    out = capsys.readouterr().out
    for name in mxa_kernels.BACKENDS:
        assert name in out
    device = default_device(None)
    for name in mxa_kernels.OPS:  # every registered op, and what serves it here
        assert f"{name:26s} {mxa_kernels.resolve_backend(name, None, device):7s}" in out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """synth -> train -> the folder and checkpoint, shared by the smoke tests."""
    root = tmp_path_factory.mktemp("cli")
    assert cli.main(["synth", "--output", str(root), "--n-train", "24", "--n-valid", "10", "--img-size", "64",
                     "--workers", "1", "--quiet"]) == 0
    data = root / "CheXpert-v1.0-small"
    assert cli.main(["train", "--data", str(data), "--model", "mxa_efficientvit_m0", "--epochs", "1", "--img-size", "64",
                     "--batch-size", "8", "--output", str(root / "out"), "--max-steps", "2", "--workers", "0",
                     "--roi-mode", "align", "--quiet"]) == 0
    return data, root / "out" / "best.pt", root


def test_eval_writes_the_json_contract(run, capsys):
    data, checkpoint, root = run
    assert cli.main(["eval", "--checkpoint", str(checkpoint), "--data", str(data), "--split", "valid",
                     "--json", str(root / "eval.json"), "--report-dir", str(root / "report"), "--workers", "0",
                     "--quiet"]) == 0
    result = json.loads((root / "eval.json").read_text())
    assert list(result["auc_per_label"]) == list(LABELS) and {"auc_macro", "auc_micro"} <= set(result)
    assert all(v is None or 0 <= v <= 1 for v in result["auc_per_label"].values())
    assert (root / "report" / "roc.png").stat().st_size > 0
    assert 0 <= result["roi_iou"]["iou_mean"] <= 1
    assert "auc_macro" in capsys.readouterr().out


@pytest.mark.slow
def test_predict_and_export(run, capsys):
    data, checkpoint, root = run
    image = next((data / "valid").rglob("*.jpg"))
    assert cli.main(["predict", str(image), "--checkpoint", str(checkpoint), "--json", str(root / "pred.json"),
                     "--overlay-dir", str(root / "overlays")]) == 0
    result = json.loads((root / "pred.json").read_text())[0]
    assert len(result["probabilities"]) == 14 and Path(result["overlay"]).stat().st_size > 0
    assert "Cardiomegaly" in capsys.readouterr().out
    assert cli.main(["export", "--checkpoint", str(checkpoint), "--output", str(root / "model.pt")]) == 0
    exported = torch.jit.load(str(root / "model.pt"))
    assert exported(torch.randn(2, 1, 64, 64)).shape == (2, 14)


def test_errors_are_one_line_without_traceback(run, capsys, tmp_path):
    data, checkpoint, root = run
    cases = [
        (["step-time", "--model", "no_such_model", "--steps", "1"], "unknown model 'no_such_model'"),
        (["train", "--data", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o")], "nowhere"),
        (["eval", "--checkpoint", str(tmp_path / "none.pt"), "--data", str(data)], "none.pt"),
        (["eval", "--checkpoint", str(data / "train.csv"), "--data", str(data)], "train.csv"),
        (["predict", str(tmp_path / "missing.png"), "--checkpoint", str(checkpoint)], "missing.png"),
    ]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "train.csv").write_text("Path,Sex\nx,Male\n")
    (tmp_path / "bad" / "valid.csv").write_text("Path,Sex\nx,Male\n")
    cases.append((["train", "--data", str(tmp_path / "bad"), "--output", str(tmp_path / "o")], "missing"))
    for argv, culprit in cases:
        assert cli.main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("mxa: error: ") and culprit in err and "Traceback" not in err, (argv, err)
        assert len(err.strip().splitlines()) == 1, err
    assert cli.main(["step-time", "--steps", "0"]) == 2


def test_every_command_has_help(capsys):
    for command in ("demo", "synth", "train", "eval", "predict", "export", "step-time", "backends"):
        with pytest.raises(SystemExit) as exit_:
            cli.main([command, "--help"])
        assert exit_.value.code == 0 and "usage: mxa " + command in capsys.readouterr().out, command


@pytest.mark.slow
def test_installed_console_script():
    script = Path(sys.executable).parent / "mxa"
    result = subprocess.run([str(script), "train", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--teacher" in result.stdout


@pytest.mark.slow
def test_commands_that_read_no_images_run_without_pydicom():
    """The GPU machine has no pydicom: `mxa bench` and `mxa backends` must not need it (reading DICOM does)."""
    code = ("import sys; sys.modules['pydicom'] = None\n"  # makes `import pydicom` fail
            "from mxa_model import cli\n"
            "sys.exit(cli.main(['bench', '--suite', 'full', '--list']) or cli.main(['backends']))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "efficientvit_m5" in result.stdout and "eager" in result.stdout
