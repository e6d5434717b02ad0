"""The KV cache of a looped model, every operation on its tensors, and the left-padding bookkeeping around it.

A looped model caches each block application separately: one `KVSlot` per (loop, block) pair, numbered as
`loop.slot` numbers them. The decoder appends through `KVSlot.update`; adaptive exit writes a subset of rows at
one position (`RowsKV`) and copies an exited row's entries into the loops it skipped (`share_exit`); a serving
batch joins, drops and shifts left-padded rows (`join`, `select_rows`, `shift`); beam search keeps rows
(`select_rows`); speculative decoding rolls back (`rewind`). No other module indexes the cache's tensors.

Left padding: prompts of different lengths are right-aligned in one batch, and `padding` (B, S) is 1 on real
tokens and 0 on padding. `padding_mask` turns it into the attention mask, `positions_from_padding` into each
row's positions (0 at its first real token).
"""

from __future__ import annotations

import torch

from loopnn import loop
from loopnn.config import ModelConfig
from loopnn.errors import LoopnnError


def left_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (idx (B, T), padding (B, T)) with padding on the left; padding is 1 on real tokens."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise LoopnnError("every prompt needs at least one token (got an empty prompt or no prompts)")
    T = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    padding = torch.zeros(len(prompts), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        idx[b, T - len(p) :] = torch.tensor(p, dtype=torch.long)
        padding[b, T - len(p) :] = 1
    return idx, padding


def positions_from_padding(padding: torch.Tensor) -> torch.Tensor:
    """Per-row positions: 0 at each row's first real token (padding gets 0 too; it is never attended to)."""
    return (padding.long().cumsum(-1) - 1).clamp_min(0)


def padding_mask(T: int, past: int, padding: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """Boolean attention mask (B or 1, 1, T, past + T), True where attention is allowed, for T new queries after
    `past` cached positions; None for the plain causal case (SDPA then applies causality without a mask).

    padding: (B, past + T) with 1 for real tokens and 0 for (left) padding, or None.
    """
    if padding is not None and padding.shape[-1] != past + T:
        raise LoopnnError(f"padding has length {padding.shape[-1]}, expected past + new = {past + T}")
    if padding is not None and bool(padding.bool().all()):
        padding = None  # nothing padded: keep the fast path
    if padding is None and (past == 0 or T == 1):
        return None  # SDPA's is_causal fast path, or one new query that may see every key (decoding)
    rows = torch.arange(T, device=device)[:, None] + past
    cols = torch.arange(past + T, device=device)[None, :]
    mask = (cols <= rows)[None, None]  # (1, 1, T, past + T)
    if padding is not None:
        mask = mask & padding.bool()[:, None, None, :]
        # A padding query row would see no keys (NaN in SDPA); let it see itself. Its output is never used.
        mask = mask | (cols == rows)[None, None]
    return mask


def one_query_mask(padding: torch.Tensor | None) -> torch.Tensor | None:
    """The mask (B, 1, 1, past + 1) of one new, real position per row: causality is already implied, so it is
    the padding alone (None without padding: the new query sees every cached key)."""
    return None if padding is None else padding.bool()[:, None, None, :]


class KVSlot:
    """Keys/values of one block application (one (loop, block) pair) in a preallocated buffer."""

    def __init__(self, cache: KVCache):
        self.cache = cache
        self.k: torch.Tensor | None = None  # (B, nh, max_len, hs)
        self.v: torch.Tensor | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (B, nh, T, hs) at the cache's length; returns every cached key/value (B, nh, past + T, hs)."""
        start, T = self.cache.length, k.shape[2]
        if self.k is None:
            B, nh, _, hs = k.shape
            self.k = k.new_empty(B, nh, self.cache.max_len, hs)
            self.v = v.new_empty(B, nh, self.cache.max_len, hs)
        self.k[:, :, start : start + T] = k
        self.v[:, :, start : start + T] = v
        if start == 0:  # prefill: attend to the fresh (dense) keys/values, not a strided view of the buffer
            return k, v
        return self.k[:, :, : start + T], self.v[:, :, : start + T]


class RowsKV:
    """A KV slot seen by a subset of rows at one new position: writes their keys, returns their history."""

    def __init__(self, cache: KVCache, index: int, rows: torch.Tensor | None, pos: int):
        self.slot, self.rows, self.pos = cache.slot(index), rows, pos

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, p = self.slot, self.pos
        if self.rows is None:  # all rows: plain slices, no copies
            s.k[:, :, p : p + 1] = k
            s.v[:, :, p : p + 1] = v
            return s.k[:, :, : p + 1], s.v[:, :, : p + 1]
        # index_copy_/index_select: the same copies as advanced indexing, with less per-call overhead
        s.k[:, :, p].index_copy_(0, self.rows, k[:, :, 0])
        s.v[:, :, p].index_copy_(0, self.rows, v[:, :, 0])
        return s.k[:, :, : p + 1].index_select(0, self.rows), s.v[:, :, : p + 1].index_select(0, self.rows)


class KVCache:
    """One slot per block application: a looped model caches every loop's keys and values separately.

    `length` is the number of positions already cached; the model advances it after each forward call.
    `padding` (B, max_len): which cached positions are real, kept only by a batch of left-padded rows (`join`).
    """

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.length = 0
        self.slots: list[KVSlot] = []
        # allocate(): the loop region's slots as views of one tensor, so KV sharing is one copy
        self.region: torch.Tensor | None = None
        self.padding: torch.Tensor | None = None

    def slot(self, index: int) -> KVSlot:
        while len(self.slots) <= index:
            self.slots.append(KVSlot(self))
        return self.slots[index]

    def advance(self, T: int) -> None:
        """T more positions are cached (every slot of this forward call has written them)."""
        self.length += T

    def rewind(self, length: int) -> None:
        """Forget every position from `length` on (rejected speculative tokens); later writes overwrite them."""
        if not 0 <= length <= self.length:
            raise LoopnnError(f"cannot rewind a KV cache of length {self.length} to {length}")
        self.length = length

    # ---- adaptive exit: preallocated slots and KV sharing ----

    def allocate(self, cfg: ModelConfig, batch: int, n_loops: int, like: torch.Tensor) -> None:
        """Allocate every slot of n_loops for `batch` rows up front (zeros, so a skipped position is never
        garbage), in like's dtype and device.

        The loop region's slots are views of one tensor (L, 2 (k, v), n_loops, B, nh, max_len, hs), so the KV
        sharing of rows that exit is one copy per exit for every block and skipped loop together.
        """
        hs = cfg.n_embd // cfg.n_head
        if self.region is None and self.slot(loop.region_slots(cfg, n_loops, 0)[0]).k is None:
            self.region = like.new_zeros(cfg.n_loop_blocks, 2, n_loops, batch, cfg.n_head, self.max_len, hs)
            for n in range(n_loops):
                for j, s in enumerate(loop.region_slots(cfg, n_loops, n)):
                    self.slot(s).k, self.slot(s).v = self.region[j, 0, n], self.region[j, 1, n]
        for s in range(cfg.effective_depth(n_loops)):
            slot = self.slot(s)
            if slot.k is None:
                slot.k = like.new_zeros(batch, cfg.n_head, self.max_len, hs)
                slot.v = like.new_zeros(batch, cfg.n_head, self.max_len, hs)

    def region_intact(self, cfg: ModelConfig, n_loops: int) -> bool:
        """Whether the loop region's slots are still the views `allocate` made (a serving batch replaces them)."""
        region = self.region
        if region is None or region.shape[2] != n_loops:
            return False
        return all(
            self.slot(s).k._base is region and self.slot(s).v._base is region
            for n in range(n_loops)
            for s in loop.region_slots(cfg, n_loops, n)
        )

    def share_exit(
        self, cfg: ModelConfig, n_loops: int, n: int, rows: torch.Tensor | None, pos: int, one_copy: bool
    ) -> None:
        """KV sharing: rows that exited after loop n (0-based; None: every row) have no keys/values at position
        pos for loops n+1..n_loops-1; their loop-n entries of each looped block stand in for them.
        one_copy: the region is intact (`region_intact`), so every block and skipped loop is one copy."""
        if n + 1 >= n_loops:
            return
        rows = slice(None) if rows is None else rows
        if one_copy:  # (L, 2, skipped, gone, nh, hs)
            region = self.region[:, :, :, :, :, pos]  # (L, 2, n_loops, B, nh, hs)
            region[:, :, n + 1 :, rows] = region[:, :, n : n + 1, rows]
            return
        for j, s in enumerate(loop.region_slots(cfg, n_loops, n)):
            src = self.slot(s)
            for m in range(n + 1, n_loops):
                dst = self.slot(loop.region_slots(cfg, n_loops, m)[j])
                dst.k[rows, :, pos] = src.k[rows, :, pos]
                dst.v[rows, :, pos] = src.v[rows, :, pos]

    # ---- a batch whose rows come and go (serving, beam search) ----

    @property
    def rows(self) -> int:
        """Rows held by a batch built with `join` (0 before the first)."""
        return 0 if self.padding is None else self.padding.shape[0]

    def join(self, prefilled: KVCache) -> None:
        """Append the row of a batch-of-one cache (a prompt prefilled alone, every slot of this batch's depth),
        left-padded to this batch's length S; a prompt longer than S shifts every row right first."""
        P, S = prefilled.length, self.length
        if self.rows and P > S:
            self.shift(P - S)
            S = P
        if not self.rows:
            S = P
        for i, src in enumerate(prefilled.slots):
            dst = self.slot(i)
            _, nh, _, hs = src.k.shape
            k = src.k.new_zeros(1, nh, self.max_len, hs)
            v = src.v.new_zeros(1, nh, self.max_len, hs)
            k[:, :, S - P : S] = src.k[:, :, :P]
            v[:, :, S - P : S] = src.v[:, :, :P]
            dst.k = k if dst.k is None or not self.rows else torch.cat([dst.k, k])
            dst.v = v if dst.v is None or not self.rows else torch.cat([dst.v, v])
        device = prefilled.slots[0].k.device if prefilled.slots else None
        padding = torch.zeros(1, self.max_len, dtype=torch.long, device=device)
        padding[:, S - P : S] = 1
        self.padding = padding if self.padding is None else torch.cat([self.padding, padding])
        self.length = S

    def shift(self, d: int) -> None:
        """Move every row's cached positions d to the right (d > 0) or -d to the left (d < 0)."""
        S = self.length
        src, dst, n = (0, d, S) if d > 0 else (-d, 0, S + d)
        tensors = [(t, 2) for s in self.slots for t in (s.k, s.v)]
        if self.padding is not None:
            tensors.append((self.padding, 1))
        for t, dim in tensors:
            t.narrow(dim, dst, n).copy_(t.narrow(dim, src, n).clone())
        if self.padding is not None:
            if d > 0:
                self.padding[:, :d] = 0
            else:
                self.padding[:, S + d :] = 0
        self.length = S + d

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep these rows (LongTensor of row indices, in the new order): beams that survive, requests that stay.
        The slots become tensors of their own, no longer views of the loop region."""
        for slot in self.slots:
            if slot.k is not None:
                slot.k = slot.k.index_select(0, index.to(slot.k.device))
                slot.v = slot.v.index_select(0, index.to(slot.v.device))
        if self.padding is not None:
            self.padding = self.padding.index_select(0, index.to(self.padding.device))
        self.region = None

    def padding_for_step(self) -> torch.Tensor:
        """Mark the next position real in every row (each feeds one token); the padding (B, length + 1) to
        decode it with."""
        self.padding[:, self.length] = 1
        return self.padding[:, : self.length + 1]
