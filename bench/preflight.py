"""What ``bench/gpu_check.sh`` runs first: the versions the GPU run will use, and within seconds a
one-line reason to stop when something it needs is missing, too old or broken, so that no GPU time
is spent on an import error. ``python -m mxa_bench.preflight [--allow-cpu]``; exit 1 on a problem."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

# what the GPU run imports: the kernels' tests, the benchmark suite and its chart
NEEDED = ("torch", "torchvision", "triton", "timm", "numpy", "matplotlib", "pytest")
GPU_WHEELS = ("timm",)  # what bench/gpu_wheels.sh brings
PROJECT_MODULES = ("mxa_kernels", "mxa_model", "mxa_model.cli", "mxa_bench.runner", "mxa_bench.chart")
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def requirements() -> dict[str, Requirement]:
    """The project's requirements (the test extra's too) by package name: from the checkout's
    pyproject.toml (Python 3.11+), else from the installed package's metadata, else none."""
    try:
        import tomllib

        project = tomllib.loads(PYPROJECT.read_text())["project"]
        specs = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    except (ImportError, OSError):
        try:
            specs = importlib.metadata.requires("mxa-engine") or []
        except importlib.metadata.PackageNotFoundError:
            specs = []
    return {(r := Requirement(spec)).name: r for spec in specs}


def problems(allow_cpu: bool) -> list[str]:
    """Print the versions and the device; return what stops the run."""
    found = []
    print(f"python {sys.version.split()[0]} ({sys.executable})")
    wanted = requirements()
    for name in NEEDED:
        spec = wanted[name].specifier if name in wanted else None
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} is not installed (needs {spec or 'any version'})")
            continue
        try:
            where = Path(importlib.util.find_spec(name).origin).parent.parent
        except (AttributeError, TypeError, ImportError, ValueError):  # metadata left without its package
            found.append(f"{name} {version} has installed metadata but cannot be imported")
            continue
        print(f"{name} {version} (needs {spec or 'any version'}) from {where}")
        if spec and not spec.contains(version, prereleases=True):
            found.append(f"{name} {version} is installed, the project needs {name}{spec}")
    for module in PROJECT_MODULES:
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - any failure to import stops the run
            found.append(f"import {module} failed: {type(exc).__name__}: {exc}".splitlines()[0])
    if "mxa_model.cli" in sys.modules:
        try:  # what `mxa bench` does before it runs anything: its parser imports every command's options
            sys.modules["mxa_model.cli"].build_parser()
        except Exception as exc:  # noqa: BLE001
            found.append(f"the mxa command line cannot start: {type(exc).__name__}: {exc}".splitlines()[0])
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            print(f"device {torch.cuda.get_device_name()} (sm_{major}{minor}), CUDA {torch.version.cuda}")
        elif allow_cpu:
            print("device: no CUDA device; rehearsal on the CPU, kernels in Triton's interpreter")
            found += _interpreter_problems()
        else:
            found.append("no CUDA device here (ALLOW_CPU=1 rehearses the run on the CPU)")
    return found


def _interpreter_problems() -> list[str]:
    """Triton before 3.7 converts its interpreter's 1-element arrays to Python ints in a way NumPy 2.4
    refuses: every kernel with a loop over a size fails there."""
    try:
        triton, numpy = (Version(importlib.metadata.version(n)) for n in ("triton", "numpy"))
    except importlib.metadata.PackageNotFoundError:
        return []
    if triton < Version("3.7") and numpy >= Version("2.4"):
        return [f"Triton {triton}'s interpreter cannot run with NumPy {numpy}: rehearse with numpy<2.4"]
    return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mxa_bench.preflight", description=__doc__)
    parser.add_argument("--allow-cpu", action="store_true", help="a machine without a CUDA device is no problem")
    found = problems(parser.parse_args(argv).allow_cpu)
    if found:
        hint = " (bench/gpu_wheels.sh downloads the missing wheels to carry in bench/wheels/)" if any(
            name in problem for problem in found for name in GPU_WHEELS) else ""
        print(f"gpu_check.sh: cannot run: {'; '.join(found)}{hint}", file=sys.stderr)
        return 1
    print("preflight: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
