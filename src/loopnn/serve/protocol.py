"""The `/v1/completions` request: strict parsing and validation into engine rows, OpenAI-style errors.

Every field is checked before anything is queued, so a bad request costs no model time and gets a 4xx
{"error": {"message", "type", "param", "code"}} body. Unknown fields are refused (a typo such as `n_loop`
must not silently run the default depth). OpenAI fields that a base model server cannot honour (logprobs,
echo, penalties, logit_bias, suffix, best_of > 1) are accepted only at their neutral values.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from loopnn.adaptive import CRITERIA, AdaptiveConfig, check_adaptive
from loopnn.errors import LoopnnError
from loopnn.model import LoopGPT
from loopnn.serve.engine import RowParams
from loopnn.tokenizer import Tokenizer

MAX_PROMPTS = 64
MAX_N = 16
MAX_STOPS = 4
MAX_SPECULATIVE_K = 16
MAX_DEPTH = 8  # JSON nesting a valid request needs: {"prompt": [[ids]], "stream_options": {...}} is 3
# Sampling bounds: below them float32 turns logits / temperature into inf, or top_p into 0, and the
# softmax into NaN. Sampling this close to greedy gains nothing over temperature 0, which stays allowed.
MIN_TEMPERATURE = 1e-3
MIN_TOP_P = 1e-3
NEUTRAL = {  # accepted OpenAI fields that must keep their neutral value here
    "logprobs": (None,),
    "echo": (None, False),
    "best_of": (None, 1),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "suffix": (None, ""),
}
FIELDS = {
    "model", "prompt", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
    "user", "n_loops", "adaptive", "criterion", "threshold", "min_loops", "max_loops", "speculative_k",
    "draft_loops", *NEUTRAL,
}  # fmt: skip
ADAPTIVE_FIELDS = ("criterion", "threshold", "min_loops", "max_loops")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class ServeSettings:
    """What the server allows: the model's limits and the operator's defaults."""

    model_name: str
    max_n_loops: int
    speculative_k: int = 0  # default for greedy fixed-depth requests; 0 = off
    draft_loops: int = 1
    token_bytes: int = 4  # most UTF-8 bytes one token stands for (longest_token): bounds a prompt before tokenizing


def longest_token(tok: Tokenizer) -> int:
    """Most UTF-8 bytes one token decodes to (a partial character counts as U+FFFD, 3 bytes, which is never
    fewer than the bytes it holds). A text of more characters than context x this cannot fit the context."""
    return max(len(tok.decode([i]).encode("utf-8")) for i in range(tok.vocab_size))


@dataclass
class Completion:
    prompts: list[list[int]]
    params: list[RowParams]  # one per prompt
    n: int
    stream: bool
    include_usage: bool


def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param)


def _int(body: dict, name: str, default: Any, lo: int, hi: int) -> Any:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(f"{name} must be an integer, got {json.dumps(v)[:40]}", name)
    if not lo <= v <= hi:
        raise _bad(f"{name} must be in [{lo}, {hi}], got {v}", name)
    return v


def _float(body: dict, name: str, default: Any, lo: float, hi: float, lo_open: bool = False) -> Any:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _bad(f"{name} must be a finite number, got {json.dumps(v)[:40]}", name)
    if not (lo < v if lo_open else lo <= v) or v > hi:
        raise _bad(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", name)
    return float(v)


def _bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(f"{name} must be true or false, got {json.dumps(v)[:40]}", name)
    return v


def decode_body(raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _bad(f"request body is not valid UTF-8 ({e.reason} at byte {e.start})") from None

    def no_constants(name: str) -> None:
        raise ValueError(f"{name} is not valid JSON")

    try:
        body = json.loads(text, parse_constant=no_constants)
    except (json.JSONDecodeError, ValueError) as e:
        raise _bad(f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise _bad(f"request body nests JSON deeper than {MAX_DEPTH} levels") from None
    if not isinstance(body, dict):
        raise _bad("request body must be a JSON object")
    _check_tree(body)
    return body


def _check_tree(body: dict[str, Any]) -> None:
    """Refuse nesting deeper than MAX_DEPTH and strings that are not Unicode text (a lone surrogate such as
    "\\ud800" is valid JSON but cannot be encoded, tokenized or quoted in an error message)."""
    stack: list[tuple[Any, int, str]] = [(v, 1, k) for k, v in body.items()] + [(k, 1, k) for k in body]
    while stack:
        value, depth, field = stack.pop()
        if depth > MAX_DEPTH:
            raise _bad(f"request body nests JSON deeper than {MAX_DEPTH} levels", _printable(field))
        if isinstance(value, str) and _printable(value) is not value:
            raise _bad(f"{_printable(field)!r} holds a lone UTF-16 surrogate, which is not Unicode text",
                       _printable(field))  # fmt: skip
        elif isinstance(value, dict):
            stack += [(v, depth + 1, field) for v in value.values()] + [(k, depth + 1, field) for k in value]
        elif isinstance(value, list):
            stack += [(v, depth + 1, field) for v in value]


def _printable(text: str) -> str:
    """`text` itself, or a copy with each lone surrogate replaced by U+FFFD."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text)


def _prompts(body: dict, tok: Tokenizer, vocab: int, context: int, token_bytes: int) -> list[list[int]]:
    if "prompt" not in body or body["prompt"] is None:
        raise _bad("prompt is required (a string, a list of strings, a list of token ids or a list of lists)", "prompt")
    p = body["prompt"]
    if isinstance(p, str) or (isinstance(p, list) and p and all(isinstance(t, int) for t in p)):
        p = [p]
    if not isinstance(p, list) or not p:
        raise _bad("prompt must be a string, a non-empty list of strings or of token-id lists", "prompt")
    if len(p) > MAX_PROMPTS:
        raise _bad(f"at most {MAX_PROMPTS} prompts per request, got {len(p)}", "prompt")
    fallback = [tok.eot_id] if tok.eot_id is not None else tok.encode("\n")
    out = []
    longest = context * token_bytes  # characters <= UTF-8 bytes <= tokens x token_bytes
    for item in p:
        if (isinstance(item, str) and len(item) > longest) or (isinstance(item, list) and len(item) >= context):
            raise _bad(  # cheap, before any tokenizing or checking of ids
                f"this model's maximum context length is {context} tokens; a prompt of {len(item)} "
                f"{'characters' if isinstance(item, str) else 'tokens'} cannot fit it",
                "prompt",
            )
        if isinstance(item, str):
            try:
                ids = tok.encode(item)
            except UnicodeError as e:
                raise _bad(f"prompt is not encodable text ({e})", "prompt") from None
            out.append(ids or fallback)  # an empty prompt starts from end-of-text, as `loopnn generate` does
        elif isinstance(item, list) and item and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
            bad = [t for t in item if not 0 <= t < vocab]
            if bad:
                raise _bad(f"token id {bad[0]} is outside the vocabulary [0, {vocab})", "prompt")
            out.append(list(item))
        else:
            raise _bad("each prompt must be a string or a non-empty list of token ids", "prompt")
    return out


def parse_completion(body: dict[str, Any], model: LoopGPT, tok: Tokenizer, settings: ServeSettings) -> Completion:
    """Validate a decoded request body; raises ApiError (400/404) naming the first bad field. The fields are
    checked in the order the OpenAI API lists them."""
    _check_envelope(body, settings)
    cfg = model.config
    prompts = _prompts(body, tok, cfg.vocab_size, cfg.block_size, settings.token_bytes)
    max_tokens = _max_tokens(body, cfg.block_size, max(len(p) for p in prompts))
    temperature = _float(body, "temperature", 1.0, 0.0, 2.0)
    if 0 < temperature < MIN_TEMPERATURE:
        raise _bad(f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE}, 2], got {temperature}", "temperature")
    top_p = _float(body, "top_p", None, MIN_TOP_P, 1.0)
    n = _int(body, "n", 1, 1, MAX_N)
    seed = _int(body, "seed", None, -(2**63), 2**63 - 1)
    stream = _bool(body, "stream", False)
    opts = body.get("stream_options")
    if opts is not None and (not isinstance(opts, dict) or set(opts) - {"include_usage"} or not stream):
        raise _bad('stream_options takes only {"include_usage": bool}, and only with stream', "stream_options")
    include_usage = _bool(opts or {}, "include_usage", False)
    stop = _stop(body)
    n_loops = _int(body, "n_loops", cfg.n_loops, 1, settings.max_n_loops)
    adaptive = _adaptive(body, model, settings, n_loops)
    k, draft = _speculative(body, settings, temperature, adaptive, n_loops)
    params = RowParams(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=tuple(stop or ()),
        n_loops=n_loops, adaptive=adaptive, speculative_k=k, draft_loops=draft,
    )  # fmt: skip
    return Completion(prompts, [params] * len(prompts), n, stream, include_usage)


def _check_envelope(body: dict[str, Any], settings: ServeSettings) -> None:
    """The fields around the completion itself: none unknown, neutral ones at their only value, model, user."""
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise _bad(f"unrecognized request argument supplied: {', '.join(unknown)}", unknown[0])
    for name, allowed in NEUTRAL.items():
        if name in body and body[name] not in allowed:
            raise _bad(f"{name} is not supported by this server (only {allowed[-1]!r})", name)
    name = body.get("model")
    if name is not None and name != settings.model_name:
        raise ApiError(404, f"the model {name!r} does not exist; this server has {settings.model_name!r}", "model",
                       code="model_not_found")  # fmt: skip
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise _bad("user must be a string", "user")


def _max_tokens(body: dict[str, Any], context: int, longest: int) -> int:
    """max_tokens (default: 16, or what the context leaves), refused where prompt and completion overflow it."""
    if longest >= context:
        raise _bad(
            f"this model's maximum context length is {context} tokens; the prompt has {longest}, leaving "
            "no room for a completion",
            "prompt",
        )
    max_tokens = _int(body, "max_tokens", None, 1, 2**31)
    if max_tokens is None:
        max_tokens = min(16, context - longest)
    if longest + max_tokens > context:
        raise _bad(
            f"this model's maximum context length is {context} tokens; you requested {longest + max_tokens} "
            f"({longest} in the prompt, {max_tokens} for the completion)",
            "max_tokens",
        )
    return max_tokens


def _stop(body: dict[str, Any]) -> list[str] | None:
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and (
        not isinstance(stop, list) or len(stop) > MAX_STOPS or not all(isinstance(s, str) and s for s in stop)
    ):
        raise _bad(f"stop must be a non-empty string or a list of at most {MAX_STOPS} of them", "stop")
    return stop


def _adaptive(body: dict[str, Any], model: LoopGPT, settings: ServeSettings, n_loops: int) -> AdaptiveConfig | None:
    """The adaptive-exit setting of the request (None: fixed depth), checked against the model."""
    given = [f for f in ADAPTIVE_FIELDS if body.get(f) is not None]
    if not _bool(body, "adaptive", bool(given)):
        if given:
            raise _bad(f"{given[0]} is an adaptive-exit setting; it needs adaptive (not false)", given[0])
        return None
    criterion = body.get("criterion", "kl")
    if criterion not in CRITERIA:
        raise _bad(f"criterion must be one of {', '.join(CRITERIA)}, got {json.dumps(criterion)[:40]}", "criterion")
    threshold = _float(body, "threshold", AdaptiveConfig.threshold, 0.0, 1e6)
    min_loops = _int(body, "min_loops", 1, 1, settings.max_n_loops)
    max_loops = _int(body, "max_loops", n_loops, 1, settings.max_n_loops)
    if min_loops > max_loops:
        raise _bad(f"min_loops ({min_loops}) exceeds max_loops ({max_loops})", "min_loops")
    adaptive = AdaptiveConfig(criterion, threshold, min_loops, max_loops)
    try:
        check_adaptive(model, adaptive)
    except LoopnnError as e:
        raise _bad(str(e), "adaptive") from None
    return adaptive


def _speculative(
    body: dict[str, Any], settings: ServeSettings, temperature: float, adaptive: AdaptiveConfig | None, n_loops: int
) -> tuple[int, int]:
    """(speculative_k, draft_loops): the request's, else the server's default where it applies (greedy, fixed
    depth, a shallower draft exists); k = 0 decodes without drafting."""
    k = _int(body, "speculative_k", None, 0, MAX_SPECULATIVE_K)
    draft = _int(body, "draft_loops", None, 1, settings.max_n_loops)
    if k is None and draft is not None:
        k = settings.speculative_k or 4
    if k is None:
        usable = temperature == 0 and adaptive is None and settings.draft_loops < n_loops
        k = settings.speculative_k if usable else 0
    draft = draft if draft is not None else min(settings.draft_loops, n_loops)
    if k > 0 and (temperature != 0 or adaptive is not None):
        message = "speculative decoding is greedy and fixed-depth: use temperature 0 and no adaptive"
        raise _bad(message, "speculative_k")
    if k > 0 and draft >= n_loops:
        raise _bad(f"draft_loops ({draft}) must be below n_loops ({n_loops})", "draft_loops")
    return k, draft
