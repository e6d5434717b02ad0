"""The search behind docs/results.md: where does unique depth pay on 2 CPU cores, and which looped-training lever
lets a looped model recover that gain?

    python scripts/regime_search.py regime            # plain k vs 2k blocks over tokenizer, corpus, width, budget
    python scripts/regime_search.py levers            # 1 block x 2 loops under each lever, same base and deeper
    python scripts/regime_search.py exponent          # plain 1, 2, 4 blocks and 1 x 2, 1 x 4 loops: phi
    python scripts/regime_search.py transfer          # the chosen recipe on the King James Bible (not searched)
    python scripts/regime_search.py PLAN --table      # print the table of finished runs only

Runs go to runs/search/<plan>/<name>-s<seed> (a finished run is reused, not retrained) and one JSON line per run
to runs/search/results.jsonl. Corpora are prepared on first use (`loopnn prepare shakespeare|kjv`). Every run
uses loopnn's public API only; settings not named in a plan are the shared SHAPE and TRAIN below.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

from loopnn import ModelConfig, TrainConfig, depth
from loopnn.data import TokenData, prepare
from loopnn.data.sources import pystdlib_text
from loopnn.train import train

OUT = Path("runs/search")
SHAPE = dict(block_size=128, n_head=4, n_embd=128)
TRAIN = dict(batch_size=16, seq_len=128, lr=2e-3, warmup_steps=30, max_steps=600, eval_tokens=65536)
CORPORA = {  # name -> (source, tokenizer, vocab)
    "shakespeare-bpe2048": ("shakespeare", "bpe", 2048),
    "shakespeare-bytes": ("shakespeare", "bytes", 256),
    "kjv-bpe2048": ("kjv", "bpe", 2048),
    "kjv-bytes": ("kjv", "bytes", 256),
    "pystdlib-bpe2048": ("pystdlib", "bpe", 2048),  # Python's own standard library source (written below)
    "pystdlib-all-bpe2048": ("pystdlib-all", "bpe", 2048),  # all of it, tests included: 31 MB, about 1 epoch
    "copy-bytes": ("copy", "bytes", 256),  # synthetic in-context copying (written below)
    "vimhelp-bpe2048": ("vimhelp", "bpe", 2048),  # Vim's help files (Debian vim-runtime, where installed): 9.8 MB
}


def write_source(name: str, path: Path) -> str:
    """The two corpora the search writes itself; other names are `loopnn prepare` sources."""
    if name == "pystdlib-all":  # loopnn's built-in `pystdlib` corpus, written as a file (the same text)
        text = pystdlib_text()
    elif name == "pystdlib":  # the stdlib source without test/ and idlelib/, its first 6 MB
        text = pystdlib_text(leave_out=("test", "idlelib"))[:6_000_000]
    elif name == "vimhelp":  # technical English with markup, a domain the search did not use
        docs = sorted(Path("/usr/share/vim").glob("vim*/doc/*.txt"))
        if not docs:
            raise SystemExit("vimhelp needs Vim's help files (/usr/share/vim/vim*/doc): apt-get install vim-runtime")
        text = "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in docs)
    elif name == "copy":  # lines "s|s": 6-12 distinct symbols from 40, then the same again (seeded, 3 MB)
        rng, alphabet, lines, n = random.Random(0), "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMN", [], 0
        while n < 3_000_000:
            s = "".join(rng.sample(alphabet, rng.randint(6, 12)))
            lines.append(f"{s}|{s}\n")
            n += len(lines[-1])
        text = "".join(lines)
    else:
        return name
    path.write_text(text)
    return str(path)


DATA_DIRS = {"pystdlib-bpe2048": "pystdlib6mb-bpe2048"}  # data/pystdlib-bpe2048 is `loopnn demo --full`'s corpus


def data_dir(corpus: str) -> Path:
    path = Path("data") / DATA_DIRS.get(corpus, corpus)
    if not (path / "meta.json").exists():
        source, tokenizer, vocab = CORPORA[corpus]
        source = write_source(source, Path("data") / f"{corpus}.txt")
        prepare(source, path, tokenizer=tokenizer, vocab_size=vocab, progress=False)
    return path


def run(plan: str, name: str, corpus: str, seed: int, model: dict, train_kw: dict | None = None) -> dict:
    data = data_dir(corpus)
    vocab = TokenData(data).vocab_size
    mc = ModelConfig(**(SHAPE | dict(vocab_size=vocab) | model))
    tkw = TRAIN | (train_kw or {})
    out = OUT / plan / f"{name}-s{seed}"
    tc = TrainConfig(**tkw, data_dir=str(data), out_dir=str(out), seed=seed, eval_interval=0, progress=False)
    tc.log_interval = 50
    t0 = time.time()
    summary = train(mc, tc, resume=True)
    if summary["interrupted"] or summary["step"] < tc.max_steps:  # stopped early: record nothing, stop the search
        raise SystemExit(f"{out} stopped at step {summary['step']} of {tc.max_steps}; rerun to resume it")
    record = {
        "plan": plan,
        "name": name,
        "corpus": corpus,
        "seed": seed,
        "n_layer": mc.n_layer,
        "n_loops": mc.n_loops,
        "model": model,
        "train": train_kw or {},
        "val_loss": summary["val"]["loss"],
        "params": summary["params"],
        "flops_per_token": summary["flops_per_token"]["total"],
        "train_time": round(summary["train_time"], 1),
        "wall": round(time.time() - t0, 1),
    }
    print(json.dumps(record), flush=True)
    with open(OUT / "results.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    return record


def plan_regime():
    """Does a second unique block pay? Plain models only, one seed; the k/2k pairs differ in depth only."""
    # bpe at width 128 is the `levers` plan's base-1 / deeper-2 (600 steps, 3 seeds; 1200 steps: --steps 1200)
    yield "shakespeare-bytes", "bytes-w128", dict(), {}
    yield "shakespeare-bpe2048", "bpe-w64", dict(n_embd=64, n_head=2), {}


LEVERS = {  # name -> (model fields, train fields) for the 1 block x 2 loops model
    "plain": ({}, {}),
    "embed": (dict(loop_embedding=True), {}),
    "scale": (dict(residual_scale="inverse"), {}),
    "scale-sqrt": (dict(residual_scale="inverse_sqrt"), {}),
    "delay": ({}, dict(loop_delay=0.35)),
    "ramp": ({}, dict(loop_ramp=0.5)),
    "inject": (dict(injection="add"), {}),
    "init-eff": (dict(init_depth="effective"), {}),
    "residual": (dict(loop_rule="residual"), {}),
    "lr1e-3": ({}, dict(lr=1e-3)),
    "lr4e-3": ({}, dict(lr=4e-3)),
    "gated": (dict(loop_rule="gated"), {}),
    "scale+embed": (dict(residual_scale="inverse", loop_embedding=True), {}),
    "scale+delay": (dict(residual_scale="inverse"), dict(loop_delay=0.35)),
    "scale+ramp": (dict(residual_scale="inverse"), dict(loop_ramp=0.5)),
    "scale+lr4e-3": (dict(residual_scale="inverse"), dict(lr=4e-3)),
    "scale+lr1e-3": (dict(residual_scale="inverse"), dict(lr=1e-3)),
    "plain+lr1e-3": ({}, dict(lr=1e-3)),
    "scale+inject": (dict(residual_scale="inverse", injection="add"), {}),
}


def plan_levers(corpus: str, levers: tuple[str, ...], seeds: tuple[int, ...], k: int = 1, r: int = 2):
    """Plain k and r*k blocks, and k blocks x r loops under each lever (r = 4 also gives phi at 4 loops)."""
    for seed in seeds:
        yield corpus, f"base-{k}", dict(n_layer=k), {}, seed
        yield corpus, f"deeper-{r * k}", dict(n_layer=r * k), {}, seed
        for lever in levers:
            model, tkw = LEVERS[lever]
            yield corpus, f"loop-{k}x{r}-{lever}", dict(n_layer=k, n_loops=r) | model, tkw, seed


VARIANTS = {  # name -> (model fields, train fields): settings that might make the 1-block base stable across seeds
    "warm100": ({}, dict(warmup_steps=100)),
    "heads8": (dict(n_head=8), {}),
    "ctx256": (dict(block_size=256), dict(seq_len=256, batch_size=8)),
    "batch8": ({}, dict(batch_size=8, max_steps=1200)),
    "lr3e-3-warm100": ({}, dict(lr=3e-3, warmup_steps=100)),
    "clip0.5": ({}, dict(grad_clip=0.5)),
    "w64": (dict(n_embd=64, n_head=2), {}),
    "ctx512": (dict(block_size=512), dict(seq_len=512, batch_size=4)),
    "steps1200": ({}, dict(max_steps=1200)),
    "steps2400": ({}, dict(max_steps=2400)),
    "steps4800": ({}, dict(max_steps=4800)),
    "steps4800-loop": (dict(n_loops=2, residual_scale="inverse"), dict(max_steps=4800)),  # the demo's recipe
    "steps9600": ({}, dict(max_steps=9600)),
    "steps4800-lr0": ({}, dict(max_steps=4800, min_lr_ratio=0.0)),  # cosine to 0: less noise in the last steps?
    "batch64-steps1200": ({}, dict(batch_size=64, max_steps=1200)),  # the same 9.8M tokens in 4x larger steps
    "w64-steps4800": (dict(n_embd=64, n_head=2), dict(max_steps=4800)),
    "w64-steps4800-loop": (  # the demo's recipe at width 64
        dict(n_embd=64, n_head=2, n_loops=2, residual_scale="inverse", loop_embedding=True),
        dict(max_steps=4800),
    ),
    "lr4e-3": ({}, dict(lr=4e-3)),
    "lr1e-3": ({}, dict(lr=1e-3)),
    "base": ({}, {}),
}


def plan_stability(corpus: str, variants: tuple[str, ...], seeds: tuple[int, ...], depths: tuple[int, ...]):
    """Is the 1-block base bimodal across seeds under every setting? Plain models only, per variant."""
    for variant in variants:
        model, tkw = VARIANTS[variant]
        for k in depths:
            for seed in seeds:
                yield corpus, f"{variant}-L{k}", model | dict(n_layer=k), tkw, seed


def plan_lr(corpus: str, seeds: tuple[int, ...]):
    """Each model at its own learning rate: base and deeper at lr 1e-3 and 4e-3 (2e-3 is in `levers`)."""
    for seed in seeds:
        for lr in (1e-3, 4e-3):
            yield corpus, f"base-1-lr{lr:g}", dict(n_layer=1), dict(lr=lr), seed
            yield corpus, f"deeper-2-lr{lr:g}", dict(n_layer=2), dict(lr=lr), seed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("plan", choices=["regime", "levers", "lr", "exponent", "transfer", "stability"])
    p.add_argument("--variants", help="stability: comma-separated subset of: " + ", ".join(VARIANTS))
    p.add_argument("--depths", default="1,2", help="stability: unique block counts to train")
    p.add_argument("--levers", help="comma-separated subset of: " + ", ".join(LEVERS))
    p.add_argument("--corpus", default="shakespeare-bpe2048", choices=list(CORPORA))
    p.add_argument("--seeds", default="1,2")
    p.add_argument("--k", type=int, default=1, help="levers: unique blocks of the base model (loop: k x r)")
    p.add_argument("--r", type=int, default=2, help="levers: loops of the looped model (deeper: r*k blocks)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 600); recorded in the plan name")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default 30); recorded in the plan name")
    p.add_argument("--table", action="store_true", help="print the table of finished runs and exit")
    args = p.parse_args()
    seeds = tuple(int(s) for s in args.seeds.split(","))
    plan = args.plan + (f"-k{args.k}" if args.k != 1 else "") + (f"-{args.steps}steps" if args.steps else "")
    plan += f"-w{args.warmup}" if args.warmup is not None else ""
    if args.plan not in ("transfer", "regime") and args.corpus != "shakespeare-bpe2048":
        plan += f"-{args.corpus}"  # run directories of different corpora must not meet
    if args.steps:
        TRAIN["max_steps"] = args.steps
    if args.warmup is not None:
        TRAIN["warmup_steps"] = args.warmup
    OUT.mkdir(parents=True, exist_ok=True)
    if not args.table:
        if args.plan == "regime":
            for seed in seeds[:1]:
                for corpus, name, model, tkw in plan_regime():
                    for k in (1, 2):
                        run("regime", f"{name}-L{k}", corpus, seed, model | dict(n_layer=k), tkw)
        elif args.plan in ("levers", "transfer"):
            levers = tuple(args.levers.split(",")) if args.levers else tuple(LEVERS)
            for corpus, name, model, tkw, seed in plan_levers(args.corpus, levers, seeds, args.k, args.r):
                run(plan, name, corpus, seed, model, tkw)
        elif args.plan == "stability":
            variants = tuple(args.variants.split(",")) if args.variants else tuple(VARIANTS)
            depths = tuple(int(d) for d in args.depths.split(","))
            for corpus, name, model, tkw, seed in plan_stability(args.corpus, variants, seeds, depths):
                run(plan, name, corpus, seed, model, tkw)
        elif args.plan == "lr":
            for corpus, name, model, tkw, seed in plan_lr(args.corpus, seeds):
                run(plan, name, corpus, seed, model, tkw)
        elif args.plan == "exponent":
            levers = tuple(args.levers.split(",")) if args.levers else ("plain",)
            for seed in seeds:
                for k in (1, 2, 4):
                    run(plan, f"plain-{k}", args.corpus, seed, dict(n_layer=k))
                for lever in levers:
                    model, tkw = LEVERS[lever]
                    for r in (2, 4):
                        run(
                            "exponent",
                            f"loop-1x{r}-{lever}",
                            args.corpus,
                            seed,
                            dict(n_layer=1, n_loops=r) | model,
                            tkw,
                        )
    print_table(plan)
    return 0


def print_table(plan: str) -> None:
    rows = [json.loads(line) for line in (OUT / "results.jsonl").read_text().splitlines()]
    latest: dict[tuple, dict] = {}
    for r in rows:
        if r["plan"] == plan:
            latest[(r["corpus"], r["name"], r["seed"])] = r
    groups: dict[tuple, list[dict]] = {}
    for (corpus, name, _), r in latest.items():
        groups.setdefault((corpus, name), []).append(r)
    print("\n| corpus | run | seeds | val loss mean | spread | train s |\n|---|---|---|---|---|---|")
    for (corpus, name), rs in groups.items():
        losses = [r["val_loss"] for r in rs]
        spread = max(losses) - min(losses)
        t = statistics.mean(r["train_time"] for r in rs)
        print(f"| {corpus} | {name} | {len(rs)} | {statistics.mean(losses):.4f} | {spread:.4f} | {t:.0f} |")
    for corpus in sorted({c for c, _ in groups}):
        runs = [r for (c, _, _), r in latest.items() if c == corpus and not r["train"].get("lr")]
        rows = [dict(label=r["name"], unique_blocks=r["n_layer"], loops=r["n_loops"], val_loss=r["val_loss"],
                     seed=r["seed"], effective_depth=r["n_layer"] * r["n_loops"]) for r in runs]  # fmt: skip
        print(f"\n{corpus}, plain models and looped ones at the shared lr {TRAIN['lr']:g}:\n")
        print(depth.markdown(depth.depth_table(rows)))


if __name__ == "__main__":
    sys.exit(main())
