"""The model card (README.md) of an export: what the model is, its loop settings, its data and tokenizer, the
validation loss its run measured at the exported step, and how to load it.

Every figure in the card is read from the run (its checkpoint's metadata, its config and metrics.jsonl); nothing is
typed in.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from loopnn.config import ModelConfig
from loopnn.errors import LoopnnError
from loopnn.jsonio import read_jsonl

# The ModelConfig fields that describe the loop (the rest is GPT-2's shape)
LOOP_FIELDS = (
    "n_loops", "loop_start", "loop_end", "loop_strategy", "loop_rule", "gate_init", "injection", "injection_scale",
    "loop_embedding", "residual_scale", "residual_multiplier", "loop_norm", "coda_injection", "init_depth",
)  # fmt: skip


def measured_eval(run_dir: Path, step: int) -> dict[str, Any] | None:
    """The evaluation record metrics.jsonl holds for `step` (the exported weights), or None."""
    try:
        records = (
            read_jsonl(run_dir / "metrics.jsonl", "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
        )
    except LoopnnError:
        return None
    found = [r for r in records if r.get("kind") == "eval" and r.get("step") == step and _number(r.get("val_loss"))]
    return found[-1] if found else None


def run_data_meta(run_dir: Path) -> dict[str, Any]:
    """The data's meta.json as the run saved it in its config ({} when absent or unreadable)."""
    from loopnn.runs import RunDir

    run = RunDir(run_dir)
    try:
        data = run.read_config().get("data") if run.config.is_file() else {}
    except LoopnnError:
        return {}
    return data if isinstance(data, dict) else {}


def model_card(
    cfg: ModelConfig, meta: dict[str, Any], has_tokenizer: bool, *, params: int, where: str, unrolled: bool = False
) -> str:
    """README.md text for an export of checkpoint `meta` (read_meta's dict plus "path") written to `where`."""
    ckpt_path = Path(meta["path"])
    run_dir = ckpt_path.parent.parent
    step = meta.get("step")
    info = meta.get("info") or {}
    data = run_data_meta(run_dir)
    depth, times = cfg.effective_depth(), "once" if cfg.n_loops == 1 else f"{cfg.n_loops} times"
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        f"tags: [loopnn, {'gpt2' if unrolled else 'looped-transformer'}]",
        "---",
        "",
        f"# {run_dir.name}",
        "",
        f"A looped GPT-2 language model trained with loopnn: {cfg.n_layer} unique transformer block(s), width "
        f"{cfg.n_embd}, {cfg.n_head} heads, context {cfg.block_size} tokens, {params:,} parameters (position "
        f"embeddings left out). Blocks [{cfg.loop_start}, {cfg.loop_end}) run {times} per token, so each forward "
        f"pass applies {depth} block(s).",
        "",
    ]
    if unrolled:
        folded = ", the residual scale folded into the output projections" if cfg.branch_scale != 1.0 else ""
        lines += [
            f"This export is that model unrolled into a plain {depth}-layer GPT-2 (`GPT2LMHeadModel`, one layer per "
            f"block application, the shared blocks' weights repeated{folded}): the same logits, with the loop "
            "count fixed and the shared weights stored once per application.",
            "",
        ]
    lines += ["## Loop settings", "", "| setting | value |", "|---|---|"]
    values = dataclasses.asdict(cfg)
    lines += [f"| `{name}` | `{values[name]}` |" for name in LOOP_FIELDS]
    lines += ["", "## Training data and tokenizer", ""]
    lines += _data_lines(data, info, meta, step, cfg.vocab_size)
    lines += ["", "## Evaluation", ""]
    lines += _eval_lines(measured_eval(run_dir, step) if isinstance(step, int) else None, step)
    lines += ["", "## How to load", ""]
    lines += _load_lines(unrolled, has_tokenizer, cfg, json.dumps(where))
    return "\n".join(lines) + "\n"


def _data_lines(data: dict[str, Any], info: dict[str, Any], meta: dict[str, Any], step: Any, vocab: int) -> list[str]:
    recorded = info.get("data") or {}
    name = data.get("tokenizer") or recorded.get("tokenizer")
    source = data.get("source") or recorded.get("dir") or "not recorded"
    lines = [f"- Corpus: `{source}`"]
    if _count(data.get("train_tokens")) and _count(data.get("val_tokens")):
        lines[0] += f", {data['train_tokens']:,} training and {data['val_tokens']:,} validation tokens"
    if isinstance(data.get("source_sha256"), str):
        lines.append(f"- Corpus sha256: `{data['source_sha256']}`")
    described = {"bytes": "raw UTF-8 bytes", "gpt2": "GPT-2's BPE", "bpe": "a byte-level BPE trained on the corpus"}
    lines.append(f"- Tokenizer: `{name}` ({described.get(name, 'not recorded')}, {vocab} tokens)")
    train_cfg = meta.get("train_config") or {}
    tokens = info.get("tokens")
    trained = f"- Trained {step} optimizer steps"
    if _count(tokens):
        trained += f", {tokens:,} tokens"
    settings = [
        f"{key} {train_cfg[key]}" for key in ("lr", "batch_size", "grad_accum", "seq_len", "seed") if key in train_cfg
    ]
    if settings:
        trained += f" ({', '.join(settings)})"
    lines.append(trained)
    return lines


def _eval_lines(record: dict[str, Any] | None, step: Any) -> list[str]:
    if record is None:
        return [
            f"No validation loss was recorded at step {step} (the exported weights); `loopnn eval RUN` measures it."
        ]
    bpb = record.get("val_bits_per_byte")
    bpb_text = f", {bpb:.4f} bits per byte" if _number(bpb) else ""
    tokens = record.get("val_tokens")
    on = f"the first {tokens:,} tokens of" if _count(tokens) else "the validation stream of"
    return [
        f"Validation loss {record['val_loss']:.4f} nats per token{bpb_text}, measured by the training run at step "
        f"{step} on {on} the corpus's held-out split (metrics.jsonl)."
    ]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _load_lines(unrolled: bool, has_tokenizer: bool, cfg: ModelConfig, path: str) -> list[str]:
    """The loading snippet; `path` is the export directory as a Python string literal."""
    register = (
        []
        if unrolled
        else ["import loopnn.hf  # registers model_type 'loopnn' with transformers (pip install loopnn[hf])"]
    )
    lines = ["```python", *register, "from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline", ""]
    lines += [
        f"model = AutoModelForCausalLM.from_pretrained({path})",
        f"tok = AutoTokenizer.from_pretrained({path})"
        if has_tokenizer
        else "# no tokenizer was recorded with this run",
        f'pipe = pipeline("text-generation", model={path})',
        'print(pipe("Hello", max_new_tokens=40, do_sample=False)[0]["generated_text"])',
    ]
    if not unrolled:
        lines += [f"# test-time looping: model.generate(ids, max_new_tokens=40, n_loops={2 * cfg.n_loops})"]
    lines += ["```", ""]
    if unrolled:
        lines += ["No loopnn code and no `trust_remote_code`: any runtime that reads GPT-2 can load it.", ""]
    lines.append(f"lm-evaluation-harness: `loopnn eval {path} --tasks lambada_openai` (lm-eval's own HF model class)")
    if unrolled:
        lines[-1] += f", or lm-eval's own CLI: `lm_eval --model hf --model_args pretrained={path[1:-1]}`"
    return lines
