"""The six ways issue 12 found to lose a run or report a wrong result, each reproduced and shown fixed.

1. checkpoints pruned and picked in text order past step 9,999,999; 2. meta.json fields checked only when first
used; 3. two `train` processes on one run directory; 4. `prepare --overwrite` failing midway; 5. `import`
writing what loopnn then refuses; 6. a stop request during a multi-run command (demo, ablation).
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from loopnn import LoopGPT, ModelConfig, TrainConfig, preset
from loopnn import checkpoint as ckpt
from loopnn.cli import main
from loopnn.data import TokenData, prepare
from loopnn.errors import LoopnnError

TEXT = "".join(f"line {i}: the loop runs the same blocks again, {i * i} times over.\n" for i in range(200))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "corpus.txt").write_text(TEXT)
    out = root / "bytes"
    prepare(str(root / "corpus.txt"), out, tokenizer="bytes", progress=False)
    return out


def train_argv(data, run, max_steps=2, **flags):
    argv = ["train", "--preset", "debug", "--data-dir", str(data), "--out-dir", str(run)]
    base = dict(batch_size=2, seq_len=16, warmup_steps=1, eval_interval=0, eval_tokens=64, log_interval=1)
    for k, v in (base | dict(max_steps=max_steps) | flags).items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return argv + ["--no-progress", "--device", "cpu"]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# ----------------------------------------------------------------------------- 1. numeric step order


def renumber(ckpt_dir: Path, step: int) -> Path:
    """Move a checkpoint to step-N (7-digit padding, as save_checkpoint names it) and fix its recorded step."""
    meta = json.loads((ckpt_dir / "checkpoint.json").read_text())
    meta["step"] = step
    (ckpt_dir / "checkpoint.json").write_text(json.dumps(meta))
    target = ckpt_dir.parent / f"step-{step:07d}"
    os.replace(ckpt_dir, target)
    return target


def test_checkpoints_past_step_ten_million_are_listed_pruned_and_resumed_in_step_order(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_argv(data_dir, run, max_steps=2, ckpt_interval=1)) == 0
    first, second = ckpt.list_checkpoints(run)
    old, new = renumber(first, 9_999_999), renumber(second, 10_000_000)
    assert sorted(p.name for p in (old, new)) == ["step-10000000", "step-9999999"]  # text order is wrong
    assert ckpt.list_checkpoints(run) == [old, new]
    assert ckpt.latest_checkpoint(run) == new
    assert ckpt.resolve_checkpoint(run) == new  # what eval and generate load

    # Resume one step past 10M: the run continues from the newest checkpoint and pruning (keep 2) deletes
    # the oldest, never the newest.
    assert main(train_argv(data_dir, run, max_steps=10_000_001, keep_checkpoints=2) + ["--resume"]) == 0
    assert "step 10000000" in capsys.readouterr().out
    names = [p.name for p in ckpt.list_checkpoints(run)]
    assert names == ["step-10000000", "step-10000001"]
    assert ckpt.read_meta(ckpt.latest_checkpoint(run))["info"]["kind"] == "final"


def test_latest_checkpoint_skips_and_reports_a_damaged_newest_one(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_argv(data_dir, run, max_steps=2, ckpt_interval=1)) == 0
    older, newest = ckpt.list_checkpoints(run)
    (newest / "checkpoint.json").write_text("[" * 100_000)  # RecursionError in a naive reader
    skipped: list[str] = []
    assert ckpt.latest_checkpoint(run, skipped) == older
    assert len(skipped) == 1 and "nested too deeply" in skipped[0]
    capsys.readouterr()
    assert ckpt.resolve_checkpoint(run) == older
    err = capsys.readouterr().err
    assert "skipped a damaged checkpoint" in err and str(newest) in err
    (older / "checkpoint.json").write_text('{"step": ' + "9" * 5000 + "}")  # ValueError in a naive reader
    assert main(["eval", str(run), "--device", "cpu"]) == 2
    assert "holds no valid checkpoint" in one_line_error(capsys)
    # --resume over a run whose every checkpoint is damaged refuses instead of silently starting again
    assert main(train_argv(data_dir, run, max_steps=3) + ["--resume"]) == 2
    assert "none usable" in one_line_error(capsys)


# ----------------------------------------------------------------------------- 2. meta.json validated up front


def copy_data(data_dir: Path, tmp_path: Path, **changes) -> Path:
    d = tmp_path / "data"
    shutil.copytree(data_dir, d)
    meta = json.loads((d / "meta.json").read_text())
    for k, v in changes.items():
        if v is KeyError:
            meta.pop(k, None)
        else:
            meta[k] = v
    (d / "meta.json").write_text(json.dumps(meta))
    return d


@pytest.mark.parametrize(
    "changes",
    [
        dict(val_bytes=0),
        dict(val_bytes="20000"),
        dict(val_bytes=None),
        dict(val_bytes=float("nan")),
        dict(val_bytes=-5),
        dict(train_tokens="20000"),
        dict(val_tokens=True),
        dict(format_version="1"),
        dict(tokenizer=7),
        dict(tokenizer="sentencepiece"),
        dict(eot_id=1000),
        dict(eot_id="x"),
        dict(max_token_id=256),
        dict(max_token_id=-1),
        dict(vocab_size=10**30),
        dict(train_bytes=[1]),
        dict(val_fraction=2.0),
        dict(documents=-1),
    ],
    ids=lambda c: ",".join(f"{k}={v!r}" for k, v in c.items()),
)
def test_every_meta_json_field_is_checked_before_a_run_directory_exists(data_dir, tmp_path, changes, capsys):
    d = copy_data(data_dir, tmp_path, **changes)
    key = next(iter(changes))
    with pytest.raises(LoopnnError, match=f"{key}.*loopnn prepare"):
        TokenData(d)
    run = tmp_path / "run"
    assert main(train_argv(d, run)) == 2
    err = one_line_error(capsys)
    assert key in err
    assert not run.exists()
    with pytest.raises(LoopnnError, match=key):  # the library entry point too, not only the CLI
        from loopnn.train import train

        train(ModelConfig(**preset("debug")), TrainConfig(data_dir=str(d), out_dir=str(run), progress=False))
    assert not run.exists()


def test_meta_json_shard_entries_may_not_name_paths(data_dir, tmp_path):
    meta = json.loads((data_dir / "meta.json").read_text())
    entries = {s: [{"file": f"{s}.bin", "tokens": meta[f"{s}_tokens"]}] for s in ("train", "val")}
    for bad_file in ("../../etc/passwd", "/etc/passwd", "", 5, None):
        d = copy_data(data_dir, tmp_path / str(abs(hash(str(bad_file)))), format_version=2, shards=entries)
        (d / "meta.json").write_text((d / "meta.json").read_text().replace('"train.bin"', json.dumps(bad_file)))
        with pytest.raises(LoopnnError, match="file"):
            TokenData(d)


# ----------------------------------------------------------------------------- O(1) open of token data


def sparse_data(tmp_path: Path, tokens: int, record_max: bool) -> Path:
    d = tmp_path / "big"
    d.mkdir()
    with open(d / "train.bin", "wb") as f:
        f.truncate(tokens * 2)  # uint16 zeros, no disk blocks
    np.arange(4096, dtype=np.uint16).__mod__(256).astype(np.uint16).tofile(d / "val.bin")
    meta = dict(
        format_version=1, tokenizer="bytes", vocab_size=256, dtype="uint16", train_tokens=tokens, val_tokens=4096,
        train_bytes=tokens, val_bytes=4096, eot_id=None,
    )  # fmt: skip
    if record_max:
        meta["max_token_id"] = 255
    (d / "meta.json").write_text(json.dumps(meta))
    return d


@pytest.mark.parametrize("record_max", [True, False], ids=["max_token_id recorded", "prepared by loopnn <= 0.x"])
def test_opening_two_gigabytes_of_tokens_reads_none_of_them(tmp_path, record_max):
    d = sparse_data(tmp_path, 1 << 30, record_max)  # 2 GiB of uint16 tokens
    t0 = time.perf_counter()
    data = TokenData(d)
    took = time.perf_counter() - t0
    assert took < 0.5, f"opening took {took:.2f} s: the token file was read"
    assert len(data.train) == 1 << 30
    x, y = data.train_batch(2, 16, torch.Generator().manual_seed(0))
    assert x.shape == (2, 16) and int(x.max()) == 0


def test_an_id_outside_the_vocabulary_is_caught_when_its_batch_is_drawn(tmp_path):
    d = sparse_data(tmp_path, 1 << 24, record_max=False)  # 32 MiB: above the size scanned at open
    with open(d / "train.bin", "r+b") as f:
        f.seek(1000 * 2)
        f.write(np.array([300], dtype=np.uint16).tobytes())  # id 300 >= vocab 256
    data = TokenData(d)  # opening does not read the file
    with pytest.raises(LoopnnError, match="token id 300.*loopnn prepare"):
        data._windows(data.train, [990], 16)
    vocab_is_fine = TokenData(d)
    x, _ = vocab_is_fine._windows(vocab_is_fine.train, [5000], 16)  # a window elsewhere reads fine
    assert int(x.max()) == 0


def test_prepare_records_the_largest_token_id(data_dir):
    meta = json.loads((data_dir / "meta.json").read_text())
    ids = np.concatenate([np.fromfile(data_dir / f"{s}.bin", dtype=np.uint16) for s in ("train", "val")])
    assert meta["max_token_id"] == int(ids.max())


# ----------------------------------------------------------------------------- 3. one train per run directory


def test_a_second_train_on_a_run_directory_is_refused_and_a_killed_holder_leaves_no_stale_lock(
    data_dir, tmp_path, capsys
):
    run = tmp_path / "run"
    argv = train_argv(data_dir, run, max_steps=1_000_000, ckpt_interval=1, keep_checkpoints=3)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(ckpt.__file__).parents[1]))
    first = subprocess.Popen([sys.executable, "-m", "loopnn", *argv], env=env, stdout=subprocess.DEVNULL)
    try:
        deadline = time.time() + 900  # importing torch alone can take a minute on a loaded machine
        while not ckpt.list_checkpoints(run):
            assert first.poll() is None, "the first train exited early"
            assert time.time() < deadline, "the first train wrote no checkpoint in time"
            time.sleep(0.05)
        assert f"pid {first.pid}" in (run / ".lock").read_text()
        config = (run / "config.json").read_bytes()
        for extra in (["--overwrite"], ["--resume"]):  # --overwrite used to delete the live run's checkpoints
            assert main(train_argv(data_dir, run, max_steps=3) + extra) == 2
            err = one_line_error(capsys)
            assert f"in use by another loopnn train (pid {first.pid}" in err, err
        assert first.poll() is None  # the first run goes on, its files untouched
        assert ckpt.list_checkpoints(run) and (run / "config.json").read_bytes() == config
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert f"pid {first.pid}" in (run / ".lock").read_text()  # left behind by the killed holder
    assert main(train_argv(data_dir, run, max_steps=3) + ["--overwrite"]) == 0  # not stale: the kernel freed it
    assert ckpt.read_meta(ckpt.latest_checkpoint(run))["step"] == 3


# ----------------------------------------------------------------------------- 4. prepare --overwrite


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}


@pytest.mark.parametrize("fault", ["disk full on val.bin", "Ctrl-C while encoding"])
def test_a_failed_prepare_overwrite_leaves_the_old_data_valid(tmp_path, monkeypatch, capsys, fault):
    (tmp_path / "a.txt").write_text(TEXT)
    (tmp_path / "b.txt").write_text(TEXT.replace("loop", "LOOP") * 2)
    out = tmp_path / "data"
    assert main(["prepare", str(tmp_path / "a.txt"), "--out", str(out)]) == 0
    (out / "NOTES.md").write_text("mine")  # a user's file in the data directory
    before = snapshot(out)
    import loopnn.data.write as data_mod

    if fault.startswith("disk"):
        real = data_mod.atomic_write_bytes

        def full_disk(path, payload):
            if Path(path).name == "val.bin":
                raise LoopnnError(f"could not write {path}: No space left on device; check free space")
            real(path, payload)

        monkeypatch.setattr(data_mod, "atomic_write_bytes", full_disk)
        expected = 2
    else:

        def interrupted(*a, **k):
            raise KeyboardInterrupt

        monkeypatch.setattr(data_mod, "encode_documents", interrupted)
        expected = 130
    capsys.readouterr()
    assert main(["prepare", str(tmp_path / "b.txt"), "--out", str(out), "--overwrite"]) == expected
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if expected == 2:
        assert "No space left" in err.splitlines()[-1] and f"{out}, which is unchanged" in err
    monkeypatch.undo()
    assert snapshot(out) == before  # byte for byte the data that was there
    TokenData(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt", "data"]  # no staging left
    # and a successful overwrite replaces the data, keeping the user's own file
    assert main(["prepare", str(tmp_path / "b.txt"), "--out", str(out), "--overwrite"]) == 0
    assert (out / "NOTES.md").read_text() == "mine"
    assert TokenData(out).meta["train_tokens"] > json.loads(before["meta.json"])["train_tokens"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt", "data"]


# ----------------------------------------------------------------------------- 5. import writes only what loads


@pytest.fixture
def exported(tmp_path):
    lh = pytest.importorskip("loopnn.hf")
    cfg = ModelConfig(**preset("debug"))
    ckpt.save_checkpoint(tmp_path / "src", 7, LoopGPT(cfg), cfg, {"data_dir": "data/x"}, info={"tokens": 5})
    return lh.export_hf(tmp_path / "src", tmp_path / "hf")


@pytest.mark.parametrize(
    "change",
    [
        dict(step=-1),
        dict(step="7"),
        dict(step=10**19),
        dict(train_config={"data_dir": 5}),
        dict(train_config={"seq_len": -3}),
        dict(train_config=[1]),
        dict(info=[1]),
        dict(info={"tokens": "many"}),
    ],
    ids=lambda c: ",".join(f"{k}={v!r}" for k, v in c.items()),
)
def test_import_refuses_what_eval_and_train_would_refuse(exported, tmp_path, change, capsys):
    meta = json.loads((exported / "loopnn.json").read_text())
    (exported / "loopnn.json").write_text(json.dumps(meta | change))
    capsys.readouterr()
    assert main(["import", str(exported), "--out", str(tmp_path / "run")]) == 2
    err = one_line_error(capsys)
    assert next(iter(change)) in err or "step" in err, err
    assert ckpt.list_checkpoints(tmp_path / "run") == []  # nothing written


def test_import_output_passes_the_checks_eval_runs(exported, tmp_path, capsys):
    assert main(["import", str(exported), "--out", str(tmp_path / "run")]) == 0
    last = ckpt.latest_checkpoint(tmp_path / "run")
    assert last is not None and last.name == "step-0000007"
    model, meta = ckpt.load_model(tmp_path / "run")
    assert meta["train_config"]["data_dir"] == "data/x"


@pytest.mark.parametrize("bad", ['{"weight_map": {"a": "../../etc/passwd"}}', '{"weight_map": [1]}', "[" * 5000])
def test_a_safetensors_index_may_not_name_files_outside_its_directory(exported, tmp_path, bad, capsys):
    (exported / "model.safetensors").unlink()
    (exported / "model.safetensors.index.json").write_text(bad)
    capsys.readouterr()
    assert main(["import", str(exported), "--out", str(tmp_path / "run")]) == 2
    assert "model.safetensors.index.json" in one_line_error(capsys)


def test_a_failed_export_leaves_the_previous_export_intact(exported, tmp_path, monkeypatch, capsys):
    from loopnn.hf.modeling import LoopnnForCausalLM

    before = snapshot(exported)
    real = LoopnnForCausalLM.save_pretrained

    def full_disk(self, path, *a, **k):
        real(self, path, *a, **k)
        (Path(path) / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(LoopnnForCausalLM, "save_pretrained", full_disk)
    capsys.readouterr()
    assert main(["export", str(tmp_path / "src"), "--out", str(exported)]) == 2
    assert "No space left on device" in one_line_error(capsys)
    assert snapshot(exported) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp directory left
    monkeypatch.undo()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("x")
    assert main(["export", str(tmp_path / "src"), "--out", str(tmp_path / "mine")]) == 2
    assert "not an empty directory" in one_line_error(capsys)
    assert main(["export", str(tmp_path / "src"), "--out", str(exported)]) == 0  # replacing an export is fine


# ----------------------------------------------------------------------------- 6. a stop ends the whole demo


def signal_on_first_batch(monkeypatch, signum):
    """Deliver a real `signum` to this process while the first training step runs (inside train's loop)."""
    real = TokenData.train_batch
    sent = []

    def train_batch(self, *a, **k):
        if not sent:
            sent.append(signum)
            os.kill(os.getpid(), signum)
        return real(self, *a, **k)

    monkeypatch.setattr(TokenData, "train_batch", train_batch)


def small_plan(data: Path, out: Path) -> list:
    """A demo-style plan of three tiny models (the demo's own sizes take minutes on a loaded 2-core box)."""
    plan = []
    for name, n_loops in (("base", 1), ("loop", 3), ("deeper", 1)):
        mc = ModelConfig(**(preset("debug") | dict(n_loops=n_loops, block_size=16)))
        tc = TrainConfig(
            data_dir=str(data), out_dir=str(out / name), max_steps=3, batch_size=2, seq_len=16, warmup_steps=1,
            eval_interval=0, eval_tokens=64, log_interval=1, progress=False, device="cpu",
        )  # fmt: skip
        plan.append((name, mc, tc))
    return plan


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_request_ends_a_multi_run_command_and_reports_mark_the_interrupted_run(
    data_dir, tmp_path, capsys, monkeypatch, signum
):
    from loopnn import demo
    from loopnn.errors import StopRequested
    from loopnn.report import compare

    out = tmp_path / "demo"
    plan = small_plan(data_dir, out)
    signal_on_first_batch(monkeypatch, signum)
    with pytest.raises(StopRequested, match="stopped by signal during base at step 1 of 3.*rerun the same command"):
        demo._train_all(plan)  # what `loopnn demo` and `loopnn demo --ablation` run
    monkeypatch.undo()
    assert not (out / "loop").exists()  # the command did not go on to the next model
    summary = json.loads((out / "base" / "summary.json").read_text())
    assert summary["interrupted"] and summary["step"] == 1

    report = compare([out / "base"], tmp_path / "cmp")
    assert "base (**interrupted at step 1 of 3**)" in report["markdown"]
    assert "Not a fair comparison" in report["markdown"]
    assert report["rows"][0]["status"] == "interrupted at step 1 of 3"

    dirs = demo._train_all(plan)  # rerunning continues the interrupted model and trains the rest
    report = compare(dirs, tmp_path / "cmp")
    assert [r["status"] for r in report["rows"]] == ["finished"] * 3
    assert "interrupted" not in report["markdown"] and "Not a fair" not in report["markdown"]
    assert json.loads((out / "base" / "summary.json").read_text())["step"] == 3


def test_loopnn_demo_exits_130_with_one_line_on_a_stop(monkeypatch, capsys):
    from loopnn import demo
    from loopnn.errors import StopRequested

    def stopped(*a, **k):
        raise StopRequested("stopped by signal during base at step 1 of 3; rerun the same command to continue")

    monkeypatch.setattr(demo, "demo", stopped)
    monkeypatch.setattr(demo, "ablation", stopped)
    for extra in ([], ["--ablation"]):
        assert main(["demo", *extra]) == 130
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["loopnn demo: stopped by signal during base at step 1 of 3; rerun the same command to continue"]


def test_compare_marks_a_run_whose_checkpoints_are_newer_than_its_summary(data_dir, tmp_path):
    from loopnn.report import compare

    run = tmp_path / "run"
    assert main(train_argv(data_dir, run, max_steps=2)) == 0
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps(summary | {"step": 1, "max_steps": 1}))  # a killed resume
    assert compare([run], tmp_path / "cmp")["rows"][0]["status"].startswith("unfinished")
