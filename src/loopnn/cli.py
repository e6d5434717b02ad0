"""Command line: `loopnn prepare | train | eval | generate | compare | bench | demo | serve`.

Each subcommand is one function `cmd_NAME(args)`; `train` derives its flags from the config dataclasses, so a
field has the same name in code, TOML, JSON and flags (`n_loops` <-> `--n-loops`). Expected failures raise
`LoopnnError`, printed here as one line with exit status 2. `python -m loopnn` runs the same (torchrun needs it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

from loopnn.config import PRESETS, ModelConfig, TrainConfig
from loopnn.errors import LoopnnError, StopRequested
from loopnn.tokenizer import TOKENIZER_NAMES


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (and exit 2) instead of the usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# Lists the CLI cannot import without torch or numpy (loopnn --help and fast failures import neither); each is
# pinned to its library constant by tests/test_cli.py (adaptive.CRITERIA, corpora.LOCAL_FORMATS).
CRITERIA = ("kl", "entropy", "hidden")
LOCAL_FORMATS = ("text", "jsonl", "parquet")
# AdaptiveConfig's default threshold (kl 0.05: 37% fewer loops for +0.9% val loss, docs/benchmarks.md), written out
# so that --help imports no torch; tests/test_cli.py pins the two together.
ADAPTIVE_THRESHOLD = 0.05
# Old flag spellings, still accepted: the canonical names match the config fields (out_dir, data_dir).
FLAG_ALIASES = {"out_dir": ("--out",), "data_dir": ("--data",)}


def _choices() -> dict[str, tuple[str, ...]]:
    from loopnn import config

    return {
        "loop_strategy": config.LOOP_STRATEGIES,
        "loop_rule": config.LOOP_RULES,
        "init_depth": config.INIT_DEPTHS,
        "injection": config.INJECTIONS,
        "residual_scale": config.RESIDUAL_SCALES,
        "parallel": config.PARALLEL,
        "loop_sampling": config.LOOP_SAMPLING,
        "dtype": config.DTYPES,
    }


def _field_flags(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One flag per dataclass field; help shows the class default (a preset or TOML may change it)."""
    group = parser.add_argument_group(f"{cls.__name__} fields (override preset and TOML)")
    choices = _choices()
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        dest = f"{cls.__name__}.{f.name}"
        default = f"default {f.default!r}" if f.default is not dataclasses.MISSING else ""
        if kind.startswith("bool"):
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, help=default)
            continue
        flags = (flag, *FLAG_ALIASES.get(f.name, ()))
        caster = int if kind.startswith("int") else float if kind.startswith("float") else str
        if f.name in choices:
            group.add_argument(*flags, dest=dest, choices=choices[f.name], help=default)
        else:
            group.add_argument(*flags, dest=dest, type=caster, metavar=caster.__name__.upper(), help=default)


def _overrides(args: argparse.Namespace, cls) -> dict[str, Any]:
    prefix = cls.__name__ + "."
    return {k[len(prefix) :]: v for k, v in vars(args).items() if k.startswith(prefix) and v is not None}


def cmd_prepare(args: argparse.Namespace) -> int:
    from loopnn import corpora

    if corpora.is_hub_source(args.source):  # fail fast offline, before torch and datasets are imported
        corpora.check_hub(args.source, corpora.hub_corpus(args.source, args.text_field))
    from loopnn.data import default_data_dir, prepare

    out = Path(args.out) if args.out else default_data_dir(args.source, args.tokenizer)
    meta = prepare(
        args.source,
        out,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        overwrite=args.overwrite,
        fmt=args.format,
        text_field=args.text_field,
        workers=args.workers,
        shard_tokens=args.shard_tokens,
        max_documents=args.max_documents,
        max_bytes=args.max_bytes,
    )
    shards = meta.get("shards")
    print(
        f"prepared {out}: {meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens, "
        f"tokenizer {meta['tokenizer']} (vocab {meta['vocab_size']})"
        + (f", {len(shards['train'])} train + {len(shards['val'])} val shards" if shards else "")
    )
    return 0


def _saved_run_configs(args: argparse.Namespace, train_over: dict[str, Any]) -> dict[str, Any] | None:
    """The resolved configs a run saved in its config.json, when resuming it without --preset/--config."""
    if not args.resume or args.preset or args.config:
        return None
    path = Path(train_over.get("out_dir", TrainConfig.out_dir)) / "config.json"
    if not path.is_file():
        return None
    from loopnn.jsonio import read_json

    try:
        saved = read_json(path, "run config.json")
    except LoopnnError as e:
        raise LoopnnError(f"{e}; pass --preset/--config and the run's flags to resume") from None
    if not isinstance(saved.get("model_config"), dict) or not isinstance(saved.get("train_config"), dict):
        raise LoopnnError(f"{path} lacks model_config/train_config; pass the run's flags to resume")
    return saved


def resolve_train_configs(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig]:
    from loopnn.config import load_toml, resolve
    from loopnn.data import TokenData

    model_over = _overrides(args, ModelConfig)
    train_over = _overrides(args, TrainConfig)
    saved = _saved_run_configs(args, train_over)
    if saved is not None:  # --resume without --preset/--config: the run's own settings, then the flags
        from loopnn.config import model_config_from_dict, train_config_from_dict

        mc = model_config_from_dict(saved["model_config"] | model_over, "the run's config.json")
        tc = train_config_from_dict(saved["train_config"] | train_over, "the run's config.json")
        return mc, tc
    mc, tc = resolve(args.preset, args.config, model_over, train_over)
    explicit_vocab = "vocab_size" in model_over or (
        args.config and "vocab_size" in load_toml(args.config).get("model", {})
    )
    data = TokenData(tc.data_dir)
    if not explicit_vocab and data.vocab_size != mc.vocab_size:
        mc = dataclasses.replace(mc, vocab_size=data.vocab_size)  # presets adopt the data's tokenizer
    return mc, tc


def cmd_train(args: argparse.Namespace) -> int:
    from loopnn import dist
    from loopnn.train import train

    mc, tc = resolve_train_configs(args)
    try:
        summary = train(mc, tc, resume=args.resume, overwrite=args.overwrite)
    finally:
        dist.teardown()  # under torchrun: leave the process group cleanly
    val = summary["val"] or {}
    if dist.rank() != 0:
        return 0
    print(
        f"{summary['run_dir']}: step {summary['step']}, {summary['tokens']:,} tokens, "
        f"val loss {val.get('loss', float('nan')):.4f}, {summary['tokens_per_s']:,.0f} tokens/s, "
        f"{summary['wall_time']:.0f} s"
    )
    if summary["interrupted"]:
        print(f"stopped by signal; checkpoint saved in {summary['checkpoint']}; continue with --resume")
        return 130
    return 0


def _parse_loops(text: str | None) -> list[int]:
    if not text:
        return []
    loops = list(_parse_ints(text, "--loops"))
    if any(n < 1 for n in loops):
        raise LoopnnError(f"--loops values must be >= 1; got {text!r}")
    return loops


def _load_for_eval(path: str, device: str):
    from loopnn.checkpoint import load_model
    from loopnn.train import resolve_device

    dev = resolve_device(device)
    model, meta = load_model(path, dev)
    model.eval()
    return model, meta


def cmd_eval(args: argparse.Namespace) -> int:
    from loopnn.data import TokenData
    from loopnn.evaluate import evaluate, loss_vs_loops, per_loop_losses

    loops = _parse_loops(args.loops)  # check before minutes of evaluation
    if args.n_loops is not None and args.n_loops < 1:
        raise LoopnnError(f"--n-loops must be >= 1, got {args.n_loops}")
    model, meta = _load_for_eval(args.checkpoint, args.device)
    recorded = ((meta.get("info") or {}).get("data") or {}).get("dir")  # absolute since this version
    data_dir = args.data or recorded or (meta.get("train_config") or {}).get("data_dir")
    if not data_dir:
        raise LoopnnError("no data directory recorded in the checkpoint; pass --data-dir DIR")
    data = TokenData(data_dir)
    if data.vocab_size != model.config.vocab_size:
        raise LoopnnError(
            f"data vocab {data.vocab_size} != model vocab {model.config.vocab_size}; pass matching --data-dir"
        )
    seq_len = args.seq_len or (meta.get("train_config") or {}).get("seq_len") or model.config.block_size
    kw = dict(batch_size=args.batch_size, seq_len=seq_len, max_tokens=args.max_tokens)
    n_loops = args.n_loops or model.config.n_loops  # --n-loops: the loop count of this evaluation
    result: dict[str, Any] = {"checkpoint": str(meta["path"]), "n_loops": n_loops}
    result.update(evaluate(model, data, **kw, n_loops=n_loops))
    if not math.isfinite(result["loss"]):
        raise LoopnnError(
            f"val loss is {result['loss']} at {n_loops} loops: the weights in {meta['path']} are not finite "
            "(a diverged run?); evaluate an earlier checkpoint"
        )
    print(
        f"val loss {result['loss']:.4f} nats/token, perplexity {result['perplexity']:.2f}, "
        f"bits/byte {result['bits_per_byte']:.4f} ({result['tokens']:,} tokens, {n_loops} loops)"
    )
    if args.per_loop:
        result["per_loop_loss"] = per_loop_losses(model, data, **kw, n_loops=n_loops)
        print("loss after each loop: " + ", ".join(f"{i + 1}: {v:.4f}" for i, v in enumerate(result["per_loop_loss"])))
    if args.adaptive:
        from loopnn.adaptive import evaluate_adaptive

        batches = data.val_batches(args.batch_size, seq_len, args.max_tokens or 8192)
        ev = evaluate_adaptive(model, batches, _adaptive(args), n_loops=args.n_loops)
        result["adaptive"] = {
            "loss": ev.loss,
            "fixed_loss": ev.fixed_loss,
            "loss_change": ev.loss_change,
            "mean_loops": ev.mean_loops,
            "max_loops": ev.max_loops,
            "loop_saving": ev.loop_saving,
            "executed_flops": ev.executed_flops,
            "fixed_flops": ev.fixed_flops,
            "wall_time": ev.wall_time,
            "tokens": ev.tokens,
        }
        print(
            f"adaptive ({args.criterion} < {args.threshold}): loss {ev.loss:.4f} vs fixed {ev.fixed_loss:.4f} "
            f"({100 * ev.loss_change:+.2f}%), {ev.mean_loops:.2f} of {ev.max_loops} loops per token "
            f"({100 * ev.loop_saving:.1f}% saved), executed FLOPs {ev.executed_flops / max(ev.fixed_flops, 1):.2f}x "
            f"the fixed model's, {ev.tokens:,} tokens"
        )
    if loops:
        result["loss_vs_loops"] = loss_vs_loops(model, data, loops, **kw)
        print("loss vs test-time loops: " + ", ".join(f"{n}: {v:.4f}" for n, v in result["loss_vs_loops"].items()))
    if args.json:
        from loopnn.atomic import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps(result, indent=2, default=str) + "\n")
    return 0


def _adaptive(args: argparse.Namespace):
    if not args.adaptive:
        return None
    from loopnn.adaptive import AdaptiveConfig

    return AdaptiveConfig(
        criterion=args.criterion, threshold=args.threshold, min_loops=args.min_loops, max_loops=args.max_loops
    )


def _add_adaptive_flags(s: argparse.ArgumentParser) -> None:
    g = s.add_argument_group("adaptive per-token looping (stack strategy)")
    g.add_argument("--adaptive", action="store_true", help="stop looping a token once its prediction settles")
    g.add_argument("--criterion", choices=CRITERIA, default="kl")
    g.add_argument(
        "--threshold",
        type=float,
        default=ADAPTIVE_THRESHOLD,
        help=f"settled when the change is below this (default {ADAPTIVE_THRESHOLD}: see docs/benchmarks.md)",
    )
    g.add_argument("--min-loops", type=int, default=1)
    g.add_argument("--max-loops", type=int, default=None, help="default: the trained n_loops (or --n-loops)")


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from loopnn.adaptive import DecodeStats
    from loopnn.generate import generate, stream
    from loopnn.tokenizer import get_tokenizer

    model, meta = _load_for_eval(args.checkpoint, args.device)
    data_meta = (meta.get("info") or {}).get("data") or {}
    run_dir = Path(meta["path"]).parent.parent  # RUN/checkpoints/step-N -> RUN
    tokenizer_dir = run_dir if (run_dir / "tokenizer.json").is_file() else data_meta.get("dir")
    tok = get_tokenizer(args.tokenizer or data_meta.get("tokenizer", "bytes"), tokenizer_dir)
    if tok.vocab_size != model.config.vocab_size:
        raise LoopnnError(
            f"tokenizer {tok.name} has {tok.vocab_size} tokens but the model has {model.config.vocab_size}; "
            "use the tokenizer the model was trained with (drop --tokenizer)"
        )
    if args.prompts_file:
        if args.prompt:
            raise LoopnnError("give either --prompt or --prompts-file, not both")
        try:
            texts = [t for t in Path(args.prompts_file).read_text().splitlines() if t.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise LoopnnError(f"cannot read --prompts-file {args.prompts_file}: {e}") from None
        if not texts:
            raise LoopnnError(f"--prompts-file {args.prompts_file} holds no non-empty line")
        if args.stream and len(texts) > 1:
            raise LoopnnError("--stream prints one sample as it is generated; use it with a single prompt")
    else:
        texts = [args.prompt]
    fallback = [tok.eot_id] if tok.eot_id is not None else tok.encode("\n")
    prompts = [tok.encode(t) or fallback for t in texts]
    room = model.config.block_size - max(len(p) for p in prompts)
    if room < 1:
        raise LoopnnError(f"the prompt fills the model's context ({model.config.block_size} tokens); shorten it")
    if args.max_new_tokens > room:  # the KV cache does not slide: stop at the end of the context
        print(
            f"note: generating {room} tokens, the room left in the {model.config.block_size}-token context",
            file=sys.stderr,
        )
        args.max_new_tokens = room
    stats = DecodeStats()
    kw = dict(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        n_loops=args.n_loops,
        use_cache=not args.no_cache,
        eos_id=tok.eot_id if args.stop_at_eot else None,
        adaptive=_adaptive(args),
        stats=stats,
    )
    with torch.inference_mode():
        if args.stream and len(prompts) == 1:
            print(texts[0], end="", flush=True)
            pending: list[int] = []
            for step in stream(model, prompts, args.max_new_tokens, **kw):
                if step[0] is not None:
                    pending.append(step[0])
                    text = tok.decode(pending)
                    if "\ufffd" not in text:  # wait for the rest of a multi-byte character
                        print(text, end="", flush=True)
                        pending = []
            print(tok.decode(pending))
        else:
            outs = generate(model, prompts, args.max_new_tokens, **kw)
            for i, (text, out) in enumerate(zip(texts, outs)):
                if len(prompts) > 1:
                    print(f"--- sample {i + 1}")
                print(text + tok.decode(out))
    if args.adaptive:
        print(f"adaptive: {stats.mean_loops:.2f} loops per token on average, {stats.flops / 1e9:.3f} GFLOP executed")
    return 0


def _parse_ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise LoopnnError(f"{flag} takes comma-separated integers like 1,2,4; got {text!r}") from None


def cmd_demo(args: argparse.Namespace) -> int:
    from loopnn import demo

    seeds = _parse_ints(args.seeds, "--seeds") if args.seeds else None
    if (args.steps is not None and args.steps < 1) or (seeds is not None and not seeds):
        raise LoopnnError("--steps must be >= 1 and --seeds must name at least one seed")
    if args.ablation:
        demo.ablation(args.out_dir or "runs/ablation", args.data, args.steps, seeds or demo.DEFAULT_SEEDS,
                      not args.no_progress)  # fmt: skip
        return 0
    demo.demo(args.out_dir or "runs/demo", args.data, args.steps, seeds, args.full, not args.no_progress)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from loopnn.report import compare

    result = compare(args.runs, args.out)
    print(result["markdown"])
    print("written: " + ", ".join(result["files"]))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Training and generation speed of loopnn vs HF GPT-2 of identical size and loops (docs/benchmarks.md)."""
    from loopnn.bench import BenchConfig, bench_head_loss, run_bench, table, write_jsonl

    if args.head_loss:
        for vocab in _parse_ints(args.head_loss, "--head-loss"):
            r = bench_head_loss(vocab, args.head_n_embd, args.head_rows)
            print(json.dumps(r))
        return 0
    for flag in ("batch_size", "steps", "new_tokens"):
        if getattr(args, flag) < 1:
            raise LoopnnError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.warmup < 0 or args.threads < 0:
        raise LoopnnError("--warmup and --threads must be >= 0")
    if args.memory_loops < 1:
        raise LoopnnError(f"--memory-loops must be >= 1, got {args.memory_loops}")
    bc = BenchConfig(
        preset=args.preset, n_loops=args.n_loops, loop_rule=args.loop_rule, batch_size=args.batch_size,
        seq_len=args.seq_len, steps=args.steps, warmup=args.warmup, prompt_len=args.prompt_len,
        new_tokens=args.new_tokens, compile=args.compile, device=args.device, threads=args.threads, hf=not args.no_hf,
        memory=not args.no_memory, memory_loops=args.memory_loops, adaptive=not args.no_adaptive,
    )  # fmt: skip
    records = run_bench(bc, log=lambda m: print(m, file=sys.stderr))
    print(table(records))
    print(write_jsonl(records, args.json), end="")
    return 0


def _require_hf():
    try:
        import loopnn.hf as lh
    except ImportError as e:
        raise LoopnnError(f"HF integration needs transformers ({e}); pip install 'loopnn[hf]'") from None
    return lh


def cmd_export(args: argparse.Namespace) -> int:
    from loopnn.checkpoint import read_meta, resolve_checkpoint

    lh = _require_hf()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # stderr keeps to loopnn's own lines
    vocab = read_meta(resolve_checkpoint(args.checkpoint))["model_config"].get("vocab_size")
    if args.gpt2_tokenizer and vocab != 50257:
        raise LoopnnError(f"--gpt2-tokenizer needs a GPT-2-vocab model (50257 tokens); this one has {vocab}")
    out = lh.export_hf(args.checkpoint, args.out, tokenizer=lh.gpt2_tokenizer() if args.gpt2_tokenizer else None)
    print(f"exported {args.checkpoint} -> {out} (load with AutoModelForCausalLM after `import loopnn.hf`)")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from loopnn.checkpoint import save_checkpoint

    lh = _require_hf()
    if args.gpt2:
        model = lh.load_gpt2(args.source)
        path = save_checkpoint(args.out, 0, model, model.config)
    else:
        path = lh.import_hf(args.source, args.out)
    print(f"imported {args.source} -> {path}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """OpenAI-compatible HTTP server (docs/serve.md); needs `pip install 'loopnn[serve]'`."""
    try:
        from loopnn.serve.app import serve
    except ImportError as e:
        raise LoopnnError(f"loopnn serve needs starlette and uvicorn ({e}); pip install 'loopnn[serve]'") from None
    return serve(
        args.checkpoint, args.host, args.port, device=args.device, tokenizer=args.tokenizer,
        model_name=args.model_name, max_batch=args.max_batch, max_queue=args.max_queue,
        max_n_loops=args.max_n_loops, speculative_k=args.speculative_k, draft_loops=args.draft_loops,
        threads=args.threads, log_level=args.log_level,
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="loopnn", description="Loop neural networks: looped GPT-2 models (Ng & Wang 2024).")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

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
        "(shakespeare, kjv, pydoc); a hub corpus (openwebtext, fineweb-edu, tinystories, wikitext-103) "
        "or hf:owner/name[:config]",
    )
    s.add_argument("--out-dir", "--out", dest="out", help="output directory (default data/<source>-<tokenizer>)")
    s.add_argument("--tokenizer", default="bytes", choices=TOKENIZER_NAMES)
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
    s.set_defaults(func=cmd_prepare)

    s = sub.add_parser("train", help="train a model; flags override --preset and --config")
    s.add_argument("--preset", choices=sorted(PRESETS), help="model size preset")
    s.add_argument("--config", help="TOML recipe (see configs/)")
    s.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint in --out-dir")
    s.add_argument("--overwrite", action="store_true", help="replace a finished run in --out-dir")
    _field_flags(s, ModelConfig)
    _field_flags(s, TrainConfig)
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("eval", help="validation loss, perplexity, bits/byte, per-loop loss, loss vs loops")
    s.add_argument("checkpoint", help="run directory or RUN/checkpoints/step-N")
    s.add_argument("--data-dir", "--data", dest="data", help="prepared data directory (default: the run's)")
    s.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="evaluate at most this many tokens (default: the whole validation split)",
    )
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--seq-len", type=int, default=None)
    s.add_argument("--per-loop", action="store_true", help="loss after each loop (logit lens)")
    s.add_argument("--loops", help="comma-separated test-time loop counts, e.g. 1,2,4,8")
    s.add_argument("--device", default="auto")
    s.add_argument("--json", help="also write the results to this JSON file")
    s.add_argument("--n-loops", type=int, default=None, help="loop count (adaptive: the maximum)")
    _add_adaptive_flags(s)
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("generate", help="sample text from a checkpoint")
    s.add_argument("checkpoint", help="run directory or RUN/checkpoints/step-N")
    s.add_argument("--prompt", default="")
    s.add_argument("--prompts-file", help="one prompt per line, generated as one left-padded batch")
    s.add_argument("--max-new-tokens", type=int, default=200)
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--top-p", type=float, default=None)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--n-loops", type=int, default=None, help="loop count for this call (default: trained)")
    s.add_argument("--tokenizer", default=None, help="override the tokenizer recorded with the data")
    s.add_argument("--device", default="auto")
    s.add_argument("--no-cache", action="store_true", help="recompute the whole prefix each step (for checking)")
    s.add_argument("--stop-at-eot", action="store_true", help="stop a sample at the end-of-text token")
    s.add_argument("--stream", action="store_true", help="print tokens as they are generated (single prompt)")
    _add_adaptive_flags(s)
    s.set_defaults(func=cmd_generate)

    from loopnn.config import LOOP_RULES

    s = sub.add_parser("demo", help="what looping buys, at laptop scale (under 10 minutes on 2 CPU cores)")
    s.add_argument("--out-dir", "--out", default=None, help="default runs/demo (runs/ablation with --ablation)")
    s.add_argument(
        "--data-dir",
        "--data",
        dest="data",
        default=None,
        help="any prepared corpus (default: Shakespeare, BPE 2048, prepared if missing)",
    )
    s.add_argument("--full", action="store_true", help="longer: r = 2 and 4, the plain loop too, 3 seeds (~1 h)")
    s.add_argument("--steps", type=int, default=None, help="training steps per model (default 600; --full 1200)")
    s.add_argument("--seeds", default=None, help="comma-separated seeds (default 1,2; --full 1,2,3)")
    s.add_argument("--ablation", action="store_true", help="instead: every update rule x strategy, over --seeds")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("compare", help="table + plots (iso-parameter and iso-FLOP views) from finished runs")
    s.add_argument("runs", nargs="+", help="run directories")
    s.add_argument(
        "--out-dir", "--out", dest="out", default="runs/compare", help="where to write compare.md/json, PNGs"
    )
    s.set_defaults(func=cmd_compare)

    s = sub.add_parser("bench", help="training/generation tokens/s, MFU, memory: loopnn vs HF GPT-2, same loops")
    s.add_argument("--preset", choices=sorted(PRESETS), default="demo", help="model shape (random weights)")
    s.add_argument("--n-loops", type=int, default=None, help="default: the preset's")
    s.add_argument("--loop-rule", choices=LOOP_RULES, default=None)
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--seq-len", type=int, default=None, help="default: the model's block_size")
    s.add_argument("--steps", type=int, default=10, help="timed training steps per implementation")
    s.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    s.add_argument("--prompt-len", type=int, default=32)
    s.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per generation run")
    s.add_argument("--compile", action="store_true", help="torch.compile each block (both implementations)")
    s.add_argument("--device", default="auto")
    s.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    s.add_argument("--no-hf", action="store_true", help="skip the transformers GPT2LMHeadModel reference")
    s.add_argument("--no-memory", action="store_true", help="skip peak memory at 1 and --memory-loops loops")
    s.add_argument("--memory-loops", type=int, default=6, help="loops of the memory comparison with 1 loop")
    s.add_argument("--no-adaptive", action="store_true", help="skip adaptive-exit vs fixed decode wall time")
    s.add_argument("--json", help="also write the JSON lines to this file")
    s.add_argument("--head-loss", help="instead: time plain vs chunked head+loss at these vocab sizes, e.g. 256,50257")
    s.add_argument("--head-n-embd", type=int, default=128, help="width for --head-loss")
    s.add_argument("--head-rows", type=int, default=2048, help="rows (batch x seq) for --head-loss")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("export", help="a loopnn checkpoint -> HF transformers directory (needs loopnn[hf])")
    s.add_argument("checkpoint", help="run directory or RUN/checkpoints/step-N")
    s.add_argument("--out-dir", "--out", dest="out", required=True, help="HF model directory to write")
    s.add_argument("--gpt2-tokenizer", action="store_true", help="also save the GPT-2 tokenizer (gpt2 data only)")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("serve", help="OpenAI-compatible completions server with per-request loops (loopnn[serve])")
    s.add_argument("checkpoint", help="run directory, RUN/checkpoints/step-N, or an HF export directory")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed at start)")
    s.add_argument("--device", default="auto")
    s.add_argument("--tokenizer", default=None, help="override the tokenizer recorded with the data")
    s.add_argument("--model-name", default=None, help="the id in /v1/models (default: the directory name)")
    s.add_argument("--max-batch", type=int, default=32, help="rows decoded together (continuous batching)")
    s.add_argument("--max-queue", type=int, default=256, help="waiting rows before requests get 429")
    s.add_argument("--max-n-loops", type=int, default=None, help="largest n_loops a request may ask for")
    s.add_argument("--speculative-k", type=int, default=0, help="default draft tokens for greedy requests (0: off)")
    s.add_argument("--draft-loops", type=int, default=1, help="loops of the speculative draft")
    s.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    s.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("import", help="an HF directory (loopnn export, or GPT-2 with --gpt2) -> loopnn checkpoint")
    s.add_argument("source", help="HF model directory")
    s.add_argument("--out-dir", "--out", dest="out", required=True, help="run directory to write the checkpoint into")
    s.add_argument("--gpt2", action="store_true", help="source is a GPT2LMHeadModel directory")
    s.set_defaults(func=cmd_import)
    return p


def _environment_error(e: BaseException) -> str | None:
    """One line for a failure of the machine rather than of loopnn: a path that cannot be read or written, a
    full disk, an allocation that fails. None for anything else (a bug, which should show its traceback)."""
    if isinstance(e, OSError):
        where = f"{e.filename}: " if e.filename else ""
        why = e.strerror or str(e) or type(e).__name__
        return f"{where}{why}; check the path, free space and permissions"
    if isinstance(e, MemoryError):
        return "out of memory; use a smaller model, batch_size, block_size or seq_len"
    text = " ".join(str(e).split())
    if "can't allocate memory" in text or "out of memory" in text.lower():
        import re

        size = re.search(r"allocate (\d+) bytes", text)
        asked = f" ({int(size.group(1)) / 2**30:,.1f} GiB requested)" if size else ""
        return f"out of memory{asked}; use a smaller model, batch_size, block_size or seq_len"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except LoopnnError as e:
        message = " ".join(str(e).split("\n"))  # always one line, whatever the input quoted in it
        print(f"loopnn {args.command}: error: {message}", file=sys.stderr)
        return 2
    except StopRequested as e:
        print(f"loopnn {args.command}: {e}", file=sys.stderr)
        return 130
    except (OSError, MemoryError, RuntimeError) as e:  # the boundary: expected environment failures, one line
        message = _environment_error(e)
        if message is None:
            raise
        print(f"loopnn {args.command}: error: {message}", file=sys.stderr)
        return 2
    except Exception as e:
        if type(e).__name__ != "SafetensorError":
            raise
        print(f"loopnn {args.command}: error: not a valid safetensors file ({str(e)[:200]})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"loopnn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
