"""The data loader of a run: one per split for the whole run, its workers persistent across epochs.

A batch leaves the workers as uint8 (one byte a pixel), in pinned memory when the run is on a GPU, and
becomes float on the device (:func:`mxa_model.data.transforms.normalize`, or the training
augmentations of :class:`mxa_model.data.augment.BatchAugment`). The epoch reaches persistent workers
with each index (:class:`EpochSampler`): a worker's copy of the dataset keeps the epoch it had when the
worker started.
"""

from __future__ import annotations

import argparse
import os

import torch
from torch.utils.data import DataLoader, DistributedSampler

PREFETCH_BATCHES = 4  # per worker: enough to ride out a slow file without holding much pinned memory


class EpochSampler(DistributedSampler):
    """``DistributedSampler``'s order (shuffled from (seed, epoch); this process's share of it), each
    index as ``(epoch, index)`` for :meth:`CheXpertDataset.__getitem__`. One process: ``rank`` 0 of 1."""

    def __iter__(self):
        epoch = self.epoch
        return ((epoch, index) for index in super().__iter__())


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity mask, as a container or ``taskset`` sets it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def workers_flag(text: str) -> int | str:
    """The value of a ``--workers`` flag: a count of at least 0, or ``auto``."""
    if text == "auto":
        return text
    try:
        count = int(text)
    except ValueError:
        count = -1
    if count < 0:
        raise argparse.ArgumentTypeError(f"expected a count of at least 0 or 'auto', got {text!r}")
    return count


def resolve_workers(workers: int | str) -> int:
    """``--workers``: a count, or ``"auto"``: this process's share of the CPUs it may use (the processes
    torchrun starts on this node, ``LOCAL_WORLD_SIZE``, share them), less one for the process itself (the
    training loop), at least 1. The training and the validation loader each get that many."""
    if workers == "auto":
        return max(1, cpu_count() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")) - 1)
    return workers_flag(str(workers)) if isinstance(workers, str) else workers


def make_loader(dataset, batch_size: int, workers: int, train: bool, seed: int, rank: int = 0,
                world_size: int = 1, pin_memory: bool = False, persistent: bool = True) -> DataLoader:
    """The split's loader for the whole run (``persistent``: its workers kept across epochs); call
    ``loader.sampler.set_epoch(epoch)`` before each epoch. Training shuffles and drops the last partial batch
    (when there is more than one batch)."""
    # the sampler shuffles with seed + epoch: spread the seeds apart, or seed s + 1 would repeat seed s's
    # order one epoch later
    sampler = EpochSampler(dataset, num_replicas=world_size, rank=rank, shuffle=train, seed=seed * 1_000_003,
                           drop_last=train)
    # the loader's own generator seeds its workers: without one, each new iterator draws from the global
    # generator, which a resumed run would then draw from at other times than an uninterrupted one
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      drop_last=train and len(dataset) > batch_size, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(seed), persistent_workers=persistent and workers > 0,
                      prefetch_factor=PREFETCH_BATCHES if workers > 0 else None)
