"""Training checkpoints: written atomically, read with ``torch.load(weights_only=True)``.

A checkpoint is a dict of tensors and plain Python values (no pickled objects): the model's name and
construction arguments (so that ``mxa eval`` and ``mxa predict`` rebuild it), its weights, and for
``--resume`` the optimizer, scheduler, gradient scaler, EMA weights, epoch, the number of processes and
every process's RNG states.
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

FORMAT = "mxa-engine-checkpoint-1"


class CheckpointError(RuntimeError):
    """A checkpoint could not be read, does not fit, or could not be written."""


def save_checkpoint(path: str | os.PathLike, state: dict) -> Path:
    """Write ``state`` to ``path`` atomically: into a temporary file in the same folder, flushed to disk,
    then renamed over ``path``. If anything fails (disk full, no permission) the previous file at
    ``path`` is left intact and :class:`CheckpointError` says so."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # the permissions of any other output file, not mkstemp's 0600
        with os.fdopen(fd, "wb") as f:
            torch.save(dict(state, format=FORMAT), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        folder = os.open(path.parent, os.O_RDONLY)  # the rename itself reaches the disk
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except BaseException as exc:  # a full disk makes torch.save raise RuntimeError, not OSError
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if not isinstance(exc, Exception):
            raise
        kept = "the previous checkpoint there is intact" if path.exists() else "no earlier checkpoint existed"
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else _first_line(exc)
        raise CheckpointError(f"could not write checkpoint {path} ({reason}); {kept}") from exc
    return path


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``: a file that smuggles
    pickled code is refused without running it)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {_first_line(exc)}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an MXA Engine training checkpoint (mxa train writes them)")
    return state


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_weights(model: torch.nn.Module, weights: dict, path, name: str) -> None:
    """Load ``weights`` into ``model``, or raise one line naming the first keys that do not fit."""
    target = model.state_dict()
    problems = {
        "missing": [k for k in target if k not in weights],
        "unexpected": [k for k in weights if k not in target],
        "wrong-shape": [k for k in weights if k in target and weights[k].shape != target[k].shape],
    }
    if any(problems.values()):
        found = "; ".join(f"{len(keys)} {kind} (e.g. {keys[0]})" for kind, keys in problems.items() if keys)
        raise CheckpointError(f"checkpoint {path} does not fit model {name}: {found}")
    model.load_state_dict(weights)


def build_model(name: str, kwargs: dict) -> torch.nn.Module:
    """The model a checkpoint names (an MXA model or any timm model, e.g. the densenet121 teacher)."""
    import mxa_model

    return mxa_model.create_model(name, **kwargs)


def model_from_checkpoint(path: str | os.PathLike, expect: str | None = None) -> tuple[torch.nn.Module, dict]:
    """Rebuild the model a checkpoint holds (the EMA weights when it has them) and return it with the
    checkpoint. ``expect``: a model name the checkpoint must hold."""
    state = load_checkpoint(path)
    name = state["model_name"]
    if expect is not None and name != expect:
        raise CheckpointError(f"checkpoint {path} holds a {name} model, not {expect}")
    model = build_model(name, state["model_kwargs"])
    load_weights(model, state.get("model_ema") or state["model"], path, name)
    return model, state


def rng_state(device: torch.device) -> dict:
    """This process's RNG states (Python, NumPy, torch's CPU generator and, on a GPU, ``device``'s), as
    tensors and plain values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore the states :func:`rng_state` returned (the GPU's into ``device``)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    cuda = state.get("cuda")
    if device.type != "cuda" or cuda is None:
        return
    if isinstance(cuda, list):  # a checkpoint from before per-process states held every visible GPU's
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= len(cuda):
            return
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda, device)


__all__ = ["CheckpointError", "build_model", "load_checkpoint", "model_from_checkpoint", "rng_state",
           "save_checkpoint", "set_rng_state"]
