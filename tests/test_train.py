"""The trainer end to end on a tiny embedded data set (CPU, deterministic): supervised and distilled runs,
an interrupted run resumed from its checkpoint equal to an uninterrupted one, and DistributedDataParallel
with two gloo processes whose metrics count every validation image once."""

import csv
import functools
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from mxa_model.data.synth import generate
from mxa_model.train import checkpoint as ckpt
from mxa_model.train import loop
from mxa_model.train.config import TrainConfig
from mxa_model.train.loop import train

N_VALID = 15  # odd: two processes' DistributedSampler pads the split with a duplicate


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return str(generate(tmp_path_factory.mktemp("synth"), n_train=40, n_valid=N_VALID, img_size=64, seed=1,
                        workers=1, progress=False))


def config(data, output, **kw):
    base = dict(data=data, output=str(output), model="mxa_efficientvit_m0", epochs=2, img_size=64, batch_size=8,
                workers=0, progress=False, max_steps_per_epoch=3, roi_mode="align", ema_decay=0.9, clip_grad=1.0)
    return TrainConfig(**{**base, **kw})


def log_epochs(output) -> list[int]:
    """The epoch column of ``output``'s log.csv."""
    with (output / "log.csv").open(newline="") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


def console_epochs(printed: str) -> list[int]:
    """The N of each "epoch N/EPOCHS: ..." line the trainer printed."""
    return [int(n) for n in re.findall(r"^epoch (\d+)/\d+: ", printed, flags=re.MULTILINE)]


def test_supervised_run_writes_checkpoints_and_log(data, tmp_path, capsys):
    summary = train(config(data, tmp_path))
    assert {p.name for p in tmp_path.iterdir()} >= {"last.pt", "best.pt", "log.csv", "summary.json"}
    state = ckpt.load_checkpoint(tmp_path / "last.pt")
    assert state["epoch"] == 1 and state["step"] == 6 and state["model_ema"] is not None
    assert log_epochs(tmp_path) == console_epochs(capsys.readouterr().out) == [1, 2]  # one numbering, from 1
    assert summary["valid"]["n_samples"] == N_VALID


@pytest.mark.slow
def test_interrupted_and_resumed_run_equals_an_uninterrupted_run(data, tmp_path, monkeypatch, capsys):
    whole = tmp_path / "whole"
    train(config(data, whole))
    # the same run, killed in the middle of its second epoch, then resumed
    broken = tmp_path / "broken"
    real_loss, calls = loop.supervised_loss, []

    def dying_loss(*args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_loss(*args)
    monkeypatch.setattr(loop, "supervised_loss", dying_loss)
    with pytest.raises(KeyboardInterrupt):
        train(config(data, broken))
    monkeypatch.undo()
    state = ckpt.load_checkpoint(broken / "last.pt")
    assert state["epoch"] == 0 and state["world_size"] == 1
    # as a checkpoint from before per-process random states held them: one dict, no process count; and
    # from before the AdamW was fused
    del state["world_size"]
    for group in state["optimizer"]["param_groups"]:
        group.update(fused=None, foreach=None)
    ckpt.save_checkpoint(broken / "last.pt", dict(state, rng=state["rng"][0]))
    capsys.readouterr()
    train(config(data, broken, resume="last"))
    assert console_epochs(capsys.readouterr().out) == [2]
    want, got = ckpt.load_checkpoint(whole / "last.pt"), ckpt.load_checkpoint(broken / "last.pt")
    for part in ("model", "model_ema"):
        for key, value in want[part].items():
            assert torch.equal(got[part][key], value), f"{part} {key}"
    assert got["optimizer"]["state"][0]["step"] == want["optimizer"]["state"][0]["step"]
    assert log_epochs(broken) == [1, 2]  # epoch 1's row kept, epoch 2's written once, by the resumed run


def test_a_log_written_from_epoch_0_is_renumbered_on_resume(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("epoch,lr\n0,0.1\n1,0.2\n2,0.3\n")  # the third epoch's row, its checkpoint never written
    assert [(row["epoch"], row["lr"]) for row in loop._read_log(path, 2)] == [("1", "0.1"), ("2", "0.2")]


def test_resume_refuses_another_model_or_schedule(data, tmp_path):
    train(config(data, tmp_path, epochs=1))
    with pytest.raises(ckpt.CheckpointError, match="use another --output"):
        train(config(data, tmp_path, epochs=1, model="mxa_efficientvit_m1", resume="last"))
    with pytest.raises(ckpt.CheckpointError, match=r"other settings \(epochs 1 -> 3, lr 0.001 -> 0.002\)"):
        train(config(data, tmp_path, epochs=3, lr=2e-3, resume="last"))
    # a checkpoint of a 2-process run: its data shares, steps per epoch and random states were those of 2
    state = ckpt.load_checkpoint(tmp_path / "last.pt")
    assert state["world_size"] == 1 and len(state["rng"]) == 1
    ckpt.save_checkpoint(tmp_path / "last.pt", dict(state, world_size=2, rng=state["rng"] * 2))
    with pytest.raises(ckpt.CheckpointError, match=r"written by 2 process\(es\), this run has 1; resume with 2"):
        train(config(data, tmp_path, epochs=1, resume="auto"))


def test_resume_last_needs_a_checkpoint_and_resume_auto_starts_afresh_without_one(data, tmp_path, capsys):
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint at .*last.pt to continue from"):
        train(config(data, tmp_path / "last", epochs=1, max_steps_per_epoch=1, resume="last"))
    assert not (tmp_path / "last" / "log.csv").exists()
    train(config(data, tmp_path / "auto", epochs=1, max_steps_per_epoch=1, resume="auto"))
    assert "--resume auto: no checkpoint at" in capsys.readouterr().out
    assert ckpt.load_checkpoint(tmp_path / "auto" / "last.pt")["step"] == 1
    with pytest.raises(ValueError, match="--resume must be one of last, auto"):
        config(data, tmp_path, resume="yes").check()


def test_processes_that_find_different_checkpoints_stop_naming_them(data, tmp_path, monkeypatch):
    """Multi-node runs resume from one shared --output: a process (node) whose folder holds another
    checkpoint, or none, or that does not see rank 0's files there, stops every process instead of
    training from another epoch. The processes' findings are stood in for by a patched gather (the
    2-process runs are tests/test_elastic.py's)."""
    train(config(data, tmp_path, epochs=1, max_steps_per_epoch=1))
    for other, named in (((True, "none"), "none"), ((False, "none"), "another folder")):
        # the gathers of _find_checkpoint: rank 0's marker name, then what each process sees and finds
        monkeypatch.setattr(loop.distributed, "all_gather_objects",
                            lambda ctx, obj: [obj, other] if isinstance(obj, tuple) else [obj])
        with pytest.raises(ckpt.CheckpointError, match=rf"different checkpoints at .*last.pt \(process\(es\) 0: "
                           rf"epoch 1's \(step 1\); process\(es\) 1: {named}\); --output must be a folder that every node"):
            train(config(data, tmp_path, epochs=1, max_steps_per_epoch=1, resume="auto"))


def test_distillation_from_a_teacher_checkpoint(data, tmp_path):
    train(config(data, tmp_path / "teacher", model="densenet121", epochs=1, max_steps_per_epoch=2, ema_decay=None))
    summary = train(config(data, tmp_path / "student", epochs=1, teacher=str(tmp_path / "teacher" / "best.pt"),
                           distill_type="hard", alpha=0.7, tau=2.0))
    state = ckpt.load_checkpoint(tmp_path / "student" / "best.pt")
    assert state["model_kwargs"]["distilled"] and any(k.startswith("head_dist.") for k in state["model"])
    assert summary["valid"]["auc_macro"] is not None


@pytest.mark.slow
def test_two_gloo_processes_count_every_validation_image_once(data, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
           "-m", "mxa_model.cli", "train", "--data", data, "--output", str(tmp_path), "--model", "mxa_efficientvit_m0",
           "--epochs", "1", "--img-size", "64", "--batch-size", "4", "--max-steps", "2", "--workers", "0", "--quiet",
           "--device", "cpu"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["valid"]["n_samples"] == N_VALID
    assert ckpt.load_checkpoint(tmp_path / "last.pt")["step"] == 2


def test_tensorboard_logs_each_epochs_scalars_as_log_csv_has_them(data, tmp_path):
    """The event files under OUTPUT/tensorboard, read back by TensorBoard itself: each scalar once per epoch,
    at log.csv's epoch number, with log.csv's value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(config(data, tmp_path, ema_decay=None, max_steps_per_epoch=1))
    with (tmp_path / "log.csv").open(newline="") as f:
        log = list(csv.DictReader(f))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = ("train_loss", "auc_macro", "auc_micro", "images_per_s")
    assert set(events.Tags()["scalars"]) == set(tags) and [int(row["epoch"]) for row in log] == [1, 2]
    for tag in tags:  # TensorBoard keeps float32 values
        assert [(e.step, e.value) for e in events.Scalars(tag)] == [
            (int(row["epoch"]), pytest.approx(float(row[tag]), rel=1e-6)) for row in log], tag


@pytest.mark.slow
def test_evaluation_imports_no_training_code():
    """Batch inference lives in mxa_model.inference: `import mxa_model.evaluate` loads neither the trainer
    nor the losses (only the checkpoint format and the distributed gather of mxa_model.train)."""
    code = "import sys, mxa_model.evaluate; print(sorted(m for m in sys.modules if m.startswith('mxa_model.train')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == str(sorted(["mxa_model.train", "mxa_model.train.checkpoint",
                                                "mxa_model.train.distributed"]))


@pytest.mark.slow
def test_compiled_training_on_the_triton_backend_has_no_graph_break_and_eagers_losses(tmp_path, monkeypatch):
    """`mxa train --compile --backend triton`, the configuration to train with on a GPU (here the fused
    kernels run in Triton's interpreter): the model compiles as one graph with the fused ops inside it,
    and two steps give the mean loss of the uncompiled eager backend. The graph goes to the
    "aot_eager" backend (TorchDynamo's capture and AOTAutograd's forward and backward graphs, where a
    custom op breaks a graph or fails), not to Inductor, with which this test took ten minutes on two
    cores; tests/test_bench.py compiles the fused ops with Inductor. A small data set and batch: the fused
    kernels took 90 % of its time in the interpreter (cProfile), whose programs grow with the batch."""
    from mxa_model import cli

    data = str(generate(tmp_path / "synth", n_train=8, n_valid=2, img_size=64, seed=1, workers=1, progress=False))
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))

    def run(output, *flags):
        assert cli.main(["train", "--data", data, "--output", str(output), "--model", "mxa_efficientvit_m0",
                         "--epochs", "1", "--img-size", "64", "--batch-size", "2", "--max-steps", "2", "--workers",
                         "0", "--roi-mode", "align", "--quiet", *flags]) == 0
        log = (output / "log.csv").read_text().splitlines()
        return float(log[1].split(",")[log[0].split(",").index("train_loss")])

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled_loss = run(tmp_path / "compiled", "--compile", "--backend", "triton")
    graph_breaks = dict(torch._dynamo.utils.counters["graph_break"])
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    eager_loss = run(tmp_path / "eager", "--backend", "eager")
    assert graph_breaks == {} and graphs == 1
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-5)


def test_restart_warnings_name_what_would_break_a_torchrun_restart(monkeypatch):
    from mxa_model.train.distributed import restart_warnings

    for name in ("TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE"):
        monkeypatch.delenv(name, raising=False)
    assert restart_warnings(None) == []  # not under torchrun
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    assert restart_warnings(None) == []  # torchrun without restarts
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "2")
    shared, afresh = restart_warnings(None)
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in shared and "without --resume auto" in afresh
    assert "starts afresh" in afresh and "fails when there is no checkpoint" in restart_warnings("last")[1]
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")
    assert restart_warnings("auto") == []
