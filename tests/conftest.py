import os

# Kernel tests run the Triton kernels on CPU tensors through the interpreter; it must be on before
# triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("MXA_BACKEND", None)

import pytest  # noqa: E402
import torch  # noqa: E402

import mxa_kernels.backend as backend  # noqa: E402


@pytest.fixture(autouse=True)
def _isolate(monkeypatch):
    """Fresh random seed and no backend selection leaking between tests."""
    torch.manual_seed(0)
    monkeypatch.setattr(backend, "_selected", None)
    monkeypatch.delenv("MXA_BACKEND", raising=False)
    yield

