"""The report pieces of `loopnn demo` that do not depend on its settings: the table over seeds, the paired
gains, the loss on the tokens copying predicts, the corpus fingerprint, the loop analysis and the sample."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from loopnn.config import ModelConfig, TrainConfig


def seed_table(rows: list[dict[str, Any]], key: str) -> str:
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


def gains(rows: list[dict[str, Any]], loop: str = "loop", deeper: str = "deeper") -> dict[str, Any]:
    """depth_gain = base - deeper, loop_gain = base - loop, share = loop_gain / depth_gain: per seed (paired,
    over the seeds that have both roles), then mean and spread (max - min) over seeds; None where a role is
    missing (share: where no seed's depth gain is positive)."""
    by_seed: dict[int, dict[str, float]] = {}
    for r in rows:
        by_seed.setdefault(r["seed"], {})[r["model"]] = r["val_loss"]

    def having(*roles: str) -> list[dict[str, float]]:
        return [v for v in by_seed.values() if set(roles) <= set(v)]

    out: dict[str, Any] = {}
    values = {
        "depth_gain": [v["base"] - v[deeper] for v in having("base", deeper)],
        "loop_gain": [v["base"] - v[loop] for v in having("base", loop)],
        # undefined on a seed where depth does not pay (deeper not below base), as in loopnn.depth
        "share": [
            (v["base"] - v[loop]) / (v["base"] - v[deeper])
            for v in having("base", loop, deeper)
            if v["base"] > v[deeper]
        ],
    }
    for key, vs in values.items():
        out[key] = statistics.mean(vs) if vs else None
        out[f"{key}_spread"] = max(vs) - min(vs) if vs else None
    out["loop_gains"] = values["loop_gain"]  # per seed, for the paired test of demo.verdict
    base = [v["base"] for v in by_seed.values() if "base" in v]
    out["base_spread"] = max(base) - min(base) if base else None
    return out


def copy_losses(dirs: list[Path], rows: list[dict[str, Any]], data: Path, tokens: int) -> dict[str, float]:
    """Model -> mean val loss (over seeds) on the tokens in-context copying predicts: the repeats of the `copies`
    task, or on other corpora loopnn.evaluate.copy_mask's tokens. The second unique block's, and the loop's, gain
    shows there first (docs/results.md). Each row gets its own as `copy_loss`."""
    from loopnn.data import TokenData
    from loopnn.evaluate import copies_mask, copy_mask, split_loss
    from loopnn.runs import open_run

    tokens_data = TokenData(data)
    mask = copies_mask if tokens_data.meta.get("source") == "copies" else copy_mask
    by: dict[str, list[float]] = {}
    for d, r in zip(dirs, rows):
        r["copy_loss"] = split_loss(open_run(d).model, tokens_data, mask, max_tokens=tokens)["copy"]
        by.setdefault(r["model"], []).append(r["copy_loss"])
    return {name: statistics.mean(v) for name, v in by.items()}


def split_text(split: dict[str, float], source: str | None) -> str:
    what = "the repeats of each line" if source == "copies" else "the tokens in-context copying predicts"
    rows = "".join(f"| {name} | {loss:.4f} |\n" for name, loss in split.items())
    return f"\n## Loss on {what} (mean over seeds)\n\n| model | val loss there |\n|---|---|\n{rows}"


def data_fingerprint(path: Path) -> dict[str, Any]:
    """The corpus a demo trained on: its source, token counts and the sha256 of train.bin (the same bytes on every
    machine for the pinned corpora)."""
    from loopnn.data import TokenData
    from loopnn.data.sources import file_sha256

    meta = TokenData(path).meta
    train_bin = path / "train.bin"  # a sharded corpus has none
    return {
        "dir": str(path),
        "source": meta.get("source"),
        "tokenizer": meta.get("tokenizer"),
        "vocab_size": meta.get("vocab_size"),
        "train_tokens": meta.get("train_tokens"),
        "train_sha256": file_sha256(train_bin) if train_bin.exists() else None,
    }


def fmt(v: float | None, spec: str = ".4f") -> str:
    return "n/a" if v is None else format(v, spec)


def looped_run(dirs: list[Path], plan: list[tuple[str, ModelConfig, TrainConfig]]):
    """(run dir, model, train config) of the first looped run, its model loaded once; None without one."""
    from loopnn.runs import open_run

    for d, (_, mc, tc) in zip(dirs, plan):
        if mc.n_loops >= 2:
            return d, open_run(d).model, tc
    return None


def loop_analysis(out: Path, looped) -> str:
    """Per-loop loss and loss vs test-time loops for the first looped run."""
    from loopnn.data import TokenData
    from loopnn.evaluate import loss_vs_loops, per_loop_losses
    from loopnn.report import write_loop_analysis

    if looped is None:
        return ""
    d, model, tc = looped
    n_loops = model.config.n_loops
    data = TokenData(tc.data_dir)
    kw = dict(batch_size=tc.batch_size, seq_len=tc.seq_len, max_tokens=tc.eval_tokens // 2)
    per_loop = per_loop_losses(model, data, **kw)
    vs = loss_vs_loops(model, data, list(range(1, 2 * n_loops + 1)), **kw)
    write_loop_analysis(out, d.name, per_loop, vs, n_loops)
    return (
        f"\n## Loop analysis ({d.name}, trained with {n_loops} loops)\n\n"
        "| loop n | loss after loop n (logit lens) | loss when run with n loops |\n|---|---|---|\n"
        + "".join(
            f"| {n} | {per_loop[n - 1]:.4f} | {vs[n]:.4f} |\n" if n <= len(per_loop) else f"| {n} | - | {vs[n]:.4f} |\n"
            for n in vs
        )
    )


def sample_text(looped, prompts: dict[str, str], tokens: int = 60) -> str:
    """A short sample from the first looped run (temperature 0.8, top-k 50, fixed seed)."""
    from loopnn.data import TokenData
    from loopnn.generate import generate

    if looped is None:
        return ""
    d, model, tc = looped
    data = TokenData(tc.data_dir)
    tok = data.get_tokenizer()
    source = str(data.meta.get("source"))
    prompt = next((tok.encode(text) for name, text in prompts.items() if name in source), [])
    prompt = prompt or [int(t) for t in data.val[:8]]
    tokens = min(tokens, model.config.block_size - len(prompt))  # the copy task's context is 64
    new = generate(model, [prompt], tokens, temperature=0.8, top_k=50, seed=0)[0]
    text = tok.decode(prompt + new)
    return f"\n## A sample from {d.name} ({tokens} tokens, temperature 0.8, top-k 50)\n\n```\n{text}\n```\n"
