"""`loopnn bench`: training and generation speed of loopnn against HF GPT-2 of the same size and loops.

    from loopnn.bench import BenchConfig, run_bench
    records = run_bench(BenchConfig(preset="demo", steps=20))     # one dict per implementation + a summary

In one process, warm-up excluded: training-step tokens/s (the two implementations' steps alternate, as their
prefills do), MFU (training_flops_per_token over the device peak:
a measured fp32 matmul peak on CPU, the bf16 dense peak of the GPU model on CUDA), peak memory, and prefill and
decode tokens/s with the KV cache. The HF reference is `GPT2LMHeadModel` with the same weights, its blocks
called in loopnn's loop schedule (`HFLooped`); its decode uses HF `generate` with its own cache, which only
holds one entry per block, so HF decode is measured at n_loops=1 only.

Also (BenchConfig.memory): peak training memory (forward + backward) at 1 and `memory_loops` loops, with and
without activation checkpointing, each in a fresh subprocess so that one measurement's allocations cannot hide
another's; and (BenchConfig.adaptive) the wall time of adaptive-exit decoding over fixed looping, on the preset's
random-weight model or on a trained run (BenchConfig.adaptive_run). The summary
record holds train_speedup_vs_hf, mfu, memory_ratio_6_loops (checkpointed n-loop peak / plain 1-loop peak) and
adaptive_wall_ratio.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import time
from typing import Any

import torch
import torch.nn as nn

from loopnn.config import ModelConfig, preset
from loopnn.flops import training_flops_per_token
from loopnn.genbench import (
    adaptive_on_run,
    bench_adaptive,
    bench_hf_generate,
    bench_loopnn_generate,
    bench_prefill,
    load_adaptive_run,
)
from loopnn.hftwin import HFLooped, hf_twin  # noqa: F401 - part of loopnn.bench's API
from loopnn.instruments import PeakMemory, bench_memory, cpu_matmul_peak, device_peak, sync  # noqa: F401
from loopnn.model import LoopGPT
from loopnn.options import BenchConfig  # noqa: F401 - part of loopnn.bench's API


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def bench_train(forwards: dict, params: dict, bc: BenchConfig, cfg: ModelConfig, seq_len: int, device) -> dict:
    """Median training-step time of forward(x, y) -> loss + backward + AdamW for each implementation
    ({name: forward}, {name: parameters}), warm-up excluded.

    Each warms up alone (its peak memory is measured then); their timed steps then alternate, one step of each
    in turn, so drift in the machine's speed (other processes, a neighbour on a shared host) hits them alike.
    """
    g = torch.Generator().manual_seed(bc.seed)
    x = torch.randint(0, cfg.vocab_size, (bc.batch_size, seq_len), generator=g).to(device)
    y = torch.randint(0, cfg.vocab_size, (bc.batch_size, seq_len), generator=g).to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    steps, out = {}, {}
    for name, forward in forwards.items():
        opt = torch.optim.AdamW(params[name], lr=1e-4, fused=True)  # as train.py: one fused kernel, for both

        def step(forward=forward, opt=opt) -> torch.Tensor:
            with autocast:
                loss = forward(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
            return loss

        with PeakMemory(device) as mem:
            for _ in range(max(bc.warmup, 1)):
                step()
        steps[name], out[name] = step, {"train_peak_mem_mb": mem.mb}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(bc.steps):
        for name, step in steps.items():
            t0 = time.perf_counter()
            out[name]["train_loss"] = step().item()
            times[name].append(time.perf_counter() - t0)
    for name, t in times.items():
        step_s = statistics.median(t)
        out[name].update(train_step_ms=step_s * 1e3, train_tokens_per_s=bc.batch_size * seq_len / step_s)
    return out


def model_config(bc: BenchConfig) -> ModelConfig:
    values = preset(bc.preset)
    if bc.n_loops is not None:
        values["n_loops"] = bc.n_loops
    if bc.loop_rule is not None:
        values["loop_rule"] = bc.loop_rule
    return ModelConfig(**values)


def bench_head_loss(vocab_size: int, n_embd: int, rows: int, repeats: int = 5) -> dict:
    """Forward + backward of the output head and loss, plain (full logits) vs chunked (loopnn.loss), CPU fp32.

    The two are timed alternately so that load from other processes hits both alike; medians are reported.
    """
    from loopnn.loss import chunked_head_loss, plain_head_loss

    padded = (vocab_size + 63) // 64 * 64
    g = torch.Generator().manual_seed(0)
    h = torch.randn(rows, n_embd, generator=g, requires_grad=True)
    w = (0.02 * torch.randn(padded, n_embd, generator=g)).requires_grad_()
    t = torch.randint(0, vocab_size, (rows,), generator=g)
    fns = {
        "plain": lambda: plain_head_loss(h, w, t, vocab_size),
        "chunked": lambda: chunked_head_loss(h, w, t, vocab_size),
    }
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(repeats + 1):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn().backward()
            if i:  # the first round is warm-up
                times[name].append(time.perf_counter() - t0)
            h.grad = w.grad = None
    plain, chunked = (statistics.median(times[k]) * 1e3 for k in ("plain", "chunked"))
    return {"vocab_size": vocab_size, "n_embd": n_embd, "rows": rows, "plain_ms": plain, "chunked_ms": chunked}


def environment(device: torch.device) -> dict[str, Any]:
    import os

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "git_sha": git_sha(),
        "load_average": [round(v, 2) for v in load] if load else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def run_bench(bc: BenchConfig, log=print) -> list[dict[str, Any]]:
    """All measurements; returns one record per implementation ('loopnn', 'hf') and a 'summary' record."""
    from loopnn.train import resolve_device

    if bc.threads:
        torch.set_num_threads(bc.threads)
    device = resolve_device(bc.device)
    # A missing run, or one adaptive exit cannot run, fails now, not after the training benchmarks
    adaptive_run = load_adaptive_run(bc, device) if bc.adaptive and bc.adaptive_run else None
    cfg = model_config(bc)
    seq_len = bc.seq_len or cfg.block_size
    n_loops = cfg.n_loops
    env = environment(device)
    peak, peak_source = device_peak(device)
    flops = training_flops_per_token(cfg, seq_len)["total"]
    torch.manual_seed(bc.seed)
    model = LoopGPT(cfg).to(device)
    twin = None
    if bc.hf:
        try:
            twin = hf_twin(model)
        except ImportError as e:
            log(f"transformers not importable ({e}); benchmarking loopnn only")
    g = torch.Generator().manual_seed(bc.seed + 1)
    if bc.prompt_len + bc.new_tokens > cfg.block_size:  # small presets: shrink both to fit the context
        bc = dataclasses.replace(bc, new_tokens=min(bc.new_tokens, cfg.block_size // 2))
        bc = dataclasses.replace(bc, prompt_len=min(bc.prompt_len, cfg.block_size - bc.new_tokens))
        log(f"prompt {bc.prompt_len} + new tokens {bc.new_tokens} fit block_size {cfg.block_size}")
    prompt = torch.randint(0, cfg.vocab_size, (bc.prompt_len,), generator=g)
    prompt = prompt.tolist()
    shape = dict(preset=bc.preset, n_loops=n_loops, loop_rule=cfg.loop_rule, batch_size=bc.batch_size,
                 seq_len=seq_len, compile=bc.compile, prompt_len=len(prompt), new_tokens=bc.new_tokens)  # fmt: skip
    impls: list[tuple[str, nn.Module]] = [("loopnn", model)] + ([("hf", twin)] if twin is not None else [])
    gens = _bench_generation(impls, prompt, bc, n_loops, device, log)
    log(f"training, {' and '.join(name for name, _ in impls)} alternately ...")
    trains = _bench_training(impls, bc, cfg, seq_len, device)
    records: list[dict[str, Any]] = []
    for name, _ in impls:
        tr = trains[name]
        tr["mfu"] = flops * tr["train_tokens_per_s"] / peak if peak else None
        records.append({"impl": name, **shape, **tr, **gens[name], "flops_per_token": flops, **env})
    if device.type == "cpu":
        # Other processes can make one measurement low (MFU > 100%): measure again now and keep the best.
        peak = max(peak, cpu_matmul_peak())
        for r in records:
            r["mfu"] = flops * r["train_tokens_per_s"] / peak
        peak_source = "measured fp32 matmul 2048^3, best of 3 before and 3 after the runs"
    summary = {"impl": "summary", **shape, "peak_flops": peak, "peak_source": peak_source, **env}
    summary["mfu"] = records[0]["mfu"]
    if bc.adaptive and bc.adaptive_run:
        log(f"adaptive-exit decode vs fixed looping on {bc.adaptive_run} ...")
        summary.update(adaptive_on_run(bc, device, log, adaptive_run))
    elif bc.adaptive and cfg.loop_strategy == "stack" and n_loops > 1:
        log("loopnn: adaptive-exit decode vs fixed looping ...")
        summary.update(bench_adaptive(model, prompt, bc, device))
    else:
        summary["adaptive_wall_ratio"] = None  # needs >1 loop and the stack strategy
    summary["memory_ratio_6_loops"] = None
    if bc.memory:
        log(f"peak training memory at 1 and {bc.memory_loops} loops, with and without checkpointing ...")
        _add_memory(records, summary, bench_memory(cfg, bc, seq_len, device, [r["impl"] for r in records]), bc)
    _add_speedups(records, summary)
    records.append(summary)
    return records


def _bench_generation(impls: list, prompt: list[int], bc: BenchConfig, n_loops: int, device, log) -> dict:
    """{impl: prefill (timed alternately) and greedy decode figures}, each model in eval mode."""
    nets = dict(impls)
    for net in nets.values():
        net.eval()
    log("prefill, loopnn and hf alternately ...")
    prefill = bench_prefill(nets["loopnn"], nets.get("hf"), prompt, bc, device)
    gens = {}
    for name, net in impls:
        log(f"{name}: generation ...")
        if name == "loopnn":
            gens[name] = bench_loopnn_generate(net, prompt, bc, device)
        else:
            gens[name] = bench_hf_generate(net, prompt, bc, n_loops, device)
        gens[name]["prefill_tokens_per_s"] = prefill[name]
    return gens


def _bench_training(impls: list, bc: BenchConfig, cfg: ModelConfig, seq_len: int, device) -> dict:
    """{impl: training-step figures}: the models in train mode (blocks compiled with bc.compile), stepped as
    bench_train steps them; loopnn as train.py calls it (the fused chunked head + loss), HF by its forward."""
    forwards, params = {}, {}
    for name, net in impls:
        net.train()
        if bc.compile:
            for block in net.transformer.h if name == "loopnn" else net.gpt2.transformer.h:
                block.compile()
        kw = {"return_logits": False} if name == "loopnn" else {}
        forwards[name] = lambda x, y, net=net, kw=kw: net(x, y, **kw)[1]
        params[name] = list(net.parameters())
    return bench_train(forwards, params, bc, cfg, seq_len, device)


def _add_memory(records: list[dict[str, Any]], summary: dict[str, Any], mem: dict, bc: BenchConfig) -> None:
    """Each record's peak memories, and the summary's checkpointed n-loop / plain 1-loop ratio (loopnn's)."""
    for r in records:
        r.update({f"train_peak_mem_mb_{k}": v for k, v in mem[r["impl"]].items()})
    ckpt_n, one = mem["loopnn"].get(f"loops{bc.memory_loops}_ckpt"), mem["loopnn"].get("loops1")
    summary["memory_loops"] = bc.memory_loops
    summary["memory_ratio_6_loops"] = ckpt_n / one if ckpt_n is not None and one else None


def _add_speedups(records: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """loopnn over HF, where both were measured: training, prefill and decode tokens/s."""
    summary["train_speedup_vs_hf"] = None
    if len(records) != 2:
        return
    ours, ref = records
    summary["hf_mfu"] = ref["mfu"]
    summary["train_speedup_vs_hf"] = ours["train_tokens_per_s"] / ref["train_tokens_per_s"]
    summary["prefill_speedup_vs_hf"] = ours["prefill_tokens_per_s"] / ref["prefill_tokens_per_s"]
    if ref.get("decode_tokens_per_s"):
        summary["decode_speedup_vs_hf"] = ours["decode_tokens_per_s"] / ref["decode_tokens_per_s"]
        summary["greedy_tokens_match"] = ours["greedy_tokens"] == ref.get("greedy_tokens")


def _fmt(v: Any, digits: int = 0) -> str:
    if v is None:
        return "n/a"
    return f"{v:,.{digits}f}"


def table(records: list[dict[str, Any]]) -> str:
    """Markdown table of the per-implementation records, plus the summary line."""
    rows = [r for r in records if r["impl"] != "summary"]
    summary = next(r for r in records if r["impl"] == "summary")
    lines = [
        "| impl | train tokens/s | step ms | MFU | train peak MB | prefill tokens/s | decode tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        lines.append(
            f"| {r['impl']} | {_fmt(r['train_tokens_per_s'])} | {_fmt(r['train_step_ms'], 1)} | {mfu} | "
            f"{_fmt(r['train_peak_mem_mb'], 1)} | {_fmt(r['prefill_tokens_per_s'])} | "
            f"{_fmt(r['decode_tokens_per_s'])} |"
        )
    peak = summary["peak_flops"]
    lines.append("")
    lines.append(
        f"peak {_fmt(peak / 1e9 if peak else None, 1)} GFLOP/s ({summary['peak_source']}); "
        + ", ".join(f"{k} {v:.2f}x" for k, v in summary.items() if k.endswith("speedup_vs_hf") and v is not None)
    )
    mem_keys = sorted({k for r in rows for k in r if k.startswith("train_peak_mem_mb_")}, key=lambda k: (len(k), k))
    if mem_keys:  # train_peak_mem_mb_loops6_ckpt -> "peak MB 6 loops ckpt"
        labels = [k.removeprefix("train_peak_mem_mb_loops").replace("_ckpt", " loops ckpt") for k in mem_keys]
        labels = [lb if "ckpt" in lb else f"{lb} loops" for lb in labels]
        lines += ["", "| impl | " + " | ".join(f"peak MB {lb}" for lb in labels) + " |"]
        lines.append("|---|" + "---|" * len(mem_keys))
        lines += [f"| {r['impl']} | " + " | ".join(_fmt(r.get(k), 1) for k in mem_keys) + " |" for r in rows]
    lines.append("")
    extra = []
    if summary.get("mfu") is not None:
        extra.append(f"MFU {100 * summary['mfu']:.1f}%")
    if summary.get("memory_ratio_6_loops") is not None:
        extra.append(f"memory {summary['memory_loops']} loops ckpt / 1 loop {summary['memory_ratio_6_loops']:.2f}x")
    if summary.get("adaptive_wall_ratio") is not None:
        extra.append(
            f"adaptive decode wall time / fixed {summary['adaptive_wall_ratio']:.2f}x "
            f"({100 * summary['adaptive_loops_saved']:.0f}% fewer loops, "
            f"{summary['adaptive_criterion']} {summary['adaptive_threshold']})"
        )
    if extra:
        lines.append("; ".join(extra))
    lines.append(
        f"torch {summary['torch']}, device {summary['device']}, threads {summary['threads']}, "
        f"git {summary['git_sha'][:12]}, load average {summary['load_average']}"
    )
    return "\n".join(lines)


def write_jsonl(records: list[dict[str, Any]], path: str | None) -> str:
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    if path:
        from pathlib import Path

        from loopnn.atomic import atomic_write_text

        atomic_write_text(Path(path), text)
    return text
