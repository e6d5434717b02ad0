"""Round two's search for a copy task on which a looped block separates from its base within minutes on 2 cores
(docs/results.md, "The first ten minutes"). Each run trains one role on a synthetic corpus of random strings
written `reps` times (`s|s|s`), then reads the val loss on the repeats (loopnn.evaluate.copies_mask: the tokens
only in-context copying predicts) at every kept checkpoint, so the curve shows when copying is learned.

    python scripts/copy_search.py            # every run of PLAN not yet in runs/copysearch/results.jsonl
    python scripts/copy_search.py --only g   # the runs whose tag starts with g
    python scripts/copy_search.py --table    # the table, from results.jsonl

The corpora are written by this script with loopnn.data.synthetic.copies_line (not the shipped `copies` corpus): one
text file of 32,000 lines per variant, from Python's `random` seeded 0, prepared with the bytes tokenizer. Losses are
deterministic per seed; wall times depend on what else runs.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from loopnn.checkpoint import list_checkpoints
from loopnn.config import ModelConfig, TrainConfig
from loopnn.data import TokenData, prepare
from loopnn.data.synthetic import copies_line
from loopnn.demo import RECIPE
from loopnn.evaluate import copies_mask, split_loss
from loopnn.runs import open_run
from loopnn.train import train

OUT = Path("runs/copysearch")
SYMBOLS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
CORPORA = {  # name: (alphabet size, shortest, longest, copies per line)
    "a26": (26, 8, 40, 2),
    "c16": (16, 4, 16, 2),
    "d16r3": (16, 4, 12, 3),
}
ROLES = {
    "base": dict(n_layer=1),
    "loop": dict(n_layer=1, n_loops=2) | RECIPE,  # the demo's recipe
    "loop-plain": dict(n_layer=1, n_loops=2),  # no scaling, injection or boundary norm
    "deeper": dict(n_layer=2),
}
W128 = dict(width=128, ctx=64, lr=3e-3, probes=16)
# (tag, corpus, roles, seeds, steps, settings): in the order they were run
PLAN = [
    ("a", "a26", ("base", "loop"), (1,), 600, dict(width=128, ctx=128, lr=2e-3, probes=6)),
    ("b", "a26", ("deeper",), (1,), 600, dict(width=128, ctx=128, lr=5e-3, probes=6)),
    ("c", "c16", ("deeper",), (1,), 600, dict(width=64, ctx=64, lr=5e-3, probes=6)),
    ("d", "d16r3", ("deeper",), (1,), 1000, dict(width=64, ctx=64, lr=1e-2, warmup=50, batch=32, probes=10)),
    ("e", "d16r3", ("deeper", "loop", "base", "loop-plain"), (1,), 3000, dict(width=64, ctx=64, lr=3e-3, probes=15)),
    ("f", "d16r3", ("loop",), (1,), 8000, dict(width=64, ctx=64, lr=3e-3, probes=16)),
    ("g", "d16r3", ("loop",), (1,), 4000, W128),
    ("h", "d16r3", ("loop",), (1,), 2500, W128 | dict(lr=6e-3, probes=10)),
    ("i", "d16r3", ("loop",), (1,), 2500, W128 | dict(lr=2e-3, probes=10)),
    ("j", "d16r3", ("loop",), (1, 2), 2500, W128 | dict(probes=10)),
    ("g", "d16r3", ("loop", "base"), (2,), 4000, W128),
]


def corpus(name: str) -> Path:
    path = OUT / "data" / name
    if (path / "meta.json").exists():
        return path
    alphabet, shortest, longest, reps = CORPORA[name]
    rng = random.Random(0)
    lines = []
    for _ in range(32_000):
        lines.append(copies_line(rng, shortest, longest, SYMBOLS[:alphabet], reps))
    text = OUT / "data" / f"{name}.txt"
    text.parent.mkdir(parents=True, exist_ok=True)
    text.write_text("\n".join(lines) + "\n")
    prepare(str(text), path, tokenizer="bytes", progress=False)
    return path


def run(tag: str, name: str, role: str, seed: int, steps: int, settings: dict) -> dict:
    data = corpus(name)
    tokens = TokenData(data)
    ctx = settings["ctx"]
    mc = ModelConfig(block_size=ctx, n_head=4, n_embd=settings["width"], vocab_size=tokens.vocab_size, **ROLES[role])
    out = OUT / f"{tag}-{name}-{role}-{steps}-s{seed}"
    probes = settings["probes"]  # checkpoints read for the curve (the losses do not depend on it)
    tc = TrainConfig(
        batch_size=settings.get("batch", 16), seq_len=ctx, lr=settings["lr"], warmup_steps=settings.get("warmup", 100),
        max_steps=steps, eval_tokens=16384, eval_interval=0, log_interval=1000, data_dir=str(data), out_dir=str(out),
        seed=seed, progress=False, ckpt_interval=steps // probes, keep_checkpoints=probes + 1,
    )  # fmt: skip
    t0 = time.time()
    summary = train(mc, tc, resume=True)
    curve = []
    for ckpt in list_checkpoints(out):
        loaded = open_run(ckpt)
        split = split_loss(loaded.model, tokens, copies_mask, max_tokens=16384)
        curve.append((loaded.step, round(split["copy"], 4)))
    record = dict(tag=tag, corpus=name, role=role, seed=seed, steps=steps, settings=settings)
    record |= dict(val_loss=summary["val"]["loss"], copy_loss=curve[-1][1], curve=curve, wall=round(time.time() - t0))
    with open(OUT / "results.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)
    return record


def table() -> None:
    rows = [json.loads(line) for line in (OUT / "results.jsonl").read_text().splitlines() if line.strip()]
    print("| run | corpus (alphabet, lengths, copies) | model | width / context / lr | steps | seed | val loss "
          "| loss on the repeats | repeats' loss at each probe |\n|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    for r in rows:
        a, lo, hi, reps = CORPORA[r["corpus"]]
        s = r["settings"]
        curve = " ".join(f"{step}:{loss:.2f}" for step, loss in r["curve"])
        print(f"| {r['tag']} | {a}, {lo}-{hi}, x{reps} | {r['role']} | {s['width']} / {s['ctx']} / {s['lr']:g} "
              f"| {r['steps']} | {r['seed']} | {r['val_loss']:.4f} | {r['copy_loss']:.2f} | {curve} |")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="run only the PLAN entries whose tag starts with this")
    ap.add_argument("--table", action="store_true", help="print the table from results.jsonl and exit")
    args = ap.parse_args()
    if args.table:
        table()
        return 0
    done = set()
    if (OUT / "results.jsonl").exists():
        for line in (OUT / "results.jsonl").read_text().splitlines():
            r = json.loads(line)
            done.add((r["tag"], r["corpus"], r["role"], r["seed"], r["steps"]))
    for tag, name, roles, seeds, steps, settings in PLAN:
        for seed in seeds:
            for role in roles:
                if tag.startswith(args.only) and (tag, name, role, seed, steps) not in done:
                    run(tag, name, role, seed, steps, settings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
