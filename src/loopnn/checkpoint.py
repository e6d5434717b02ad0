"""Checkpoints: safetensors weights + JSON metadata, written atomically, verified on load.

A checkpoint is a directory RUN/checkpoints/step-NNNNNNN/ holding
  model.safetensors   weights (the tied head is stored once, as transformer.wte.weight)
  state.safetensors   RNG states and other tensors needed to resume exactly (optional)
  optimizer.pt        optimizer state_dict, loaded with weights_only=True (optional)
  checkpoint.json     model/train config, step, counters, sha256 of every file above
The directory is written under a temporary name and renamed into place, so a crash mid-write leaves the
previous checkpoint untouched and no half-written directory under a final name. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from loopnn.atomic import fsync_dir
from loopnn.config import ModelConfig, to_dict
from loopnn.errors import LoopnnError
from loopnn.jsonio import field, read_json
from loopnn.recipes import model_config_from_dict

FORMAT = "loopnn-checkpoint-v1"
TIED_KEY = "lm_head.weight"
WEIGHTS = "model.safetensors"  # the weights of a checkpoint (and of an HF export)
CHECKPOINT_FILES = (WEIGHTS, "state.safetensors", "optimizer.pt")
MAX_STEP = 10**18  # step-N directory names and JSON integers stay exact below this


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    sd.pop(TIED_KEY, None)
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    model_cfg: ModelConfig,
    train_cfg: dict[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    state_tensors: dict[str, torch.Tensor] | None = None,
    info: dict[str, Any] | None = None,
    keep: int | None = None,
) -> Path:
    """Write RUN/checkpoints/step-NNNNNNN atomically; prune to the newest `keep` complete checkpoints."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}-{os.getpid()}"
    files: dict[str, bytes] = {WEIGHTS: st_save(model_tensors(model))}
    if state_tensors:
        files["state.safetensors"] = st_save({k: v.detach().cpu().contiguous() for k, v in state_tensors.items()})
    if optimizer is not None:
        buf = io.BytesIO()
        torch.save(optimizer.state_dict(), buf)
        files["optimizer.pt"] = buf.getvalue()
    meta = {
        "format": FORMAT,
        "step": step,
        "model_config": to_dict(model_cfg),
        "train_config": train_cfg,
        "info": info or {},
        "sha256": {name: sha256(data) for name, data in files.items()},
    }
    # What loopnn writes it must be able to read back: the same checks `eval` and `train --resume` run.
    _check_meta(final, json.loads(json.dumps(meta)))
    try:
        root.mkdir(parents=True, exist_ok=True)
        # Leftovers of a writer killed mid-save (any pid): never listed as checkpoints, removed here.
        for stray in [*root.glob(".tmp-step-*"), *root.glob(".old-step-*")]:
            shutil.rmtree(stray, ignore_errors=True)
        tmp.mkdir()
        for name, data in files.items():
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        (tmp / "checkpoint.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. a final save right after a periodic one)
            old = root / f".old-step-{step:07d}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise LoopnnError(
            f"could not write checkpoint {final}: {e.strerror or e}; previous checkpoints are untouched. "
            "Free disk space or fix permissions, then rerun with --resume"
        ) from None
    if keep is not None:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


_STEP_DIR = re.compile(r"step-(\d{1,18})")


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories (those with a checkpoint.json), oldest first.

    Ordered by the step number, not the name: the 7-digit padding stops at step 9,999,999, after which
    "step-10000000" sorts before "step-9999999" as text.
    """
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.glob("step-*"):
        match = _STEP_DIR.fullmatch(p.name)
        if match and (p / "checkpoint.json").is_file():
            found.append((int(match.group(1)), p.name, p))
    return [p for _, _, p in sorted(found)]


def read_meta(ckpt: Path) -> dict[str, Any]:
    try:
        meta = read_json(ckpt / "checkpoint.json", "checkpoint.json", object_only=False)
    except LoopnnError as e:
        raise LoopnnError(f"checkpoint {ckpt}: checkpoint.json is unreadable ({e}); use another checkpoint") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise LoopnnError(f"checkpoint {ckpt}: not a loopnn checkpoint (format {found!r})")
    _check_meta(ckpt, meta)
    return meta


def _check_meta(ckpt: Path, meta: dict[str, Any]) -> None:
    """Types of the fields loopnn reads, so a hand-edited or hostile checkpoint.json fails with a clear error."""
    step = meta.get("step")

    def bad(what: str) -> LoopnnError:
        return LoopnnError(f"checkpoint {ckpt}: checkpoint.json {what}; the file is damaged or not from loopnn")

    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < MAX_STEP:
        raise bad(f"has step {str(step)[:40]!r}, expected an integer in [0, {MAX_STEP})")
    if not isinstance(meta.get("model_config"), dict):
        raise bad("has no model_config object")
    for key in ("train_config", "info"):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            raise bad(f"has a {key} that is not an object")
    sums = meta.get("sha256")
    if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
        raise bad("has no sha256 object of file -> checksum")
    unknown = sorted(set(sums) - set(CHECKPOINT_FILES))
    if unknown:  # only these names are ever read: no path in the JSON can point outside the directory
        raise bad(f"lists unknown file(s) {unknown}; expected some of {list(CHECKPOINT_FILES)}")
    run_state = meta.get("info") or {}
    for key, kinds in (("tokens", int), ("skipped", int), ("elapsed", int | float), ("train_time", int | float)):
        value = run_state.get(key, 0)
        if not isinstance(value, kinds) or isinstance(value, bool) or not 0 <= value < 1e300:
            raise bad(f"has a non-numeric or negative info.{key}")
    if not isinstance(run_state.get("data", {}), dict):
        raise bad("has an info.data that is not an object")
    data = run_state.get("data", {})
    where = f"checkpoint {ckpt}: checkpoint.json info.data"
    field(data, "dir", "str", where, default=None, nullable=True)
    field(data, "tokenizer", "str", where, default=None, nullable=True)
    field(data, "vocab_size", "int", where, default=None, nullable=True, lo=2)
    train_cfg = meta.get("train_config") or {}
    if not isinstance(train_cfg.get("data_dir", ""), str) or not isinstance(train_cfg.get("seq_len", 0), int | None):
        raise bad("has a train_config with a non-string data_dir or a non-integer seq_len")
    if isinstance(train_cfg.get("seq_len"), int) and not 1 <= train_cfg["seq_len"] < 2**31:
        raise bad(f"has a train_config seq_len of {train_cfg['seq_len']}, expected 1 <= seq_len < 2**31")


def _read_verified(ckpt: Path, name: str, meta: dict[str, Any]) -> bytes | None:
    path = ckpt / name
    expected = meta.get("sha256", {}).get(name)
    if expected is None:
        return None
    try:
        data = path.read_bytes()
    except OSError as e:
        raise LoopnnError(
            f"checkpoint {ckpt}: cannot read {name} ({e.strerror}); the checkpoint is incomplete"
        ) from None
    if sha256(data) != expected:
        raise LoopnnError(
            f"checkpoint {ckpt}: {name} fails its checksum (truncated or modified); use another checkpoint"
        )
    return data


def verify(ckpt: Path) -> bool:
    """True when every file listed in checkpoint.json is present and matches its checksum."""
    return check(ckpt) is None


def check(ckpt: Path) -> str | None:
    """None when the checkpoint verifies, else why not (one line)."""
    try:
        meta = read_meta(ckpt)
        for name in meta.get("sha256", {}):
            _read_verified(ckpt, name, meta)
    except LoopnnError as e:
        return str(e)
    return None


def latest_checkpoint(run_dir: str | Path, skipped: list[str] | None = None) -> Path | None:
    """The newest checkpoint that verifies; damaged ones are skipped (and, given a list, reported into it)."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        problem = check(ckpt)
        if problem is None:
            return ckpt
        if skipped is not None:
            skipped.append(problem)
    return None


def warn_skipped(skipped: list[str], used: Path | None) -> None:
    """One stderr line per damaged checkpoint passed over on the way to an older one."""
    for problem in skipped if used is not None else ():
        print(f"loopnn: warning: skipped a damaged checkpoint ({problem}); using {used}", file=sys.stderr)


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint directory or a run directory (-> its newest valid checkpoint)."""
    path = Path(path)
    if (path / "checkpoint.json").is_file():
        return path
    if path.is_dir():
        skipped: list[str] = []
        ckpt = latest_checkpoint(path, skipped)
        if ckpt is not None:
            warn_skipped(skipped, ckpt)
            return ckpt
        why = f" (newest: {skipped[0]})" if skipped else ""
        raise LoopnnError(f"{path} holds no valid checkpoint{why}; train first or pass a checkpoint directory")
    if path.suffix in (".pt", ".pth", ".bin", ".pkl", ".ckpt"):
        raise LoopnnError(f"{path}: pickle-based files are refused; loopnn loads only safetensors + JSON checkpoints")
    if path.is_file():
        raise LoopnnError(
            f"{path} is a single file, not a checkpoint directory; loopnn loads only RUN/checkpoints/step-N "
            "directories (safetensors + checkpoint.json), never pickles"
        )
    raise LoopnnError(f"checkpoint {path} not found; pass a run directory or RUN/checkpoints/step-N")


def load_tensors(data: bytes, where: str) -> dict[str, torch.Tensor]:
    try:
        return st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise LoopnnError(f"{where} is not a valid safetensors file ({e})") from None


def load_state_into(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Strict load with a readable error for another architecture."""
    expected = {k: v for k, v in model.state_dict().items() if k != TIED_KEY}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise LoopnnError(f"{where} does not fit this architecture: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for k, v in tensors.items():
        if v.shape != expected[k].shape or v.dtype != expected[k].dtype:
            raise LoopnnError(
                f"{where}: tensor {k} has shape {tuple(v.shape)} {v.dtype}, the model expects "
                f"{tuple(expected[k].shape)} {expected[k].dtype} (a checkpoint of another architecture?)"
            )
    model.load_state_dict(tensors, strict=False)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and verify a checkpoint; returns meta plus 'model_state', 'state_tensors', 'optimizer_state'."""
    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    if WEIGHTS not in meta.get("sha256", {}):
        raise LoopnnError(f"checkpoint {ckpt}: checkpoint.json lists no {WEIGHTS}")
    out = dict(meta)
    out["path"] = ckpt
    out["model_state"] = load_tensors(_read_verified(ckpt, WEIGHTS, meta), f"{ckpt}/{WEIGHTS}")
    state = _read_verified(ckpt, "state.safetensors", meta)
    out["state_tensors"] = load_tensors(state, f"{ckpt}/state.safetensors") if state is not None else {}
    opt = _read_verified(ckpt, "optimizer.pt", meta)
    if opt is not None:
        try:
            out["optimizer_state"] = torch.load(io.BytesIO(opt), weights_only=True, map_location="cpu")
        except Exception as e:  # noqa: BLE001 - any unpickling failure means: refuse the file
            raise LoopnnError(f"checkpoint {ckpt}: optimizer.pt refused by the safe loader ({e})") from None
    else:
        out["optimizer_state"] = None
    return out


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """(LoopGPT in eval mode on `device`, checkpoint meta) from a checkpoint directory or a run directory (its
    newest valid checkpoint); meta["path"] is the checkpoint read. runs.open_run adds the tokenizer and data."""
    from loopnn.memory import check_fits

    ck = load_checkpoint(path)
    cfg = model_config_from_dict(ck["model_config"], where=f"checkpoint {ck['path']}")
    check_fits(cfg, where=f"checkpoint {ck['path']}")  # a hostile model_config must not exhaust memory
    return model_from_state(cfg, ck["model_state"], f"checkpoint {ck['path']}").to(device).eval(), ck


def model_from_state(cfg, tensors: dict[str, torch.Tensor], where: str):
    """LoopGPT(cfg) holding `tensors`. The config is checked against the weights' size before the model is built,
    so a config that asks for far more than its weights hold (a model_config of 5 GB beside a 1 MB
    model.safetensors) is refused in one line instead of allocating and initialising the 5 GB first."""
    from loopnn.memory import param_count
    from loopnn.model import LoopGPT

    need, held = param_count(cfg), sum(t.numel() for k, t in tensors.items() if k != TIED_KEY)
    if need != held:
        raise LoopnnError(
            f"{where}: the config describes a model of {need:,} parameters but the weights hold "
            f"{held:,} (a config of another architecture?); use the config the weights were saved with"
        )
    model = LoopGPT(cfg)
    load_state_into(model, tensors, where)
    return model
