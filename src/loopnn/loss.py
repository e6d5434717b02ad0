"""Output head + cross-entropy in chunks of rows: `chunked_head_loss(h, weight, targets, vocab_size)`.

The plain path materialises (B*T, vocab) fp32 logits, keeps them for backward and builds a same-sized softmax
gradient: at GPT-2's vocab that is the largest tensor of the step. Here each chunk of rows computes its logits,
its loss and, at once, its share of the gradients w.r.t. the hidden states and the head weight; the logits are
freed before the next chunk, so peak memory holds one chunk of logits. Backward only scales the stored
gradients by the incoming scalar (the loss is a scalar, so this is exact). `LoopGPT.forward(...,
return_logits=False)` uses it where it is measured to help (docs/benchmarks.md, "Training").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -1  # as LoopGPT.forward's plain path


class _ChunkedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, vocab_size: int, chunk_rows: int):  # h (N, C), weight (Vp, C), targets (N,)
        w = weight[:vocab_size]  # padded rows never take probability mass, and get no gradient
        valid = targets != IGNORE_INDEX
        n_valid = valid.sum().clamp_min(1).to(torch.float32)
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk_rows):
            hc, tc = h[start : start + chunk_rows], targets[start : start + chunk_rows]
            vc = (tc != IGNORE_INDEX).to(torch.float32)
            logits = (hc @ w.to(hc.dtype).t()).float()  # (n, V)
            lse = torch.logsumexp(logits, dim=-1)  # (n,)
            safe = tc.clamp_min(0)
            picked = logits.gather(1, safe[:, None])[:, 0]
            total += ((lse - picked) * vc).sum()
            if need_grad:
                # d(mean CE)/d logits = (softmax - onehot) / n_valid on valid rows; reuse the logits buffer
                probs = logits.sub_(lse[:, None]).exp_()
                probs[torch.arange(len(tc), device=tc.device), safe] -= 1.0
                probs.mul_((vc / n_valid)[:, None])
                grad_h[start : start + chunk_rows] = (probs @ w.float()).to(h.dtype)
                grad_w[:vocab_size].addmm_(probs.t(), hc.float())
            del logits
        if need_grad:
            ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss.to(grad_h.dtype), grad_w * grad_loss.to(grad_w.dtype), None, None, None


def chunked_head_loss(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int, chunk_rows: int = 1024
) -> torch.Tensor:
    """Mean cross-entropy of logits h @ weight[:vocab_size].T against targets (-1 ignored), in row chunks.

    h (..., C) final hidden states after ln_f, weight (Vp, C) the (tied) head, targets (...) token ids.
    Equal to F.cross_entropy(h @ weight[:vocab_size].T, targets, ignore_index=-1) in value and gradients.
    """
    return _ChunkedHeadLoss.apply(h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1), vocab_size, chunk_rows)


def plain_head_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The reference: full fp32 logits, then F.cross_entropy."""
    logits = F.linear(h, weight)[..., :vocab_size]
    return F.cross_entropy(logits.reshape(-1, vocab_size).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX)


# Where the chunked path is used by LoopGPT.forward(return_logits=False), by padded vocab size. On CUDA it is
# a memory saving at any large vocab; on CPU it is chosen only where it measured faster (docs/benchmarks.md).
CHUNKED_MIN_VOCAB = {"cuda": 8192, "cpu": 32768}


def use_chunked_loss(padded_vocab_size: int, device: torch.device) -> bool:
    threshold = CHUNKED_MIN_VOCAB.get(device.type)
    return threshold is not None and padded_vocab_size >= threshold
