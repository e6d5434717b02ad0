"""FLOP accounting that counts every loop, forward and backward.

Convention (the one nanoGPT and PaLM use for MFU): a matmul with P weights costs 2P FLOPs per token forward,
attention scores and the weighted sum cost 2 * 2 * C * T per token per block application (T = context length,
causal masking not discounted), backward costs twice the forward, embeddings and norms are not counted.
A looped model pays every block application: the blocks of the loop region run n_loops times in the forward
pass and again n_loops times in the backward pass. Loops run without gradient (truncated backprop) pay the
forward only. Anchors that count K forward loops but a single backward under-count by about 2x.
"""

from __future__ import annotations

from collections import Counter

from loopnn.config import ModelConfig, TrainConfig


def block_forward_flops(cfg: ModelConfig, seq_len: int) -> int:
    """Forward FLOPs per token of one block application."""
    C = cfg.n_embd
    matmul = 2 * 12 * C * C  # c_attn 3C^2 + attn.c_proj C^2 + c_fc 4C^2 + mlp.c_proj 4C^2
    attention = 2 * 2 * C * seq_len  # q @ k^T and att @ v
    return matmul + attention


def head_forward_flops(cfg: ModelConfig) -> int:
    """Forward FLOPs per token of the output head (padded vocab: the matmul really is that wide)."""
    return 2 * cfg.n_embd * cfg.padded_vocab_size


def forward_flops_per_token(cfg: ModelConfig, seq_len: int, n_loops: int | None = None) -> int:
    return cfg.effective_depth(n_loops) * block_forward_flops(cfg, seq_len) + head_forward_flops(cfg)


def training_flops_per_token(
    cfg: ModelConfig,
    seq_len: int,
    n_loops: int | None = None,
    backprop_loops: int | None = None,
) -> dict[str, int]:
    """Forward and backward FLOPs per trained token.

    backprop_loops: loops that carry gradient (TrainConfig.backprop_loops, truncated backprop); None means all
    of them.
    """
    n = cfg.n_loops if n_loops is None else n_loops
    g = n if backprop_loops is None else min(backprop_loops, n)
    fwd = forward_flops_per_token(cfg, seq_len, n)
    grad_depth = cfg.n_layer - cfg.n_loop_blocks + g * cfg.n_loop_blocks
    bwd = 2 * (grad_depth * block_forward_flops(cfg, seq_len) + head_forward_flops(cfg))
    return {"forward": fwd, "backward": bwd, "total": fwd + bwd}


def mean_training_flops(model_cfg: ModelConfig, cfg: TrainConfig, seq_len: int) -> dict[str, int]:
    """Training FLOPs per token averaged over the run's steps: exact for a fixed count under loop_delay /
    loop_ramp / loop_grow_at (steps with fewer loops cost less), at the mean count for sampled loops."""
    if cfg.loop_sampling != "fixed" or (cfg.loop_delay == 0 and cfg.loop_ramp == 0 and cfg.loop_grow_at == 0):
        return training_flops_per_token(model_cfg, seq_len, backprop_loops=cfg.backprop_loops)
    steps_at = Counter(cfg.scheduled_loops(model_cfg.n_loops, s) for s in range(cfg.max_steps))  # loops -> steps
    flops = {n: training_flops_per_token(model_cfg, seq_len, n, cfg.backprop_loops) for n in steps_at}
    total = {k: sum(flops[n][k] * c for n, c in steps_at.items()) for k in ("forward", "backward", "total")}
    return {k: round(v / cfg.max_steps) for k, v in total.items()}
