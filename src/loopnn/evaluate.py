"""Evaluation on the fixed validation stream: loss, perplexity, bits per byte, loss per loop, loss vs loops.

All functions take a model and a `TokenData`; the stream is the same ordered windows every call, so numbers
from different runs and loop counts are comparable. Bits per byte uses the validation split's mean UTF-8 bytes
per token (exact when the whole split is evaluated, an average otherwise).
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F

from loopnn import loop
from loopnn.model import LoopGPT


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if device.type in ("cuda", "cpu", "mps") and dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(device.type, dtype=dtype)
    return nullcontext()


@contextmanager
def eval_mode(model: torch.nn.Module):
    """model.eval() for the block, then the previous mode again, also when the block raises."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


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
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, float]:
    """Mean cross-entropy (nats/token) over the validation stream, with perplexity and bits/byte.

    With world_size > 1 (an initialised process group) rank r evaluates batches r, r + world_size, ... and the
    sums of loss * tokens and tokens are all-reduced, so every rank returns the whole stream's numbers. Every
    rank runs the same number of forward passes (a rank short of a batch reruns one with weight 0): FSDP
    gathers parameters collectively in each forward.
    """
    device = next(model.parameters()).device
    seq_len = seq_len or model.config.block_size
    # Sums stay on the device (float64): one host sync per evaluation, not one per batch.
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    if world_size > 1:
        batches = list(data.val_batches(batch_size, seq_len, max_tokens))
        rounds = -(-len(batches) // world_size)
        mine = [
            (batches[i], 1.0) if i < len(batches) else (batches[0], 0.0)
            for i in range(rank, rounds * world_size, world_size)
        ]
    else:
        mine = ((b, 1.0) for b in data.val_batches(batch_size, seq_len, max_tokens))
    with eval_mode(model):
        for (x, y), weight in mine:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with _autocast(device, amp_dtype):
                _, loss = model(x, y, n_loops=n_loops)
            total += weight * loss.double() * y.numel()
            count += int(weight) * y.numel()
    if world_size > 1:
        import torch.distributed as tdist

        sums = torch.stack([total, torch.tensor(float(count), dtype=torch.float64, device=device)])
        tdist.all_reduce(sums)
        total, count = sums[0], int(sums[1].item())
    return summarize(total.item() / max(count, 1), count, data.val_bytes_per_token)


@torch.no_grad()
def loop_telemetry(
    model: LoopGPT, x: torch.Tensor, n_loops: int | None = None, targets: torch.Tensor | None = None
) -> dict[str, list[float]]:
    """Per-loop diagnostics on one batch x (B, T): state norm ||x_n||, relative update ||x_n - x_{n-1}|| /
    ||x_{n-1}|| (x_0 = the loop region's input), the mean gate value a_n (gated rules) and, given targets (B, T),
    the loss after each loop (the logit lens of LoopGPT.loop_losses). Norms are the mean over positions of the
    per-position L2 norm over C. Stack strategy only (empty lists otherwise)."""
    cfg = model.config
    out: dict[str, list[float]] = {"state_norm": [], "update_norm": [], "gate_mean": []}
    if targets is not None:
        out["loop_loss"] = []
    if cfg.loop_strategy != "stack":
        return out
    fsdp = hasattr(model, "unshard")  # FSDP2: gather the root's own parameters (embeddings, gates) for body()
    if fsdp:
        model.unshard()
    states: list[torch.Tensor] = []  # x_0 (the loop region's input), x_1, ..., x_n

    def record(step: loop.LoopState) -> None:
        if step.n == 0:
            states.append(step.x_prev)
        states.append(step.x)

    with eval_mode(model):  # no dropout in the embedding or the blocks
        model.body(model.embed(x), n_loops, after_loop=record)
    for prev, state in zip(states, states[1:]):
        out["state_norm"].append(state.norm(dim=-1).mean().item())
        out["update_norm"].append(((state - prev).norm(dim=-1) / prev.norm(dim=-1).clamp_min(1e-12)).mean().item())
    with eval_mode(model):
        for state in states[1:] if targets is not None else []:
            logits = model.logits(model.coda(state, n_loops, states[0]))
            out["loop_loss"].append(F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()).item())
    if model.loop_gate is not None:
        out["gate_mean"] = [loop.gate_for(model.loop_gate, n).float().mean().item() for n in range(len(states) - 1)]
    if fsdp:
        model.reshard()
    return out


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
    device = next(model.parameters()).device
    seq_len = seq_len or model.config.block_size
    sums: list[float] | None = None
    count = 0
    with eval_mode(model):
        for x, y in _batches(data, batch_size, seq_len, max_tokens, device):
            losses = model.loop_losses(x, y, n_loops)
            sums = [a + b * y.numel() for a, b in zip(sums or [0.0] * len(losses), losses)]
            count += y.numel()
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


def copy_mask(idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the positions in-context copying predicts. Position t qualifies when its token idx[t] occurred
    earlier in the window, at j < t, and the token that followed it there, idx[j + 1], is the target of t (the
    pattern an induction circuit completes: two attention steps, which one block cannot chain and two can)."""
    B, T = idx.shape
    earlier = idx[:, None, :-1] == idx[:, :, None]  # (B, t, j): idx[j] == idx[t], j < T - 1
    follows = idx[:, None, 1:] == targets[:, :, None]  # (B, t, j): idx[j + 1] == targets[t]
    before = torch.ones(T, T - 1, dtype=torch.bool, device=idx.device).tril(-1)  # j < t
    return (earlier & follows & before).any(-1)


def hops_answer_mask(idx: torch.Tensor, targets: torch.Tensor, colon: int = ord(":"), queries: int = 4) -> torch.Tensor:
    """(B, T) bool: the positions whose target is an answer of the synthetic `hops` corpus (loopnn.data.synthetic,
    bytes tokenizer): after a line's `:`, targets 2, 4, ... are f(f(x)) for the name x before them."""
    T = idx.shape[1]
    at = torch.arange(T, device=idx.device).expand_as(idx)
    last = torch.cummax(torch.where(idx == colon, at, torch.full_like(at, -1)), dim=1).values  # last `:` <= t
    offset = at - last
    return (last >= 0) & (offset % 2 == 1) & (offset < 2 * queries)


def copies_mask(
    idx: torch.Tensor, targets: torch.Tensor, bar: int = ord("|"), newline: int = ord("\n")
) -> torch.Tensor:
    """(B, T) bool: the positions whose target is a symbol of a repeat on a line of the synthetic `copies` corpus
    (loopnn.data.synthetic, bytes tokenizer): the line's last `|` or `\\n` at or before t is a `|`, the line starts
    inside the window (a line cut by the window's start has lost its first copy) and the target is not the line's
    end. Only in-context copying predicts them."""
    T = idx.shape[1]
    at = torch.arange(T, device=idx.device).expand_as(idx)
    none = torch.full_like(at, -1)
    last_bar = torch.cummax(torch.where(idx == bar, at, none), dim=1).values
    last_newline = torch.cummax(torch.where(idx == newline, at, none), dim=1).values
    return (last_bar > last_newline) & (last_newline >= 0) & (targets != newline)


@torch.no_grad()
def split_loss(
    model: LoopGPT,
    data,
    mask_fn=None,
    batch_size: int = 8,
    seq_len: int | None = None,
    max_tokens: int | None = None,
    n_loops: int | None = None,
) -> dict[str, float]:
    """Validation loss split by `mask_fn(idx, targets)` (default copy_mask): on the masked tokens ("copy") and on
    the rest ("other"), with the masked tokens' share."""
    mask_fn = mask_fn or copy_mask
    device = next(model.parameters()).device
    seq_len = seq_len or model.config.block_size
    sums = {True: 0.0, False: 0.0}
    counts = {True: 0, False: 0}
    with eval_mode(model):
        for x, y in _batches(data, batch_size, seq_len, max_tokens, device):
            logits, _ = model(x, n_loops=n_loops)
            losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none")
            mask = mask_fn(x, y).flatten()
            for kind in (True, False):
                sums[kind] += losses[mask == kind].double().sum().item()
                counts[kind] += int((mask == kind).sum())
    total = counts[True] + counts[False]
    return {
        "copy": sums[True] / max(counts[True], 1),
        "other": sums[False] / max(counts[False], 1),
        "copy_share": counts[True] / max(total, 1),
        "tokens": total,
    }


def copy_split(model: LoopGPT, data, **kw) -> dict[str, float]:
    """Validation loss split by copy_mask: on the tokens in-context copying predicts ("copy") and on the rest
    ("other"), with the copy tokens' share. A model that has learned to copy from its context gains on the first;
    the moment it does shows as a jump there while the rest moves smoothly."""
    return split_loss(model, data, copy_mask, **kw)
