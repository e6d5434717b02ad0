"""Training: `train(model_cfg, train_cfg) -> summary`.

Reads top to bottom like nanoGPT's loop: AdamW (decay on 2-D weights only), linear warmup then cosine to
lr * min_lr_ratio, gradient accumulation and clipping, bf16 autocast on CUDA and fp32 on CPU, optional
per-block torch.compile and activation checkpointing applied from outside the model, DDP or FSDP2 under
torchrun (dist.wrap), loop counts sampled per step from (seed, step), truncated backprop through loops.
Every batch is drawn from a generator seeded by (seed, step, micro-step, rank), so a resumed run sees exactly
the batches the uninterrupted run would have seen. The run directory holds config.json, metrics.jsonl,
summary.json and checkpoints/.
"""

from __future__ import annotations

import hashlib
import json
import math
import signal
import threading
import time
from collections import Counter
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from loopnn import checkpoint as ckpt
from loopnn import dist, parallel
from loopnn.atomic import atomic_write_bytes, atomic_write_text
from loopnn.config import ModelConfig, TrainConfig, to_dict
from loopnn.data import TokenData
from loopnn.errors import LoopnnError
from loopnn.evaluate import evaluate, loop_telemetry
from loopnn.flops import training_flops_per_token
from loopnn.memory import check_fits
from loopnn.model import LoopGPT
from loopnn.runlock import RunLock

MAX_BAD_STEPS = 5  # consecutive non-finite steps before the run stops


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LoopnnError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise LoopnnError(f"device must be auto, cpu, cuda or cuda:N; got {name!r}")
    return device


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA by default; never on CPU (bf16 matmuls there are ~100x slower)."""
    if cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def set_speed_options(cfg: TrainConfig, device: torch.device) -> None:
    """Process-wide speed settings: CPU thread count; TF32 matmuls on CUDA (Ampere+; fp32 work outside autocast)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    min_lr = cfg.lr * cfg.min_lr_ratio
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)


def make_optimizer(model: LoopGPT, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # 2-D weights decay; biases, norms, loop gates and loop embeddings (per-loop vectors) do not.
        (decay if p.dim() >= 2 and name not in ("loop_gate", "loop_embed") else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda" or None)


def batch_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """A generator fixed by (seed, step, micro-step, rank) through sha256: resume needs no sampler state.

    The trainer passes the global micro-batch index (local micro * world_size + rank) and rank 0, so N processes
    draw together exactly the batches one process draws with N times the accumulation.
    """
    key = f"loopnn-batch:{seed}:{step}:{micro}:{rank}".encode()
    # sha256, not Python's hash(): the same batches on every Python version and platform
    return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1)


def sample_loops(cfg: TrainConfig, n_loops: int, step: int) -> int:
    """The loop count of a training step (TrainConfig.loop_sampling), fixed by (seed, step) alone: every rank
    and every resumed run draws the same number with no communication."""
    cap = cfg.scheduled_loops(n_loops, step)  # loop_delay / loop_ramp: fewer loops early in training
    if cfg.loop_sampling == "fixed":
        return cap
    low, high = cfg.loop_range(n_loops)
    g = batch_generator(cfg.seed, step, -1, -1)  # -1: a stream no batch ever uses
    if cfg.loop_sampling == "uniform":
        k = int(torch.randint(low, high + 1, (1,), generator=g).item())
    else:  # poisson, mean n_loops, clamped
        k = min(max(int(torch.poisson(torch.tensor([float(n_loops)]), generator=g).item()), low), high)
    return k if cap == n_loops else min(k, cap)  # the schedule caps sampled counts while it holds them down


def mean_training_flops(model_cfg: ModelConfig, cfg: TrainConfig, seq_len: int) -> dict[str, int]:
    """Training FLOPs per token averaged over the run's steps: exact for a fixed count under loop_delay /
    loop_ramp (steps with fewer loops cost less), at the mean count for sampled loops."""
    if cfg.loop_sampling != "fixed" or (cfg.loop_delay == 0 and cfg.loop_ramp == 0):
        return training_flops_per_token(model_cfg, seq_len, backprop_loops=cfg.backprop_loops)
    steps_at = Counter(cfg.scheduled_loops(model_cfg.n_loops, s) for s in range(cfg.max_steps))  # loops -> steps
    flops = {n: training_flops_per_token(model_cfg, seq_len, n, cfg.backprop_loops) for n in steps_at}
    total = {k: sum(flops[n][k] * c for n, c in steps_at.items()) for k in ("forward", "backward", "total")}
    return {k: round(v / cfg.max_steps) for k, v in total.items()}


def _prepare_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    if ckpt.list_checkpoints(out) and not (resume or overwrite):
        raise LoopnnError(
            f"{out} already holds checkpoints of a run; pass --resume to continue it, --overwrite to replace "
            "it, or choose another --out-dir"
        )
    if overwrite and not resume:
        for old in ckpt.list_checkpoints(out):
            import shutil

            shutil.rmtree(old)
        (out / "metrics.jsonl").unlink(missing_ok=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LoopnnError(f"cannot create run directory {out}: {e.strerror}") from None


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise LoopnnError(f"cannot write {path}: {e.strerror}; check free space and permissions") from None


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records written after the checkpoint so the log reads as one uninterrupted run."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a killed writer
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            keep.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def _load_optimizer(optimizer: torch.optim.Optimizer, state: Any, where: Path) -> None:
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


class _StopFlag:
    """SIGINT/SIGTERM request a clean stop: finish the step, checkpoint, exit.

    The flag is per process: under torchrun a signal may reach one rank only, so the trainer agrees on it
    across ranks (dist.all_reduce_max_int, once per step) before it leaves the loop; every rank then stops after
    the same step and rank 0 writes one checkpoint. A second signal stops this process at once.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def train(
    model_cfg: ModelConfig, train_cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False
) -> dict[str, Any]:
    """Train a LoopGPT; returns the summary also written to RUN/summary.json."""
    with ExitStack() as held:  # the run directory's lock (runlock.py), from when it is first touched to the end
        return _train(model_cfg, train_cfg, resume=resume, overwrite=overwrite, held=held)


def _train(
    model_cfg: ModelConfig, train_cfg: TrainConfig, *, resume: bool, overwrite: bool, held: ExitStack
) -> dict[str, Any]:
    cfg = train_cfg
    device = resolve_device(cfg.device)
    set_speed_options(cfg, device)
    info = dist.setup(str(device))
    if info.enabled and device.type == "cuda":
        device = torch.device(f"cuda:{info.local_rank}")
    data = TokenData(cfg.data_dir)
    if data.vocab_size != model_cfg.vocab_size:
        raise LoopnnError(
            f"model vocab_size {model_cfg.vocab_size} does not match the data's {data.vocab_size} "
            f"({cfg.data_dir}); set vocab_size = {data.vocab_size} or prepare matching data"
        )
    seq_len = cfg.seq_len or model_cfg.block_size
    if seq_len > model_cfg.block_size:
        raise LoopnnError(f"seq_len {seq_len} exceeds the model's block_size {model_cfg.block_size}")
    if cfg.grad_accum % info.world_size:
        raise LoopnnError(f"grad_accum {cfg.grad_accum} must be a multiple of the process count {info.world_size}")
    accum = cfg.grad_accum // info.world_size
    check_fits(model_cfg, cfg.batch_size, seq_len, training=True, device=str(device))  # before any allocation
    out = Path(cfg.out_dir)
    if info.is_main:
        held.enter_context(RunLock(out))  # a second train on this directory is refused, naming this pid
        _prepare_run_dir(out, resume, overwrite)

    torch.manual_seed(cfg.seed)
    model = LoopGPT(model_cfg).to(device)
    optimizer = make_optimizer(model, cfg, device)
    step, tokens_seen, elapsed_before, train_time_before, skipped_before = 0, 0, 0.0, 0.0, 0
    if resume:
        skipped: list[str] = []
        last = ckpt.latest_checkpoint(out, skipped)
        if last is None and skipped:  # never silently restart over a run whose checkpoints are all damaged
            raise LoopnnError(
                f"{out} holds {len(skipped)} checkpoint(s), none usable (newest: {skipped[0]}); repair it, or pass "
                "--overwrite without --resume to start the run again"
            )
        if info.is_main:
            ckpt.warn_skipped(skipped, last)
        if last is not None:
            loaded = ckpt.load_checkpoint(last)
            if loaded["model_config"] != to_dict(model_cfg):
                now = to_dict(model_cfg)
                diff = ", ".join(
                    f"{k}={loaded['model_config'].get(k)!r} (now {now.get(k)!r})"
                    for k in sorted(set(now) | set(loaded["model_config"]))
                    if loaded["model_config"].get(k) != now.get(k)
                )
                raise LoopnnError(
                    f"{last} was trained with another model config ({diff}); resume with the same settings "
                    "(the run's config.json lists them)"
                )
            ckpt.load_state_into(model, loaded["model_state"], f"checkpoint {last}")
            if loaded["optimizer_state"] is not None:
                _load_optimizer(optimizer, loaded["optimizer_state"], last)
            restore_rng_state(loaded["state_tensors"], device, last)
            step = loaded["step"]
            run_state = loaded.get("info") or {}
            tokens_seen = int(run_state.get("tokens", 0))
            elapsed_before = float(run_state.get("elapsed", 0.0))
            train_time_before = float(run_state.get("train_time", 0.0))
            skipped_before = int(run_state.get("skipped", 0))
            if info.is_main:
                _truncate_metrics(out / "metrics.jsonl", step)
                dist.print0(f"resuming from {last} (step {step})")
        elif info.is_main:
            _truncate_metrics(out / "metrics.jsonl", 0)  # records of a run killed before its first checkpoint
            dist.print0(f"no checkpoint in {out}; starting from scratch")

    if (cfg.backprop_loops is not None or cfg.loop_sampling != "fixed") and model_cfg.loop_strategy != "stack":
        raise LoopnnError("backprop_loops and loop_sampling need loop_strategy 'stack'")
    if (cfg.loop_delay or cfg.loop_ramp) and model_cfg.n_loops == 1:
        raise LoopnnError("loop_delay and loop_ramp schedule the loop count; set n_loops >= 2 to use them")
    raw_model = model
    if cfg.compile:
        parallel.compile_blocks(model)
    # Steps that may leave a parameter without gradient (a 1-loop step skips the adapter; truncated backprop
    # skips the prelude) need DDP's unused-parameter search.
    find_unused = (
        cfg.backprop_loops is not None
        or cfg.loop_range(model_cfg.n_loops)[0] == 1
        or cfg.loop_delay > 0
        or cfg.loop_ramp > 0
    )
    model, optimizer = dist.wrap(
        model, optimizer, lambda m: make_optimizer(m, cfg, device), cfg.parallel, device, info, find_unused
    )
    autocast_dtype = amp_dtype(cfg, device)
    # autocast, plus truncated backprop and activation checkpointing (the loop driver's policy, applied from outside)
    autocast = parallel.step_context(parallel.backprop_policy(cfg, model_cfg), autocast_dtype)

    flops = mean_training_flops(model_cfg, cfg, seq_len)
    tokens_per_step = cfg.batch_size * seq_len * cfg.grad_accum
    run_info = {
        "model_config": to_dict(model_cfg),
        "train_config": to_dict(cfg),
        "params": raw_model.num_params(),
        "params_total": raw_model.num_params(non_embedding=False),
        "seq_len": seq_len,
        "tokens_per_step": tokens_per_step,
        "flops_per_token": flops,
        "world_size": info.world_size,
        "device": str(device),
        "torch": torch.__version__,
        "data": data.meta,
    }
    metrics_path = out / "metrics.jsonl"
    if info.is_main:
        atomic_write_text(out / "config.json", json.dumps(run_info, indent=2, sort_keys=True) + "\n")
        trained_tokenizer = Path(cfg.data_dir) / "tokenizer.json"
        if trained_tokenizer.is_file():  # a trained BPE travels with the run (generate/eval need no data dir)
            atomic_write_bytes(out / "tokenizer.json", trained_tokenizer.read_bytes())

    def evaluate_now() -> dict[str, float]:
        nonlocal t_side
        t0 = time.time()
        result = evaluate(
            raw_model,
            data,
            cfg.batch_size,
            seq_len,
            cfg.eval_tokens,
            amp_dtype=autocast_dtype,
            rank=info.rank,
            world_size=info.world_size,
        )
        if model_cfg.loop_strategy == "stack" and (info.is_main or dist.is_fsdp(raw_model)):
            x, _ = next(iter(data.val_batches(cfg.batch_size, seq_len, cfg.batch_size * seq_len)))
            with autocast():
                result["telemetry"] = loop_telemetry(raw_model, x.to(device))
        t_side += time.time() - t0
        return result

    def save(kind: str) -> Path | None:
        model_state, optimizer_state = dist.full_state(raw_model, optimizer)  # FSDP: gathered, on every rank
        if not info.is_main:
            return None
        state = rng_state(device)
        meta = {
            "tokens": tokens_seen,
            "elapsed": elapsed_before + time.time() - t_start,
            "train_time": train_time_before + time.time() - t_start - t_side,
            "kind": kind,
            "skipped": skipped,
            "data": {
                "dir": str(Path(cfg.data_dir).resolve()),
                "tokenizer": data.tokenizer_name,
                "vocab_size": data.vocab_size,
            },
        }
        return ckpt.save_checkpoint(
            out, step, model_state, model_cfg, to_dict(cfg), optimizer_state, state, meta, keep=cfg.keep_checkpoints
        )

    bar = tqdm(
        total=cfg.max_steps,
        initial=step,
        disable=not (cfg.progress and info.is_main),
        desc=out.name,
        unit="step",
        dynamic_ncols=True,
    )
    t_start = time.time()
    t_side = 0.0  # seconds spent in evaluation and checkpointing, left out of tokens/s
    t_log, tokens_log, side_log = time.time(), tokens_seen, 0.0
    last_eval: dict[str, float] | None = None
    bad_steps, skipped = 0, skipped_before  # skipped: non-finite steps over the whole run, resumes included
    stopped_by: int | None = None
    model.train()
    with _StopFlag() as stop:
        while step < cfg.max_steps:
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            n_loops = sample_loops(cfg, model_cfg.n_loops, step)
            for micro in range(accum):
                global_micro = micro * info.world_size + info.rank
                x, y = data.train_batch(cfg.batch_size, seq_len, batch_generator(cfg.seed, step, global_micro, 0))
                if device.type == "cuda":  # pinned host memory: the copy overlaps with queued GPU work
                    x, y = x.pin_memory(), y.pin_memory()
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                # DDP all-reduces once per step; FSDP2 reduce-scatters every micro-batch (sharded gradients)
                sync = micro == accum - 1 or not info.enabled or dist.is_fsdp(model)
                with nullcontext() if sync else model.no_sync(), autocast():
                    _, loss = model(x, y, n_loops=n_loops, return_logits=False)  # chunked head where it helps
                (loss / accum).backward()
                loss_sum += loss.detach()
            loss_mean = dist.all_reduce_mean(loss_sum / accum, info)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                raw_model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            )
            grad_norm = dist.full_tensor(grad_norm)
            loss_value = loss_mean.item()
            if not (math.isfinite(loss_value) and math.isfinite(grad_norm.item())):
                # Skip the update: the weights stay at the last good state.
                optimizer.zero_grad(set_to_none=True)
                bad_steps += 1
                skipped += 1
                if info.is_main:
                    # step + 1, like train records: truncation on resume then keeps exactly the steps before it
                    _append_jsonl(metrics_path, {"step": step + 1, "kind": "skip", "loss": str(loss_value)})
                if bad_steps >= MAX_BAD_STEPS:
                    saved = save("nonfinite")
                    raise LoopnnError(
                        f"{bad_steps} consecutive non-finite steps at step {step}; the last good weights are "
                        f"saved in {saved}. Lower lr or check the data, then resume"
                    )
                step += 1
                bar.update(1)
                continue
            bad_steps = 0
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += tokens_per_step
            bar.update(1)

            if step % cfg.log_interval == 0 or step == cfg.max_steps:
                now = time.time()
                tok_s = (tokens_seen - tokens_log) / max(now - t_log - (t_side - side_log), 1e-9)
                t_log, tokens_log, side_log = now, tokens_seen, t_side
                record = {
                    "step": step,
                    "kind": "train",
                    "loss": loss_value,
                    "lr": lr,
                    "grad_norm": grad_norm.item(),
                    "n_loops": n_loops,
                    "tokens": tokens_seen,
                    "elapsed": elapsed_before + now - t_start,
                    "tokens_per_s": tok_s,
                }
                bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tok_s:,.0f}")
                if info.is_main:
                    _append_jsonl(metrics_path, record)
                    if not cfg.progress:  # no bar: a plain line per log interval instead
                        print(f"step {step}/{cfg.max_steps}: loss {loss_value:.4f}, {tok_s:,.0f} tokens/s", flush=True)
            if (cfg.eval_interval and step % cfg.eval_interval == 0) or step == cfg.max_steps:
                last_eval = evaluate_now()
                telemetry = last_eval.pop("telemetry", None)
                if info.is_main:
                    if telemetry is not None:  # per-loop state norm, update norm, gate mean on one val batch
                        _append_jsonl(metrics_path, {"step": step, "kind": "telemetry", **telemetry})
                    record = {"step": step, "kind": "eval", "tokens": tokens_seen}
                    record.update({f"val_{k}": v for k, v in last_eval.items()})
                    record["elapsed"] = elapsed_before + time.time() - t_start
                    _append_jsonl(metrics_path, record)
                    bar.write(
                        f"step {step}: val loss {last_eval['loss']:.4f}, bits/byte {last_eval['bits_per_byte']:.4f}"
                    )
            if cfg.ckpt_interval and step % cfg.ckpt_interval == 0 and step < cfg.max_steps:
                t0 = time.time()
                save("periodic")
                t_side += time.time() - t0
            # Agreed across ranks: a signal that reached one rank stops all of them after this same step.
            stopped_by = dist.all_reduce_max_int(stop.signum or 0, info, device) or None
            if stopped_by is not None:
                break
    bar.close()
    if last_eval is None:  # e.g. --resume of a finished run: report its loss instead of none
        last_eval = evaluate_now()
        last_eval.pop("telemetry", None)
    saved = save("interrupted" if stopped_by else "final")
    wall = elapsed_before + time.time() - t_start
    train_time = train_time_before + time.time() - t_start - t_side
    summary = {
        "run_dir": str(out),
        "step": step,
        "max_steps": cfg.max_steps,
        "tokens": tokens_seen,
        "wall_time": wall,
        "train_time": train_time,
        "tokens_per_s": tokens_seen / max(train_time, 1e-9),  # training only: eval and checkpoints left out
        "val": last_eval,
        "skipped_steps": skipped,
        "interrupted": stopped_by is not None,
        "checkpoint": str(saved) if saved else None,
        **{k: run_info[k] for k in ("params", "params_total", "flops_per_token", "seq_len", "device")},
    }
    if info.is_main:
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary
