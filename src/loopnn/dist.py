"""torchrun environment: process group set-up, rank helpers, print0.

Single-process runs need none of this: `setup()` returns rank 0 of 1 without touching torch.distributed.
Under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set) it initialises nccl on CUDA and gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str) -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world)
    if not tdist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(info.local_rank)
        tdist.init_process_group(backend=backend)
    return info


def teardown() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        value = value.clone()
        tdist.all_reduce(value, op=tdist.ReduceOp.AVG if value.device.type == "cuda" else tdist.ReduceOp.SUM)
        if value.device.type != "cuda":  # gloo has no AVG
            value /= info.world_size
    return value


def broadcast_int(value: int, info: DistInfo) -> int:
    """Rank 0's value on every rank (used so sampled loop counts agree)."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.long)
    if tdist.get_backend() == "nccl":
        t = t.cuda()
    tdist.broadcast(t, src=0)
    return int(t.item())


def print0(*args, info: DistInfo | None = None, **kwargs) -> None:
    if info is None or info.is_main:
        print(*args, **kwargs, flush=True)
