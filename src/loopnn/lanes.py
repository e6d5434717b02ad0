"""Several training runs at once, each in its own process with its share of the CPU cores (`loopnn demo --jobs`).

The demo's models are small (a 128-wide block, 1,024 tokens per step) and use a second core poorly: in
`python scripts/lane_speed.py` on the 2-core box, two 1-thread processes train 1.2-1.5x the tokens/s of one
2-thread process (docs/results.md, "Under ten minutes"). So a multi-seed demo trains its seeds side by side, one
process per run.

Each run is `python -m loopnn.lanes SPEC` in the same process group: its configs come in a JSON file, its output
goes to RUN/lane.log, its result is RUN/summary.json (what train() writes). The parent draws one progress bar
from the runs' metrics.jsonl and starts the next run when a lane frees.

Stops: Ctrl-C reaches the whole process group, so every run stops cleanly after its step and checkpoints, as in
a single `loopnn train`; a signal sent to this process alone (`kill PID`) is passed on to the runs still going
after a grace period (a run that got the signal too stops well within it; a second signal would stop it at once,
without its checkpoint). No new run starts after a stop, and the command ends with StopRequested.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from loopnn.atomic import atomic_write_text
from loopnn.config import ModelConfig, TrainConfig, to_dict
from loopnn.errors import LoopnnError, StopRequested, one_line

GRACE_S = 10.0  # how long a run may take to stop on its own before a stop is passed on to it
POLL_S = 0.5


def cores() -> int:
    """CPU cores this process may use (its affinity set where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def auto_jobs(n_seeds: int) -> int:
    """The demo's default: one lane per seed, up to the cores; 1 (one run at a time, in this process) on a GPU,
    which the runs would share."""
    import torch

    return 1 if torch.cuda.is_available() else max(1, min(n_seeds, cores()))


def threads_per_job(jobs: int) -> int:
    return max(1, cores() // jobs)


@dataclass
class _Lane:
    slot: int  # which of the `jobs` lanes, from 1
    proc: subprocess.Popen
    log: Path
    started: float


def _last_step(metrics: Path) -> int:
    """The step of the last complete record in a run's metrics.jsonl (0 before the first)."""
    try:
        with open(metrics, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = f.read().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0


def _error_line(log: Path) -> str:
    """The run's own error line from its log (`error: ...`), or its last line."""
    try:
        lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return "no log"
    errors = [x for x in lines if x.startswith("error: ")]
    return one_line((errors or lines or ["no output"])[-1])


def run(
    plan: list[tuple[str, ModelConfig, TrainConfig]], jobs: int, headers: list[str], progress: bool = True
) -> list[dict[str, Any]]:
    """Train every (name, model config, train config) of `plan`, `jobs` at a time; their summaries in plan order.
    headers[i] is printed when run i starts. A failed run stops the others and raises LoopnnError with its error
    line; a stop request raises StopRequested once every run has checkpointed."""
    from tqdm import tqdm

    threads = threads_per_job(jobs)
    # no bar in a run's log (the parent draws one for all); each run gets its share of the cores unless set
    plan = [(name, mc, replace(tc, progress=False, threads=tc.threads or threads)) for name, mc, tc in plan]
    waiting = list(range(len(plan)))
    lanes: dict[int, _Lane] = {}
    summaries: dict[int, dict[str, Any]] = {}
    failed: tuple[str, str] | None = None
    stop = {"signals": 0, "at": 0.0, "passed_on": False}

    def on_signal(signum, frame) -> None:
        stop["signals"] += 1
        stop["at"] = stop["at"] or time.time()
        if stop["signals"] > 1:  # a second request: pass it on now (runs that had one stop at once)
            _signal_all(lanes, signal.SIGTERM)

    total = sum(tc.max_steps for _, _, tc in plan)
    bar = tqdm(total=total, unit="step", desc=f"{jobs} lanes", dynamic_ncols=True, disable=not progress)
    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    try:
        while waiting or lanes:
            while waiting and len(lanes) < jobs and not stop["signals"] and failed is None:
                i = waiting.pop(0)
                slot = min(set(range(1, jobs + 1)) - {lane.slot for lane in lanes.values()})
                lanes[i] = _start(slot, *plan[i])
                n = plan[i][2].threads
                bar.write(f"{headers[i]} (lane {slot} of {jobs}, {n} thread{'s' * (n > 1)}; log {lanes[i].log})")
            if not lanes:
                break
            time.sleep(POLL_S)
            if stop["signals"] and not stop["passed_on"] and time.time() - stop["at"] > GRACE_S:
                stop["passed_on"] = True  # a signal sent to this process alone: the runs still going never saw it
                _signal_all(lanes, signal.SIGTERM)
            for i, lane in list(lanes.items()):
                if lane.proc.poll() is None:
                    continue
                del lanes[i]
                summary = _summary(lane, plan[i][2])
                if summary is not None:
                    summaries[i] = summary
                    bar.write(_finished_line(summary, plan[i][2], lane))
                elif not stop["signals"] and failed is None:
                    failed = (
                        plan[i][0],
                        f"{_error_line(lane.log)} (exit status {lane.proc.returncode}; log {lane.log})",
                    )
                    _signal_all(lanes, signal.SIGTERM)  # the others stop cleanly, with their checkpoints
            done = sum(summaries[i]["step"] for i in summaries)
            going = sum(_last_step(Path(plan[i][2].out_dir) / "metrics.jsonl") for i in lanes)
            bar.update(max(0, done + going - bar.n))
    finally:
        bar.close()
        for s, h in old.items():
            signal.signal(s, h)
        _signal_all(lanes, signal.SIGTERM)  # only after an exception here: the loop waits for every run
        for lane in lanes.values():
            lane.proc.wait()
    if failed is not None:
        raise LoopnnError(f"{failed[0]} failed: {failed[1]}")
    stopped = [i for i in range(len(plan)) if i not in summaries or summaries[i].get("interrupted")]
    if stop["signals"] or stopped:
        raise StopRequested(_stopped_message(plan, summaries, stopped, waiting))
    return [summaries[i] for i in range(len(plan))]


def _summary(lane: _Lane, tc: TrainConfig) -> dict[str, Any] | None:
    """The finished (or cleanly stopped) run's summary; None when it failed or was stopped without one."""
    path = Path(tc.out_dir) / "summary.json"
    return json.loads(path.read_text()) if lane.proc.returncode == 0 and path.is_file() else None


def _finished_line(summary: dict[str, Any], tc: TrainConfig, lane: _Lane) -> str:
    val = (summary.get("val") or {}).get("loss")
    how = "stopped" if summary.get("interrupted") else "finished"
    loss = f", val loss {val:.4f}" if isinstance(val, float) else ""
    return f"{Path(tc.out_dir).name}: {how} at step {summary['step']}{loss}, {time.time() - lane.started:.0f} s"


def _stopped_message(plan: list, summaries: dict[int, dict[str, Any]], stopped: list[int], waiting: list[int]) -> str:
    def where(i: int) -> str:
        name, _, tc = plan[i]
        if i in summaries:
            return f"{name} seed {tc.seed} at step {summaries[i]['step']} of {tc.max_steps}"
        return f"{name} seed {tc.seed} {'not started' if i in waiting else 'without a new checkpoint'}"

    runs = ", ".join(where(i) for i in stopped) or "every run had finished"
    return (
        f"stopped by signal ({runs}; checkpoints in their run directories); "
        "rerun the same command to continue where it stopped"
    )


def _start(slot: int, name: str, mc: ModelConfig, tc: TrainConfig) -> _Lane:
    out = Path(tc.out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        spec = out / "lane.json"
        atomic_write_text(spec, json.dumps({"model": to_dict(mc), "train": to_dict(tc)}, indent=2) + "\n")
        log = out / "lane.log"
        with open(log, "a") as f:
            proc = subprocess.Popen(
                [sys.executable, "-m", "loopnn.lanes", str(spec)], stdout=f, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
    except OSError as e:
        raise LoopnnError(f"cannot start the run in {out}: {e}; check that the directory is writable") from None
    return _Lane(slot, proc, log, time.time())


def _signal_all(lanes: dict[int, _Lane], signum: int) -> None:
    for lane in lanes.values():
        if lane.proc.poll() is None:
            try:
                lane.proc.send_signal(signum)
            except ProcessLookupError:
                pass


def main(argv: list[str]) -> int:
    """One lane: train the run that SPEC (a JSON file of model and train configs) describes, resuming it."""
    from loopnn.train import train

    try:
        spec = json.loads(Path(argv[0]).read_text())
        mc, tc = ModelConfig(**spec["model"]), TrainConfig(**spec["train"])
        summary = train(mc, tc, resume=True)
    except LoopnnError as e:
        print(f"error: {one_line(str(e))}", flush=True)
        return 2
    print(f"{'stopped' if summary['interrupted'] else 'finished'} at step {summary['step']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
