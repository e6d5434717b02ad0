"""The decoding engine: one thread owns the model and runs continuous batching.

Requests are split into rows (one per prompt and choice) and queued. Before each decoding step the engine
admits waiting rows round-robin over requests (a large request cannot hold back a small one queued after it;
each prompt is prefilled alone), then advances every running row by one token: rows with the same loop setting
(a fixed n_loops, or one adaptive configuration, whatever each row's threshold) share one `RowBatch` and one
forward call; different settings run as separate batches in the same step. Greedy rows with speculative
decoding each run their own draft-and-verify round per step (they do not batch). Finished or cancelled rows
leave at once.
Results go back to the asyncio side through `Request.emit` (thread-safe), so the HTTP server never touches
the model.
"""

from __future__ import annotations

import asyncio
import collections
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from loopnn.adaptive import AdaptiveConfig
from loopnn.errors import LoopnnError
from loopnn.generate import sample
from loopnn.model import LoopGPT
from loopnn.serve.batch import RowBatch
from loopnn.speculative import SpeculativeDecoder, SpeculativeStats
from loopnn.tokenizer import Tokenizer


@dataclass(frozen=True)
class RowParams:
    """How one row is decoded (validated by the protocol layer)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    n_loops: int = 1
    adaptive: AdaptiveConfig | None = None
    speculative_k: int = 0
    draft_loops: int = 1

    @property
    def depth(self) -> int:
        """Loops of the prefill and the KV layout: the adaptive maximum, or n_loops."""
        if self.adaptive is not None and self.adaptive.max_loops is not None:
            return self.adaptive.max_loops
        return self.n_loops

    def group(self) -> tuple:
        a = self.adaptive
        # The threshold is per row inside a batch (RowBatch.thresholds): rows differing only there batch together.
        return ("fixed", self.n_loops) if a is None else ("adaptive", a.criterion, a.min_loops, self.depth)


@dataclass
class Event:
    """One message from the engine to a request: new text of a choice, its end, or its error."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    error: str | None = None
    bad_request: bool = False
    unavailable: bool = False  # the engine itself stopped (HTTP 503), not this request's fault


class Request:
    """The HTTP side's handle: its rows' events arrive on an asyncio queue in the server's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None):
        self.loop = loop
        # Event | None: None is the HTTP side waking itself when its client disconnects
        self.queue: asyncio.Queue[Event | None] | None = asyncio.Queue() if loop is not None else None
        self.events: list[Event] = []  # without a loop (tests, benchmarks), events are collected here
        self.cancelled = False

    def emit(self, event: Event) -> None:
        if self.loop is None:
            self.events.append(event)
        elif not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    def cancel(self) -> None:
        """The client went away: the engine drops this request's rows at its next step."""
        self.cancelled = True


@dataclass
class Row:
    request: Request
    index: int
    prompt: list[int]
    params: RowParams
    tokens: list[int] = field(default_factory=list)
    loop_iterations: int = 0
    sent: int = 0  # characters of text already emitted
    finished: bool = False
    last: int = 0
    spec: SpeculativeDecoder | None = None
    generator: torch.Generator | None = None
    queued_at: float = field(default_factory=time.perf_counter)


class QueueFull(Exception):
    pass


class EngineStopped(Exception):
    """The engine thread died; no request can be served any more."""


class Engine:
    def __init__(self, model: LoopGPT, tokenizer: Tokenizer, *, max_batch: int = 32, max_queue: int = 256):
        if max_batch < 1 or max_queue < 1:
            raise LoopnnError(f"max_batch ({max_batch}) and max_queue ({max_queue}) must be >= 1")
        self.model, self.tok = model.eval(), tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.device = next(model.parameters()).device
        # Waiting rows by request, in arrival order; admission takes one row per request in turn.
        self.waiting: collections.OrderedDict[Request, collections.deque[Row]] = collections.OrderedDict()
        self.n_waiting = 0
        self.groups: dict[tuple, RowBatch] = {}
        self.spec_rows: list[Row] = []
        self.cond = threading.Condition()
        self.stopping = False
        self.thread: threading.Thread | None = None
        self.steps = 0
        self.tokens = 0
        self.row_steps = 0  # sum of batch sizes over steps: mean batch = row_steps / steps
        self.error: BaseException | None = None
        self.admitting: list[Row] = []  # taken from `waiting`, not yet in a batch
        self.on_death = None  # called (from the engine thread) after the engine failed every row

    # -- the HTTP side ------------------------------------------------------------------------------------
    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="loopnn-engine", daemon=True)
        self.thread.start()

    def submit(self, rows: list[Row]) -> None:
        """Queue a request's rows; QueueFull when the waiting rows would pass max_queue."""
        with self.cond:
            if self.error is not None:
                raise EngineStopped(f"the decoding engine stopped ({_describe(self.error)})")
            if self.stopping:
                raise QueueFull("the server is shutting down")
            if self.n_waiting + len(rows) > self.max_queue:
                raise QueueFull(f"{self.n_waiting} rows are waiting (limit {self.max_queue})")
            for row in rows:
                self.waiting.setdefault(row.request, collections.deque()).append(row)
            self.n_waiting += len(rows)
            self.cond.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the rows already admitted or waiting, then end the engine thread."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        if self.thread is not None:
            self.thread.join(timeout)

    def active(self) -> int:
        return sum(len(b) for b in self.groups.values()) + len(self.spec_rows)

    def status(self) -> dict[str, Any]:
        return {
            "active_rows": self.active(),
            "waiting_rows": self.n_waiting,
            "steps": self.steps,
            "tokens": self.tokens,
            "mean_batch": self.row_steps / self.steps if self.steps else 0.0,
        }

    # -- the engine thread --------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    with self.cond:
                        while not self.waiting and not self.active() and not self.stopping:
                            self.cond.wait()
                        if self.stopping and not self.waiting and not self.active():
                            return
                        self.admitting = []
                        while self.waiting and self.active() + len(self.admitting) < self.max_batch:
                            self.admitting.append(self._next_waiting())
                    for row in self.admitting:
                        self._admit(row)
                    self.admitting = []
                    self.run_step()
        except BaseException as e:  # a bug: fail every row (503) instead of hanging the clients, then say so
            with self.cond:  # under the lock: submit() sees `error` and refuses, so no row is left behind
                self.error = e
                rows = [r for q in self.waiting.values() for r in q] + self.admitting
                rows += [r for b in self.groups.values() for r in b.rows]
                for row in rows + self.spec_rows:
                    self._fail(row, EngineStopped(f"the decoding engine stopped ({_describe(e)})"))
            if self.on_death is not None:
                self.on_death()
            raise

    def _next_waiting(self) -> Row:
        """The next row to admit: the oldest request's, which then goes to the back of the line."""
        request, rows = next(iter(self.waiting.items()))
        row = rows.popleft()
        if rows:
            self.waiting.move_to_end(request)
        else:
            del self.waiting[request]
        self.n_waiting -= 1
        return row

    def run_step(self) -> None:
        """Advance every running row by one step (speculative rows by one round)."""
        stepped = 0
        for key in list(self.groups):
            stepped += self._step_group(key)
        for row in list(self.spec_rows):
            stepped += self._step_spec(row)
        if stepped:
            self.steps += 1
            self.row_steps += stepped

    def _admit(self, row: Row) -> None:
        if row.request.cancelled:
            return
        p = row.params
        try:
            if p.temperature > 0:
                seed = p.seed if p.seed is not None else secrets.randbits(63)
                row.generator = torch.Generator(device=self.device).manual_seed(seed)
            if p.speculative_k > 0:
                row.spec = SpeculativeDecoder(
                    self.model, row.prompt, p.max_tokens, n_loops=p.n_loops, draft_loops=p.draft_loops,
                    k=p.speculative_k, eos_id=self.tok.eot_id,
                )  # fmt: skip
                first = row.spec.start()
                row.loop_iterations += p.n_loops
                if not self._push(row, [first]):
                    self.spec_rows.append(row)
                return
            batch = self.groups.get(p.group())
            if batch is None:
                batch = self.groups[p.group()] = RowBatch(self.model, p.depth, p.adaptive)
            logits, cache = batch.prefill(row.prompt)
            token = self._sample(row, logits[None])
            row.loop_iterations += p.depth
            if not self._push(row, [token]):
                row.last = token
                batch.add(row, cache, p.adaptive.threshold if p.adaptive is not None else None)
            elif not len(batch):
                del self.groups[p.group()]
        except Exception as e:
            self._fail(row, e)

    def _sample(self, row: Row, logits: torch.Tensor) -> int:
        p = row.params
        return int(sample(logits, p.temperature, None, p.top_p, row.generator)[0])

    def _step_group(self, key: tuple) -> int:
        batch = self.groups[key]
        gone = [i for i, r in enumerate(batch.rows) if r.request.cancelled]
        if gone:
            batch.remove(gone)
        if not len(batch):
            del self.groups[key]
            return 0
        rows = list(batch.rows)
        try:
            logits, loops = batch.step(torch.tensor([r.last for r in rows]))
        except Exception as e:
            for r in rows:
                self._fail(r, e)
            del self.groups[key]
            return 0
        greedy = logits.argmax(-1).tolist()
        loops = loops.tolist()
        gone = []
        for i, row in enumerate(rows):
            row.loop_iterations += loops[i]
            try:
                if not torch.isfinite(logits[i]).all():
                    sample(logits[i : i + 1])  # raises the library's message about diverged loop states
                token = greedy[i] if row.params.temperature == 0 else self._sample(row, logits[i : i + 1])
                done = self._push(row, [token])
            except Exception as e:
                self._fail(row, e)
                done = True
            if done:
                gone.append(i)
            else:
                row.last = token
        batch.remove(gone)
        if not len(batch):
            del self.groups[key]
        return len(rows)

    def _step_spec(self, row: Row) -> int:
        if row.request.cancelled:
            self.spec_rows.remove(row)
            return 0
        try:
            new = row.spec.step()
            row.loop_iterations += len(new) * row.params.n_loops
            done = self._push(row, new) or row.spec.done
        except Exception as e:
            self._fail(row, e)
            done = True
        if done:
            if not row.finished:
                self._finish(row, "length")
            self.spec_rows.remove(row)
        return 1

    # -- text, stop conditions, events --------------------------------------------------------------------
    def _push(self, row: Row, tokens: list[int]) -> bool:
        """Append new tokens to a row, emit the text that is final; True once the row has finished."""
        p, eot = row.params, self.tok.eot_id
        finish = None
        for t in tokens:
            row.tokens.append(t)
            self.tokens += 1
            if eot is not None and t == eot:
                finish = "stop"
                break
            if len(row.tokens) >= p.max_tokens:
                finish = "length"
                break
        ids = row.tokens[:-1] if finish == "stop" else row.tokens
        text = self.tok.decode(ids)
        if p.stop:
            hits = [i for i in (text.find(s) for s in p.stop) if i >= 0]
            if hits:
                text, finish = text[: min(hits)], "stop"
        if finish is None:
            safe = len(text)
            while safe > row.sent and text[safe - 1] == "\ufffd":  # maybe the start of a multi-byte character
                safe -= 1
            for n in range(min(max((len(s) for s in p.stop), default=1) - 1, safe - row.sent), 0, -1):
                if any(s.startswith(text[safe - n : safe]) for s in p.stop):  # maybe the start of a stop string
                    safe -= n
                    break
            if safe > row.sent:
                row.request.emit(Event(row.index, text[row.sent : safe]))
                row.sent = safe
            return False
        self._finish(row, finish, text)
        return True

    def _finish(self, row: Row, reason: str, text: str | None = None) -> None:
        if text is None:
            text = self.tok.decode(row.tokens)
        usage: dict[str, Any] = {"completion_tokens": len(row.tokens), "loop_iterations": row.loop_iterations}
        if row.spec is not None:
            s: SpeculativeStats = row.spec.stats
            usage["speculative"] = {"drafted": s.drafted, "accepted": s.accepted, "rounds": s.rounds}
        row.finished = True
        row.request.emit(Event(row.index, text[row.sent :], reason, usage))
        row.sent = len(text)

    def _fail(self, row: Row, error: BaseException) -> None:
        if row.finished:
            return
        row.finished = True
        message = str(error) if isinstance(error, (LoopnnError, EngineStopped)) else _describe(error)
        stopped = isinstance(error, EngineStopped)
        row.request.emit(
            Event(row.index, error=message, bad_request=isinstance(error, LoopnnError), unavailable=stopped)
        )


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"
