"""The commands that read a trained model: eval, generate, export, import, serve; and demo, compare, bench.

Each `cmd_NAME(args)` takes the parsed flags (loopnn.cli.parser) and returns the exit status; expected failures
raise LoopnnError, which loopnn.cli.main prints as one line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from loopnn.cli.parser import overrides
from loopnn.config import MAX_LOOPS
from loopnn.errors import LoopnnError


def _parse_loops(text: str | None) -> list[int]:
    if not text:
        return []
    loops = list(_parse_ints(text, "--loops"))
    if any(not 1 <= n <= MAX_LOOPS for n in loops):
        raise LoopnnError(f"--loops values must be between 1 and {MAX_LOOPS}; got {text!r}")
    return loops


def _open(path: str, device: str, tokenizer: str | None = None):
    from loopnn.device import resolve_device
    from loopnn.runs import open_run

    return open_run(path, resolve_device(device), tokenizer=tokenizer)


def cmd_eval(args: argparse.Namespace) -> int:
    from loopnn.evaluate import evaluate, loss_vs_loops, per_loop_losses

    if args.tasks:
        return _eval_tasks(args)
    loops = _parse_loops(args.loops)  # check before minutes of evaluation
    if args.n_loops is not None and not 1 <= args.n_loops <= MAX_LOOPS:
        raise LoopnnError(f"--n-loops must be between 1 and {MAX_LOOPS}, got {args.n_loops}")
    run = _open(args.checkpoint, args.device)
    model, meta = run.model, run.meta
    data = run.data(args.data)
    seq_len = args.seq_len or run.train_config.get("seq_len") or model.config.block_size
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
        result["adaptive"] = _eval_adaptive(args, model, data, seq_len)
    if loops:
        result["loss_vs_loops"] = loss_vs_loops(model, data, loops, **kw)
        print("loss vs test-time loops: " + ", ".join(f"{n}: {v:.4f}" for n, v in result["loss_vs_loops"].items()))
    if args.json:
        from loopnn.atomic import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps(result, indent=2, default=str) + "\n")
    return 0


def _eval_tasks(args: argparse.Namespace) -> int:
    """lm-eval tasks through lm-eval's own HF model class, on the export of the run (loopnn.hf.tasks)."""
    from loopnn.device import resolve_device

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    checks = [
        (bool(tasks), f"--tasks names no task ({args.tasks!r}); pass lm-eval task names, e.g. lambada_openai"),
        (args.n_loops is None or args.n_loops >= 1, f"--n-loops must be >= 1, got {args.n_loops}"),
        (args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}"),
        (args.num_fewshot is None or args.num_fewshot >= 0, f"--num-fewshot must be >= 0, got {args.num_fewshot}"),
        (
            args.limit is None or 0 < args.limit < 2**31,
            f"--limit must be a positive count or fraction, got {args.limit}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise LoopnnError(message)
    _require_hf()
    from transformers.utils import logging as hf_logging

    from loopnn.hf.tasks import require_lm_eval, run_tasks

    hf_logging.disable_progress_bar()  # stderr keeps to loopnn's and lm-eval's own lines

    require_lm_eval()  # before an export is written
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit  # lm-eval: count or fraction
    results = run_tasks(
        args.checkpoint, tasks, n_loops=args.n_loops, batch_size=args.batch_size, num_fewshot=args.num_fewshot,
        limit=limit, include_path=args.include_path, device=str(resolve_device(args.device)),
    )  # fmt: skip
    from lm_eval.utils import make_table

    print(make_table(results))
    if args.json:
        from loopnn.atomic import atomic_write_text

        record = {"checkpoint": args.checkpoint, "n_loops": args.n_loops, "results": results["results"]}
        atomic_write_text(Path(args.json), json.dumps(record, indent=2, default=str) + "\n")
    return 0


def _eval_adaptive(args: argparse.Namespace, model, data, seq_len: int) -> dict[str, Any]:
    """Adaptive per-token looping on the val stream, against the fixed loop count."""
    from loopnn.adaptive_eval import evaluate_adaptive

    batches = data.val_batches(args.batch_size, seq_len, args.max_tokens or 8192)
    adaptive = _adaptive(args)
    ev = evaluate_adaptive(model, batches, adaptive, n_loops=args.n_loops)
    summary = {
        "loss": ev.loss,
        "fixed_loss": ev.fixed_loss,
        "loss_change": ev.loss_change,
        "mean_loops": ev.mean_loops,
        "max_loops": ev.max_loops,
        "loop_saving": ev.loop_saving,
        "executed_flops": ev.executed_flops,
        "fixed_flops": ev.fixed_flops,
        "wall_time": ev.wall_time,
        "fixed_wall_time": ev.fixed_wall_time,
        "tokens": ev.tokens,
    }
    print(
        f"adaptive ({adaptive.criterion} < {adaptive.threshold}): loss {ev.loss:.4f} vs fixed {ev.fixed_loss:.4f} "
        f"({100 * ev.loss_change:+.2f}%), {ev.mean_loops:.2f} of {ev.max_loops} loops per token "
        f"({100 * ev.loop_saving:.1f}% saved), executed FLOPs {ev.executed_flops / max(ev.fixed_flops, 1):.2f}x "
        f"the fixed model's, wall time {ev.wall_time:.2f} s vs {ev.fixed_wall_time:.2f} s, {ev.tokens:,} tokens"
    )
    return summary


def _adaptive(args: argparse.Namespace):
    if not args.adaptive:
        return None
    from loopnn.options import AdaptiveConfig

    return AdaptiveConfig(**overrides(args, AdaptiveConfig))


def _prompts(args: argparse.Namespace, tok, block_size: int) -> tuple[list[str], list[list[int]]]:
    """(prompt texts, their ids) from --prompt or --prompts-file; caps --max-new-tokens at the context left."""
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
    room = block_size - max(len(p) for p in prompts)
    if room < 1:
        raise LoopnnError(f"the prompt fills the model's context ({block_size} tokens); shorten it")
    if args.max_new_tokens > room:  # the KV cache does not slide: stop at the end of the context
        print(
            f"note: generating {room} tokens, the room left in the {block_size}-token context",
            file=sys.stderr,
        )
        args.max_new_tokens = room
    return texts, prompts


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from loopnn.adaptive import DecodeStats
    from loopnn.generate import generate, stream

    run = _open(args.checkpoint, args.device, args.tokenizer)
    model, tok = run.model, run.tokenizer
    texts, prompts = _prompts(args, tok, model.config.block_size)
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
        if args.full or args.roles or args.jobs:
            raise LoopnnError("--ablation trains its own models at --lm's setting, one at a time; drop --full, --roles "
                              "and --jobs")  # fmt: skip
        demo.ablation(args.out_dir or "runs/ablation", args.data, args.steps, seeds or demo.DEFAULT_SEEDS,
                      not args.no_progress)  # fmt: skip
        return 0
    roles = tuple(r.strip() for r in args.roles.split(",") if r.strip()) if args.roles else None
    mode = "full" if args.full else "lm" if args.lm else None
    demo.demo(args.out_dir, args.data, args.steps, seeds, mode, not args.no_progress, roles, args.jobs)
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
    bc = BenchConfig(**overrides(args, BenchConfig))
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
    from loopnn.runs import open_run

    lh = _require_hf()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # stderr keeps to loopnn's own lines
    run = open_run(args.checkpoint)
    vocab = run.model_config.vocab_size
    if args.gpt2_tokenizer and vocab != 50257:
        raise LoopnnError(f"--gpt2-tokenizer needs a GPT-2-vocab model (50257 tokens); this one has {vocab}")
    tokenizer = lh.gpt2_tokenizer() if args.gpt2_tokenizer else None
    out = lh.export_hf(run, args.out, tokenizer=tokenizer, unroll=args.unroll)
    what = "a plain GPT-2, " if args.unroll else ""
    tokenizer = "with its tokenizer" if (out / "tokenizer.json").is_file() else "no tokenizer recorded"
    print(f"exported {args.checkpoint} -> {out} ({what}{tokenizer}; README.md says how to load it)")
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
    from loopnn.cli.parser import overrides
    from loopnn.serve.config import ServeConfig

    cfg = ServeConfig(**overrides(args, ServeConfig))  # a bad flag fails here, before torch is imported
    try:
        from loopnn.serve.server import serve
    except ImportError as e:
        raise LoopnnError(f"loopnn serve needs starlette and uvicorn ({e}); pip install 'loopnn[serve]'") from None
    return serve(args.checkpoint, cfg)
