"""Adaptive per-token looping: each token stops looping once its prediction has settled, and skips the rest.

`adaptive_step` decodes one new token per row through the KV cache. After each loop it applies ln_f + head to
the loop state (a logit lens; coda blocks, if any, are not applied for this check) and compares it with the
previous loop's: KL(p_n || p_{n-1}) ("kl"), |H(p_n) - H(p_{n-1})| ("entropy") or |x_n - x_{n-1}| / |x_n|
("hidden"); the state before the first loop counts as loop 0. A row whose value drops below `threshold`
(strictly, so threshold 0 never exits) after at least `min_loops` loops leaves the loop; the remaining rows are
gathered and only they run the next loop, so an early exit really saves its block applications.

Approximation (KV sharing, as in Huginn): a token that exited after loop m has no keys/values for loops
m+1..max. Its last computed entry of each looped block (loop m) is copied into the slots of the loops it
skipped, so later tokens that run those loops attend to it. Threshold 0 never exits and reproduces the fixed
max_loops model. Only the stack strategy has a per-token exit: under the layer strategy every block loops in
place, so there is no loop state with every block applied n times to read out.
`loopnn.adaptive_eval` scores a validation stream with adaptive looping (every position at once, or token by
token through `adaptive_step`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from loopnn import loop
from loopnn.errors import LoopnnError
from loopnn.flops import block_forward_flops, head_forward_flops
from loopnn.kvcache import KVCache, RowsKV, one_query_mask
from loopnn.model import LoopGPT
from loopnn.options import CRITERIA, AdaptiveConfig  # noqa: F401 - part of loopnn.adaptive's API


@dataclass
class DecodeStats:
    """Work actually executed by decode steps (every row-token counted once per block it ran through).

    tokens: token positions processed; loop_iterations: loops run, summed over tokens; block_applications:
    blocks run, summed over tokens; head_evaluations: ln_f+head applications (exit checks and outputs);
    flops: forward FLOPs as in loopnn.flops (matmuls + attention over the real context, heads included).
    prefill_tokens/prefill_flops: the prompt pass, always at full depth, kept apart.
    """

    tokens: int = 0
    loop_iterations: int = 0
    block_applications: int = 0
    head_evaluations: int = 0
    flops: int = 0
    prefill_tokens: int = 0
    prefill_flops: int = 0
    wall_time: float = 0.0
    exits: dict[int, int] = field(default_factory=dict)  # loops run -> number of tokens

    @property
    def mean_loops(self) -> float:
        return self.loop_iterations / self.tokens if self.tokens else 0.0


def check_adaptive(model: LoopGPT, adaptive: AdaptiveConfig, n_loops: int | None = None) -> int:
    """Validate that adaptive exit applies to this model; return the resolved max_loops."""
    cfg = model.config
    if cfg.loop_strategy != "stack":
        raise LoopnnError(
            "adaptive looping needs loop_strategy='stack': under 'layer' each block loops in place, so there is "
            "no per-loop state to exit from; use a fixed n_loops for this model"
        )
    if cfg.coda_injection:
        raise LoopnnError(
            "adaptive looping does not support coda_injection (an exiting row would skip the hand-over injection); "
            "use a fixed n_loops for this model"
        )
    max_loops = adaptive.max_loops or n_loops or cfg.n_loops
    if max_loops < adaptive.min_loops:
        raise LoopnnError(f"adaptive min_loops ({adaptive.min_loops}) exceeds max_loops ({max_loops})")
    return max_loops


def prepare_cache(model: LoopGPT, cache: KVCache, batch: int, n_loops: int) -> None:
    """Allocate every slot of n_loops for `batch` rows up front (KVCache.allocate, in the model's dtype/device)."""
    cache.allocate(model.config, batch, n_loops, next(model.parameters()))


def _readout(model: LoopGPT, h: torch.Tensor, criterion: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(what the exit criterion compares between loops, the raw logits it was read from) for h (A, 1, C)."""
    if criterion == "hidden":
        return None, None
    logits = model.logits(h[:, 0])  # (A, V)
    logp = F.log_softmax(logits.float(), dim=-1)
    if criterion == "kl":
        return logp, logits
    return -(logp.exp() * logp).sum(-1), logits  # entropy (A,)


def _distance(criterion: str, new: torch.Tensor | None, old: torch.Tensor | None, h, h_prev) -> torch.Tensor:
    if criterion == "kl":  # sum p_n (log p_n - log p_{n-1}) in one kernel; >= 0, where rounding can go below
        return F.kl_div(old, new, reduction="none", log_target=True).sum(-1).clamp_min_(0.0)
    if criterion == "entropy":
        return (new - old).abs()
    norm = torch.linalg.vector_norm  # not Tensor.norm: its Python wrapper costs more than the kernel here
    return norm(h - h_prev, dim=-1)[:, 0] / norm(h, dim=-1)[:, 0].clamp_min(1e-12)


@torch.no_grad()
def adaptive_step(
    model: LoopGPT,
    cache: KVCache,
    idx: torch.Tensor,
    adaptive: AdaptiveConfig,
    *,
    max_loops: int,
    positions: torch.Tensor | None = None,
    padding: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    stats: DecodeStats | None = None,
    row_loops: torch.Tensor | None = None,
    thresholds: Sequence[float] | None = None,
) -> torch.Tensor:
    """Decode one token per row (idx (B, 1)) at cache position cache.length, each row exiting on its own.

    The cache must hold slots for max_loops (see prepare_cache). padding (B, past + 1): 1 for real tokens.
    rows: LongTensor of the rows to compute (others, e.g. finished sequences, are skipped; their logits are 0).
    row_loops: optional (B,) long tensor; the loops each computed row ran are added to it (per-request usage).
    thresholds: optional, B floats: each row's own exit threshold in place of adaptive.threshold (so rows that
    differ only in threshold share one call).
    Returns logits (B, vocab) for the next token and advances cache.length by 1.

    Per-token overhead is kept to a few small ops: the exit bookkeeping is Python ints, a row that exits
    returns the logits its exit check already computed (kl and entropy; there is no coda to apply), and when
    every row exits at once there is no row indexing at all.
    """
    cfg = model.config
    B, pos = idx.shape[0], cache.length
    if pos + 1 > cache.max_len:
        raise LoopnnError(f"KV cache is full ({cache.max_len} positions)")
    last = pos if positions is None else int(positions.max())
    if last >= cfg.block_size:
        raise LoopnnError(f"position {last} exceeds block_size {cfg.block_size}")
    mask = one_query_mask(padding)  # (B, 1, 1, past + 1) or None
    outer = None if rows is None or len(rows) == B else rows  # None: every row, no gathers
    if outer is not None and len(outer) == 0:
        cache.advance(1)
        return torch.zeros(B, cfg.vocab_size, device=idx.device)
    n_rows = B if outer is None else len(outer)
    exit_hook = ExitHook(model, cache, adaptive, max_loops, pos, outer, n_rows)
    if thresholds is not None:
        exit_hook.threshold_list = list(thresholds) if outer is None else [thresholds[i] for i in outer.tolist()]
        exit_hook.thresholds = torch.tensor(exit_hook.threshold_list, device=idx.device)
    x = model.embed(idx, positions, pos)
    x = loop.run(
        cfg,
        x if outer is None else x[outer],  # (A, 1, C), A = rows computed
        max_loops,
        model.loop_gate,
        _rows_call(model, cache, mask, outer, pos),
        inject=model._inject(),
        loop_embed=model.loop_embed,
        after_loop=exit_hook,
    )
    out = exit_hook.output(x)  # (A, vocab)
    cache.advance(1)
    exit_hook.report(stats, row_loops, block_forward_flops(cfg, pos + 1), head_forward_flops(cfg))
    if outer is None:
        return out
    full = out.new_zeros(B, out.shape[-1])
    full[outer] = out
    return full


def _rows_call(
    model: LoopGPT, cache: KVCache, mask: torch.Tensor | None, outer: torch.Tensor | None, pos: int
) -> loop.BlockCall:
    """loop.run's block call for one decode position: rows index the computed rows, outer maps them to the batch."""
    blocks = model.transformer.h

    def call(i: int, slot: int, h: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        batch_rows = outer if rows is None else (rows if outer is None else outer[rows])
        rows_mask = mask if mask is None or batch_rows is None or mask.shape[0] == 1 else mask[batch_rows]
        return blocks[i](h, rows_mask, RowsKV(cache, slot, batch_rows, pos))

    return call


class ExitHook:
    """loop.run's after_loop hook for adaptive exit: the exit test, KV sharing for exited rows, the counters.

    Rows are indices into the computed rows (A = n_rows); `live` mirrors loop.run's (None: every row). cache
    None (adaptive_forward, a row per position): no KV sharing to do here.
    """

    def __init__(self, model, cache, adaptive, max_loops, pos, outer, n_rows):
        cfg = model.config
        self.model, self.cache, self.adaptive, self.max_loops = model, cache, adaptive, max_loops
        self.pos, self.outer, self.n_rows = pos, outer, n_rows
        self.loops = 0  # loops run by the rows still looping
        self.exited: list[tuple[torch.Tensor | None, int]] = []  # (rows, loops they ran); None: every row
        self.live: torch.Tensor | None = None
        self.all_out = False  # every row has exited
        self.one_copy = cache is not None and cache.region_intact(cfg, max_loops)
        # Without a coda the exit check's logits are the exited row's output: no second head for it.
        self.reuse = adaptive.criterion != "hidden" and cfg.loop_end == cfg.n_layer
        self.out: torch.Tensor | None = None  # (A, V) logits of the rows that exited (reuse)
        self.prev: torch.Tensor | None = None  # the previous loop's readout, for the rows still looping
        self.heads = 0  # ln_f + head applications: exit checks, then the outputs
        self.block_rows = n_rows * (cfg.n_layer - cfg.n_loop_blocks)
        self.thresholds: torch.Tensor | None = None  # (A,) per-row thresholds; None: adaptive.threshold
        self.threshold_list: list[float] = []  # the same as Python floats, for the one-row compare

    def _threshold(self, dtype: torch.dtype | None = None) -> float | torch.Tensor:
        """The exit threshold: the live row's float (dtype None: one live row, compared as a Python float as
        adaptive.threshold always is), or the live rows' (A_live,) in `dtype`."""
        if self.thresholds is None:
            return self.adaptive.threshold
        if dtype is None:
            return self.threshold_list[0 if self.live is None else int(self.live[0])]
        return (self.thresholds if self.live is None else self.thresholds[self.live]).to(dtype)

    def __call__(self, step: loop.LoopState) -> torch.Tensor | bool | None:
        cfg, ad, crit = self.model.config, self.adaptive, self.adaptive.criterion
        self.block_rows += len(step.x) * cfg.n_loop_blocks
        self.loops = step.n + 1
        if step.n == 0 and ad.min_loops <= 1 and self.max_loops > 1:
            self.prev = _readout(self.model, step.x_prev, crit)[0]  # loop 0: the loop region's input
            self.heads += self.n_rows if self.prev is not None else 0
        done = step.n + 1
        if done >= self.max_loops or done < ad.min_loops - 1:
            return None
        read, logits = _readout(self.model, step.x, crit)
        self.heads += len(step.x) if read is not None else 0
        if done < ad.min_loops:
            self.prev = read
            return None
        dist = _distance(crit, read, self.prev, step.x, step.x_in)
        if len(dist) == 1:  # one row (single-stream decoding): one scalar read instead of a compare and a count
            settled = None
            n_settled = int(dist.item() < self._threshold())
        else:
            settled = dist < self._threshold(dist.dtype)
            n_settled = int(torch.count_nonzero(settled))
        if n_settled == 0:
            self.prev = read
            return None
        if n_settled == len(step.x):  # every live row leaves: slices, no gathers
            self.exited.append((self.live, done))
            self._share_kv(step.n, self._batch_rows(self.live))
            self._keep(self.live, logits)
            self.all_out = True
            return True
        live = torch.arange(self.n_rows, device=settled.device) if self.live is None else self.live
        gone, self.live = live[settled], live[~settled]
        self.exited.append((gone, done))
        self._share_kv(step.n, self._batch_rows(gone))
        self._keep(gone, None if logits is None else logits[settled])
        self.prev = None if read is None else read[~settled]
        return settled

    def _batch_rows(self, rows: torch.Tensor | None) -> torch.Tensor | None:
        return self.outer if rows is None else (rows if self.outer is None else self.outer[rows])

    def _keep(self, rows: torch.Tensor | None, logits: torch.Tensor | None) -> None:
        if not self.reuse:
            return
        if rows is None:  # every row, at the first exit: the check's logits are the output as they are
            self.out = logits
            return
        if self.out is None:
            self.out = logits.new_empty(self.n_rows, logits.shape[-1])
        self.out[rows] = logits

    def output(self, x: torch.Tensor) -> torch.Tensor:
        """The (A, V) next-token logits: the kept ones of the rows that exited, ln_f + head for the others."""
        if self.out is None:  # nothing kept: no exits, or no reuse
            self.heads += self.n_rows
            return self.model.logits(x[:, 0])
        if not self.all_out:  # the rows that ran every loop
            rows = self.live
            self.heads += len(rows)
            self.out[rows] = self.model.logits(x[rows, 0])
        return self.out

    def _share_kv(self, n: int, gone: torch.Tensor | None) -> None:
        """KV sharing: the exited rows' loop-n entries stand in for the loops they skip (gone None: every row)."""
        if self.cache is not None:  # no cache (adaptive_forward): its stores keep the entries
            self.cache.share_exit(self.model.config, self.max_loops, n, gone, self.pos, self.one_copy)

    def report(self, stats: DecodeStats | None, row_loops: torch.Tensor | None, block_flops: int, head_flops: int):
        exits: dict[int, int] = {}  # loops run -> rows that exited there
        for rows, loops in self.exited:
            exits[loops] = exits.get(loops, 0) + (self.n_rows if rows is None else len(rows))
        exited = sum(exits.values())
        if row_loops is not None:
            loops_run = torch.full((self.n_rows,), self.loops, dtype=torch.long, device=row_loops.device)
            for rows, loops in self.exited:
                loops_run[slice(None) if rows is None else rows] = loops
            row_loops[slice(None) if self.outer is None else self.outer] += loops_run
        if stats is None:
            return
        stats.tokens += self.n_rows
        stats.loop_iterations += sum(k * c for k, c in exits.items()) + (self.n_rows - exited) * self.loops
        stats.block_applications += self.block_rows
        stats.head_evaluations += self.heads
        stats.flops += self.block_rows * block_flops + self.heads * head_flops
        if self.n_rows > exited:
            exits[self.loops] = exits.get(self.loops, 0) + self.n_rows - exited
        for k, c in exits.items():
            stats.exits[k] = stats.exits.get(k, 0) + c
