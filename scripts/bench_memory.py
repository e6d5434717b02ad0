"""Peak CPU memory of one training step (forward + backward) with and without activation checkpointing and
truncated backprop through loops.

Each setting runs in a fresh subprocess; the figure is the growth of the process's peak resident set size
(resource.getrusage ru_maxrss) over the step, after the model, a warm-up step and the optimizer state exist, so
it counts activations and gradients, not torch itself. Usage:

    python scripts/bench_memory.py [--preset cpu-small] [--n-loops 8] [--batch-size 16] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys

SETTINGS = {
    "full backprop": dict(checkpointing=None, backprop_loops=None),
    "checkpointing per block": dict(checkpointing="block", backprop_loops=None),
    "checkpointing per loop": dict(checkpointing="loop", backprop_loops=None),
    "checkpointing per loop and block (nested)": dict(checkpointing="nested", backprop_loops=None),
    "backprop_loops=2": dict(checkpointing=None, backprop_loops=2),
    "checkpointing per loop + backprop_loops=2": dict(checkpointing="loop", backprop_loops=2),
}


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(args: argparse.Namespace, setting: dict) -> dict:
    import torch

    from loopnn import LoopGPT, ModelConfig, loop, preset

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = LoopGPT(ModelConfig(**(preset(args.preset) | dict(n_loops=args.n_loops))))
    policy = loop.Backprop(**setting)  # what `loopnn train` sets from --activation-checkpointing/--backprop-loops
    vocab = model.config.vocab_size
    x = torch.randint(0, vocab, (args.batch_size, args.seq_len))
    with loop.backprop(policy):
        # Warm-up on a small batch: allocates gradients and the allocator's pools outside the measured step.
        model(x[:1, :8], x[:1, :8])[1].backward()
        base = peak_mib()
        _, loss = model(x, x)
    loss.backward()
    return {"peak_growth_mib": peak_mib() - base, "loss": loss.item()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="cpu-small")
    p.add_argument("--n-loops", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args, SETTINGS[args.child])))
        return 0
    print(
        f"{args.preset}, n_loops {args.n_loops}, batch {args.batch_size} x {args.seq_len} tokens, "
        f"{platform.processor() or platform.machine()}, {args.threads} threads"
    )
    print("| setting | peak memory growth (MiB) | loss |\n|---|---|---|")
    rest = sys.argv[1:] if argv is None else argv
    for name in SETTINGS:
        cmd = [sys.executable, __file__, *rest, "--child", name]
        result = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
        print(f"| {name} | {result['peak_growth_mib']:.0f} | {result['loss']:.6f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
