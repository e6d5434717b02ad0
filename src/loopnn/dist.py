"""torchrun environment: process group set-up, rank helpers, print0.

Single-process runs need none of this: `setup()` returns rank 0 of 1 without touching torch.distributed.
Under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set) it initialises nccl on CUDA and gloo on CPU. `wrap` applies
DDP or FSDP2 from outside the model; `full_state` gathers what a checkpoint stores, in the single-process layout.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel as DDP


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


def rank() -> int:
    """This process's rank under torchrun (0 otherwise), readable before and after the process group exists."""
    return int(os.environ.get("RANK", "0"))


def teardown(synchronize: bool = False) -> None:
    """Leave the process group. synchronize (a run that ended normally on every rank): wait for every rank
    first, so that no rank tears down its gloo connections while another still uses them (a rank doing so
    aborted with "terminate called without an active exception" after a finished run, in 1 of 5 loops of
    tests/test_dist.py on one machine; CI has seen it once since, with this barrier in place, which is why the
    test retries that one failure once)."""
    if tdist.is_available() and tdist.is_initialized():
        if synchronize:
            try:
                tdist.barrier()
            except RuntimeError:  # a peer already gone: leave anyway
                pass
        tdist.destroy_process_group()
        # Free now, while the interpreter is whole, whatever may still hold the group's backend (a wrapper in
        # a reference cycle): its threads are then joined here, not during interpreter finalization.
        gc.collect()


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        value = value.clone()
        tdist.all_reduce(value, op=tdist.ReduceOp.AVG if value.device.type == "cuda" else tdist.ReduceOp.SUM)
        if value.device.type != "cuda":  # gloo has no AVG
            value /= info.world_size
    return value


def all_reduce_max_int(value: int, info: DistInfo, device: torch.device) -> int:
    """The largest of the ranks' values, on every rank. One scalar all-reduce on the training device (nccl
    needs a CUDA tensor); a single process returns `value` with no collective. The trainer calls it once per
    step with its stop request (a signal number or 0), so every rank leaves the loop after the same step."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.long, device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return int(t.item())


def print0(*args, info: DistInfo | None = None, **kwargs) -> None:
    if info is None or info.is_main:
        print(*args, **kwargs, flush=True)


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a DTensor (FSDP2's clip_grad_norm_ returns one); plain tensors pass through."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def is_fsdp(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def wrap(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer],
    parallel: str,
    device: torch.device,
    info: DistInfo,
    find_unused_parameters: bool = False,
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """Apply data parallelism from outside the model: returns (module to call, optimizer to step).

    ddp: DistributedDataParallel around the model; the optimizer is kept. find_unused_parameters is needed when
    a step may leave parameters without gradient (sampled loop counts, truncated backprop).
    fsdp: FSDP2 `fully_shard` on each block, then on the root (embeddings, ln_f, gates, adapter). The model is
    sharded in place, so the optimizer is rebuilt on the sharded parameters and any state already loaded into
    the old one (a resumed checkpoint, saved in the single-process layout) is carried over.
    """
    if not info.enabled:
        return model, optimizer
    if parallel == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return DDP(model, device_ids=ids, find_unused_parameters=find_unused_parameters), optimizer
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    old_state = optimizer.state_dict()
    names = _group_param_names(model, optimizer)
    mesh = init_device_mesh(device.type, (info.world_size,))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    new = make_optimizer(model)
    if old_state["state"]:
        set_optimizer_state_dict(model, new, _by_name(old_state, names), options=StateDictOptions(full_state_dict=True))
    return model, new


def _group_param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's order: state_dict() numbers parameters 0.. in this order."""
    by_id = {id(p): name for name, p in model.named_parameters()}
    return [by_id[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _by_name(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """Optimizer state_dict with parameter numbers -> with parameter names (torch.distributed.checkpoint's form)."""
    groups = [dict(g, params=[names[i] for i in g["params"]]) for g in state["param_groups"]]
    return {"state": {names[i]: s for i, s in state["state"].items()}, "param_groups": groups}


def _by_number(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The inverse of _by_name: the layout single-process checkpoints use, so any layout can resume any other."""
    index = {name: i for i, name in enumerate(names)}
    groups = [dict(g, params=[index[n] for n in g["params"]]) for g in state["param_groups"]]
    return {"state": {index[n]: s for n, s in state["state"].items()}, "param_groups": groups}


class _FullState:
    """Stands in for a module or optimizer in checkpoint.save_checkpoint: state_dict() returns a gathered dict."""

    def __init__(self, state: dict[str, Any]):
        self._state = state

    def state_dict(self) -> dict[str, Any]:
        return self._state


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
    """(model, optimizer) to save. Under FSDP the full, unsharded state is gathered to rank 0's CPU memory (a
    collective: every rank must call it); the files are the same as a single-process run's. Otherwise as given."""
    if not is_fsdp(model):
        return model, optimizer
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(model, options=options)
    opt_sd = get_optimizer_state_dict(model, optimizer, options=options)
    if not model_sd:  # ranks other than 0 get nothing
        return None, None
    return _FullState(model_sd), _FullState(_by_number(opt_sd, _group_param_names(model, optimizer)))
