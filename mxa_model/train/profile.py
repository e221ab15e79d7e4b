"""``mxa train --profile-steps N``: where a training step's time goes.

N steps of the first epoch a run trains, after ``PROFILE_AFTER`` steps (compilation, CUDA graph recording
and the first allocations are not a step's steady state), are traced with ``torch.profiler`` into
``OUTPUT/profile`` (Chrome's trace format, which TensorBoard's profiler plugin and Perfetto read), and each
phase of a step is timed: on a GPU by CUDA events around the work the phase queues (the device's time,
read once the profiled steps are over), on the CPU by the clock. One line then gives each phase's share
of the profiled steps' wall time.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

PROFILE_AFTER = 3  # steps run before the profiled ones
# a step's phases, in order: the wait for the loader's batch, the copy to the device and the batched
# augmentation, the student's forward, the teacher's, the loss and backward, and clipping, AdamW, the
# schedule, the EMA and the non-finite bookkeeping
PHASES = ("data wait", "augment", "forward", "teacher", "backward", "optimizer")


class StepProfile:
    """The profile of steps ``first`` to ``last`` (0-based, inclusive) of an epoch, or of none
    (``steps=0``: every method does nothing)."""

    def __init__(self, steps: int, steps_per_epoch: int, device: torch.device, folder: Path):
        self.first = min(PROFILE_AFTER, max(steps_per_epoch - steps, 0))
        self.last = min(self.first + steps, steps_per_epoch) - 1
        self.device, self.folder = device, folder
        self.active = False
        self.times: dict[str, list] = {phase: [] for phase in PHASES}  # per phase: (start, end) marks
        self.profiler = None
        self.started = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _mark(self):
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def step_begins(self, batch_no: int) -> None:
        """Before the wait for batch ``batch_no``: the first profiled step starts the trace and the clock."""
        self.active = self.first <= batch_no <= self.last
        if batch_no == self.first and self.active:
            self._sync()  # the work queued before is not the profiled steps'
            self.folder.mkdir(parents=True, exist_ok=True)
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(
                activities=activities, on_trace_ready=torch.profiler.tensorboard_trace_handler(str(self.folder)))
            self.profiler.start()
            self.started = time.perf_counter()

    def waited(self, seconds: float) -> None:
        """The host's wait for the loader's batch (a host time on every device)."""
        if self.active:
            self.times["data wait"].append((0.0, seconds))

    @contextlib.contextmanager
    def phase(self, name: str):
        """Times ``name``'s work, and labels it in the trace."""
        if not self.active:
            yield
            return
        with torch.profiler.record_function(name):
            start = self._mark()
            yield
            self.times[name].append((start, self._mark()))

    def step_ends(self, batch_no: int, epoch: int) -> str | None:
        """After step ``batch_no``; after the last profiled one, the trace is written and the line returned."""
        if not (self.active and batch_no == self.last):
            return None
        self._sync()
        wall = time.perf_counter() - self.started
        self.profiler.stop()
        self.active = False
        spent = {phase: sum(_seconds(start, end) for start, end in marks) for phase, marks in self.times.items()}
        steps = self.last - self.first + 1
        shares = [f"{phase} {spent[phase] / wall:.0%}" for phase in PHASES if self.times[phase]]  # no teacher: none
        other = wall - sum(spent.values())  # host work outside the phases (negative where the device's
        if other > 0:                       # phases ran while the host waited for data)
            shares.append(f"other {other / wall:.0%}")
        early = "" if self.first == PROFILE_AFTER else f" (after {self.first} steps, not {PROFILE_AFTER}: warm-up may be in it)"
        return (f"profile of steps {self.first + 1}-{self.last + 1} of epoch {epoch + 1}{early}: "
                f"{wall / steps * 1e3:.1f} ms a step; {', '.join(shares)}; trace in {self.folder}")


def _seconds(start, end) -> float:
    if isinstance(start, torch.cuda.Event):
        return start.elapsed_time(end) / 1e3
    return end - start
