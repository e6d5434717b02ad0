"""`ServeConfig`: every `loopnn serve` setting, its default and its allowed range in one place.

Each field documents itself in the string under it (loopnn.fields reads them), so `loopnn serve --help` shows
that text beside the default and the flag `--max-batch` is the field `max_batch`. Importing this module imports
no torch, so a bad flag fails in a moment, before any model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

from loopnn.errors import LoopnnError

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    """Address to listen on (127.0.0.1: this machine only)."""
    port: int = 8000
    """TCP port, 0-65535; 0 picks a free port and prints it."""
    device: str = "auto"
    """cpu, cuda, mps or auto."""
    tokenizer: str | None = None
    """Override the tokenizer recorded with the training data."""
    model_name: str | None = None
    """The model id in /v1/models and in requests (default: the directory name)."""
    max_batch: int = 32
    """Rows (prompts x choices) decoded together by continuous batching."""
    max_queue: int = 256
    """Rows waiting for a batch slot before new requests get 429."""
    max_request_rows: int = 64
    """Rows (prompts x n) one request may ask for (at most max_queue); waiting rows are admitted round-robin over
    requests, so a large request cannot hold back a small one."""
    max_n_loops: int | None = None
    """Largest n_loops (or max_loops) a request may ask for (default max(8, 4 x the trained n_loops))."""
    speculative_k: int = 0
    """Draft tokens per round for greedy fixed-depth requests that do not choose (0: off), 0-16."""
    draft_loops: int = 1
    """Loops of the speculative draft."""
    threads: int = 0
    """Torch threads (0: torch's default)."""
    max_body_bytes: int = 1 << 20
    """Largest request body, counted on the bytes received whatever the framing (chunked included): 413 beyond."""
    max_connections: int = 512
    """Open client connections; one more gets 503 and is closed at once (kept below the open-file limit)."""
    read_timeout: float = 10.0
    """Seconds a client has to send a request's headers (from connecting, or from its previous response), and
    then its body; a slower one is closed (the body: 408)."""
    keep_alive_timeout: float = 5.0
    """Seconds an idle keep-alive connection stays open between requests."""
    drain_timeout: float = 20.0
    """Seconds SIGTERM waits for the responses in flight before cutting them off (under the usual 30 s grace)."""
    log_level: str = "warning"
    """uvicorn's log level."""

    @property
    def request_rows(self) -> int:
        """Rows one request may queue: max_request_rows, never more than the queue holds."""
        return min(self.max_request_rows, self.max_queue)

    def __post_init__(self) -> None:
        ints = {
            "port": (0, 65535), "max_batch": (1, None), "max_queue": (1, None), "max_request_rows": (1, None),
            "max_n_loops": (1, None), "speculative_k": (0, 16), "draft_loops": (1, None), "threads": (0, None),
            "max_body_bytes": (1024, None), "max_connections": (1, None),
        }  # fmt: skip
        for name, (lo, hi) in ints.items():
            v = getattr(self, name)
            if v is None and name == "max_n_loops":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
                allowed = f"{lo}-{hi}" if hi is not None else f">= {lo}"
                raise LoopnnError(f"--{name.replace('_', '-')} must be an integer {allowed}, got {v!r}")
        for name in ("read_timeout", "keep_alive_timeout", "drain_timeout"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 3600:  # NaN fails too
                raise LoopnnError(f"--{name.replace('_', '-')} must be a number of seconds in (0, 3600], got {v!r}")
        if self.log_level not in LOG_LEVELS:
            raise LoopnnError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
