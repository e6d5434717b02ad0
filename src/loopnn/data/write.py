"""Token files on disk: `prepare` (the entry point of data preparation) and the single train.bin / val.bin layout.

    meta = prepare("shakespeare", "data/shakespeare-bpe", tokenizer="bpe")  # train/val.bin + meta.json

The third step of data preparation (sources -> encode -> write -> read). Hub corpora and the streaming options
go to loopnn.data.sharded.prepare_sharded instead; --overwrite builds beside the old data and swaps it in.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from loopnn.atomic import atomic_write_bytes, replace_dir
from loopnn.data import sharded
from loopnn.data.encode import encode_documents, split_bytes, split_documents
from loopnn.data.hub import is_hub_source
from loopnn.data.meta import write_meta
from loopnn.data.sources import BUILTIN_SOURCES, read_documents
from loopnn.encoding import FORMAT_VERSION, token_dtype
from loopnn.errors import LoopnnError
from loopnn.tokenizer import get_tokenizer, train_bpe

PREPARED_FILES = ("meta.json", "train.bin", "val.bin")


def prepare(
    source: str,
    out_dir: str | Path,
    tokenizer: str = "bytes",
    vocab_size: int = 8192,
    val_fraction: float | None = None,
    progress: bool = True,
    overwrite: bool = False,
    fmt: str | None = None,
    text_field: str | None = None,
    workers: int | None = None,
    shard_tokens: int | None = None,
    max_documents: int | None = None,
    max_bytes: int | None = None,
) -> dict[str, Any]:
    """Tokenize `source` into out_dir/{train.bin,val.bin,meta.json} (+ tokenizer.json for bpe); return meta.

    source: a text file, a folder of .txt files (recursive, sorted), "shakespeare" / "kjv" / "pydoc" / "pystdlib",
    or a local jsonl / parquet file or folder (fmt and text_field; detected by extension when fmt is None).
    tokenizer: "bytes", "gpt2", or "bpe" (trained here on the train split only, with `vocab_size`).
    val_fraction: None means 0.1 (hub corpora: a smaller per-corpus share, see loopnn.data.hub.HUB_CORPORA).
    Hub corpora (openwebtext, fineweb-edu, tinystories, wikitext-103, hf:owner/name[:config]) and any source
    given workers, shard_tokens, max_documents or max_bytes take the streaming path instead: parallel,
    resumable, sharded output (loopnn.data.sharded.prepare_sharded; val_fraction defaults per corpus there).
    """
    if overwrite and _holds_prepared(Path(out_dir)):
        # Build beside and swap in: a failure midway (full disk, Ctrl-C, a bad source) leaves the old data valid.
        args = dict(tokenizer=tokenizer, vocab_size=vocab_size, val_fraction=val_fraction, progress=progress)
        args |= dict(fmt=fmt, text_field=text_field, workers=workers, shard_tokens=shard_tokens)
        args |= dict(max_documents=max_documents, max_bytes=max_bytes)
        return _replace_prepared(Path(out_dir), lambda staging: prepare(source, staging, **args))
    streaming = (workers, shard_tokens, max_documents, max_bytes)
    if is_hub_source(source) or any(v is not None for v in streaming):
        limits = dict(workers=workers, shard_tokens=shard_tokens, max_documents=max_documents, max_bytes=max_bytes)
        return sharded.prepare_sharded(
            source, out_dir, tokenizer, val_fraction, fmt, text_field, progress=progress, overwrite=overwrite, **limits
        )
    return prepare_files(
        source,
        Path(out_dir),
        tokenizer,
        vocab_size,
        0.1 if val_fraction is None else val_fraction,
        progress,
        overwrite,
        fmt,
        text_field,
    )


def prepare_files(
    source: str,
    out: Path,
    tokenizer: str,
    vocab_size: int,
    val_fraction: float,
    progress: bool,
    overwrite: bool,
    fmt: str | None,
    text_field: str | None,
) -> dict[str, Any]:
    """The single-file layout: read every document, split, train a bpe if asked, encode, write; return meta."""
    existing = [f for f in (*PREPARED_FILES, "tokenizer.json") if (out / f).exists()]
    if existing and not overwrite:
        raise LoopnnError(
            f"{out} already holds prepared data ({', '.join(existing)}); pass overwrite=True (--overwrite) "
            "to replace it or choose another output directory"
        )
    if tokenizer != "bpe":
        get_tokenizer(tokenizer)  # fail on a bad name before reading (or downloading) anything
    started = time.time()
    texts = [t for _, t in read_documents(source, fmt, text_field)]
    source_hash = hashlib.sha256()
    for t in texts:  # NUL-terminated so moving text between documents changes the hash
        source_hash.update(t.encode("utf-8") + b"\0")
    train_texts, val_texts, split = split_documents(texts, val_fraction)
    tok = train_bpe(train_texts, vocab_size) if tokenizer == "bpe" else get_tokenizer(tokenizer)
    dtype = token_dtype(tok.vocab_size)
    train = encode_documents(tok, train_texts, dtype, progress, f"encode train ({tokenizer})")
    val = encode_documents(tok, val_texts, dtype, progress, f"encode val ({tokenizer})")
    _write_token_files(out, train, val)
    if tokenizer == "bpe":
        tok.save(out / "tokenizer.json")
    separator = tok.eot_id is None
    return write_meta(
        out,
        format_version=FORMAT_VERSION,
        tokenizer=tokenizer,
        tok=tok,
        source=source if source in BUILTIN_SOURCES else str(Path(source).resolve()),
        documents=len(texts),
        tokens=(int(train.size), int(val.size)),
        text_bytes=(split_bytes(train_texts, separator), split_bytes(val_texts, separator)),
        max_token_id=max(int(train.max(initial=0)), int(val.max(initial=0))),  # TokenData opens in O(1)
        split=split,
        val_fraction=val_fraction,
        source_sha256=source_hash.hexdigest(),
        started=started,
    )


def _write_token_files(out: Path, train: np.ndarray, val: np.ndarray) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LoopnnError(f"cannot create output directory {out}: {e.strerror}; choose a writable --out") from None
    # meta.json goes first and comes back last: a crash in between leaves a directory TokenData rejects,
    # never old metadata describing new token files.
    (out / "meta.json").unlink(missing_ok=True)
    (out / "tokenizer.json").unlink(missing_ok=True)
    for stale in [*out.glob("train-*.bin"), *out.glob("val-*.bin"), out / "progress.json"]:  # a sharded layout
        stale.unlink(missing_ok=True)
    atomic_write_bytes(out / "train.bin", train.tobytes())
    atomic_write_bytes(out / "val.bin", val.tobytes())


def _is_prepared_file(name: str) -> bool:
    """Files prepare writes (or leaves while writing): everything else in a data directory is the user's."""
    stem = name.lstrip(".").split(".tmp-")[0]
    return stem in (*PREPARED_FILES, "tokenizer.json", "progress.json") or (
        stem.endswith(".bin") and stem.startswith(("train-", "val-"))
    )


def _holds_prepared(out: Path) -> bool:
    return out.is_dir() and any(_is_prepared_file(p.name) for p in out.iterdir())


def _replace_prepared(out: Path, build) -> dict[str, Any]:
    """Run `build(staging)` into a sibling directory, then swap it in for `out` (atomic.replace_dir).

    Files of the user's own in `out` (anything prepare does not write) move over to the new directory.
    """
    for stray in out.parent.glob(f".{out.name}.prepare-*"):  # a killed overwrite's partial build
        if stray.is_dir() and all(_is_prepared_file(p.name) for p in stray.iterdir()):
            shutil.rmtree(stray, ignore_errors=True)
    staging = out.with_name(f".{out.name}.prepare-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        try:
            meta = build(staging)
        except LoopnnError as e:
            raise LoopnnError(f"{e} (while preparing beside {out}, which is unchanged)") from None
        replace_dir(staging, out)  # staging now holds the old data
        for entry in staging.iterdir():
            if not _is_prepared_file(entry.name) and not (out / entry.name).exists():
                os.replace(entry, out / entry.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return meta
