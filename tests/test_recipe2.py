"""The 2026 looped-GPT-2 levers: a constant residual multiplier, the loop-boundary norm, scaled re-injection,
injection at the hand-over to the coda, and loop growth with a learning-rate re-warm. Each is pinned by what it
reduces to at its neutral setting and by the computation written out by hand."""

import json

import pytest
import torch

from loopnn import LoopGPT, ModelConfig, TrainConfig, preset
from loopnn.adaptive import AdaptiveConfig, check_adaptive
from loopnn.errors import LoopnnError
from loopnn.flops import training_flops_per_token
from loopnn.generate import generate
from loopnn.loop import boundary_norm
from loopnn.train import lr_at, mean_training_flops, train


def make(seed=0, **kw):
    torch.manual_seed(seed)
    return LoopGPT(ModelConfig(**(preset("debug") | dict(n_layer=1) | kw))).eval()


IDX = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))


def by_hand(model: LoopGPT, idx: torch.Tensor, n_loops: int) -> torch.Tensor:
    """One block looped n_loops times (stack, 'repeat'), with branch scale s, the boundary norm, injection of e0
    scaled by injection_scale before loops 2..N, and again at the hand-over under coda_injection."""
    cfg, b = model.config, model.transformer.h[0]
    s = cfg.branch_scale

    def norm(x, e0):
        if cfg.loop_norm == "none":
            return x
        unit = x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
        return unit if cfg.loop_norm == "unit" else unit * e0.pow(2).mean(-1, keepdim=True).sqrt()

    def inject(x, e0):
        return norm(x, e0) + cfg.injection_scale * e0 if cfg.injection == "add" else norm(x, e0)

    e0 = x = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(idx.shape[1]))
    for n in range(n_loops):
        if n > 0:
            x = inject(x, e0)
        x = x + s * b.attn(b.ln_1(x), None, None)
        x = x + s * b.mlp(b.ln_2(x))
    if cfg.coda_injection:
        x = inject(x, e0)
    return model.lm_head(model.transformer.ln_f(x))[..., : cfg.vocab_size]


def test_constant_residual_multiplier():
    assert make(n_loops=3, residual_scale="constant").config.branch_scale == 0.25
    assert make(n_loops=1, residual_scale="constant").config.branch_scale == 1.0  # N = 1 stays the plain model
    # At 1/N it is the inverse rule, to the bit
    inverse = make(n_loops=2, residual_scale="inverse")(IDX)[0]
    torch.testing.assert_close(make(n_loops=2, residual_scale="constant", residual_multiplier=0.5)(IDX)[0], inverse)
    model = make(n_loops=2, residual_scale="constant", residual_multiplier=0.3)
    torch.testing.assert_close(model(IDX)[0], by_hand(model, IDX, 2), rtol=0, atol=1e-5)


def test_injection_scale_one_is_plain_add_and_other_scales_by_hand():
    plain = make(n_loops=3, injection="add")(IDX)[0]
    torch.testing.assert_close(make(n_loops=3, injection="add", injection_scale=1.0)(IDX)[0], plain, rtol=0, atol=0)
    model = make(n_loops=3, injection="add", injection_scale=0.707)
    torch.testing.assert_close(model(IDX)[0], by_hand(model, IDX, 3), rtol=0, atol=1e-5)
    assert not torch.allclose(model(IDX)[0], plain)


@pytest.mark.parametrize("norm", ["unit", "input"])
@pytest.mark.parametrize("coda", [False, True])
def test_loop_norm_and_coda_injection_by_hand(norm, coda):
    model = make(n_loops=3, loop_norm=norm, injection="add", injection_scale=0.707, coda_injection=coda)
    for n in (1, 3, 4):
        torch.testing.assert_close(model(IDX, n_loops=n)[0], by_hand(model, IDX, n), rtol=0, atol=1e-5)
    # The logit lens's last loop is the forward pass (the hand-over applies on both paths)
    loss = model(IDX, IDX)[1].item()
    assert model.loop_losses(IDX, IDX)[-1] == pytest.approx(loss, abs=1e-5)


def test_loop_norm_without_injection_and_its_rms():
    model = make(n_loops=2, loop_norm="unit")
    torch.testing.assert_close(model(IDX)[0], by_hand(model, IDX, 2), rtol=0, atol=1e-5)
    cfg = ModelConfig(**(preset("debug") | dict(loop_norm="input")))
    x, e0 = torch.randn(2, 5, 32) * 7, torch.randn(2, 5, 32) * 0.03
    out = boundary_norm(cfg, x, e0)
    torch.testing.assert_close(out.pow(2).mean(-1).sqrt(), e0.pow(2).mean(-1).sqrt(), rtol=1e-4, atol=0)
    assert torch.equal(boundary_norm(ModelConfig(**preset("debug")), x, e0), x)  # none: untouched


def test_cached_generation_equals_uncached_with_the_new_levers():
    model = make(n_loops=2, loop_norm="input", injection="add", injection_scale=0.707, coda_injection=True)
    prompts = [[5, 9, 1, 7, 3, 2], [4, 4]]  # a padded batch
    assert generate(model, prompts, 8, temperature=0.0) == generate(model, prompts, 8, temperature=0.0, use_cache=False)


def test_lever_settings_are_checked():
    with pytest.raises(LoopnnError, match="coda_injection needs injection"):
        ModelConfig(coda_injection=True)
    with pytest.raises(LoopnnError, match="loop_norm"):
        ModelConfig(loop_norm="layer")
    with pytest.raises(LoopnnError, match="loop_norm 'unit' needs loop_strategy 'stack'"):
        ModelConfig(loop_norm="unit", loop_strategy="layer")
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(LoopnnError, match="injection_scale"):
            ModelConfig(injection_scale=bad)
    model = make(n_loops=2, injection="add", coda_injection=True)
    with pytest.raises(LoopnnError, match="coda_injection"):
        check_adaptive(model, AdaptiveConfig())


def test_loop_growth_schedule_and_rewarm():
    cfg = TrainConfig(max_steps=100, loop_grow_at=0.8, loop_grow_from=2, rewarm_steps=10, warmup_steps=5)
    assert [cfg.scheduled_loops(4, s) for s in (0, 79, 80, 99)] == [2, 2, 4, 4]
    assert [cfg.rewarm_factor(4, s) for s in (0, 5, 79)] == [1.0, 1.0, 1.0]
    assert [cfg.rewarm_factor(4, s) for s in (80, 81, 89, 90, 99)] == [0.1, 0.2, 1.0, 1.0, 1.0]
    # Neutral settings: no growth (every step at n_loops), no re-warm
    assert all(TrainConfig(max_steps=100).scheduled_loops(4, s) == 4 for s in range(100))
    no_rewarm = TrainConfig(max_steps=100, loop_grow_at=0.8)
    assert all(no_rewarm.rewarm_factor(4, s) == 1.0 for s in range(100))
    # The re-warm also follows the other schedules' rises
    delayed = TrainConfig(max_steps=100, loop_delay=0.5, rewarm_steps=4)
    assert [delayed.rewarm_factor(2, s) for s in (49, 50, 51, 53, 54)] == [1.0, 0.25, 0.5, 1.0, 1.0]
    assert lr_at(0, cfg) == pytest.approx(cfg.lr / 5)
    with pytest.raises(LoopnnError, match="loop_grow_at cannot be combined"):
        TrainConfig(loop_grow_at=0.5, loop_delay=0.2)
    with pytest.raises(LoopnnError, match="loop_grow_at must be"):
        TrainConfig(loop_grow_at=1.0)


def test_mean_training_flops_counts_loop_growth():
    mc = ModelConfig(**(preset("debug") | dict(n_loops=4)))
    cfg = TrainConfig(max_steps=10, loop_grow_at=0.7)  # 7 steps at 2 loops, 3 at 4
    two, four = (training_flops_per_token(mc, 32, n)["total"] for n in (2, 4))
    assert mean_training_flops(mc, cfg, 32)["total"] == round((7 * two + 3 * four) / 10)


def _configs(data_dir, out_dir, mc_kw, **tc_kw):
    mc = ModelConfig(**(preset("debug") | mc_kw))
    base = dict(data_dir=str(data_dir), out_dir=str(out_dir), batch_size=4, seq_len=32, max_steps=8)
    base |= dict(warmup_steps=2, eval_interval=0, eval_tokens=256, log_interval=1, lr=3e-3, progress=False)
    return mc, TrainConfig(**(base | tc_kw))


def _records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def test_loop_growth_trains_the_smaller_count_first_then_rewarms(pydoc_data, tmp_path):
    train(*_configs(pydoc_data, tmp_path / "two", dict(n_loops=2)))
    train(*_configs(pydoc_data, tmp_path / "grown", dict(n_loops=4), loop_grow_at=0.5, rewarm_steps=2))
    two, grown = _records(tmp_path / "two"), _records(tmp_path / "grown")
    assert [r["n_loops"] for r in grown] == [2, 2, 2, 2, 4, 4, 4, 4]
    # 'repeat' weights do not depend on n_loops: identical to the 2-loop model until the growth step
    assert [r["loss"] for r in grown[:4]] == [r["loss"] for r in two[:4]]
    assert grown[4]["lr"] == pytest.approx(two[4]["lr"] / 2) and grown[5]["lr"] == pytest.approx(two[5]["lr"])
    with pytest.raises(LoopnnError, match="set n_loops above loop_grow_from"):
        train(*_configs(pydoc_data, tmp_path / "bad", dict(n_loops=2), loop_grow_at=0.5))


def test_copy_mask_marks_what_in_context_copying_predicts():
    from loopnn.evaluate import copy_mask

    idx = torch.tensor([[1, 2, 3, 1, 2, 4, 1]])
    targets = torch.tensor([[2, 3, 1, 2, 4, 1, 3]])
    # t=3: token 1 seen at j=0, followed by 2 == target; t=4: token 2 seen at j=1, followed by 3 != target 4;
    # t=6: token 1 seen at j=0 (then 2) and j=3 (then 2), target 3: no
    assert copy_mask(idx, targets).tolist() == [[False, False, False, True, False, False, False]]
    idx = torch.tensor([[5, 5, 5]])
    assert copy_mask(idx, torch.tensor([[5, 5, 7]])).tolist() == [[False, True, False]]


def test_hops_answer_mask_marks_the_answers_after_the_colon():
    from loopnn.evaluate import hops_answer_mask

    text = "ab:1234\ncd:5678\nef"
    idx = torch.tensor([[ord(c) for c in text[:-1]]])
    targets = torch.tensor([[ord(c) for c in text[1:]]])
    marked = "".join(text[t + 1] for t in range(len(text) - 1) if hops_answer_mask(idx, targets, queries=2)[0, t])
    assert marked == "2468"  # the targets after each query name; never a fact, a name, or a newline
