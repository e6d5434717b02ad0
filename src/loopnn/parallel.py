"""What training applies to a model from outside it: how loops carry gradient, and compile.

The model (loopnn.model) knows nothing about training. A training step's forward runs inside `step_context`,
which sets autocast and the loop driver's gradient policy (`loop.Backprop`: truncated backprop through loops,
activation checkpointing per loop iteration or per block); `compile_blocks` compiles the blocks in place.
DDP and FSDP2 are applied by loopnn.dist.wrap.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack

import torch

from loopnn import loop
from loopnn.config import ModelConfig, TrainConfig
from loopnn.model import LoopGPT


def backprop_policy(cfg: TrainConfig, model_cfg: ModelConfig) -> loop.Backprop:
    """TrainConfig's backprop_loops and activation_checkpointing as the loop driver's policy.

    Activation checkpointing recomputes a whole loop iteration under the stack strategy (one state kept per
    loop, so memory barely grows with loops; docs/benchmarks.md) and each block application under 'layer'.
    """
    checkpointing = None
    if cfg.activation_checkpointing:
        checkpointing = "loop" if model_cfg.loop_strategy == "stack" else "block"
    return loop.Backprop(backprop_loops=cfg.backprop_loops, checkpointing=checkpointing)


def step_context(
    policy: loop.Backprop, autocast_dtype: torch.dtype | None, device_type: str = "cuda"
) -> Callable[[], AbstractContextManager]:
    """A factory of the context a training forward runs in: autocast (when a dtype is given) and `policy`.

    Evaluation may use it too: the policy only acts where gradients are on.
    """

    def context() -> AbstractContextManager:
        stack = ExitStack()
        if autocast_dtype is not None:
            stack.enter_context(torch.autocast(device_type, dtype=autocast_dtype))
        stack.enter_context(loop.backprop(policy))
        return stack

    return context


def compile_blocks(model: LoopGPT) -> None:
    """torch.compile each block in place: a looped block compiles once and is reused by every loop."""
    for block in model.transformer.h:
        block.compile()
