import os
import subprocess
from pathlib import Path

import torch

# Without a GPU the kernel tests run the Triton kernels on CPU tensors through the interpreter, which
# must be switched on before triton is first imported (importing torch does not import it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Kernel outputs start as NaN (see mxa_kernels/alloc.py), so that an element a kernel forgets fails.
os.environ["MXA_POISON_EMPTY"] = "1"
# One pytest-xdist process per core: each on one thread (and so the processes it starts, and Inductor's
# compile workers): with threads competing for the cores, the overlay tests took 30 s instead of 5 s.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = "1"
    torch.set_num_threads(1)
os.environ.pop("MXA_BACKEND", None)

import pytest  # noqa: E402

import mxa_kernels.backend as backend  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """The slow tests first, so that pytest-xdist's processes start the minutes-long ones early rather than
    one process finishing them while the other waits; tests marked gpu need a CUDA GPU: skipped, with the
    reason, without one."""
    items.sort(key=lambda item: "slow" not in item.keywords)  # stable: the files' order otherwise
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (marked gpu)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def _git_status(root: Path) -> set[str] | None:
    """``git status --porcelain`` lines of the checkout at ``root`` (untracked files one by one), or None
    when git is missing or ``root`` is not a git checkout (an unpacked sdist)."""
    try:
        done = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=root,
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return set(done.stdout.splitlines()) if done.returncode == 0 else None


@pytest.fixture(scope="session", autouse=True)
def _source_tree_untouched():
    """The tests write only under temporary folders: a path of the checkout whose ``git status`` line is
    new at the end of the session (a file created, changed or deleted; ignored files aside) fails it."""
    root = Path(__file__).parents[1]
    before = _git_status(root)
    yield
    after = _git_status(root) if before is not None else None
    if after is not None and after - before:
        pytest.fail("the tests changed the source tree (git status --porcelain):\n"
                    + "\n".join(sorted(after - before)), pytrace=False)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> str:
    """A CheXpert-format folder of 32 training and 12 validation images of 48 x 48 pixels (the embedded
    data's generator, seed 2), for the fault and multi-process training tests."""
    from mxa_model.data.synth import generate

    return str(generate(tmp_path_factory.mktemp("synth"), n_train=32, n_valid=12, img_size=48, seed=2, workers=1,
                        progress=False))


@pytest.fixture(autouse=True)
def _isolate(monkeypatch):
    """Fresh random seed and no backend selection leaking between tests."""
    torch.manual_seed(0)
    monkeypatch.setattr(backend, "_selected", None)
    monkeypatch.delenv("MXA_BACKEND", raising=False)
    yield

