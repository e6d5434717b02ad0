"""Fault injection: each test causes a real fault and checks that nothing was lost.

Kill -9 at random moments (also mid-checkpoint), SIGTERM, a full or read-only disk, NaN losses, hostile
checkpoint files (pickles, wrong shapes, malicious optimizer.pt, bad checkpoint.json) and a worker killed under
torchrun. The matrix these tests back is in docs/reliability.md.
"""

import errno
import hashlib
import io
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save

from loopnn import LoopGPT, ModelConfig, preset
from loopnn import checkpoint as ckpt
from loopnn.cli import main
from loopnn.errors import LoopnnError

# Runs `loopnn` with fsync slowed down inside .tmp-step-* directories, so a checkpoint write lasts long enough
# to be killed half way. Nothing else about the run changes.
SLOW_FSYNC_MAIN = """
import os, sys, time
_fsync = os.fsync
def _slow_fsync(fd):
    try:
        path = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        path = ""
    if ".tmp-step-" in path and os.path.isfile(path):
        time.sleep(float(os.environ.get("LOOPNN_TEST_FSYNC_DELAY", "0")))
    _fsync(fd)
os.fsync = _slow_fsync
from loopnn.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from loopnn.data import prepare

    out = tmp_path_factory.mktemp("data") / "pydoc-bytes"
    prepare("pydoc", out, tokenizer="bytes", progress=False)
    return out


def train_argv(data, run, max_steps=24, **flags):
    argv = ["train", "--preset", "debug", "--data-dir", str(data), "--out-dir", str(run)]
    base = dict(batch_size=4, seq_len=32, warmup_steps=2, eval_interval=0, eval_tokens=256, log_interval=1, lr=3e-3)
    for k, v in (base | dict(max_steps=max_steps) | flags).items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return argv + ["--no-progress", "--device", "cpu"]


def weights(run) -> dict[str, torch.Tensor]:
    return ckpt.load_checkpoint(run)["model_state"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def records(run) -> list[dict]:
    drop = ("elapsed", "tokens_per_s")
    lines = (Path(run) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in lines]


def complete_checkpoints_verify(run) -> Path | None:
    """Every directory under a final name verifies; returns the newest."""
    done = ckpt.list_checkpoints(run)
    assert all(ckpt.verify(p) for p in done), done
    return done[-1] if done else None


def rewrite(ckpt_dir: Path, name: str, data: bytes, **meta_changes) -> None:
    """Replace a checkpoint file AND its checksum, as an attacker (not a disk error) would."""
    (ckpt_dir / name).write_bytes(data)
    meta = json.loads((ckpt_dir / "checkpoint.json").read_text())
    meta["sha256"][name] = hashlib.sha256(data).hexdigest()
    meta.update(meta_changes)
    (ckpt_dir / "checkpoint.json").write_text(json.dumps(meta))


# ----------------------------------------------------------------------------- 1. kill and resume


class Trainer:
    """A real `loopnn train --resume` subprocess."""

    def __init__(self, argv, fsync_delay=0.0):
        env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
        env["LOOPNN_TEST_FSYNC_DELAY"] = str(fsync_delay)
        cmd = [sys.executable, "-c", SLOW_FSYNC_MAIN, *argv, "--resume"]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait_for(self, predicate, timeout=120.0):
        deadline = time.time() + timeout
        while not predicate():
            if self.proc.poll() is not None:
                out, err = self.proc.communicate()
                pytest.fail(f"trainer exited with {self.proc.returncode} too early:\n{out}\n{err}")
            if time.time() > deadline:
                self.proc.kill()
                pytest.fail("timed out waiting for the trainer")
            time.sleep(0.002)

    def finish(self, timeout=180.0):
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err


def half_written(run) -> bool:
    try:
        return any(any(d.iterdir()) for d in tmp_dirs(run))
    except OSError:  # renamed into place while we looked
        return False


def tmp_dirs(run):
    root = Path(run) / "checkpoints"
    return sorted(root.glob(".tmp-step-*")) if root.is_dir() else []


def test_kill_anywhere_then_resume_equals_uninterrupted_run(data_dir, tmp_path):
    """SIGKILL mid-checkpoint and at a random moment, SIGTERM, then resume: final weights equal bit for bit."""
    reference = tmp_path / "reference"
    assert main(train_argv(data_dir, reference, max_steps=32, ckpt_interval=4)) == 0
    run = tmp_path / "killed"
    argv = train_argv(data_dir, run, max_steps=32, ckpt_interval=4)
    rng = random.Random(0)

    # (a) SIGKILL while a checkpoint directory is half written (one of its files already on disk).
    t = Trainer(argv, fsync_delay=0.2)
    t.wait_for(lambda: ckpt.list_checkpoints(run) and half_written(run))
    t.proc.send_signal(signal.SIGKILL)
    t.finish()
    assert tmp_dirs(run), "the half-written checkpoint should still be there"
    newest = complete_checkpoints_verify(run)
    assert ckpt.latest_checkpoint(run) == newest
    assert int(tmp_dirs(run)[0].name.split("-")[2]) > int(newest.name.split("-")[1])

    # (b) SIGKILL at a random moment after the resumed run has made progress (maybe mid-metrics line).
    t = Trainer(argv, fsync_delay=0.05)
    t.wait_for(lambda: len(ckpt.list_checkpoints(run)) and ckpt.list_checkpoints(run)[-1] != newest)
    time.sleep(rng.uniform(0.0, 0.3))
    t.proc.send_signal(signal.SIGKILL)
    assert t.finish()[0] == -signal.SIGKILL, "the run ended before the kill; lengthen it"
    newest = complete_checkpoints_verify(run)
    assert newest is not None and ckpt.latest_checkpoint(run) == newest

    # (c) SIGTERM: the step finishes, a clean checkpoint is written, exit status 130.
    t = Trainer(argv, fsync_delay=0.05)
    t.wait_for(lambda: ckpt.list_checkpoints(run)[-1] != newest)
    t.proc.send_signal(signal.SIGTERM)
    code, out, err = t.finish()
    assert code == 130, err
    assert f"resuming from {newest}" in out and "stopped by signal" in out
    last = complete_checkpoints_verify(run)
    assert ckpt.read_meta(last)["info"]["kind"] == "interrupted"
    assert not tmp_dirs(run), "stray .tmp-step-* directories are removed by the next save"

    # (d) Resume to the end: same weights and the same metrics log as the run that was never interrupted.
    code, out, err = Trainer(argv).finish()
    assert code == 0, err
    assert f"resuming from {last}" in out
    assert_same_weights(weights(reference), weights(run))
    assert records(run) == records(reference)
    assert not tmp_dirs(run)


# ----------------------------------------------------------------------------- 2. disk and I/O faults


def test_disk_full_during_checkpoint_keeps_previous_one(data_dir, tmp_path, monkeypatch, capsys):
    reference = tmp_path / "reference"
    assert main(train_argv(data_dir, reference, max_steps=6, ckpt_interval=2)) == 0
    run = tmp_path / "run"
    real_open = open

    def full_disk_open(path, mode="r", *a, **k):
        if "step-0000004" in str(path) and "w" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr(ckpt, "open", full_disk_open, raising=False)
    capsys.readouterr()
    assert main(train_argv(data_dir, run, max_steps=6, ckpt_interval=2)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left" in err and "step-0000004" in err
    assert ckpt.latest_checkpoint(run).name == "step-0000002"
    assert not tmp_dirs(run)
    assert [r["step"] for r in records(run)] == [1, 2, 3, 4]  # every line intact
    monkeypatch.undo()
    assert main(train_argv(data_dir, run, max_steps=6, ckpt_interval=2) + ["--resume"]) == 0
    assert_same_weights(weights(reference), weights(run))


def make_read_only(monkeypatch, root: Path) -> None:
    """chmod -w where it works; as root (chmod does not stop root) refuse writes under `root` in-process."""
    if os.geteuid() != 0:
        for p in [root, *root.rglob("*")]:
            if p.is_dir():
                p.chmod(0o555)
        return

    def under(path) -> bool:
        return str(os.path.abspath(path)).startswith(str(root))

    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    real_open, real_os_open = open, os.open
    real = {name: getattr(os, name) for name in ("replace", "rename", "mkdir", "unlink", "rmdir")}

    def ro_open(path, mode="r", *a, **k):
        return refuse(path) if under(path) and any(c in mode for c in "wax+") else real_open(path, mode, *a, **k)

    def ro_os_open(path, flags, *a, **k):
        writing = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND)
        return refuse(path) if writing and under(path) else real_os_open(path, flags, *a, **k)

    def guard(name):
        return lambda path, *a, **k: refuse(path) if under(path) else real[name](path, *a, **k)

    monkeypatch.setattr("builtins.open", ro_open)
    monkeypatch.setattr(io, "open", ro_open)  # pathlib's write_text goes through io.open
    monkeypatch.setattr(os, "open", ro_os_open)
    for name in real:
        monkeypatch.setattr(os, name, guard(name))


def test_read_only_run_dir_is_a_clear_error_and_changes_nothing(data_dir, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    assert main(train_argv(data_dir, run, max_steps=2)) == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    make_read_only(monkeypatch, run)
    capsys.readouterr()
    try:
        code = main(train_argv(data_dir, run, max_steps=4) + ["--resume"])
    finally:
        monkeypatch.undo()
        for p in [run, *run.rglob("*")]:
            if p.is_dir():
                p.chmod(0o755)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert str(run) in err and ("Read-only" in err or "Permission denied" in err)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert ckpt.latest_checkpoint(run).name == "step-0000002"


# ----------------------------------------------------------------------------- 3. numerical faults


def poison_loss(monkeypatch, bad_calls):
    """Make the training forward passes numbered in `bad_calls` (0-based) return a NaN loss."""
    real_forward = LoopGPT.forward
    calls = [0]

    def forward(self, *a, **k):
        logits, loss = real_forward(self, *a, **k)
        if self.training and loss is not None:
            calls[0] += 1
            if calls[0] - 1 in bad_calls:
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(LoopGPT, "forward", forward)


def test_transient_nan_steps_are_skipped_and_counted(data_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    poison_loss(monkeypatch, {2, 3})
    from loopnn.cli import build_parser, resolve_train_configs
    from loopnn.train import train

    mc, tc = resolve_train_configs(build_parser().parse_args(train_argv(data_dir, run, 8)))
    summary = train(mc, tc)
    assert summary["skipped_steps"] == 2 and summary["step"] == 8
    assert summary["tokens"] == 6 * 4 * 32  # skipped steps train on nothing
    skips = [r for r in records(run) if r["kind"] == "skip"]
    assert [r["step"] for r in skips] == [3, 4] and all(r["loss"] == "nan" for r in skips)
    assert all(torch.isfinite(v).all() for v in weights(run).values())


def test_repeated_nan_stops_with_last_good_weights(data_dir, tmp_path, monkeypatch, capsys):
    good = tmp_path / "good"
    assert main(train_argv(data_dir, good, max_steps=3)) == 0  # what 3 good steps give
    run = tmp_path / "run"
    poison_loss(monkeypatch, set(range(3, 100)))
    capsys.readouterr()
    assert main(train_argv(data_dir, run, max_steps=20)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "5 consecutive non-finite steps" in err
    saved = ckpt.latest_checkpoint(run)
    assert str(saved) in err and ckpt.read_meta(saved)["info"]["skipped"] == 5
    state = weights(run)
    assert all(torch.isfinite(v).all() for v in state.values())
    assert_same_weights(weights(good), state)  # bit for bit the state before the bad steps
    assert sum(r["kind"] == "skip" for r in records(run)) == 5


def test_huge_learning_rate_produces_real_nans_and_stops(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    # weight decay 0: lr x weight_decay >= 1 is refused before training; this lr passes the config's checks
    assert main(train_argv(data_dir, run, max_steps=10, lr=1e30, warmup_steps=0, weight_decay=0.0)) == 2
    assert "non-finite" in capsys.readouterr().err
    assert any(r["kind"] == "skip" for r in records(run))
    assert ckpt.verify(ckpt.latest_checkpoint(run))


# ----------------------------------------------------------------------------- 4. untrusted files


class Evil:
    """Unpickling this creates `marker`: proof that code from the file ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def saved_ckpt(tmp_path):
    cfg = ModelConfig(**preset("debug"))
    model = LoopGPT(cfg)
    opt = torch.optim.AdamW(model.parameters())
    return ckpt.save_checkpoint(
        tmp_path / "run", 1, model, cfg, {"data_dir": "x"}, opt, {"rng_cpu": torch.get_rng_state()}
    )


def test_pickle_files_are_refused(tmp_path, capsys):
    marker = tmp_path / "pwned"
    for name in ("model.pt", "model.safetensors", "checkpoint"):
        path = tmp_path / name
        path.write_bytes(pickle.dumps({"weights": Evil(str(marker))}))
        with pytest.raises(LoopnnError, match="pickle"):
            ckpt.load_model(path)
        assert main(["eval", str(path)]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not marker.exists()


def test_malicious_optimizer_pickle_never_runs(saved_ckpt, tmp_path):
    payload = io.BytesIO()
    torch.save({"state": {0: Evil(str(tmp_path / "pwned"))}, "param_groups": []}, payload)
    pickle.loads(pickle.dumps(Evil(str(tmp_path / "armed")))).close()
    assert (tmp_path / "armed").exists(), "the payload is live: a plain unpickler runs it"
    rewrite(saved_ckpt, "optimizer.pt", payload.getvalue())
    with pytest.raises(LoopnnError, match="optimizer.pt refused by the safe loader"):
        ckpt.load_checkpoint(saved_ckpt)
    assert not (tmp_path / "pwned").exists()


def test_wrong_shapes_and_dtypes_are_refused(saved_ckpt):
    state = load_file(saved_ckpt / "model.safetensors")
    key = "transformer.wpe.weight"
    for bad in (state[key].t().contiguous(), state[key].double()):
        rewrite(saved_ckpt, "model.safetensors", save(state | {key: bad}))
        with pytest.raises(LoopnnError, match="expects"):
            ckpt.load_model(saved_ckpt)


def test_truncated_files_are_refused(saved_ckpt):
    data = (saved_ckpt / "model.safetensors").read_bytes()
    (saved_ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LoopnnError, match="checksum"):  # a disk error: checksum catches it
        ckpt.load_checkpoint(saved_ckpt)
    rewrite(saved_ckpt, "model.safetensors", data[: len(data) // 2])
    with pytest.raises(LoopnnError, match="not a valid safetensors"):  # checksum forged: the parser catches it
        ckpt.load_checkpoint(saved_ckpt)
    text = (saved_ckpt / "checkpoint.json").read_text()
    (saved_ckpt / "checkpoint.json").write_text(text[: len(text) // 2])
    with pytest.raises(LoopnnError, match="unreadable"):
        ckpt.load_checkpoint(saved_ckpt)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(n_loops=-1), "n_loops"),
        (dict(extra_key=1), "unknown field"),
        (dict(n_embd="__import__('os').system('true')"), "n_embd"),
        (dict(dropout=10**400), "dropout"),
        (dict(loop_end=99), "loop range"),
    ],
)
def test_bad_model_config_in_checkpoint_json(saved_ckpt, change, match):
    meta = json.loads((saved_ckpt / "checkpoint.json").read_text())
    meta["model_config"].update(change)
    (saved_ckpt / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(LoopnnError, match=match):
        ckpt.load_model(saved_ckpt)


@pytest.mark.parametrize(
    "change",
    [
        dict(step=-1),
        dict(step="7"),
        dict(model_config=5),
        dict(info=[1]),
        dict(info={"tokens": "many"}),
        dict(train_config={"seq_len": "32"}),
        dict(sha256={"../../../etc/passwd": "0" * 64}),
        dict(sha256=["model.safetensors"]),
        dict(format="something-else"),
    ],
)
def test_bad_checkpoint_json_fields(saved_ckpt, change):
    meta = json.loads((saved_ckpt / "checkpoint.json").read_text())
    (saved_ckpt / "checkpoint.json").write_text(json.dumps(meta | change))
    with pytest.raises(LoopnnError, match="checkpoint"):
        ckpt.load_model(saved_ckpt)
    assert ckpt.latest_checkpoint(saved_ckpt.parent.parent) is None  # skipped, not crashed on


def test_malformed_rng_state_is_refused_on_resume(data_dir, tmp_path):
    run = tmp_path / "run"
    assert main(train_argv(data_dir, run, max_steps=2)) == 0
    last = ckpt.latest_checkpoint(run)
    rewrite(last, "state.safetensors", save({"rng_cpu": torch.zeros(3, dtype=torch.float64)}))
    from loopnn.cli import build_parser, resolve_train_configs
    from loopnn.train import train

    mc, tc = resolve_train_configs(build_parser().parse_args(train_argv(data_dir, run, 4)))
    with pytest.raises(LoopnnError, match="rng_cpu"):
        train(mc, tc, resume=True)


# ----------------------------------------------------------------------------- 6. distributed faults


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LOOPNN_SLOW") != "1", reason="2-process gloo under torchrun; set LOOPNN_SLOW=1")
def test_torchrun_restarts_after_a_worker_is_killed(data_dir, tmp_path):
    run = tmp_path / "run"
    argv = train_argv(data_dir, run, max_steps=40, ckpt_interval=4, grad_accum=2) + ["--resume"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--max-restarts=3"]
    cmd += ["--standalone", "-m", "loopnn", *argv]
    # On a loaded machine a restarted worker can miss gloo's connect window once: allow a few restarts.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not ckpt.list_checkpoints(run):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
        time.sleep(0.05)
    workers = [int(p) for t in Path(f"/proc/{proc.pid}/task").iterdir() for p in (t / "children").read_text().split()]
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)  # rank 1 (or 0): the agent restarts both from the last checkpoint
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out
    assert "resuming from" in out
    meta = ckpt.read_meta(ckpt.latest_checkpoint(run))
    assert meta["step"] == 40 and meta["info"]["kind"] == "final"
    steps = [r["step"] for r in records(run) if r["kind"] == "train"]
    assert steps == list(range(1, 41))  # the log reads as one run
