"""timm's own model tests, from the source distribution of the installed timm version, run on the
project's models: the API contract that timm's models keep (backward, TorchScript, FX, features).

The sdist is fetched once with pip into a cache folder (``$XDG_CACHE_HOME/mxa-engine``, by default
``~/.cache/mxa-engine``); without the package registry the test is skipped, saying so.
"""

import os
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest
import timm

MODELS = ("mxa_efficientvit_m0", "mxa_efficientvit_m5")
# Each must run, and pass, for each model (timm's parametrization decides the rest).
REQUIRED_TESTS = ("test_model_forward", "test_model_backward", "test_model_default_cfgs",
                  "test_model_forward_features", "test_model_forward_torchscript", "test_model_forward_fx",
                  "test_model_backward_fx", "test_model_forward_fx_torchscript")


def _timm_sdist() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mxa-engine"
    sdist = cache / f"timm-{timm.__version__}.tar.gz"
    if not sdist.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        fetch = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", "timm",
             "--dest", str(cache), f"timm=={timm.__version__}"],
            capture_output=True, text=True, timeout=300)
        if fetch.returncode != 0 or not sdist.is_file():
            reason = (fetch.stderr.strip().splitlines() or ["no sdist written"])[-1]
            pytest.skip(f"cannot fetch the timm {timm.__version__} sdist with pip: {reason}")
    return sdist


@pytest.mark.slow
def test_timm_model_tests_pass_on_the_project_models(tmp_path):
    with tarfile.open(_timm_sdist()) as archive:
        member = archive.getmember(f"timm-{timm.__version__}/tests/test_models.py")
        (tmp_path / "test_models.py").write_bytes(archive.extractfile(member).read())
    (tmp_path / "conftest.py").write_text("import mxa_model  # noqa: F401  (registers the models with timm)\n")
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # keeps the project's settings out
    report = tmp_path / "report.xml"
    env = {k: v for k, v in os.environ.items() if k != "GITHUB_ACTIONS"}  # timm drops tests on GitHub's runners
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore", "test_models.py",
         "-k", " or ".join(MODELS), f"--junitxml={report}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    cases = ElementTree.parse(report).getroot().iter("testcase")
    outcomes = {case.get("name"): [child.tag for child in case] for case in cases}
    assert all(not tags for tags in outcomes.values()), {n: t for n, t in outcomes.items() if t}
    for model in MODELS:
        ran = {name.split("[")[0] for name in outcomes if name.endswith(f"-{model}]")}
        assert set(REQUIRED_TESTS) <= ran, f"{model}: timm's tests did not run {set(REQUIRED_TESTS) - ran}"
