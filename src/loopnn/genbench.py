"""`loopnn bench`'s generation timings: prefill (loopnn and HF alternately), greedy decode through the KV cache,
and adaptive exit against fixed looping, on the bench's model or on a trained run (`adaptive_on_run`).

bc is a loopnn.bench.BenchConfig (not imported here: bench imports this module).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

import torch

from loopnn.adaptive import AdaptiveConfig, DecodeStats
from loopnn.errors import LoopnnError
from loopnn.generate import Decoder
from loopnn.hftwin import HFLooped
from loopnn.instruments import sync
from loopnn.model import LoopGPT


def _median_time(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _greedy_decode(dec: Decoder, new_tokens: int, device: torch.device) -> tuple[float, list[int]]:
    """Prefill dec, then time its greedy decoding of the other new_tokens - 1 tokens: (seconds, the tokens)."""
    logits = dec.prefill()
    sync(device)
    t0 = time.perf_counter()
    picked = []
    for _ in range(new_tokens - 1):
        picked.append(logits.argmax(-1))
        logits = dec.step(picked[-1])
    picked.append(logits.argmax(-1))
    sync(device)
    return time.perf_counter() - t0, [int(t[0]) for t in picked]


def bench_loopnn_generate(model: LoopGPT, prompt: list[int], bc: Any, device: torch.device) -> dict:
    """Greedy decode through loopnn's per-(loop, block) KV cache (Decoder); prefill is timed by bench_prefill."""
    times = []
    with torch.inference_mode():
        for _ in range(bc.gen_repeats):
            dec = Decoder(model, [prompt], bc.new_tokens, n_loops=bc.n_loops)
            t, tokens = _greedy_decode(dec, bc.new_tokens, device)
            times.append(t)
    return {"decode_tokens_per_s": (bc.new_tokens - 1) / statistics.median(times), "greedy_tokens": tokens}


def bench_hf_generate(hf: HFLooped, prompt: list[int], bc: Any, n_loops: int, device: torch.device) -> dict:
    """Decode (n_loops=1 only): HF generate with its DynamicCache, (new_tokens - 1) / (time of
    generate(new_tokens) - time of generate(1)). Prefill is timed by bench_prefill."""
    idx = torch.tensor([prompt], device=device)
    out: dict[str, Any] = {}
    if n_loops != 1:
        out["decode_tokens_per_s"] = None
        out["decode_note"] = "HF's cache holds one entry per block: decode measured at n_loops=1 only"
        return out
    with torch.inference_mode():
        kw = dict(do_sample=False, use_cache=True, attention_mask=torch.ones_like(idx))

        def gen(n: int):
            out["generated"] = hf.gpt2.generate(idx, max_new_tokens=n, min_new_tokens=n, **kw)

        gen(bc.new_tokens)  # warm-up
        t_one = _median_time(lambda: gen(1), bc.gen_repeats, device)
        t_all = _median_time(lambda: gen(bc.new_tokens), bc.gen_repeats, device)
        out["decode_tokens_per_s"] = (bc.new_tokens - 1) / max(t_all - t_one, 1e-9)
        out["greedy_tokens"] = out.pop("generated")[0, len(prompt) :].tolist()
    return out


def bench_prefill(
    model: LoopGPT, hf: HFLooped | None, prompt: list[int], bc: Any, device: torch.device
) -> dict[str, float]:
    """Prompt tokens/s of each implementation, timed alternately (ours, HF's, ours, ...; median of
    bc.prefill_repeats each after 5 warm-up rounds), so drift in the machine's speed hits both alike.

    loopnn: a Decoder's prefill (cache allocation included; the head on the last position only, all a
    generation needs). HF: a forward pass over the prompt, as generate's first step."""
    idx = torch.tensor([prompt], device=device)
    calls = {"loopnn": lambda: Decoder(model, [prompt], bc.new_tokens, n_loops=bc.n_loops).prefill()}
    if hf is not None:
        calls["hf"] = lambda: hf(idx)
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.inference_mode():
        for i in range(5 + bc.prefill_repeats):
            for name, call in calls.items():
                sync(device)
                t0 = time.perf_counter()
                call()
                sync(device)
                if i >= 5:
                    times[name].append(time.perf_counter() - t0)
    return {name: len(prompt) / statistics.median(t) for name, t in times.items()}


def bench_adaptive(
    model: LoopGPT, prompt: list[int], bc: Any, device: torch.device, adaptive: AdaptiveConfig | None = None
) -> dict:
    """Greedy decode of bc.new_tokens through the cache with adaptive exit (`adaptive`, default AdaptiveConfig())
    and with fixed looping, timed alternately (median of bc.gen_repeats each): wall-time ratio and loops saved."""

    def decode(adaptive: AdaptiveConfig | None) -> tuple[float, DecodeStats]:
        stats = DecodeStats()
        dec = Decoder(model, [prompt], bc.new_tokens, n_loops=bc.n_loops, adaptive=adaptive, stats=stats)
        return _greedy_decode(dec, bc.new_tokens, device)[0], stats

    model.eval()
    adaptive = adaptive or AdaptiveConfig()
    times: dict[str, list[float]] = {"fixed": [], "adaptive": []}
    with torch.inference_mode():
        decode(None), decode(adaptive)  # warm-up
        for _ in range(bc.gen_repeats):
            times["fixed"].append(decode(None)[0])
            t, stats = decode(adaptive)
            times["adaptive"].append(t)
    fixed, adapt = statistics.median(times["fixed"]), statistics.median(times["adaptive"])
    n_loops = bc.n_loops or model.config.n_loops
    return {
        "adaptive_criterion": adaptive.criterion,
        "adaptive_threshold": adaptive.threshold,
        "adaptive_decode_s": adapt,
        "fixed_decode_s": fixed,
        "adaptive_wall_ratio": adapt / fixed,
        "adaptive_mean_loops": stats.mean_loops,
        "adaptive_loops_saved": 1.0 - stats.mean_loops / n_loops,
    }


def load_adaptive_run(bc: Any, device: torch.device):
    """The run of BenchConfig.adaptive_run (runs.Run), checked to allow adaptive exit (so a wrong run fails at once)."""
    from loopnn.adaptive import check_adaptive
    from loopnn.runs import open_run

    run = open_run(bc.adaptive_run, "cpu")  # to the device only for its own part (memory figures)
    model = run.model
    check_adaptive(model, AdaptiveConfig())
    if min(bc.new_tokens, model.config.block_size - bc.prompt_len) < 2:
        raise LoopnnError(
            f"--prompt-len {bc.prompt_len} leaves no room to decode in the run's block_size {model.config.block_size}"
        )
    return run


def adaptive_on_run(bc: Any, device: torch.device, log=print, loaded=None) -> dict:
    """bench_adaptive on a trained run (loaded: load_adaptive_run's result), summed over validation prompts of its
    data: single-stream greedy decoding with AdaptiveConfig() against fixed looping at the run's loop count."""
    run = loaded or load_adaptive_run(bc, device)
    model = run.model.to(device)
    cfg = model.config
    new_tokens = min(bc.new_tokens, cfg.block_size - bc.prompt_len)
    prompts, source = _val_prompts(run.data_dir, bc.adaptive_prompts, bc.prompt_len, cfg.vocab_size, bc.seed)
    log(f"  {len(prompts)} prompts of {bc.prompt_len} tokens ({source}), {new_tokens} new tokens each")
    runs = [
        bench_adaptive(model, p, dataclasses.replace(bc, n_loops=None, new_tokens=new_tokens), device) for p in prompts
    ]
    adaptive, fixed = sum(r["adaptive_decode_s"] for r in runs), sum(r["fixed_decode_s"] for r in runs)
    out = dict(runs[0], adaptive_decode_s=adaptive, fixed_decode_s=fixed, adaptive_wall_ratio=adaptive / fixed)
    out["adaptive_loops_saved"] = statistics.mean(r["adaptive_loops_saved"] for r in runs)
    out["adaptive_mean_loops"] = statistics.mean(r["adaptive_mean_loops"] for r in runs)
    out.update(adaptive_run=str(bc.adaptive_run), adaptive_prompts=source, adaptive_n_loops=cfg.n_loops)
    return out


def _val_prompts(data_dir, n: int, length: int, vocab: int, seed: int) -> tuple[list[list[int]], str]:
    """The first `length` tokens of the first n validation windows of the data the run was trained on (runs.Run's
    absolute data_dir), or random tokens where that data cannot be read (the source says why)."""
    from loopnn.data import TokenData

    try:
        if not data_dir:
            raise LoopnnError("the checkpoint names no data directory")
        windows = next(iter(TokenData(data_dir).val_batches(n, length)))[0]
        if windows.max() >= vocab:
            raise LoopnnError(f"{data_dir} holds tokens beyond the model's vocab")
        return [row.tolist() for row in windows], f"validation data of {data_dir}"
    except (OSError, KeyError, ValueError, TypeError, StopIteration, LoopnnError) as e:
        g = torch.Generator().manual_seed(seed + 2)
        return torch.randint(0, vocab, (n, length), generator=g).tolist(), f"random tokens ({e})"
