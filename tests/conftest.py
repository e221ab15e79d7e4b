import os

import torch

# Without a GPU the kernel tests run the Triton kernels on CPU tensors through the interpreter, which
# must be switched on before triton is first imported (importing torch does not import it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Kernel outputs start as NaN (see mxa_kernels/alloc.py), so that an element a kernel forgets fails.
os.environ["MXA_POISON_EMPTY"] = "1"
os.environ.pop("MXA_BACKEND", None)

import pytest  # noqa: E402

import mxa_kernels.backend as backend  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu need a CUDA GPU: skipped, with the reason, without one."""
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (marked gpu)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolate(monkeypatch):
    """Fresh random seed and no backend selection leaking between tests."""
    torch.manual_seed(0)
    monkeypatch.setattr(backend, "_selected", None)
    monkeypatch.delenv("MXA_BACKEND", raising=False)
    yield

