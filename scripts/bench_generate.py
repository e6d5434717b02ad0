"""Generation benchmarks on CPU: (a) KV-cached vs uncached decoding, (b) adaptive per-token looping.

    python scripts/bench_generate.py                       # both parts (trains a small model for part b)
    python scripts/bench_generate.py --part cache
    python scripts/bench_generate.py --part adaptive --run-dir runs/bench-generate/model   # reuse a model

Part (a) decodes --new-tokens greedy tokens after a --prompt-len prompt on a random-init cpu-base model
with n_loops=3, once through the KV cache and once recomputing the whole prefix at every step.
Part (b) needs a trained model (a random one settles nowhere): it prepares the pydoc corpus as bytes, trains
a looped cpu-small model with loopnn.train (unless --run-dir holds one), then scores the same validation
tokens with the fixed loop count and with adaptive exit at several thresholds (teacher-forced, token by token
through the cache) and prints mean loops per token, val loss change, executed FLOPs and wall time.
Prints figures only; docs/benchmarks.md records them with the command and the machine.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from loopnn import LoopGPT, ModelConfig, TrainConfig, preset
from loopnn.adaptive import AdaptiveConfig
from loopnn.adaptive_eval import evaluate_adaptive
from loopnn.generate import DecodeStats, generate


def bench_cache(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    shape = preset(args.cache_preset)
    cfg = ModelConfig(**dict(shape, n_loops=3, block_size=args.prompt_len + args.new_tokens))
    model = LoopGPT(cfg).eval()
    prompt = [torch.randint(0, cfg.vocab_size, (args.prompt_len,)).tolist()]
    generate(model, prompt, 8, temperature=0)  # warm-up
    times, outs = {}, {}
    for use_cache in (True, False):
        stats = DecodeStats()
        t0 = time.perf_counter()
        outs[use_cache] = generate(model, prompt, args.new_tokens, temperature=0, use_cache=use_cache, stats=stats)
        times[use_cache] = time.perf_counter() - t0
        label = "cached  " if use_cache else "uncached"
        print(
            f"{label}: {args.new_tokens} tokens in {times[use_cache]:.2f} s "
            f"({args.new_tokens / times[use_cache]:.1f} tok/s), decode FLOPs {stats.flops / 1e9:.2f} G"
        )
    print(f"same tokens: {outs[True] == outs[False]}; speed-up {times[False] / times[True]:.1f}x")


def trained_model(args: argparse.Namespace) -> tuple[LoopGPT, Path]:
    from loopnn.checkpoint import latest_checkpoint
    from loopnn.data import prepare
    from loopnn.train import train

    data_dir = Path(args.work_dir) / "pydoc-bytes"
    if not (data_dir / "meta.json").exists():
        prepare("pydoc", data_dir, tokenizer="bytes", progress=False)
    run_dir = Path(args.run_dir or Path(args.work_dir) / "model")
    if latest_checkpoint(run_dir) is None:
        model_cfg = ModelConfig(**dict(preset("cpu-small"), n_loops=args.n_loops, loop_rule=args.loop_rule))
        train_cfg = TrainConfig(
            data_dir=str(data_dir),
            out_dir=str(run_dir),
            batch_size=args.train_batch,
            seq_len=128,
            max_steps=args.train_steps,
            lr=2e-3,
            warmup_steps=50,
            eval_interval=0,
            eval_tokens=8192,
            progress=False,
        )
        t0 = time.perf_counter()
        summary = train(model_cfg, train_cfg, overwrite=True)
        val = summary.get("val", {}).get("loss")
        print(f"trained {args.train_steps} steps in {time.perf_counter() - t0:.0f} s, val loss {val}")
    from loopnn.runs import open_run

    return open_run(run_dir).model, data_dir


def bench_adaptive(args: argparse.Namespace) -> None:
    from loopnn.data import TokenData

    model, data_dir = trained_model(args)
    cfg = model.config
    batches = list(TokenData(data_dir).val_batches(16, 128, max_tokens=args.eval_tokens))
    print(
        f"model: n_layer={cfg.n_layer} n_embd={cfg.n_embd} n_loops={cfg.n_loops} rule={cfg.loop_rule}; "
        f"val tokens {sum(x.numel() for x, _ in batches)}"
    )
    base = evaluate_adaptive(model, batches, AdaptiveConfig(threshold=0.0))  # never exits
    fixed_fwd = best_of(args.eval_repeats, lambda: fixed_forward(model, batches))
    print(
        f"fixed {base.max_loops} loops: val loss {base.fixed_loss:.4f}, full forward {fixed_fwd:.3f} s "
        f"(best of {args.eval_repeats}); adaptive that never exits: {base.loss:.4f}"
    )
    head = ("criterion", "thresh", "loops", "saved", "val loss", "change", "FLOPs", "time")
    print("{:>9} {:>8} {:>6} {:>6} {:>9} {:>8} {:>6} {:>6}".format(*head))
    for criterion, thresholds in (("kl", args.kl), ("entropy", args.entropy), ("hidden", args.hidden)):
        for threshold in thresholds:
            ad = AdaptiveConfig(criterion=criterion, threshold=threshold, min_loops=1)
            runs = [evaluate_adaptive(model, batches, ad, compare_fixed=False) for _ in range(args.eval_repeats)]
            r = min(runs, key=lambda e: e.wall_time)
            change = (r.loss - base.fixed_loss) / base.fixed_loss
            print(
                f"{criterion:>9} {threshold:>8g} {r.mean_loops:>6.2f} {r.loop_saving:>6.1%} {r.loss:>9.4f} "
                f"{change:>+8.2%} {r.executed_flops / base.fixed_flops:>6.2f} {r.wall_time / fixed_fwd:>6.2f}"
            )
    print(
        "loops: mean loops per token; FLOPs: executed (exit checks included) / fixed-loop forward FLOPs; "
        "time: adaptive evaluation (every position at once, loop by loop) / the fixed model's forward, best of "
        f"{args.eval_repeats} each"
    )
    ad = AdaptiveConfig(threshold=args.kl_decode)
    tbt = evaluate_adaptive(model, batches, ad, compare_fixed=False, parallel=False)
    fixed_tbt = fixed_token_by_token(model, batches)
    print(
        f"token by token through the KV cache ({batches[0][0].shape[0]} rows decoded together), kl "
        f"{args.kl_decode:g}: adaptive {tbt.wall_time:.2f} s ({tbt.loop_saving:.1%} fewer loops, loss "
        f"{tbt.loss:.4f}) vs fixed {fixed_tbt:.2f} s = {tbt.wall_time / fixed_tbt:.2f}x"
    )
    decode_single_stream(args, model, batches)


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def fixed_forward(model: LoopGPT, batches) -> None:
    """The fixed model's val loss pass, as evaluate_adaptive's comparison runs it."""
    import torch.nn.functional as F

    with torch.no_grad():
        for x, y in batches:
            logits, _ = model(x)
            F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").item()


def fixed_token_by_token(model: LoopGPT, batches) -> float:
    """Seconds to score the batches token by token through the KV cache with the fixed loop count."""
    from loopnn.kvcache import KVCache

    t0 = time.perf_counter()
    with torch.inference_mode():
        for x, _ in batches:
            cache = KVCache(x.shape[1])
            for t in range(x.shape[1]):
                model.decode(x[:, t : t + 1], cache)
    return time.perf_counter() - t0


def decode_single_stream(args: argparse.Namespace, model: LoopGPT, batches) -> None:
    """Greedy decoding of one sequence (batch 1) from validation prompts: adaptive exit vs fixed looping."""
    from loopnn.bench import BenchConfig
    from loopnn.bench import bench_adaptive as time_adaptive

    bc = BenchConfig(new_tokens=args.decode_tokens, gen_repeats=args.decode_repeats)
    prompts = [row[: args.prompt_len].tolist() for x, _ in batches for row in x][: args.decode_prompts]
    for criterion, threshold in (("kl", t) for t in args.kl):
        fixed = adaptive = saved = 0.0
        for prompt in prompts:
            r = time_adaptive(model, prompt, bc, torch.device("cpu"), AdaptiveConfig(criterion, threshold))
            fixed, adaptive, saved = (
                fixed + r["fixed_decode_s"],
                adaptive + r["adaptive_decode_s"],
                saved + r["adaptive_loops_saved"],
            )
        print(
            f"single-stream greedy decode, {len(prompts)} val prompts of {args.prompt_len} tokens, "
            f"{bc.new_tokens} new tokens each, {criterion} {threshold:g}: {saved / len(prompts):.1%} fewer loops, "
            f"wall time {adaptive:.2f} s vs fixed {fixed:.2f} s = {adaptive / fixed:.3f}x (medians of "
            f"{bc.gen_repeats}, alternating)"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["all", "cache", "adaptive"], default="all")
    p.add_argument("--cache-preset", default="cpu-base", help="model shape for part (a), run with n_loops=3")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--work-dir", default="runs/bench-generate")
    p.add_argument("--run-dir", default=None, help="a trained run to reuse for part (b)")
    p.add_argument("--n-loops", type=int, default=4)
    p.add_argument("--loop-rule", default="repeat")
    p.add_argument("--train-steps", type=int, default=400)
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--kl", type=float, nargs="*", default=[0.01, 0.03, 0.05, 0.1])
    p.add_argument("--entropy", type=float, nargs="*", default=[0.05, 0.1])
    p.add_argument("--hidden", type=float, nargs="*", default=[0.2, 0.3])
    p.add_argument("--eval-repeats", type=int, default=3, help="part (b): timings of each evaluation (best)")
    p.add_argument("--kl-decode", type=float, default=0.05, help="part (b): kl threshold of the token-by-token pass")
    p.add_argument("--decode-prompts", type=int, default=4, help="part (b): val prompts for single-stream decode")
    p.add_argument("--decode-tokens", type=int, default=96, help="part (b): greedy tokens per prompt")
    p.add_argument("--decode-repeats", type=int, default=5, help="part (b): timings per prompt (median)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    if args.part in ("all", "cache"):
        bench_cache(args)
    if args.part in ("all", "adaptive"):
        bench_adaptive(args)


if __name__ == "__main__":
    main()
