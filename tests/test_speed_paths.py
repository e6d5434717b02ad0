"""Speed paths give the plain path's loss and gradients: chunked head+loss, per-block compile (slow)."""

import os

import pytest
import torch

from loopnn import ModelConfig
from loopnn import loss as loss_mod
from loopnn.loss import chunked_head_loss, plain_head_loss
from loopnn.model import LoopGPT


@pytest.mark.parametrize("vocab_size,chunk_rows", [(256, 7), (1000, 64), (50257, 512)])
def test_chunked_head_loss_matches_plain(vocab_size, chunk_rows):
    torch.manual_seed(0)
    padded = (vocab_size + 63) // 64 * 64
    h = torch.randn(3, 40, 16, requires_grad=True)
    w = (0.1 * torch.randn(padded, 16)).requires_grad_()
    targets = torch.randint(0, vocab_size, (3, 40))
    targets[0, :5] = -1  # ignored positions
    ref = plain_head_loss(h, w, targets, vocab_size)
    ref.backward()
    ref_grads = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    out = chunked_head_loss(h, w, targets, vocab_size, chunk_rows=chunk_rows)
    (2.5 * out).backward()  # a non-unit upstream gradient is scaled through
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad, 2.5 * ref_grads[0], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(w.grad, 2.5 * ref_grads[1], rtol=1e-4, atol=1e-7)
    assert w.grad[vocab_size:].abs().sum() == 0  # padded rows never get gradient


def test_chunked_head_loss_without_grad():
    h, w = torch.randn(10, 8), torch.randn(64, 8)
    t = torch.randint(0, 50, (10,))
    with torch.no_grad():
        torch.testing.assert_close(chunked_head_loss(h, w, t, 50, 3), plain_head_loss(h, w, t, 50))


def test_chunked_head_loss_buffers_kept_across_calls_and_modes():
    """The two kept buffers serve every later call: one made under inference mode (an evaluation) still takes
    the writes of a training call, and a call after another of other shapes is not confused by them."""
    torch.manual_seed(0)
    h, w, t = torch.randn(37, 8), torch.randn(64, 8), torch.randint(0, 60, (37,))
    ref = plain_head_loss(h, w, t, 60)
    with torch.inference_mode():
        first = chunked_head_loss(h, w, t, 60, chunk_rows=16)  # makes and keeps (16, 60) buffers
    hg, wg = h.clone().requires_grad_(), w.clone().requires_grad_()
    out = chunked_head_loss(hg, wg, t, 60, chunk_rows=16)  # writes into them, with autograd on
    out.backward()
    other = chunked_head_loss(torch.randn(5, 8), w, t[:5], 50, chunk_rows=16)  # other shapes: new buffers
    again = chunked_head_loss(h, w, t, 60, chunk_rows=16)
    for loss in (first, out, again):
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(other) and torch.isfinite(hg.grad).all() and torch.isfinite(wg.grad).all()


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loop_rule", ["repeat", "gated"])
def test_forward_return_logits_false_matches_default(debug_cfg, monkeypatch, loop_rule):
    """The model path: (None, loss) through the chunked head equals (logits, loss) of the default call."""
    monkeypatch.setitem(loss_mod.CHUNKED_MIN_VOCAB, "cpu", 0)  # force the chunked path at the debug vocab
    cfg = ModelConfig(**{**debug_cfg.__dict__, "loop_rule": loop_rule, "vocab_size": 250})  # padded rows too
    torch.manual_seed(0)
    model = LoopGPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    tgt = torch.randint(0, cfg.vocab_size, (2, 16))
    logits, ref = model(idx, tgt)
    assert logits is not None
    ref.backward()
    ref_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    none, out = model(idx, tgt, return_logits=False)
    assert none is None
    out.backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for name, g in _grads(model).items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_chunked_path_selection():
    # CPU: the fused chunked loss measured faster than the plain one at every vocab from 256 to 50,257
    for vocab in (256, 2048, 50304):
        assert loss_mod.use_chunked_loss(vocab, torch.device("cpu"))
    # off on CUDA and MPS at every vocab until a GPU measurement says where it pays (scripts/gpu_check.sh)
    for vocab in (2048, 50304):
        assert not loss_mod.use_chunked_loss(vocab, torch.device("cuda"))
        assert not loss_mod.use_chunked_loss(vocab, torch.device("mps"))


def test_chunked_head_loss_is_exact_for_confidently_wrong_rows():
    """Where softmax at the target underflows (loss > 69 nats) the loss comes from logsumexp instead of -log(0)."""
    torch.manual_seed(0)
    h = torch.randn(6, 8)
    w = torch.randn(64, 8)
    h[:3] *= 300.0  # logits of +-1e3: the target's probability is 0 in fp32 on most of these rows
    t = torch.randint(0, 64, (6,))
    h.requires_grad_(), w.requires_grad_()
    ref = plain_head_loss(h, w, t, 64)
    ref.backward()
    ref_grads = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    out = chunked_head_loss(h, w, t, 64, chunk_rows=4)
    out.backward()
    assert torch.isfinite(out) and out.item() > 69 / 6
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad, ref_grads[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad, ref_grads[1], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("LOOPNN_SLOW") != "1",
    reason="torch.compile on CPU takes 35-50 s per distinct graph; set LOOPNN_SLOW=1 to run",
)
def test_compiled_blocks_match_eager(debug_cfg):
    torch.manual_seed(0)
    eager = LoopGPT(debug_cfg)
    compiled = LoopGPT(debug_cfg)
    compiled.load_state_dict(eager.state_dict())
    for block in compiled.transformer.h:
        block.compile()  # as train.py does with --compile
    idx = torch.randint(0, debug_cfg.vocab_size, (2, 32))
    tgt = torch.randint(0, debug_cfg.vocab_size, (2, 32))
    _, ref = eager(idx, tgt)
    ref.backward()
    _, out = compiled(idx, tgt)
    out.backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    ref_grads = _grads(eager)
    for name, g in _grads(compiled).items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-3, atol=1e-5, msg=name)


def test_scaled_branch_add_matches_the_formula(debug_cfg):
    """Block with a residual scale s (one add-with-alpha kernel) equals x + s*attn(ln_1 x), then + s*mlp(ln_2 x)."""
    cfg = ModelConfig(**{**debug_cfg.__dict__, "n_loops": 3, "residual_scale": "inverse_sqrt"})
    torch.manual_seed(0)
    block = LoopGPT(cfg).transformer.h[0]
    s = block.branch_scale
    assert s == pytest.approx(3**-0.5)
    x = torch.randn(2, 16, cfg.n_embd, requires_grad=True)
    out = block(x)
    h = x + s * block.attn(block.ln_1(x), None, None)
    ref = h + s * block.mlp(block.ln_2(h))
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    (g_out,) = torch.autograd.grad(out.square().sum(), x)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    torch.testing.assert_close(g_out, g_ref, rtol=1e-5, atol=1e-6)


def test_unpadded_prefill_takes_the_plain_forward(debug_cfg):
    """A single unpadded prompt: Decoder.prefill's logits are those of the plain forward, and decoding on from
    the cache it filled gives the uncached logits."""
    from loopnn.generate import Decoder

    torch.manual_seed(0)
    model = LoopGPT(ModelConfig(**{**debug_cfg.__dict__, "residual_scale": "inverse"})).eval()
    prompt = torch.randint(0, debug_cfg.vocab_size, (9,)).tolist()
    dec = Decoder(model, [prompt], 4)
    with torch.no_grad():
        logits = dec.prefill()
        ref, _ = model(torch.tensor([prompt]))
        torch.testing.assert_close(logits, ref[:, -1], rtol=1e-5, atol=1e-5)
        nxt = dec.step(torch.tensor([3]))
        ref2, _ = model(torch.tensor([prompt + [3]]))
        torch.testing.assert_close(nxt, ref2[:, -1], rtol=1e-5, atol=1e-5)
