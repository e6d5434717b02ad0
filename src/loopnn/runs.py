"""A run directory, and the one door to a trained model: open_run.

    run = RunDir("runs/demo")            # config.json, metrics.jsonl, summary.json, tokenizer.json, checkpoints/
    opened = open_run("runs/demo", "cpu")  # newest valid checkpoint (or a checkpoint / HF export directory)
    opened.model, opened.tokenizer, opened.data_dir, opened.meta

train.py writes a run and resumes it (weights, optimizer, RNG states, counters) through RunDir; eval, generate,
serve, export, bench, demo and the scripts read a trained model through `open_run` (hf.convert.load_pretrained
adds transformers instances and GPT-2 directories). This module and checkpoint.py are the only ones that name
the files of a run; hf/convert.py writes the exports read here.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from loopnn import checkpoint as ckpt
from loopnn.atomic import atomic_write_bytes, atomic_write_text
from loopnn.dist import print0
from loopnn.errors import LoopnnError
from loopnn.jsonio import parse, read_json

RUN_CONFIG = "config.json"  # a run's resolved configs; in an HF export, the transformers config
EXPORT_META = "loopnn.json"  # an HF export's step / train_config / info of the checkpoint it came from


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
        self.config = self.path / RUN_CONFIG  # resolved configs, sizes, FLOPs and the data's meta
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

    def read_config(self) -> dict[str, Any]:
        """config.json, read with jsonio's size and depth limits."""
        return read_json(self.config, f"run {RUN_CONFIG}")

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
                record = parse(line, str(self.metrics))
            except LoopnnError:  # a line cut short by a killed writer
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


def is_export(path: str | Path) -> bool:
    """An HF export directory (config.json of model_type "loopnn", no checkpoints/ beside it), not a run."""
    path = Path(path)
    if not (path / RUN_CONFIG).is_file() or (path / "checkpoints").is_dir():
        return False
    try:
        return read_json(path / RUN_CONFIG, f"{path} {RUN_CONFIG}").get("model_type") == "loopnn"
    except LoopnnError:
        return False


def is_hf_directory(path: str | Path) -> bool:
    """A transformers model directory (a loopnn export or GPT-2): a config.json without checkpoints/ beside it."""
    path = Path(path)
    return (path / RUN_CONFIG).is_file() and not (path / "checkpoints").is_dir()


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """The config.json of an HF directory, read with jsonio's limits."""
    return read_json(Path(path) / RUN_CONFIG, f"{path} {RUN_CONFIG}")


@dataclass
class Run:
    """A trained model as open_run found it: the model and everything it was trained with."""

    model: torch.nn.Module  # LoopGPT, in eval mode on the device asked for
    meta: dict[str, Any]  # checkpoint.json plus "path"; of an export, its loopnn.json record plus "path"
    path: Path  # the checkpoint or export directory read
    run_dir: Path | None  # the run directory; None for an export
    weights: Path  # the model.safetensors loaded
    sha256: str  # of those bytes
    tokenizer_override: str | None = None

    @property
    def model_config(self):
        return self.model.config

    @property
    def train_config(self) -> dict[str, Any]:
        return self.meta.get("train_config") or {}

    @property
    def step(self) -> int | None:
        return self.meta.get("step")

    @property
    def data_info(self) -> dict[str, Any]:
        """What the checkpoint recorded of its data: dir (absolute), tokenizer, vocab_size."""
        return (self.meta.get("info") or {}).get("data") or {}

    @property
    def data_dir(self) -> Path | None:
        """The training data, absolute: the directory the checkpoint recorded (absolute since it was recorded),
        else the train config's data_dir (resolved against the working directory); None when neither names one."""
        found = self.data_info.get("dir") or self.train_config.get("data_dir")
        return Path(found).resolve() if found else None

    @property
    def records_tokenizer(self) -> bool:
        """Whether the tokenizer is known: recorded with the data, named by the caller, or GPT-2's by its vocab."""
        return bool(self.tokenizer_override or self.data_info.get("tokenizer") or self.model.config.vocab_size == 50257)

    @cached_property
    def tokenizer(self):
        """The tokenizer open_run was asked for, else the recorded one (the run's own tokenizer.json for a trained
        BPE, else the data directory's), GPT-2's for a GPT-2 vocab with no record, else bytes; its size checked."""
        from loopnn.tokenizer import get_tokenizer

        name = self.tokenizer_override or self.data_info.get("tokenizer")
        name = name or ("gpt2" if self.model.config.vocab_size == 50257 else "bytes")
        own = self.run_dir if self.run_dir is not None else self.path
        tok = get_tokenizer(name, own if (own / "tokenizer.json").is_file() else self.data_info.get("dir"))
        if tok.vocab_size != self.model.config.vocab_size:
            raise LoopnnError(
                f"tokenizer {tok.name} has {tok.vocab_size} tokens but the model has {self.model.config.vocab_size}; "
                "use the tokenizer the model was trained with (the one the run recorded: drop --tokenizer)"
            )
        return tok

    def data(self, data_dir: str | Path | None = None):
        """TokenData of `data_dir`, else of the run's data directory, its vocabulary checked against the model."""
        from loopnn.data import TokenData

        data_dir = data_dir or self.data_dir
        if not data_dir:
            raise LoopnnError("no data directory recorded in the checkpoint; pass --data-dir DIR")
        data = TokenData(data_dir)
        vocab = self.model.config.vocab_size
        if data.vocab_size != vocab:
            raise LoopnnError(f"data vocab {data.vocab_size} != model vocab {vocab}; pass matching --data-dir")
        return data


def open_run(path: str | Path, device: str | torch.device = "cpu", tokenizer: str | None = None) -> Run:
    """The one reader of a trained model: a run directory (its newest valid checkpoint), a checkpoint directory
    or an HF export directory (`loopnn export`, read without transformers). Everything read is validated once:
    JSON through jsonio's limits, checksums, and the config's parameter count against the weights before the
    model is allocated. `tokenizer` names a tokenizer to use instead of the recorded one."""
    p = Path(path)
    if is_export(p):
        model, meta = _load_export(p)
        run_dir, weights = None, p / ckpt.WEIGHTS
        digest = ckpt.sha256(weights.read_bytes())
    else:
        model, meta = ckpt.load_model(p)
        run_dir, weights = Path(meta["path"]).parent.parent, Path(meta["path"]) / ckpt.WEIGHTS  # RUN/checkpoints/step-N
        digest = meta["sha256"][ckpt.WEIGHTS]  # checked against the bytes loaded
    return Run(model.to(device).eval(), meta, Path(meta["path"]), run_dir, weights, digest, tokenizer)


def _load_export(p: Path):
    """(LoopGPT, loopnn.json record plus "path") of an HF export directory, without transformers."""
    from safetensors.torch import load_file

    from loopnn.config import ModelConfig
    from loopnn.recipes import model_config_from_dict

    config = read_hf_config(p)
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = model_config_from_dict({k: v for k, v in config.items() if k in fields}, where=str(p))
    weights = p / ckpt.WEIGHTS
    if not weights.is_file():
        raise LoopnnError(f"{p} holds no {ckpt.WEIGHTS} (sharded exports: import them with `loopnn import`)")
    tensors = {k.removeprefix("model."): v for k, v in load_file(weights).items()}
    tensors.pop(ckpt.TIED_KEY, None)  # tied to transformer.wte.weight
    model = ckpt.model_from_state(cfg, tensors, str(weights))
    record = read_json(p / EXPORT_META, f"{p} {EXPORT_META}") if (p / EXPORT_META).is_file() else {}
    meta = {k: record.get(k) for k in ("step", "train_config", "info")}
    return model, dict(meta, path=p)
