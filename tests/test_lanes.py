"""Parallel lanes (loopnn.lanes, `loopnn demo --jobs`): the same models as one run at a time, a failed run
named in one line, and a stop request that leaves every run checkpointed and resumable."""

import json
import os
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from loopnn import ModelConfig, TrainConfig, lanes, preset
from loopnn.data import prepare
from loopnn.errors import LoopnnError, StopRequested
from loopnn.train import train

TEXT = "".join(f"lane {i}: two runs side by side, each with its own core, {i * 7} steps apart.\n" for i in range(300))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lanes")
    (root / "corpus.txt").write_text(TEXT)
    prepare(str(root / "corpus.txt"), root / "bytes", tokenizer="bytes", progress=False)
    return root / "bytes"


def tiny_plan(data: Path, out: Path, steps: int = 6) -> list:
    plan = []
    for name, n_loops, seed in (("base", 1, 1), ("loop", 2, 2)):
        mc = ModelConfig(**(preset("debug") | dict(n_loops=n_loops, block_size=16)))
        tc = TrainConfig(
            data_dir=str(data), out_dir=str(out / name), max_steps=steps, batch_size=2, seq_len=16, warmup_steps=1,
            eval_interval=0, eval_tokens=64, log_interval=1, progress=False, device="cpu", seed=seed, threads=1,
        )  # fmt: skip
        plan.append((name, mc, tc))
    return plan


def test_lanes_train_the_same_models_as_one_run_at_a_time(data_dir, tmp_path):
    plan = tiny_plan(data_dir, tmp_path / "lanes")
    summaries = lanes.run(plan, jobs=2, headers=["[1/2] base", "[2/2] loop"], progress=False)
    threads = torch.get_num_threads()
    try:
        alone = [train(mc, replace(tc, out_dir=str(tmp_path / "alone" / name)))["val"] for name, mc, tc in plan]
    finally:
        torch.set_num_threads(threads)
    assert [s["val"]["loss"] for s in summaries] == [v["loss"] for v in alone]  # bit for bit, at 1 thread each
    assert [s["step"] for s in summaries] == [6, 6] and not any(s["interrupted"] for s in summaries)
    log = (tmp_path / "lanes" / "loop" / "lane.log").read_text()
    assert log.strip().endswith("finished at step 6")


def test_a_failed_run_stops_the_others_and_is_named_in_one_line(data_dir, tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    base, loop = tiny_plan(data_dir, tmp_path, steps=100_000)
    plan = [loop, (base[0], base[1], replace(base[2], device="cuda:7"))]  # base fails in its own process
    real_start = lanes._start

    def start(slot, name, mc, tc):  # base starts once loop trains, so that loop has something to checkpoint
        deadline = time.time() + 60
        while name == "base" and lanes._last_step(tmp_path / "loop" / "metrics.jsonl") < 1 and time.time() < deadline:
            time.sleep(0.05)
        return real_start(slot, name, mc, tc)

    monkeypatch.setattr(lanes, "_start", start)
    with pytest.raises(LoopnnError) as e:
        lanes.run(plan, jobs=2, headers=["a", "b"], progress=False)
    msg = str(e.value)
    assert msg.startswith("base failed: error: device 'cuda:7' requested but CUDA is not available; use --device cpu")
    assert "\n" not in msg and str(tmp_path / "base" / "lane.log") in msg
    stopped = json.loads((tmp_path / "loop" / "summary.json").read_text())  # stopped cleanly, with its checkpoint
    assert stopped["interrupted"] and 1 <= stopped["step"] < 100_000 and stopped["checkpoint"]


def test_a_stop_sent_to_the_parent_alone_reaches_every_run_and_a_rerun_finishes(data_dir, tmp_path, monkeypatch):
    """`kill PID` of the command (not its process group): the runs are told after the grace period, each stops
    after its step with a checkpoint, the command ends with StopRequested, and the same call then finishes."""
    monkeypatch.setattr(lanes, "GRACE_S", 0.2)
    steps = 20_000
    plan = tiny_plan(data_dir, tmp_path, steps=steps)
    metrics = [Path(tc.out_dir) / "metrics.jsonl" for _, _, tc in plan]

    def stop_once_both_train():
        deadline = time.time() + 60
        while time.time() < deadline and not all(lanes._last_step(m) >= 5 for m in metrics):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    sender = threading.Thread(target=stop_once_both_train)
    sender.start()
    with pytest.raises(StopRequested, match=r"stopped by signal \(base seed 1 at step \d+ of 20000, loop seed 2 "):
        lanes.run(plan, jobs=2, headers=["a", "b"], progress=False)
    sender.join()
    assert signal.getsignal(signal.SIGTERM) is not None  # the parent's handlers are restored
    stopped = [json.loads((Path(tc.out_dir) / "summary.json").read_text()) for _, _, tc in plan]
    assert all(s["interrupted"] and 5 <= s["step"] < steps for s in stopped)

    short = [(name, mc, replace(tc, max_steps=stopped[i]["step"] + 3)) for i, (name, mc, tc) in enumerate(plan)]
    done = lanes.run(short, jobs=2, headers=["a", "b"], progress=False)  # continues from the checkpoints
    assert [s["step"] for s in done] == [s["step"] + 3 for s in stopped]
    assert not any(s["interrupted"] for s in done)


def test_lanes_run_from_a_thread_other_than_the_main_one(data_dir, tmp_path):
    """A notebook or server thread cannot install signal handlers; the lanes train without them there."""
    plan = tiny_plan(data_dir, tmp_path, steps=2)
    result, errors = [], []

    def work():
        try:
            result.extend(lanes.run(plan, jobs=2, headers=["a", "b"], progress=False))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    worker = threading.Thread(target=work)
    worker.start()
    worker.join(timeout=120)
    assert not errors and [s["step"] for s in result] == [2, 2]
