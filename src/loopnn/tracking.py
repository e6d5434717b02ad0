"""Experiment trackers: the records of metrics.jsonl, mirrored to TensorBoard or Weights & Biases.

    tracker = open_tracker(train_cfg, run.path, first_step)   # None for TrainConfig.tracker "none"
    run.tracker = tracker                                     # RunDir.log then forwards every record to it

Rank 0 only: RunDir.log runs on the main process, and train.py opens a tracker there alone. A record
{"step": 40, "kind": "eval", "val_loss": 2.1, ...} becomes the scalars eval/val_loss, ... at step 40; a list
(per-loop loss, loop telemetry) becomes one scalar per loop: telemetry/state_norm/1, /2, ... Resumed runs
continue the same curves: TensorBoard purges events past the checkpoint's step (as metrics.jsonl is cut back),
and W&B reopens the run whose id is stored in RUN/tracker.json, on the run's own `step` axis.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any

from loopnn.atomic import atomic_write_text
from loopnn.errors import LoopnnError
from loopnn.jsonio import read_json

_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # tracker -> module that must be importable
STATE_FILE = "tracker.json"  # in the run directory: which tracker, and the W&B run id a resume reopens
TENSORBOARD_DIR = "tensorboard"  # event files, under the run directory


def check_available(tracker: str) -> None:
    """Refuse, before any training, a tracker whose package is not installed (find_spec: nothing is imported)."""
    module = _PACKAGES.get(tracker)
    if module is not None and importlib.util.find_spec(module) is None:
        raise LoopnnError(
            f"--tracker {tracker} needs the {module} package, which is not installed; "
            f"pip install 'loopnn[track]' (or pip install {module}), or pass --tracker none"
        )


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """{tag: value} of one metrics.jsonl record: numbers as kind/key, lists as kind/key/loop (1-based)."""
    kind = record.get("kind", "train")
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in ("step", "kind"):
            continue
        if isinstance(value, list):
            for i, item in enumerate(value, start=1):
                if _number(item):
                    out[f"{kind}/{key}/{i}"] = float(item)
        elif _number(value):
            out[f"{kind}/{key}"] = float(value)
    return out


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class TensorBoardTracker:
    """torch.utils.tensorboard's SummaryWriter on RUN/tensorboard."""

    def __init__(self, run_path: Path, first_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events a killed session wrote after the checkpoint we resume from are hidden, so the curve
        # reads as one run (the same cut metrics.jsonl gets in RunDir.truncate_metrics).
        self.log_dir = run_path / TENSORBOARD_DIR
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=first_step)

    def log(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run, offline unless the user set WANDB_MODE; its id is kept in RUN/tracker.json for resumes. Its
    config is the run's saved config (runs.RunDir.config), less the data's shard lists (thousands of entries on a
    big corpus)."""

    def __init__(self, run_path: Path, project: str | None, run_id: str | None, config: dict[str, Any]) -> None:
        import wandb

        self.run = wandb.init(
            project=project or "loopnn",
            name=run_path.name,
            id=run_id,
            resume="allow" if run_id else None,
            dir=str(run_path),
            config=config | {"data": {k: v for k, v in (config.get("data") or {}).items() if k != "shards"}},
            mode=os.environ.get("WANDB_MODE", "offline"),  # no network unless asked for; `wandb sync` uploads later
            settings=wandb.Settings(silent=True, console="off"),  # loopnn's own lines and progress bar stay as is
        )
        self.id = self.run.id
        # Curves are drawn against the run's own optimizer step, not W&B's internal counter: a resumed session
        # logs steps it already logged once (from the checkpoint on), which W&B's counter would refuse.
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log({"step": step, **values})

    def close(self) -> None:
        self.run.finish()


Tracker = TensorBoardTracker | WandbTracker


def open_tracker(
    tracker: str, project: str | None, run_path: Path, first_step: int, resume: bool, config: dict[str, Any]
) -> Tracker | None:
    """The tracker of a training session starting after step `first_step` (None for "none"). On resume the
    W&B run recorded in RUN/tracker.json is continued; otherwise a new one starts."""
    if tracker == "none":
        return None
    check_available(tracker)
    state_path = run_path / STATE_FILE
    state = _read_state(state_path) if resume else {}
    try:
        if tracker == "tensorboard":
            opened: Tracker = TensorBoardTracker(run_path, first_step + 1)
            state = {"tracker": "tensorboard", "log_dir": TENSORBOARD_DIR}
        else:
            run_id = state.get("wandb_run_id") if state.get("tracker") == "wandb" else None
            opened = WandbTracker(run_path, project, run_id, config)
            state = {"tracker": "wandb", "wandb_run_id": opened.id, "wandb_project": project or "loopnn"}
    except ImportError as e:  # installed but unusable (a version torch's writer refuses, a broken dependency)
        raise LoopnnError(f"--tracker {tracker} cannot start ({e}); pip install --upgrade 'loopnn[track]'") from None
    atomic_write_text(state_path, json.dumps(state, indent=2, sort_keys=True) + "\n")
    return opened


def _read_state(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    state = read_json(path, "tracker state")
    run_id = state.get("wandb_run_id")
    if run_id is not None and not (isinstance(run_id, str) and run_id.isalnum() and len(run_id) <= 64):
        raise LoopnnError(f"{path}: wandb_run_id must be a short alphanumeric id, got {str(run_id)[:40]!r}")
    return state
