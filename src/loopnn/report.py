"""Comparison reports from run directories: tables (Markdown + JSON) and PNG plots.

`compare(run_dirs, out_dir)` reads each run's config, summary.json and metrics.jsonl (runs.RunDir) and writes
compare.md, compare.json, val_vs_tokens.png and val_vs_flops.png. The table has an iso-parameter view (runs
grouped by unique parameter count) and an iso-FLOP view (runs grouped by training FLOPs per token), because a
looped model matches parameters, not compute.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loopnn import depth
from loopnn.atomic import atomic_write_text
from loopnn.depth import label_of
from loopnn.errors import LoopnnError
from loopnn.jsonio import field, read_json, read_jsonl


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """A run's config, summary.json and metrics.jsonl, each read with size/depth limits and typed checks."""
    from loopnn.runs import RunDir

    run_dir = Path(run_dir)
    files = RunDir(run_dir)
    if not run_dir.is_dir():
        raise LoopnnError(f"{run_dir} is not a run directory; pass directories written by `loopnn train`")
    for path in (files.config, files.summary, files.metrics):
        if not path.is_file():
            raise LoopnnError(f"{run_dir} is not a finished run ({path.name} missing); train it first")
    config = files.read_config()
    summary = read_json(files.summary, files.summary.name)
    metrics = read_jsonl(files.metrics, files.metrics.name)
    _check_run(run_dir, config, summary)
    metrics = [m for m in metrics if m.get("kind") != "eval" or _is_eval_point(m)]  # plotted points need numbers
    return {"dir": run_dir, "name": run_dir.name, "config": config, "summary": summary, "metrics": metrics}


def _is_eval_point(m: dict[str, Any]) -> bool:
    """An eval record with plottable numbers (huge integers and infinities are left out, NaN losses kept)."""

    def number(v: Any, nan_ok: bool) -> bool:
        if not isinstance(v, int | float) or isinstance(v, bool):
            return False
        try:
            x = float(v)
        except OverflowError:
            return False
        return abs(x) < 1e300 or (nan_ok and x != x)

    return number(m.get("tokens"), False) and number(m.get("val_loss"), True)


def _check_run(run_dir: Path, config: dict[str, Any], summary: dict[str, Any]) -> None:
    """The fields compare reads, typed (a hand-edited or foreign file fails here, naming the field)."""
    from loopnn.runs import RunDir

    where = str(RunDir(run_dir).config)
    mc = field(config, "model_config", "object", where)
    field(mc, "n_layer", "int", f"{where} model_config", lo=1)
    field(mc, "n_loops", "int", f"{where} model_config", lo=1)
    field(mc, "loop_rule", "str", f"{where} model_config")
    mc["loop_start"] = field(mc, "loop_start", "int", f"{where} model_config", default=0, lo=0, hi=mc["n_layer"] - 1)
    end = field(mc, "loop_end", "int", f"{where} model_config", default=None, nullable=True, lo=1, hi=mc["n_layer"])
    mc["loop_end"] = mc["n_layer"] if end is None else end
    if mc["loop_end"] <= mc["loop_start"]:
        raise LoopnnError(f"{where}: model_config loop_end must be above loop_start")
    tc = field(config, "train_config", "object", where, default={})
    field(tc, "seed", "int", f"{where} train_config", default=None, nullable=True)
    where = str(run_dir / "summary.json")
    for key in ("params", "params_total", "tokens"):
        field(summary, key, "int", where, lo=0, hi=2**63)
    for key in ("tokens_per_s", "wall_time"):
        field(summary, key, "number", where, lo=0, hi=1e300)
    flops = field(summary, "flops_per_token", "object", where)
    for key in ("total", "forward", "backward"):
        field(flops, key, "number", f"{where} flops_per_token", lo=0, hi=1e100)
    val = field(summary, "val", "object", where, default=None, nullable=True) or {}
    for key in ("loss", "bits_per_byte"):  # NaN allowed: a diverged run is reported, not refused
        if val.get(key) is not None and (not isinstance(val[key], int | float) or isinstance(val[key], bool)):
            raise LoopnnError(f"{where}: field val.{key} must be a number or null, got {val[key]!r}")
    field(summary, "step", "int", where, lo=0, default=None, nullable=True)
    field(summary, "max_steps", "int", where, lo=1, default=None, nullable=True)
    field(summary, "interrupted", "bool", where, default=False)


def run_status(run: dict[str, Any]) -> str:
    """ "finished", or why the run's numbers are not final (interrupted, unfinished, newer checkpoints)."""
    from loopnn.checkpoint import list_checkpoints

    s = run["summary"]
    step, max_steps = s.get("step"), s.get("max_steps")
    if s.get("interrupted"):
        return f"interrupted at step {step} of {max_steps}"
    if step is not None and max_steps is not None and step < max_steps:
        return f"unfinished: step {step} of {max_steps}"
    newest = list_checkpoints(run["dir"])
    newest_step = int(newest[-1].name.split("-")[1]) if newest else None
    if step is not None and newest_step is not None and newest_step > step:
        return f"unfinished: summary of step {step}, checkpoints up to step {newest_step}"
    return "finished"


def row(run: dict[str, Any]) -> dict[str, Any]:
    mc, s = run["config"]["model_config"], run["summary"]
    val = s.get("val") or {}
    flops = s["flops_per_token"]
    return {
        "run": run["name"],
        "label": label_of(run["name"]),
        "seed": (run["config"].get("train_config") or {}).get("seed"),
        "status": run_status(run),
        "unique_blocks": mc["n_layer"],
        "loops": mc["n_loops"],
        "effective_depth": mc["n_layer"] + (mc["n_loops"] - 1) * (mc["loop_end"] - mc["loop_start"]),
        "loop_rule": mc["loop_rule"],
        "params": s["params"],
        "params_total": s["params_total"],
        "train_flops_per_token": flops["total"],
        "fwd_flops_per_token": flops["forward"],
        "bwd_flops_per_token": flops["backward"],
        "tokens": s["tokens"],
        "train_flops": flops["total"] * s["tokens"],
        "val_loss": val.get("loss"),
        "bits_per_byte": val.get("bits_per_byte"),
        "tokens_per_s": s["tokens_per_s"],
        "wall_time": s["wall_time"],
    }


def _name(r: dict[str, Any]) -> str:
    """The run's name, marked when its numbers are not those of a finished run."""
    status = r.get("status", "finished")
    return r["run"] if status == "finished" else f"{r['run']} (**{status}**)"


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def _fmt(v: Any, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| run | unique blocks | loops | params (no pos. emb.) | params total | train FLOPs/token (fwd+bwd) "
        "| tokens | val loss | bits/byte | tokens/s | wall s |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| {_name(r)} | {r['unique_blocks']} | {r['loops']} | {_fmt_params(r['params'])} | "
        f"{_fmt_params(r['params_total'])} | {r['train_flops_per_token'] / 1e6:.2f}M "
        f"({r['fwd_flops_per_token'] / 1e6:.2f}M + {r['bwd_flops_per_token'] / 1e6:.2f}M) | {r['tokens']:,} | "
        f"{_fmt(r['val_loss'], '.4f')} | {_fmt(r['bits_per_byte'], '.4f')} | {r['tokens_per_s']:,.0f} | "
        f"{r['wall_time']:.0f} |\n"
        for r in rows
    )
    return head + body


def _groups(rows: list[dict[str, Any]], key: str, rel: float = 0.05) -> list[list[dict[str, Any]]]:
    """Group rows whose `key` values lie within `rel` of each other (iso-parameter / iso-FLOP sets)."""
    groups: list[list[dict[str, Any]]] = []
    for r in sorted(rows, key=lambda r: r[key]):
        if groups and abs(r[key] - groups[-1][0][key]) <= rel * groups[-1][0][key]:
            groups[-1].append(r)
        else:
            groups.append([r])
    return groups


def _view(rows: list[dict[str, Any]], key: str, label: str) -> str:
    lines = []
    for g in _groups(rows, key):
        if len(g) < 2:
            continue
        ranked = sorted(g, key=lambda r: (r["val_loss"] is None, r["val_loss"]))
        best = ranked[0]
        parts = ", ".join(f"{_name(r)} {_fmt(r['val_loss'], '.4f')}" for r in ranked)
        lines.append(
            f"- {label} {_fmt_params(g[0][key]) if key == 'params' else f'{g[0][key] / 1e6:.2f}M'}: "
            f"{parts} (best: {best['run']})"
        )
    return "\n".join(lines) if lines else "- no two runs share this budget"


def write_plots(runs: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for xkey, xlabel, fname in (
        ("tokens", "tokens seen", "val_vs_tokens.png"),
        ("flops", "training FLOPs (forward + backward, all loops)", "val_vs_flops.png"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        plotted = 0
        for run in runs:
            evals = [m for m in run["metrics"] if m.get("kind") == "eval"]
            per_tok = run["summary"]["flops_per_token"]["total"]
            points = [(m["tokens"] * (per_tok if xkey == "flops" else 1), m["val_loss"]) for m in evals]
            if xkey == "flops":  # a log axis holds positive values only (an eval at token 0, a damaged record)
                points = [(x, y) for x, y in points if x > 0]
            plotted += len(points)
            ax.plot([x for x, _ in points], [y for _, y in points], marker="o", ms=3, label=run["name"])
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (nats/token)")
        if xkey == "flops" and plotted:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / fname
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def compare(run_dirs: list[str | Path], out_dir: str | Path, title: str = "Run comparison") -> dict[str, Any]:
    """Write compare.md / compare.json / PNG plots for finished runs; returns the JSON payload."""
    if not run_dirs:
        raise LoopnnError("compare needs at least one run directory")
    runs = [load_run(d) for d in run_dirs]
    rows = [row(r) for r in runs]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unfinished = [r["run"] for r in rows if r["status"] != "finished"]
    warning = (
        f"**Not a fair comparison:** {', '.join(unfinished)} stopped before the end of training; continue with "
        "`loopnn train --out-dir RUN --resume` (or rerun the command that started them).\n\n"
        if unfinished
        else ""
    )
    md = (
        f"# {title}\n\n{warning}{markdown_table(rows)}\n"
        "FLOPs count every block application: looped blocks once per loop in the forward pass and again in the "
        "backward pass (backward = 2x forward); the head once. See loopnn/flops.py.\n\n"
        f"## Iso-parameter view (same unique parameters)\n{_view(rows, 'params', 'params')}\n\n"
        f"## Iso-FLOP view (same training FLOPs per token)\n{_view(rows, 'train_flops_per_token', 'FLOPs/token')}\n"
    )
    depths = depth_section(rows, out)
    md += depths["markdown"]
    atomic_write_text(out / "compare.md", md)
    payload = {"rows": rows, "depth": depths["table"]}
    atomic_write_text(out / "compare.json", json.dumps(payload, indent=2) + "\n")
    plots = write_plots(runs, out) + depths["plots"]
    payload["files"] = [str(out / "compare.md"), str(out / "compare.json"), *map(str, plots)]
    payload["markdown"] = md
    return payload


def depth_section(rows: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    """The effective-depth section (loopnn.depth) when the runs hold plain models at 2+ depths and a looped one."""
    plain_depths = {r["unique_blocks"] for r in rows if r["loops"] == 1 and r["val_loss"] is not None}
    if len(plain_depths) < 2 or not any(r["loops"] > 1 for r in rows):
        return {"markdown": "", "table": [], "plots": []}
    table = depth.depth_table(rows)
    md = f"\n## What a loop is worth (effective-depth exponent)\n\n{depth.markdown(table)}"
    return {"markdown": md, "table": table, "plots": [depth.plot(rows, out / "loss_vs_depth.png")]}


def write_loop_analysis(
    out_dir: Path, name: str, per_loop: list[float], vs_loops: dict[int, float], trained: int
) -> list[Path]:
    """Per-loop (logit lens) loss and loss against test-time loop count: JSON + PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {"run": name, "trained_loops": trained, "per_loop_loss": per_loop, "loss_vs_loops": vs_loops}
    json_path = out_dir / f"loop_analysis_{name}.json"
    atomic_write_text(json_path, json.dumps(data, indent=2) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(range(1, len(per_loop) + 1), per_loop, marker="o", label="after loop n of a trained pass (logit lens)")
    ax.plot(list(vs_loops), list(vs_loops.values()), marker="s", ls="--", label="run with n loops at test time")
    ax.axvline(trained, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("loop n")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"{name}: trained with {trained} loops")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = out_dir / f"loop_analysis_{name}.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return [json_path, png]
