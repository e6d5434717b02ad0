"""A running batch for continuous batching: rows join and leave between decoding steps.

All rows of a `RowBatch` share one loop setting (a fixed n_loops, or one adaptive configuration, each row with its own
exit threshold), so they share the per-(loop, block) slot layout of one `KVCache`. Rows are left-padded to the batch's
common cache length S: a row whose t real tokens are cached holds them in positions [S - t, S) of every slot, the
cache's `padding` marks them, and `pos` is the row's own next position (so a padded row sees exactly what it would
see alone). A joining row is prefilled alone (batch of one, as `generate` does for a single prompt) and its
keys/values are copied in; a longer prompt than S shifts everyone right; a leaving row is dropped and the common
left padding is trimmed, so S always equals the longest row and never passes block_size. The cache operations
themselves (join, select_rows, shift) live in loopnn.kvcache.
"""

from __future__ import annotations

import torch

from loopnn.adaptive import AdaptiveConfig, adaptive_step
from loopnn.kvcache import KVCache
from loopnn.model import LoopGPT


class RowBatch:
    def __init__(self, model: LoopGPT, n_loops: int, adaptive: AdaptiveConfig | None = None):
        self.model, self.n_loops, self.adaptive = model, n_loops, adaptive
        self.max_len = model.config.block_size
        self.device = next(model.parameters()).device
        self.cache = KVCache(self.max_len)
        self.pos = torch.zeros(0, dtype=torch.long, device=self.device)
        # Each row's adaptive exit threshold: rows that differ only in threshold share this batch.
        self.thresholds: list[float] = []
        self.rows: list = []

    def __len__(self) -> int:
        return len(self.rows)

    @torch.no_grad()
    def prefill(self, prompt: list[int]) -> tuple[torch.Tensor, KVCache]:
        """Run one prompt alone at this batch's depth: (next-token logits (vocab,), its batch-of-one cache)."""
        cache = KVCache(len(prompt))
        idx = torch.tensor([prompt], dtype=torch.long, device=self.device)
        logits = self.model.decode(idx, cache, self.n_loops, last_only=True)
        return logits[0, -1], cache

    def add(self, row: object, prefilled: KVCache, threshold: float | None = None) -> None:
        """Append a row whose prompt was run by `prefill` (its cache holds every slot of this depth); an
        adaptive batch takes the row's own exit threshold (default: the batch config's)."""
        self.cache.join(prefilled)
        self.pos = torch.cat([self.pos, torch.tensor([prefilled.length], device=self.device)])
        if self.adaptive is not None:
            own = self.adaptive.threshold if threshold is None else threshold
            self.thresholds.append(own)
        self.rows.append(row)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed one token per row (B,); returns (next-token logits (B, vocab), loops each row ran (B,))."""
        padding = self.cache.padding_for_step()
        positions = self.pos.view(-1, 1)
        idx = tokens.view(-1, 1).to(self.device)
        if self.adaptive is not None:
            loops = torch.zeros(len(self.rows), dtype=torch.long, device=self.device)
            logits = adaptive_step(
                self.model, self.cache, idx, self.adaptive, max_loops=self.n_loops, positions=positions,
                padding=padding, row_loops=loops, thresholds=self.thresholds,
            )  # fmt: skip
        else:
            out = self.model.decode(idx, self.cache, self.n_loops, padding=padding, positions=positions)
            logits = out[:, -1]
            loops = torch.full((len(self.rows),), self.n_loops, dtype=torch.long, device=self.device)
        self.pos += 1
        return logits, loops

    def remove(self, indices: list[int]) -> None:
        """Drop these rows; trim the left padding that every remaining row shares."""
        gone = set(indices)
        keep = [i for i in range(len(self.rows)) if i not in gone]
        if not keep:
            self.__init__(self.model, self.n_loops, self.adaptive)
            return
        index = torch.tensor(keep, device=self.device)
        self.cache.select_rows(index)
        self.pos = self.pos[index]
        if self.adaptive is not None:
            self.thresholds = [self.thresholds[i] for i in keep]
        self.rows = [self.rows[i] for i in keep]
        lead = self.cache.length - int(self.pos.max())
        if lead > 0:
            self.cache.shift(-lead)
