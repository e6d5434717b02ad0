"""The `loopnn` argument parser: one sub-parser per command, train's flags derived from the config dataclasses.

A field has the same name in code, TOML, JSON and flags (`n_loops` <-> `--n-loops`); old flag spellings stay as
aliases. Building the parser imports no torch or numpy, so `loopnn --help` and usage errors are instant.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from loopnn.config import PRESETS, ModelConfig, TrainConfig
from loopnn.errors import one_line
from loopnn.fields import field_help
from loopnn.options import CRITERIA, LOCAL_FORMATS, AdaptiveConfig, BenchConfig
from loopnn.tokenizer import TOKENIZER_NAMES


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (and exit 2) instead of the usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


DEVICE_HELP = "auto (CUDA if present, else CPU), cpu, cuda or cuda:N"
# Old flag spellings, still accepted: the canonical names match the config fields (out_dir, data_dir), by field
# name or, where only one config had the old name, by "Class.field".
FLAG_ALIASES = {
    "out_dir": ("--out",),
    "data_dir": ("--data",),
    "TrainConfig.min_loops": ("--loop-min",),
    "TrainConfig.max_loops": ("--loop-max",),
}


def _choices() -> dict[str, tuple[str, ...]]:
    from loopnn import config

    return {
        "loop_strategy": config.LOOP_STRATEGIES,
        "loop_rule": config.LOOP_RULES,
        "init_depth": config.INIT_DEPTHS,
        "injection": config.INJECTIONS,
        "residual_scale": config.RESIDUAL_SCALES,
        "loop_norm": config.LOOP_NORMS,
        "parallel": config.PARALLEL,
        "loop_sampling": config.LOOP_SAMPLING,
        "dtype": config.DTYPES,
        "tracker": config.TRACKERS,
        "criterion": CRITERIA,
        "preset": tuple(sorted(PRESETS)),
    }


def _field_flags(
    parser: argparse.ArgumentParser,
    cls,
    skip: tuple[str, ...] = (),
    title: str | None = None,
    choices: dict[str, tuple[str, ...]] | None = None,
):
    """One flag per dataclass field, its help the field's docstring (loopnn.fields) and the class default (a
    preset or TOML may change it). Flags default to None, so only the ones given override (see `overrides`).
    `choices`: field -> allowed values (default: the config module's choice lists)."""
    group = parser.add_argument_group(title or f"{cls.__name__} fields (override preset and TOML)")
    choices = _choices() if choices is None else choices
    docs = field_help(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        dest = f"{cls.__name__}.{f.name}"
        default = f"default {f.default!r}" if f.default is not dataclasses.MISSING else ""
        text = f"{docs.get(f.name, '')} ({default})" if default else docs.get(f.name, "")
        text = text.replace("%", "%%")  # argparse formats help with %
        if kind.startswith("bool"):
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, help=text)
            continue
        flags = (flag, *FLAG_ALIASES.get(f.name, ()), *FLAG_ALIASES.get(dest, ()))
        caster = int if kind.startswith("int") else float if kind.startswith("float") else str
        if f.name in choices:
            group.add_argument(*flags, dest=dest, choices=choices[f.name], help=text)
        else:
            group.add_argument(*flags, dest=dest, type=caster, metavar=caster.__name__.upper(), help=text)
    return group


def overrides(args: argparse.Namespace, cls) -> dict[str, Any]:
    prefix = cls.__name__ + "."
    return {k[len(prefix) :]: v for k, v in vars(args).items() if k.startswith(prefix) and v is not None}


def _add_adaptive_flags(s: argparse.ArgumentParser) -> None:
    group = _field_flags(s, AdaptiveConfig, title="adaptive per-token looping (stack strategy; AdaptiveConfig fields)")
    group.add_argument("--adaptive", action="store_true", help="stop looping a token once its prediction settles")


def build_parser() -> argparse.ArgumentParser:
    from loopnn import __version__

    p = Parser(prog="loopnn", description="Loop neural networks: looped GPT-2 models (Ng & Wang 2024).")
    p.add_argument("--version", action="version", version=f"loopnn {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    for add in (
        _prepare_parser,
        _train_parser,
        _eval_parser,
        _generate_parser,
        _demo_parser,
        _compare_parser,
        _bench_parser,
        _export_parser,
        _serve_parser,
        _import_parser,
    ):
        add(sub)
    return p


def _prepare_parser(sub) -> None:
    s = sub.add_parser(
        "prepare",
        help="text -> train/val token files + meta.json",
        description="Hub corpora and the streaming options (--workers, --shard-tokens, --max-documents, "
        "--max-bytes) write sharded, resumable output (rerun the same command to continue an interrupted run); "
        "hub corpora need `pip install 'loopnn[data]'` and internet (offline, point prepare at local files).",
    )
    s.add_argument(
        "source",
        help="a .txt file or folder of .txt files; a .jsonl/.parquet file or folder; a built-in corpus "
        "(shakespeare, kjv, pydoc, pystdlib, pycode; synthetic: copies, recall, hops); "
        "a hub corpus (openwebtext, fineweb-edu, tinystories, wikitext-103) "
        "or hf:owner/name[:config]",
    )
    s.add_argument("--out-dir", "--out", dest="out", help="output directory (default data/<source>-<tokenizer>)")
    s.add_argument(
        "--tokenizer", default="bytes", choices=TOKENIZER_NAMES, help="bytes, GPT-2 BPE, or a BPE trained on the corpus"
    )
    s.add_argument("--vocab-size", type=int, default=8192, help="vocab of a trained bpe tokenizer")
    s.add_argument(
        "--val-fraction", type=float, default=None, help="share of documents in val (default 0.1; hub: per corpus)"
    )
    s.add_argument("--format", choices=LOCAL_FORMATS, help="local file format (default: extension)")
    s.add_argument("--text-field", help="jsonl/parquet/hub field holding the text (default: text)")
    s.add_argument("--workers", type=int, help="tokenizer processes (streaming path; default 1)")
    s.add_argument("--shard-tokens", type=int, help="train tokens per shard (streaming path; default 100M)")
    s.add_argument("--max-documents", type=int, help="stop after this many documents (streaming path)")
    s.add_argument("--max-bytes", type=int, help="stop after this many bytes of text (streaming path)")
    s.add_argument("--overwrite", action="store_true", help="replace prepared data already in --out-dir")


def _train_parser(sub) -> None:
    s = sub.add_parser("train", help="train a model; flags override --preset and --config")
    s.add_argument("--preset", choices=sorted(PRESETS), help="model size preset")
    s.add_argument("--config", help="a TOML recipe file, or a shipped recipe by name (cpu/loop-81m, paper/gpt2-124m)")
    s.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint in --out-dir")
    s.add_argument("--overwrite", action="store_true", help="replace a finished run in --out-dir")
    s.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved ModelConfig and TrainConfig as JSON (defaults < preset < TOML < flags) and exit",
    )
    _field_flags(s, ModelConfig)
    _field_flags(s, TrainConfig)


def _eval_parser(sub) -> None:
    s = sub.add_parser("eval", help="validation loss, perplexity, bits/byte, per-loop loss, loss vs loops")
    s.add_argument("checkpoint", help="run directory or RUN/checkpoints/step-N")
    s.add_argument("--data-dir", "--data", dest="data", help="prepared data directory (default: the run's)")
    s.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="evaluate at most this many tokens (default: the whole validation split)",
    )
    s.add_argument("--batch-size", type=int, default=8, help="sequences per evaluation batch")
    s.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the model's block_size)")
    s.add_argument("--per-loop", action="store_true", help="loss after each loop (logit lens)")
    s.add_argument("--loops", help="comma-separated test-time loop counts, e.g. 1,2,4,8")
    s.add_argument("--device", default="auto", help=DEVICE_HELP)
    s.add_argument("--json", help="also write the results to this JSON file")
    s.add_argument("--n-loops", type=int, default=None, help="loop count (adaptive: the maximum)")
    _add_adaptive_flags(s)
    g = s.add_argument_group("lm-evaluation-harness tasks (loopnn[eval]; the checkpoint may be an export directory)")
    g.add_argument("--tasks", help="comma-separated lm-eval tasks, e.g. lambada_openai,hellaswag (instead of val loss)")
    g.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per task (default: the task's)")
    g.add_argument("--limit", type=float, default=None, help="at most this many examples per task (< 1: a fraction)")
    g.add_argument("--include-path", default=None, help="a folder of task YAML files of your own")


def _generate_parser(sub) -> None:
    s = sub.add_parser("generate", help="sample text from a checkpoint")
    s.add_argument("checkpoint", help="run directory or RUN/checkpoints/step-N")
    s.add_argument("--prompt", default="", help="text to continue (default: empty)")
    s.add_argument("--prompts-file", help="one prompt per line, generated as one left-padded batch")
    s.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate per prompt")
    s.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0: greedy)")
    s.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens only")
    s.add_argument("--top-p", type=float, default=None, help="sample within the smallest set of tokens of this mass")
    s.add_argument("--seed", type=int, default=None, help="sampling seed, for repeatable samples")
    s.add_argument("--n-loops", type=int, default=None, help="loop count for this call (default: trained)")
    s.add_argument("--tokenizer", default=None, help="override the tokenizer recorded with the data")
    s.add_argument("--device", default="auto", help=DEVICE_HELP)
    s.add_argument("--no-cache", action="store_true", help="recompute the whole prefix each step (for checking)")
    s.add_argument("--stop-at-eot", action="store_true", help="stop a sample at the end-of-text token")
    s.add_argument("--stream", action="store_true", help="print tokens as they are generated (single prompt)")
    _add_adaptive_flags(s)


def _demo_parser(sub) -> None:
    s = sub.add_parser(
        "demo",
        help="what looping buys, at laptop scale (its time on 2 CPU cores: docs/results.md)",
        description="Default: the synthetic copy task (random strings written three times), a 1-block base against "
        "the block looped twice, 4,000 steps x 2 seeds side by side (about 9 minutes on 2 CPU cores). --lm: language "
        "modelling on Shakespeare; --full: the 3-seed comparison on the pinned pycode corpus.",
    )
    s.add_argument(
        "--out-dir",
        "--out",
        default=None,
        help="default runs/demo (--lm: runs/demo-lm, --full: runs/demo-full, --ablation: runs/ablation)",
    )
    s.add_argument(
        "--data-dir",
        "--data",
        dest="data",
        default=None,
        help="any prepared corpus, trained with --lm's settings (or --full's with --full)",
    )
    mode = s.add_mutually_exclusive_group()
    mode.add_argument(
        "--lm",
        action="store_true",
        help="language modelling instead of the copy task: 600 steps x 2 seeds on Shakespeare (BPE 2048), every role",
    )
    mode.add_argument(
        "--full",
        action="store_true",
        help="4,800 steps x 3 seeds on the pinned pycode corpus, every role: the depth comparison (about 70 minutes)",
    )
    s.add_argument("--steps", type=int, default=None, help="training steps per model (default: see docs/results.md)")
    s.add_argument("--seeds", default=None, help="comma-separated seeds (default 1,2; --full 1,2,3)")
    s.add_argument(
        "--roles",
        default=None,
        help="comma-separated models to train: base plus loop and/or deeper (default: the demo's, see its report)",
    )
    s.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="runs trained at once, each in its own process with cores/N threads (default: one per seed, up to "
        "the cores; 1 on a GPU; 1: one after another in this process)",
    )
    s.add_argument("--ablation", action="store_true", help="instead: every update rule x strategy, over --seeds")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")


def _compare_parser(sub) -> None:
    s = sub.add_parser("compare", help="table + plots (iso-parameter and iso-FLOP views) from finished runs")
    s.add_argument("runs", nargs="+", help="run directories")
    s.add_argument(
        "--out-dir", "--out", dest="out", default="runs/compare", help="where to write compare.md/json, PNGs"
    )


def _bench_parser(sub) -> None:
    s = sub.add_parser("bench", help="training/generation tokens/s, MFU, memory: loopnn vs HF GPT-2, same loops")
    _field_flags(s, BenchConfig, title="BenchConfig fields")
    s.add_argument("--json", help="also write the JSON lines to this file")
    s.add_argument("--head-loss", help="instead: time plain vs chunked head+loss at these vocab sizes, e.g. 256,50257")
    s.add_argument("--head-n-embd", type=int, default=128, help="width for --head-loss")
    s.add_argument("--head-rows", type=int, default=2048, help="rows (batch x seq) for --head-loss")


def _export_parser(sub) -> None:
    s = sub.add_parser(
        "export",
        help="a loopnn checkpoint -> HF transformers directory: weights, tokenizer, model card (needs loopnn[hf])",
    )
    s.add_argument("checkpoint", help="run directory or RUN/checkpoints/step-N")
    s.add_argument("--out-dir", "--out", dest="out", required=True, help="HF model directory to write")
    s.add_argument(
        "--gpt2-tokenizer", action="store_true", help="save GPT-2's tokenizer instead of the run's (GPT-2 vocab only)"
    )
    s.add_argument(
        "--unroll",
        action="store_true",
        help="write a plain GPT2LMHeadModel of the effective depth (repeat rule, no injection/gates/loop norm); "
        "any GPT-2 runtime loads it without loopnn (docs/hf.md)",
    )


def _serve_parser(sub) -> None:
    from loopnn.serve.config import LOG_LEVELS, ServeConfig

    s = sub.add_parser("serve", help="OpenAI-compatible completions server with per-request loops (loopnn[serve])")
    s.add_argument("checkpoint", help="run directory, RUN/checkpoints/step-N, or an HF export directory")
    _field_flags(s, ServeConfig, title="ServeConfig fields (docs/serve.md)", choices={"log_level": LOG_LEVELS})


def _import_parser(sub) -> None:
    s = sub.add_parser("import", help="an HF directory (loopnn export, or GPT-2 with --gpt2) -> loopnn checkpoint")
    s.add_argument("source", help="HF model directory")
    s.add_argument("--out-dir", "--out", dest="out", required=True, help="run directory to write the checkpoint into")
    s.add_argument("--gpt2", action="store_true", help="source is a GPT2LMHeadModel directory")
