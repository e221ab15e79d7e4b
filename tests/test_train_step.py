"""A training step that never waits for the device: no value read on the host and no collective of its
own between logging points (counted by ``helpers.HostSyncs``; two processes in tests/test_elastic.py,
and with CUDA's own sync check on a GPU), the skip of a non-finite step done on the device, the teacher
under inference mode, and ``--profile-steps``."""

import json
import types

import pytest
import torch
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3

from helpers import HostSyncs
from mxa_model.data.synth import generate
from mxa_model.train import loop
from mxa_model.train.config import TrainConfig


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return str(generate(tmp_path_factory.mktemp("synth"), n_train=48, n_valid=8, img_size=48, seed=3, workers=1,
                        progress=False))


@pytest.fixture(scope="module")
def teacher(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    loop.train(TrainConfig(data=data, output=str(out), model="densenet121", epochs=1, img_size=48, batch_size=8,
                           workers=0, progress=False, max_steps_per_epoch=1))
    return str(out / "last.pt")


def config(data, output, **kw):
    base = dict(data=data, output=str(output), model="mxa_efficientvit_m0", epochs=1, img_size=48, batch_size=8,
                workers=0, progress=False, max_steps_per_epoch=5, roi_mode="align", backend="eager", log_every=2)
    return TrainConfig(**{**base, **kw})


def count_step_syncs(monkeypatch) -> tuple[list, list]:
    """Each training step's host synchronizations, and the batch numbers read at each logging point."""
    real_step, real_read, steps, reads = loop._train_step, loop._read_steps, [], []

    def train_step(*args):
        with HostSyncs() as syncs:
            record = real_step(*args)
        steps.append(dict(syncs.events))
        return record

    def read_steps(run, pending, *args):
        reads.append([r.batch_no for r in pending])
        return real_read(run, pending, *args)
    monkeypatch.setattr(loop, "_train_step", train_step)
    monkeypatch.setattr(loop, "_read_steps", read_steps)
    return steps, reads


@pytest.mark.parametrize("settings", [
    dict(ema_decay=0.9, clip_grad=1.0),
    dict(on_nonfinite="skip", clip_grad=0.05, clip_mode="agc", channels_last=True),
    dict(clip_grad=0.5, clip_mode="value", augment=0.0),
    "distilled",
], ids=["ema-clip-norm", "skip-agc-channels-last", "clip-value", "distilled"])
def test_a_training_step_never_waits_for_the_device(data, teacher, tmp_path, monkeypatch, settings):
    if settings == "distilled":
        settings = dict(teacher=teacher, ema_decay=0.9, on_nonfinite="skip")
    steps, reads = count_step_syncs(monkeypatch)
    loop.train(config(data, tmp_path, **settings))
    assert steps == [{}] * 5
    assert reads == [[0, 1], [2, 3], [4]]  # every --log-every 2 steps, and at the epoch's end


def test_the_count_sees_a_read_planted_in_a_step(data, tmp_path, monkeypatch):
    real_loss = loop.supervised_loss

    def loss_read_on_the_host(*args):
        loss = real_loss(*args)
        if loss > 100:  # bool(tensor): a read of the device
            raise AssertionError
        return loss
    monkeypatch.setattr(loop, "supervised_loss", loss_read_on_the_host)
    steps, _ = count_step_syncs(monkeypatch)
    loop.train(config(data, tmp_path, max_steps_per_epoch=2))
    assert steps == [{"_local_scalar_dense": 1}] * 2


@pytest.mark.gpu
def test_a_training_step_on_the_gpu_never_synchronizes(data, tmp_path, monkeypatch):
    """CUDA's own check: any synchronization of a step after the first is an error."""
    real_step, calls = loop._train_step, []

    def train_step(*args):
        calls.append(1)
        if len(calls) == 1:  # the first step's allocations and kernel choices
            return real_step(*args)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return real_step(*args)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    monkeypatch.setattr(loop, "_train_step", train_step)
    loop.train(config(data, tmp_path, device="cuda", backend="triton", ema_decay=0.9, clip_grad=1.0,
                      on_nonfinite="skip", log_every=50))
    assert len(calls) == 5


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.head = torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)).mean((2, 3)))


def tiny_run(scaled: bool):
    """What :func:`loop._optimizer_step` uses of a run: a small model with BatchNorm, the trainer's fused
    AdamW, schedule and EMA, a float16-style gradient scaler when ``scaled``, clipping."""
    torch.manual_seed(0)
    model = Tiny()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    scheduler = CosineLRScheduler(optimizer, t_initial=10, t_in_epochs=False)
    return types.SimpleNamespace(model=model, optimizer=optimizer, scheduler=scheduler, step=0,
                                 scaler=torch.amp.GradScaler("cpu", enabled=scaled, init_scale=1024.0),
                                 ema=ModelEmaV3(model, decay=0.9), cfg=types.SimpleNamespace(clip_grad=1.0, clip_mode="norm"))


def step(run, guard, images):
    guard.save()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(run.model(images), torch.ones(len(images), 2))
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    with HostSyncs() as syncs:
        skipped = loop._optimizer_step(run, loss, guard)
    assert syncs.count == 0
    return skipped


def state(run) -> list[torch.Tensor]:
    """Weights, BatchNorm buffers, EMA and AdamW's moments and step counts, copied."""
    values = [*run.model.state_dict().values(), *run.ema.module.state_dict().values()]
    values += [v for s in run.optimizer.state.values() for v in s.values()]
    return [v.detach().clone() for v in values]


@pytest.mark.parametrize("scaled", [False, True], ids=["bf16-or-fp32", "fp16-scaler"])
def test_a_non_finite_step_is_skipped_on_the_device(scaled):
    run = tiny_run(scaled)
    guard = loop.BatchNormGuard(run.model)
    images = torch.randn(4, 1, 6, 6)
    assert step(run, guard, images).item() == 0  # a finite step: the weights and statistics move
    before = state(run)
    bad = images.clone()
    bad[1, 0, 2, 2] = float("nan")
    assert step(run, guard, bad).item() == 1
    after = state(run)
    assert len(after) == len(before) and all(torch.equal(a, b) for a, b in zip(after, before))
    assert run.step == 2  # the schedule, a function of the batch count, moved on
    if scaled:
        assert run.scaler.get_scale() == 512.0  # the scaler saw the overflow
    assert step(run, guard, images).item() == 0
    assert not all(torch.equal(a, b) for a, b in zip(state(run), before))


def test_the_ema_update_is_timms():
    run = tiny_run(False)
    timms = ModelEmaV3(run.model, decay=0.9)
    for step_no in (1, 2, 3):  # the first update copies (decay 0), the others move a tenth of the way
        for p in run.model.parameters():
            p.data.add_(torch.randn_like(p))
        timms.update(run.model, step=step_no)
        decay = run.ema.get_decay(step_no)
        if decay:  # a skipped step: nothing moves (at decay 0 the EMA copies the model, which a skip left alone)
            before = [v.clone() for v in run.ema.module.state_dict().values()]
            loop._update_ema(run.ema, run.model, decay, torch.tensor(1.0))
            assert all(torch.equal(a, b) for a, b in zip(run.ema.module.state_dict().values(), before))
        loop._update_ema(run.ema, run.model, decay, torch.tensor(0.0))
        for got, want in zip(run.ema.module.state_dict().values(), timms.module.state_dict().values()):
            if step_no == 1:
                assert torch.equal(got, want)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_the_teacher_runs_under_inference_mode_and_the_profile_names_every_phase(data, teacher, tmp_path,
                                                                                 monkeypatch, capsys):
    real_load, seen = loop.model_from_checkpoint, []

    def load(path):
        model, checkpoint = real_load(path)
        model.register_forward_hook(lambda *_: seen.append(torch.is_inference_mode_enabled()))
        return model, checkpoint
    monkeypatch.setattr(loop, "model_from_checkpoint", load)
    loop.train(config(data, tmp_path, teacher=teacher, max_steps_per_epoch=6, profile_steps=2))
    assert seen == [True] * 6
    line = next(li for li in capsys.readouterr().out.splitlines() if li.startswith("profile of steps"))
    assert line.startswith("profile of steps 4-5 of epoch 1: ")  # after 3 steps, 2 steps
    for phase in ("data wait", "augment", "forward", "teacher", "backward", "optimizer"):
        assert f" {phase} " in line, phase
    traces = list((tmp_path / "profile").glob("*.pt.trace.json"))
    assert len(traces) == 1
    names = {event.get("name") for event in json.loads(traces[0].read_text())["traceEvents"]}
    assert {"forward", "teacher", "backward", "optimizer"} <= names
