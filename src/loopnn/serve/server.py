"""`serve(path, cfg)`: load the model, bind the socket, run the app on uvicorn until a signal.

The HTTP routes live in app.py, the decoding in engine.py; this module holds what the process does around them.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading
import time

from loopnn.errors import LoopnnError, one_line
from loopnn.serve.app import create_app, load_served_model
from loopnn.serve.config import ServeConfig
from loopnn.serve.engine import Engine
from loopnn.serve.protocol import ServeSettings, longest_token


def serve(path: str, cfg: ServeConfig | None = None) -> int:
    """Load the model, bind host:port (0 = a free port), print one `listening on` line, serve until a signal."""
    cfg = cfg or ServeConfig()
    import torch
    import uvicorn

    _check_open_files(cfg.max_connections)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    model, tok, name, checkpoint = load_served_model(path, cfg.device, cfg.tokenizer)
    limit = cfg.max_n_loops or max(8, 4 * model.config.n_loops)
    settings = ServeSettings(cfg.model_name or name, limit, cfg.speculative_k, cfg.draft_loops, longest_token(tok))
    engine = Engine(model, tok, max_batch=cfg.max_batch, max_queue=cfg.max_queue)
    app = create_app(engine, model, tok, settings, cfg, checkpoint)
    host = cfg.host
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, cfg.port))
    except OSError as e:
        raise LoopnnError(f"cannot listen on {host}:{cfg.port}: {e.strerror}") from None
    sock.listen(ACCEPT_BATCH)
    bound = sock.getsockname()[1]
    config = uvicorn.Config(
        app, http=_protocol(cfg.max_connections, cfg.read_timeout), log_level=cfg.log_level, access_log=False,
        timeout_keep_alive=cfg.keep_alive_timeout, timeout_graceful_shutdown=cfg.drain_timeout, backlog=ACCEPT_BATCH,
    )  # fmt: skip
    server = uvicorn.Server(config)
    quiet = QuietLog()  # after uvicorn.Config, which configures uvicorn's loggers
    for name in ("uvicorn.error", "asyncio"):
        logging.getLogger(name).addFilter(quiet)

    def engine_died() -> None:  # its rows already got 503; stop taking requests and exit non-zero
        server.should_exit = True  # uvicorn polls this flag (every 0.1 s) from its event loop

    engine.on_death = engine_died
    print(f"loopnn serve: {settings.model_name} ({model.config.n_loops} loops) listening on http://{host}:{bound}",
          flush=True)  # fmt: skip
    # uvicorn drains on SIGTERM, then re-raises the signal; a handler here turns that into a clean exit 0.
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: None) if main else None
    try:
        server.run(sockets=[sock])
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
    if engine.error is not None:
        why = one_line(f"{type(engine.error).__name__}: {engine.error}")
        print(f"loopnn serve: error: the decoding engine stopped ({why}); its requests got 503", file=sys.stderr)
        return 1
    print("loopnn serve: stopped", file=sys.stderr, flush=True)
    return 0


class QuietLog(logging.Filter):
    """Let through at most `burst` records of one message per minute: a hostile client can make uvicorn or
    asyncio log a warning per request (an invalid request, a failed accept), which must not flood stderr."""

    def __init__(self, burst: int = 5, window: float = 60.0):
        super().__init__()
        self.burst, self.window = burst, window
        self.seen: dict[tuple[str, str], tuple[float, int]] = {}  # (logger, message template) -> (start, count)

    def filter(self, record: logging.LogRecord) -> bool:
        now, key = time.monotonic(), (record.name, str(record.msg))
        start, count = self.seen.get(key, (now, 0))
        if now - start > self.window:
            start, count = now, 0
        if len(self.seen) > 1000:  # templates are few; bounded anyway
            self.seen.clear()
        self.seen[key] = (start, count + 1)
        return count < self.burst


# asyncio accepts up to `backlog` connections in one go before any of them reaches the protocol (which refuses
# those over --max-connections): uvicorn's 2,048 let a burst of idle sockets exhaust the open-file limit.
ACCEPT_BATCH = 64
# Descriptors beside the clients' (model files, tokenizer, pipes, the listening socket) plus one accept batch.
OPEN_FILES_SPARE = 64 + ACCEPT_BATCH
BUSY_BODY = b'{"error": {"message": "too many open connections; retry shortly", "type": "server_busy"}}'
BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\nConnection: close\r\n"
    + f"Content-Length: {len(BUSY_BODY)}\r\n\r\n".encode()
    + BUSY_BODY
)


def _check_open_files(max_connections: int) -> None:
    """Raise the soft open-file limit as far as the hard one allows; refuse a cap the limit cannot hold (a
    server out of descriptors cannot even accept the connection that would tell a client so)."""
    try:
        import resource
    except ImportError:  # not POSIX
        return
    need = max_connections + OPEN_FILES_SPARE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft != resource.RLIM_INFINITY and soft < need:
        raise LoopnnError(
            f"--max-connections {max_connections} needs {need} open files, but the limit is {soft} (ulimit -n); "
            f"use --max-connections {max(1, soft - OPEN_FILES_SPARE)} or less"
        )


def _protocol(max_connections: int, read_timeout: float) -> type:
    """uvicorn's h11 protocol with a connection cap and a deadline for each request's headers (uvicorn's own
    limit_concurrency still accepts and holds every idle socket, and its keep-alive timer starts only after a
    first response)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class ServeProtocol(H11Protocol):
        deadline = None  # the pending header deadline (asyncio.TimerHandle)
        deadline_for = None  # the request cycle in progress when it was set: a new cycle means headers arrived

        def connection_made(self, transport) -> None:
            if len(self.connections) >= max_connections:
                self.transport = transport  # connection_lost closes it again
                transport.write(BUSY)
                transport.close()
                return
            super().connection_made(transport)
            self._expect_headers()

        def data_received(self, data: bytes) -> None:
            if self.cycle is None or self.cycle.response_complete:  # between requests: headers are due
                self._expect_headers()
            super().data_received(data)

        def handle_events(self) -> None:
            super().handle_events()
            if self.deadline is not None and self.cycle is not self.deadline_for:  # the headers came in time
                self.deadline.cancel()
                self.deadline = None

        def connection_lost(self, exc) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
            super().connection_lost(exc)

        def _expect_headers(self) -> None:
            if self.deadline is None:
                self.deadline_for = self.cycle
                self.deadline = self.loop.call_later(read_timeout, self._headers_late)

        def _headers_late(self) -> None:
            self.deadline = None
            if self.cycle is self.deadline_for and not self.transport.is_closing():
                self.transport.close()

    return ServeProtocol
