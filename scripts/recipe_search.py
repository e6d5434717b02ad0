"""Round two of the search behind docs/results.md: on a corpus that is the same bytes everywhere (`pycode`), which
2026 levers raise the looped block's share of the depth gain, what the paper's shape (fewer parameters, more
loops) reaches, and which short setting lets the default demo show the gain.

    python scripts/recipe_search.py levers --seeds 1,2,3 --levers recipe,norm-input   # 1 x 2 loops vs base, deeper
    python scripts/recipe_search.py shape --seeds 1,2                                 # 1 block x 2, 4, 6 vs 1, 2, 4
    python scripts/recipe_search.py demo --variants lr3e-3 --seeds 1,2                # short budgets, base and loop
    python scripts/recipe_search.py levers --table                                    # finished runs only

Runs go to runs/search2/<plan>/<name>-s<seed> (a finished run is reused, not retrained); one JSON line per run to
runs/search2/results.jsonl with the val loss, its split into the tokens in-context copying predicts and the rest
(loopnn.evaluate.copy_split; on `hops`, the answers and the rest), and that split at every probe checkpoint
(`--probes N` evenly spaced), which shows when a model learns to copy from its context. Seeds 1, 2, 3 were fixed
before any run. Every run uses loopnn's public API; settings not named in a plan are SHAPE and TRAIN below (the demo's).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

from loopnn import ModelConfig, TrainConfig, depth
from loopnn.checkpoint import list_checkpoints
from loopnn.data import TokenData, prepare
from loopnn.evaluate import copy_mask, hops_answer_mask, split_loss
from loopnn.recipes import train_config_from_dict
from loopnn.runs import open_run
from loopnn.train import train

OUT = Path("runs/search2")
SHAPE = dict(block_size=128, n_head=4, n_embd=128)
# threads=1: two searches share the 2 cores (two 1-thread jobs train faster than two 2-thread ones); losses can
# differ from a 2-thread run in the last digits (a matmul's sums split differently)
TRAIN = dict(batch_size=16, seq_len=128, lr=2e-3, warmup_steps=100, max_steps=4800, eval_tokens=65536, threads=1)
CORPORA = {  # name -> (loopnn prepare source, tokenizer, vocab)
    "pycode-bpe2048": ("pycode", "bpe", 2048),
    "shakespeare-bpe2048": ("shakespeare", "bpe", 2048),
    "kjv-bpe2048": ("kjv", "bpe", 2048),
    "recall-bytes": ("recall", "bytes", 256),
    "hops-bytes": (
        "hops",
        "bytes",
        256,
    ),  # synthetic two-hop lookups  # synthetic in-context copying (loopnn.data.synthetic)
}
RECIPE = dict(residual_scale="inverse", injection="add")  # round one's recipe (1/N + input injection)
NORM = dict(loop_norm="input", injection_scale=0.707)
LEVERS = {  # name -> (model fields, train fields) of the 1 block x 2 loops model; "grow" ends at 4 loops
    "recipe": (RECIPE, {}),
    "scale": (dict(residual_scale="inverse"), {}),
    "norm-unit": (RECIPE | dict(loop_norm="unit", injection_scale=0.707), {}),
    "norm-input": (RECIPE | NORM, {}),
    "coda": (RECIPE | dict(coda_injection=True), {}),
    "norm-coda": (RECIPE | NORM | dict(coda_injection=True), {}),
    "const": (RECIPE | dict(residual_scale="constant"), {}),
    "wd0.05": (RECIPE, dict(weight_decay=0.05)),
    "grow": (RECIPE | dict(n_loops=4), dict(loop_grow_at=0.8, rewarm_steps=40)),
    "x4": (RECIPE | dict(n_loops=4), {}),  # 4 loops throughout: the paper's shape at r = 4
    # round two's levers one at a time on top of the boundary norm (norm-input, the shipped --full recipe)
    "norm-const": (RECIPE | NORM | dict(residual_scale="constant"), {}),
    "norm-wd0.05": (RECIPE | NORM, dict(weight_decay=0.05)),
    "norm-grow": (RECIPE | NORM | dict(n_loops=4), dict(loop_grow_at=0.8, rewarm_steps=40)),
    "all": (  # the 2026 recipe as a whole
        RECIPE | NORM | dict(residual_scale="constant", coda_injection=True, n_loops=4),
        dict(weight_decay=0.05, loop_grow_at=0.8, rewarm_steps=40),
    ),
}


def data_dir(corpus: str) -> Path:
    path = Path("data") / corpus
    if not (path / "meta.json").exists():
        source, tokenizer, vocab = CORPORA[corpus]
        prepare(source, path, tokenizer=tokenizer, vocab_size=vocab, progress=False)
    return path


def probe(out: Path, data: TokenData, tokens: int) -> list[dict]:
    """split_loss at every checkpoint the run kept, in step order: copy_mask's tokens, or on `hops` the answers."""
    mask = hops_answer_mask if data.meta.get("source") == "hops" else copy_mask
    curve = []
    for ckpt in list_checkpoints(out):  # in step order
        run = open_run(ckpt)
        # at the loop count this step trained with (a run that grows its loop count ran fewer before it grew)
        # train_config_from_dict: runs saved before the loop bounds' rename (loop_min/loop_max) still read
        loops = train_config_from_dict(run.train_config).scheduled_loops(run.model.config.n_loops, run.step)
        split = split_loss(run.model, data, mask, max_tokens=tokens, n_loops=loops)
        curve.append({"step": run.step, "n_loops": loops, **split})
    return curve


def run(plan: str, name: str, corpus: str, seed: int, model: dict, train_kw: dict, probes: int) -> dict:
    data = data_dir(corpus)
    tokens = TokenData(data)
    mc = ModelConfig(**(SHAPE | dict(vocab_size=tokens.vocab_size) | model))
    tkw = TRAIN | train_kw
    out = OUT / plan / f"{name}-s{seed}"
    ckpt = dict(ckpt_interval=tkw["max_steps"] // probes, keep_checkpoints=probes + 1) if probes else {}
    tc = TrainConfig(**(tkw | ckpt), data_dir=str(data), out_dir=str(out), seed=seed, eval_interval=0, progress=False)
    tc.log_interval = 50
    t0 = time.time()
    summary = train(mc, tc, resume=True)
    if summary["interrupted"] or summary["step"] < tc.max_steps:
        raise SystemExit(f"{out} stopped at step {summary['step']} of {tc.max_steps}; rerun to resume it")
    curve = probe(out, tokens, tc.eval_tokens)
    record = {
        "plan": plan,
        "name": name,
        "corpus": corpus,
        "seed": seed,
        "n_layer": mc.n_layer,
        "n_loops": mc.n_loops,
        "model": model,
        "train": train_kw,
        "val_loss": summary["val"]["loss"],
        "params": summary["params"],
        "flops_per_token": summary["flops_per_token"]["total"],
        "train_time": round(summary["train_time"], 1),
        "wall": round(time.time() - t0, 1),
        "final": curve[-1] if curve else None,
        "curve": curve,
    }
    print(json.dumps({k: v for k, v in record.items() if k != "curve"}), flush=True)
    with open(OUT / "results.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    return record


def plan_levers(levers, seeds):
    """Plain 1 block, 1 block x 2 loops under each lever, then plain 2 blocks, seed by seed."""
    for seed in seeds:
        yield "base-1", dict(n_layer=1), {}, seed
        for lever in levers:
            model, tkw = LEVERS[lever]
            yield f"loop-{lever}", dict(n_layer=1, n_loops=2) | model, tkw, seed
        yield "deeper-2", dict(n_layer=2), {}, seed


def plan_shape(lever, loops, seeds):
    """The paper's shape: 1 block x r loops (r in `loops`) against plain 1, 2 and 4 blocks (plain 4 last: the
    most expensive, and the looped models' comparison needs only 1 and 2)."""
    model, tkw = LEVERS[lever]
    for seed in seeds:
        for k in (1, 2):
            yield f"plain-{k}", dict(n_layer=k), {}, seed
        for r in loops:
            yield f"loop-1x{r}-{lever}", dict(n_layer=1) | model | dict(n_loops=r), tkw, seed
        yield "plain-4", dict(n_layer=4), {}, seed


DEMO_VARIANTS = {  # name -> (train fields, model fields) shared by the demo search's base and loop
    "s300": (dict(max_steps=300), {}),
    "s600": (dict(max_steps=600), {}),
    "s1200": (dict(max_steps=1200), {}),
    "s1800": (dict(max_steps=1800), {}),
    "s2400": (dict(max_steps=2400), {}),
    "s1200-lr4e-3": (dict(max_steps=1200, lr=4e-3), {}),
    "s1800-lr4e-3": (dict(max_steps=1800, lr=4e-3), {}),
    "s1200-ctx256": (dict(max_steps=1200, seq_len=256, batch_size=8), dict(block_size=256)),
    "s1800-ctx256": (dict(max_steps=1800, seq_len=256, batch_size=8), dict(block_size=256)),
    "s1200-ctx256-lr4e-3": (dict(max_steps=1200, seq_len=256, batch_size=8, lr=4e-3), dict(block_size=256)),
    "s1800-b8": (dict(max_steps=1800, batch_size=8), {}),
    "s2400-b8": (dict(max_steps=2400, batch_size=8), {}),
    "s2400-b8-lr3e-3": (dict(max_steps=2400, batch_size=8, lr=3e-3), {}),
}


def plan_demo(variants, lever, seeds, deeper):
    model, tkw = LEVERS[lever]
    for variant in variants:
        vt, vm = DEMO_VARIANTS[variant]
        for seed in seeds:
            yield f"{variant}-base", vm | dict(n_layer=1), vt, seed
            yield f"{variant}-loop-{lever}", vm | dict(n_layer=1, n_loops=2) | model, tkw | vt, seed
            if deeper:
                yield f"{variant}-deeper", vm | dict(n_layer=2), vt, seed


def print_table(plan: str) -> None:
    """Finished runs of `plan`, one row per model over its seeds; where a seed has plain 1- and 2-block runs
    (base-1 / plain-1 and deeper-2 / plain-2), each looped model's share of the 1 -> 2 block gain and phi
    (loopnn.depth: the dense-equivalent depth read off the plain models, log d_eq / log r)."""
    path = OUT / "results.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    latest = {(r["corpus"], r["name"], r["seed"]): r for r in rows if r["plan"] == plan}
    groups: dict[tuple, list[dict]] = {}
    for (corpus, name, _), r in latest.items():
        groups.setdefault((corpus, name), []).append(r)
    plain: dict[tuple, dict[int, float]] = {}  # (corpus, seed) -> unique blocks -> loss
    for (corpus, name, seed), r in latest.items():
        if r["n_loops"] == 1 and name.split("-")[0] in ("base", "deeper", "plain"):
            plain.setdefault((corpus, seed), {})[r["n_layer"]] = r["val_loss"]
    head = "| corpus | run | blocks x loops | params | FLOPs/token | seeds | val loss per seed | mean | spread |"
    print(f"\n{plan}\n\n{head} copy | other | share | phi | train s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (corpus, name), rs in sorted(groups.items()):
        rs.sort(key=lambda r: r["seed"])
        losses = [r["val_loss"] for r in rs]
        copy = statistics.mean(r["final"]["copy"] for r in rs if r["final"])
        other = statistics.mean(r["final"]["other"] for r in rs if r["final"])
        shares, phis = [], []
        for r in rs:
            p = plain.get((corpus, r["seed"]), {})
            if r["n_loops"] > 1 and r["n_layer"] == 1 and p.get(1, 0) > p.get(2, float("inf")):
                shares.append((p[1] - r["val_loss"]) / (p[1] - p[2]))
                d_eq, _ = depth.dense_equivalent_depth(p, r["val_loss"])
                if d_eq:
                    phis.append(math.log(d_eq) / math.log(r["n_loops"]))
        # per seed, then the mean: "0.86 / 0.92 / 0.79 = 0.86"
        share = " / ".join(f"{x:.2f}" for x in shares) + f" = {statistics.mean(shares):.2f}" if shares else "-"
        phi = " / ".join(f"{x:.2f}" for x in phis) + f" = {statistics.mean(phis):.2f}" if phis else "-"
        per_seed = " / ".join(f"{x:.4f}" for x in losses)
        r0 = rs[0]
        print(
            f"| {corpus} | {name} | {r0['n_layer']} x {r0['n_loops']} | {r0['params'] / 1e6:.2f}M | "
            f"{r0['flops_per_token'] / 1e6:.2f}M | {','.join(str(r['seed']) for r in rs)} | {per_seed} | "
            f"{statistics.mean(losses):.4f} | {max(losses) - min(losses):.4f} | {copy:.3f} | {other:.3f} | "
            f"{share} | {phi} | {statistics.mean(r['train_time'] for r in rs):.0f} |"
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("plan", choices=["levers", "shape", "demo"])
    p.add_argument("--corpus", default="pycode-bpe2048", choices=list(CORPORA))
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--levers", default="recipe", help="levers: comma-separated subset of " + ", ".join(LEVERS))
    p.add_argument("--lever", default="recipe", help="shape, demo: the looped model's lever")
    p.add_argument("--loops", default="2,4,6", help="shape: loop counts of the 1-block model")
    p.add_argument("--variants", default="s1200", help="demo: comma-separated subset of " + ", ".join(DEMO_VARIANTS))
    p.add_argument("--deeper", action="store_true", help="demo: also train the 2-block model")
    p.add_argument("--steps", type=int, help="levers, shape: training steps (default 4800)")
    p.add_argument("--probes", type=int, default=8, help="checkpoints probed for the copy split (0: only the end)")
    p.add_argument("--table", action="store_true", help="print the table of finished runs and exit")
    args = p.parse_args()
    seeds = tuple(int(s) for s in args.seeds.split(","))
    if args.steps:
        TRAIN["max_steps"] = args.steps
    plan = args.plan + (f"-{args.steps}steps" if args.steps else "") + f"-{args.corpus}"
    OUT.mkdir(parents=True, exist_ok=True)
    if not args.table:
        if args.plan == "levers":
            jobs = plan_levers(args.levers.split(","), seeds)
        elif args.plan == "shape":
            jobs = plan_shape(args.lever, [int(r) for r in args.loops.split(",")], seeds)
        else:
            jobs = plan_demo(args.variants.split(","), args.lever, seeds, args.deeper)
        for name, model, tkw, seed in jobs:
            run(plan, name, args.corpus, seed, model, tkw, args.probes)
    print_table(plan)
    return 0


if __name__ == "__main__":
    sys.exit(main())
