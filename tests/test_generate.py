"""Generation: cached == uncached, padded batch == each prompt alone, sampling options, streaming, errors."""

import pytest
import torch

from loopnn import LoopGPT, LoopnnError, ModelConfig, preset
from loopnn.generate import AdaptiveConfig, Decoder, generate, left_pad, sample, stream
from loopnn.kvcache import positions_from_padding


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models decode faster on one thread; two threads on a busy 2-core machine mostly spin."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


RULES = ["repeat", "residual", "gated", "gated_residual"]
PROMPTS = [[5, 17, 3, 99, 42, 7], [200, 1], [9, 9, 9, 31]]


def make_model(seed: int = 0, **overrides) -> LoopGPT:
    torch.manual_seed(seed)
    model = LoopGPT(ModelConfig(**dict(preset("debug"), **overrides))).eval()
    if model.loop_gate is not None:  # random gates, so the gated rules differ from their initial special case
        with torch.no_grad():
            model.loop_gate.uniform_(0.2, 1.5)
    return model


def decode_logits(model, prompts, steps, **kw) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Greedy decoding through Decoder, keeping every step's logits."""
    dec = Decoder(model, prompts, steps, **kw)
    logits = dec.prefill()
    seen, tokens = [logits], []
    for _ in range(steps - 1):
        token = logits.argmax(-1)
        tokens.append(token.tolist())
        logits = dec.step(token)
        seen.append(logits)
    return seen, tokens


REGIONS = [dict(), dict(n_layer=4, loop_start=1, loop_end=3)]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("strategy", ["stack", "layer"])
@pytest.mark.parametrize("region", REGIONS, ids=["whole-stack", "prelude-coda"])
def test_cached_equals_uncached(rule, strategy, region):
    model = make_model(loop_rule=rule, loop_strategy=strategy, **region)
    cached, tok_c = decode_logits(model, PROMPTS[:1], 12)
    plain, tok_p = decode_logits(model, PROMPTS[:1], 12, use_cache=False)
    assert tok_c == tok_p
    for a, b in zip(cached, plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert generate(model, PROMPTS, 10, temperature=0) == generate(model, PROMPTS, 10, temperature=0, use_cache=False)


@pytest.mark.parametrize("n_loops", [1, 4])
def test_cached_equals_uncached_other_loop_counts(n_loops):
    model = make_model(loop_rule="gated", n_layer=4, loop_start=1, loop_end=3)
    cached, _ = decode_logits(model, PROMPTS[:1], 8, n_loops=n_loops)
    plain, _ = decode_logits(model, PROMPTS[:1], 8, n_loops=n_loops, use_cache=False)
    for a, b in zip(cached, plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # and the prefill matches a plain forward pass at that loop count
    ref, _ = model(torch.tensor(PROMPTS[:1]), n_loops=n_loops)
    torch.testing.assert_close(cached[0], ref[:, -1], atol=1e-5, rtol=1e-5)


def test_n_loops_changes_output():
    model = make_model(loop_rule="residual")
    idx = torch.tensor(PROMPTS[:1])
    for n in (1, 2, 5):
        first, _ = decode_logits(model, PROMPTS[:1], 1, n_loops=n)
        torch.testing.assert_close(first[0], model(idx, n_loops=n)[0][:, -1], atol=1e-5, rtol=1e-5)
        assert generate(model, PROMPTS[:1], 1, temperature=0, n_loops=n)[0][0] == first[0].argmax().item()
    assert not torch.allclose(model(idx, n_loops=1)[0], model(idx, n_loops=5)[0])


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("strategy", ["stack", "layer"])
def test_padded_batch_equals_single(use_cache, strategy):
    model = make_model(loop_rule="gated_residual", loop_strategy=strategy, n_layer=4, loop_start=1, loop_end=3)
    batch, tok_b = decode_logits(model, PROMPTS, 10, use_cache=use_cache)
    for row, prompt in enumerate(PROMPTS):
        alone, tok_a = decode_logits(model, [prompt], 10, use_cache=use_cache)
        assert [t[row] for t in tok_b] == [t[0] for t in tok_a]
        for a, b in zip(alone, batch):
            torch.testing.assert_close(b[row : row + 1], a, atol=1e-5, rtol=1e-5)
    assert generate(model, PROMPTS, 10, temperature=0) == [generate(model, [p], 10, temperature=0)[0] for p in PROMPTS]


def test_left_pad_and_positions():
    idx, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert idx.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert positions_from_padding(mask).tolist() == [[0, 1, 2], [0, 0, 0]]


def test_seed_repeatable_and_sampling_options():
    model = make_model()
    a = generate(model, PROMPTS, 12, temperature=1.0, seed=123)
    b = generate(model, PROMPTS, 12, temperature=1.0, seed=123)
    c = generate(model, PROMPTS, 12, temperature=1.0, seed=124)
    assert a == b and a != c
    greedy = generate(model, PROMPTS, 12, temperature=0)
    assert generate(model, PROMPTS, 12, temperature=0.7, top_k=1, seed=5) == greedy
    assert generate(model, PROMPTS, 12, temperature=0.7, top_p=1e-6, seed=5) == greedy
    assert all(len(o) == 12 for o in a)


def test_sample_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(500, 1)
    g = torch.Generator().manual_seed(0)
    top2 = sample(logits, 1.0, top_k=2, generator=g)
    assert set(top2.tolist()) == {2, 3}
    # probabilities ~ [.03, .09, .24, .64]: top_p 0.8 keeps {3, 2}, top_p 0.5 keeps {3}
    assert set(sample(logits, 1.0, top_p=0.8, generator=g).tolist()) == {2, 3}
    assert set(sample(logits, 1.0, top_p=0.5, generator=g).tolist()) == {3}
    assert sample(logits[:2], 0.0).tolist() == [3, 3]


def test_eos_stops_rows():
    model = make_model()
    greedy = generate(model, PROMPTS, 12, temperature=0)
    eos = greedy[0][3]
    out = generate(model, PROMPTS, 12, temperature=0, eos_id=eos)
    for full, cut in zip(greedy, out):
        expect = full[: full.index(eos) + 1] if eos in full else full
        assert cut == expect


def test_stream_and_callback():
    model = make_model()
    steps = list(stream(model, PROMPTS, 6, temperature=0))
    assert len(steps) == 6 and all(len(s) == len(PROMPTS) for s in steps)
    seen = []
    out = generate(model, PROMPTS, 6, temperature=0, on_token=lambda row, tok: seen.append((row, tok)))
    assert out == [[s[row] for s in steps] for row in range(len(PROMPTS))]
    assert seen == [(row, s[row]) for s in steps for row in range(len(PROMPTS))]
    assert generate(model, PROMPTS, 0) == [[], [], []]


def test_stats_fixed_loops():
    from loopnn.generate import DecodeStats

    model = make_model(n_layer=4, loop_start=1, loop_end=3)
    stats = DecodeStats()
    generate(model, PROMPTS, 5, temperature=0, stats=stats)
    B = len(PROMPTS)
    assert stats.tokens == B * 4 and stats.prefill_tokens == B * 6
    assert stats.mean_loops == model.config.n_loops
    assert stats.block_applications == stats.tokens * model.config.effective_depth()


def test_errors():
    model = make_model()
    with pytest.raises(LoopnnError, match="block_size"):
        generate(model, PROMPTS, model.config.block_size)
    with pytest.raises(LoopnnError, match="at least one token"):
        generate(model, [[]], 3)
    with pytest.raises(LoopnnError, match="vocabulary"):
        generate(model, [[10_000]], 3)
    with pytest.raises(LoopnnError, match="temperature"):
        generate(model, PROMPTS, 3, temperature=-1)
    with pytest.raises(LoopnnError, match="stack"):
        generate(make_model(loop_strategy="layer"), PROMPTS, 3, adaptive=AdaptiveConfig())
    with pytest.raises(LoopnnError, match="use_cache"):
        generate(model, PROMPTS, 3, adaptive=AdaptiveConfig(), use_cache=False)


def test_non_finite_logits_are_a_clear_error():
    with pytest.raises(LoopnnError, match="diverged"):
        sample(torch.tensor([[0.0, float("nan")]]), temperature=1.0)


def test_prefill_computes_the_head_for_the_last_position_only():
    """decode(last_only=True) is decode()[:, -1:] (padded batch too), and the prefill counts one head per row."""
    from loopnn.flops import block_forward_flops, head_forward_flops
    from loopnn.generate import DecodeStats
    from loopnn.kvcache import KVCache

    model = make_model(n_layer=4, loop_start=1, loop_end=3)
    idx, mask = left_pad(PROMPTS)
    positions = positions_from_padding(mask)
    full = model.decode(idx, KVCache(8), padding=mask, positions=positions)
    last = model.decode(idx, KVCache(8), padding=mask, positions=positions, last_only=True)
    assert last.shape == (len(PROMPTS), 1, full.shape[-1])
    torch.testing.assert_close(last, full[:, -1:], atol=1e-5, rtol=1e-5)
    counted = DecodeStats()
    Decoder(model, PROMPTS, 2, stats=counted).prefill()
    cfg = model.config
    body = sum(cfg.effective_depth() * block_forward_flops(cfg, t + 1) for t in range(6))
    assert counted.prefill_flops == len(PROMPTS) * (body + head_forward_flops(cfg))
