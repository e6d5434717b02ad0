"""Training-step levers on one model, timed in one process with their steps alternating (docs/benchmarks.md).

    python scripts/bench_levers.py --preset demo --threads 2
    python scripts/bench_levers.py --preset cpu-base --levers default,compile-body

Each lever is the model's training step (forward, backward, AdamW, random tokens) with one thing changed:

    default             what `loopnn train` runs: eager, the fused chunked head + loss
    plain-loss          the full (B*T, vocab) logits and F.cross_entropy (the path before the fused loss)
    compile-body        torch.compile of the embeddings + every block in loop order (inductor's default mode)
    compile-max         the same with mode="max-autotune"
    bf16-autocast       torch.autocast("cpu", bfloat16) around the forward (AMX on CPUs that have it)
    math-attention      SDPA's math backend (matmuls + softmax) instead of the flash kernel, forward and backward

Every lever warms up first (compile time is printed), then the levers' timed steps alternate in rounds, so
drift in the machine's speed hits them alike. Prints the median step and its ratio to the first lever.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import torch

from loopnn import LoopGPT, ModelConfig, preset

LEVERS = ("default", "plain-loss", "compile-body", "compile-max", "bf16-autocast", "math-attention")


def make_step(cfg: ModelConfig, lever: str, x: torch.Tensor, y: torch.Tensor):
    torch.manual_seed(0)
    model = LoopGPT(cfg).train()
    if lever.startswith("compile"):
        model.body = torch.compile(model.body, mode="max-autotune" if lever == "compile-max" else None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    amp = lever == "bf16-autocast"
    math = lever == "math-attention"

    def step() -> float:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with contextlib.ExitStack() as stack:
            if amp:
                stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
            if math:
                stack.enter_context(sdpa_kernel(SDPBackend.MATH))
            _, loss = model(x, y, return_logits=lever == "plain-loss")
        loss.backward()  # the forward chose the attention kernel (and its backward) and the dtypes
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="demo")
    p.add_argument("--levers", default="default,plain-loss,compile-body,bf16-autocast")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="steps of each lever per round")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    levers = args.levers.split(",")
    unknown = sorted(set(levers) - set(LEVERS))
    if unknown:
        p.error(f"unknown levers {unknown}; choose from {', '.join(LEVERS)}")
    torch.set_num_threads(args.threads)
    cfg = ModelConfig(**preset(args.preset))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (args.batch_size, cfg.block_size), generator=g)
    y = torch.randint(0, cfg.vocab_size, (args.batch_size, cfg.block_size), generator=g)
    steps = {}
    for lever in levers:
        steps[lever] = make_step(cfg, lever, x, y)
        t0 = time.perf_counter()
        loss = steps[lever]()
        first = time.perf_counter() - t0
        for _ in range(2):
            steps[lever]()
        print(f"{lever}: first step {first:.1f} s (compile included), loss {loss:.6f}")
    times: dict[str, list[float]] = {lever: [] for lever in levers}
    for _ in range(args.rounds):
        for lever, step in steps.items():
            for _ in range(args.steps):
                t0 = time.perf_counter()
                step()
                times[lever].append(time.perf_counter() - t0)
    base = statistics.median(times[levers[0]])
    for lever, t in times.items():
        med = statistics.median(t)
        print(f"{lever:14s} median step {med * 1e3:7.1f} ms  ({med / base:.3f}x {levers[0]})")
    load = [round(v, 2) for v in os.getloadavg()]
    print(f"preset {args.preset}, batch {args.batch_size}, torch {torch.__version__}, {args.threads} threads")
    print(f"load average {load}")


if __name__ == "__main__":
    main()
