"""Where a training step's time goes: torch.profiler over a preset's steps, grouped by kind of op.

    python scripts/profile_step.py --preset demo --threads 2
    python scripts/profile_step.py --preset demo --plain-loss      # the full-logits loss instead of the fused one

Prints the wall time of an unprofiled step (median of 20) and, for the profiled steps, the self CPU time per
step of each group of aten ops (matmuls, attention, softmax/loss, GELU, LayerNorm, copies and fills, the rest).
The profiler adds overhead, so read the groups as shares of their total, not as absolute times.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from loopnn import LoopGPT, ModelConfig, preset

GROUPS = {
    "matmuls": ("aten::mm", "aten::addmm", "aten::bmm"),
    "attention (SDPA)": ("scaled_dot_product",),
    "softmax / loss": ("softmax", "nll_loss", "logsumexp", "aten::gather", "aten::log"),
    "GELU": ("gelu",),
    "LayerNorm": ("layer_norm",),
    "copies and fills": ("aten::copy_", "aten::fill_", "aten::cat", "aten::zero_"),
    "bias sums": ("aten::sum",),
    "optimizer": ("adam",),
}


def group_of(name: str) -> str:
    for group, keys in GROUPS.items():
        if any(k in name for k in keys):
            return group
    return "the rest"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="demo")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=10, help="profiled steps")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--plain-loss", action="store_true", help="full logits + F.cross_entropy instead of the fused loss")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig(**preset(args.preset))
    model = LoopGPT(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, cfg.vocab_size, (args.batch_size, cfg.block_size))
    y = torch.randint(0, cfg.vocab_size, (args.batch_size, cfg.block_size))

    def step() -> None:
        _, loss = model(x, y, return_logits=args.plain_loss)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    per_group: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        if e.key.startswith("aten::") or e.key.startswith("Optimizer"):
            per_group[group_of(e.key.lower())] += e.self_cpu_time_total
    total = sum(per_group.values())
    loss = "plain" if args.plain_loss else "fused"
    step_ms = statistics.median(times) * 1e3
    print(f"preset {args.preset}, batch {args.batch_size}, {loss} loss, {args.threads} threads: step {step_ms:.1f} ms")
    print("(median of 20 unprofiled steps); self CPU time of the profiled steps by group:")
    for group, t in sorted(per_group.items(), key=lambda kv: -kv[1]):
        print(f"  {group:18s} {100 * t / total:5.1f}%  {t / args.steps / 1e3:6.2f} ms/step (profiled)")


if __name__ == "__main__":
    main()
