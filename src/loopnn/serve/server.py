"""`serve(path, cfg)`: load the model, bind the socket, run the app on uvicorn until a signal.

The HTTP routes live in app.py, the decoding in engine.py; this module holds what the process does around them.
"""

from __future__ import annotations

import signal
import socket
import sys
import threading

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

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    model, tok, name = load_served_model(path, cfg.device, cfg.tokenizer)
    limit = cfg.max_n_loops or max(8, 4 * model.config.n_loops)
    settings = ServeSettings(cfg.model_name or name, limit, cfg.speculative_k, cfg.draft_loops, longest_token(tok))
    engine = Engine(model, tok, max_batch=cfg.max_batch, max_queue=cfg.max_queue)
    app = create_app(engine, model, tok, settings, cfg)
    host = cfg.host
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, cfg.port))
    except OSError as e:
        raise LoopnnError(f"cannot listen on {host}:{cfg.port}: {e.strerror}") from None
    sock.listen(128)
    bound = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level=cfg.log_level, timeout_graceful_shutdown=cfg.drain_timeout, access_log=False)
    server = uvicorn.Server(config)

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
