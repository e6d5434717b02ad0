"""Large corpora: Hugging Face hub datasets and local text / jsonl / parquet, tokenized into sharded files.

    prepare("tinystories", "data/tinystories-gpt2", tokenizer="gpt2", workers=2, max_bytes=10**9)
    prepare("corpus/", "data/corpus-gpt2", tokenizer="gpt2", fmt="jsonl", text_field="text", shard_tokens=10**8)

`loopnn.data.prepare` sends a source here when it is a hub corpus (HUB_CORPORA, or `hf:owner/name[:config]`)
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

import gzip
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
from tqdm import tqdm

from loopnn.atomic import atomic_write_bytes, atomic_write_text
from loopnn.encoding import BYTES_SEPARATOR, SHARDED_FORMAT_VERSION, decode_text, encoding_chunks, token_dtype
from loopnn.errors import LoopnnError
from loopnn.jsonio import field, read_json

LOCAL_FORMATS = ("text", "jsonl", "parquet")
DEFAULT_SHARD_TOKENS = 100_000_000  # 200 MB uint16 files; one shard's tokens are held in memory while written
_BATCH_CHARS = 1 << 20  # characters of text per worker task
_BATCH_DOCS = 1024
# Auto-detected extensions; .json files (often one JSON array, not lines) are read only with --format jsonl.
_EXTENSIONS = {".txt": "text", ".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".parquet": "parquet"}
_INSTALL_HINT = "pip install 'loopnn[data]'"
# Text bytes per second: one tokenizing process (tiktoken already uses both cores a little) and each extra one,
# measured with gpt2 on Shakespeare (5 MB) on a shared 2-core AVX2 machine: 1.3 MB/s with 1, 1.6 MB/s with 2.
_RATE = {"gpt2": (1.3e6, 0.8e6), "bytes": (50e6, 25e6)}


@dataclass(frozen=True)
class HubCorpus:
    repo: str
    config: str | None = None
    split: str = "train"
    text_field: str = "text"
    documents: int | None = None  # approximate sizes, for the estimate printed before starting
    text_bytes: float | None = None
    gpt2_tokens: float | None = None
    val_fraction: float = 0.001  # default val share for this corpus (0.1 of a 10B-token corpus is wasteful)
    wikitext: bool = False  # rows are lines; articles start at " = Title = " lines


# Sizes are approximate public figures (dataset cards, nanoGPT's openwebtext counts), used only for estimates.
HUB_CORPORA: dict[str, HubCorpus] = {
    "openwebtext": HubCorpus("Skylion007/openwebtext", None, "train", "text", 8_013_769, 40e9, 9.04e9, 0.0005),
    "fineweb-edu": HubCorpus("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", "text", 9_670_000, 46e9, 10e9),
    "tinystories": HubCorpus("roneneldan/TinyStories", None, "train", "text", 2_119_719, 1.9e9, 4.7e8, 0.01),
    "wikitext-103": HubCorpus(
        "Salesforce/wikitext", "wikitext-103-raw-v1", "train", "text", 28_475, 5.4e8, 1.2e8, 0.01, wikitext=True
    ),
}


def is_hub_source(source: str) -> bool:
    return source in HUB_CORPORA or source.startswith("hf:")


def hub_corpus(source: str, text_field: str | None = None) -> HubCorpus:
    if source in HUB_CORPORA:
        spec = HUB_CORPORA[source]
    else:  # hf:owner/name[:config]
        repo, _, config = source[3:].partition(":")
        if not repo or "/" not in repo:
            raise LoopnnError(f"hub source {source!r} must look like hf:owner/name or hf:owner/name:config")
        spec = HubCorpus(repo, config or None)
    if text_field and text_field != spec.text_field:
        spec = HubCorpus(**{**spec.__dict__, "text_field": text_field})
    return spec


# ----------------------------------------------------------------------------- reachability


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_unreachable_reason(timeout: float = 1.0) -> str | None:
    """Why the hub cannot be used right now, or None. Costs at most ~timeout seconds (DNS included)."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if _env_true(var):
            return f"{var} is set"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    target = urlparse(proxy) if proxy else endpoint
    host, port = target.hostname or "huggingface.co", target.port or (443 if target.scheme != "http" else 80)
    result: list[str | None] = []

    def probe() -> None:  # in a thread: getaddrinfo ignores socket timeouts and can hang for many seconds
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as e:
            result.append(f"cannot connect to {host}:{port} ({e.strerror or e})")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.25)
    return result[0] if result else f"no answer from {host}:{port} within {timeout:.0f} s"


def _offline_help(source: str, spec: HubCorpus) -> str:
    return (
        f"to prepare {source} without the hub, download the files of https://huggingface.co/datasets/{spec.repo} "
        "(parquet or jsonl) on a connected machine and run "
        "`loopnn prepare path/to/folder --format parquet|jsonl|text --text-field text`"
    )


def check_hub(source: str, spec: HubCorpus, timeout: float = 1.0) -> None:
    reason = hub_unreachable_reason(timeout)
    if reason:
        raise LoopnnError(f"the Hugging Face hub is not reachable ({reason}); {_offline_help(source, spec)}")


# ----------------------------------------------------------------------------- row sources


def detect_format(path: Path, fmt: str | None) -> str:
    """The local format: `fmt` if given, else from the file's (or the folder's files') extension."""
    if fmt:
        if fmt not in LOCAL_FORMATS:
            raise LoopnnError(f"unknown format {fmt!r}; choose one of: {', '.join(LOCAL_FORMATS)}")
        return fmt
    names = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    found = {_EXTENSIONS[s] for p in names if (s := _suffix(p)) in _EXTENSIONS}
    if len(found) == 1:
        return found.pop()
    if path.is_file():
        return "text"  # any other single file is read as text, as before
    if not found:
        raise LoopnnError(f"folder {path} holds no .txt, .jsonl or .parquet files; point prepare at one that does")
    raise LoopnnError(f"folder {path} mixes {', '.join(sorted(found))} files; choose one with --format")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".jsonl.gz" if name.endswith(".jsonl.gz") else path.suffix.lower()


def local_files(path: Path, fmt: str) -> list[Path]:
    if path.is_file():
        return [path]
    wanted = {s for s, f in _EXTENSIONS.items() if f == fmt} | ({".json"} if fmt == "jsonl" else set())
    files = sorted(p for p in path.rglob("*") if p.is_file() and _suffix(p) in wanted)
    if not files:
        raise LoopnnError(f"folder {path} holds no {fmt} files; check the path or --format")
    return files


def _require_pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LoopnnError(f"reading parquet needs pyarrow (installed with datasets): {_INSTALL_HINT}") from None
    return pq


def _jsonl_rows(path: Path, text_field: str) -> Iterator[str]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = decode_text(raw, f"{path}:{lineno}")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise LoopnnError(f"{path}:{lineno} is not a JSON object ({e.msg}); one JSON object per line") from None
            if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                raise LoopnnError(
                    f"{path}:{lineno} has no string field {text_field!r}; name the text field with --text-field"
                )
            yield row[text_field].replace("\r\n", "\n")


def _parquet_rows(path: Path, text_field: str) -> Iterator[str]:
    pq = _require_pyarrow()
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for non-parquet files
        raise LoopnnError(f"cannot read {path} as parquet ({e})") from None
    if text_field not in pf.schema_arrow.names:
        raise LoopnnError(
            f"{path} has no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)}); use --text-field"
        )
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            yield (text or "").replace("\r\n", "\n")


def local_rows(path: Path, fmt: str, text_field: str) -> Iterator[str]:
    """Raw texts of a local file or folder: one per text file, jsonl line, or parquet row, in sorted file order."""
    for f in local_files(path, fmt):
        if fmt == "text":
            try:
                raw = f.read_bytes()
            except OSError as e:
                raise LoopnnError(f"cannot read {f}: {e.strerror}; check its permissions") from None
            yield decode_text(raw, str(f))
        elif fmt == "jsonl":
            yield from _jsonl_rows(f, text_field)
        else:
            yield from _parquet_rows(f, text_field)


def local_text_bytes(path: Path, fmt: str) -> float:
    """Rough text size for the estimate: file sizes (parquet is compressed: about 2.5x)."""
    total = sum(f.stat().st_size for f in local_files(path, fmt))
    return total * (2.5 if fmt == "parquet" else 1.0)


def hub_rows(source: str, spec: HubCorpus, skip: int) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise LoopnnError(f"hub corpora need the `datasets` package: {_INSTALL_HINT}") from None
    try:
        ds = datasets.load_dataset(spec.repo, spec.config, split=spec.split, streaming=True)
        if skip:
            ds = ds.skip(skip)
        for row in ds:
            text = row.get(spec.text_field)
            if not isinstance(text, str):
                raise LoopnnError(f"{spec.repo} rows have no string field {spec.text_field!r}; use --text-field")
            yield text
    except LoopnnError:
        raise
    except Exception as e:  # datasets/huggingface_hub raise many types (connection, 404, gated, script-based)
        raise LoopnnError(
            f"loading {spec.repo} from the hub failed ({type(e).__name__}: {e}); {_offline_help(source, spec)}"
        ) from None


_WIKITEXT_TITLE = re.compile(r"^ = [^=].* = \n?$")


def documents(rows: Iterator[str], start: int, wikitext: bool) -> Iterator[tuple[str, int]]:
    """(document, row index to resume from after it) for rows numbered from `start`."""
    if not wikitext:
        for i, text in enumerate(rows, start=start):
            yield text, i + 1
        return
    # WikiText rows are lines; an article runs from one " = Title = " line to the next.
    lines: list[str] = []
    first = start
    for i, line in enumerate(rows, start=start):
        if _WIKITEXT_TITLE.match(line) and lines:
            yield "".join(lines), i
            lines, first = [], i
        lines.append(line)
    if lines:
        yield "".join(lines), first + len(lines)


# ----------------------------------------------------------------------------- encoding in workers

_worker_tok = None


def _init_worker(tokenizer: str) -> None:
    global _worker_tok
    from loopnn.tokenizer import get_tokenizer

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


def _ordered_map(fn: Callable, tasks: Iterator, workers: int, tokenizer: str) -> Iterator:
    """(task, fn(task)) in order; at most 2 * workers tasks in flight, so a stream is never read ahead far."""
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


# ----------------------------------------------------------------------------- sharded prepare


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000
    return ""


def _fmt_seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


def _estimate(
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
    from loopnn.tokenizer import get_tokenizer

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
    for name, value in (
        ("workers", workers),
        ("shard_tokens", shard_tokens),
        ("max_documents", max_documents),
        ("max_bytes", max_bytes),
    ):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise LoopnnError(f"{name}={value!r} must be a positive whole number")

    if spec is not None:
        if fmt:
            raise LoopnnError(f"--format applies to local files, not the hub corpus {source!r}")
        resolved, fmt_used, field = source, "hub", spec.text_field
        total_bytes = spec.text_bytes
        if val_fraction is None:
            val_fraction = spec.val_fraction
    else:
        path = Path(source)
        if not path.exists():
            names = ", ".join(HUB_CORPORA)
            raise LoopnnError(
                f"corpus {source!r} not found: pass a file, a folder, a hub corpus ({names}) or hf:owner/name"
            )
        fmt_used = detect_format(path, fmt)
        field = text_field or "text"
        resolved = str(path.resolve())
        local_files(path, fmt_used)  # fail on an empty folder before touching out_dir
        total_bytes = local_text_bytes(path, fmt_used)
        if val_fraction is None:
            val_fraction = 0.1
    if not 0.0 < val_fraction < 1.0:
        raise LoopnnError(f"val_fraction={val_fraction} must be between 0 and 1 (exclusive), e.g. 0.1")
    k = max(2, round(1.0 / val_fraction))

    out = Path(out_dir)
    params = {
        "source": resolved,
        "format": fmt_used,
        "text_field": field,
        "tokenizer": tokenizer,
        "val_fraction": val_fraction,
        "shard_tokens": shard_tokens,
        "max_documents": max_documents,
        "max_bytes": max_bytes,
    }
    progress_path = out / "progress.json"
    if overwrite and out.is_dir():
        _clear(out)
    existing = [f.name for f in (out / "meta.json", out / "train.bin", out / "val.bin") if f.exists()]
    if existing:
        raise LoopnnError(
            f"{out} already holds prepared data ({', '.join(existing)}); pass overwrite=True (--overwrite) "
            "to replace it or choose another output directory"
        )
    shards: list[dict] = []
    if progress_path.is_file():
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

    dtype = token_dtype(tok.vocab_size)
    sep = np.asarray([tok.eot_id] if tok.eot_id is not None else tok.encode(BYTES_SEPARATOR), dtype=np.int32)
    sep_bytes = len(BYTES_SEPARATOR) if tok.eot_id is None else 0

    # Counters restored from the last finished shard; a resumed stream starts right after it.
    last = shards[-1] if shards else {"rows_end": 0, "docs_end": 0, "bytes_end": 0, "train_docs_end": 0}
    rows_end, docs, nbytes, train_docs = last["rows_end"], last["docs_end"], last["bytes_end"], last["train_docs_end"]
    val_docs = docs - train_docs
    if shards and shards[-1].get("final"):
        rows = iter(())  # everything was written; only meta.json is missing
    elif spec is not None:
        rows = hub_rows(source, spec, rows_end)
    else:
        rows = itertools.islice(local_rows(Path(source), fmt_used, field), rows_end, None)

    line, expect = _estimate(source, total_bytes, spec, tokenizer, workers, max_documents, max_bytes)
    if progress:
        print(line, file=sys.stderr)
        if shards:
            print(f"resuming: {len(shards)} shard(s) already written ({docs:,} documents)", file=sys.stderr)

    limit_hit = False

    def tasks() -> Iterator[tuple[list, list[str]]]:
        """Batches of (index, is_val, text bytes, row_end) + texts, stopping at the limits."""
        nonlocal limit_hit
        seen_docs, seen_bytes = docs, nbytes
        batch_meta, batch_texts, chars = [], [], 0
        for text, row_end in documents(rows, rows_end, spec.wikitext if spec else False):
            if (max_documents and seen_docs >= max_documents) or (max_bytes and seen_bytes >= max_bytes):
                limit_hit = True
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

    cur_train: list[np.ndarray] = []
    cur_val: list[np.ndarray] = []
    cur = {"train_tokens": 0, "train_bytes": 0, "val_bytes": 0, "docs": 0, "sha": hashlib.sha256()}

    def close_shard(final: bool) -> None:
        nonlocal cur_train, cur_val
        record = _save_shard(out, len(shards), dtype, cur_train, cur_val)
        record["train"]["bytes"], record["val"]["bytes"] = cur["train_bytes"], cur["val_bytes"]
        record.update(
            rows_end=rows_end,
            docs_end=docs,
            bytes_end=nbytes,
            train_docs_end=train_docs,
            sha256=cur["sha"].hexdigest(),
            final=final,
            limit_reached=final and limit_hit,
        )
        shards.append(record)
        atomic_write_text(progress_path, json.dumps({"params": params, "shards": shards}, indent=1) + "\n")
        cur_train, cur_val = [], []
        cur.update(train_tokens=0, train_bytes=0, val_bytes=0, docs=0, sha=hashlib.sha256())

    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(
        total=expect,
        initial=min(nbytes, expect or nbytes),
        desc=f"tokenize ({tokenizer})",
        unit="B",
        unit_scale=True,
        disable=not progress,
    )
    with bar:
        for (batch_meta, texts), (ids, lengths) in _ordered_map(_encode_texts, tasks(), workers, tokenizer):
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            for j, ((_, is_val, size, row_end), text) in enumerate(zip(batch_meta, texts)):
                doc_ids = ids[offsets[j] : offsets[j + 1]]
                cur["sha"].update(text.encode("utf-8") + b"\0")
                if is_val:
                    if val_docs:
                        cur_val.append(sep)
                    cur_val.append(doc_ids)
                    cur["val_bytes"] += size + (sep_bytes if val_docs else 0)
                    val_docs += 1
                else:
                    if train_docs:
                        cur_train.append(sep)
                        cur["train_tokens"] += len(sep)
                    cur_train.append(doc_ids)
                    cur["train_tokens"] += len(doc_ids)
                    cur["train_bytes"] += size + (sep_bytes if train_docs else 0)
                    train_docs += 1
                docs += 1
                nbytes += size
                rows_end = row_end
                cur["docs"] += 1
                if cur["train_tokens"] >= shard_tokens:
                    close_shard(final=False)
            bar.update(sum(m[2] for m in batch_meta))
            bar.set_postfix(shards=len(shards), docs=docs)
        if not (shards and shards[-1].get("final")):
            close_shard(final=True)  # the remainder, possibly empty: it marks the stream as finished

    train_list = [s["train"] for s in shards if s["train"]["file"]]
    val_list = [s["val"] for s in shards if s["val"]["file"]]
    if not train_list or not val_list:
        raise LoopnnError(
            f"corpus {source!r} gave {len(train_list)} train and {len(val_list)} val shards from {docs} documents; "
            f"val takes every {k}-th document, so give it more documents (or a larger --val-fraction)"
        )
    combined = hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest()
    meta = {
        "format_version": SHARDED_FORMAT_VERSION,
        "layout": "sharded",
        "source": resolved,
        "format": fmt_used,
        "text_field": field,
        "documents": docs,
        "tokenizer": tokenizer,
        "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id,
        "dtype": dtype.name,
        "train_tokens": sum(s["tokens"] for s in train_list),
        "val_tokens": sum(s["tokens"] for s in val_list),
        "train_bytes": sum(s["bytes"] for s in train_list),
        "val_bytes": sum(s["bytes"] for s in val_list),
        "split": "documents",
        "val_fraction": val_fraction,
        "shard_tokens": shard_tokens,
        "shards": {
            "train": [{"file": s["file"], "tokens": s["tokens"]} for s in train_list],
            "val": [{"file": s["file"], "tokens": s["tokens"]} for s in val_list],
        },
        "max_documents": max_documents,
        "max_bytes": max_bytes,
        "limit_reached": bool(shards[-1].get("limit_reached")),
        # None when resumed from shards written before it was recorded: TokenData then checks ids per batch
        "max_token_id": None
        if any("max_id" not in s for s in train_list + val_list)
        else max(s["max_id"] for s in train_list + val_list),
        "source_sha256": combined,  # sha256 of the shards' sha256s (each over its documents, NUL-terminated)
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "prepare_seconds": round(time.time() - started, 2),
        "workers": workers,
    }
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    return meta
