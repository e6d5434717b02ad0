"""The GPU check that scripts/gpu_check.sh runs: every GPU path of loopnn exercised once, its figures in one JSON.

    python scripts/gpu_check.py --json runs/gpu_check/gpu_check.json            # on one CUDA GPU, < 8 minutes
    python scripts/gpu_check.py --dry-run --json runs/gpu_check/dry.json        # the same code paths, CPU, tiny

Each check runs in its own process (`--stage NAME`) under a time limit, so a hang, a crash or a CUDA error in one
is recorded as that check's failure and the rest still run, and each starts with fresh peak-memory counters:
  cuda_tests         pytest -m gpu (tests marked gpu: fp16 + GradScaler, bf16 autocast, chunked loss on CUDA)
  bench:P:MODE       gpt2-124m and loop-81m, bf16, eager and compiled: training tokens/s, MFU against the GPU's
                     datasheet bf16 peak (loopnn.instruments.GPU_BF16_PEAK), peak memory, against the HF GPT-2
                     twin with the same weights and loop schedule (loopnn bench's run_bench)
  compile_checkpointing  loop-81m trained eager and with --compile --activation-checkpointing: same losses?
  fsdp_torchrun      `torchrun --nproc_per_node=1 -m loopnn train --parallel fsdp` (the launch path)
  fsdp_one_rank      dist.wrap's FSDP2 branch on a one-rank group: losses and gathered weights vs unsharded
  kill_resume        a run SIGKILLed after a checkpoint, resumed, against the same run uninterrupted
  generate_serve     `loopnn generate` and `loopnn serve` (one completion request) on the trained run
  chunked_loss       head + cross-entropy at vocab 50,257: plain vs chunked (loopnn.loss), time and peak memory
--dry-run runs every check on the CPU with tiny models and a few steps, so this file is reviewed by execution
(tests/test_gpu_check.py runs it). Exit status 1 when a check failed, 0 otherwise.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"

# Sizes per mode. gpu: the real presets at GPT-2's context; dry: tiny models on the CPU, a few steps each.
PLANS: dict[str, dict[str, Any]] = {
    "gpu": dict(
        device="cuda", bench_presets=("gpt2-124m", "loop-81m"), bench_modes=("eager", "compile"), bench_batch=8,
        bench_seq=1024, bench_steps=100, bench_warmup=10, train_preset="gpt2-124m", loop_preset="loop-81m",
        tokenizer="gpt2", train_batch=8, train_seq=512, resume_steps=60, resume_ckpt=20, compile_steps=30,
        head_rows=8192, head_n_embd=768, head_repeats=20, stage_timeout=180, budget_s=440,
    ),
    "dry": dict(
        device="cpu", bench_presets=("cpu-small", "debug"), bench_modes=("eager",), bench_batch=2, bench_seq=32,
        bench_steps=3, bench_warmup=1, train_preset="debug", loop_preset="debug", tokenizer="bytes", train_batch=2,
        train_seq=32, resume_steps=40, resume_ckpt=10, compile_steps=4, head_rows=128, head_n_embd=32,
        head_repeats=2, stage_timeout=240, budget_s=1200,
    ),
}  # fmt: skip
HEAD_VOCAB = 50257  # GPT-2's vocab, where the chunked loss's memory saving is largest


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")


def loopnn_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "loopnn", *args]


def run(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(), cwd=ROOT, **kw)
    if out.returncode != 0:
        tail = (out.stdout + out.stderr).strip().splitlines()[-8:]
        raise RuntimeError(f"{' '.join(cmd[:6])} ... exited {out.returncode}: " + " | ".join(tail))
    return out


def train_flags(plan: dict, preset: str, data: Path, out: Path, steps: int, **extra: Any) -> list[str]:
    flags = ["train", "--preset", preset, "--data-dir", str(data), "--out-dir", str(out), "--max-steps", str(steps)]
    flags += ["--batch-size", str(plan["train_batch"]), "--seq-len", str(plan["train_seq"]), "--device", plan["device"]]
    flags += ["--eval-interval", "0", "--eval-tokens", "4096", "--warmup-steps", "5", "--log-interval", "5"]
    flags += ["--no-progress"] + (["--resume"] if extra.pop("resume", False) else ["--overwrite"])
    for key, value in extra.items():
        flag = "--" + key.replace("_", "-")
        flags += [flag] if value is True else [flag, str(value)]
    return flags


def summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


# --- the checks, each one process ---------------------------------------------------------------------------------


def stage_cuda_tests(plan: dict, work: Path) -> dict[str, Any]:
    # tests marked gpu skip themselves without CUDA, so the dry run checks only that they are collected and pass
    out = run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-rs", "tests/test_gpu_paths.py"], timeout=150)
    last = out.stdout.strip().splitlines()[-1]
    return {"pytest": last}


def stage_bench(plan: dict, work: Path, preset: str, mode: str) -> dict[str, Any]:
    sys.path.insert(0, str(SRC))
    from loopnn.bench import BenchConfig, run_bench

    bc = BenchConfig(
        preset=preset, batch_size=plan["bench_batch"], seq_len=plan["bench_seq"], steps=plan["bench_steps"],
        warmup=plan["bench_warmup"], compile=mode == "compile", device=plan["device"], memory=False, adaptive=False,
        new_tokens=16, gen_repeats=1, prefill_repeats=3,
    )  # fmt: skip
    records = run_bench(bc, log=lambda *a: None)
    by_impl = {r["impl"]: r for r in records}
    keep = ("train_tokens_per_s", "train_step_ms", "mfu", "train_peak_mem_mb", "train_loss", "decode_tokens_per_s")
    out = {impl: {k: r.get(k) for k in keep} for impl, r in by_impl.items() if impl != "summary"}
    s = by_impl["summary"]
    out |= {k: s.get(k) for k in ("train_speedup_vs_hf", "peak_flops", "peak_source", "device", "torch")}
    out |= {"batch_size": bc.batch_size, "seq_len": bc.seq_len, "timed_steps": bc.steps, "compile": bc.compile}
    if "hf" not in out:
        raise RuntimeError("the HF GPT-2 twin did not run (is transformers installed? pip install -e '.[hf]')")
    return out


def prepare_data(plan: dict, work: Path) -> Path:
    data = work / f"data-pydoc-{plan['tokenizer']}"
    if not (data / "meta.json").exists():
        run(loopnn_cmd("prepare", "pydoc", "--tokenizer", plan["tokenizer"], "--out", str(data)), timeout=120)
    return data


def stage_compile_checkpointing(plan: dict, work: Path) -> dict[str, Any]:
    data, steps, preset = prepare_data(plan, work), plan["compile_steps"], plan["loop_preset"]
    out = {}
    for name, extra in (("eager", {}), ("compile_checkpointing", {"compile": True, "activation_checkpointing": True})):
        run_dir = work / f"compile-{name}"
        run(loopnn_cmd(*train_flags(plan, preset, data, run_dir, steps, **extra)), timeout=plan["stage_timeout"])
        s = summary(run_dir)
        out[name] = {"final_loss": s["val"]["loss"], "tokens_per_s": s["tokens_per_s"], "skipped": s["skipped_steps"]}
    gap = abs(out["eager"]["final_loss"] - out["compile_checkpointing"]["final_loss"])
    out["loss_gap"] = gap
    if not gap < 0.05:  # bf16 kernels differ between eager and compiled code; a broken path differs by far more
        raise RuntimeError(f"compiled + checkpointed loss differs from eager by {gap:.4f}")
    return out


def stage_fsdp_torchrun(plan: dict, work: Path) -> dict[str, Any]:
    data, run_dir = prepare_data(plan, work), work / "fsdp-torchrun"
    flags = train_flags(plan, plan["train_preset"], data, run_dir, 20, parallel="fsdp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "loopnn", *flags]
    run(cmd, timeout=plan["stage_timeout"])
    s = summary(run_dir)
    return {"steps": s["step"], "final_loss": s["val"]["loss"], "tokens_per_s": s["tokens_per_s"]}


def stage_fsdp_one_rank(plan: dict, work: Path) -> dict[str, Any]:
    """dist.wrap's fsdp branch (fully_shard per block, then the root) on a one-rank process group, which torchrun
    with one process never reaches (dist.setup treats world size 1 as single-process): three AdamW steps of the
    sharded model against the same model unsharded, then the gathered checkpoint state against it."""
    sys.path.insert(0, str(SRC))
    import torch
    import torch.distributed as tdist

    from loopnn import dist
    from loopnn.config import ModelConfig, TrainConfig, preset
    from loopnn.model import LoopGPT
    from loopnn.train import make_optimizer

    class OneRank(dist.DistInfo):
        @property
        def enabled(self) -> bool:  # wrap as if distributed
            return True

    device = torch.device(plan["device"])
    backend = "nccl" if device.type == "cuda" else "gloo"
    (work / "fsdp-store").unlink(missing_ok=True)
    tdist.init_process_group(backend, init_method=f"file://{work / 'fsdp-store'}", rank=0, world_size=1)
    try:
        cfg = ModelConfig(**preset(plan["loop_preset"]))
        torch.manual_seed(0)
        plain = LoopGPT(cfg).to(device)
        sharded = LoopGPT(cfg).to(device)
        sharded.load_state_dict(plain.state_dict())
        tc = TrainConfig(lr=1e-3)
        opt_plain = make_optimizer(plain, tc, device)
        sharded, opt_sharded = dist.wrap(
            sharded, make_optimizer(sharded, tc, device), lambda m: make_optimizer(m, tc, device), "fsdp", device,
            OneRank(),
        )  # fmt: skip
        assert dist.is_fsdp(sharded), "dist.wrap did not apply FSDP2"
        g = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(3):
            x = torch.randint(0, cfg.vocab_size, (2, 64), generator=g).to(device)
            pair = []
            for model, opt in ((plain, opt_plain), (sharded, opt_sharded)):
                _, loss = model(x, x)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                pair.append(loss.item())
            losses.append(pair)
        gathered, _ = dist.full_state(sharded, opt_sharded)
        state = gathered.state_dict()
        diff = max((state[k].to(device) - v).abs().max().item() for k, v in plain.state_dict().items() if k in state)
    finally:
        tdist.destroy_process_group()
    loss_gap = max(abs(a - b) for a, b in losses)
    if not (loss_gap < 1e-3 and diff < 1e-3):
        raise RuntimeError(f"FSDP2 on one rank differs from the plain model: loss gap {loss_gap}, weights {diff}")
    return {"losses_plain_vs_fsdp": losses, "max_loss_gap": loss_gap, "max_weight_diff": diff}


def stage_kill_resume(plan: dict, work: Path) -> dict[str, Any]:
    """The same run twice: uninterrupted, and SIGKILLed once its first checkpoint is on disk, then --resume."""
    sys.path.insert(0, str(SRC))
    import torch

    from loopnn import checkpoint as ckpt

    data, steps, every = prepare_data(plan, work), plan["resume_steps"], plan["resume_ckpt"]
    full, split = work / "resume-full", work / "resume-split"
    flags = dict(ckpt_interval=every, keep_checkpoints=10)
    run(loopnn_cmd(*train_flags(plan, plan["train_preset"], data, full, steps, **flags)), timeout=plan["stage_timeout"])
    cmd = loopnn_cmd(*train_flags(plan, plan["train_preset"], data, split, steps, **flags))
    proc = subprocess.Popen(cmd, env=env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = split / "checkpoints" / f"step-{every:07d}"
    deadline = time.time() + plan["stage_timeout"]
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.returncode != -signal.SIGKILL:
        raise RuntimeError(f"the run was not killed mid-way (exit {proc.returncode}); raise resume_steps")
    killed_at = max(int(p.name.split("-")[1]) for p in (split / "checkpoints").glob("step-*"))
    run(loopnn_cmd(*train_flags(plan, plan["train_preset"], data, split, steps, resume=True, **flags)), timeout=300)
    a, b = ckpt.load_checkpoint(full)["model_state"], ckpt.load_checkpoint(split)["model_state"]
    num = sum((a[k].float() - b[k].float()).pow(2).sum().item() for k in a)
    den = sum(a[k].float().pow(2).sum().item() for k in a)
    rel = (num / den) ** 0.5
    max_abs = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    exact = all(torch.equal(a[k], b[k]) for k in a)
    s_full, s_split = summary(full), summary(split)
    out = {"killed_after_step": killed_at, "steps": steps, "bitwise_equal": exact, "relative_weight_diff": rel}
    out |= {"max_abs_weight_diff": max_abs, "final_loss_full": s_full["val"]["loss"]}
    out |= {"final_loss_resumed": s_split["val"]["loss"], "train_tokens_per_s": s_full["tokens_per_s"]}
    # CPU runs resume bit for bit (tests/test_train.py); CUDA kernels with atomics are not bitwise deterministic,
    # so a resumed CUDA run may drift from the uninterrupted one by rounding, not by a lost or repeated step.
    limit = 0.0 if plan["device"] == "cpu" else 1e-2
    if s_split["step"] != steps or rel > limit:
        raise RuntimeError(f"resumed run differs: step {s_split['step']}, relative weight difference {rel:.2e}")
    return out


def stage_generate_serve(plan: dict, work: Path) -> dict[str, Any]:
    run_dir = work / "resume-full"
    if not (run_dir / "summary.json").exists():
        raise RuntimeError(f"{run_dir} is missing: kill_resume must run first")
    t0 = time.perf_counter()
    gen = run(loopnn_cmd("generate", str(run_dir), "--prompt", "The ", "--max-new-tokens", "8", "--seed", "0",
                         "--device", plan["device"]), timeout=120)  # fmt: skip
    out: dict[str, Any] = {"generate_seconds": time.perf_counter() - t0, "generated": gen.stdout.strip()[-200:]}
    cmd = loopnn_cmd("serve", str(run_dir), "--port", "0", "--device", plan["device"])
    log = work / "serve.log"
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        line = proc.stdout.readline()  # the one `listening on` line, or nothing when it exits
        if "listening on" not in line:
            raise RuntimeError(f"the server did not start: {log.read_text().strip()[-500:]!r}")
        host_port = line.split("listening on http://")[1].split()[0]
        host, port = host_port.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        body = {"model": run_dir.name, "prompt": "The ", "max_tokens": 8, "temperature": 0}
        t0 = time.perf_counter()
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        reply = json.loads(resp.read())
        out["serve_seconds"] = time.perf_counter() - t0
        if resp.status != 200 or reply["usage"]["completion_tokens"] < 1:
            raise RuntimeError(f"serve answered {resp.status}: {reply}")
        out["served"] = reply["choices"][0]["text"]
        out["served_tokens"] = reply["usage"]["completion_tokens"]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return out


def stage_chunked_loss(plan: dict, work: Path) -> dict[str, Any]:
    """Forward + backward of head and loss at GPT-2's vocab, bf16 autocast on CUDA: plain (full logits) and chunked
    timed alternately, medians; peak memory of each apart."""
    sys.path.insert(0, str(SRC))
    import torch

    from loopnn.instruments import PeakMemory, sync
    from loopnn.loss import chunked_head_loss, plain_head_loss

    device = torch.device(plan["device"])
    rows, c, vocab = plan["head_rows"], plan["head_n_embd"], HEAD_VOCAB
    padded = (vocab + 63) // 64 * 64
    g = torch.Generator().manual_seed(0)
    h = torch.randn(rows, c, generator=g).to(device).requires_grad_()
    w = (0.02 * torch.randn(padded, c, generator=g)).to(device).requires_grad_()
    t = torch.randint(0, vocab, (rows,), generator=g).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    fns = {"plain": plain_head_loss, "chunked": chunked_head_loss}

    def once(fn) -> float:
        sync(device)
        t0 = time.perf_counter()
        with autocast:
            loss = fn(h, w, t, vocab)
        loss.backward()
        sync(device)
        h.grad = w.grad = None
        return time.perf_counter() - t0

    out: dict[str, Any] = {"vocab_size": vocab, "rows": rows, "n_embd": c, "autocast": str(device.type == "cuda")}
    for name, fn in fns.items():
        once(fn)  # warm-up
        with PeakMemory(device) as mem:
            once(fn)
        out[f"{name}_peak_mem_mb"] = mem.mb
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(plan["head_repeats"]):
        for name, fn in fns.items():
            times[name].append(once(fn))
    for name in fns:
        out[f"{name}_ms"] = statistics.median(times[name]) * 1e3
    out["chunked_over_plain_time"] = out["chunked_ms"] / out["plain_ms"]
    return out


STAGES = {
    "cuda_tests": stage_cuda_tests,
    "bench": stage_bench,
    "compile_checkpointing": stage_compile_checkpointing,
    "fsdp_torchrun": stage_fsdp_torchrun,
    "fsdp_one_rank": stage_fsdp_one_rank,
    "kill_resume": stage_kill_resume,
    "generate_serve": stage_generate_serve,
    "chunked_loss": stage_chunked_loss,
}


def stage_names(plan: dict) -> list[str]:
    """In priority order: when the time budget runs out, the checks not yet run are reported as failed."""
    eager = [f"bench:{p}:eager" for p in plan["bench_presets"]]
    compiled = [f"bench:{p}:compile" for p in plan["bench_presets"] if "compile" in plan["bench_modes"]]
    rest = ["chunked_loss", "kill_resume", "generate_serve", "fsdp_torchrun", "fsdp_one_rank"]
    return ["cuda_tests", *eager, *rest, *compiled, "compile_checkpointing"]


# --- the driver ----------------------------------------------------------------------------------------------------


def run_stage_here(name: str, mode: str, work: Path, out: Path) -> int:
    """Child process: one check; its figures, or its error, to `out`."""
    plan = PLANS[mode]
    kind, *args = name.split(":")
    t0 = time.perf_counter()
    try:
        figures = STAGES[kind](plan, work, *args)
        result = {"ok": True, **figures}
    except Exception as e:  # a check's failure is a figure of this report, not a crash of it
        result = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
    result["seconds"] = round(time.perf_counter() - t0, 2)
    out.write_text(json.dumps(result, default=str))
    return 0


def machine(mode: str) -> dict[str, Any]:
    import torch

    info = {"mode": mode, "torch": torch.__version__, "python": platform.python_version(), "host": platform.node()}
    info["cpu"] = platform.processor() or platform.machine()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info |= {"gpu": props.name, "gpu_memory_gb": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda}
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT, timeout=10)
        info["git_sha"] = sha.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        info["git_sha"] = "unknown"
    info["date_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="every check on the CPU with tiny models")
    p.add_argument("--json", default=None, help="figures file (default WORK/gpu_check.json)")
    p.add_argument("--work-dir", default="runs/gpu_check", help="data and run directories of the checks")
    p.add_argument("--only", default=None, help="comma-separated check names (default: all)")
    p.add_argument("--stage", help=argparse.SUPPRESS)  # child process: run one check
    p.add_argument("--stage-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    mode = "dry" if args.dry_run else "gpu"
    work = (ROOT / args.work_dir).resolve() if not Path(args.work_dir).is_absolute() else Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    if args.stage:
        return run_stage_here(args.stage, mode, work, Path(args.stage_out))
    import torch

    if mode == "gpu" and not torch.cuda.is_available():
        print("no GPU: torch.cuda.is_available() is False, nothing to check (--dry-run runs the checks on CPU)")
        return 0
    plan = PLANS[mode]
    names = stage_names(plan)
    if args.only:
        wanted = args.only.split(",")
        names = [n for n in names if n in wanted or n.split(":")[0] in wanted]
    report: dict[str, Any] = {"machine": machine(mode), "checks": {}}
    deadline = time.time() + plan["budget_s"]
    for name in names:
        left = deadline - time.time()
        if left < 20:
            error = f"not run: over the {plan['budget_s']} s budget"
            report["checks"][name] = {"ok": False, "error": error, "seconds": 0}
            print(f"FAIL {name}: not run, over the {plan['budget_s']} s budget")
            continue
        limit = min(plan["stage_timeout"] + 60, left)
        out = work / f"stage-{name.replace(':', '_')}.json"
        out.unlink(missing_ok=True)
        cmd = [sys.executable, __file__, "--stage", name, "--stage-out", str(out), "--work-dir", str(work)]
        cmd += ["--dry-run"] if args.dry_run else []
        t0 = time.perf_counter()
        # its own session: on a timeout the check and every process it started (train, serve, torchrun) go
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(),
                                 start_new_session=True)  # fmt: skip
        try:
            text, _ = child.communicate(timeout=limit)
            if out.exists():
                result = json.loads(out.read_text())
            else:
                tail = " | ".join(text.strip().splitlines()[-6:])
                result = {"ok": False, "error": f"the check's process exited {child.returncode}: {tail}"}
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.communicate()
            result = {"ok": False, "error": f"timed out after {limit:.0f} s"}
        result.setdefault("seconds", round(time.perf_counter() - t0, 2))
        report["checks"][name] = result
        status = "ok  " if result["ok"] else "FAIL"
        print(f"{status} {name} ({result['seconds']:.0f} s)" + ("" if result["ok"] else f": {result['error']}"))
    failed = [n for n, r in report["checks"].items() if not r["ok"]]
    report["failed"] = failed
    path = Path(args.json) if args.json else work / ("gpu_check.json" if mode == "gpu" else "gpu_check_dry.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"{len(names) - len(failed)}/{len(names)} checks passed; figures in {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
