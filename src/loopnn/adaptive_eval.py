"""Validation loss with adaptive per-token looping: `evaluate_adaptive(model, batches, AdaptiveConfig())`.

Every position of a window at once, loop by loop (`adaptive_forward`), or token by token through the KV cache
(`loopnn.adaptive.adaptive_step`, the decoding path); both exit each token on its own and share an exited
token's last keys/values with the loops it skipped, so they give the same numbers up to float rounding.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loopnn import loop
from loopnn.adaptive import AdaptiveConfig, DecodeStats, ExitHook, adaptive_step, check_adaptive, prepare_cache
from loopnn.errors import LoopnnError
from loopnn.evaluate import eval_mode
from loopnn.flops import block_forward_flops, head_forward_flops
from loopnn.kvcache import KVCache
from loopnn.model import LoopGPT

# evaluate_adaptive(parallel=True) runs as many rows of a batch at once as keep one (positions, vocab) fp32 tensor
# under this size; a few such tensors are alive at a time (readouts of two loops, the output logits).
PARALLEL_LOGITS_BYTES = 256 << 20


def _positions_call(model: LoopGPT, B: int, T: int) -> loop.BlockCall:
    """loop.run's block call for `adaptive_forward`: the state is (B*T, 1, C), one row per position.

    Prelude and coda blocks run on the whole (B, T) sequence, causally. A looped block runs its per-position
    work (norm, projections, MLP) on the rows still looping only; its attention reads a store, one per looped
    block, of every position's fused q/k/v, where the rows overwrite theirs at each loop and the others keep
    those of the last loop they ran (the KV sharing of decoding). adaptive_forward runs it in eval mode."""
    blocks, cfg = model.transformer.h, model.config
    stores: dict[int, torch.Tensor] = {}  # block index -> (B*T, 3C), for the looped blocks

    def call(i: int, slot: int, h: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        block = blocks[i]
        if not cfg.loop_start <= i < cfg.loop_end:
            return block(h.view(B, T, -1)).view(B * T, 1, -1)
        xl = h[:, 0]
        fresh = block.attn.c_attn(block.ln_1(xl))
        if rows is None:
            qkv = stores[i] = fresh
        else:
            qkv = stores[i]
            qkv.index_copy_(0, rows, fresh)
        y = block.attn.attend(qkv.view(B, T, -1), None, None).view(B * T, -1)
        xl = block.residual(xl, block.attn.c_proj(y if rows is None else y.index_select(0, rows)))
        return block.residual(xl, block.mlp(block.ln_2(xl)))[:, None]

    return call


@torch.no_grad()
def adaptive_forward(
    model: LoopGPT, idx: torch.Tensor, adaptive: AdaptiveConfig, max_loops: int, stats: DecodeStats | None = None
) -> torch.Tensor:
    """Teacher-forced logits (B, T, vocab) of adaptive looping, every position of idx (B, T) at once.

    The same computation as decoding idx token by token with `adaptive_step`, loop by loop instead of token by
    token: a position's exit depends only on its own states, and the keys/values it attends to at loop n are
    those of loop n for the positions still looping and, for a position that exited after loop m < n, its
    loop-m ones (KV sharing), all known once loop n has run for every position. Each position is a row of the
    loop driver, so the rows still looping are the only ones to run a loop's per-position work; attention runs
    over every position. Equal to the token-by-token path up to float rounding (a position whose distance
    sits on the threshold can exit a loop apart).
    """
    cfg = model.config
    B, T = idx.shape
    with eval_mode(model):  # no dropout anywhere (the looped blocks' per-position path has none)
        x = model.embed(idx).reshape(B * T, 1, -1)
        hook = ExitHook(model, None, adaptive, max_loops, 0, None, B * T)
        x = loop.run(
            cfg,
            x,
            max_loops,
            model.loop_gate,
            _positions_call(model, B, T),
            inject=model._inject(),
            loop_embed=model.loop_embed,
            after_loop=hook,
        )
        logits = hook.output(x).view(B, T, -1)
    if stats is not None:  # matmuls for the rows that ran; attention for every position at every loop run
        matmul = block_forward_flops(cfg, 0)
        attention = B * sum(block_forward_flops(cfg, t + 1) - matmul for t in range(T))
        applications = cfg.n_layer - cfg.n_loop_blocks + hook.loops * cfg.n_loop_blocks
        hook.report(stats, None, matmul, head_forward_flops(cfg))
        stats.flops += applications * attention
    return logits


@dataclass
class AdaptiveEval:
    """Teacher-forced val loss with adaptive looping, and the fixed max-loop model on the same tokens."""

    loss: float
    mean_loops: float
    executed_flops: int
    wall_time: float
    tokens: int
    max_loops: int
    fixed_loss: float | None = None
    fixed_flops: int | None = None
    fixed_wall_time: float | None = None
    stats: DecodeStats | None = None

    @property
    def loss_change(self) -> float | None:
        """Relative val-loss change vs the fixed model ((adaptive - fixed) / fixed)."""
        return None if self.fixed_loss is None else (self.loss - self.fixed_loss) / self.fixed_loss

    @property
    def loop_saving(self) -> float:
        return 1.0 - self.mean_loops / self.max_loops


@torch.no_grad()
def evaluate_adaptive(
    model: LoopGPT,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    adaptive: AdaptiveConfig,
    *,
    n_loops: int | None = None,
    compare_fixed: bool = True,
    parallel: bool = True,
) -> AdaptiveEval:
    """Val loss with adaptive looping over (x, y) batches of shape (B, T).

    Every token exits on its own; a later token attends to an early-exited one through KV sharing, exactly as
    in decoding. parallel: every position of a batch at once, loop by loop (`adaptive_forward`); False: token
    by token through the KV cache (`adaptive_step`, the decoding path; the same numbers up to float rounding).
    With compare_fixed, the same batches are also scored by the fixed max_loops model (one ordinary forward
    pass) for the loss change. Returns losses in nats/token.
    """
    max_loops = check_adaptive(model, adaptive, n_loops)
    stats = DecodeStats()
    nll, count = 0.0, 0
    fixed_nll, fixed_time, fixed_flops = 0.0, 0.0, 0
    with eval_mode(model):
        for x, y in batches:
            B, T = x.shape
            t0 = time.perf_counter()
            if parallel:  # rows are independent sequences: groups of them bound the (positions, vocab) tensors
                group = max(1, PARALLEL_LOGITS_BYTES // (T * model.config.padded_vocab_size * 4))
                for r in range(0, B, group):
                    logits = adaptive_forward(model, x[r : r + group], adaptive, max_loops, stats).flatten(0, 1)
                    nll += F.cross_entropy(logits.float(), y[r : r + group].flatten(), reduction="sum").item()
            else:
                cache = KVCache(T)
                prepare_cache(model, cache, B, max_loops)
                for t in range(T):
                    logits = adaptive_step(model, cache, x[:, t : t + 1], adaptive, max_loops=max_loops, stats=stats)
                    nll += F.cross_entropy(logits.float(), y[:, t], reduction="sum").item()
            stats.wall_time += time.perf_counter() - t0
            count += B * T
            if compare_fixed:
                t0 = time.perf_counter()
                logits, _ = model(x, n_loops=max_loops)
                fixed_nll += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").item()
                fixed_time += time.perf_counter() - t0
                # Causal attention over positions 1..T: the mean context is (T + 1) / 2 per token.
                depth = model.config.effective_depth(max_loops)
                fixed_flops += B * sum(
                    depth * block_forward_flops(model.config, t + 1) + head_forward_flops(model.config)
                    for t in range(T)
                )
    if count == 0:
        raise LoopnnError("evaluate_adaptive got no batches; check the validation data")
    return AdaptiveEval(
        loss=nll / count,
        mean_loops=stats.mean_loops,
        executed_flops=stats.flops,
        wall_time=stats.wall_time,
        tokens=count,
        max_loops=max_loops,
        fixed_loss=fixed_nll / count if compare_fixed else None,
        fixed_flops=fixed_flops if compare_fixed else None,
        fixed_wall_time=fixed_time if compare_fixed else None,
        stats=stats,
    )
