"""Training: `train(model_cfg, train_cfg) -> summary`.

Reads top to bottom like nanoGPT's loop: AdamW (decay on 2-D weights only), linear warmup then cosine to
lr * min_lr_ratio, gradient accumulation and clipping, bf16 autocast on CUDA and fp32 on CPU, optional
per-block torch.compile and activation checkpointing applied from outside the model, DDP or FSDP2 under
torchrun (dist.wrap), loop counts sampled per step from (seed, step), truncated backprop through loops.
Every batch is drawn from a generator seeded by (seed, step, micro-step, rank), so a resumed run sees exactly
the batches the uninterrupted run would have seen. The run directory (runs.RunDir) holds the config, metrics,
summary and checkpoints.
"""

from __future__ import annotations

import hashlib
import math
import signal
import threading
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from loopnn import checkpoint as ckpt
from loopnn import dist, parallel, tracking
from loopnn.config import ModelConfig, TrainConfig, to_dict
from loopnn.data import TokenData
from loopnn.device import amp_dtype, check_torch, grad_scaler, resolve_device, set_speed_options
from loopnn.errors import LoopnnError
from loopnn.evaluate import evaluate, loop_telemetry
from loopnn.flops import mean_training_flops
from loopnn.memory import check_fits
from loopnn.model import LoopGPT
from loopnn.runlock import RunLock
from loopnn.runs import Counters, RunDir, rng_state

MAX_BAD_STEPS = 5  # consecutive non-finite steps before the run stops


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
    check_torch()
    device = resolve_device(cfg.device)
    set_speed_options(cfg, device)
    tracking.check_available(cfg.tracker)  # a missing package fails here, before data, model or process group
    info = dist.setup(str(device))
    if info.enabled and device.type == "cuda":
        device = torch.device(f"cuda:{info.local_rank}")
    if info.enabled and cfg.parallel == "fsdp" and amp_dtype(cfg, device) == torch.float16:
        # GradScaler's inf check is per rank and FSDP2's gradients are sharded: ranks could disagree on a skip
        raise LoopnnError("dtype float16 (GradScaler) is not supported with parallel fsdp; use --parallel ddp")
    data = TokenData(cfg.data_dir)
    seq_len, accum = _check_setup(model_cfg, cfg, data, info)
    check_fits(model_cfg, cfg.batch_size, seq_len, training=True, device=str(device))  # before any allocation
    run = RunDir(cfg.out_dir)
    if info.is_main:
        held.enter_context(RunLock(run.path))  # a second train on this directory is refused, naming this pid
        run.prepare(resume, overwrite)
    found = run.find_resume(to_dict(model_cfg)) if resume else None  # before the model: a changed config is refused

    torch.manual_seed(cfg.seed)
    model = LoopGPT(model_cfg).to(device)
    optimizer = make_optimizer(model, cfg, device)
    counters = run.resume(model, optimizer, found, device, info.is_main) if resume else Counters()

    _check_loop_settings(model_cfg, cfg)
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
        or (cfg.loop_grow_at > 0 and cfg.loop_grow_from == 1)
    )
    model, optimizer = dist.wrap(
        model, optimizer, lambda m: make_optimizer(m, cfg, device), cfg.parallel, device, info, find_unused
    )

    run_info = _run_info(model_cfg, cfg, raw_model, data, seq_len, info, device)
    if info.is_main:
        run.write_config(run_info, cfg.data_dir)
        run.tracker = tracking.open_tracker(cfg.tracker, cfg.tracker_project, run.path, counters.step, resume, run_info)
        if run.tracker is not None:
            held.callback(run.tracker.close)
    loop = _StepLoop(model_cfg, cfg, model, raw_model, optimizer, data, run, info, device, seq_len, accum, counters)
    summary = loop.run()
    summary.update({k: run_info[k] for k in ("params", "params_total", "flops_per_token", "seq_len", "device")})
    if info.is_main:
        run.write_summary(summary)
    return summary


def _check_setup(model_cfg: ModelConfig, cfg: TrainConfig, data: TokenData, info: dist.DistInfo) -> tuple[int, int]:
    """(sequence length, micro-batches per process and step), after checking they fit the model and data."""
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
    return seq_len, cfg.grad_accum // info.world_size


def _check_loop_settings(model_cfg: ModelConfig, cfg: TrainConfig) -> None:
    if (cfg.backprop_loops is not None or cfg.loop_sampling != "fixed") and model_cfg.loop_strategy != "stack":
        raise LoopnnError("backprop_loops and loop_sampling need loop_strategy 'stack'")
    if (cfg.loop_delay or cfg.loop_ramp) and model_cfg.n_loops == 1:
        raise LoopnnError("loop_delay and loop_ramp schedule the loop count; set n_loops >= 2 to use them")
    if cfg.loop_grow_at and model_cfg.n_loops <= cfg.loop_grow_from:
        raise LoopnnError(
            f"loop_grow_at grows the loop count from loop_grow_from ({cfg.loop_grow_from}) to n_loops "
            f"({model_cfg.n_loops}); set n_loops above loop_grow_from"
        )


def _run_info(model_cfg, cfg, raw_model: LoopGPT, data: TokenData, seq_len: int, info, device) -> dict[str, Any]:
    """The run's config: the resolved configs, sizes, FLOPs per token, the machine and the data's meta."""
    return {
        "model_config": to_dict(model_cfg),
        "train_config": to_dict(cfg),
        "params": raw_model.num_params(),
        "params_total": raw_model.num_params(non_embedding=False),
        "seq_len": seq_len,
        "tokens_per_step": cfg.batch_size * seq_len * cfg.grad_accum,
        "flops_per_token": mean_training_flops(model_cfg, cfg, seq_len),
        "world_size": info.world_size,
        "device": str(device),
        "torch": torch.__version__,
        "data": data.meta,
    }


class _StepLoop:
    """The optimizer steps of one session: batches, loss, update, logging, eval and checkpoint cadence."""

    def __init__(self, model_cfg, cfg, model, raw_model, optimizer, data, run, info, device, seq_len, accum, counters):
        self.model_cfg, self.cfg, self.optimizer = model_cfg, cfg, optimizer
        self.model, self.raw_model = model, raw_model  # raw_model: before the DDP / FSDP wrapper
        self.data, self.run_dir, self.info, self.device = data, run, info, device
        self.seq_len, self.accum, self.c = seq_len, accum, counters
        self.tokens_per_step = cfg.batch_size * seq_len * cfg.grad_accum
        dtype = amp_dtype(cfg, device)
        self.amp_dtype = dtype
        self.scaler = grad_scaler(device, dtype)  # fp16 only; disabled, it is the plain backward and step
        if self.scaler.is_enabled() and counters.grad_scaler:
            try:  # resume: the scale the run had reached
                self.scaler.load_state_dict(counters.grad_scaler)
            except (KeyError, TypeError, ValueError, RuntimeError) as e:
                raise LoopnnError(f"the checkpoint's grad_scaler state is malformed ({e}); resume without it") from None
        # fp16: the scaler's overflow steps (a finite loss, inf gradients) halve the scale; allow one per halving
        # from the initial 2**16 to 1 before a run of skipped steps stops the run.
        self.max_bad_steps = MAX_BAD_STEPS + (16 if self.scaler.is_enabled() else 0)
        # autocast, plus truncated backprop and activation checkpointing (the loop driver's policy, from outside)
        self.autocast = parallel.step_context(parallel.backprop_policy(cfg, model_cfg), dtype, device.type)
        self.t_start = time.time()
        self.t_side = 0.0  # seconds spent in evaluation and checkpointing, left out of tokens/s

    def elapsed(self) -> float:
        return self.c.elapsed + time.time() - self.t_start

    def run(self) -> dict[str, Any]:
        cfg, c, info = self.cfg, self.c, self.info
        opts = dict(
            desc=self.run_dir.path.name, unit="step", dynamic_ncols=True, disable=not (cfg.progress and info.is_main)
        )
        bar = tqdm(total=cfg.max_steps, initial=c.step, **opts)
        self.t_start, self.t_side = time.time(), 0.0
        t_log, tokens_log, side_log = time.time(), c.tokens, 0.0
        last_eval: dict[str, float] | None = None
        bad_steps, stopped_by = 0, None
        self.model.train()
        with _StopFlag() as stop:
            while c.step < cfg.max_steps:
                lr, n_loops, loss, grad_norm = self.step()
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    bad_steps += 1
                    self.skip(loss, bad_steps)
                    bar.update(1)
                    continue
                bad_steps = 0
                bar.update(1)
                if c.step % cfg.log_interval == 0 or c.step == cfg.max_steps:
                    now = time.time()
                    tok_s = (c.tokens - tokens_log) / max(now - t_log - (self.t_side - side_log), 1e-9)
                    t_log, tokens_log, side_log = now, c.tokens, self.t_side
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}")
                    self.log_train(lr, n_loops, loss, grad_norm, tok_s)
                if (cfg.eval_interval and c.step % cfg.eval_interval == 0) or c.step == cfg.max_steps:
                    last_eval = self.evaluate_and_log(bar)
                if cfg.ckpt_interval and c.step % cfg.ckpt_interval == 0 and c.step < cfg.max_steps:
                    t0 = time.time()
                    self.save("periodic")
                    self.t_side += time.time() - t0
                # Agreed across ranks: a signal that reached one rank stops all of them after this same step.
                stopped_by = dist.all_reduce_max_int(stop.signum or 0, info, self.device) or None
                if stopped_by is not None:
                    break
        bar.close()
        if last_eval is None:  # e.g. --resume of a finished run: report its loss instead of none
            last_eval = self.evaluate()
            last_eval.pop("telemetry", None)
        saved = self.save("interrupted" if stopped_by else "final")
        train_time = c.train_time + time.time() - self.t_start - self.t_side
        return {
            "run_dir": str(self.run_dir.path),
            "step": c.step,
            "max_steps": cfg.max_steps,
            "tokens": c.tokens,
            "wall_time": self.elapsed(),
            "train_time": train_time,
            "tokens_per_s": c.tokens / max(train_time, 1e-9),  # training only: eval and checkpoints left out
            "val": last_eval,
            "skipped_steps": c.skipped,
            "interrupted": stopped_by is not None,
            "checkpoint": str(saved) if saved else None,
        }

    def step(self) -> tuple[float, int, float, float]:
        """One optimizer step over `accum` micro-batches; (lr, loop count, mean loss, grad norm). A non-finite
        loss or gradient leaves the weights as they were (the caller counts the step as skipped)."""
        cfg, info, model, step = self.cfg, self.info, self.model, self.c.step
        lr = lr_at(step, cfg) * cfg.rewarm_factor(self.model_cfg.n_loops, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        n_loops = sample_loops(cfg, self.model_cfg.n_loops, step)
        for micro in range(self.accum):
            global_micro = micro * info.world_size + info.rank
            x, y = self.data.train_batch(cfg.batch_size, self.seq_len, batch_generator(cfg.seed, step, global_micro, 0))
            if self.device.type == "cuda":  # pinned host memory: the copy overlaps with queued GPU work
                x, y = x.pin_memory(), y.pin_memory()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            # DDP all-reduces once per step; FSDP2 reduce-scatters every micro-batch (sharded gradients)
            sync = micro == self.accum - 1 or not info.enabled or dist.is_fsdp(model)
            with nullcontext() if sync else model.no_sync(), self.autocast():
                _, loss = model(x, y, n_loops=n_loops, return_logits=False)  # chunked head where it helps
            self.scaler.scale(loss / self.accum).backward()
            loss_sum += loss.detach()
        loss_mean = dist.all_reduce_mean(loss_sum / self.accum, info)
        clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        self.scaler.unscale_(self.optimizer)  # fp16: clip and report the true gradient
        grad_norm = dist.full_tensor(torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), clip)).item()
        loss_value = loss_mean.item()
        self.c.step += 1
        if math.isfinite(loss_value) and math.isfinite(grad_norm):
            self.scaler.step(self.optimizer)
            self.c.tokens += self.tokens_per_step
        self.scaler.update()  # fp16: halve the scale after an overflow, grow it after a run of good steps
        self.optimizer.zero_grad(set_to_none=True)
        return lr, n_loops, loss_value, grad_norm

    def skip(self, loss: float, bad_steps: int) -> None:
        """Record a skipped (non-finite) step; stop the run after max_bad_steps in a row."""
        self.c.skipped += 1
        if self.info.is_main:
            # the step after it, like train records: truncation on resume then keeps exactly the steps before it
            self.run_dir.log({"step": self.c.step, "kind": "skip", "loss": str(loss)})
        if bad_steps >= self.max_bad_steps:
            self.c.step -= 1  # the checkpoint holds the last good weights, from before this step
            saved = self.save("nonfinite")
            raise LoopnnError(
                f"{bad_steps} consecutive non-finite steps at step {self.c.step}; the last good weights are "
                f"saved in {saved}. Lower lr or check the data, then resume"
            )

    def log_train(self, lr: float, n_loops: int, loss: float, grad_norm: float, tok_s: float) -> None:
        if not self.info.is_main:
            return
        c = self.c
        record = {"step": c.step, "kind": "train", "loss": loss, "lr": lr, "grad_norm": grad_norm}
        record |= {"n_loops": n_loops, "tokens": c.tokens, "elapsed": self.elapsed(), "tokens_per_s": tok_s}
        if self.scaler.is_enabled():
            record["grad_scale"] = self.scaler.get_scale()
        self.run_dir.log(record)
        if not self.cfg.progress:  # no bar: a plain line per log interval instead
            print(f"step {c.step}/{self.cfg.max_steps}: loss {loss:.4f}, {tok_s:,.0f} tokens/s", flush=True)

    def evaluate_and_log(self, bar) -> dict[str, float]:
        result = self.evaluate()
        telemetry = result.pop("telemetry", None)
        if self.info.is_main:
            if telemetry is not None:  # per-loop state norm, update norm, gate mean on one val batch
                self.run_dir.log({"step": self.c.step, "kind": "telemetry", **telemetry})
            record = {"step": self.c.step, "kind": "eval", "tokens": self.c.tokens}
            record.update({f"val_{k}": v for k, v in result.items()})
            record["elapsed"] = self.elapsed()
            self.run_dir.log(record)
            bar.write(f"step {self.c.step}: val loss {result['loss']:.4f}, bits/byte {result['bits_per_byte']:.4f}")
        return result

    def evaluate(self) -> dict[str, float]:
        t0 = time.time()
        cfg, info, raw_model = self.cfg, self.info, self.raw_model
        result = evaluate(
            raw_model,
            self.data,
            cfg.batch_size,
            self.seq_len,
            cfg.eval_tokens,
            amp_dtype=self.amp_dtype,
            rank=info.rank,
            world_size=info.world_size,
        )
        if self.model_cfg.loop_strategy == "stack" and (info.is_main or dist.is_fsdp(raw_model)):
            x, y = next(iter(self.data.val_batches(cfg.batch_size, self.seq_len, cfg.batch_size * self.seq_len)))
            with self.autocast():
                result["telemetry"] = loop_telemetry(raw_model, x.to(self.device), targets=y.to(self.device))
        self.t_side += time.time() - t0
        return result

    def save(self, kind: str) -> Path | None:
        model_state, optimizer_state = dist.full_state(self.raw_model, self.optimizer)  # FSDP: gathered, every rank
        if not self.info.is_main:
            return None
        c, cfg = self.c, self.cfg
        data = {"dir": str(Path(cfg.data_dir).resolve()), "tokenizer": self.data.tokenizer_name}
        meta = {"tokens": c.tokens, "elapsed": self.elapsed(), "kind": kind, "skipped": c.skipped}
        meta |= {"train_time": c.train_time + time.time() - self.t_start - self.t_side}
        meta["data"] = data | {"vocab_size": self.data.vocab_size}
        if self.scaler.is_enabled():
            meta["grad_scaler"] = self.scaler.state_dict()
        states = (model_state, self.model_cfg, to_dict(cfg), optimizer_state, rng_state(self.device), meta)
        return ckpt.save_checkpoint(self.run_dir.path, c.step, *states, keep=cfg.keep_checkpoints)
