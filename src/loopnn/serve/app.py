"""The HTTP side of `loopnn serve`: a Starlette app, run on uvicorn by server.py (`pip install 'loopnn[serve]'`).

    GET  /health           {"status": "ok", ...engine counters}
    GET  /v1/models        the one served model, with its loop settings
    POST /v1/completions   OpenAI completions (stream via server-sent events) + loopnn fields

The app never runs the model: it validates a request (protocol.py), queues its rows on the engine thread
(engine.py) and relays the engine's events. SIGTERM/SIGINT: uvicorn stops accepting connections and waits up to
--drain-timeout for the responses in flight (streams included), then the lifespan hook stops the engine.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import time
import uuid
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from loopnn.errors import LoopnnError
from loopnn.model import LoopGPT
from loopnn.serve.config import ServeConfig
from loopnn.serve.engine import Engine, EngineStopped, Event, QueueFull, Request, Row
from loopnn.serve.protocol import ApiError, Completion, ServeSettings, decode_body, parse_completion
from loopnn.tokenizer import Tokenizer

ENGINE_STOP_S = 5.0  # after the drain: time for the engine thread to end its step
INLINE_PARSE_BYTES = 4096  # bodies up to this size are parsed on the event loop (a thread hop costs more)


def error_response(e: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status in (429, 503) else {}
    if e.status in (408, 413):  # the rest of the body is never read: close the connection instead of draining it
        headers["Connection"] = "close"
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def read_body(request: HttpRequest, limit: int, timeout: float) -> bytes:
    """The request body, refused (413) as soon as the bytes received pass `limit`, whatever the framing: a
    Content-Length above it is refused unread, and a chunked upload is counted as it arrives, never held whole.
    A body not complete within `timeout` seconds gets 408."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body is {declared} bytes; the limit is {limit} (--max-body-bytes)")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, f"request body passes the limit of {limit} bytes (--max-body-bytes)")
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(408, f"request body not received within {timeout:g} s (--read-timeout)") from None
    return b"".join(chunks)


def _wrap_seed(seed: int) -> int:
    return (seed + 2**63) % 2**64 - 2**63


def create_app(
    engine: Engine, model: LoopGPT, tok: Tokenizer, settings: ServeSettings, options: ServeConfig | None = None,
    checkpoint: dict[str, Any] | None = None,
) -> Starlette:  # fmt: skip
    """The Starlette app of `loopnn serve`: /health, /v1/models and /v1/completions over one running engine."""
    api = _Api(engine, model, tok, settings, options or ServeConfig(), checkpoint)
    routes = [
        Route("/health", api.health, methods=["GET"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: api.not_found}, lifespan=api.lifespan)


class _Api:
    """The route handlers: they share the engine, the model, its tokenizer and the server's settings."""

    def __init__(self, engine: Engine, model: LoopGPT, tok: Tokenizer, settings: ServeSettings, options: ServeConfig,
                 checkpoint: dict[str, Any] | None) -> None:  # fmt: skip
        self.engine, self.model, self.tok, self.settings, self.options = engine, model, tok, settings, options
        self.checkpoint = checkpoint
        self.served = {k: v for k, v in (checkpoint or {}).items() if k != "run"}
        self.created = int(time.time())
        self.parser_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="loopnn-parse")

    def parse(self, raw: bytes) -> Completion:
        return parse_completion(decode_body(raw), self.model, self.tok, self.settings)

    async def health(self, request: HttpRequest) -> JSONResponse:
        engine, checkpoint = self.engine, self.checkpoint
        ok = engine.error is None and engine.thread is not None and engine.thread.is_alive()
        body = {"status": "ok" if ok else "error", **engine.status(), "checkpoint": self.served}
        if checkpoint and checkpoint.get("run"):  # a newer checkpoint of the run is not served until a restart
            body["newest_step"] = await asyncio.get_running_loop().run_in_executor(None, _newest_step, checkpoint)
        return JSONResponse(body, status_code=200 if ok else 503)

    async def models(self, request: HttpRequest) -> JSONResponse:
        cfg, settings = self.model.config, self.settings
        info = {
            "id": settings.model_name, "object": "model", "created": self.created, "owned_by": "loopnn",
            "n_loops": cfg.n_loops, "max_n_loops": settings.max_n_loops, "loop_strategy": cfg.loop_strategy,
            "context_length": cfg.block_size, "tokenizer": self.tok.name,
            "speculative_k": settings.speculative_k, "draft_loops": settings.draft_loops, "checkpoint": self.served,
        }  # fmt: skip
        return JSONResponse({"object": "list", "data": [info]})

    async def completions(self, request: HttpRequest) -> JSONResponse | StreamingResponse:
        try:
            raw = await read_body(request, self.options.max_body_bytes, self.options.read_timeout)
            if len(raw) <= INLINE_PARSE_BYTES:
                comp = self.parse(raw)
            else:  # decoding, checking and tokenizing a large body must not stall every other client
                comp = await asyncio.get_running_loop().run_in_executor(self.parser_pool, self.parse, raw)
        except ApiError as e:
            return error_response(e)
        req = Request(asyncio.get_running_loop())
        rows = _rows(req, comp)
        refused = self._submit(rows)
        if refused is not None:
            return refused
        head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": self.settings.model_name}  # fmt: skip

        def usage(finals: dict[int, Event]) -> dict[str, Any]:
            return _usage(comp, finals)

        if comp.stream:
            return StreamingResponse(
                _sse(req, rows, head, comp.include_usage, usage), media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )  # fmt: skip
        return await _collect(request, req, rows, head, usage)

    def _submit(self, rows: list[Row]) -> JSONResponse | None:
        """Hand the rows to the engine; the error response when they are refused, else None."""
        if len(rows) > self.options.request_rows:
            message = f"{len(rows)} completions (prompts x n) in one request; the limit is {self.options.request_rows}"
            return error_response(ApiError(400, message + " (--max-request-rows)", "n"))
        try:
            self.engine.submit(rows)
        except EngineStopped as e:
            return error_response(ApiError(503, f"{e}; the server is shutting down", kind="server_error"))
        except QueueFull as e:
            return error_response(ApiError(429, f"the server is at capacity ({e}); retry shortly", kind="server_busy"))
        return None

    async def not_found(self, request: HttpRequest, exc: Exception) -> JSONResponse:
        status = getattr(exc, "status_code", 500)
        detail = getattr(exc, "detail", "internal error")
        kind = "invalid_request_error" if status < 500 else "server_error"
        return error_response(ApiError(status, f"{detail}: {request.method} {request.url.path}", kind=kind))

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette):
        if self.engine.thread is None:
            self.engine.start()
        yield
        self.parser_pool.shutdown(wait=False, cancel_futures=True)
        # After the drain every request has finished or been cancelled: the engine only ends its current step.
        await asyncio.get_running_loop().run_in_executor(None, self.engine.stop, ENGINE_STOP_S)


def _rows(req: Request, comp: Completion) -> list[Row]:
    """One engine row per prompt and choice; choice j of a seeded prompt samples with seed + j."""
    rows = []
    for i, (prompt, params) in enumerate(zip(comp.prompts, comp.params)):
        for j in range(comp.n):
            p = params if params.seed is None else dataclasses.replace(params, seed=_wrap_seed(params.seed + j))
            rows.append(Row(req, i * comp.n + j, prompt, p))
    return rows


def _usage(comp: Completion, finals: dict[int, Event]) -> dict[str, Any]:
    """The usage object of a response: tokens, loop iterations, and the speculative counts where drafted."""
    prompt_tokens = sum(len(p) for p in comp.prompts)
    done = sum(ev.usage["completion_tokens"] for ev in finals.values())
    loops = sum(ev.usage["loop_iterations"] for ev in finals.values())
    p0 = comp.params[0]
    out = {
        "prompt_tokens": prompt_tokens, "completion_tokens": done, "total_tokens": prompt_tokens + done,
        "loop_iterations": loops, "mean_loops": round(loops / done, 4) if done else 0.0,
        "n_loops": p0.depth, "adaptive": p0.adaptive is not None,
    }  # fmt: skip
    specs = [ev.usage["speculative"] for ev in finals.values() if "speculative" in ev.usage]
    if specs:
        out["speculative"] = {k: sum(s[k] for s in specs) for k in ("drafted", "accepted", "rounds")}
        out["speculative"].update(k=p0.speculative_k, draft_loops=p0.draft_loops)
    return out


async def _collect(request: HttpRequest, req: Request, rows: list[Row], head: dict, usage) -> JSONResponse:
    """The non-streamed response: every row's text gathered, or the first error; 499 once the client left."""
    watcher = asyncio.create_task(_cancel_on_disconnect(request, req))
    texts: dict[int, list[str]] = {r.index: [] for r in rows}
    finals: dict[int, Event] = {}
    try:
        while len(finals) < len(rows):
            ev = await req.queue.get()
            if ev is None:  # the client went away; its rows are already cancelled
                return JSONResponse({}, status_code=499)
            if ev.error is not None:
                status = 400 if ev.bad_request else 503 if ev.unavailable else 500
                kind = "invalid_request_error" if ev.bad_request else "server_error"
                return error_response(ApiError(status, ev.error, kind=kind))
            texts[ev.index].append(ev.text)
            if ev.finish_reason is not None:
                finals[ev.index] = ev
    finally:
        watcher.cancel()
        req.cancel()  # no-op for finished rows; frees the rows of a failed request
    choices = [
        {"text": "".join(texts[i]), "index": i, "logprobs": None, "finish_reason": finals[i].finish_reason}
        for i in sorted(texts)
    ]
    return JSONResponse(dict(head, choices=choices, usage=usage(finals)))


async def _cancel_on_disconnect(request: HttpRequest, req: Request) -> None:
    """Wait for the client's http.disconnect while its response is being generated, then cancel its rows at
    once (the engine drops them before its next step) and wake the handler with a None event."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    req.cancel()
    req.queue.put_nowait(None)


async def _sse(req: Request, rows: list[Row], head: dict, include_usage: bool, usage):
    def chunk(payload: dict) -> str:
        return f"data: {json.dumps(payload)}\n\n"

    finals: dict[int, Event] = {}
    try:
        while len(finals) < len(rows):
            ev = await req.queue.get()
            if ev.error is not None:
                kind = "invalid_request_error" if ev.bad_request else "server_error"
                yield chunk({"error": {"message": ev.error, "type": kind, "param": None, "code": None}})
                return
            if ev.finish_reason is not None:
                finals[ev.index] = ev
            if ev.text or ev.finish_reason is not None:
                choice = {"text": ev.text, "index": ev.index, "logprobs": None, "finish_reason": ev.finish_reason}
                yield chunk(dict(head, choices=[choice]))
        if include_usage:
            yield chunk(dict(head, choices=[], usage=usage(finals)))
        yield "data: [DONE]\n\n"
    finally:
        req.cancel()  # a client that went away mid-stream frees its rows at the engine's next step


# -- loading and running ------------------------------------------------------------------------------------


def load_served_model(
    path: str, device: str = "auto", tokenizer: str | None = None
) -> tuple[LoopGPT, Tokenizer, str, dict[str, Any]]:
    """A run directory / checkpoint (as `loopnn generate` loads it) or an HF export directory (`loopnn export`).

    Returns (model, tokenizer, model name, checkpoint): the last says what is served, {"path", "step", "sha256"
    (of the weight bytes loaded), "run" (the run directory, None for an export)}. runs.open_run reads it all and
    finds the tokenizer the way `loopnn generate` does.
    """
    from loopnn.device import resolve_device
    from loopnn.runs import open_run

    run = open_run(path, resolve_device(device), tokenizer=tokenizer)
    served = {"path": str(run.weights), "step": run.step, "sha256": run.sha256,
              "run": str(run.run_dir) if run.run_dir is not None else None}  # fmt: skip
    return run.model, run.tokenizer, Path(path).resolve().name, served


def _newest_step(checkpoint: dict[str, Any]) -> int | None:
    from loopnn.checkpoint import list_checkpoints, read_meta

    found = list_checkpoints(checkpoint["run"])
    try:
        return read_meta(found[-1]).get("step") if found else None
    except LoopnnError:  # being written or pruned right now
        return None
