"""Side-by-side CPU/GPU timing for the benchmark scripts: interleaved repeats, medians, JSON records."""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(cases: dict[str, Callable[[], object]], repeats: int, warmup: int = 2,
                        device: torch.device = torch.device("cpu")) -> dict[str, float]:
    """Median seconds per call of each case, the cases run in turn in every repeat so that machine
    noise (other load, clock changes) falls on all of them alike."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def environment() -> dict[str, object]:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {"commit": commit, "device": device, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d")}


def write_json(path: str | None, records: list[dict]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(records, indent=2) + "\n")
        print(f"wrote {path}")
