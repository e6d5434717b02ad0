"""Adaptive per-token looping: bounds, exactness at the extremes, honest counters, skipped work is skipped."""

import pytest
import torch

from loopnn import LoopGPT, LoopnnError, ModelConfig, preset
from loopnn.adaptive import CRITERIA, AdaptiveConfig, DecodeStats, adaptive_step, prepare_cache
from loopnn.adaptive_eval import evaluate_adaptive
from loopnn.generate import Decoder, generate
from loopnn.kvcache import KVCache

RULES = ["repeat", "residual", "gated", "gated_residual"]
PROMPTS = [[5, 17, 3, 99, 42, 7], [200, 1], [9, 9, 9, 31]]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one thread; two threads on a busy 2-core machine mostly spin."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_model(seed: int = 0, **overrides) -> LoopGPT:
    torch.manual_seed(seed)
    values = dict(preset("debug"), n_layer=4, loop_start=1, loop_end=3, n_loops=3, loop_rule="gated")
    model = LoopGPT(ModelConfig(**dict(values, **overrides))).eval()
    if model.loop_gate is not None:
        with torch.no_grad():
            model.loop_gate.uniform_(0.2, 1.5)
    return model


def batch(seed: int = 1, B: int = 3, T: int = 16):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, T), generator=g), torch.randint(0, 256, (B, T), generator=g)


class BlockRows:
    """Counts the token rows every block really processes (a hook on each block's MLP, which every block
    application runs once on the rows it computes, independent of the module's counters)."""

    def __init__(self, model: LoopGPT):
        self.rows = [0] * len(model.transformer.h)
        self.handles = [
            b.mlp.register_forward_hook(lambda mod, args, out, i=i: self._add(i, args[0]))
            for i, b in enumerate(model.transformer.h)
        ]

    def _add(self, i: int, x: torch.Tensor) -> None:
        self.rows[i] += x.numel() // x.shape[-1]

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("min_loops", [1, 2])
def test_bounds_and_counters(criterion, min_loops, parallel):
    model = make_model()
    cfg = model.config
    L = cfg.n_loop_blocks
    for threshold in (1e-5, 1e-4, 1e-3, 0.3):
        hook = BlockRows(model)
        ad = AdaptiveConfig(criterion=criterion, threshold=threshold, min_loops=min_loops, max_loops=5)
        res = evaluate_adaptive(model, [batch()], ad, compare_fixed=False, parallel=parallel)
        hook.close()
        s = res.stats
        assert set(s.exits) <= set(range(min_loops, 6))
        assert sum(s.exits.values()) == s.tokens == res.tokens == 48
        assert s.loop_iterations == sum(k * c for k, c in s.exits.items())
        assert min_loops <= res.mean_loops <= 5
        # the counter matches the loops it reports, and the blocks really ran exactly that often
        assert s.block_applications == s.tokens * (cfg.n_layer - L) + s.loop_iterations * L
        assert sum(hook.rows) == s.block_applications
        assert hook.rows[cfg.loop_start] == s.loop_iterations  # a looped block runs once per executed loop
        assert hook.rows[0] == hook.rows[-1] == s.tokens  # prelude and coda run once per token


def test_early_exit_skips_work():
    model = make_model()
    ad = AdaptiveConfig(criterion="entropy", threshold=1e-4, max_loops=5)
    hook = BlockRows(model)
    res = evaluate_adaptive(model, [batch()], ad, compare_fixed=False)
    hook.close()
    assert len(res.stats.exits) > 1  # a real mixture of exit depths
    assert res.mean_loops < 5
    full_depth = res.tokens * model.config.effective_depth(5)
    assert sum(hook.rows) == res.stats.block_applications < full_depth
    assert 0 < res.loop_saving < 1
    compared = evaluate_adaptive(model, [batch()], ad)
    assert compared.executed_flops == res.executed_flops < compared.fixed_flops
    assert compared.loss == res.loss and compared.loss_change != 0


@pytest.mark.parametrize("rule,injection", [(r, "none") for r in RULES] + [("repeat", "add"), ("gated", "concat")])
def test_threshold_zero_is_the_fixed_model(rule, injection):
    model = make_model(loop_rule=rule, injection=injection)
    for criterion in CRITERIA:
        for parallel in (True, False):
            ad = AdaptiveConfig(criterion=criterion, threshold=0.0, max_loops=4)
            res = evaluate_adaptive(model, [batch()], ad, parallel=parallel)
            assert res.mean_loops == 4 and res.stats.exits == {4: 48}
            assert res.loss == pytest.approx(res.fixed_loss, abs=1e-5)
    ad = AdaptiveConfig(threshold=0.0)
    assert generate(model, PROMPTS, 10, temperature=0, adaptive=ad) == generate(model, PROMPTS, 10, temperature=0)
    fixed, adaptive = Decoder(model, PROMPTS, 6, n_loops=5), Decoder(model, PROMPTS, 6, adaptive=ad, n_loops=5)
    a, b = fixed.prefill(), adaptive.prefill()
    for _ in range(5):
        token = a.argmax(-1)
        a, b = fixed.step(token), adaptive.step(token)
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("min_loops", [1, 2, 3])
@pytest.mark.parametrize("loop_end", [3, 4])  # 4: no coda, so the exit check's logits are the output
@pytest.mark.parametrize("injection", ["none", "add"])
def test_everyone_exits_at_min_loops_equals_that_loop_count(min_loops, loop_end, injection):
    """Every token exits after min_loops: with KV sharing that is exactly the min_loops model."""
    model = make_model(loop_rule="gated_residual", loop_end=loop_end, injection=injection)
    x, y = batch()
    ad = AdaptiveConfig(criterion="kl", threshold=1e9, min_loops=min_loops, max_loops=5)
    _, loss = model(x, y, n_loops=min_loops)
    for parallel in (True, False):
        res = evaluate_adaptive(model, [(x, y)], ad, parallel=parallel)
        assert res.stats.exits == {min_loops: 48}
        assert res.loss == pytest.approx(loss.item(), abs=1e-5)


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("injection,loop_end", [("none", 3), ("add", 4), ("concat", 3)])
def test_parallel_evaluation_equals_token_by_token(criterion, injection, loop_end, monkeypatch):
    """Every position at once, loop by loop, gives the decoding path's exits, loss and work counters."""
    import loopnn.adaptive as adaptive_mod

    model = make_model(injection=injection, loop_end=loop_end)
    data = [batch(1), batch(2, B=2, T=9)]
    # Every exit distance the decoding path computes. Float rounding differs between the two orders of work (fp32
    # entropies of about ln(256) = 5.5 and sums over the vocab round at about 1e-6), so a distance within that
    # of the threshold may exit a loop apart on the other path (seen: 1.006e-4 one way, 0.992e-4 the other).
    # The threshold is the first that mixes exit depths with no distance that close to it.
    distance, seen = adaptive_mod._distance, []
    monkeypatch.setattr(adaptive_mod, "_distance", lambda *a: seen.append(d := distance(*a)) or d)
    start = -2.0 if criterion == "hidden" else -4.5  # hidden distances are relative norms, larger
    for threshold in torch.logspace(start, -0.5, round((-0.5 - start) * 20) + 1).tolist():
        ad = AdaptiveConfig(criterion=criterion, threshold=threshold, max_loops=5)
        seen.clear()
        seq = evaluate_adaptive(model, data, ad, parallel=False)
        gap = min(float((d - threshold).abs().min()) for d in seen)
        if len(seq.stats.exits) > 1 and gap > 5e-6 + 1e-3 * threshold:
            break
    else:
        pytest.fail("no threshold mixes exit depths away from float ties")
    par = evaluate_adaptive(model, data, ad, parallel=True)
    assert par.stats.exits == seq.stats.exits
    assert par.stats.head_evaluations == seq.stats.head_evaluations
    assert par.loss == pytest.approx(seq.loss, abs=1e-5)
    L = model.config.n_loop_blocks
    for stats in (par.stats, seq.stats):  # the same accounting on both paths
        assert stats.block_applications == stats.tokens * (model.config.n_layer - L) + stats.loop_iterations * L


def test_parallel_evaluation_in_row_groups_is_the_same(monkeypatch):
    """A batch too large for one (positions, vocab) tensor runs in groups of rows: the same exits and loss."""
    import loopnn.adaptive_eval as adaptive_eval

    model = make_model()
    ad = AdaptiveConfig(criterion="kl", threshold=1e-4, max_loops=5)  # a mixture of depths (see above)
    whole = evaluate_adaptive(model, [batch(1, B=5)], ad, compare_fixed=False)
    monkeypatch.setattr(adaptive_eval, "PARALLEL_LOGITS_BYTES", 2 * 16 * 256 * 4)  # 2 rows of 16 x 256 at a time
    grouped = evaluate_adaptive(model, [batch(1, B=5)], ad, compare_fixed=False)
    assert len(whole.stats.exits) > 1 and grouped.stats.exits == whole.stats.exits
    assert grouped.loss == pytest.approx(whole.loss, abs=1e-6)
    assert grouped.stats.flops == whole.stats.flops


def test_kv_sharing_fills_skipped_loops():
    model = make_model(n_loops=2)
    cfg, L = model.config, model.config.n_loop_blocks
    cache = KVCache(4)
    prepare_cache(model, cache, 2, 4)
    ad = AdaptiveConfig(criterion="hidden", threshold=1e9, min_loops=2, max_loops=4)
    stats = DecodeStats()
    for _ in range(3):
        adaptive_step(model, cache, torch.tensor([[3], [4]]), ad, max_loops=4, stats=stats)
    assert stats.exits == {2: 6}
    for j in range(L):
        last = cache.slot(cfg.loop_start + 1 * L + j)  # loop 2 (index 1): the last one computed
        for m in (2, 3):
            skipped = cache.slot(cfg.loop_start + m * L + j)
            assert torch.equal(skipped.k[:, :, :3], last.k[:, :, :3])
            assert torch.equal(skipped.v[:, :, :3], last.v[:, :, :3])
    assert cache.length == 3


def test_adaptive_padded_batch_equals_single():
    model = make_model()
    ad = AdaptiveConfig(criterion="entropy", threshold=1e-4, max_loops=5)
    stats = DecodeStats()
    together = generate(model, PROMPTS, 10, temperature=0, adaptive=ad, stats=stats)
    assert len(stats.exits) > 1
    assert together == [generate(model, [p], 10, temperature=0, adaptive=ad)[0] for p in PROMPTS]


def test_finished_rows_are_not_computed():
    model = make_model()
    greedy = generate(model, PROMPTS, 8, temperature=0, adaptive=AdaptiveConfig(threshold=0.0))
    eos = greedy[1][0]  # row 1 stops at once
    stats = DecodeStats()
    out = generate(model, PROMPTS, 8, temperature=0, eos_id=eos, adaptive=AdaptiveConfig(threshold=0.0), stats=stats)
    assert out[1] == [eos]
    assert stats.tokens == sum(len(o) for o in out) - sum(1 for o in out if len(o) == 8 or o[-1] == eos)
    assert stats.block_applications == stats.tokens * model.config.effective_depth()


def test_default_is_the_measured_setting():
    """eval, generate and serve take AdaptiveConfig's defaults: kl 0.05, the setting docs/benchmarks.md measures."""
    assert AdaptiveConfig() == AdaptiveConfig(criterion="kl", threshold=0.05, min_loops=1, max_loops=None)


def test_errors():
    with pytest.raises(LoopnnError, match="stack"):
        evaluate_adaptive(make_model(loop_strategy="layer"), [batch()], AdaptiveConfig())
    with pytest.raises(LoopnnError, match="criterion"):
        AdaptiveConfig(criterion="argmax")
    with pytest.raises(LoopnnError, match="threshold"):
        AdaptiveConfig(threshold=-1.0)
    with pytest.raises(LoopnnError, match="min_loops"):
        AdaptiveConfig(min_loops=4, max_loops=2)
    with pytest.raises(LoopnnError, match="min_loops"):
        evaluate_adaptive(make_model(), [batch()], AdaptiveConfig(min_loops=4))  # model trained with 3 loops
    with pytest.raises(LoopnnError, match="no batches"):
        evaluate_adaptive(make_model(), [], AdaptiveConfig())


def test_no_rows_left_computes_nothing():
    model = make_model()
    cache = KVCache(2)
    prepare_cache(model, cache, 2, 3)
    stats = DecodeStats()
    out = adaptive_step(
        model,
        cache,
        torch.tensor([[1], [2]]),
        AdaptiveConfig(),
        max_loops=3,
        rows=torch.tensor([], dtype=torch.long),
        stats=stats,
    )
    assert cache.length == 1 and stats.tokens == 0 and not out.any()


def test_kv_sharing_one_copy_equals_per_slot_copies():
    """prepare_cache's stacked loop region (one copy per exit) and separate slot tensors (a serving batch's
    cache) give the same logits, exits and cache contents."""
    model = make_model(n_loops=2)
    ad = AdaptiveConfig(criterion="entropy", threshold=1e-4, max_loops=4)
    caches, outs = [], []
    for stacked in (True, False):
        cache = KVCache(6)
        prepare_cache(model, cache, 3, 4)
        if not stacked:  # what RowBatch does: every slot its own tensor
            for s in cache.slots:
                s.k, s.v = s.k.clone(), s.v.clone()
        stats = DecodeStats()
        logits = [adaptive_step(model, cache, torch.tensor([[t], [t + 1], [t + 2]]), ad, max_loops=4, stats=stats)
                  for t in range(5)]  # fmt: skip
        caches.append(cache)
        outs.append((torch.stack(logits), stats.exits))
    assert len(outs[0][1]) > 1 and outs[0][1] == outs[1][1]
    assert torch.equal(outs[0][0], outs[1][0])
    for a, b in zip(caches[0].slots, caches[1].slots):
        assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v)


def test_exit_check_logits_are_the_output_without_a_coda(monkeypatch):
    """Without a coda, a row that exits returns the logits its kl check computed: the same numbers as a second
    ln_f + head, one head fewer per exited token (counted), and rows that ran every loop still get theirs."""
    import loopnn.adaptive as adaptive_mod

    model = make_model(loop_end=4)
    ad = AdaptiveConfig(criterion="kl", threshold=3e-4, max_loops=5)
    x, y = batch()
    reused = evaluate_adaptive(model, [(x, y)], ad, compare_fixed=False, parallel=False).stats
    assert len(reused.exits) > 1 and 5 in reused.exits  # early exits and rows that ran every loop
    monkeypatch.setattr(adaptive_mod.ExitHook, "_keep", lambda self, rows, logits: None)  # recompute every head
    plain = evaluate_adaptive(model, [(x, y)], ad, compare_fixed=False, parallel=False).stats
    assert plain.exits == reused.exits
    early = sum(c for k, c in reused.exits.items() if k < 5)
    assert reused.head_evaluations == plain.head_evaluations - early
    monkeypatch.undo()
    fixed, fast = Decoder(model, PROMPTS, 6, adaptive=ad), Decoder(model, PROMPTS, 6, adaptive=ad)
    monkeypatch.setattr(adaptive_mod.ExitHook, "_keep", lambda self, rows, logits: None)
    a = fixed.prefill()
    monkeypatch.undo()
    b = fast.prefill()
    for _ in range(5):
        token = a.argmax(-1)
        monkeypatch.setattr(adaptive_mod.ExitHook, "_keep", lambda self, rows, logits: None)
        a = fixed.step(token)
        monkeypatch.undo()
        b = fast.step(token)
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
