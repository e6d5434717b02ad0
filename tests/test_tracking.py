"""Experiment trackers (loopnn.tracking): TensorBoard event files and W&B offline runs hold metrics.jsonl's
scalars, a resume continues the same curves, and a missing package is one error line before training."""

import json
import shutil

import pytest

from loopnn import ModelConfig, TrainConfig, preset
from loopnn import checkpoint as ckpt
from loopnn.errors import LoopnnError
from loopnn.tracking import scalars
from loopnn.train import train


def tiny(data_dir, out_dir, **kw):
    mc = ModelConfig(**(preset("debug") | dict(n_loops=2)))
    base = dict(data_dir=str(data_dir), out_dir=str(out_dir), batch_size=4, seq_len=32, max_steps=8)
    base |= dict(warmup_steps=2, eval_interval=4, eval_tokens=512, log_interval=2, ckpt_interval=4, progress=False)
    return mc, TrainConfig(**(base | kw))


def records(run_dir, kind):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def kill_after_first_checkpoint(run_dir):
    """What a killed session leaves: its records and tracker events past the last checkpoint (step 4)."""
    shutil.rmtree(ckpt.list_checkpoints(run_dir)[-1])
    assert ckpt.latest_checkpoint(run_dir).name == "step-0000004"


def test_scalars_of_a_record():
    record = {"step": 4, "kind": "telemetry", "state_norm": [1.0, 2.5], "gate_mean": [], "note": "x", "flag": True}
    assert scalars(record) == {"telemetry/state_norm/1": 1.0, "telemetry/state_norm/2": 2.5}
    assert scalars({"step": 3, "kind": "skip", "loss": "nan"}) == {}
    assert scalars({"step": 2, "kind": "train", "loss": 1.5, "lr": 3e-4}) == {"train/loss": 1.5, "train/lr": 3e-4}


def test_unknown_tracker_is_refused():
    with pytest.raises(LoopnnError, match="tracker must be one of none, tensorboard, wandb"):
        TrainConfig(tracker="mlflow")


def test_tensorboard_events_hold_the_metrics_and_a_resume_continues_the_curve(pydoc_data, tmp_path):
    pytest.importorskip("tensorboard", reason="pip install 'loopnn[track]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    train(*tiny(pydoc_data, run_dir, tracker="tensorboard"))
    kill_after_first_checkpoint(run_dir)
    train(*tiny(pydoc_data, run_dir, tracker="tensorboard"), resume=True)

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/tokens_per_s", "eval/val_loss", "telemetry/loop_loss/2"} <= tags
    expected = records(run_dir, "train")  # metrics.jsonl after the resume: one record per logged step
    got = events.Scalars("train/loss")
    # steps 6 and 8 were logged twice (before the kill and after the resume); the earlier ones are purged
    assert [e.step for e in got] == [r["step"] for r in expected] == [2, 4, 6, 8]
    for event, record in zip(got, expected):
        assert event.value == pytest.approx(record["loss"], rel=1e-6)
    val = records(run_dir, "eval")
    assert [e.value for e in events.Scalars("eval/val_loss")] == pytest.approx([r["val_loss"] for r in val])
    telemetry = records(run_dir, "telemetry")
    assert [e.value for e in events.Scalars("telemetry/loop_loss/1")] == pytest.approx(
        [r["loop_loss"][0] for r in telemetry]
    )
    assert json.loads((run_dir / "tracker.json").read_text())["tracker"] == "tensorboard"


def test_wandb_offline_run_is_continued_on_resume(pydoc_data, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="pip install 'loopnn[track]'")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline must be loopnn's default, not the environment's
    monkeypatch.setenv("WANDB_API_KEY", "")  # and no credentials: an online attempt would fail here
    run_dir = tmp_path / "run"
    train(*tiny(pydoc_data, run_dir, tracker="wandb", tracker_project="loopnn-test"))
    state = json.loads((run_dir / "tracker.json").read_text())
    run_id = state["wandb_run_id"]
    kill_after_first_checkpoint(run_dir)
    train(*tiny(pydoc_data, run_dir, tracker="wandb", tracker_project="loopnn-test"), resume=True)
    assert json.loads((run_dir / "tracker.json").read_text())["wandb_run_id"] == run_id
    import wandb

    wandb.teardown()  # run.finish() may return before W&B's service has written the last session's file
    sessions = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(sessions) == 2  # one offline directory per session, both the same W&B run (wandb sync merges them)
    first, resumed = (path.read_bytes() for path in sessions)
    for tag in (b"train/loss", b"train/tokens_per_s", b"eval/val_loss", b"telemetry/loop_loss/2"):
        assert tag in first
    assert b"train/loss" in resumed


def test_missing_tracker_package_is_one_line_before_training(pydoc_data, tmp_path, monkeypatch, capsys):
    import importlib.util

    from loopnn.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name))
    run_dir = tmp_path / "run"
    argv = ["train", "--preset", "debug", "--data-dir", str(pydoc_data), "--out-dir", str(run_dir), "--max-steps", "2"]
    assert main([*argv, "--tracker", "tensorboard"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tensorboard" in err and "loopnn[track]" in err
    assert not run_dir.exists()  # refused before the run directory is made
