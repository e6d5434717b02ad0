"""Output head + cross-entropy in chunks of rows: `chunked_head_loss(h, weight, targets, vocab_size)`.

The plain path materialises (B*T, vocab) fp32 logits, keeps them for backward and builds a same-sized softmax
gradient: at GPT-2's vocab that is the largest tensor of the step. Here each chunk of rows computes its logits,
its loss and, at once, its share of the gradients w.r.t. the hidden states and the head weight, in two
(rows, vocab) fp32 buffers that every chunk reuses (logits and probabilities; about 400 MB at GPT-2's vocab and
1024 rows) instead of (B*T, vocab) tensors. Each chunk makes one softmax pass, and on CPU the loss is read off
the softmax at the target, so there this is faster than the plain path at every vocab measured (it also skips
the plain path's (N, vocab) zero-filled gradient and its separate log-softmax backward). Backward only scales
the stored gradients by the incoming scalar (the loss is a scalar, so this is exact). `LoopGPT.forward(...,
return_logits=False)` uses it where it is measured to help (docs/benchmarks.md, "Training").
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

IGNORE_INDEX = -1  # as LoopGPT.forward's plain path


# Buffers kept from one call to the next (per thread), up to this many bytes: a training step's fresh
# multi-MB logits and probabilities cost page faults on CPU each step (3-5% of a demo step in an in-process A/B).
KEEP_BUFFER_BYTES = 64 << 20
_kept = threading.local()


def _buffers(rows: int, vocab_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Two (rows, vocab_size) fp32 buffers, every chunk's logits and probabilities."""
    key = (rows, vocab_size, device)
    held = getattr(_kept, "buffers", None)
    if held is not None and held[0] == key:
        return held[1]
    with torch.inference_mode(False):  # plain tensors: one made under inference mode refuses later training writes
        pair = tuple(torch.empty(rows, vocab_size, dtype=torch.float32, device=device) for _ in range(2))
    _kept.buffers = (key, pair) if 2 * rows * vocab_size * 4 <= KEEP_BUFFER_BYTES else None
    return pair


class _ChunkedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, vocab_size: int, chunk_rows: int):  # h (N, C), weight (Vp, C), targets (N,)
        w = weight[:vocab_size]  # padded rows never take probability mass, and get no gradient
        w32 = w.float()  # the gradient matmuls' fp32 operand, converted once (the same tensor when w is fp32)
        wt = w.t()
        valid = targets != IGNORE_INDEX
        n_valid = valid.sum().clamp_min(1).to(torch.float32)
        # d(mean CE)/d logits = (softmax - onehot) * scale, scale = 1 / n_valid on valid rows and 0 on ignored
        # ones. The scale is applied to the (n, C) factors of the two gradient matmuls, not to the (n, V) probs.
        scale = valid.to(torch.float32) / n_valid
        safe = targets.clamp_min(0)
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_h = torch.empty(h.shape, dtype=torch.float32, device=h.device) if need_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        rows = min(chunk_rows, h.shape[0])
        on_cpu, autocast = h.device.type == "cpu", torch.is_autocast_enabled(h.device.type)
        logits_buf, probs_buf = _buffers(rows, vocab_size, h.device)
        for start in range(0, h.shape[0], chunk_rows):
            hc = h[start : start + chunk_rows]
            n = hc.shape[0]
            tc, sc, vc = safe[start : start + n], scale[start : start + n], valid[start : start + n]
            if autocast or hc.dtype != torch.float32 or w.dtype != torch.float32:
                logits = logits_buf[:n].copy_(hc @ wt.to(hc.dtype))  # autocast does not apply to mm(out=)
            else:
                logits = torch.mm(hc, wt, out=logits_buf[:n])
            probs = torch.ops.aten._softmax.out(logits, -1, False, out=probs_buf[:n])  # one fused pass
            if on_cpu:
                # -log softmax at the target is the loss; where it underflows (p < 1e-30, loss > 69) take
                # logsumexp - logit instead, so the loss stays exact for confidently wrong rows.
                p_t = probs.gather(1, tc[:, None])[:, 0]
                nll = -torch.log(p_t)
                tiny = p_t < 1e-30
                if bool(tiny.any()):
                    exact = torch.logsumexp(logits[tiny], dim=-1) - logits[tiny].gather(1, tc[tiny][:, None])[:, 0]
                    nll = nll.masked_scatter(tiny, exact)
            else:  # an accelerator: one more pass instead of a host sync per chunk
                nll = torch.logsumexp(logits, dim=-1) - logits.gather(1, tc[:, None])[:, 0]
            total += torch.where(vc, nll, 0.0).sum()
            if need_grad:
                probs[torch.arange(n, device=tc.device), tc] -= 1.0
                grad_h[start : start + n] = (probs @ w32) * sc[:, None]
                grad_w[:vocab_size].addmm_(probs.t(), hc.float() * sc[:, None])
        if need_grad:
            ctx.save_for_backward(grad_h.to(h.dtype), grad_w.to(weight.dtype))
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


# Where the chunked path is used by LoopGPT.forward(return_logits=False), by padded vocab size (a device type
# missing here never uses it). On CPU it is faster than the plain path at every vocab measured (256 to 50,257;
# docs/benchmarks.md, "Issue 13, third round"), so it is always used there. On CUDA it saves the (B*T, vocab)
# logits' memory but its speed there has never been measured, so it stays off until scripts/gpu_check.sh's
# "chunked_loss" figures show where it pays (docs/gpu.md).
CHUNKED_MIN_VOCAB = {"cpu": 0}


def use_chunked_loss(padded_vocab_size: int, device: torch.device) -> bool:
    threshold = CHUNKED_MIN_VOCAB.get(device.type)
    return threshold is not None and padded_vocab_size >= threshold
