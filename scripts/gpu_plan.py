"""The paper's table, planned in GPU-hours: tokens, training FLOPs, memory per GPU and H100 hours per row.

    python scripts/gpu_plan.py                                   # the table in docs/gpu.md
    python scripts/gpu_plan.py --mfu-from runs/gpu_check/gpu_check.json   # MFU measured by scripts/gpu_check.sh

For each shipped paper/*.toml recipe: tokens = batch_size x seq_len x grad_accum x max_steps (grad_accum counts
micro-batches over all GPUs, so the global batch and the token count do not change with the GPU count); FLOPs
from loopnn.flops.mean_training_flops (every loop counted, forward and backward); hours = FLOPs / (GPUs x peak x
MFU) with the H100 SXM's dense bf16 peak (loopnn.instruments.GPU_BF16_PEAK, vendor datasheet) and MFU either
assumed from public GPT-2 anchors (llm.c about 35%, nanochat 41-46%; linear scaling to 8 GPUs assumed too) or
measured by scripts/gpu_check.sh. Memory per GPU is an estimate, not a measurement (see `memory_gb`).
Nothing here runs a model: it is arithmetic on the configs, and prints the same table on any machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from loopnn.config import ModelConfig, TrainConfig  # noqa: E402
from loopnn.flops import mean_training_flops  # noqa: E402
from loopnn.instruments import GPU_BF16_PEAK  # noqa: E402
from loopnn.memory import param_count  # noqa: E402
from loopnn.recipes import resolve  # noqa: E402

ROWS = ("gpt2-124m", "loop-81m", "gpt2-45m", "loop-45m")  # the paper's table, in its order
# The validation losses the paper reports for its table of models (Ng & Wang 2024), nats/token.
PAPER_LOSS = {"gpt2-124m": 3.12, "loop-81m": 3.11, "gpt2-45m": 3.98, "loop-45m": 3.67}
H100 = GPU_BF16_PEAK["H100 SXM"]
ASSUMED_MFU = {"llm.c": 0.35, "nanochat": 0.46}  # public GPT-2-small logs on H100; nanochat's range is 41-46%
H100_MEMORY_GB = 80
ONE_HOUR_PAIR = ("gpt2-45m", "loop-45m")  # the pair of the one-GPU-hour reproduction


def memory_gb(model: ModelConfig, train: TrainConfig, seq_len: int, chunked_loss: bool = False) -> float:
    """Training memory per GPU under DDP, an estimate: 16 bytes per parameter (fp32 weights and gradients, AdamW's
    two moments), bf16 activations at 34 bytes per token per width per block application (Korthikanti et al.
    2022, arXiv 2205.05198, without the attention-score term that fused SDPA attention does not store), every
    loop's activations kept (no activation checkpointing), and the loss's logits: about 10 bytes per token per
    vocab entry with the plain loss (bf16 logits, their fp32 copy, its gradient), one 1024-row chunk with the
    chunked one."""
    tokens = train.batch_size * seq_len  # one micro-batch per GPU
    states = 16 * param_count(model)
    activations = 34 * tokens * model.n_embd * model.effective_depth()
    logit_rows = min(tokens, 1024) if chunked_loss else tokens
    logits = 10 * logit_rows * model.padded_vocab_size
    return (states + activations + logits) / 1e9


def plan_row(name: str) -> dict:
    model, train = resolve(toml_path=f"paper/{name}")
    seq_len = train.seq_len or model.block_size
    tokens = train.batch_size * seq_len * train.grad_accum * train.max_steps
    per_token = mean_training_flops(model, train, seq_len)["total"]
    return {
        "row": name,
        "unique_blocks": model.n_layer,
        "loops": model.n_loops,
        "params": param_count(model),
        "tokens": tokens,
        "tokens_per_step": tokens // train.max_steps,
        "max_steps": train.max_steps,
        "flops_per_token": per_token,
        "flops": per_token * tokens,
        "memory_gb": memory_gb(model, train, seq_len),
        "memory_gb_chunked": memory_gb(model, train, seq_len, chunked_loss=True),
        "micro_batch": f"{train.batch_size} x {seq_len}",
        "paper_loss": PAPER_LOSS[name],
    }


def hours(flops: float, gpus: int, mfu: float) -> float:
    return flops / (gpus * H100 * mfu) / 3600


def measured_mfu(path: Path) -> dict[str, float]:
    """{preset: MFU} from a scripts/gpu_check.sh JSON: the compiled bench where it passed, else the eager one."""
    checks = json.loads(path.read_text())["checks"]
    out = {}
    for mode in ("eager", "compile"):  # compile last: it wins where both passed
        for key, check in checks.items():
            if key.startswith("bench:") and key.endswith(f":{mode}") and check.get("ok"):
                mfu = (check.get("loopnn") or {}).get("mfu")
                if mfu:
                    out[key.split(":")[1]] = mfu
    return out


def one_hour_budget(rows: dict[str, dict], mfu: float) -> dict:
    """Tokens per row for the pair ONE_HOUR_PAIR to fit one H100-hour together at `mfu`, capped at the paper's."""
    flops = H100 * mfu * 3600
    per_token = sum(rows[n]["flops_per_token"] for n in ONE_HOUR_PAIR)
    per_step = rows[ONE_HOUR_PAIR[0]]["tokens_per_step"]
    steps = min(int(flops / per_token) // per_step, min(rows[n]["max_steps"] for n in ONE_HOUR_PAIR))
    tokens = steps * per_step
    return {"mfu": mfu, "max_steps": steps, "tokens_each": tokens, "hours": tokens * per_token / flops}


def fmt_table(rows: dict[str, dict], mfus: dict[str, float], measured: dict[str, float]) -> str:
    lo, hi = min(mfus.values()), max(mfus.values())
    head = (
        "| row | blocks x loops | params | tokens | training FLOPs/token | training FLOPs | memory/GPU (GB, est.) "
        "| 1 H100, h | 8 H100, h | MFU |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows.values():
        if r["row"] in measured:
            m = measured[r["row"]]
            h1, h8, how = f"{hours(r['flops'], 1, m):.2f}", f"{hours(r['flops'], 8, m):.2f}", f"{m:.0%} measured"
        else:
            h1 = f"{hours(r['flops'], 1, hi):.2f}-{hours(r['flops'], 1, lo):.2f}"
            h8 = f"{hours(r['flops'], 8, hi):.2f}-{hours(r['flops'], 8, lo):.2f}"
            how = f"{hi:.0%}-{lo:.0%} assumed"
        mem = f"{r['memory_gb']:.1f} ({r['memory_gb_chunked']:.1f} chunked)"
        lines.append(
            f"| {r['row']} | {r['unique_blocks']} x {r['loops']} | {r['params'] / 1e6:.1f}M | {r['tokens'] / 1e9:.2f}B "
            f"| {r['flops_per_token'] / 1e9:.3f}G | {r['flops']:.2e} | {mem} | {h1} | {h8} | {how} |"
        )
    total = sum(r["flops"] for r in rows.values())
    lines.append(
        f"| all four | | | | | {total:.2e} | | {hours(total, 1, hi):.1f}-{hours(total, 1, lo):.1f} "
        f"| {hours(total, 8, hi):.2f}-{hours(total, 8, lo):.2f} | {hi:.0%}-{lo:.0%} assumed |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mfu-from", type=Path, help="a scripts/gpu_check.sh JSON: use its measured MFU where it has one")
    p.add_argument("--json", action="store_true", help="print the figures as JSON instead of the tables")
    args = p.parse_args(argv)
    rows = {name: plan_row(name) for name in ROWS}
    measured = measured_mfu(args.mfu_from) if args.mfu_from else {}
    budgets = {anchor: one_hour_budget(rows, mfu) for anchor, mfu in ASSUMED_MFU.items()}
    if args.json:
        print(json.dumps({"rows": rows, "assumed_mfu": ASSUMED_MFU, "measured_mfu": measured, "one_hour": budgets}))
        return 0
    fits = "fit" if max(r["memory_gb"] for r in rows.values()) < H100_MEMORY_GB else "do NOT all fit"
    print(f"H100 SXM dense bf16 peak {H100 / 1e12:.0f} TFLOP/s (vendor datasheet). Tokens do not change with the GPU")
    print(f"count; memory is per GPU under DDP, micro-batch {rows['gpt2-124m']['micro_batch']}, estimated")
    print(f"(memory_gb here): all four rows {fits} one {H100_MEMORY_GB} GB H100 without checkpointing.\n")
    print(fmt_table(rows, ASSUMED_MFU, measured))
    a, b = ONE_HOUR_PAIR
    print(f"\nOne H100-hour reproduction: {a} against {b} (the paper's claim: looping the block lowers the loss at")
    print(f"equal parameters; the paper reports {rows[a]['paper_loss']} vs {rows[b]['paper_loss']}, a gap of "
          f"{rows[a]['paper_loss'] - rows[b]['paper_loss']:.2f} nats/token).")  # fmt: skip
    for anchor, budget in budgets.items():
        share = budget["tokens_each"] / rows[a]["tokens"]
        print(
            f"  at {budget['mfu']:.0%} MFU ({anchor}): {budget['tokens_each'] / 1e9:.2f}B tokens each "
            f"({share:.0%} of the paper rows' budget: --max-steps {budget['max_steps']}), "
            f"{budget['hours']:.2f} h for both"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
