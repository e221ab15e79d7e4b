import subprocess
import sys
from pathlib import Path

import mxa_kernels
from mxa_model import cli


def test_demo_runs_and_reports(capsys):
    assert cli.main(["demo", "--model", "mxa_efficientvit_m0", "--img-size", "64", "--batch-size", "2",
                     "--steps", "2", "--roi-mode", "align", "--fusion", "gate"]) == 0
    out = capsys.readouterr().out
    assert "mxa_efficientvit_m0" in out and "parameters" in out
    assert "step 2/2" in out and "ms per image" in out


def test_backends_lists_every_backend(capsys):
    assert cli.main(["backends"]) == 0
    out = capsys.readouterr().out
    for name in mxa_kernels.BACKENDS:
        assert name in out


def test_errors_are_one_line_without_traceback(capsys):
    assert cli.main(["demo", "--model", "no_such_model", "--steps", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mxa: error: unknown model 'no_such_model'") and "Traceback" not in err
    assert cli.main(["demo", "--steps", "0"]) == 2


def test_installed_console_script():
    script = Path(sys.executable).parent / "mxa"
    result = subprocess.run([str(script), "demo", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--backend" in result.stdout
