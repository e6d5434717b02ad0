"""Distributed training on CPU (gloo, 2 processes under torchrun): per-step losses and final weights equal a
1-process run with 2x the accumulation, for DDP and FSDP2, with loops, sampled loop counts and activation
checkpointing on; sampled loop counts agree across ranks. A SIGTERM that reaches one rank stops both after the
same step with one checkpoint, and --resume continues."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from loopnn import ModelConfig, TrainConfig, preset
from loopnn import checkpoint as ckpt
from loopnn.train import train

# Runs under torchrun: logs each rank's sampled loop counts, then trains through the CLI.
WORKER = """
import json, os, sys
import loopnn.train as tr
rank, real = int(os.environ["RANK"]), tr.sample_loops
def logged(cfg, n_loops, step):
    k = real(cfg, n_loops, step)
    with open(os.path.join(sys.argv[1], f"loops-rank{rank}.jsonl"), "a") as f:
        f.write(json.dumps([step, k]) + "\\n")
    return k
tr.sample_loops = logged
from loopnn.cli import main
sys.exit(main(sys.argv[2:]))
"""

MODEL = dict(n_loops=3, loop_rule="gated")
TRAIN = dict(
    batch_size=2,
    seq_len=32,
    grad_accum=4,
    max_steps=4,
    warmup_steps=1,
    eval_interval=2,
    eval_tokens=320,  # 5 batches: ranks get 3 and 2, the short rank reruns one with weight 0
    log_interval=1,
    lr=3e-3,
    activation_checkpointing=True,
    loop_sampling="uniform",
    min_loops=1,
    max_loops=4,
    progress=False,
)


@pytest.fixture(scope="module")
def single(pydoc_data, tmp_path_factory):
    """The reference: one process, grad_accum 4."""
    out = tmp_path_factory.mktemp("single")
    mc = ModelConfig(**(preset("debug") | MODEL))
    train(mc, TrainConfig(**(TRAIN | dict(data_dir=str(pydoc_data), out_dir=str(out)))))
    return out


def flags(values: dict) -> list[str]:
    out = []
    for k, v in values.items():
        flag = "--" + k.replace("_", "-")
        out += [flag if v else "--no-" + flag[2:]] if isinstance(v, bool) else [flag, str(v)]
    return out


# torch's gloo teardown has aborted a rank after a finished run: SIGABRT with this line, after both ranks had
# passed the closing barrier and rank 0 had printed its summary (CI, torch 2.13; 0 of 55 loops reproduced it
# here). That one failure is retried once in a fresh directory, with a warning; any other failure, or the same
# abort twice, fails the test. PYTHONFAULTHANDLER prints the aborting rank's Python stack for the next look.
TEARDOWN_ABORT = "terminate called without an active exception"


def torchrun(tmp_path, data_dir, out_dir, **extra) -> Path:
    """Train with 2 ranks into out_dir; returns the directory that holds the finished run."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    args = ["train", "--preset", "debug", *flags(MODEL | TRAIN | extra), "--data-dir", str(data_dir)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    for attempt in (1, 2):
        out_dir.mkdir(parents=True, exist_ok=True)
        run = subprocess.run(
            [*cmd, str(worker), str(out_dir), *args, "--out-dir", str(out_dir)],
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        log = run.stdout[-3000:] + run.stderr[-3000:]
        finished = f"{out_dir}: step {TRAIN['max_steps']}," in run.stdout
        if run.returncode == 0 or attempt == 2 or not (finished and TEARDOWN_ABORT in run.stderr):
            break
        warnings.warn(f"torchrun: a rank aborted in teardown after a finished run; retrying once:\n{log}", stacklevel=2)
        out_dir = out_dir.with_name(out_dir.name + "-retry")
    assert run.returncode == 0, log
    return out_dir


def records(run_dir, kind):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def check_parity(single_dir, multi_dir):
    a, b = records(single_dir, "train"), records(multi_dir, "train")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["n_loops"] for r in a] == [r["n_loops"] for r in b]
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4)
    for ea, eb in zip(records(single_dir, "eval"), records(multi_dir, "eval")):
        assert eb["val_loss"] == pytest.approx(ea["val_loss"], rel=1e-5)
        assert eb["val_tokens"] == ea["val_tokens"]
    ta, tb = records(single_dir, "telemetry"), records(multi_dir, "telemetry")
    assert len(ta) == len(tb) == 2 and len(tb[0]["update_norm"]) == MODEL["n_loops"]
    # The checkpoint has the single-process layout (FSDP gathers a full state dict) and the same weights.
    wa, wb = ckpt.load_checkpoint(single_dir)["model_state"], ckpt.load_checkpoint(multi_dir)["model_state"]
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5, msg=k)
    # Sampled loop counts: the same on both ranks, with no communication.
    loops = [(multi_dir / f"loops-rank{r}.jsonl").read_text() for r in (0, 1)]
    assert loops[0] == loops[1] and len(loops[0].splitlines()) == 4


def test_ddp_matches_single_process(pydoc_data, single, tmp_path):
    """... and, where tensorboard is installed, only rank 0 writes tracker events (one event file, not two)."""
    import importlib.util

    tracked = importlib.util.find_spec("tensorboard") is not None
    extra = dict(tracker="tensorboard") if tracked else {}
    multi = torchrun(tmp_path, pydoc_data, tmp_path / "ddp", parallel="ddp", **extra)
    check_parity(single, multi)
    if tracked:
        assert len(list((multi / "tensorboard").glob("events.out.tfevents.*"))) == 1


@pytest.mark.slow  # ~35 s on 2 busy cores; still in the default suite (slow is not deselected there)
def test_fsdp_matches_single_process(pydoc_data, single, tmp_path):
    check_parity(single, torchrun(tmp_path, pydoc_data, tmp_path / "fsdp", parallel="fsdp"))


# Runs as one rank of a 2-process gloo group (RANK/WORLD_SIZE/MASTER_* set by the test, no torchrun agent).
# Two runs of `loopnn ARGS` in the same process (a new process group each, which halves the process start-up):
# in the first, rank 1 sends itself SIGTERM as step STOP_AT begins; the second resumes. Each run writes its exit
# status and train() summary to LOG_DIR/{stop,resume}-rankN.json. argv: LOG_DIR STOP_AT loopnn-args...
STOP_WORKER = """
import json, os, signal, sys
import loopnn.train as tr
from loopnn.cli import main
rank, log_dir, stop_at = int(os.environ["RANK"]), sys.argv[1], int(sys.argv[2])
real_sample, real_train, summaries = tr.sample_loops, tr.train, []
def sample(cfg, n_loops, step):
    if rank == 1 and step == stop_at:
        os.kill(os.getpid(), signal.SIGTERM)  # this rank only
    return real_sample(cfg, n_loops, step)
def train(*args, **kwargs):
    summaries.append(real_train(*args, **kwargs))
    return summaries[-1]
tr.sample_loops, tr.train = sample, train
for phase in ("stop", "resume"):
    code = main(sys.argv[3:])
    with open(os.path.join(log_dir, f"{phase}-rank{rank}.json"), "w") as f:
        json.dump({"code": code, "summary": summaries[-1]}, f)
    stop_at, os.environ["MASTER_PORT"] = -1, os.environ["RESUME_PORT"]  # a rank may get here first: new store
"""


def two_ranks(worker, log_dir, stop_at: int, argv: list[str]) -> list[str]:
    """Both ranks to the end: each rank's stdout + stderr; a hang (ranks out of step) fails the test."""
    import socket

    with socket.socket() as s, socket.socket() as s2:
        s.bind(("127.0.0.1", 0))
        s2.bind(("127.0.0.1", 0))
        ports = [str(s.getsockname()[1]), str(s2.getsockname()[1])]
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=ports[0], RESUME_PORT=ports[1], OMP_NUM_THREADS="1")
        env["PYTHONFAULTHANDLER"] = "1"  # a rank that aborts prints its Python stack
        cmd = [sys.executable, str(worker), str(log_dir), str(stop_at), *argv]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    try:  # generous: on 2 cores shared with other work a healthy run has taken over 150 s
        for p in procs:
            outs.append(p.communicate(timeout=600)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        tails = [p.communicate()[0][-2000:] for p in procs]
        pytest.fail("a rank did not finish (ranks out of step?):\n" + "\n--- rank 1:\n".join(tails))
    assert [p.returncode for p in procs] == [0, 0], "".join(outs)[-6000:]
    return outs


@pytest.mark.slow  # ~12 s idle, ~23 s on 2 busy cores: 2 processes, each trains twice
def test_sigterm_to_one_rank_stops_all_ranks_at_the_same_step(pydoc_data, tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(STOP_WORKER)
    run, logs = tmp_path / "run", tmp_path / "logs"
    values = dict(batch_size=2, seq_len=32, grad_accum=2, max_steps=6, warmup_steps=1, eval_interval=0)
    values |= dict(eval_tokens=128, log_interval=1, lr=3e-3, ckpt_interval=0, progress=False, device="cpu")
    argv = ["train", "--preset", "debug", *flags(values), "--data-dir", str(pydoc_data), "--out-dir", str(run)]
    out0, out1 = two_ranks(worker, logs, 2, [*argv, "--resume"])
    stop, resume = [[json.loads((logs / f"{p}-rank{r}.json").read_text()) for r in (0, 1)] for p in ("stop", "resume")]

    # SIGTERM reached rank 1 alone during step 3 (index 2): both ranks finished that step, then stopped, and
    # rank 0 wrote one checkpoint.
    assert [r["code"] for r in stop] == [130, 0], out0 + out1
    assert [(r["summary"]["step"], r["summary"]["interrupted"]) for r in stop] == [(3, True), (3, True)]
    first = run / "checkpoints" / "step-0000003"
    assert ckpt.read_meta(first)["info"]["kind"] == "interrupted"
    assert "stopped by signal" in out0

    # --resume continued from it to the end: one checkpoint more, the log reads as one run, and the weights
    # match an uninterrupted single-process run with the same global batch.
    assert [r["code"] for r in resume] == [0, 0], out0 + out1
    assert [(r["summary"]["step"], r["summary"]["interrupted"]) for r in resume] == [(6, False), (6, False)]
    assert f"resuming from {first}" in out0
    assert ckpt.list_checkpoints(run) == [first, run / "checkpoints" / "step-0000006"]
    assert ckpt.read_meta(ckpt.latest_checkpoint(run))["info"]["kind"] == "final"
    assert [r["step"] for r in records(run, "train")] == [1, 2, 3, 4, 5, 6]
    reference = tmp_path / "reference"
    train(ModelConfig(**preset("debug")), TrainConfig(**values, data_dir=str(pydoc_data), out_dir=str(reference)))
    want, got = ckpt.load_checkpoint(reference)["model_state"], ckpt.load_checkpoint(run)["model_state"]
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=k)
