"""Text -> token ids: the train/val split, encoding in batches, and a pool of encoding worker processes.

    train, val, how = split_documents(texts, val_fraction=0.1)       # every k-th whole document, or the tail
    ids = encode_documents(tok, train, np.uint16, progress, "train") # documents joined by separator_ids(tok)
    for task, (ids, lengths) in encode_in_workers(tasks, workers=2, tokenizer="gpt2"): ...   # streamed, in order

The second step of data preparation (sources -> encode -> write -> read).
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Iterator

import numpy as np
from tqdm import tqdm

from loopnn.data.hub import HubCorpus
from loopnn.encoding import BYTES_SEPARATOR, encoding_chunks
from loopnn.errors import LoopnnError
from loopnn.tokenizer import Tokenizer, get_tokenizer


def split_documents(texts: list[str], val_fraction: float) -> tuple[list[str], list[str], str]:
    """(train texts, val texts, "documents" | "tail"): see the module docstring for the rule."""
    if not 0.0 < val_fraction < 1.0:
        raise LoopnnError(f"val_fraction={val_fraction} must be between 0 and 1 (exclusive), e.g. 0.1")
    k = max(2, round(1.0 / val_fraction))
    is_val = [i % k == k - 1 for i in range(len(texts))]  # the k-th, 2k-th, ... document
    sizes = [len(t.encode("utf-8")) for t in texts]
    share = sum(n for n, v in zip(sizes, is_val) if v) / sum(sizes)
    if 0.5 * val_fraction <= share <= 2.0 * val_fraction:
        train = [t for t, v in zip(texts, is_val) if not v]
        return train, [t for t, v in zip(texts, is_val) if v], "documents"
    # Too few or too uneven documents: cut at a line start near the (1 - val_fraction) point of the whole text.
    total = sum(len(t) for t in texts)
    cut_at = int(total * (1.0 - val_fraction))
    train, val, seen = [], [], 0
    for t in texts:
        if seen + len(t) <= cut_at:
            train.append(t)
        elif seen >= cut_at:
            val.append(t)
        else:
            local = cut_at - seen
            newline = t.find("\n", local - 1)  # local - 1: a cut already at a line start stays put
            cut = newline + 1 if 0 <= newline < local + 4096 else local
            head, tail = t[:cut], t[cut:]
            if head:
                train.append(head)
            if tail:
                val.append(tail)
        seen += len(t)
    if not train or not val:
        raise LoopnnError("corpus is too small to split into train and val; give prepare more text")
    return train, val, "tail"


def encode_documents(tok: Tokenizer, texts: list[str], dtype: type, progress: bool, desc: str) -> np.ndarray:
    """Encode documents in batches and join them with the EOT token (bytes: a blank line)."""
    chunks = [(i, piece) for i, t in enumerate(texts) for piece in encoding_chunks(t)]
    sep = separator_ids(tok)
    parts: list[np.ndarray] = []
    batch = 64  # pieces per encode_batch call: enough to keep the tokenizers' thread pool busy
    total = sum(len(c) for _, c in chunks)
    with tqdm(total=total, desc=desc, unit="char", unit_scale=True, disable=not progress) as bar:
        for b in range(0, len(chunks), batch):
            group = chunks[b : b + batch]
            for j, ids in enumerate(tok.encode_batch([c for _, c in group]), start=b):
                if j > 0 and chunks[j - 1][0] != chunks[j][0]:  # first piece of every document but the first
                    parts.append(np.asarray(sep, dtype=dtype))
                parts.append(np.asarray(ids, dtype=dtype))
            bar.update(sum(len(c) for _, c in group))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def separator_ids(tok: Tokenizer) -> list[int]:
    """The ids between two documents: the EOT token, or for the bytes tokenizer (no EOT) a blank line."""
    return [tok.eot_id] if tok.eot_id is not None else tok.encode(BYTES_SEPARATOR)


def split_bytes(texts: list[str], separator: bool) -> int:
    """UTF-8 bytes a split's tokens stand for (for bits/byte): documents plus any text separators."""
    n = sum(len(t.encode("utf-8")) for t in texts)
    return n + (len(BYTES_SEPARATOR) * (len(texts) - 1) if separator else 0)


_worker_tok = None


def _init_worker(tokenizer: str) -> None:
    global _worker_tok
    _worker_tok = get_tokenizer(tokenizer)


def _encode_texts(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """All documents' ids back to back (int32) and each document's token count."""
    pieces, owner = [], []
    for i, text in enumerate(texts):
        for piece in encoding_chunks(text):
            pieces.append(piece)
            owner.append(i)
    lengths = np.zeros(len(texts), dtype=np.int64)
    parts = []
    for ids, i in zip(_worker_tok.encode_batch(pieces), owner):
        parts.append(np.asarray(ids, dtype=np.int32))
        lengths[i] += len(ids)
    return (np.concatenate(parts) if parts else np.zeros(0, np.int32)), lengths


def encode_in_workers(tasks: Iterator, workers: int, tokenizer: str) -> Iterator:
    """(task, (ids, lengths)) in order for tasks of (anything, texts), encoded by `workers` processes.

    At most 2 * workers tasks are in flight, so a stream is never read ahead far. ids are all documents' ids
    back to back (int32); lengths each document's token count.
    """
    fn = _encode_texts
    if workers <= 1:
        _init_worker(tokenizer)
        for task in tasks:
            yield task, fn(task[1])
        return
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        pending: deque = deque()
        for task in tasks:
            pending.append((task, pool.apply_async(fn, (task[1],))))
            if len(pending) >= 2 * workers:
                t, res = pending.popleft()
                yield t, res.get()
        while pending:
            t, res = pending.popleft()
            yield t, res.get()


# Text bytes per second: one tokenizing process (tiktoken already uses both cores a little) and each extra one,
# measured with gpt2 on Shakespeare (5 MB) on a shared 2-core AVX2 machine: 1.3 MB/s with 1, 1.6 MB/s with 2.
_RATE = {"gpt2": (1.3e6, 0.8e6), "bytes": (50e6, 25e6)}


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000
    return ""


def _fmt_seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


def estimate(
    source: str,
    total_bytes: float | None,
    spec: HubCorpus | None,
    tokenizer: str,
    workers: int,
    max_documents: int | None,
    max_bytes: int | None,
) -> tuple[str, float | None]:
    """A one-line size/time estimate and the number of text bytes the progress bar expects."""
    n = total_bytes
    docs = spec.documents if spec else None
    if n is not None and max_documents and docs and max_documents < docs:
        n = n * max_documents / docs
    if max_bytes:
        n = min(n, max_bytes) if n is not None else float(max_bytes)
    if n is None:
        return f"prepare {source}: size unknown; the progress bar shows the rate", None
    per_byte = (spec.gpt2_tokens / spec.text_bytes) if spec and spec.gpt2_tokens else 1 / 4.3
    tokens = n if tokenizer == "bytes" else n * per_byte
    one, each = _RATE.get(tokenizer, _RATE["gpt2"])
    rate = max(one, each * workers)
    line = (
        f"prepare {source}: ~{_fmt_bytes(n)} of text -> ~{tokens:,.3g} {tokenizer} tokens "
        f"(~{_fmt_bytes(tokens * 2)} on disk); at ~{rate / 1e6:.0f} MB/s with {workers} worker(s) "
        f"~{_fmt_seconds(n / rate)} (plus download time for hub corpora)"
    )
    return line, n
