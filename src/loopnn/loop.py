"""The paper's mechanism: which blocks run in which order, and how each loop updates the hidden state.

Blocks [loop_start, loop_end) form the loop region F. Blocks before it (prelude) and after it (coda) run once.
Two strategies (the paper's v3 on arXiv):
  stack: F = b_s..b_e-1 applied as a whole, N times:        x_n = update(x_{n-1}, F(x_{n-1}))
  layer: each block looped in place before the next one:     x <- update(x, b_i(x)), N times per block
`run` is the one loop driver: training, evaluation, the KV-cached decoder, adaptive exit, the logit lens and the
telemetry all walk the blocks through it, reading each loop's state through its `after_loop` hook. `slot` is
the one definition of the KV-cache slot order. How loops carry gradient (truncated backprop, activation
checkpointing) is set from outside the model with `backprop` (see loopnn.parallel), as torch.autocast is.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from loopnn.config import ModelConfig

# (block index, cache slot, x, rows) -> block i applied to x. rows: which rows of the batch given to `run` x holds
# (a LongTensor), or None for all of them; rows drop out only when an `after_loop` hook lets them exit.
BlockCall = Callable[[int, int, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
Inject = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (state x, loop input e0) -> state for next loop
CHECKPOINTING = ("block", "loop", "nested")


@dataclass
class LoopState:
    """What the `after_loop` hook sees after loop n (0-based) of the stack strategy, for the rows still looping.

    x: the state after loop n (A, T, C); x_prev: the state after loop n - 1 (for n = 0 the loop region's input);
    x_in: what entered loop n's blocks (x_prev after injection and the loop embedding); rows: their indices in
    the batch given to `run` (None: every row).
    """

    n: int
    x: torch.Tensor
    x_prev: torch.Tensor
    x_in: torch.Tensor
    rows: torch.Tensor | None


# Returns a bool (A,) tensor of the rows that stop looping after this loop (their state goes on to the coda
# as it is), True when every row stops, or None when every row goes on.
AfterLoop = Callable[[LoopState], "torch.Tensor | bool | None"]


@dataclass(frozen=True)
class Backprop:
    """How loops carry gradient in a training step. Ignored where gradients are off (evaluation, decoding).

    backprop_loops (stack only): truncated backprop. Loops before the last `backprop_loops` run under
    torch.no_grad, so no gradient flows through them (nor into the prelude, except through injection's e0) and
    their activations are not kept. None: every loop carries gradient.
    checkpointing: activation checkpointing (non-reentrant; the same gradients, one extra forward).
    "block" recomputes each block application; "loop" (stack strategy; under 'layer' it is "block") recomputes
    a whole loop iteration, so only one state per loop is kept and peak memory barely grows with loops;
    "nested" checkpoints each loop and, inside its recomputation, each block (the backward then holds one
    block's activations instead of one loop's, for one more forward of the loop region).
    Prelude and coda blocks are checkpointed per block under all three. None: no checkpointing.
    """

    backprop_loops: int | None = None
    checkpointing: str | None = None

    def __post_init__(self) -> None:
        if self.checkpointing not in (None, *CHECKPOINTING):
            raise ValueError(f"checkpointing must be None or one of {CHECKPOINTING}, got {self.checkpointing!r}")


PLAIN = Backprop()  # every loop carries gradient, nothing recomputed
_BACKPROP: ContextVar[Backprop | None] = ContextVar("loopnn_backprop", default=None)


@contextmanager
def backprop(policy: Backprop) -> Iterator[None]:
    """Run the forward passes inside under `policy` (a training step's forward; backward needs no context)."""
    token = _BACKPROP.set(policy)
    try:
        yield
    finally:
        _BACKPROP.reset(token)


def update(rule: str, x: torch.Tensor, fx: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """One loop step. x: state entering the loop step, fx: the looped blocks applied to x. Both (B, T, C).

    repeat          x <- F(x)                   reading (A) of the v1 rule: plain weight-tied re-application,
                                                since a GPT-2 block already adds its own residuals.
    residual        x <- x + F(x)               reading (B): the outer residual taken literally.
    gated           x <- x + a_n * (F(x) - x)   v3's learnable per-loop gate on reading (A); a_n = 1 is 'repeat'.
    gated_residual  x <- x + a_n * F(x)         v3's gate on reading (B).
    """
    if rule == "repeat":
        return fx
    if rule == "residual":
        return x + fx
    if rule == "gated":
        return x + gate * (fx - x)
    if rule == "gated_residual":
        return x + gate * fx
    raise ValueError(f"unknown loop rule {rule!r}")


def gate_for(gates: torch.Tensor | None, loop_index: int) -> torch.Tensor | None:
    """Per-loop vector for loop n (0-based): the gate a_n, or the loop embedding. Loops beyond those trained
    reuse the last trained one."""
    if gates is None:
        return None
    return gates[min(loop_index, gates.shape[0] - 1)]


def slot(cfg: ModelConfig, n_loops: int, block: int, loop_index: int = 0) -> int:
    """KV-cache slot of one block application (block i in loop n): the order in which `run` applies them.

    Prelude blocks first, then the loop region (stack: loop by loop; layer: block by block, each looped in
    place), then the coda; cfg.effective_depth(n_loops) slots in all. loop_index is ignored outside the region.
    """
    L = cfg.n_loop_blocks
    if block < cfg.loop_start:
        return block
    if block >= cfg.loop_end:
        return cfg.loop_start + n_loops * L + block - cfg.loop_end
    j = block - cfg.loop_start
    if cfg.loop_strategy == "stack":
        return cfg.loop_start + loop_index * L + j
    return cfg.loop_start + j * n_loops + loop_index


def region_slots(cfg: ModelConfig, n_loops: int, loop_index: int) -> list[int]:
    """The KV-cache slots of loop n's block applications (stack strategy), in block order."""
    return [slot(cfg, n_loops, i, loop_index) for i in range(cfg.loop_start, cfg.loop_end)]


def _checkpointed(call: BlockCall) -> BlockCall:
    def run_block(i: int, s: int, x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        # Non-reentrant: works with DDP and with blocks that are used several times per step.
        return checkpoint(call, i, s, x, rows, use_reentrant=False)

    return run_block


def prelude(cfg: ModelConfig, x: torch.Tensor, n_loops: int, call: BlockCall) -> torch.Tensor:
    for i in range(cfg.loop_start):
        x = call(i, slot(cfg, n_loops, i), x, None)
    return x


def boundary_norm(cfg: ModelConfig, x: torch.Tensor, e0: torch.Tensor) -> torch.Tensor:
    """The state at a loop boundary under ModelConfig.loop_norm: as it is, RMS-normalised (unit), or RMS-normalised
    to the RMS of the loop region's input e0 at each position (input). x, e0: (B, T, C)."""
    if cfg.loop_norm == "none":
        return x
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    return x if cfg.loop_norm == "unit" else x * e0.pow(2).mean(-1, keepdim=True).sqrt()


def coda(
    cfg: ModelConfig,
    x: torch.Tensor,
    n_loops: int,
    call: BlockCall,
    inject: Inject | None = None,
    e0: torch.Tensor | None = None,
) -> torch.Tensor:
    """The blocks after the loop region (also the logit lens's exit path for an intermediate loop state). With
    ModelConfig.coda_injection the hand-over first applies `inject` to (x, e0), e0 the loop region's input."""
    if cfg.coda_injection:
        if inject is None or e0 is None:
            raise ValueError("coda_injection needs the injection and the loop region's input e0")
        x = inject(x, e0)
    for i in range(cfg.loop_end, cfg.n_layer):
        x = call(i, slot(cfg, n_loops, i), x, None)
    return x


def run(
    cfg: ModelConfig,
    x: torch.Tensor,
    n_loops: int,
    gates: torch.Tensor | None,
    call: BlockCall,
    *,
    inject: Inject | None = None,
    loop_embed: torch.Tensor | None = None,
    after_loop: AfterLoop | None = None,
) -> torch.Tensor:
    """Run prelude, loop region and coda on x (B, T, C). `call` applies one block; it owns the KV cache.

    inject (stack only): applied to (x, e0) before every loop after the first (and at the hand-over to the coda
    under ModelConfig.coda_injection); e0 is the loop region's input.
    loop_embed (n_loops, C): a vector added to the state before each loop (ModelConfig.loop_embedding).
    after_loop (stack only): called after every loop with its LoopState; may let rows exit (see AfterLoop).
    The `backprop` context in force decides truncated backprop and activation checkpointing.
    """
    policy = (_BACKPROP.get() or PLAIN) if torch.is_grad_enabled() else PLAIN
    plain = call
    if policy.checkpointing is not None:
        call = _checkpointed(call)
    x = prelude(cfg, x, n_loops, call)
    e0 = x
    if cfg.loop_strategy == "stack":
        loop_call = plain if policy.checkpointing == "loop" else call  # "nested": checkpointed blocks inside
        x = _stack(cfg, x, n_loops, gates, loop_call, inject, loop_embed, after_loop, policy)
    else:
        if inject is not None or policy.backprop_loops is not None or after_loop is not None:
            raise ValueError("input injection, truncated backprop and per-loop hooks need the stack strategy")
        for i in range(cfg.loop_start, cfg.loop_end):
            for n in range(n_loops):
                if loop_embed is not None:
                    x = x + gate_for(loop_embed, n)
                x = update(cfg.loop_rule, x, call(i, slot(cfg, n_loops, i, n), x, None), gate_for(gates, n))
    return coda(cfg, x, n_loops, call, inject, e0)


def _stack(
    cfg: ModelConfig,
    x: torch.Tensor,
    n_loops: int,
    gates: torch.Tensor | None,
    call: BlockCall,
    inject: Inject | None,
    loop_embed: torch.Tensor | None,
    after_loop: AfterLoop | None,
    policy: Backprop,
) -> torch.Tensor:
    """The loop region under the stack strategy. Rows that exit keep their state in x; only live rows loop."""

    def iteration(n: int, rows: torch.Tensor | None, h: torch.Tensor, e0: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if inject is not None and n > 0:
            h = inject(h, e0)
        if loop_embed is not None:
            h = h + gate_for(loop_embed, n)
        fx = h
        for i in range(cfg.loop_start, cfg.loop_end):
            fx = call(i, slot(cfg, n_loops, i, n), fx, rows)
        return update(cfg.loop_rule, h, fx, gate_for(gates, n)), h

    def new_state(n: int, rows: torch.Tensor | None, h: torch.Tensor, e0: torch.Tensor) -> torch.Tensor:
        return iteration(n, rows, h, e0)[0]

    e0 = x
    first_grad = 0 if policy.backprop_loops is None else max(n_loops - policy.backprop_loops, 0)
    live: torch.Tensor | None = None  # indices into x of the rows still looping; None: all of them
    for n in range(n_loops):
        state = x if live is None else x[live]
        e0_live = e0 if live is None or inject is None else e0[live]
        with torch.no_grad() if n < first_grad else nullcontext():
            if policy.checkpointing in ("loop", "nested") and n >= first_grad and after_loop is None:
                # partial binds n now: the recomputation in backward runs after the loop has moved on
                new = checkpoint(functools.partial(new_state, n, live), state, e0_live, use_reentrant=False)
                entered = None
            else:
                new, entered = iteration(n, live, state, e0_live)
        x = new if live is None else x.index_copy(0, live, new)
        if after_loop is None:
            continue
        exits = after_loop(LoopState(n, new, state, entered, live))
        if exits is True:
            break
        if exits is not None:
            live = (torch.arange(len(new), device=new.device) if live is None else live)[~exits]
            if len(live) == 0:
                break
    return x
