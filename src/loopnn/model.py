"""GPT-2 with a looped block region: `LoopGPT`.

Plain GPT-2 (pre-LN blocks, learned positions, GELU-tanh MLP, biases, tied head, GPT-2 parameter names so HF
weights map key by key). The only new piece is that the blocks run through the loop driver `loop.run`, with
the paper's update rule between loops (`loop.update`). Each block is registered once, so parameters and
state_dict keys do not depend on how many times it runs. `forward` is for training and evaluation, `decode`
for KV-cached generation (the cache and the left-padding bookkeeping live in loopnn.kvcache). The model knows
nothing about training: activation checkpointing, truncated backprop, DDP/FSDP and compile are applied from
outside (loopnn.parallel, loopnn.dist).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from loopnn import loop
from loopnn.config import MAX_LOOPS, ModelConfig
from loopnn.errors import LoopnnError
from loopnn.kvcache import KVCache, KVSlot, padding_mask
from loopnn.loss import chunked_head_loss, use_chunked_loss


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # fused q, k, v
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, kv: KVSlot | None) -> torch.Tensor:
        return self.resid_dropout(self.c_proj(self.attend(self.c_attn(x), mask, kv)))

    def attend(self, qkv: torch.Tensor, mask: torch.Tensor | None, kv: KVSlot | None) -> torch.Tensor:
        """Fused q/k/v projections (B, T, 3C) -> attention output (B, T, C), before the output projection."""
        B, T, C3 = qkv.shape
        C = C3 // 3
        q, k, v = qkv.split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if kv is not None:
            k, v = kv.update(k, v)  # (B, nh, past + T, hs)
        # No mask: causal over T > 1 queries; a single new query (decoding) sees every cached key, so no mask at all.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, dropout_p=self.dropout if self.training else 0.0
        )
        return y.transpose(1, 2).contiguous().view(B, T, C)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)
        self.branch_scale = 1.0  # LoopGPT sets ModelConfig.branch_scale on the looped blocks

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, kv: KVSlot | None = None) -> torch.Tensor:
        x = self.residual(x, self.attn(self.ln_1(x), mask, kv))
        return self.residual(x, self.mlp(self.ln_2(x)))

    def residual(self, x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        """x + s * branch (s = branch_scale), in one kernel (add with alpha) where s != 1."""
        return x + branch if self.branch_scale == 1.0 else torch.add(x, branch, alpha=self.branch_scale)


class LoopGPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.padded_vocab_size, cfg.n_embd),
                wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
                ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias),
            )
        )
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied
        if cfg.gated:
            # a_n, one vector per trained loop (v3). The only parameter whose size depends on n_loops.
            self.loop_gate = nn.Parameter(torch.full((cfg.n_loops, cfg.n_embd), cfg.resolved_gate_init))
        else:
            self.register_parameter("loop_gate", None)
        if cfg.loop_embedding:  # zero at init: the looped model starts as the plain one
            self.loop_embed = nn.Parameter(torch.zeros(cfg.n_loops, cfg.n_embd))
        else:
            self.register_parameter("loop_embed", None)
        for block in self.transformer.h[cfg.loop_start : cfg.loop_end]:
            block.branch_scale = cfg.branch_scale
        # Input injection 'concat' (Huginn): x <- W [x; e0] + b before loops 2..N, one adapter for all loops.
        # reset_parameters sets its weights without randomness; fork_rng keeps the draws of every other weight
        # the same as in the model without it.
        with torch.random.fork_rng(devices=[]):
            concat = cfg.injection == "concat"
            self.loop_adapter = nn.Linear(2 * cfg.n_embd, cfg.n_embd, bias=cfg.bias) if concat else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02), zero biases, residual projections scaled by 1/sqrt(2 * depth)."""
        cfg = self.config
        depth = cfg.n_layer if cfg.init_depth == "unique" else cfg.effective_depth()
        for name, p in self.named_parameters():
            if name == "loop_gate":
                continue
            if name == "loop_embed":
                nn.init.zeros_(p)
                continue
            if name == "loop_adapter.weight":  # [I | I]: starts as injection 'add' (x + e0), then learns
                with torch.no_grad():
                    C = self.config.n_embd
                    p.copy_(torch.cat([torch.eye(C), torch.eye(C)], dim=1))
                continue
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * depth))
            elif name.endswith(".weight") and p.dim() == 2:
                nn.init.normal_(p, mean=0.0, std=0.02)
            elif "ln_" in name and name.endswith(".weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)

    def num_params(self, non_embedding: bool = True) -> int:
        """Unique parameters. non_embedding=True leaves out position embeddings, as nanoGPT and the paper do."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields the tied weight once
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def _n_loops(self, n_loops: int | None) -> int:
        n = self.config.n_loops if n_loops is None else n_loops
        if not 1 <= n <= MAX_LOOPS:
            raise LoopnnError(f"n_loops must be between 1 and {MAX_LOOPS}, got {n}")
        return n

    def embed(self, idx: torch.Tensor, positions: torch.Tensor | None = None, past: int = 0) -> torch.Tensor:
        B, T = idx.shape
        if positions is None:
            if past + T > self.config.block_size:
                raise LoopnnError(
                    f"sequence length {past + T} exceeds block_size {self.config.block_size}; "
                    "use a shorter input or a model with a larger block_size"
                )
            positions = torch.arange(past, past + T, device=idx.device)
        return self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """ln_f + tied head; padded vocab rows are cut off so they never take probability mass.

        Functional calls with the two modules' parameters rather than the modules themselves: decoding and adaptive
        exit call this once or more per token, where a module call's overhead is a visible share of a (1, C)
        readout. Forward hooks registered on ln_f or lm_head therefore do not run here."""
        ln, head = self.transformer.ln_f, self.lm_head
        h = F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
        return F.linear(h, head.weight, head.bias)[..., : self.config.vocab_size]

    def body(
        self,
        x: torch.Tensor,
        n_loops: int | None = None,
        *,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        loop_states: list[torch.Tensor] | None = None,
        after_loop: loop.AfterLoop | None = None,
    ) -> torch.Tensor:
        """All blocks in loop order on embeddings x (B, T, C) -> final hidden state (before ln_f).

        loop_states (stack strategy): the state after each loop is appended to it. after_loop: loop.run's hook.
        """
        if loop_states is not None:
            after_loop = _recording(loop_states, after_loop)
        return loop.run(
            self.config,
            x,
            self._n_loops(n_loops),
            self.loop_gate,
            self._block_call(mask, cache),
            inject=self._inject(),
            loop_embed=self.loop_embed,
            after_loop=after_loop,
        )

    def _block_call(self, mask: torch.Tensor | None, cache: KVCache | None) -> loop.BlockCall:
        blocks = self.transformer.h

        def call(i: int, slot: int, h: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
            if rows is not None:  # rows exited through an after_loop hook: only the others run
                if cache is not None:
                    raise LoopnnError("rows exiting early with a KV cache go through loopnn.adaptive")
                return blocks[i](h, mask if mask is None or mask.shape[0] == 1 else mask[rows], None)
            return blocks[i](h, mask, cache.slot(slot) if cache is not None else None)

        return call

    def coda(self, x: torch.Tensor, n_loops: int | None = None, e0: torch.Tensor | None = None) -> torch.Tensor:
        """The blocks after the loop region on a loop state x (B, T, C), without a cache (the logit lens). e0, the
        loop region's input, is needed under ModelConfig.coda_injection."""
        n = self._n_loops(n_loops)
        return loop.coda(self.config, x, n, self._block_call(None, None), self._inject(), e0)

    def _inject(self) -> loop.Inject | None:
        """What is applied to (state x, loop region's input e0) at a loop boundary before loops 2..N: the boundary
        norm (ModelConfig.loop_norm), then the injection (ModelConfig.injection, injection_scale)."""
        cfg = self.config
        if cfg.injection == "add":
            scale = cfg.injection_scale
            if scale == 1.0:
                return lambda x, e0: loop.boundary_norm(cfg, x, e0) + e0
            return lambda x, e0: torch.add(loop.boundary_norm(cfg, x, e0), e0, alpha=scale)
        if cfg.injection == "concat":
            return lambda x, e0: self.loop_adapter(torch.cat([loop.boundary_norm(cfg, x, e0), e0], dim=-1))
        if cfg.loop_norm != "none":
            return lambda x, e0: loop.boundary_norm(cfg, x, e0)
        return None

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        n_loops: int | None = None,
        *,
        return_logits: bool = True,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx (B, T) token ids -> (logits (B, T, vocab), mean cross-entropy or None).

        n_loops overrides the trained loop count for this call (test-time looping). return_logits=False (with
        targets) returns (None, loss) and may compute the head and loss in chunks of rows without materialising
        the full logits (loopnn.loss; used where measured to help). Generation with a KV cache: `decode`.
        """
        x = self.body(self.embed(idx), n_loops)
        if targets is not None and not return_logits and use_chunked_loss(self.config.padded_vocab_size, x.device):
            h = self.transformer.ln_f(x)
            return None, chunked_head_loss(h, self.lm_head.weight, targets, self.config.vocab_size)
        logits = self.logits(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return (logits if return_logits else None), loss

    def decode(
        self,
        idx: torch.Tensor,
        cache: KVCache | None,
        n_loops: int | None = None,
        *,
        padding: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Generation: idx (B, T) -> logits (B, T, vocab). With a cache, idx holds only the new tokens and
        cache.length advances by T (every call on one cache must use the same n_loops); without, the whole prefix.

        padding (B, past + T) marks real tokens (1) and left padding (0); positions (B, T) or (T,)
        overrides past..past+T-1 (left-padded rows). last_only: logits (B, 1, vocab) of the last position only
        (a prompt's prefill needs no others; the head is then 1/T of its cost).
        """
        past = cache.length if cache is not None else 0
        x = self.embed(idx, positions, past)
        mask = padding_mask(idx.shape[1], past, padding, idx.device)
        x = self.body(x, n_loops, mask=mask, cache=cache)
        if cache is not None:
            cache.advance(idx.shape[1])
        return self.logits(x[:, -1:] if last_only else x)

    @torch.no_grad()
    def loop_losses(self, idx: torch.Tensor, targets: torch.Tensor, n_loops: int | None = None) -> list[float]:
        """Loss after each loop 1..n_loops: the exit path (coda, ln_f, head) applied to each loop's state.

        Under the stack strategy this reads the states of one pass (a logit lens). Under the layer strategy
        no intermediate state has every block applied n times, so the model is rerun with n loops instead.
        For the stack strategy both give the same numbers.
        """
        n = self._n_loops(n_loops)
        if self.config.loop_strategy == "layer":
            return [self(idx, targets, n_loops=k)[1].item() for k in range(1, n + 1)]
        states: list[torch.Tensor] = []
        inputs: list[torch.Tensor] = []  # e0, the loop region's input: the first loop's x_prev

        def first_input(step: loop.LoopState) -> None:
            if step.n == 0:
                inputs.append(step.x_prev)

        self.body(self.embed(idx), n, loop_states=states, after_loop=first_input)
        losses = []
        for h in states:
            logits = self.logits(self.coda(h, n, inputs[0]))
            losses.append(F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1)).item())
        return losses


def _recording(states: list[torch.Tensor], then: loop.AfterLoop | None) -> loop.AfterLoop:
    """An after_loop hook that appends each loop's state to `states`, then runs `then` (if any)."""

    def hook(step: loop.LoopState) -> torch.Tensor | None:
        states.append(step.x)
        return then(step) if then is not None else None

    return hook
