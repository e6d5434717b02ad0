"""A variant of the default demo's copy task, trained the demo's way (seeds side by side, loopnn.lanes): another
learning rate, budget or line length, to see how wide the window is where the looped block learns to copy and
the one-block base does not (docs/results.md, "Under ten minutes").

    python scripts/copy_trial.py --lr 4.5e-3                # base and loop, seeds 1-2, 4,000 steps
    python scripts/copy_trial.py --longest 24 --out runs/copy-trial-24
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import replace
from pathlib import Path

from loopnn import demo
from loopnn.data import prepare, synthetic


def variant_data(longest: int, root: Path) -> Path:
    """The copies corpus with strings of 4..longest symbols (12: the shipped one), prepared once under root."""
    out = root / f"copies-4-{longest}"
    if not (out / "meta.json").exists():

        def documents(n_documents: int = synthetic.COPIES_DOCUMENTS, seed: int = 0) -> list[tuple[str, str]]:
            rng = random.Random(seed)
            lines = lambda: "\n".join(synthetic.copies_line(rng, longest=longest) for _ in range(8)) + "\n"  # noqa: E731
            return [(f"copies#{i}", lines()) for i in range(n_documents)]

        synthetic.copies_documents = documents
        prepare("copies", out, tokenizer="bytes", progress=False)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lr", type=float, default=demo.MODES["copy"].train["lr"])
    p.add_argument("--steps", type=int, default=demo.MODES["copy"].steps)
    p.add_argument("--longest", type=int, default=12, help="longest string (the shortest is 4)")
    p.add_argument("--roles", default="base,loop")
    p.add_argument("--seeds", default="1,2")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--data-root", default="data/copy-trials")
    p.add_argument("--out", default=None, help="default runs/copy-trial-lr{lr}-{steps}-{longest}")
    a = p.parse_args()
    mode = demo.MODES["copy"]
    demo.MODES["copy"] = replace(mode, train=mode.train | dict(lr=a.lr))
    data = variant_data(a.longest, Path(a.data_root))
    out = Path(a.out or f"runs/copy-trial-lr{a.lr:g}-{a.steps}-{a.longest}")
    every = demo.models(roles=demo.ROLES)
    plan = []
    for role in a.roles.split(","):
        for seed in (int(s) for s in a.seeds.split(",")):
            plan.append((role, *demo.run_configs(role, seed, a.steps, data, out, every[role], False, "copy")))
    t0 = time.time()
    demo._train_all(plan, jobs=a.jobs, progress=False)
    print(f"lr {a.lr:g}, {a.steps} steps, strings of 4-{a.longest}; {time.time() - t0:.0f} s")
    for role, _, tc in plan:
        summary = json.loads((Path(tc.out_dir) / "summary.json").read_text())
        print(f"{role} seed {tc.seed}: val loss {summary['val']['loss']:.4f}")


if __name__ == "__main__":
    main()
