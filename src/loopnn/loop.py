"""The paper's mechanism: which blocks run in which order, and how each loop updates the hidden state.

Blocks [loop_start, loop_end) form the loop region F. Blocks before it (prelude) and after it (coda) run once.
Two strategies (PAPER.md, v3):
  stack: F = b_s..b_e-1 applied as a whole, N times:        x_n = update(x_{n-1}, F(x_{n-1}))
  layer: each block looped in place before the next one:     x <- update(x, b_i(x)), N times per block
Everything here is plain tensor code shared by training, evaluation, the KV-cached decoder and the analysis.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch

from loopnn.config import ModelConfig

BlockCall = Callable[[int, int, torch.Tensor], torch.Tensor]  # (block index, application slot, x) -> F_i(x)
Inject = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (state x, loop input e0) -> state for next loop


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


def schedule(cfg: ModelConfig, n_loops: int) -> list[tuple[int, int | None]]:
    """The forward pass as a list of (block index, loop index or None for prelude/coda blocks).

    Slot k of the KV cache belongs to the k-th entry. Its length is cfg.effective_depth(n_loops).
    """
    region = range(cfg.loop_start, cfg.loop_end)
    steps: list[tuple[int, int | None]] = [(i, None) for i in range(cfg.loop_start)]
    if cfg.loop_strategy == "stack":
        steps += [(i, n) for n in range(n_loops) for i in region]
    else:
        steps += [(i, n) for i in region for n in range(n_loops)]
    steps += [(i, None) for i in range(cfg.loop_end, cfg.n_layer)]
    return steps


def run(
    cfg: ModelConfig,
    x: torch.Tensor,
    n_loops: int,
    gates: torch.Tensor | None,
    call: BlockCall,
    loop_states: list[torch.Tensor] | None = None,
    inject: Inject | None = None,
    grad_loops: int | None = None,
    loop_embed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run prelude, loop region and coda on x (B, T, C). `call` applies one block; it owns caching/checkpointing.

    If `loop_states` is a list, the state after each complete loop is appended to it (stack strategy only:
    under the layer strategy no intermediate state has every block applied n times).
    inject (stack only): applied to (x, e0) before every loop after the first; e0 is the loop region's input.
    grad_loops (stack only): truncated backprop. Loops before the last `grad_loops` run under torch.no_grad, so
    no gradient flows through them (nor into the prelude, except through `inject`'s e0) and their activations
    are not kept. None: every loop carries gradient.
    loop_embed (n_loops, C): a vector added to the state before each loop (ModelConfig.loop_embedding).
    """
    slot = 0
    for i in range(cfg.loop_start):
        x = call(i, slot, x)
        slot += 1
    region = range(cfg.loop_start, cfg.loop_end)
    if cfg.loop_strategy == "stack":
        e0 = x
        first_grad = 0 if grad_loops is None else max(n_loops - grad_loops, 0)
        for n in range(n_loops):
            with torch.no_grad() if n < first_grad else nullcontext():
                if inject is not None and n > 0:
                    x = inject(x, e0)
                if loop_embed is not None:
                    x = x + gate_for(loop_embed, n)
                fx = x
                for i in region:
                    fx = call(i, slot, fx)
                    slot += 1
                x = update(cfg.loop_rule, x, fx, gate_for(gates, n))
            if loop_states is not None:
                loop_states.append(x)
    else:
        if inject is not None or grad_loops is not None:
            raise ValueError("input injection and truncated backprop need the stack strategy")
        for i in region:
            for n in range(n_loops):
                if loop_embed is not None:
                    x = x + gate_for(loop_embed, n)
                x = update(cfg.loop_rule, x, call(i, slot, x), gate_for(gates, n))
                slot += 1
    for i in range(cfg.loop_end, cfg.n_layer):
        x = call(i, slot, x)
        slot += 1
    return x
