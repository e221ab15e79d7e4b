"""The ``mxa`` command line: smoke runs of every subcommand on a tiny embedded data set, the eval JSON
contract, and one-line errors that name the culprit."""

import dataclasses
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mxa_kernels
from helpers import rel_err
from mxa_model import cli
from mxa_model.data import LABELS
from mxa_model.pipeline import DemoConfig
from mxa_model.train.config import TrainConfig
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


def test_backends_says_why_a_selected_backend_cannot_serve(monkeypatch, capsys):
    monkeypatch.setenv("MXA_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # so that the CPU cannot serve triton
    device = default_device(None)
    assert cli.main(["backends"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("selected: triton\n")
    for name in mxa_kernels.OPS:
        reason = mxa_kernels.triton_unavailable_reason(name, device)
        assert (f"{name:26s} nothing: {reason}" in out) == (reason is not None)


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


def test_onnx_export_runs_in_onnxruntime_as_the_eager_model(run, tmp_path):
    """`mxa export --format onnx`, run by ONNX Runtime at another batch size than the export's example,
    gives the eager model's logits (fp32)."""
    import onnxruntime

    from mxa_model.train.checkpoint import model_from_checkpoint

    checkpoint = run[1]
    assert cli.main(["export", "--checkpoint", str(checkpoint), "--format", "onnx",
                     "--output", str(tmp_path / "model.onnx")]) == 0
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    images = torch.randn(3, 1, 64, 64)
    (got,) = session.run(["logits"], {"image": images.numpy()})
    model, _ = model_from_checkpoint(checkpoint)
    model.set_backend("eager")
    with torch.no_grad():
        want = model.eval()(images)
    assert got.shape == (3, 14) and rel_err(torch.from_numpy(got), want) < 1e-5


def test_onnx_export_without_onnx_says_what_to_install(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if onnx were not installed
    assert cli.main(["export", "--checkpoint", str(run[1]), "--format", "onnx",
                     "--output", str(tmp_path / "model.onnx")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mxa: error: ONNX export needs the onnx package (pip install onnx)") and err.count("\n") == 1
    assert not (tmp_path / "model.onnx").exists()


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


def help_text(capsys, command: str) -> str:
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    return capsys.readouterr().out


@pytest.mark.parametrize("command, config_class, flags, required", [
    ("train", TrainConfig, cli.TRAIN_FLAGS, {"data": "DIR", "output": "OUT"}),
    ("demo", DemoConfig, cli.DEMO_FLAGS, {}),
])
def test_every_config_field_is_a_flag_with_the_dataclass_default(capsys, command, config_class, flags, required):
    """The flags are built from the dataclass: one default per setting, which cannot drift."""
    argv = [command, *(arg for name, value in required.items() for arg in ("--" + name, value))]
    args = vars(cli.build_parser().parse_args(argv))
    out = help_text(capsys, command)
    for f in dataclasses.fields(config_class):
        assert f.name in args, f"{command}: no flag for {f.name}"
        if f.default is not dataclasses.MISSING:
            assert args[f.name] == f.default, (command, f.name)
        assert flags.get(f.name, "--" + f.name.replace("_", "-")) in out, (command, f.name)
    defaults = [f for f in dataclasses.fields(config_class) if f.default is not dataclasses.MISSING]
    assert out.count("(default:") == len(defaults)  # --help names every default
    assert cli.config_from_args(config_class, cli.build_parser().parse_args(argv)) == config_class(**required)


def test_train_flags_keep_their_spellings():
    args = cli.build_parser().parse_args(["train", "--data", "d", "--output", "o", "--max-steps", "3", "--quiet",
                                          "--views", "frontal, lateral", "--clip-grad", "1", "--ema-decay", "0.9",
                                          "--channels-last", "--resume", "--workers", "0", "--teacher", "t.pt"])
    cfg = cli.config_from_args(TrainConfig, args)
    assert (cfg.max_steps_per_epoch, cfg.progress, cfg.views) == (3, False, ("frontal", "lateral"))
    assert (cfg.clip_grad, cfg.ema_decay, cfg.channels_last, cfg.resume, cfg.workers) == (1.0, 0.9, True, "last", 0)
    assert cfg.teacher == "t.pt" and TrainConfig("d", "o").workers == 2  # the one workers default, CLI and API
    demo = cli.config_from_args(DemoConfig, cli.build_parser().parse_args(["demo", "--epochs", "2", "--model", "m",
                                                                           "--augment", "0", "--quiet"]))
    assert (demo.student_epochs, demo.student, demo.augment, demo.progress) == (2, "m", 0.0, False)


def test_compile_takes_a_mode_and_alone_means_default(capsys):
    def parsed(*flags):
        args = cli.build_parser().parse_args(["train", "--data", "d", "--output", "o", *flags])
        return cli.config_from_args(TrainConfig, args).compile

    assert (parsed(), parsed("--compile"), parsed("--compile", "reduce-overhead")) == (None, "default", "reduce-overhead")
    assert parsed("--compile", "--quiet") == "default"
    assert TrainConfig("d", "o", compile=True).compile == "default"  # the setting's type before it took a mode
    with pytest.raises(SystemExit):
        parsed("--compile", "fast")
    assert "invalid choice: 'fast'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--compile must be one of default, reduce-overhead, max-autotune"):
        TrainConfig("d", "o", compile="fast").check()


def test_too_small_counts_name_the_flag_users_type(capsys):
    assert cli.main(["train", "--data", "d", "--output", "o", "--max-steps", "0"]) == 2
    assert "--max-steps must be at least 1" in capsys.readouterr().err
    assert cli.main(["demo", "--epochs", "0"]) == 2
    assert "--epochs must be at least 1" in capsys.readouterr().err
    assert cli.main(["train", "--data", "d", "--output", "o", "--log-every", "0"]) == 2
    assert "--log-every must be at least 1" in capsys.readouterr().err


def test_eval_flags_have_the_defaults_of_evaluate():
    from mxa_model.evaluate import evaluate

    args = vars(cli.build_parser().parse_args(["eval", "--checkpoint", "c", "--data", "d"]))
    parameters = inspect.signature(evaluate).parameters
    for name in ("split", "batch_size", "workers", "device", "backend", "on_bad_data"):
        assert args[name] == parameters[name].default, name


@pytest.mark.slow
def test_building_the_parser_imports_no_benchmark_code():
    code = ("import sys; from mxa_model.cli import build_parser; build_parser(); "
            "print(sorted(m for m in sys.modules if m.startswith('mxa_bench.')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "['mxa_bench.arguments']"
    code = "import sys, mxa_bench.arguments; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'mxa_model')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr[-2000:]


def test_bench_argument_names_match_the_suites_and_providers():
    from mxa_bench import arguments
    from mxa_bench.cases import PROVIDERS
    from mxa_bench.suites import SUITES

    assert arguments.SUITE_NAMES == (*SUITES, "cost", "loader", "predict")  # cost: static figures, bench/cost.py
    assert arguments.PROVIDER_NAMES == tuple(PROVIDERS)
