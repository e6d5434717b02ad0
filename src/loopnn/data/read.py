"""Prepared token files -> batches: TokenData (validated on open, O(1) in the token count) and its samplers.

    data = TokenData("data/shakespeare-bpe")                                 # validates everything up front
    x, y = data.train_batch(8, 256, generator)                               # random windows, repeatable
    for x, y in data.val_batches(8, 256, max_tokens=65536): ...              # fixed ordered stream

The last step of data preparation (sources -> encode -> write -> read).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loopnn.data.meta import check_meta
from loopnn.encoding import SHARDED_FORMAT_VERSION, token_dtype
from loopnn.errors import LoopnnError
from loopnn.jsonio import read_json
from loopnn.tokenizer import Tokenizer, get_tokenizer


class ShardedTokens:
    """Read-only concatenation of token shards: len(), slicing across shard boundaries, random windows."""

    def __init__(self, shards: list[np.ndarray]) -> None:
        self.shards = shards
        self.offsets = np.cumsum([0] + [len(t) for t in shards])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def dtype(self) -> np.dtype:
        return self.shards[0].dtype

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("ShardedTokens supports contiguous slices only")
        start, stop, _ = key.indices(len(self))
        parts = []
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        for i in range(max(first, 0), len(self.shards)):
            lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
            if lo >= stop:
                break
            parts.append(self.shards[i][max(start, lo) - lo : min(stop, hi) - lo])
        return np.concatenate(parts) if parts else np.zeros(0, dtype=self.dtype)

    def longest_shard(self) -> int:
        return max(len(t) for t in self.shards)

    def random_windows(self, seq_len: int, count: int, generator: torch.Generator) -> list[np.ndarray]:
        """`count` windows of seq_len + 1 tokens, each inside one shard, uniform over all such windows.

        Shards are weighted by their number of window starts (length - seq_len). With one shard this draws
        exactly what the single-file layout draws from the same generator.
        """
        starts = np.asarray([max(0, len(t) - seq_len) for t in self.shards])
        bounds = np.cumsum(starts)
        picks = torch.randint(0, int(bounds[-1]), (count,), generator=generator).numpy()
        shard = np.searchsorted(bounds, picks, side="right")
        local = picks - (bounds[shard] - starts[shard])
        return [self.shards[i][s : s + seq_len + 1] for i, s in zip(shard.tolist(), local.tolist())]


SCAN_BYTES = 16 << 20  # token files up to this size are scanned for bad ids when opened (a few milliseconds)


class TokenData:
    """Prepared token files, validated on construction, with a seeded batch sampler and a fixed val stream."""

    def __init__(self, data_dir: str | Path) -> None:
        self.data_dir = Path(data_dir)
        self.meta = self._read_meta()
        self.dtype = self._check_dtype()
        self.train = self._open_split("train")
        self.val = self._open_split("val")
        if self.tokenizer_name == "bpe" and not (self.data_dir / "tokenizer.json").is_file():
            raise self._fail(
                f"{self.data_dir / 'tokenizer.json'} is missing (the bpe token ids mean nothing without it)"
            )

    # ---- validation (every failure names the file and the fix)

    def _fail(self, what: str) -> LoopnnError:
        return LoopnnError(f"{what}; re-run `loopnn prepare <source> --out {self.data_dir} --overwrite`")

    def _read_meta(self) -> dict[str, Any]:
        path = self.data_dir / "meta.json"
        if not self.data_dir.is_dir():
            raise LoopnnError(f"data directory {self.data_dir} does not exist; run `loopnn prepare` first")
        if not path.is_file():
            raise self._fail(f"{path} is missing (no prepared data, or an interrupted prepare)")
        try:
            meta = read_json(path, "meta.json")
            check_meta(meta, str(path))
        except LoopnnError as e:
            raise self._fail(str(e)) from None
        return meta

    def _check_dtype(self) -> np.dtype:
        return token_dtype(self.meta["vocab_size"])  # check_meta has matched meta["dtype"] against it

    def _open_split(self, split: str) -> np.ndarray | ShardedTokens:
        if self.meta["format_version"] == SHARDED_FORMAT_VERSION:
            listed = self.meta["shards"][split]
            shards = [self._open_file(self.data_dir / e["file"], e["tokens"], 1) for e in listed]
            total = sum(len(t) for t in shards)
            if total != self.meta[f"{split}_tokens"]:
                said = self.meta[f"{split}_tokens"]
                raise self._fail(f"{split} shards hold {total} tokens but meta.json says {split}_tokens is {said}")
            if total < 2:
                raise self._fail(f"{split} shards hold {total} tokens, too few for even one (input, target) pair")
            return ShardedTokens(shards)
        return self._open_file(self.data_dir / f"{split}.bin", self.meta[f"{split}_tokens"], 2)

    def _open_file(self, path: Path, expected: int, min_tokens: int) -> np.ndarray:
        """Size checks and a memmap: O(1) in the token count, except that files up to SCAN_BYTES are scanned
        for ids outside the vocabulary (milliseconds). Larger files rely on the largest id recorded by prepare
        and on the check of every batch's ids when it is drawn (`_checked`)."""
        if not path.is_file():
            raise self._fail(f"{path} is missing")
        size, item = path.stat().st_size, self.dtype.itemsize
        if size % item:
            raise self._fail(f"{path} is {size} bytes, not a whole number of {self.dtype.name} tokens (truncated?)")
        if size // item != expected:
            raise self._fail(f"{path} holds {size // item} tokens but meta.json says {expected}")
        if expected < min_tokens:
            what = "even one (input, target) pair" if min_tokens == 2 else "a shard"
            raise self._fail(f"{path} holds {expected} tokens, too few for {what}")
        try:
            tokens = np.memmap(path, dtype=self.dtype, mode="r")
        except (OSError, ValueError) as e:
            raise self._fail(f"cannot map {path} ({e})") from None
        if size <= SCAN_BYTES:
            top = int(tokens.max())
            if top >= self.vocab_size:
                raise self._fail(f"{path} contains token id {top}, outside the vocabulary of {self.vocab_size}")
        return tokens

    def _checked(self, block: np.ndarray) -> np.ndarray:
        """A batch's ids checked against the vocabulary before they reach the embedding (an out-of-range id
        would index past it: an IndexError on CPU, a device assert on CUDA)."""
        if block.size and int(block.max()) >= self.vocab_size:
            raise self._fail(
                f"{self.data_dir} holds token id {int(block.max())}, outside the vocabulary of {self.vocab_size} "
                "(the token files changed after prepare)"
            )
        return block

    # ---- properties

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def tokenizer_name(self) -> str:
        return str(self.meta["tokenizer"])

    @property
    def val_bytes_per_token(self) -> float:
        """UTF-8 bytes per val token: bits/byte = loss / ln(2) / val_bytes_per_token."""
        return self.meta["val_bytes"] / self.meta["val_tokens"]

    def get_tokenizer(self) -> Tokenizer:
        return get_tokenizer(self.tokenizer_name, self.data_dir)

    def __repr__(self) -> str:
        return (
            f"TokenData({str(self.data_dir)!r}, tokenizer={self.tokenizer_name}, vocab_size={self.vocab_size}, "
            f"train={len(self.train):,}, val={len(self.val):,} tokens)"
        )

    # ---- batching

    def _check_window(self, split: str, tokens: np.ndarray, seq_len: int, batch_size: int) -> None:
        if seq_len < 1 or batch_size < 1:
            raise LoopnnError(f"batch_size={batch_size} and seq_len={seq_len} must both be at least 1")
        if seq_len + 1 > len(tokens):
            raise LoopnnError(
                f"{split} split of {self.data_dir} has {len(tokens)} tokens, "
                f"fewer than seq_len + 1 = {seq_len + 1}; "
                "use a shorter sequence length (block_size) or prepare more text"
            )
        if split == "train" and isinstance(tokens, ShardedTokens) and seq_len + 1 > tokens.longest_shard():
            raise LoopnnError(
                f"train shards of {self.data_dir} hold at most {tokens.longest_shard()} tokens each, fewer than "
                f"seq_len + 1 = {seq_len + 1} (windows stay inside a shard); use a shorter sequence length or "
                "prepare again with a larger --shard-tokens"
            )

    def _windows(self, tokens: np.ndarray, starts: Iterator[int] | list[int], seq_len: int):
        # B windows of T + 1 tokens -> x (B, T) inputs, y (B, T) next-token targets; int64 for nn.Embedding.
        block = self._checked(np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64))
        block = torch.from_numpy(block)
        return block[:, :-1].contiguous(), block[:, 1:].contiguous()

    def train_batch(
        self, batch_size: int, seq_len: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """batch_size random windows, drawn only from `generator`: saving its state resumes exactly."""
        self._check_window("train", self.train, seq_len, batch_size)
        if isinstance(self.train, ShardedTokens):
            block = np.stack(self.train.random_windows(seq_len, batch_size, generator)).astype(np.int64)
            block = torch.from_numpy(self._checked(block))
            return block[:, :-1].contiguous(), block[:, 1:].contiguous()
        starts = torch.randint(0, len(self.train) - seq_len, (batch_size,), generator=generator)
        return self._windows(self.train, starts.tolist(), seq_len)

    def val_batches(
        self, batch_size: int, seq_len: int, max_tokens: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The same ordered, non-overlapping windows from the start of val on every call.

        Window i covers targets val[i*T+1 : (i+1)*T+1], so each val token is a target at most once.
        max_tokens caps the number of targets (rounded down to whole windows, at least one); the last batch
        may be smaller.
        """
        self._check_window("val", self.val, seq_len, batch_size)
        n_windows = (len(self.val) - 1) // seq_len
        if max_tokens is not None:
            n_windows = min(n_windows, max(1, max_tokens // seq_len))
        for first in range(0, n_windows, batch_size):
            starts = [w * seq_len for w in range(first, min(first + batch_size, n_windows))]
            yield self._windows(self.val, starts, seq_len)
