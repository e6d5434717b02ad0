"""A run directory and the one loader of a trained model.

    run = RunDir("runs/demo")            # config.json, metrics.jsonl, summary.json, tokenizer.json, checkpoints/
    model, meta = load_model("runs/demo", "cpu")   # newest valid checkpoint, in eval mode; or a checkpoint dir

train.py writes a run and resumes it (weights, optimizer, RNG states, counters) through RunDir; eval, generate,
export and the lm-eval harness load models through `load_model` (hf.convert.load_pretrained adds HF directories).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loopnn import checkpoint as ckpt
from loopnn.atomic import atomic_write_bytes, atomic_write_text
from loopnn.dist import print0
from loopnn.errors import LoopnnError


@dataclass
class Counters:
    """What a checkpoint carries across a resume besides the weights: the step and the run's running totals."""

    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0  # wall seconds of earlier sessions
    train_time: float = 0.0  # of which training (no eval, no checkpoints)
    skipped: int = 0  # non-finite steps over the whole run
    grad_scaler: dict[str, Any] | None = None  # fp16 runs: the GradScaler's state (its scale)


class RunDir:
    """The files of one training run; every write names the file and the fix when it fails."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config = self.path / "config.json"  # resolved configs, sizes, FLOPs and the data's meta
        self.metrics = self.path / "metrics.jsonl"  # one JSON record per log, eval, telemetry or skipped step
        self.summary = self.path / "summary.json"  # what train() returns
        self.tokenizer = self.path / "tokenizer.json"  # a trained BPE, copied from the data directory
        self.tracker = None  # loopnn.tracking: every logged record is mirrored to it (TensorBoard, W&B)

    def prepare(self, resume: bool, overwrite: bool) -> None:
        """Create the directory; refuse to train over a run's checkpoints unless resuming or overwriting."""
        if ckpt.list_checkpoints(self.path) and not (resume or overwrite):
            raise LoopnnError(
                f"{self.path} already holds checkpoints of a run; pass --resume to continue it, --overwrite to "
                "replace it, or choose another --out-dir"
            )
        if overwrite and not resume:
            for old in ckpt.list_checkpoints(self.path):
                shutil.rmtree(old)
            self.metrics.unlink(missing_ok=True)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LoopnnError(f"cannot create run directory {self.path}: {e.strerror}") from None

    def write_config(self, run_info: dict[str, Any], data_dir: str | Path) -> None:
        """config.json, and the data's trained tokenizer (generate and eval then need no data directory)."""
        atomic_write_text(self.config, json.dumps(run_info, indent=2, sort_keys=True) + "\n")
        trained_tokenizer = Path(data_dir) / "tokenizer.json"
        if trained_tokenizer.is_file():
            atomic_write_bytes(self.tokenizer, trained_tokenizer.read_bytes())

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_text(self.summary, json.dumps(summary, indent=2, sort_keys=True) + "\n")

    def log(self, record: dict[str, Any]) -> None:
        """Append one record to metrics.jsonl, and hand its scalars to the tracker if one is open."""
        try:
            with open(self.metrics, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise LoopnnError(f"cannot write {self.metrics}: {e.strerror}; check free space and permissions") from None
        if self.tracker is not None:
            from loopnn.tracking import scalars

            self.tracker.log(record["step"], scalars(record))

    def truncate_metrics(self, step: int) -> None:
        """On resume, drop records written after the checkpoint so the log reads as one uninterrupted run."""
        if not self.metrics.exists():
            return
        keep = []
        for line in self.metrics.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a killed writer
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                keep.append(line)
        atomic_write_text(self.metrics, "".join(line + "\n" for line in keep))

    def latest_checkpoint(self) -> tuple[Path | None, list[str]]:
        """(newest valid checkpoint or None, problems of damaged newer ones); refuses a run with none valid."""
        skipped: list[str] = []
        last = ckpt.latest_checkpoint(self.path, skipped)
        if last is None and skipped:  # never silently restart over a run whose checkpoints are all damaged
            raise LoopnnError(
                f"{self.path} holds {len(skipped)} checkpoint(s), none usable (newest: {skipped[0]}); repair it, "
                "or pass --overwrite without --resume to start the run again"
            )
        return last, skipped

    def find_resume(self, model_config: dict[str, Any], fix: str = "") -> tuple[Path | None, list[str]]:
        """Before a model is built: (the checkpoint to resume from or None, problems of damaged newer ones),
        refusing one whose model config differs from `model_config` (compared from its checkpoint.json, so a
        config.json edited to ask for a huge model allocates nothing). `fix` replaces the error's advice."""
        last, skipped = self.latest_checkpoint()
        if last is not None:
            _same_model_config(last, ckpt.read_meta(last)["model_config"], model_config, fix)
        return last, skipped

    def resume(
        self, model: torch.nn.Module, optimizer, found: tuple[Path | None, list[str]], device, is_main: bool
    ) -> Counters:
        """Load the checkpoint find_resume found into the model, optimizer and RNGs; return its counters.

        metrics.jsonl is cut back to the checkpoint's step (to nothing when there is no checkpoint yet).
        """
        last, skipped = found
        if is_main:
            ckpt.warn_skipped(skipped, last)
        if last is None:
            if is_main:
                self.truncate_metrics(0)  # records of a run killed before its first checkpoint
                print0(f"no checkpoint in {self.path}; starting from scratch")
            return Counters()
        loaded = ckpt.load_checkpoint(last)
        ckpt.load_state_into(model, loaded["model_state"], f"checkpoint {last}")
        if loaded["optimizer_state"] is not None:
            load_optimizer(optimizer, loaded["optimizer_state"], last)
        restore_rng_state(loaded["state_tensors"], device, last)
        state = loaded.get("info") or {}
        counters = Counters(
            step=loaded["step"],
            tokens=int(state.get("tokens", 0)),
            elapsed=float(state.get("elapsed", 0.0)),
            train_time=float(state.get("train_time", 0.0)),
            skipped=int(state.get("skipped", 0)),
            grad_scaler=state.get("grad_scaler") if isinstance(state.get("grad_scaler"), dict) else None,
        )
        if is_main:
            self.truncate_metrics(counters.step)
            print0(f"resuming from {last} (step {counters.step})")
        return counters


def _same_model_config(last: Path, saved: dict[str, Any], now: dict[str, Any], fix: str = "") -> None:
    if saved != now:
        keys = sorted(k for k in set(now) | set(saved) if saved.get(k) != now.get(k))
        diff = ", ".join(f"{k}={saved.get(k)!r} (now {now.get(k)!r})" for k in keys)
        fix = fix or "resume with the same settings (the run's config.json lists them)"
        raise LoopnnError(f"{last} was trained with another model config ({diff}); {fix}")


def load_optimizer(optimizer: torch.optim.Optimizer, state: Any, where: Path) -> None:
    """load_state_dict, refusing a state whose groups or tensor shapes do not fit (it would fail mid-step)."""
    try:
        optimizer.load_state_dict(state)
        for group in optimizer.param_groups:
            for p in group["params"]:
                for value in optimizer.state.get(p, {}).values():
                    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != p.shape:
                        raise ValueError(f"state of shape {tuple(value.shape)} for a parameter {tuple(p.shape)}")
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise LoopnnError(f"{where}: optimizer.pt does not fit this model and optimizer ({e})") from None


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The RNG states a checkpoint stores: the CPU generator, and the CUDA generator of `device` when training
    runs on CUDA (dropout masks there come from it). Rank 0's states are saved and restored on every rank: all
    ranks seed alike and draw the same shapes, so their generators are in the same state at a step boundary."""
    state = {"rng_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["rng_cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict[str, torch.Tensor], device: torch.device, where: Path) -> None:
    """Set the generators from a checkpoint's state tensors. A missing entry (checkpoints from before CUDA
    states were saved, or from a CPU run) leaves that generator as seeded; a CUDA state is ignored on CPU."""
    for key in ("rng_cpu", "rng_cuda"):
        rng = state.get(key)
        if rng is not None and (rng.dtype != torch.uint8 or rng.dim() != 1):
            raise LoopnnError(f"{where}: state.safetensors holds a malformed {key} ({rng.dtype})")
    if state.get("rng_cpu") is not None:
        torch.set_rng_state(state["rng_cpu"])
    if state.get("rng_cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["rng_cuda"], device)


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """(LoopGPT in eval mode on `device`, checkpoint meta) from a run directory (its newest valid checkpoint)
    or a checkpoint directory; meta["path"] is the checkpoint read."""
    model, meta = ckpt.load_model(path, device)
    return model.eval(), meta
