"""Large corpora: Hugging Face hub datasets and local text / jsonl / parquet, tokenized into sharded files.

    prepare("tinystories", "data/tinystories-gpt2", tokenizer="gpt2", workers=2, max_bytes=10**9)
    prepare("corpus/", "data/corpus-gpt2", tokenizer="gpt2", fmt="jsonl", text_field="text", shard_tokens=10**8)

`loopnn.data.prepare` sends a source here when it is a hub corpus (loopnn.data.hub, or `hf:owner/name[:config]`)
or when any streaming option (workers, shard_tokens, max_documents, max_bytes) is given. Documents are read as
a stream, encoded in a pool of worker processes, and written as shards:

    train-00000.bin val-00000.bin train-00001.bin ...   (tokens; the dtype of meta.json)
    progress.json                                       (finished shards; a rerun skips them)
    meta.json                                           (written last; lists every shard and its token count)

Concatenating the train (val) shards gives exactly the single-file layout's train.bin (val.bin) for the same
documents when its split is "documents": every k-th non-blank document (k = round(1 / val_fraction)) goes to
val, and documents of a split are joined by the EOT token (bytes: a blank line). A shard closes at the first
document boundary where its train part reaches shard_tokens, so shard boundaries depend only on the stream,
and a resumed run writes the same files as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from loopnn.atomic import atomic_write_bytes, atomic_write_text
from loopnn.data.encode import encode_in_workers, estimate, separator_ids
from loopnn.data.hub import (
    HUB_CORPORA,
    HubCorpus,
    hub_corpus,
    hub_rows,
    hub_unreachable_reason,
    is_hub_source,
    offline_help,
)
from loopnn.data.meta import write_meta
from loopnn.data.sources import LOCAL_FORMATS, detect_format, documents, local_files, local_rows, local_text_bytes
from loopnn.encoding import BYTES_SEPARATOR, SHARDED_FORMAT_VERSION, token_dtype
from loopnn.errors import LoopnnError
from loopnn.jsonio import field, read_json
from loopnn.tokenizer import get_tokenizer

DEFAULT_SHARD_TOKENS = 100_000_000  # 200 MB uint16 files; one shard's tokens are held in memory while written
_BATCH_CHARS = 1 << 20  # characters of text per worker task
_BATCH_DOCS = 1024


def check_hub(source: str, spec: HubCorpus, timeout: float = 1.0) -> None:
    reason = hub_unreachable_reason(timeout)
    if reason:
        raise LoopnnError(f"the Hugging Face hub is not reachable ({reason}); {offline_help(source, spec)}")


# ----------------------------------------------------------------------------- the source and its settings


@dataclass(frozen=True)
class _Stream:
    """A resolved streaming source: what is read and how (the settings a resumed run must match)."""

    source: str
    spec: HubCorpus | None  # None for a local file or folder
    resolved: str  # the hub name, or the local path made absolute
    fmt: str  # "hub", or one of LOCAL_FORMATS
    text_field: str
    total_bytes: float | None  # approximate text size, for the estimate
    val_fraction: float

    def rows(self, start: int) -> Iterator[str]:
        """Raw rows from row `start` on (a resumed run skips what its finished shards hold)."""
        if self.spec is not None:
            return hub_rows(self.source, self.spec, start)
        return itertools.islice(local_rows(Path(self.source), self.fmt, self.text_field), start, None)


def _resolve(
    source: str, spec: HubCorpus | None, fmt: str | None, text_field: str | None, val_fraction: float | None
) -> _Stream:
    if spec is not None:
        if fmt:
            raise LoopnnError(f"--format applies to local files, not the hub corpus {source!r}")
        fraction = spec.val_fraction if val_fraction is None else val_fraction
        stream = _Stream(source, spec, source, "hub", spec.text_field, spec.text_bytes, fraction)
    else:
        path = Path(source)
        if not path.exists():
            names = ", ".join(HUB_CORPORA)
            raise LoopnnError(
                f"corpus {source!r} not found: pass a file, a folder ({' / '.join(LOCAL_FORMATS)}), "
                f"a hub corpus ({names}) or hf:owner/name"
            )
        fmt_used = detect_format(path, fmt)
        local_files(path, fmt_used)  # fail on an empty folder before touching out_dir
        fraction = 0.1 if val_fraction is None else val_fraction
        size = local_text_bytes(path, fmt_used)
        stream = _Stream(source, None, str(path.resolve()), fmt_used, text_field or "text", size, fraction)
    if not 0.0 < stream.val_fraction < 1.0:
        raise LoopnnError(f"val_fraction={stream.val_fraction} must be between 0 and 1 (exclusive), e.g. 0.1")
    return stream


# ----------------------------------------------------------------------------- estimate, shards, progress


def _save_shard(out: Path, index: int, dtype: np.dtype, train: list[np.ndarray], val: list[np.ndarray]) -> dict:
    """Write one shard's files; the caller records it in progress.json only after both are on disk."""
    record: dict[str, Any] = {"index": index}
    for split, parts in (("train", train), ("val", val)):
        tokens = np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)
        name = f"{split}-{index:05d}.bin"
        if tokens.size:
            atomic_write_bytes(out / name, tokens.tobytes())
        record[split] = {"file": name if tokens.size else None, "tokens": int(tokens.size)}
        record[split]["max_id"] = int(tokens.max()) if tokens.size else 0  # meta.json max_token_id
    return record


def _check_progress(shards: Any, where: str) -> None:
    """The finished-shard records of progress.json, typed (a damaged file means: start again)."""
    if not isinstance(shards, list):
        raise LoopnnError(f"{where}: shards is not a list")
    for i, record in enumerate(shards):
        at = f"{where} shards[{i}]"
        if not isinstance(record, dict):
            raise LoopnnError(f"{at} is not an object")
        for key in ("rows_end", "docs_end", "bytes_end", "train_docs_end"):
            field(record, key, "int", at, lo=0, hi=2**62)
        for split in ("train", "val"):
            entry = field(record, split, "object", at)
            name = field(entry, "file", "str", f"{at}.{split}", nullable=True)
            if name is not None and name != Path(name).name:
                raise LoopnnError(f"{at}.{split}: file must be a bare file name, got {name!r}")
            field(entry, "tokens", "int", f"{at}.{split}", lo=0, hi=2**62)
            field(entry, "bytes", "int", f"{at}.{split}", lo=0, hi=2**62)
            field(entry, "max_id", "int", f"{at}.{split}", lo=0, hi=2**32, default=0)
        field(record, "sha256", "str", at)


def _clear(out: Path) -> None:
    for pattern in ("meta.json", "progress.json", "tokenizer.json", "train*.bin", "val*.bin"):
        for f in out.glob(pattern):
            f.unlink()


def _finished_shards(out: Path, params: dict[str, Any], overwrite: bool) -> list[dict]:
    """The records of shards an interrupted run with the same settings finished (progress.json), or []."""
    progress_path = out / "progress.json"
    if overwrite and out.is_dir():
        _clear(out)
    existing = [f.name for f in (out / "meta.json", out / "train.bin", out / "val.bin") if f.exists()]
    if existing:
        raise LoopnnError(
            f"{out} already holds prepared data ({', '.join(existing)}); pass overwrite=True (--overwrite) "
            "to replace it or choose another output directory"
        )
    if not progress_path.is_file():
        return []
    try:
        saved = read_json(progress_path, "progress.json")
        if saved["params"] != params:
            raise LoopnnError(
                f"{progress_path} is from an interrupted prepare with other settings ({saved['params']}); "
                "rerun with the same settings to resume, or pass --overwrite to start again"
            )
        shards = saved["shards"]
    except (OSError, ValueError, KeyError, TypeError):
        raise LoopnnError(f"{progress_path} is unreadable; pass --overwrite to start again") from None
    try:
        _check_progress(shards, str(progress_path))
    except LoopnnError as e:
        raise LoopnnError(f"{e}; pass --overwrite to start again") from None
    return shards


class _ShardWriter:
    """The shard being filled, the finished shards' records (progress.json) and the stream's counters.

    The counters (rows, documents, bytes, train documents) are restored from the last finished shard, so a
    resumed stream starts right after it and joins documents exactly as an uninterrupted run does.
    """

    def __init__(self, out: Path, params: dict[str, Any], shards: list[dict], tok, shard_tokens: int) -> None:
        self.out, self.params, self.shards, self.shard_tokens = out, params, shards, shard_tokens
        self.dtype = token_dtype(tok.vocab_size)
        self.sep = np.asarray(separator_ids(tok), dtype=np.int32)
        self.sep_bytes = len(BYTES_SEPARATOR) if tok.eot_id is None else 0
        last = shards[-1] if shards else {"rows_end": 0, "docs_end": 0, "bytes_end": 0, "train_docs_end": 0}
        self.rows_end, self.docs, self.nbytes = last["rows_end"], last["docs_end"], last["bytes_end"]
        self.train_docs = last["train_docs_end"]
        self.val_docs = self.docs - self.train_docs
        self._new_shard()

    def _new_shard(self) -> None:
        self.train: list[np.ndarray] = []
        self.val: list[np.ndarray] = []
        self.train_tokens = self.train_bytes = self.val_bytes = 0
        self.sha = hashlib.sha256()

    @property
    def finished(self) -> bool:
        """Every shard is written (an interrupted run that only lacks meta.json)."""
        return bool(self.shards and self.shards[-1].get("final"))

    def add(self, text: str, ids: np.ndarray, is_val: bool, size: int, row_end: int) -> None:
        """One document's ids (after the separator, unless it is its split's first); closes a full shard."""
        self.sha.update(text.encode("utf-8") + b"\0")
        if is_val:
            if self.val_docs:
                self.val.append(self.sep)
            self.val.append(ids)
            self.val_bytes += size + (self.sep_bytes if self.val_docs else 0)
            self.val_docs += 1
        else:
            if self.train_docs:
                self.train.append(self.sep)
                self.train_tokens += len(self.sep)
            self.train.append(ids)
            self.train_tokens += len(ids)
            self.train_bytes += size + (self.sep_bytes if self.train_docs else 0)
            self.train_docs += 1
        self.docs += 1
        self.nbytes += size
        self.rows_end = row_end
        if self.train_tokens >= self.shard_tokens:
            self.close(final=False)

    def close(self, final: bool, limit_hit: bool = False) -> None:
        """Write the shard's files, then record it in progress.json (a kill in between rewrites it on resume)."""
        record = _save_shard(self.out, len(self.shards), self.dtype, self.train, self.val)
        record["train"]["bytes"], record["val"]["bytes"] = self.train_bytes, self.val_bytes
        record.update(
            rows_end=self.rows_end,
            docs_end=self.docs,
            bytes_end=self.nbytes,
            train_docs_end=self.train_docs,
            sha256=self.sha.hexdigest(),
            final=final,
            limit_reached=final and limit_hit,
        )
        self.shards.append(record)
        progress = json.dumps({"params": self.params, "shards": self.shards}, indent=1) + "\n"
        atomic_write_text(self.out / "progress.json", progress)
        self._new_shard()


class _Batches:
    """Worker tasks: (per-document (index, is_val, text bytes, row_end), texts), stopping at the limits.

    Every k-th non-blank document goes to val; `limit_hit` says whether max_documents / max_bytes ended it.
    """

    def __init__(self, stream: _Stream, writer: _ShardWriter, k: int, max_documents, max_bytes) -> None:
        self.stream, self.k, self.max_documents, self.max_bytes = stream, k, max_documents, max_bytes
        self.rows = iter(()) if writer.finished else stream.rows(writer.rows_end)
        self.start, self.docs, self.nbytes = writer.rows_end, writer.docs, writer.nbytes
        self.limit_hit = False

    def __iter__(self) -> Iterator[tuple[list, list[str]]]:
        seen_docs, seen_bytes, k = self.docs, self.nbytes, self.k
        batch_meta, batch_texts, chars = [], [], 0
        wikitext = self.stream.spec.wikitext if self.stream.spec else False
        for text, row_end in documents(self.rows, self.start, wikitext):
            if (self.max_documents and seen_docs >= self.max_documents) or (
                self.max_bytes and seen_bytes >= self.max_bytes
            ):
                self.limit_hit = True
                break
            if not text.strip():  # blank documents are dropped, as in the single-file layout (row still counts)
                if batch_meta:
                    batch_meta[-1] = (*batch_meta[-1][:3], row_end)
                continue
            size = len(text.encode("utf-8"))
            batch_meta.append((seen_docs, seen_docs % k == k - 1, size, row_end))
            batch_texts.append(text)
            seen_docs += 1
            seen_bytes += size
            chars += len(text)
            if chars >= _BATCH_CHARS or len(batch_texts) >= _BATCH_DOCS:
                yield batch_meta, batch_texts
                batch_meta, batch_texts, chars = [], [], 0
        if batch_texts:
            yield batch_meta, batch_texts


# ----------------------------------------------------------------------------- sharded prepare


def prepare_sharded(
    source: str,
    out_dir: str | Path,
    tokenizer: str = "gpt2",
    val_fraction: float | None = None,
    fmt: str | None = None,
    text_field: str | None = None,
    workers: int | None = None,
    shard_tokens: int | None = None,
    max_documents: int | None = None,
    max_bytes: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Stream `source` into sharded token files in out_dir; resumes from progress.json. Returns meta."""
    started = time.time()
    if tokenizer == "bpe":
        raise LoopnnError(
            "the streaming/sharded path encodes with a fixed tokenizer (gpt2 or bytes); a trained bpe needs the "
            "whole corpus first: use --tokenizer gpt2, or prepare a local source without the streaming options"
        )
    spec = hub_corpus(source, text_field) if is_hub_source(source) else None
    if spec is not None:
        check_hub(source, spec)  # first of all: fail in about a second rather than letting datasets hang
    tok = get_tokenizer(tokenizer)  # also rejects unknown names before any reading
    workers = workers or 1
    shard_tokens = shard_tokens or DEFAULT_SHARD_TOKENS
    limits = dict(workers=workers, shard_tokens=shard_tokens, max_documents=max_documents, max_bytes=max_bytes)
    for name, value in limits.items():
        if value is not None and (not isinstance(value, int) or value < 1):
            raise LoopnnError(f"{name}={value!r} must be a positive whole number")
    stream = _resolve(source, spec, fmt, text_field, val_fraction)
    k = max(2, round(1.0 / stream.val_fraction))
    out = Path(out_dir)
    params = {"source": stream.resolved, "format": stream.fmt, "text_field": stream.text_field}
    params |= {"tokenizer": tokenizer, "val_fraction": stream.val_fraction, "shard_tokens": shard_tokens}
    params |= {"max_documents": max_documents, "max_bytes": max_bytes}
    writer = _ShardWriter(out, params, _finished_shards(out, params, overwrite), tok, shard_tokens)
    batches = _Batches(stream, writer, k, max_documents, max_bytes)

    line, expect = estimate(source, stream.total_bytes, spec, tokenizer, workers, max_documents, max_bytes)
    if progress:
        print(line, file=sys.stderr)
        if writer.shards:
            print(
                f"resuming: {len(writer.shards)} shard(s) already written ({writer.docs:,} documents)", file=sys.stderr
            )
    out.mkdir(parents=True, exist_ok=True)
    initial = min(writer.nbytes, expect or writer.nbytes)
    bar = tqdm(
        total=expect, initial=initial, desc=f"tokenize ({tokenizer})", unit="B", unit_scale=True, disable=not progress
    )
    with bar:
        for (batch_meta, texts), (ids, lengths) in encode_in_workers(iter(batches), workers, tokenizer):
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            for j, ((_, is_val, size, row_end), text) in enumerate(zip(batch_meta, texts)):
                writer.add(text, ids[offsets[j] : offsets[j + 1]], is_val, size, row_end)
            bar.update(sum(m[2] for m in batch_meta))
            bar.set_postfix(shards=len(writer.shards), docs=writer.docs)
        if not writer.finished:
            writer.close(final=True, limit_hit=batches.limit_hit)  # the remainder, possibly empty: marks the end
    return _write_sharded_meta(out, stream, tok, writer, k, limits, started)


def _write_sharded_meta(
    out: Path, stream: _Stream, tok, writer: _ShardWriter, k: int, limits: dict[str, Any], started: float
) -> dict[str, Any]:
    shards = writer.shards
    train_list = [s["train"] for s in shards if s["train"]["file"]]
    val_list = [s["val"] for s in shards if s["val"]["file"]]
    if not train_list or not val_list:
        raise LoopnnError(
            f"corpus {stream.source!r} gave {len(train_list)} train and {len(val_list)} val shards from "
            f"{writer.docs} documents; val takes every {k}-th document, so give it more documents "
            "(or a larger --val-fraction)"
        )
    recorded = all("max_id" in s for s in train_list + val_list)  # not by shards written before it was
    sharded = {
        "layout": "sharded",
        "format": stream.fmt,
        "text_field": stream.text_field,
        "shard_tokens": limits["shard_tokens"],
        "shards": {
            "train": [{"file": s["file"], "tokens": s["tokens"]} for s in train_list],
            "val": [{"file": s["file"], "tokens": s["tokens"]} for s in val_list],
        },
        "max_documents": limits["max_documents"],
        "max_bytes": limits["max_bytes"],
        "limit_reached": bool(shards[-1].get("limit_reached")),
        "workers": limits["workers"],
    }
    return write_meta(
        out,
        format_version=SHARDED_FORMAT_VERSION,
        tokenizer=writer.params["tokenizer"],
        tok=tok,
        source=stream.resolved,
        documents=writer.docs,
        tokens=(sum(s["tokens"] for s in train_list), sum(s["tokens"] for s in val_list)),
        text_bytes=(sum(s["bytes"] for s in train_list), sum(s["bytes"] for s in val_list)),
        max_token_id=max(s["max_id"] for s in train_list + val_list) if recorded else None,
        split="documents",
        val_fraction=stream.val_fraction,
        # sha256 of the shards' sha256s (each over its documents, NUL-terminated)
        source_sha256=hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest(),
        started=started,
        sharded=sharded,
    )
