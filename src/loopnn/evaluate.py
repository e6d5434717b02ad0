"""Evaluation on the fixed validation stream: loss, perplexity, bits per byte, loss per loop, loss vs loops.

All functions take a model and a `TokenData`; the stream is the same ordered windows every call, so numbers
from different runs and loop counts are comparable. Bits per byte uses the validation split's mean UTF-8 bytes
per token (exact when the whole split is evaluated, an average otherwise).
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from loopnn.model import LoopGPT


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if device.type == "cuda" and dtype == torch.bfloat16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _batches(data, batch_size: int, seq_len: int, max_tokens: int | None, device: torch.device):
    for x, y in data.val_batches(batch_size, seq_len, max_tokens):
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


@torch.no_grad()
def evaluate(
    model: LoopGPT,
    data,
    batch_size: int = 8,
    seq_len: int | None = None,
    max_tokens: int | None = None,
    n_loops: int | None = None,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Mean cross-entropy (nats/token) over the validation stream, with perplexity and bits/byte."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    seq_len = seq_len or model.config.block_size
    total, count = 0.0, 0
    for x, y in _batches(data, batch_size, seq_len, max_tokens, device):
        with _autocast(device, amp_dtype):
            _, loss = model(x, y, n_loops=n_loops)
        total += loss.item() * y.numel()
        count += y.numel()
    model.train(was_training)
    return summarize(total / max(count, 1), count, data.val_bytes_per_token)


def summarize(loss: float, tokens: int, bytes_per_token: float) -> dict[str, float]:
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "bits_per_byte": loss / math.log(2) / bytes_per_token,
        "tokens": tokens,
    }


@torch.no_grad()
def per_loop_losses(
    model: LoopGPT,
    data,
    batch_size: int = 8,
    seq_len: int | None = None,
    max_tokens: int | None = None,
    n_loops: int | None = None,
) -> list[float]:
    """Validation loss after each loop 1..n (logit lens: exit path applied to each loop's state)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    seq_len = seq_len or model.config.block_size
    sums: list[float] | None = None
    count = 0
    for x, y in _batches(data, batch_size, seq_len, max_tokens, device):
        losses = model.loop_losses(x, y, n_loops)
        sums = [a + b * y.numel() for a, b in zip(sums or [0.0] * len(losses), losses)]
        count += y.numel()
    model.train(was_training)
    return [s / max(count, 1) for s in (sums or [])]


def loss_vs_loops(
    model: LoopGPT,
    data,
    loop_counts: list[int],
    batch_size: int = 8,
    seq_len: int | None = None,
    max_tokens: int | None = None,
) -> dict[int, float]:
    """Validation loss for each test-time loop count (fewer and more than trained)."""
    return {n: evaluate(model, data, batch_size, seq_len, max_tokens, n_loops=n)["loss"] for n in loop_counts}
