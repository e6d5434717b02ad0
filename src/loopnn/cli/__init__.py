"""Command line: `loopnn prepare | train | eval | generate | compare | bench | demo | export | import | serve`.

parser.py builds the flags (train's from the config dataclasses, so a field has the same name in code, TOML,
JSON and flags: `n_loops` <-> `--n-loops`); each subcommand is one function `cmd_NAME(args)`, here for prepare
and train, in commands.py for the rest. Expected failures raise `LoopnnError`, printed here as one line with
exit status 2. `python -m loopnn` runs the same (torchrun needs it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from loopnn.cli.commands import (
    cmd_bench,
    cmd_compare,
    cmd_demo,
    cmd_eval,
    cmd_export,
    cmd_generate,
    cmd_import,
    cmd_serve,
)
from loopnn.cli.parser import build_parser, overrides
from loopnn.config import ModelConfig, TrainConfig
from loopnn.errors import LoopnnError, StopRequested, one_line

__all__ = ["build_parser", "main", "resolve_train_configs"]


def cmd_prepare(args: argparse.Namespace) -> int:
    from loopnn.data import sharded

    if sharded.is_hub_source(args.source):  # fail fast offline, before datasets is imported
        sharded.check_hub(args.source, sharded.hub_corpus(args.source, args.text_field))
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
    """The resolved configs a run saved in its config, when resuming it without --preset/--config."""
    if not args.resume or args.preset or args.config:
        return None
    from loopnn.runs import RunDir

    run = RunDir(train_over.get("out_dir", TrainConfig.out_dir))
    path = run.config
    if not path.is_file():
        return None
    try:
        saved = run.read_config()
    except LoopnnError as e:
        raise LoopnnError(f"{e}; pass --preset/--config and the run's flags to resume") from None
    if not isinstance(saved.get("model_config"), dict) or not isinstance(saved.get("train_config"), dict):
        raise LoopnnError(f"{path} lacks model_config/train_config; pass the run's flags to resume")
    return saved


def resolve_train_configs(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig]:
    from loopnn.data import TokenData
    from loopnn.recipes import load_toml, resolve

    model_over = overrides(args, ModelConfig)
    train_over = overrides(args, TrainConfig)
    saved = _saved_run_configs(args, train_over)
    if saved is not None:  # --resume without --preset/--config: the run's own settings, then the flags
        from loopnn.recipes import model_config_from_dict, train_config_from_dict

        mc = model_config_from_dict(saved["model_config"] | model_over, "the run's config")
        tc = train_config_from_dict(saved["train_config"] | train_over, "the run's config")
        return mc, tc
    mc, tc = resolve(args.preset, args.config, model_over, train_over)
    explicit_vocab = "vocab_size" in model_over or (
        args.config and "vocab_size" in load_toml(args.config).get("model", {})
    )
    if getattr(args, "print_config", False) and not explicit_vocab and not (Path(tc.data_dir) / "meta.json").is_file():
        print(f"note: {tc.data_dir} is not prepared; vocab_size is the config's, not the data's", file=sys.stderr)
        return mc, tc
    data = TokenData(tc.data_dir)
    if not explicit_vocab and data.vocab_size != mc.vocab_size:
        mc = dataclasses.replace(mc, vocab_size=data.vocab_size)  # presets adopt the data's tokenizer
    return mc, tc


def cmd_train(args: argparse.Namespace) -> int:
    from loopnn import dist
    from loopnn.train import train

    mc, tc = resolve_train_configs(args)
    if args.print_config:
        from loopnn.config import to_dict

        print(json.dumps({"model_config": to_dict(mc), "train_config": to_dict(tc)}, indent=2))
        return 0
    finished = False
    try:
        summary = train(mc, tc, resume=args.resume, overwrite=args.overwrite)
        finished = True
    finally:
        dist.teardown(synchronize=finished)  # under torchrun: leave the process group cleanly
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


COMMANDS = {
    "prepare": cmd_prepare,
    "train": cmd_train,
    "eval": cmd_eval,
    "generate": cmd_generate,
    "demo": cmd_demo,
    "compare": cmd_compare,
    "bench": cmd_bench,
    "export": cmd_export,
    "serve": cmd_serve,
    "import": cmd_import,
}


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
        return COMMANDS[args.command](args)
    except LoopnnError as e:
        message = one_line(str(e))  # always one line, whatever the input quoted in it
        print(f"loopnn {args.command}: error: {message}", file=sys.stderr)
        return 2
    except StopRequested as e:
        print(f"loopnn {args.command}: {one_line(str(e))}", file=sys.stderr)
        return 130
    except (OSError, MemoryError, RuntimeError) as e:  # the boundary: expected environment failures, one line
        message = _environment_error(e)
        if message is None:
            raise
        print(f"loopnn {args.command}: error: {one_line(message)}", file=sys.stderr)
        return 2
    except Exception as e:
        if type(e).__name__ != "SafetensorError":
            raise
        print(f"loopnn {args.command}: error: not a valid safetensors file ({one_line(str(e)[:200])})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"loopnn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
