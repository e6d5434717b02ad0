"""Looped-training options: input injection, truncated backprop, sampled loop counts, checkpointing, telemetry."""

import pytest
import torch

from loopnn import LoopGPT, ModelConfig, TrainConfig, loop, preset
from loopnn.adaptive import AdaptiveConfig, check_adaptive
from loopnn.errors import LoopnnError
from loopnn.evaluate import loop_telemetry
from loopnn.flops import training_flops_per_token
from loopnn.train import sample_loops


def make(injection="none", rule="gated", n_loops=3, region=(1, 3), seed=0, **kw):
    torch.manual_seed(seed)
    base = preset("debug") | dict(n_layer=4, n_loops=n_loops, loop_rule=rule, injection=injection)
    model = LoopGPT(ModelConfig(**(base | dict(loop_start=region[0], loop_end=region[1]) | kw)))
    with torch.no_grad():
        if model.loop_gate is not None:
            model.loop_gate.uniform_(0.2, 1.5)
        if model.loop_adapter is not None:  # away from its [I | I] init, so 'concat' differs from 'add'
            model.loop_adapter.weight.add_(0.05 * torch.randn_like(model.loop_adapter.weight))
    return model.eval()


def by_hand(model: LoopGPT, idx: torch.Tensor, n_loops: int) -> torch.Tensor:
    """Injection variants written out directly (stack strategy)."""
    cfg, h = model.config, model.transformer.h
    x = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(idx.shape[1]))
    for i in range(cfg.loop_start):
        x = h[i](x)
    e0 = x
    for n in range(n_loops):
        if n > 0 and cfg.injection == "add":
            x = x + e0
        if n > 0 and cfg.injection == "concat":
            x = torch.cat([x, e0], -1) @ model.loop_adapter.weight.T + model.loop_adapter.bias
        fx = x
        for i in range(cfg.loop_start, cfg.loop_end):
            fx = h[i](fx)
        a = model.loop_gate[min(n, cfg.n_loops - 1)]
        x = x + a * (fx - x)
    for i in range(cfg.loop_end, cfg.n_layer):
        x = h[i](x)
    return model.lm_head(model.transformer.ln_f(x))[..., : cfg.vocab_size]


@pytest.mark.parametrize("injection", ["none", "add", "concat"])
def test_injection_equals_by_hand(injection):
    model = make(injection)
    idx = torch.randint(0, 256, (2, 12))
    for n in (1, 3, 4):
        torch.testing.assert_close(model(idx, n_loops=n)[0], by_hand(model, idx, n), rtol=0, atol=1e-5)


def test_injection_variants_differ_and_one_loop_is_unchanged():
    idx = torch.randint(0, 256, (2, 12))
    outs = {inj: make(inj)(idx)[0] for inj in ("none", "add", "concat")}
    assert not torch.allclose(outs["none"], outs["add"]) and not torch.allclose(outs["add"], outs["concat"])
    one = {inj: make(inj)(idx, n_loops=1)[0] for inj in ("none", "add", "concat")}
    assert torch.equal(one["none"], one["add"]) and torch.equal(one["none"], one["concat"])
    # concat's adapter starts as [I | I]: the same function as 'add' before training
    fresh = {inj: LoopGPT(ModelConfig(**(preset("debug") | dict(injection=inj)))) for inj in ("add", "concat")}
    fresh["concat"].load_state_dict(fresh["add"].state_dict(), strict=False)
    torch.testing.assert_close(fresh["add"](idx)[0], fresh["concat"](idx)[0], rtol=1e-5, atol=1e-5)


def test_injection_with_kv_cache_matches_full_forward():
    from loopnn.kvcache import KVCache

    model = make("concat")
    idx = torch.randint(0, 256, (1, 10))
    full = model(idx)[0]
    cache = KVCache(16)
    parts = [model.decode(idx[:, :6], cache), model.decode(idx[:, 6:], cache)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("injection", ["add", "concat"])
def test_adaptive_takes_injection(injection):
    """Adaptive exit injects e0 before every loop after the first, as the fixed model does."""
    model = make(injection).eval()
    assert check_adaptive(model, AdaptiveConfig()) == model.config.n_loops


def _grads(model, idx):
    model.zero_grad()
    model(idx, idx)[1].backward()
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("injection", ["none", "add"])
def test_truncated_backprop_equals_detached_early_loops(injection):
    """backprop_loops=k: the gradients of a model whose state entering the last k loops is detached."""
    model = make(injection, n_loops=4).train()
    idx = torch.randint(0, 256, (2, 12))
    with loop.backprop(loop.Backprop(backprop_loops=2)):
        got = _grads(model, idx)
    # Reference: the same forward by hand with a detach before loop 3 (e0 keeps its gradient path).
    h = model.transformer.h
    model.zero_grad()
    x = model.embed(idx)
    x = h[0](x)
    e0 = x
    for n in range(4):
        if n == 2:
            x = x.detach()
        if n > 0 and injection == "add":
            x = x + e0
        fx = h[2](h[1](x))
        x = x + model.loop_gate[n] * (fx - x)
    x = h[3](x)
    logits = model.logits(x)
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), idx.reshape(-1)).backward()
    for name, p in model.named_parameters():
        ref = p.grad if p.grad is not None else torch.zeros_like(p)
        g = got[name] if got[name] is not None else torch.zeros_like(p)
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-7, msg=name)
    if injection == "none":  # no path into the prelude at all
        assert got["transformer.h.0.attn.c_attn.weight"] is None
        assert got["transformer.wpe.weight"] is None
    assert got["loop_gate"][:2].abs().sum() == 0 and got["loop_gate"][2:].abs().sum() > 0


def test_truncated_backprop_state_has_no_grad_before_last_loops():
    model = make(n_loops=4).train()
    with loop.backprop(loop.Backprop(backprop_loops=1)):
        states = []
        model.body(model.embed(torch.randint(0, 256, (1, 8))), loop_states=states)
        assert [s.requires_grad for s in states] == [False, False, False, True]
        with torch.no_grad():  # evaluation ignores it
            assert model(torch.randint(0, 256, (1, 8)))[0].shape[-1] == 256


def test_activation_checkpointing_same_loss_and_grads():
    model = make("concat", n_loops=3).train()
    idx = torch.randint(0, 256, (2, 12))
    loss_a = model(idx, idx)[1].item()
    plain = _grads(model, idx)
    with loop.backprop(loop.Backprop(checkpointing="block")):
        loss_b = model(idx, idx)[1].item()
        ckpt = _grads(model, idx)
    assert loss_a == loss_b
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-6, atol=1e-8)


def test_sampled_loop_counts_are_deterministic_and_in_range():
    for sampling in ("uniform", "poisson"):
        tc = TrainConfig(loop_sampling=sampling, min_loops=1, max_loops=7, seed=3)
        ks = [sample_loops(tc, 4, step) for step in range(200)]
        assert ks == [sample_loops(tc, 4, step) for step in range(200)]  # a function of (seed, step) only
        assert min(ks) >= 1 and max(ks) <= 7 and len(set(ks)) > 3
        assert abs(sum(ks) / len(ks) - 4) < 0.6
    assert {sample_loops(TrainConfig(), 5, s) for s in range(10)} == {5}
    assert TrainConfig(loop_sampling="uniform", min_loops=2).loop_range(4) == (2, 6)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(parallel="zero"), "parallel"),
        (dict(loop_sampling="normal"), "loop_sampling"),
        (dict(min_loops=0), "min_loops"),
        (dict(min_loops=3, max_loops=2), "max_loops"),
        (dict(backprop_loops=0), "backprop_loops"),
    ],
)
def test_invalid_train_options(kw, match):
    with pytest.raises(LoopnnError, match=match):
        TrainConfig(**kw)


def test_loop_bounds_keep_their_old_names_as_json_keys_and_flags(tmp_path):
    """min_loops/max_loops were loop_min/loop_max: runs and TOML files saved under the old names still load, and
    the old flags still parse; a current name given beside an old one (a resume flag) wins."""
    from loopnn.cli.parser import build_parser, overrides
    from loopnn.recipes import resolve, train_config_from_dict

    old = train_config_from_dict({"loop_sampling": "uniform", "loop_min": 2, "loop_max": 5})
    assert (old.min_loops, old.max_loops) == (2, 5)
    assert train_config_from_dict({"loop_max": 5, "max_loops": 7}).max_loops == 7
    recipe = tmp_path / "old.toml"
    recipe.write_text('[train]\nloop_sampling = "uniform"\nloop_min = 3\n')
    assert resolve(None, recipe, None, {"max_loops": 9})[1].loop_range(4) == (3, 9)
    args = build_parser().parse_args(["train", "--loop-min", "2", "--loop-max", "6"])
    assert overrides(args, TrainConfig) == {"min_loops": 2, "max_loops": 6}
    with pytest.raises(LoopnnError, match="unknown field"):
        train_config_from_dict({"loop_middle": 2})


def test_invalid_injection():
    with pytest.raises(LoopnnError, match="injection"):
        ModelConfig(**(preset("debug") | dict(injection="mul")))
    with pytest.raises(LoopnnError, match="stack"):
        ModelConfig(**(preset("debug") | dict(injection="add", loop_strategy="layer")))


def test_flops_count_truncated_backprop():
    cfg = ModelConfig(**(preset("debug") | dict(n_loops=4)))
    full, cut = training_flops_per_token(cfg, 32), training_flops_per_token(cfg, 32, backprop_loops=1)
    assert full["forward"] == cut["forward"] and cut["backward"] < full["backward"]


def test_telemetry_per_loop():
    model = make(n_loops=3)
    t = loop_telemetry(model, torch.randint(0, 256, (2, 12)))
    assert len(t["state_norm"]) == len(t["update_norm"]) == len(t["gate_mean"]) == 3
    assert all(v > 0 for v in t["update_norm"])
    torch.testing.assert_close(torch.tensor(t["gate_mean"]), model.loop_gate.mean(-1))


@pytest.mark.parametrize("injection", ["none", "concat"])
@pytest.mark.parametrize("backprop_loops", [None, 2])
@pytest.mark.parametrize("checkpointing", ["block", "loop", "nested"])
def test_checkpointing_per_loop_same_loss_and_grads(injection, backprop_loops, checkpointing):
    """Checkpointing a whole loop iteration (or each block) gives the plain path's loss and gradients."""
    model = make(injection, n_loops=4, dropout=0.1).train()  # dropout: the recomputation replays the RNG
    idx = torch.randint(0, 256, (2, 12))
    torch.manual_seed(5)
    with loop.backprop(loop.Backprop(backprop_loops=backprop_loops)):
        loss_a = model(idx, idx)[1].item()
        torch.manual_seed(5)
        plain = _grads(model, idx)
    torch.manual_seed(5)
    with loop.backprop(loop.Backprop(backprop_loops=backprop_loops, checkpointing=checkpointing)):
        loss_b = model(idx, idx)[1].item()
        torch.manual_seed(5)
        ckpt = _grads(model, idx)
    assert loss_a == loss_b
    for name in plain:
        if plain[name] is None:
            assert ckpt[name] is None, name
        else:
            torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-6, atol=1e-8, msg=name)


def test_checkpointing_layer_strategy_and_policy_from_train_config():
    from loopnn.parallel import backprop_policy

    stack, layer = make(n_loops=3).config, make(n_loops=3, loop_strategy="layer").config
    on = TrainConfig(activation_checkpointing=True, backprop_loops=2)
    assert backprop_policy(on, stack) == loop.Backprop(backprop_loops=2, checkpointing="loop")
    assert backprop_policy(on, layer).checkpointing == "block"
    assert backprop_policy(TrainConfig(), stack) == loop.Backprop()
    with pytest.raises(ValueError, match="checkpointing"):
        loop.Backprop(checkpointing="layer")
    model = make(n_loops=3, loop_strategy="layer").train()
    idx = torch.randint(0, 256, (2, 12))
    plain = _grads(model, idx)
    with loop.backprop(loop.Backprop(checkpointing="loop")):  # one loop of one block: per block
        ckpt = _grads(model, idx)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-6, atol=1e-8, msg=name)
