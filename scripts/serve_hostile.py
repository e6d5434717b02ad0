"""Replay issue 25's hostile clients against a real `loopnn serve` on 127.0.0.1; one line per case.

    python scripts/serve_hostile.py                 # a tiny random-init model with a trained byte-level BPE
    python scripts/serve_hostile.py runs/mine       # a run directory of yours (its own tokenizer)

Bounded: every case has its own timeout, the whole script stops after --budget seconds (the servers it started
are killed), and it only ever connects to 127.0.0.1. The server runs with --threads 1 and the open-file limit
lowered to 1,024 (as in the issue); the figures in docs/serve.md come from this script. Linux only (it reads
the server's peak memory from /proc).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HOST = "127.0.0.1"
ENGINE_FAULT = """
from loopnn.serve import engine
step = engine.Engine.run_step
def faulty(self):
    if self.steps >= 5:
        raise RuntimeError("injected engine fault")
    step(self)
engine.Engine.run_step = faulty
"""


class Server:
    """`loopnn serve RUN` in a child process on a free port of 127.0.0.1, its stderr in a file."""

    def __init__(self, run: str, *flags: str, before: str = "", tokenizer: str | None = None):
        args = ["serve", run, "--host", HOST, "--port", "0", "--threads", "1", *flags]
        if tokenizer:
            args += ["--tokenizer", tokenizer]
        code = f"import sys\n{before}\nfrom loopnn.cli import main\nsys.exit(main({args!r}))"
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".stderr", delete=False)
        lower = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))  # noqa: E731
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, preexec_fn=lower)  # fmt: skip
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            self.proc.kill()
            raise SystemExit(f"server did not start: {line!r} {Path(self.log.name).read_text()[-500:]}")
        self.port = int(line.rsplit(":", 1)[1])

    def stderr_bytes(self) -> int:
        return os.path.getsize(self.log.name)

    def peak_reset(self) -> None:
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")

    def peak_mb(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return next(int(x.split()[1]) for x in status.splitlines() if x.startswith("VmHWM")) / 1024

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        os.unlink(self.log.name)


def request(port: int, method: str, path: str, body: bytes | None = None, timeout: float = 60) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, json.loads(data) if data.startswith(b"{") else {}
    finally:
        conn.close()


def report(case: str, **figures) -> None:
    print(f"{case:<34} " + "  ".join(f"{k}={v}" for k, v in figures.items()), flush=True)


# -- the cases ------------------------------------------------------------------------------------------------


def chunked_upload(s: Server, mib: int = 500) -> None:
    s.peak_reset()
    idle = s.peak_mb()
    sock = socket.create_connection((HOST, s.port), timeout=30)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"%x\r\n" % (1 << 20) + b" " * (1 << 20) + b"\r\n"
    sent = [0]

    def upload():
        try:
            for _ in range(mib):
                sock.sendall(chunk)
                sent[0] += 1
        except OSError:
            pass

    t0 = time.perf_counter()
    threading.Thread(target=upload, daemon=True).start()
    head = sock.recv(200)
    wall = time.perf_counter() - t0
    sock.close()
    report(f"chunked {mib} MiB upload", status=head[9:12].decode() or "closed", sent_mib=f"<={sent[0] + 1}",
           peak_rss_growth_mb=f"{s.peak_mb() - idle:.1f}", seconds=f"{wall:.2f}")  # fmt: skip


def malformed(s: Server) -> None:
    cases = {
        "surrogate prompt": b'{"prompt": "\\ud800"}', "surrogate key": b'{"prompt": "x", "\\ud800": 1}',
        "nested 100,000": b'{"prompt": "x", "user": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "temperature 1e-45": b'{"prompt": "x", "temperature": 1e-45}',
        "top_p 1e-300": b'{"prompt": "x", "top_p": 1e-300}',
    }  # fmt: skip
    got = {name: request(s.port, "POST", "/v1/completions", body)[0] for name, body in cases.items()}
    report("malformed values", **{k.replace(" ", "_"): v for k, v in got.items()})


def abandoned(s: Server, rows: int = 16) -> None:
    body = json.dumps({"prompt": "a", "max_tokens": 200, "n": rows, "temperature": 0}).encode()
    sock = socket.create_connection((HOST, s.port), timeout=30)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)  # fmt: skip
    deadline = time.time() + 60
    while (health := request(s.port, "GET", "/health")[1])["active_rows"] < rows and time.time() < deadline:
        pass
    sock.close()
    at_close = health
    while (health := request(s.port, "GET", "/health")[1])["active_rows"] > 0 and time.time() < deadline:
        pass
    report("abandoned non-streaming request", rows=rows, steps_after_disconnect=health["steps"] - at_close["steps"],
           tokens_after_disconnect=health["tokens"] - at_close["tokens"], of_max=rows * 200)  # fmt: skip


def large_prompts(s: Server, clients: int = 8, seconds: float = 5.0) -> None:
    big = json.dumps({"prompt": "ab" * 450_000, "max_tokens": 1}).encode()
    tiny = b'{"prompt": "hi", "max_tokens": 1, "temperature": 0}'
    alone = []
    for _ in range(10):
        t0 = time.perf_counter()
        request(s.port, "POST", "/v1/completions", tiny)
        alone.append(time.perf_counter() - t0)
    stop, statuses = threading.Event(), []

    def flood():
        while not stop.is_set():
            statuses.append(request(s.port, "POST", "/v1/completions", big)[0])

    threads = [threading.Thread(target=flood, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    lat, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        request(s.port, "POST", "/v1/completions", tiny)
        lat.append(time.perf_counter() - t0)
    stop.set()
    for t in threads:
        t.join(60)
    ms = lambda xs: f"{1000 * statistics.median(xs):.0f}"  # noqa: E731
    report(f"{clients} clients x 900 KB prompts", refused_400=statuses.count(400), other=len(statuses) -
           statuses.count(400), tiny_alone_ms=ms(alone), tiny_median_ms=ms(lat),
           tiny_max_ms=f"{1000 * max(lat):.0f}")  # fmt: skip


def idle_sockets(s: Server, count: int = 1100) -> None:
    logged = s.stderr_bytes()
    socks, t0 = [], time.perf_counter()
    for _ in range(count):
        try:
            socks.append(socket.create_connection((HOST, s.port), timeout=30))
        except OSError:
            break
    t1 = time.perf_counter()
    health = request(s.port, "GET", "/health", timeout=30)[0]
    refused = 0
    for sock in socks:
        sock.setblocking(False)
        try:
            refused += sock.recv(64).startswith(b"HTTP/1.1 503")
        except BlockingIOError:
            pass
    closed, deadline = 0, time.time() + 30
    for sock in socks:
        sock.settimeout(max(0.1, deadline - time.time()))
        try:
            closed += sock.recv(64) == b""
        except (OSError, TimeoutError):
            pass
        sock.close()
    wall = time.perf_counter() - t1
    after = request(s.port, "GET", "/health", timeout=30)[0]
    report(f"{count} idle sockets", opened=len(socks), refused_503=refused, health_while_full=health,
           closed_by_server=closed, seconds_to_close=f"{wall:.1f}", health_after=after,
           stderr_growth_bytes=s.stderr_bytes() - logged, connect_seconds=f"{t1 - t0:.2f}")  # fmt: skip


def fairness(s: Server) -> None:
    big = json.dumps({"prompt": ["a", "b", "c", "d"], "n": 16, "max_tokens": 60, "temperature": 0}).encode()
    small = b'{"prompt": "z", "max_tokens": 4, "temperature": 0}'
    done = {}

    def send(name, body):
        request(s.port, "POST", "/v1/completions", body, timeout=300)
        done[name] = time.perf_counter()

    large = threading.Thread(target=send, args=("big", big))
    large.start()
    while request(s.port, "GET", "/health")[1]["active_rows"] == 0:
        pass
    t0 = time.perf_counter()
    send("small", small)
    large.join(300)
    report("1 row behind a 64-row request", small_s=f"{done['small'] - t0:.2f}", large_s=f"{done['big'] - t0:.2f}")


def mixed_thresholds(s: Server, rows: int = 32, tokens: int = 32) -> None:
    """`rows` adaptive requests at once, with one threshold and with `rows` distinct ones (each its own batch)."""

    def run(thresholds: list[float]) -> float:
        bodies = [json.dumps({"prompt": "a", "max_tokens": tokens, "temperature": 0, "adaptive": True,
                              "threshold": t, "max_loops": 4}).encode() for t in thresholds]  # fmt: skip
        statuses = []
        send = lambda b: statuses.append(request(s.port, "POST", "/v1/completions", b, timeout=300)[0])  # noqa: E731
        threads = [threading.Thread(target=send, args=(b,)) for b in bodies]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        if statuses != [200] * len(bodies):
            raise SystemExit(f"adaptive requests failed: {statuses}")
        return len(bodies) * tokens / (time.perf_counter() - t0)

    run([0.05] * 4)  # warm-up
    same, distinct = run([0.05] * rows), run([0.05 + 1e-6 * i for i in range(rows)])  # interleaved: A B A
    same2 = run([0.05] * rows)
    report(f"{rows} rows, adaptive thresholds", one_threshold_tok_s=f"{(same + same2) / 2:.0f}",
           distinct_tok_s=f"{distinct:.0f}", slowdown=f"{(same + same2) / 2 / distinct:.1f}x")  # fmt: skip


def slow_client_shutdown(s: Server, drain: float) -> None:
    sock = socket.create_connection((HOST, s.port), timeout=30)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    time.sleep(0.3)
    t0 = time.perf_counter()
    s.proc.send_signal(signal.SIGTERM)
    code = s.proc.wait(120)
    report("SIGTERM with a slow body", drain_timeout_s=drain, exit=code, seconds=f"{time.perf_counter() - t0:.1f}")
    sock.close()


def dead_engine(run: str, tokenizer: str | None) -> None:
    s = Server(run, before=ENGINE_FAULT, tokenizer=tokenizer)
    try:
        body = b'{"prompt": "a", "max_tokens": 100, "n": 2, "temperature": 0}'
        pending = request(s.port, "POST", "/v1/completions", body)[0]
        t0 = time.perf_counter()
        code = s.proc.wait(60)
        report("engine thread dies mid-request", pending=pending, exit=code,
               seconds_to_exit=f"{time.perf_counter() - t0:.1f}")  # fmt: skip
    finally:
        s.stop()


def tiny_run(root: Path) -> tuple[str, str]:
    """A random-init `debug` model (context 256) with a byte-level BPE trained on a few lines."""
    import torch

    from loopnn import LoopGPT, ModelConfig, preset
    from loopnn.checkpoint import save_checkpoint
    from loopnn.tokenizer import train_bpe

    run = root / "tiny"
    run.mkdir()
    tok = train_bpe(["the quick brown fox jumps over the lazy dog " * 50, "def f(x): return x + 1\n" * 50], 320)
    tok.save(run / "tokenizer.json")
    torch.manual_seed(0)
    model = LoopGPT(ModelConfig(**dict(preset("debug"), block_size=256, vocab_size=tok.vocab_size)))
    save_checkpoint(run, 0, model, model.config)
    return str(run), "bpe"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", nargs="?", help="run directory to serve (default: a tiny random-init model)")
    p.add_argument("--budget", type=float, default=600, help="stop everything after this many seconds")
    args = p.parse_args()
    signal.signal(signal.SIGALRM, lambda *_: sys.exit("serve_hostile: --budget exceeded; stopping"))
    signal.alarm(int(args.budget))
    with tempfile.TemporaryDirectory() as tmp:
        run, tokenizer = (args.run, None) if args.run else tiny_run(Path(tmp))
        print(f"# loopnn serve under hostile clients: {run}, load average {os.getloadavg()[0]:.2f}", flush=True)
        drain = 5.0
        s = Server(run, "--drain-timeout", str(drain), tokenizer=tokenizer)
        try:
            for case in (chunked_upload, malformed, abandoned, large_prompts, idle_sockets, fairness,
                         mixed_thresholds):  # fmt: skip
                case(s)
            slow_client_shutdown(s, drain)
        finally:
            s.stop()
        dead_engine(run, tokenizer)
        print(f"# done, load average {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
