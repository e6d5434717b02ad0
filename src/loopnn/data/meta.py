"""meta.json of a prepared data directory: one writer for both layouts and the checker TokenData runs on it.

A single train.bin / val.bin pair has format_version FORMAT_VERSION; sharded output (data/sharded.py) has
SHARDED_FORMAT_VERSION and adds its shard list and streaming settings. Every other field is the same.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from loopnn.atomic import atomic_write_text
from loopnn.encoding import FORMAT_VERSION, SHARDED_FORMAT_VERSION, token_dtype
from loopnn.errors import LoopnnError
from loopnn.jsonio import field
from loopnn.tokenizer import TOKENIZER_NAMES, Tokenizer


def check_meta(meta: dict[str, Any], where: str) -> None:
    """Every field of a prepared meta.json that loopnn reads, checked for type and range (LoopnnError otherwise).

    Fields loopnn never reads (e.g. `created`) are allowed and ignored; `max_token_id` is optional (data
    prepared before it was recorded stays readable).
    """
    version = field(meta, "format_version", "int", where, choices=(FORMAT_VERSION, SHARDED_FORMAT_VERSION))
    field(meta, "tokenizer", "str", where, choices=TOKENIZER_NAMES)
    vocab = field(meta, "vocab_size", "int", where, lo=2, hi=2**32)
    expected = token_dtype(vocab).name
    if field(meta, "dtype", "str", where) != expected:
        raise LoopnnError(f"{where}: field dtype is {meta['dtype']!r}, but vocab_size {vocab} needs {expected}")
    for split in ("train", "val"):
        field(meta, f"{split}_tokens", "int", where, lo=0, hi=2**62)
    field(meta, "val_bytes", "number", where, lo=1e-9)  # bits/byte divides by it
    field(meta, "train_bytes", "number", where, lo=0, default=None, nullable=True)
    field(meta, "eot_id", "int", where, lo=0, hi=vocab - 1, default=None, nullable=True)
    field(meta, "max_token_id", "int", where, lo=0, hi=vocab - 1, default=None, nullable=True)
    field(meta, "documents", "int", where, lo=0, default=None, nullable=True)
    field(meta, "val_fraction", "number", where, lo=0, hi=1, default=None, nullable=True)
    for key in ("source", "split", "source_sha256", "created", "layout", "format", "text_field"):
        field(meta, key, "str", where, default=None, nullable=True)
    if version != SHARDED_FORMAT_VERSION:
        return
    try:
        shards = field(meta, "shards", "object", where)
        for split in ("train", "val"):
            entries = field(shards, split, "list", f"{where} shards")
            if not entries:
                raise LoopnnError(f"{where}: shards.{split} lists no shard")
            for i, entry in enumerate(entries):
                at = f"{where} shards.{split}[{i}]"
                if not isinstance(entry, dict):
                    raise LoopnnError(f"{at} is not an object")
                name = field(entry, "file", "str", at)
                if not name or name != Path(name).name or name in (".", ".."):  # a bare file name, never a path
                    raise LoopnnError(f"{at}: field file must be a file name inside the data directory, got {name!r}")
                field(entry, "tokens", "int", at, lo=1, hi=2**62)
    except LoopnnError as e:
        raise LoopnnError(f"{e} (a sharded layout without a valid shard list)") from None


def write_meta(
    out: Path,
    *,
    format_version: int,
    tokenizer: str,
    tok: Tokenizer,
    source: str,
    documents: int,
    tokens: tuple[int, int],
    text_bytes: tuple[int, int],
    max_token_id: int | None,
    split: str,
    val_fraction: float,
    source_sha256: str,
    started: float,
    sharded: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write out/meta.json (atomically, last of a prepare's files) and return it.

    tokens and text_bytes are (train, val); text bytes are what bits/byte divides by. `sharded` holds the
    sharded layout's own fields (shard list, streaming settings).
    """
    meta: dict[str, Any] = {
        "format_version": format_version,
        "source": source,
        "documents": documents,
        "tokenizer": tokenizer,
        "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id,
        "dtype": token_dtype(tok.vocab_size).name,
        "train_tokens": tokens[0],
        "val_tokens": tokens[1],
        "train_bytes": text_bytes[0],
        "val_bytes": text_bytes[1],
        # None when resumed from shards written before it was recorded: TokenData then checks ids per batch
        "max_token_id": max_token_id,
        "split": split,  # "documents" (every k-th whole document) or "tail" (end of the text)
        "val_fraction": val_fraction,
        "source_sha256": source_sha256,
        **(sharded or {}),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "prepare_seconds": round(time.time() - started, 2),
    }
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    return meta
