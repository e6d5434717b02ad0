"""The paper's mechanism: loop order, update rules, weight sharing, causality, parameter accounting."""

import copy
import itertools

import pytest
import torch

from loopnn import LoopGPT, ModelConfig, preset
from loopnn.config import LOOP_RULES, LOOP_STRATEGIES
from loopnn.errors import LoopnnError

PAPER_ROWS = ("gpt2-124m", "loop-81m", "gpt2-45m", "loop-45m")
REGIONS = [(0, None), (1, 3)]  # whole stack; prelude 1 + looped 2 + coda 1 (with n_layer=4)


def make(rule="repeat", strategy="stack", n_loops=3, region=(0, None), n_layer=4, seed=0, **kw):
    torch.manual_seed(seed)
    base = preset("debug") | dict(n_layer=n_layer, n_loops=n_loops, loop_rule=rule, loop_strategy=strategy)
    cfg = ModelConfig(**(base | dict(loop_start=region[0], loop_end=region[1]) | kw))
    model = LoopGPT(cfg).eval()
    if model.loop_gate is not None:  # random gates so the gated rules are really exercised
        with torch.no_grad():
            model.loop_gate.uniform_(0.2, 1.5)
    return model


def by_hand(model: LoopGPT, idx: torch.Tensor, n_loops: int) -> torch.Tensor:
    """The update rules and strategies written out directly, independent of loop.py."""
    cfg, h = model.config, model.transformer.h
    x = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(idx.shape[1]))
    gate = lambda n: None if model.loop_gate is None else model.loop_gate[min(n, cfg.n_loops - 1)]

    def step(x, fx, n):
        a = gate(n)
        return {
            "repeat": lambda: fx,
            "residual": lambda: x + fx,
            "gated": lambda: x + a * (fx - x),
            "gated_residual": lambda: x + a * fx,
        }[cfg.loop_rule]()

    for i in range(cfg.loop_start):
        x = h[i](x)
    if cfg.loop_strategy == "stack":
        for n in range(n_loops):
            fx = x
            for i in range(cfg.loop_start, cfg.loop_end):
                fx = h[i](fx)
            x = step(x, fx, n)
    else:
        for i in range(cfg.loop_start, cfg.loop_end):
            for n in range(n_loops):
                x = step(x, h[i](x), n)
    for i in range(cfg.loop_end, cfg.n_layer):
        x = h[i](x)
    return model.lm_head(model.transformer.ln_f(x))[..., : cfg.vocab_size]


def test_one_loop_is_plain_gpt2_bit_for_bit():
    model = make("repeat", n_loops=1)
    idx = torch.randint(0, 256, (2, 24))
    x = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(24))
    for block in model.transformer.h:
        x = block(x)
    plain = model.lm_head(model.transformer.ln_f(x))[..., :256]
    logits, _ = model(idx)
    assert torch.equal(logits, plain)
    # A model trained with 6 loops, run with 1, is the same plain stack.
    six = make("repeat", n_loops=6)
    assert torch.equal(six(idx, n_loops=1)[0], plain)


@pytest.mark.parametrize("rule,strategy,region", list(itertools.product(LOOP_RULES, LOOP_STRATEGIES, REGIONS)))
def test_loop_equals_blocks_applied_by_hand(rule, strategy, region):
    model = make(rule, strategy, n_loops=3, region=region)
    idx = torch.randint(0, 256, (2, 16))
    for n in (1, 3, 5):  # trained count, fewer, more (gates beyond the trained loops reuse the last one)
        torch.testing.assert_close(model(idx, n_loops=n)[0], by_hand(model, idx, n), rtol=0, atol=1e-6)


def test_parameters_and_keys_do_not_depend_on_n_loops():
    for rule in ("repeat", "residual"):
        a, b = make(rule, n_loops=1), make(rule, n_loops=7)
        assert a.num_params() == b.num_params()
        assert list(a.state_dict()) == list(b.state_dict())
    # Gated rules add exactly one gate vector per trained loop, and nothing else.
    g1, g7 = make("gated", n_loops=1), make("gated", n_loops=7)
    assert g7.num_params() - g1.num_params() == 6 * g1.config.n_embd
    assert set(g7.state_dict()) == set(g1.state_dict())


def test_each_block_registered_once():
    model = make(n_loops=5)
    assert len(model.transformer.h) == model.config.n_layer
    ptrs = [p.data_ptr() for p in model.parameters()]
    assert len(ptrs) == len(set(ptrs))
    assert model.lm_head.weight is model.transformer.wte.weight


def test_shared_block_gradient_sums_over_loops():
    """Untied copies per loop, summed, must give the same gradient as the shared block."""
    model = make("residual", n_loops=3, region=(1, 3))
    idx = torch.randint(0, 256, (2, 12))
    _, loss = model(idx, idx)
    loss.backward()
    unrolled = copy.deepcopy(model)
    unrolled.zero_grad()
    copies = {(i, n): copy.deepcopy(unrolled.transformer.h[i]) for i in (1, 2) for n in range(3)}
    x = unrolled.transformer.wte(idx) + unrolled.transformer.wpe(torch.arange(12))
    x = unrolled.transformer.h[0](x)
    for n in range(3):
        x = x + copies[(2, n)](copies[(1, n)](x))
    x = unrolled.transformer.h[3](x)
    logits = unrolled.lm_head(unrolled.transformer.ln_f(x))[..., :256]
    torch.nn.functional.cross_entropy(logits.reshape(-1, 256), idx.reshape(-1)).backward()
    for i in (1, 2):
        for name, p in model.transformer.h[i].named_parameters():
            summed = sum(dict(copies[(i, n)].named_parameters())[name].grad for n in range(3))
            torch.testing.assert_close(p.grad, summed, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("strategy", LOOP_STRATEGIES)
def test_causality_with_loops(strategy):
    model = make("gated_residual", strategy, n_loops=4, region=(1, 3))
    idx = torch.randint(0, 256, (1, 20))
    changed = idx.clone()
    changed[0, 10] = (idx[0, 10] + 1) % 256
    a, b = model(idx)[0], model(changed)[0]
    assert torch.equal(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_loop_losses_match_reruns():
    for strategy in LOOP_STRATEGIES:
        model = make("gated", strategy, n_loops=3, region=(1, 3))
        idx = torch.randint(0, 256, (2, 16))
        lens = model.loop_losses(idx, idx)
        rerun = [model(idx, idx, n_loops=n)[1].item() for n in (1, 2, 3)]
        assert lens == pytest.approx(rerun, abs=1e-5)


def test_paper_preset_parameter_counts():
    """Convention (the paper, nanoGPT): count unique parameters, tied head once, position embeddings left out."""
    with torch.device("meta"):  # shapes only: no memory, no init time
        counts = {name: LoopGPT(ModelConfig(**preset(name))).num_params() for name in PAPER_ROWS}
    assert counts["gpt2-124m"] == pytest.approx(124e6, rel=0.01)
    assert counts["loop-81m"] == pytest.approx(81e6, rel=0.01)
    # The 1-layer rows count 45.72M: the paper's "45M" name truncates rather than rounds (1.6% over).
    assert counts["loop-45m"] == counts["gpt2-45m"]
    assert 45e6 <= counts["loop-45m"] < 46e6


def test_sequence_longer_than_block_size_is_a_clear_error(debug_cfg):
    model = LoopGPT(debug_cfg)
    with pytest.raises(LoopnnError, match="exceeds block_size"):
        model(torch.zeros(1, debug_cfg.block_size + 1, dtype=torch.long))
    with pytest.raises(LoopnnError, match="n_loops"):
        model(torch.zeros(1, 4, dtype=torch.long), n_loops=0)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(n_embd=30, n_head=4), "multiple of n_head"),
        (dict(loop_start=2, loop_end=2), "loop range"),
        (dict(loop_end=9), "loop range"),
        (dict(n_loops=0), "n_loops"),
        (dict(loop_rule="twice"), "loop_rule"),
        (dict(loop_strategy="zigzag"), "loop_strategy"),
        (dict(dropout=1.5), "dropout"),
    ],
)
def test_invalid_model_config(kw, match):
    with pytest.raises(LoopnnError, match=match):
        ModelConfig(**(preset("debug") | kw))


def test_unknown_preset():
    with pytest.raises(LoopnnError, match="unknown preset"):
        preset("gpt5")
