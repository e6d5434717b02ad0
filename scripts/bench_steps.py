"""Training steps per minute of the demo's looped model (1 block x 2 loops, width 128, BPE 2048, 1/N residual
scale + input injection 'add', batch 16 x 128), stepped exactly as train.py steps it (its optimizer, forward with
return_logits=False, backward, AdamW), on random tokens. Compares two source trees in one sitting by
alternating fresh processes:

    python scripts/bench_steps.py --src src --src /work/main/src --rounds 3 --steps 20 --threads 2

Each round runs every tree once (in order), so load from other processes hits the trees alike; the median
step time per tree over all rounds is reported as steps per minute.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time, torch
from loopnn.config import ModelConfig, TrainConfig
from loopnn.model import LoopGPT
from loopnn.train import make_optimizer
steps, warmup, threads = map(int, sys.argv[1:4])
torch.set_num_threads(threads)
cfg = ModelConfig(vocab_size=2048, block_size=128, n_layer=1, n_head=4, n_embd=128, n_loops=2,
                  residual_scale="inverse", injection="add")
torch.manual_seed(0)
model = LoopGPT(cfg)
opt = make_optimizer(model, TrainConfig(), torch.device("cpu"))
g = torch.Generator().manual_seed(0)
x = torch.randint(0, cfg.vocab_size, (16, 128), generator=g)
y = torch.randint(0, cfg.vocab_size, (16, 128), generator=g)
times = []
for i in range(warmup + steps):
    t0 = time.perf_counter()
    _, loss = model(x, y, return_logits=False)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if i >= warmup:
        times.append(time.perf_counter() - t0)
print(json.dumps({"times": times, "loss": loss.item()}))
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", action="append", required=True, help="a source tree holding loopnn/ (repeatable)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    times: dict[str, list[float]] = {s: [] for s in args.src}
    losses: dict[str, float] = {}
    for _ in range(args.rounds):
        for src in args.src:
            env = dict(os.environ, PYTHONPATH=os.path.abspath(src))
            cmd = [sys.executable, "-c", CHILD, str(args.steps), str(args.warmup), str(args.threads)]
            out = json.loads(subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout)
            times[src] += out["times"]
            losses[src] = out["loss"]
    base = statistics.median(times[args.src[-1]])
    for src, ts in times.items():
        med = statistics.median(ts)
        print(
            f"{src}: {60 / med:.0f} steps/min (median step {med * 1e3:.1f} ms over {len(ts)} steps), "
            f"loss after the steps {losses[src]:.6f}, {base / med:.3f}x the last tree"
        )
    print(f"load average {[round(v, 2) for v in os.getloadavg()]}, threads {args.threads}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
