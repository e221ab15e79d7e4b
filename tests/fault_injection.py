"""Runs ``mxa train`` with a fault planted in one process, for tests/test_faults.py and tests/test_elastic.py:

    python fault_injection.py [--best-every-epoch] [--count-syncs] FAULT N RANK MXA-TRAIN-ARGUMENTS...

run as it is (one process) or by ``torchrun`` (each worker runs it). The fault strikes in the process of
rank RANK only, and only in the first launch (``TORCHELASTIC_RESTART_COUNT`` unset or 0), so that a
restarted worker runs clean:

- ``step``: SIGKILL at the Nth loss the process computes (a training step);
- ``save-last``, ``save-best``: SIGKILL in the Nth write of ``last.pt`` (``best.pt``), after cutting the
  temporary file to half its bytes;
- ``nan``: the Nth training image the process loads holds a NaN (its batch crosses to the device as float);
- ``none``: no fault.

With ``--best-every-epoch`` every epoch counts as the best so far, so that ``best.pt`` is written at every
epoch whatever the validation AUC does: a test whose fault strikes in a ``best.pt`` write then takes the
same path on any CPU (the AUC's digits, and so which epochs improve, differ between processors).

With ``--count-syncs`` each process counts the host synchronizations of each training step
(``helpers.HostSyncs``) and writes them, a list of {name: count} by step, to ``OUTPUT/syncs-rank-R.json``.

When the fault strikes, the process first writes ``OUTPUT/fault-struck``. Every process also writes its
weights, EMA, optimizer state, epoch and step count after each epoch, to ``OUTPUT/rank-R.pt``, so that the
ranks of one run can be compared with each other.
"""

import json
import math
import os
import signal
import sys
from pathlib import Path

import torch

from mxa_model import cli
from mxa_model.data import CheXpertDataset
from mxa_model.train import loop

args = sys.argv[1:]
best_every_epoch = args[:1] == ["--best-every-epoch"]
count_syncs = (args := args[best_every_epoch:])[:1] == ["--count-syncs"]
fault, n, rank, argv = (args := args[count_syncs:])[0], int(args[1]), int(args[2]), args[3:]
this_rank = int(os.environ.get("RANK", "0"))
armed = this_rank == rank and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0
calls = []
real_save = torch.save  # the per-rank files below are written with it whatever the fault


def strikes() -> bool:
    """Counts a call; whether it is the Nth (in the armed process), which leaves OUTPUT/fault-struck."""
    calls.append(1)
    if not (armed and len(calls) == n):
        return False
    Path(argv[argv.index("--output") + 1], "fault-struck").write_text(f"{fault} {n} {rank}\n")
    return True


def die():
    os.kill(os.getpid(), signal.SIGKILL)


if fault == "step":
    real_loss = loop.supervised_loss

    def loss(*args):
        if strikes():
            die()
        return real_loss(*args)
    loop.supervised_loss = loss
elif fault in ("save-last", "save-best"):
    prefix = "." + fault.removeprefix("save-") + ".pt."

    def written_file(f) -> str:
        """The name of the file torch.save writes into ("" for a path or an in-memory buffer)."""
        try:
            return Path(os.readlink(f"/proc/self/fd/{f.fileno()}")).name
        except (AttributeError, OSError):  # io.UnsupportedOperation is an OSError
            return ""

    def save(obj, f, *args, **kwargs):
        # the temporary file save_checkpoint writes into is named .last.pt.XXXX.tmp (or .best.pt...)
        counted = written_file(f).startswith(prefix)
        real_save(obj, f, *args, **kwargs)
        if counted and strikes():
            f.flush()
            f.truncate(f.tell() // 2)
            os.fsync(f.fileno())
            die()
    torch.save = save
elif fault == "nan":
    real_getitem = CheXpertDataset.__getitem__

    def getitem(self, index):
        image, target, mask, i = real_getitem(self, index)
        if self.csv_path.name == "train.csv":
            image = image.float() / 255  # as floats in [0, 1] (a batch holds one dtype), which can hold a NaN
            if strikes():
                image[0, 3, 3] = float("nan")
        return image, target, mask, i
    CheXpertDataset.__getitem__ = getitem
elif fault != "none":
    sys.exit(f"unknown fault {fault!r}")

real_write_epoch = loop._write_epoch


def write_epoch(run, epoch, *args):
    if best_every_epoch:
        run.best_score = -math.inf  # any finite AUC beats it
    summary = real_write_epoch(run, epoch, *args)
    ema = run.ema.module.state_dict() if run.ema is not None else None
    real_save({"model": run.model.state_dict(), "model_ema": ema, "optimizer": run.optimizer.state_dict(),
                "epoch": epoch, "step": run.step}, run.out / f"rank-{run.ctx.rank}.pt")
    return summary


loop._write_epoch = write_epoch

if count_syncs:
    from helpers import HostSyncs

    real_step, step_syncs = loop._train_step, []

    def train_step(run, *args):
        with HostSyncs() as syncs:
            record = real_step(run, *args)
        step_syncs.append(dict(syncs.events))
        (run.out / f"syncs-rank-{run.ctx.rank}.json").write_text(json.dumps(step_syncs))
        return record
    loop._train_step = train_step
sys.exit(cli.main(argv))
