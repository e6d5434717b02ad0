"""Measure `loopnn serve` and its decoding options on one machine, one run; the figures in docs/serve.md.

    python scripts/bench_serve.py runs/serve-bench --json runs/serve-bench/bench_serve.jsonl

1. server: the real server process on 127.0.0.1; the same greedy requests sent one at a time (1 client) and
   by --clients concurrent clients (continuous batching): requests/s, tokens/s, p50/p95 latency. Every
   concurrent response is checked against the one-at-a-time response to the same request.
2. speculative: in-process greedy decoding of single prompts, plain KV-cached `generate` vs
   `speculative_generate` (draft loops x draft length k): tokens/s, acceptance, and whether the output is equal.
3. adaptive: in-process greedy decoding with adaptive exit (kl criterion) at several thresholds vs the fixed
   depth: tokens/s, mean loops per token, and the share of tokens equal to the fixed-depth output.
All parts use --threads torch threads (default 1). The in-process parts run every method once per round for
--repeats rounds and report median tokens/s and the median of the per-round ratios, so a slow drift of the load
cancels out of the ratios. The load average (`uptime`) is recorded before and after: on a shared machine the
timings are noisy, so compare the ratios within one run.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPTS = [
    "ROMEO:\n",
    "First Citizen:\nBefore we proceed any further, hear me speak.\n",
    "KING HENRY:\n",
    "To be, or not to be",
    "HAMLET:\nO, that this too too solid flesh would melt,\n",
    "JULIET:\nWhat's in a name?",
    "MACBETH:\nIs this a dagger which I see before me,\n",
    "Enter",
]


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(int(q * len(s)), len(s) - 1)]


def post(host: str, port: int, body: dict) -> dict:
    conn = http.client.HTTPConnection(host, port, timeout=600)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = json.loads(resp.read())
    conn.close()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {data}")
    return data


def bench_server(args) -> list[dict]:
    cmd = [sys.executable, "-m", "loopnn", "serve", args.run, "--port", "0", "--threads", str(args.threads),
           "--max-batch", str(args.clients), "--max-queue", str(4 * args.requests)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        if "listening on" not in line:
            raise RuntimeError(f"server did not start: {line!r}")
        host, port = line.split("http://")[1].strip().split(":")
        port = int(port)
        jobs = [
            dict(prompt=PROMPTS[i % len(PROMPTS)], max_tokens=args.max_tokens, temperature=0, n_loops=args.n_loops)
            for i in range(args.requests)
        ]
        for job in jobs[:4]:  # warm-up
            post(host, port, dict(job, max_tokens=4))

        def one(job):
            t0 = time.perf_counter()
            r = post(host, port, job)
            return r["choices"][0]["text"], r["usage"]["completion_tokens"], time.perf_counter() - t0

        records = []
        answers = None
        for clients in (1, args.clients):
            t0 = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(clients) as pool:
                results = list(pool.map(one, jobs))
            wall = time.perf_counter() - t0
            if answers is None:
                answers = [r[0] for r in results]
            lat = [r[2] for r in results]
            tokens = sum(r[1] for r in results)
            records.append(
                dict(
                    part="server",
                    clients=clients,
                    requests=len(jobs),
                    max_tokens=args.max_tokens,
                    wall_s=wall,
                    requests_per_s=len(jobs) / wall,
                    tokens_per_s=tokens / wall,
                    p50_ms=1000 * percentile(lat, 0.5),
                    p95_ms=1000 * percentile(lat, 0.95),
                    equal_to_one_at_a_time=[r[0] for r in results] == answers,
                )  # fmt: skip
            )
            print(f"server, {clients} clients: {records[-1]}", file=sys.stderr)
        return records
    finally:
        proc.terminate()
        proc.wait(60)


def interleaved(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Run every fn once per round, rounds one after another: (last results, wall times per fn per round).

    On a shared machine the load drifts over minutes; comparing methods within a round, then taking the median
    over rounds, keeps that drift out of the ratios.
    """
    outs, times = {}, {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            outs[name] = fn()
            times[name].append(time.perf_counter() - t0)
    return outs, times


def bench_speculative(args, model, tok) -> list[dict]:
    from loopnn.generate import generate
    from loopnn.speculative import SpeculativeStats, speculative_generate

    n_loops = args.n_loops or model.config.n_loops
    prompts = [tok.encode(p) for p in PROMPTS[: args.prompts]]
    n = args.max_tokens
    generate(model, prompts[:1], 4, temperature=0, n_loops=n_loops)  # warm-up
    fns, stats = {"plain": lambda: [generate(model, [p], n, temperature=0, n_loops=n_loops)[0] for p in prompts]}, {}
    for draft in range(1, n_loops):
        for k in (2, 4):
            name = f"draft {draft} loops, k={k}"
            stats[name] = SpeculativeStats()
            fns[name] = lambda d=draft, k=k, st=stats[name]: speculative_generate(
                model, prompts, n, n_loops=n_loops, draft_loops=d, k=k, stats=st
            )
    outs, times = interleaved(fns, args.repeats)
    ref = outs["plain"]
    total = sum(len(r) for r in ref)
    records = []
    for name in fns:
        ratios = [a / b for a, b in zip(times["plain"], times[name])]
        rec = dict(
            part="speculative", method=name, n_loops=n_loops, tokens=total, rounds=args.repeats,
            tokens_per_s=total / statistics.median(times[name]), speedup=statistics.median(ratios),
            equal_to_plain=outs[name] == ref,
        )  # fmt: skip
        if name in stats:
            st = stats[name]
            rec.update(acceptance=st.acceptance, tokens_per_round=st.tokens / max(st.rounds, 1))
        records.append(rec)
        print(f"speculative: {rec}", file=sys.stderr)
    return records


def bench_adaptive(args, model, tok) -> list[dict]:
    from loopnn.adaptive import AdaptiveConfig, DecodeStats
    from loopnn.generate import generate

    n_loops = args.n_loops or model.config.n_loops
    prompts = [tok.encode(p) for p in PROMPTS[: args.prompts]]
    n = args.max_tokens
    generate(model, prompts[:1], 4, temperature=0, n_loops=n_loops)  # warm-up
    fns, stats = {}, {}
    for threshold in (None, 0.05, 0.1, 0.3):
        adaptive = None if threshold is None else AdaptiveConfig("kl", threshold, 1, n_loops)
        stats[threshold] = DecodeStats()

        def run(a=adaptive, st=stats[threshold]):
            return [generate(model, [p], n, temperature=0, n_loops=n_loops, adaptive=a, stats=st)[0] for p in prompts]

        fns[threshold] = run
    outs, times = interleaved(fns, args.repeats)
    ref = outs[None]
    records = []
    for threshold in fns:
        total = sum(len(o) for o in outs[threshold])
        same = sum(a == b for o, r in zip(outs[threshold], ref) for a, b in zip(o, r)) / total
        rec = dict(
            part="adaptive", threshold=threshold, n_loops=n_loops, tokens=total, rounds=args.repeats,
            tokens_per_s=total / statistics.median(times[threshold]),
            speedup=statistics.median(a / b for a, b in zip(times[None], times[threshold])),
            mean_loops=stats[threshold].mean_loops if threshold is not None else float(n_loops),
            tokens_equal_to_fixed=same,
        )  # fmt: skip
        records.append(rec)
        print(f"adaptive: {rec}", file=sys.stderr)
    return records


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="run directory (or HF export) to serve")
    p.add_argument("--requests", type=int, default=64, help="requests per server measurement")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--n-loops", type=int, default=None, help="default: the trained loop count")
    p.add_argument("--prompts", type=int, default=8, help="prompts for the in-process parts")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="in-process parts: interleaved rounds (median)")
    p.add_argument("--parts", default="server,speculative,adaptive")
    p.add_argument("--json", help="also write the records as JSON lines here")
    args = p.parse_args()
    import torch

    from loopnn.serve.app import load_served_model

    torch.set_num_threads(args.threads)
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())  # fmt: skip
    machine = dict(
        part="machine", cpu=cpu, cores=os.cpu_count(), threads=args.threads, torch=torch.__version__,
        load_before=load_average(), started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    )  # fmt: skip
    print(f"machine: {machine}", file=sys.stderr)
    records = [machine]
    parts = args.parts.split(",")
    if "server" in parts:
        records += bench_server(args)
    model, tok, _, _ = load_served_model(args.run, "cpu")
    with torch.inference_mode():
        if "speculative" in parts:
            records += bench_speculative(args, model, tok)
        if "adaptive" in parts:
            records += bench_adaptive(args, model, tok)
    machine["load_after"] = load_average()
    text = "".join(json.dumps(r) + "\n" for r in records)
    if args.json:
        Path(args.json).write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
