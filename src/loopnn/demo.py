"""`loopnn demo`: the paper's comparison at laptop scale, in one command.

On the Shakespeare corpus (bytes), under one token budget, trains
  base     2 unique blocks, 1 loop                 the parameter-matched baseline
  loop     2 unique blocks x 3 loops (the paper's mechanism, same parameters as base)
  deeper   3 unique blocks, 1 loop                 ~1.5x the parameters (the paper's 81M-vs-124M shape)
  isoflop  6 unique blocks, 1 loop                 the loop model's FLOPs per token (3x the parameters)
then prints and writes the comparison (Markdown, JSON, PNG) and the loop analysis of the looped model.
`ablation()` runs the loop model for every update rule and strategy; docs/results.md records both.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from loopnn.atomic import atomic_write_text
from loopnn.config import ModelConfig, TrainConfig
from loopnn.errors import StopRequested

SHAPE = dict(vocab_size=256, block_size=128, n_head=4, n_embd=128)
MODELS: dict[str, dict[str, Any]] = {
    "base": dict(n_layer=2, n_loops=1),
    "loop": dict(n_layer=2, n_loops=3),
    "deeper": dict(n_layer=3, n_loops=1),
    "isoflop": dict(n_layer=6, n_loops=1),
}
TRAIN = dict(batch_size=16, seq_len=128, lr=2e-3, warmup_steps=20, eval_tokens=32768, log_interval=10)
DEFAULT_TOKENS = 800_000


def _data(data_dir: str | None, progress: bool) -> Path:
    from loopnn.data import TokenData, default_data_dir, prepare

    path = Path(data_dir) if data_dir else default_data_dir("shakespeare", "bytes")
    if not (path / "meta.json").exists():
        print(f"preparing the Shakespeare corpus (bytes) in {path} ...", flush=True)
        prepare("shakespeare", path, tokenizer="bytes", progress=progress)
    TokenData(path)  # validate before spending minutes on training
    return path


def run_configs(
    name: str, seed: int, tokens: int, data: Path, out_dir: Path, model: dict[str, Any], progress: bool
) -> tuple[ModelConfig, TrainConfig]:
    steps = max(tokens // (TRAIN["batch_size"] * TRAIN["seq_len"]), 1)
    mc = ModelConfig(**(SHAPE | model))
    tc = TrainConfig(
        **TRAIN,
        data_dir=str(data),
        out_dir=str(out_dir / f"{name}-s{seed}"),
        max_steps=steps,
        eval_interval=max(steps // 5, 1),
        seed=seed,
        progress=progress,
    )
    return mc, tc


def _train_all(plan: list[tuple[str, ModelConfig, TrainConfig]]) -> list[Path]:
    from loopnn.train import train

    dirs = []
    for i, (name, mc, tc) in enumerate(plan, 1):
        print(
            f"[{i}/{len(plan)}] {name}: {mc.n_layer} unique blocks x {mc.n_loops} loops ({mc.loop_rule}, "
            f"{mc.loop_strategy}), {tc.max_steps} steps -> {tc.out_dir}",
            flush=True,
        )
        # resume=True: a finished run is reused (only re-evaluated); a different config is refused.
        summary = train(mc, tc, resume=True)
        if summary["interrupted"]:  # Ctrl-C / SIGTERM ends the whole command, not just this model
            raise StopRequested(
                f"stopped by signal during {name} at step {summary['step']} of {tc.max_steps} (checkpoint in "
                f"{tc.out_dir}); rerun the same command to continue where it stopped"
            )
        dirs.append(Path(tc.out_dir))
    return dirs


def _seed_table(rows: list[dict[str, Any]], key: str) -> str:
    """Mean and spread (max - min) over seeds per model."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r[key], []).append(r)
    out = "| model | seeds | val loss mean | spread (max-min) | bits/byte mean |\n|---|---|---|---|---|\n"
    for name, rs in by.items():
        losses = [r["val_loss"] for r in rs]
        bpb = statistics.mean(r["bits_per_byte"] for r in rs)
        out += f"| {name} | {len(rs)} | {statistics.mean(losses):.4f} | {max(losses) - min(losses):.4f} | {bpb:.4f} |\n"
    return out


def demo(
    out_dir: str = "runs/demo",
    data_dir: str | None = None,
    tokens: int = DEFAULT_TOKENS,
    seeds: tuple[int, ...] = (1337,),
    models: tuple[str, ...] = tuple(MODELS),
    loop_rule: str | None = None,
    loop_strategy: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    from loopnn.report import compare

    t0 = time.time()
    out = Path(out_dir)
    data = _data(data_dir, progress)
    loop_kw = {k: v for k, v in (("loop_rule", loop_rule), ("loop_strategy", loop_strategy)) if v}
    plan = []
    for seed in seeds:
        for name in models:
            mc, tc = run_configs(name, seed, tokens, data, out, MODELS[name] | loop_kw, progress)
            plan.append((name, mc, tc))
    dirs = _train_all(plan)
    report = compare(dirs, out, title="loopnn demo: looped vs plain GPT-2 at equal parameters and equal FLOPs")
    for r, (name, _, _) in zip(report["rows"], plan):
        r["model"] = name
    extra = _loop_analysis(out, dirs, plan)
    md = report["markdown"]
    if len(seeds) > 1:
        md += f"\n## Over seeds {', '.join(map(str, seeds))}\n\n{_seed_table(report['rows'], 'model')}"
    md += extra
    md += f"\nTotal wall time {time.time() - t0:.0f} s.\n"
    atomic_write_text(out / "demo.md", md)
    atomic_write_text(out / "demo.json", json.dumps({"rows": report["rows"], "seconds": time.time() - t0}, indent=2))
    print("\n" + md)
    print(f"written: {out / 'demo.md'}, {out / 'demo.json'}, {out / 'val_vs_tokens.png'}, {out / 'val_vs_flops.png'}")
    return {"rows": report["rows"], "markdown": md, "seconds": time.time() - t0}


def _loop_analysis(out: Path, dirs: list[Path], plan: list[tuple[str, ModelConfig, TrainConfig]]) -> str:
    """Per-loop loss and loss vs test-time loops for the first looped run."""
    from loopnn.checkpoint import load_model
    from loopnn.data import TokenData
    from loopnn.evaluate import loss_vs_loops, per_loop_losses
    from loopnn.report import write_loop_analysis

    for d, (_, mc, tc) in zip(dirs, plan):
        if mc.n_loops < 2:
            continue
        model, _ = load_model(d)
        data = TokenData(tc.data_dir)
        kw = dict(batch_size=tc.batch_size, seq_len=tc.seq_len, max_tokens=tc.eval_tokens // 2)
        per_loop = per_loop_losses(model, data, **kw)
        vs = loss_vs_loops(model, data, list(range(1, 2 * mc.n_loops + 1)), **kw)
        write_loop_analysis(out, d.name, per_loop, vs, mc.n_loops)
        return (
            f"\n## Loop analysis ({d.name}, trained with {mc.n_loops} loops)\n\n"
            "| loop n | loss after loop n (logit lens) | loss when run with n loops |\n|---|---|---|\n"
            + "".join(
                f"| {n} | {per_loop[n - 1]:.4f} | {vs[n]:.4f} |\n"
                if n <= len(per_loop)
                else f"| {n} | - | {vs[n]:.4f} |\n"
                for n in vs
            )
        )
    return ""


def ablation(
    out_dir: str = "runs/ablation",
    data_dir: str | None = None,
    tokens: int = DEFAULT_TOKENS,
    seeds: tuple[int, ...] = (1337, 1338),
    progress: bool = True,
) -> dict[str, Any]:
    """The loop model under every update rule and strategy (plus the base model), over seeds."""
    from loopnn.config import LOOP_RULES, LOOP_STRATEGIES
    from loopnn.report import load_run, row

    out = Path(out_dir)
    data = _data(data_dir, progress)
    plan = []
    for seed in seeds:
        mc, tc = run_configs("base", seed, tokens, data, out, MODELS["base"], progress)
        plan.append(("base", mc, tc))
        for rule in LOOP_RULES:
            for strategy in LOOP_STRATEGIES:
                name = f"loop-{rule}-{strategy}"
                model = MODELS["loop"] | dict(loop_rule=rule, loop_strategy=strategy)
                mc, tc = run_configs(name, seed, tokens, data, out, model, progress)
                plan.append((name, mc, tc))
    dirs = _train_all(plan)
    rows = [row(load_run(d)) | {"model": name} for d, (name, _, _) in zip(dirs, plan)]
    md = f"# Update rule x strategy ablation ({tokens:,} tokens, seeds {', '.join(map(str, seeds))})\n\n"
    md += _seed_table(rows, "model")
    atomic_write_text(out / "ablation.md", md)
    atomic_write_text(out / "ablation.json", json.dumps({"rows": rows}, indent=2))
    print("\n" + md)
    return {"rows": rows, "markdown": md}
