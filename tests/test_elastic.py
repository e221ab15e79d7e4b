"""Two gloo processes under ``torchrun --max-restarts 1`` (CPU): a worker SIGKILLed mid-epoch, or while
writing a checkpoint, is restarted with its peer, both resume by themselves (``--resume auto``) and the
run ends bit-identical to an uninterrupted 2-process run; a NaN batch on one process only is skipped by
both (``--on-nonfinite skip``), whose weights stay equal."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import FAULT_INJECTION, assert_same_training_state
from mxa_model.train import checkpoint as ckpt

pytestmark = pytest.mark.slow
EPOCHS, STEPS = 3, 3


def torchrun(fault: str, n: int, rank: int, data: str, output, *extra: str) -> subprocess.CompletedProcess:
    """``mxa train --resume auto`` in 2 processes under ``torchrun --standalone --max-restarts 1``, the
    command of docs/training.md, with ``fault`` planted at the Nth occasion in process ``rank`` (fault_injection.py).
    Every epoch writes ``best.pt`` (``--best-every-epoch``), so that a fault in its Nth write strikes
    whatever the validation AUC does on this CPU. The data order and the augmentations are functions of
    (seed, epoch, index, rank), so a restart must find the same epoch and rebuild the same generators."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PYTHONHASHSEED="0", OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts",
           "1", str(FAULT_INJECTION), "--best-every-epoch", "--count-syncs", fault, str(n), str(rank),
           "train", "--data", data, "--output", str(output), "--model", "mxa_efficientvit_m0", "--epochs",
           str(EPOCHS), "--img-size", "48", "--batch-size", "4", "--max-steps", str(STEPS), "--workers", "0",
           "--ema-decay", "0.9", "--clip-grad", "1.0", "--device", "cpu", "--quiet", "--resume", "auto", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def uninterrupted(small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    done = torchrun("none", 0, 0, small_data, out)
    assert "--resume auto: no checkpoint at" in done.stdout and "resumed from" not in done.stdout
    assert ckpt.load_checkpoint(out / "best.pt")["epoch"] == EPOCHS - 1  # the last epoch's, as every epoch's
    return out


def test_training_steps_under_ddp_never_wait_for_the_device(uninterrupted):
    """No step of either process reads a value of the device, nor calls a collective of its own (the
    non-finite check reads DDP's averaged gradients); the reads wait for the logging points."""
    for rank in (0, 1):
        steps = json.loads((uninterrupted / f"syncs-rank-{rank}.json").read_text())
        assert steps == [{}] * (EPOCHS * STEPS), (rank, steps)


@pytest.mark.parametrize("fault, n, rank", [
    ("step", 5, 1),  # process 1's 5th step: epoch 2, step 2 of 3
    # process 0 cut off halfway through epoch 2's best.pt (every epoch's is written), written before its
    # last.pt: had last.pt been written first, the run would resume after epoch 2 and never write that
    # epoch's best.pt
    ("save-best", 2, 0),
], ids=["worker-killed-mid-epoch", "worker-killed-mid-checkpoint"])
def test_a_killed_worker_is_restarted_and_the_run_ends_as_an_uninterrupted_one(small_data, tmp_path, uninterrupted,
                                                                              fault, n, rank):
    done = torchrun(fault, n, rank, small_data, tmp_path)
    # the worker was killed, torchrun restarted both, and they resumed from epoch 1's checkpoint
    assert (tmp_path / "fault-struck").exists()
    assert done.stdout.count("resumed from") == 1 and "epoch 1 of 3 done" in done.stdout
    if fault == "save-best":
        assert "the partial checkpoint write of the run that was stopped" in done.stdout
    assert not list(tmp_path.glob(".*.tmp"))
    final = ckpt.load_checkpoint(tmp_path / "last.pt")
    assert final["epoch"] == EPOCHS - 1 and final["world_size"] == 2 and len(final["rng"]) == 2
    for name in ("last.pt", "best.pt"):
        assert_same_training_state(ckpt.load_checkpoint(tmp_path / name), ckpt.load_checkpoint(uninterrupted / name))
    with (tmp_path / "log.csv").open(newline="") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["1", "2", "3"]


def test_a_nan_batch_on_one_process_is_skipped_by_both(small_data, tmp_path):
    # process 1's 6th training image: in its 2nd batch of 4; process 0's batches are finite
    done = torchrun("nan", 6, 1, small_data, tmp_path, "--on-nonfinite", "skip")
    assert (tmp_path / "fault-struck").exists()
    assert "process 1: loss nan at epoch 1, batch 2: non-finite input in" in done.stdout
    assert "batch skipped" in done.stdout and "resumed from" not in done.stdout
    with (tmp_path / "log.csv").open(newline="") as f:
        assert [row["skipped_batches"] for row in csv.DictReader(f)] == ["1", "0", "0"]
    ranks = [torch.load(tmp_path / f"rank-{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["step"] == ranks[1]["step"] == EPOCHS * STEPS  # the batches, the schedule's count
    for r in ranks:  # both skipped the same update: AdamW's own count
        assert {s["step"].item() for s in r["optimizer"]["state"].values()} == {EPOCHS * STEPS - 1}
    assert_same_training_state(ranks[1], ranks[0])
    assert all(torch.isfinite(p).all() for p in ranks[0]["model"].values())
