"""DistributedDataParallel set-up under ``torchrun`` (nccl on GPUs, gloo on the CPU), and the gather of
evaluation predictions without the duplicates a DistributedSampler pads with."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Only the main process writes files and prints progress."""
        return self.rank == 0


def default_device(device: str | None = None) -> torch.device:
    """``device``, or the GPU when there is one, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def setup(device: str | None = None) -> Context:
    """Join the process group ``torchrun`` describes in the environment (a single process otherwise)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = default_device(device)
    if world_size == 1:
        return Context(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Context(rank=rank, world_size=world_size, device=device)


def restart_warnings(resume: str | None) -> list[str]:
    """What is amiss for ``torchrun --max-restarts N`` (restarts allowed) in this process's environment."""
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) == 0:
        return []
    found = []
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # the agent's store outlives an attempt and keeps its workers' addresses, which a restarted worker
        # may read and connect to (seen with PyTorch 2.14's gloo workers: the restart hung)
        found.append("torchrun lends its rendezvous store to the workers, where a restarted worker can find the "
                     "previous attempt's addresses and fail to connect: run torchrun with "
                     "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment")
    if resume != "auto":
        found.append("torchrun --max-restarts restarts this command as it was given: without --resume auto a "
                     "restarted run " + ("fails when there is no checkpoint yet" if resume else "starts afresh"))
    return found


def teardown(ctx: Context) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_gather_objects(ctx: Context, obj) -> list:
    """Every rank's ``obj`` (a picklable value), indexed by rank, on every rank."""
    if not ctx.distributed:
        return [obj]
    gathered = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def gather_by_index(ctx: Context, index: torch.Tensor, *columns: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """All ranks' rows, each sample once, ordered by ``index`` (the sampler's padding repeats samples)."""
    if ctx.distributed:
        gathered = all_gather_objects(ctx, [t.cpu() for t in (index, *columns)])
        index, *columns = (torch.cat(parts) for parts in zip(*gathered))
    order = torch.argsort(index, stable=True)
    index = index[order]
    first = torch.ones_like(index, dtype=torch.bool)
    first[1:] = index[1:] != index[:-1]
    return (index[first], *(c[order][first] for c in columns))


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()


def broadcast_flag(ctx: Context, flag: bool) -> bool:
    """Rank 0's decision, on every rank."""
    if not ctx.distributed:
        return flag
    box = [flag]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


def sync_buffers(ctx: Context, module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics drift apart between DDP's syncs)."""
    if ctx.distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def any_rank(ctx: Context, flags: torch.Tensor) -> torch.Tensor:
    """``flags`` (0 or 1, on the device) set where any rank's are, on every rank, in place."""
    if ctx.distributed:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags
