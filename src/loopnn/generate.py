"""Text generation: KV-cached decoding, left-padded batches, sampling, streaming, adaptive per-token looping.

    from loopnn.generate import generate
    out = generate(model, [[1, 2, 3], [4, 5]], 32, temperature=0.8, top_k=40, seed=0)   # new tokens per prompt
    for step in stream(model, prompts, 32): ...                                         # one list per step

Prompts of different lengths are left-padded into one batch: padding is masked out of attention and each row's
positions start at 0 at its first real token, so a padded batch gives the same tokens as each prompt alone.
The prompt is prefilled once at full depth; each new token then runs through the loop with the per-(loop,
block) KV cache, either for a fixed n_loops or with adaptive exit (loopnn.adaptive).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch

from loopnn.adaptive import AdaptiveConfig, DecodeStats, adaptive_step, check_adaptive, prepare_cache
from loopnn.config import MAX_LOOPS
from loopnn.errors import LoopnnError
from loopnn.flops import block_forward_flops, head_forward_flops
from loopnn.kvcache import KVCache, left_pad, positions_from_padding
from loopnn.model import LoopGPT

__all__ = ["AdaptiveConfig", "DecodeStats", "Decoder", "generate", "stream", "sample", "left_pad"]


def sample(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token per row from logits (B, V): greedy at temperature 0, else top-k then nucleus sampling."""
    if not bool(torch.isfinite(logits).all()):
        raise LoopnnError(
            "the model produced non-finite logits: its loop state diverged at this loop count; "
            "use fewer loops (--n-loops) closer to the trained count"
        )
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass (the first always stays).
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _check_args(model: LoopGPT, prompts, max_new_tokens, temperature, top_k, top_p, n_loops) -> None:
    cfg = model.config
    if max_new_tokens < 0:
        raise LoopnnError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not (temperature == 0 or 1e-6 <= temperature <= 1e6):  # also NaN; tiny values overflow the logits
        raise LoopnnError(f"temperature must be 0 (greedy) or in [1e-6, 1e6], got {temperature}")
    if top_k is not None and top_k < 1:
        raise LoopnnError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise LoopnnError(f"top_p must be in (0, 1], got {top_p}")
    if n_loops is not None and not 1 <= n_loops <= MAX_LOOPS:
        raise LoopnnError(f"n_loops must be between 1 and {MAX_LOOPS}, got {n_loops}")
    longest = max((len(p) for p in prompts), default=0)
    if longest + max_new_tokens > cfg.block_size:
        raise LoopnnError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds block_size {cfg.block_size}; "
            "shorten the prompt or generate fewer tokens"
        )
    bad = [t for p in prompts for t in p if not 0 <= t < cfg.vocab_size]
    if bad:
        raise LoopnnError(f"token id {bad[0]} is outside the vocabulary [0, {cfg.vocab_size})")


class Decoder:
    """Logits for a batch of prompts, one decoding step at a time (what `stream` samples from).

        dec = Decoder(model, prompts, max_new_tokens=16)
        logits = dec.prefill()            # (B, vocab): next-token logits after each prompt
        logits = dec.step(tokens)         # tokens (B,): feed one token per row, get the next logits

    Fixed loops go through `LoopGPT.decode` (with the cache, or recomputing the whole prefix when
    use_cache=False); adaptive looping goes through `adaptive_step`. `stats` counts the executed work.
    """

    def __init__(
        self,
        model: LoopGPT,
        prompts: list[list[int]],
        max_new_tokens: int,
        *,
        n_loops: int | None = None,
        use_cache: bool = True,
        adaptive: AdaptiveConfig | None = None,
        stats: DecodeStats | None = None,
    ):
        _check_args(model, prompts, max_new_tokens, 1.0, None, None, n_loops)
        if adaptive is not None and not use_cache:
            raise LoopnnError("adaptive looping decodes through the KV cache; drop use_cache=False")
        self.model, self.adaptive = model, adaptive
        max_loops = check_adaptive(model, adaptive, n_loops) if adaptive is not None else None
        self.n_loops = max_loops or n_loops or model.config.n_loops
        self.depth = model.config.effective_depth(self.n_loops)
        self.stats = stats if stats is not None else DecodeStats()
        device = next(model.parameters()).device
        self.idx, self.padding = (t.to(device) for t in left_pad(prompts))
        B, P = self.idx.shape
        self.padded = bool((self.padding == 0).any())
        self.cache = KVCache(P + max_new_tokens) if use_cache else None
        if self.cache is not None and adaptive is not None:
            prepare_cache(model, self.cache, B, self.n_loops)

    def _count(self, B: int, contexts: range) -> None:
        cfg, s = self.model.config, self.stats
        s.tokens += B * len(contexts)
        s.loop_iterations += B * len(contexts) * self.n_loops
        s.block_applications += B * len(contexts) * self.depth
        s.head_evaluations += B * len(contexts)
        s.flops += B * sum(self.depth * block_forward_flops(cfg, c) + head_forward_flops(cfg) for c in contexts)

    @torch.no_grad()
    def prefill(self) -> torch.Tensor:
        """Run the prompts at full depth; returns (B, vocab) logits for the first new token."""
        cfg, (B, P) = self.model.config, self.idx.shape
        logits = self.model.decode(
            self.idx, self.cache, self.n_loops, padding=self.padding if self.padded else None,
            positions=positions_from_padding(self.padding) if self.padded else None,  # unpadded: the plain forward path
            last_only=True,
        )  # fmt: skip
        self.stats.prefill_tokens += B * P
        self.stats.prefill_flops += B * (  # the head runs on the last position only
            sum(self.depth * block_forward_flops(cfg, t + 1) for t in range(P)) + head_forward_flops(cfg)
        )
        return logits[:, -1]

    @torch.no_grad()
    def step(self, token: torch.Tensor, finished: torch.Tensor | None = None) -> torch.Tensor:
        """Append token (B,) to every row; returns (B, vocab) next-token logits.

        finished (B,) bool: rows whose output no longer matters; adaptive decoding skips them (logits 0).
        """
        self.idx = torch.cat([self.idx, token.view(-1, 1).to(self.idx)], dim=1)
        self.padding = torch.cat([self.padding, torch.ones_like(self.padding[:, :1])], dim=1)
        positions = positions_from_padding(self.padding)
        padding = self.padding if self.padded else None
        B, S = self.idx.shape
        if self.adaptive is not None:
            rows = None if finished is None else (~finished).nonzero()[:, 0]
            return adaptive_step(
                self.model, self.cache, self.idx[:, -1:], self.adaptive, max_loops=self.n_loops,
                positions=positions[:, -1:] if self.padded else None, padding=padding, rows=rows,
                stats=self.stats,
            )  # fmt: skip
        new = self.idx[:, -1:] if self.cache is not None else self.idx
        T = new.shape[1]
        logits = self.model.decode(new, self.cache, self.n_loops, padding=padding, positions=positions[:, -T:])
        self._count(B, range(S - T + 1, S + 1))
        return logits[:, -1]


def stream(
    model: LoopGPT,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    n_loops: int | None = None,
    use_cache: bool = True,
    eos_id: int | None = None,
    adaptive: AdaptiveConfig | None = None,
    stats: DecodeStats | None = None,
) -> Iterator[list[int | None]]:
    """Yield one list per decoding step: the new token of each prompt, or None once that row has hit eos_id.

    Arguments as in `generate`. Stops after max_new_tokens steps or when every row has finished.
    """
    _check_args(model, prompts, max_new_tokens, temperature, top_k, top_p, n_loops)
    if max_new_tokens == 0:
        return
    was_training = model.training
    model.eval()
    try:
        dec = Decoder(
            model, prompts, max_new_tokens, n_loops=n_loops, use_cache=use_cache, adaptive=adaptive, stats=stats
        )
        device = dec.idx.device
        if seed is not None and not -(2**63) <= seed < 2**64:
            raise LoopnnError(f"seed must fit in 64 bits, got {seed}")
        generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        t0 = time.perf_counter()
        logits = dec.prefill()
        for step in range(max_new_tokens):
            token = sample(logits, temperature, top_k, top_p, generator)  # (B,)
            out = [None if f else int(t) for t, f in zip(token.tolist(), finished.tolist())]
            if eos_id is not None:
                finished |= token == eos_id
            dec.stats.wall_time += time.perf_counter() - t0
            yield out
            t0 = time.perf_counter()
            if step == max_new_tokens - 1 or bool(finished.all()):
                break
            logits = dec.step(token, finished)
    finally:
        model.train(was_training)


def generate(
    model: LoopGPT,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    n_loops: int | None = None,
    use_cache: bool = True,
    eos_id: int | None = None,
    adaptive: AdaptiveConfig | None = None,
    on_token: Callable[[int, int], None] | None = None,
    stats: DecodeStats | None = None,
) -> list[list[int]]:
    """Continue each prompt (token ids) by up to max_new_tokens; returns only the new tokens per prompt.

    temperature 0 is greedy; top_k/top_p filter before sampling; seed makes sampling repeatable (a private
    torch.Generator). n_loops overrides the trained loop count (fewer or more). use_cache=False recomputes the
    whole prefix at every step (reference path). eos_id stops a row after it emits that token (included).
    adaptive: per-token exit (stack strategy), max_loops defaulting to n_loops. on_token(row, token) is called
    as each token is produced. stats, if given, is filled with the executed work (see DecodeStats).
    """
    outputs: list[list[int]] = [[] for _ in prompts]
    for step in stream(
        model, prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
        n_loops=n_loops, use_cache=use_cache, eos_id=eos_id, adaptive=adaptive, stats=stats,
    ):  # fmt: skip
        for row, token in enumerate(step):
            if token is not None:
                outputs[row].append(token)
                if on_token is not None:
                    on_token(row, token)
    return outputs
