"""torchrun / DDP plumbing shared by training and evaluation (gloo on CPU, nccl on GPU)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["finish", "init_distributed", "is_lead", "rank_world"]


def rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_lead() -> bool:
    """Whether this process reports (rank 0, or the only process); works before the process
    group exists, from torchrun's environment."""
    return rank_world()[0] == 0 and int(os.environ.get("RANK", "0")) == 0


def init_distributed() -> torch.device:
    """Join the torchrun process group if launched by torchrun; return this process's device."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


def finish() -> None:
    """Leave the process group, if this process joined one, once every process is done with it:
    a process that tears its group down while another still talks to it can abort at exit
    (gloo: "terminate called without an active exception", seen once in six torchrun runs of
    benchmarks/imagenet.py's test)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
