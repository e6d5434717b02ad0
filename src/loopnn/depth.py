"""The effective-depth exponent: how many unique blocks a looped model is worth.

From plain models at several unique depths (k, 2k, 4k, ...) and looped models whose loop region runs r times,
each looped model's dense-equivalent depth d_eq is read off the plain models' loss against log(depth): piecewise
linear between the plain depths, extended linearly past the ends (such values are marked "extrapolated").
With d = the looped model's block applications per token (k * r when the whole stack loops):

    phi   = log(d_eq / k) / log(d / k)     1: a loop is worth a unique block, 0: worth nothing, < 0: it hurts
    share = (L_k - L_loop) / (L_k - L_d)   the part of the depth gain (k -> d unique blocks) that looping recovers

Schwethelm et al. (2026) measured phi ~ 0.46 at scale (0.35-0.38 with truncated backprop). Values are computed per
seed (a seed's plain losses where that seed has them, else the mean over seeds), then averaged, with the
spread (max - min) over seeds. Where the plain loss does not fall from k to d blocks (depth does not pay), phi
and share are undefined (None). `depth_table` works on rows from `loopnn.report.row` or any dicts with the keys
below; `compare` and `demo` call it.
"""

from __future__ import annotations

import math
import re
import statistics
from pathlib import Path
from typing import Any

# Row keys used: unique_blocks, loops, effective_depth, val_loss, seed, label (runs with one label are one model).


def label_of(run_name: str) -> str:
    """A run's model label: its name without a trailing -s<seed> (demo and search runs are named so)."""
    return re.sub(r"-s\d+$", "", run_name)


def dense_equivalent_depth(plain: dict[int, float], loss: float) -> tuple[float | None, bool]:
    """(depth d_eq at which the plain curve reaches `loss`, extrapolated?); (None, False) with < 2 depths or a
    flat curve. plain: unique depth -> val loss."""
    points = sorted((math.log(d), v) for d, v in plain.items() if v is not None and math.isfinite(v))
    if len(points) < 2:
        return None, False
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if min(y0, y1) <= loss <= max(y0, y1) and y0 != y1:
            return math.exp(x0 + (loss - y0) * (x1 - x0) / (y1 - y0)), False
    # Outside the measured range: extend the end segment on the side the loss lies (worse than the shallowest
    # model: the first segment; better than the deepest: the last one).
    (x0, y0), (x1, y1) = points[:2] if loss > points[0][1] else points[-2:]
    if y0 == y1:
        return None, False
    return math.exp(x0 + (loss - y0) * (x1 - x0) / (y1 - y0)), True


def _mean_spread(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), max(values) - min(values)


def depth_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per looped model label: loss, d_eq, phi and share, each as mean and spread over seeds."""
    plain_by_seed: dict[Any, dict[int, float]] = {}
    plain_all: dict[int, list[float]] = {}
    for r in rows:
        if r["loops"] == 1 and r["val_loss"] is not None:
            plain_by_seed.setdefault(r.get("seed"), {})[r["unique_blocks"]] = r["val_loss"]
            plain_all.setdefault(r["unique_blocks"], []).append(r["val_loss"])
    plain_mean = {d: statistics.mean(v) for d, v in plain_all.items()}
    looped: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["loops"] > 1 and r["val_loss"] is not None:
            looped.setdefault(r["label"], []).append(r)
    table = []
    for label, rs in looped.items():
        k, d = rs[0]["unique_blocks"], rs[0]["effective_depth"]
        per_seed = []
        for r in rs:
            curve = plain_mean | plain_by_seed.get(r.get("seed"), {})
            # Defined only where unique depth pays (plain loss falls from k to d blocks): on a flat or rising
            # curve no depth is "equivalent" to a loss, and a share of a non-positive gain means nothing.
            pays = k in curve and (d not in curve or curve[d] < curve[k])
            d_eq, extrapolated = dense_equivalent_depth(curve, r["val_loss"]) if pays else (None, False)
            phi = math.log(d_eq / k) / math.log(d / k) if d_eq is not None and d > k else None
            gain = curve[k] - curve[d] if k in curve and d in curve else None
            share = (curve[k] - r["val_loss"]) / gain if gain is not None and gain > 0 else None
            per_seed.append(dict(loss=r["val_loss"], d_eq=d_eq, phi=phi, share=share, extrapolated=extrapolated,
                                 base=curve.get(k), deeper=curve.get(d)))  # fmt: skip
        entry: dict[str, Any] = {"label": label, "unique_blocks": k, "loops": rs[0]["loops"], "effective_depth": d}
        entry["seeds"] = len(rs)
        for key in ("loss", "d_eq", "phi", "share"):
            entry[key], entry[f"{key}_spread"] = _mean_spread([s[key] for s in per_seed])
        entry["extrapolated"] = any(s["extrapolated"] for s in per_seed)
        # the plain models on the same seeds as this looped model (paired), averaged
        entry["base_loss"] = _mean_spread([s["base"] for s in per_seed])[0]
        entry["deeper_loss"] = _mean_spread([s["deeper"] for s in per_seed])[0]
        table.append(entry)
    return table


def _f(v: float | None, spec: str = ".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def markdown(table: list[dict[str, Any]]) -> str:
    if not table:
        return "- needs plain models at two or more depths and a looped model\n"
    out = (
        "| looped model | k x r | seeds | val loss (spread) | plain k | plain k*r | dense-equivalent depth "
        "| phi (spread) | share of depth gain (spread) |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    for e in table:
        mark = " (extrapolated)" if e["extrapolated"] else ""
        out += (
            f"| {e['label']} | {e['unique_blocks']} x {e['loops']} | {e['seeds']} | {_f(e['loss'], '.4f')} "
            f"({_f(e['loss_spread'], '.4f')}) | {_f(e['base_loss'], '.4f')} | {_f(e['deeper_loss'], '.4f')} | "
            f"{_f(e['d_eq'], '.2f')}{mark} | {_f(e['phi'])} ({_f(e['phi_spread'])}) | "
            f"{_f(e['share'])} ({_f(e['share_spread'])}) |\n"
        )
    return out + (
        "\nplain k and plain k*r: the plain models' mean loss on the looped model's seeds (values are paired by seed). "
        "phi = log(d_eq / k) / log(k*r / k), d_eq read off the plain models' loss against log depth; share = "
        "(plain k - loop) / (plain k - plain k*r). Published anchor: phi ~ 0.46 at scale (Schwethelm et al. 2026).\n"
    )


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Validation loss against block applications per token: plain models as a line, looped models as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    plain: dict[int, list[float]] = {}
    for r in rows:
        if r["loops"] == 1 and r["val_loss"] is not None:
            plain.setdefault(r["unique_blocks"], []).append(r["val_loss"])
    if plain:
        depths = sorted(plain)
        means = [statistics.mean(plain[d]) for d in depths]
        ax.plot(depths, means, marker="o", color="black", label="plain (unique blocks)")
        for d in depths:
            ax.scatter([d] * len(plain[d]), plain[d], color="black", s=8, alpha=0.4)
    looped: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["loops"] > 1 and r["val_loss"] is not None:
            looped.setdefault(r["label"], []).append(r)
    for label, rs in looped.items():
        losses = [r["val_loss"] for r in rs]
        mean = statistics.mean(losses)
        err = [[mean - min(losses)], [max(losses) - mean]]
        ax.errorbar([rs[0]["effective_depth"]], [mean], yerr=err, marker="s", capsize=3, ls="none", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("block applications per token (effective depth)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
