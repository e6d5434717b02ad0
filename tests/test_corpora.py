"""Local jsonl / parquet / text corpora, sharded output, resume, and the offline hub failure (all offline)."""

import json
import time

import numpy as np
import pytest
import torch

from loopnn import data as data_mod
from loopnn.data import TokenData, prepare, sharded
from loopnn.errors import LoopnnError

LINE = "Now is the winter of our discontent made glorious summer by this sun of York.\n"
DOCS = [f"Document {i}.\n" + LINE * (10 + i % 7) for i in range(30)]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def text_folder(path):
    path.mkdir(parents=True)
    for i, doc in enumerate(DOCS):
        (path / f"doc{i:02d}.txt").write_text(doc)
    return path


def jsonl_folder(path):
    path.mkdir(parents=True)
    for part in range(3):  # files read in sorted order: docs 0-9, 10-19, 20-29
        rows = [json.dumps({"id": i, "body": DOCS[i]}) for i in range(part * 10, part * 10 + 10)]
        (path / f"part{part}.jsonl").write_text("\n".join(rows) + "\n\n")  # a trailing blank line is skipped
    return path


def tokens(out, split):
    arr = TokenData(out).train if split == "train" else TokenData(out).val
    return np.asarray(arr[:])


def test_jsonl_and_text_give_the_same_tokens(tmp_path):
    single = prepare(str(text_folder(tmp_path / "txt")), tmp_path / "single", tokenizer="gpt2", progress=False)
    assert single["split"] == "documents"
    src = jsonl_folder(tmp_path / "jsonl")
    # Single-file layout from jsonl (in-memory path) and sharded layout (streaming path, 2 worker processes).
    prepare(str(src), tmp_path / "j1", tokenizer="gpt2", text_field="body", progress=False)
    meta = prepare(
        str(src), tmp_path / "j2", tokenizer="gpt2", text_field="body", workers=2, shard_tokens=300, progress=False
    )
    assert meta["format_version"] == data_mod.SHARDED_FORMAT_VERSION == sharded.SHARDED_FORMAT_VERSION
    assert meta["format"] == "jsonl" and meta["documents"] == 30 and len(meta["shards"]["train"]) > 3
    assert not (tmp_path / "j2" / "train.bin").exists() and (tmp_path / "j2" / "train-00000.bin").is_file()
    for split in ("train", "val"):
        want = tokens(tmp_path / "single", split)
        assert np.array_equal(tokens(tmp_path / "j1", split), want)
        assert np.array_equal(tokens(tmp_path / "j2", split), want)
    for key in ("train_tokens", "val_tokens", "train_bytes", "val_bytes", "vocab_size", "dtype", "eot_id"):
        assert meta[key] == single[key], key


def test_sharded_tokendata_batches(tmp_path):
    src = text_folder(tmp_path / "txt")
    prepare(str(src), tmp_path / "single", tokenizer="bytes", progress=False)
    meta = prepare(str(src), tmp_path / "one", tokenizer="bytes", shard_tokens=10**9, progress=False)
    assert len(meta["shards"]["train"]) == 1
    prepare(str(src), tmp_path / "many", tokenizer="bytes", shard_tokens=2000, progress=False)
    a, one, many = TokenData(tmp_path / "single"), TokenData(tmp_path / "one"), TokenData(tmp_path / "many")
    assert len(many.train.shards) > 3 and len(a.train) == len(many.train) and len(a.val) == len(many.val)
    # One shard draws exactly the single file's windows from the same generator.
    for seed in range(3):
        xa, ya = a.train_batch(4, 32, torch.Generator().manual_seed(seed))
        xo, yo = one.train_batch(4, 32, torch.Generator().manual_seed(seed))
        assert torch.equal(xa, xo) and torch.equal(ya, yo)
    # Many shards: deterministic, every window is a real slice of the concatenated stream, inside one shard.
    x1, y1 = many.train_batch(64, 16, torch.Generator().manual_seed(1))
    x2, _ = many.train_batch(64, 16, torch.Generator().manual_seed(1))
    assert torch.equal(x1, x2) and torch.equal(x1[:, 1:], y1[:, :-1])
    shards = {bytes(s.astype(np.uint8)) for s in many.train.shards}
    for row in torch.cat([x1, y1[:, -1:]], dim=1):
        window = bytes(row.numpy().astype(np.uint8))
        assert any(window in s for s in shards)
    # Val windows run across shard boundaries, same as the single file.
    for (xa, ya), (xm, ym) in zip(a.val_batches(3, 40), many.val_batches(3, 40), strict=True):
        assert torch.equal(xa, xm) and torch.equal(ya, ym)
    with pytest.raises(LoopnnError, match="larger --shard-tokens"):
        many.train_batch(1, many.train.longest_shard(), torch.Generator())


def test_sharded_validation(tmp_path):
    prepare(str(text_folder(tmp_path / "txt")), tmp_path / "out", tokenizer="bytes", shard_tokens=2000, progress=False)
    out = tmp_path / "out"
    raw = (out / "train-00001.bin").read_bytes()
    (out / "train-00001.bin").write_bytes(raw[:-2])
    with pytest.raises(LoopnnError, match="train-00001.bin holds .* tokens but meta.json says"):
        TokenData(out)
    (out / "train-00001.bin").unlink()
    with pytest.raises(LoopnnError, match="train-00001.bin is missing.*--overwrite"):
        TokenData(out)
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "shards": {"train": []}}))
    with pytest.raises(LoopnnError, match="shard list"):
        TokenData(out)
    with pytest.raises(LoopnnError, match="already holds prepared data"):
        prepare(str(tmp_path / "txt"), out, tokenizer="bytes", shard_tokens=2000, progress=False)


def test_resume_after_interruption(tmp_path, monkeypatch):
    src = jsonl_folder(tmp_path / "jsonl")
    args = dict(tokenizer="gpt2", text_field="body", shard_tokens=400, progress=False)
    full = prepare(str(src), tmp_path / "full", **args)

    real_save, calls = sharded._save_shard, []

    def save_then_die(*a, **kw):
        if len(calls) == 2:
            raise KeyboardInterrupt  # after two shards are on disk and recorded in progress.json
        calls.append(a[1])
        return real_save(*a, **kw)

    monkeypatch.setattr(sharded, "_save_shard", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare(str(src), tmp_path / "out", **args)
    out = tmp_path / "out"
    assert not (out / "meta.json").exists()
    assert len(json.loads((out / "progress.json").read_text())["shards"]) == 2
    with pytest.raises(LoopnnError, match="meta.json is missing"):
        TokenData(out)

    # Different settings refuse to mix with the unfinished run.
    monkeypatch.setattr(sharded, "_save_shard", real_save)
    with pytest.raises(LoopnnError, match="other settings"):
        prepare(str(src), out, **{**args, "shard_tokens": 500})

    # Rerun: the finished shards are skipped (their files untouched), the rest written; same output.
    written = []
    monkeypatch.setattr(sharded, "_save_shard", lambda *a, **kw: written.append(a[1]) or real_save(*a, **kw))
    stamps = {f.name: f.stat().st_mtime_ns for f in out.glob("*-0000[01].bin")}
    resumed = prepare(str(src), out, **{**args, "workers": 2})
    records = json.loads((tmp_path / "full" / "progress.json").read_text())["shards"]
    assert written == list(range(2, len(records)))
    assert {f.name: f.stat().st_mtime_ns for f in out.glob("*-0000[01].bin")} == stamps
    skip = ("created", "prepare_seconds", "workers")
    assert {k: v for k, v in resumed.items() if k not in skip} == {k: v for k, v in full.items() if k not in skip}
    for f in (tmp_path / "full").glob("*.bin"):
        assert (out / f.name).read_bytes() == f.read_bytes()


def test_parquet_folder(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow comes with `pip install 'loopnn[data]'`")
    import pyarrow.parquet as pq

    src = tmp_path / "pq"
    src.mkdir()
    for part in range(2):
        rows = DOCS[part * 15 : part * 15 + 15]
        pq.write_table(pa.table({"text": rows, "n": list(range(15))}), src / f"part{part}.parquet")
    single = prepare(str(text_folder(tmp_path / "txt")), tmp_path / "single", tokenizer="gpt2", progress=False)
    a = prepare(str(src), tmp_path / "a", tokenizer="gpt2", progress=False)  # detected by extension
    b = prepare(str(src), tmp_path / "b", tokenizer="gpt2", fmt="parquet", max_documents=1000, progress=False)
    assert b["format"] == "parquet" and b["limit_reached"] is False
    for split in ("train", "val"):
        want = tokens(tmp_path / "single", split)
        assert np.array_equal(tokens(tmp_path / "a", split), want)
        assert np.array_equal(tokens(tmp_path / "b", split), want)
    assert a["train_tokens"] == single["train_tokens"]
    with pytest.raises(LoopnnError, match="no column 'body'"):
        prepare(str(src), tmp_path / "c", tokenizer="gpt2", text_field="body", progress=False)


def test_limits(tmp_path):
    src = jsonl_folder(tmp_path / "jsonl")
    meta = prepare(str(src), tmp_path / "d", tokenizer="bytes", text_field="body", max_documents=20, progress=False)
    assert meta["documents"] == 20 and meta["limit_reached"] is True
    meta = prepare(str(src), tmp_path / "b", tokenizer="bytes", text_field="body", max_bytes=12000, progress=False)
    assert meta["limit_reached"] is True and 12000 <= meta["train_bytes"] + meta["val_bytes"] < 12000 + 2000


def test_local_errors(tmp_path):
    src = jsonl_folder(tmp_path / "jsonl")
    with pytest.raises(LoopnnError, match="no string field 'text'.*--text-field"):
        prepare(str(src), tmp_path / "o", tokenizer="bytes", progress=False)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(LoopnnError, match=r"bad.jsonl:2 is not a JSON object"):
        prepare(str(tmp_path / "bad.jsonl"), tmp_path / "o", tokenizer="bytes", progress=False)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.jsonl").write_text('{"text": "x"}\n')
    (mixed / "b.parquet").write_bytes(b"")
    with pytest.raises(LoopnnError, match="mixes jsonl, parquet.*--format"):
        prepare(str(mixed), tmp_path / "o", tokenizer="bytes", progress=False)
    with pytest.raises(LoopnnError, match="gpt2 or bytes"):
        prepare(str(src), tmp_path / "o", tokenizer="bpe", workers=2, progress=False)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", ["openwebtext", "fineweb-edu", "tinystories", "wikitext-103", "hf:someone/corpus"])
def test_hub_name_offline_fails_fast(tmp_path, name):
    start = time.perf_counter()
    with pytest.raises(LoopnnError) as err:
        prepare(name, tmp_path / "out", tokenizer="gpt2", progress=False)
    assert time.perf_counter() - start < 5.0  # generous: it returns in milliseconds
    msg = str(err.value)
    assert "HF_HUB_OFFLINE is set" in msg and "--format parquet|jsonl|text --text-field" in msg
    assert not (tmp_path / "out").exists()


def test_hub_unreachable_probe(monkeypatch):
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")  # the discard port: nothing listens
    start = time.perf_counter()
    reason = sharded.hub_unreachable_reason(timeout=1.0)
    assert time.perf_counter() - start < 5.0
    assert reason and "127.0.0.1:9" in reason


def test_wikitext_grouping():
    rows = ["", " = A = \n", " a1\n", " = = Sub = = \n", " a2\n", " = B = \n", " b1\n"]
    docs = list(sharded.documents(iter(rows), 0, wikitext=True))
    assert [d for d, _ in docs] == ["", " = A = \n a1\n = = Sub = = \n a2\n", " = B = \n b1\n"]
    assert [r for _, r in docs] == [1, 5, 7]
    resumed = list(sharded.documents(iter(rows[5:]), 5, wikitext=True))
    assert resumed == docs[2:]
