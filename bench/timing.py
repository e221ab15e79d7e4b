"""Timers, memory, ceilings and provenance for the benchmark runner.

On a GPU a call's time is ``triton.testing.do_bench``'s median (CUDA events, L2 flushed between calls).
On the CPU the calls of one comparison run in turn within every repeat (interleaved), so that machine
noise (other load, clock changes) falls on all of them alike, and each reports its median.
"""

from __future__ import annotations

import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(calls: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each of ``calls`` (CPU), the calls run in turn in every repeat."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def gpu_median(fn: Callable[[], object]) -> float:
    """Median seconds of one call on the current CUDA device, over at least 10 calls (do_bench fits its
    call count to ``rep`` milliseconds, which a long call such as a model step would exceed alone)."""
    import triton.testing

    estimate_ms = triton.testing.do_bench(fn, warmup=0, rep=1, return_mode="min")
    return triton.testing.do_bench(fn, warmup=max(25, 2 * estimate_ms), rep=max(100, 10 * estimate_ms),
                                   return_mode="median") / 1e3


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory allocated on ``device`` during one call beyond what was allocated before it (inputs,
    weights and other providers' state are not counted; activations, gradients and workspaces are).
    CUDA only: the CPU allocator keeps no such statistic, so None there."""
    if device.type != "cuda":
        return None
    sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def copy_bandwidth_gbs(device: torch.device) -> float:
    """Device copy bandwidth (bytes read + written per second), measured now on 1 GiB (GPU) or 64 MiB."""
    numel = (256 if device.type == "cuda" else 16) * 2**20
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    seconds = gpu_median(lambda: dst.copy_(src)) if device.type == "cuda" else \
        interleaved_medians({"copy": lambda: dst.copy_(src)}, repeats=10, warmup=2)["copy"]
    return 2 * src.numel() * src.element_size() / seconds / 1e9


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Dense matrix-product throughput in ``dtype``, measured now (8192^3 on a GPU, 1024^3 on the CPU)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = gpu_median(lambda: a @ b) if device.type == "cuda" else \
        interleaved_medians({"matmul": lambda: a @ b}, repeats=5, warmup=2)["matmul"]
    return 2 * n**3 / seconds / 1e12


def _cpu_model() -> str:
    """The processor's model name (Linux), else its architecture: CPU time ratios depend on it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {platform.machine()}"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, object]:
    """Where and what was measured: commit, device name, versions, date."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu ({_cpu_model()}, {torch.get_num_threads()} threads)"
    return {"commit": commit, "device": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
