"""Does the looped demo model lose to its parameter-matched baseline only because of the learning rate or the budget?

Trains the demo's `base` (2 blocks) and `loop` (2 blocks x 3 loops, default rule and strategy) at several learning
rates and token budgets, over seeds, on the demo data, and prints a Markdown table of mean and spread.

    python scripts/sensitivity.py --lrs 1e-3,2e-3,4e-3 --tokens 300000 --seeds 1337,1338
"""

import argparse
import statistics
from pathlib import Path

from loopnn import demo
from loopnn.train import train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lrs", default="1e-3,2e-3")
    p.add_argument("--tokens", default="300000")
    p.add_argument("--seeds", default="1337,1338")
    p.add_argument("--models", default="base,loop")
    p.add_argument("--out-dir", default="runs/sensitivity")
    args = p.parse_args()
    data = demo._data(None, progress=False)
    rows = []
    for tokens in [int(t) for t in args.tokens.split(",")]:
        for lr in [float(x) for x in args.lrs.split(",")]:
            for name in args.models.split(","):
                losses = []
                for seed in [int(s) for s in args.seeds.split(",")]:
                    out = Path(args.out_dir) / f"t{tokens}-lr{lr:g}"
                    mc, tc = demo.run_configs(name, seed, tokens, data, out, demo.MODELS[name], progress=False)
                    tc.lr = lr
                    losses.append(train(mc, tc, resume=True)["val"]["loss"])
                rows.append((tokens, lr, name, statistics.mean(losses), max(losses) - min(losses), len(losses)))
                print(rows[-1], flush=True)
    print("\n| tokens | lr | model | val loss mean | spread | seeds |\n|---|---|---|---|---|---|")
    for tokens, lr, name, mean, spread, n in rows:
        print(f"| {tokens:,} | {lr:g} | {name} | {mean:.4f} | {spread:.4f} | {n} |")


if __name__ == "__main__":
    main()
