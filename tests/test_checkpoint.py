"""Checkpoints: atomic writes that keep the previous file when a write fails, weights_only reads that
refuse a pickle payload without running it, and RNG states that round-trip."""

import errno
import os
import random

import numpy as np
import pytest
import torch

from mxa_model.train import checkpoint as ckpt


class Payload:
    """Pickles to a call that would create a marker file when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_round_trip_and_rng_state(tmp_path):
    torch.manual_seed(3)
    state = {"model": {"w": torch.randn(3)}, "epoch": 2, "rng": ckpt.rng_state(torch.device("cpu"))}
    path = ckpt.save_checkpoint(tmp_path / "last.pt", state)
    expected = (random.random(), np.random.rand(), torch.rand(2))
    loaded = ckpt.load_checkpoint(path)
    torch.testing.assert_close(loaded["model"]["w"], state["model"]["w"])
    ckpt.set_rng_state(loaded["rng"], torch.device("cpu"))
    assert (random.random(), np.random.rand()) == expected[:2]
    torch.testing.assert_close(torch.rand(2), expected[2])
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left


@pytest.mark.parametrize("failure", ["disk full", "disk full inside torch.save", "no permission"])
def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failure):
    path = ckpt.save_checkpoint(tmp_path / "last.pt", {"epoch": 1})
    if failure.startswith("disk full"):
        real_save = torch.save
        # a full disk: an OSError from the file, or the RuntimeError torch.save's zip writer raises
        error = (RuntimeError("[enforce fail at inline_container.cc] unexpected pos")
                 if "torch.save" in failure else OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))

        def save(obj, f):
            f.write(b"partial")
            raise error
        monkeypatch.setattr(torch, "save", save)
    else:
        monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(PermissionError(errno.EACCES, "Permission denied")))
    with pytest.raises(ckpt.CheckpointError, match="previous checkpoint there is intact"):
        ckpt.save_checkpoint(path, {"epoch": 2})
    monkeypatch.undo()
    assert ckpt.load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_pickle_payload_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pt"
    torch.save({"format": ckpt.FORMAT, "model": Payload(str(marker))}, path)
    with pytest.raises(ckpt.CheckpointError, match="cannot read checkpoint"):
        ckpt.load_checkpoint(path)
    assert not marker.exists()


def test_truncated_foreign_and_missing_files(tmp_path):
    good = ckpt.save_checkpoint(tmp_path / "good.pt", {"epoch": 0, "w": torch.randn(100)})
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:200])
    with pytest.raises(ckpt.CheckpointError, match="cannot read checkpoint .*cut.pt"):
        ckpt.load_checkpoint(tmp_path / "cut.pt")
    torch.save({"state_dict": {}}, tmp_path / "timm.pt")
    with pytest.raises(ckpt.CheckpointError, match="not an MXA Engine training checkpoint"):
        ckpt.load_checkpoint(tmp_path / "timm.pt")
    with pytest.raises(ckpt.CheckpointError, match="not found"):
        ckpt.load_checkpoint(tmp_path / "none.pt")


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    model = ckpt.build_model("mxa_efficientvit_m0", {"num_classes": 14, "in_chans": 1, "img_size": 64})
    path = ckpt.save_checkpoint(tmp_path / "m0.pt", {"model_name": "mxa_efficientvit_m0", "labels": [],
                                                      "model_kwargs": {"num_classes": 14, "in_chans": 1, "img_size": 64},
                                                      "model": model.state_dict()})
    rebuilt, _ = ckpt.model_from_checkpoint(path, expect="mxa_efficientvit_m0")
    torch.testing.assert_close(rebuilt.state_dict(), model.state_dict())
    with pytest.raises(ckpt.CheckpointError, match="holds a mxa_efficientvit_m0 model, not densenet121"):
        ckpt.model_from_checkpoint(path, expect="densenet121")
    state = ckpt.load_checkpoint(path)
    state["model_name"] = "mxa_efficientvit_m1"
    ckpt.save_checkpoint(path, state)
    with pytest.raises(ckpt.CheckpointError, match="does not fit model mxa_efficientvit_m1"):
        ckpt.model_from_checkpoint(path)
