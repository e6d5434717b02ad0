"""Self-speculative greedy decoding: the same looped model drafts with fewer loops and verifies at full depth.

    from loopnn.speculative import speculative_generate
    outs, stats = speculative_generate(model, [[1, 2, 3]], 32, draft_loops=1, k=4)   # == greedy generate

Each round drafts up to k tokens one at a time with `draft_loops` loops (cheap), then runs the k drafts plus
the last committed token through the model at the full loop count in one forward pass, and keeps the longest
prefix of drafts that the full model would have produced greedily, plus the full model's own next token. So
every round commits between 1 and k + 1 tokens, and the output is exactly greedy decoding at the full loop
count (lossless), up to float rounding between a one-token and a (k + 1)-token forward pass.

The draft and the full model keep separate KV caches (with a coda, the draft's coda slot would be a full-depth
loop slot); a rejected draft only rolls each cache's `length` back, nothing is recomputed. One prompt per
decoder: rows of a batch would accept different numbers of tokens and their caches would fall out of step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loopnn.errors import LoopnnError
from loopnn.kvcache import KVCache
from loopnn.model import LoopGPT


@dataclass
class SpeculativeStats:
    """drafted: draft tokens proposed; accepted: those the full model agreed with; rounds: verify passes."""

    tokens: int = 0
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def add(self, other: SpeculativeStats) -> None:
        self.tokens += other.tokens
        self.drafted += other.drafted
        self.accepted += other.accepted
        self.rounds += other.rounds


class SpeculativeDecoder:
    """Greedy tokens of one prompt, several per `step()` when the draft is right.

    dec = SpeculativeDecoder(model, prompt, 32, n_loops=3, draft_loops=1, k=4)
    first = dec.start()        # prefill; the first new token
    more = dec.step()          # 1..k+1 further tokens; [] once max_new_tokens are out
    """

    def __init__(
        self,
        model: LoopGPT,
        prompt: list[int],
        max_new_tokens: int,
        *,
        n_loops: int | None = None,
        draft_loops: int = 1,
        k: int = 4,
        eos_id: int | None = None,
    ):
        cfg = model.config
        self.n_loops = cfg.n_loops if n_loops is None else n_loops
        if self.n_loops < 1 or not 1 <= draft_loops:
            raise LoopnnError(f"n_loops ({self.n_loops}) and draft_loops ({draft_loops}) must be >= 1")
        if k < 1:
            raise LoopnnError(f"speculative k (draft tokens per round) must be >= 1, got {k}")
        if not prompt:
            raise LoopnnError("every prompt needs at least one token")
        if max_new_tokens < 1 or len(prompt) + max_new_tokens > cfg.block_size:
            raise LoopnnError(
                f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) must fit block_size "
                f"{cfg.block_size}, with max_new_tokens >= 1"
            )
        self.model, self.prompt, self.max_new = model, prompt, max_new_tokens
        self.draft_loops, self.k, self.eos_id = draft_loops, k, eos_id
        self.device = next(model.parameters()).device
        self.full = KVCache(len(prompt) + max_new_tokens)
        self.draft = KVCache(len(prompt) + max_new_tokens)
        self.out: list[int] = []
        self.pending: list[int] = []  # committed tokens the draft cache has not seen yet
        self.done = False
        self.stats = SpeculativeStats()

    def _forward(self, tokens: list[int], n_loops: int, cache: KVCache) -> torch.Tensor:
        idx = torch.tensor([tokens], dtype=torch.long, device=self.device)
        return self.model.decode(idx, cache, n_loops)[0]  # (T, vocab)

    def _commit(self, tokens: list[int]) -> list[int]:
        if self.eos_id is not None and self.eos_id in tokens:
            tokens = tokens[: tokens.index(self.eos_id) + 1]
            self.done = True
        self.out += tokens
        self.stats.tokens += len(tokens)
        if len(self.out) >= self.max_new:
            self.done = True
        return tokens

    @torch.no_grad()
    def start(self) -> int:
        """Prefill both caches with the prompt; returns the first new token (the full model's greedy pick)."""
        logits = self._forward(self.prompt, self.n_loops, self.full)
        self._forward(self.prompt, self.draft_loops, self.draft)
        first = int(logits[-1].argmax())
        self.pending = [first]
        return self._commit([first])[0]

    @torch.no_grad()
    def step(self) -> list[int]:
        """One draft-and-verify round: the next 1..k+1 greedy tokens ([] when finished)."""
        if self.done or not self.out:
            return []
        remaining = self.max_new - len(self.out)
        k = min(self.k, remaining - 1)  # never verify past max_new_tokens (or the context)
        committed = len(self.prompt) + len(self.out)  # the last committed token is in neither cache yet
        drafts: list[int] = []
        feed = self.pending
        for _ in range(k):
            drafts.append(int(self._forward(feed, self.draft_loops, self.draft)[-1].argmax()))
            feed = drafts[-1:]
        greedy = self._forward([self.out[-1]] + drafts, self.n_loops, self.full).argmax(-1).tolist()
        j = 0
        while j < k and drafts[j] == greedy[j]:
            j += 1
        new = drafts[:j] + [greedy[j]]
        self.full.rewind(committed + j)  # keep the last committed token and the accepted drafts
        if k > 0:  # the draft cache holds the pending tokens and drafts[:k-1]; keep what was accepted
            kept = min(j, k - 1)
            self.draft.rewind(committed + kept)
            self.pending = drafts[kept:j] + [greedy[j]]
        else:
            self.pending = self.pending + [greedy[j]]
        self.stats.rounds += 1
        self.stats.drafted += k
        self.stats.accepted += j
        return self._commit(new)


def speculative_generate(
    model: LoopGPT,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    n_loops: int | None = None,
    draft_loops: int = 1,
    k: int = 4,
    eos_id: int | None = None,
    stats: SpeculativeStats | None = None,
) -> list[list[int]]:
    """Greedy continuation of each prompt (one after another), equal to generate(..., temperature=0)."""
    outputs = []
    was_training = model.training
    model.eval()
    try:
        for prompt in prompts:
            if max_new_tokens == 0:
                outputs.append([])
                continue
            dec = SpeculativeDecoder(
                model, prompt, max_new_tokens, n_loops=n_loops, draft_loops=draft_loops, k=k, eos_id=eos_id
            )
            dec.start()
            while not dec.done:
                dec.step()
            outputs.append(dec.out)
            if stats is not None:
                stats.add(dec.stats)
    finally:
        model.train(was_training)
    return outputs
