"""HF GPT-2 run as a looped model with loopnn's weights: the reference `loopnn bench` compares against."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from loopnn import loop
from loopnn.config import ModelConfig
from loopnn.model import LoopGPT


class HFLooped(nn.Module):
    """HF GPT2LMHeadModel run as a looped model: embeddings -> its blocks in loopnn's schedule -> ln_f -> head.

    The blocks are HF's own (`gpt2.transformer.h[i]`), called the same number of times in the same order as
    LoopGPT's (`loop.run`, with the same update rule and gates), so only the block implementation differs.
    """

    def __init__(self, gpt2: nn.Module, cfg: ModelConfig, loop_gate: torch.Tensor | None = None):
        super().__init__()
        self.gpt2, self.config = gpt2, cfg
        self.loop_gate = nn.Parameter(loop_gate.detach().clone()) if loop_gate is not None else None
        self.checkpointing = False  # recompute each block application in backward, as loopnn's train.py does

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, n_loops: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        t = self.gpt2.transformer
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = t.drop(t.wte(idx) + t.wpe(positions))

        def call(i: int, slot: int, h: torch.Tensor, rows=None) -> torch.Tensor:
            if self.checkpointing and torch.is_grad_enabled():
                return checkpoint(t.h[i], h, use_reentrant=False)
            return t.h[i](h)

        inject = (lambda h, e0: h + e0) if self.config.injection == "add" else None
        x = loop.run(self.config, x, n_loops or self.config.n_loops, self.loop_gate, call, inject=inject)
        logits = self.gpt2.lm_head(t.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss


def hf_twin(model: LoopGPT) -> HFLooped:
    """An HFLooped with the same weights as `model` (transformers must be installed)."""
    from loopnn.hf.convert import to_gpt2

    cfg = model.config
    plain_add = cfg.loop_norm == "none" and cfg.injection_scale == 1.0 and not cfg.coda_injection
    if cfg.injection == "concat" or cfg.loop_embedding or not plain_add:
        raise ValueError(
            "the HF twin runs injection 'none' or 'add' (scale 1, no loop norm or coda injection) without a loop "
            "embedding (HF blocks only)"
        )
    one = LoopGPT(dataclasses.replace(cfg, n_loops=1, loop_rule="repeat", gate_init=None, residual_scale="none"))
    state = {k: v for k, v in model.state_dict().items() if k != "loop_gate"}
    # residual_scale: x + s * proj(a) = x + (s * proj)(a), so the looped blocks' output projections carry s
    for i, block in enumerate(model.transformer.h):  # the model marks its looped blocks with their scale
        for name in ("attn.c_proj", "mlp.c_proj"):
            for kind in ("weight", "bias"):
                key = f"transformer.h.{i}.{name}.{kind}"
                if key in state and block.branch_scale != 1.0:
                    state[key] = state[key] * block.branch_scale
    one.load_state_dict(state, strict=False)
    gpt2 = to_gpt2(one).to(next(model.parameters()).device)
    gpt2.generation_config.pad_token_id = 0
    return HFLooped(gpt2, model.config, model.loop_gate)
