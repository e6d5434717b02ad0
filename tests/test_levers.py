"""Looped-training levers: residual-branch scaling, loop embeddings, delayed looping and the loop curriculum."""

import json
import math

import pytest
import torch

from loopnn import LoopGPT, ModelConfig, TrainConfig, preset
from loopnn.adaptive import AdaptiveConfig
from loopnn.errors import LoopnnError
from loopnn.flops import training_flops_per_token
from loopnn.generate import generate
from loopnn.train import mean_training_flops, sample_loops, train


def make(seed=0, **kw):
    torch.manual_seed(seed)
    return LoopGPT(ModelConfig(**(preset("debug") | kw))).eval()


def by_hand(model: LoopGPT, idx: torch.Tensor, n_loops: int) -> torch.Tensor:
    """The stack strategy, 'repeat' rule, with branch scale s and loop embedding e_n written out."""
    cfg, h = model.config, model.transformer.h
    s = cfg.branch_scale

    def block(i, x):
        b = h[i]
        x = x + s * b.attn(b.ln_1(x), None, None)
        return x + s * b.mlp(b.ln_2(x))

    x = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(idx.shape[1]))
    for n in range(n_loops):
        if model.loop_embed is not None:
            x = x + model.loop_embed[min(n, cfg.n_loops - 1)]
        for i in range(cfg.n_layer):
            x = block(i, x)
    return model.lm_head(model.transformer.ln_f(x))[..., : cfg.vocab_size]


@pytest.mark.parametrize("scale", ["inverse", "inverse_sqrt"])
def test_residual_scale_with_one_loop_is_the_plain_model(scale):
    idx = torch.randint(0, 256, (2, 16))
    plain = make(n_loops=1)
    scaled = make(n_loops=1, residual_scale=scale)
    assert all(b.branch_scale == 1.0 for b in scaled.transformer.h)
    torch.testing.assert_close(scaled(idx)[0], plain(idx)[0], rtol=0, atol=0)


def test_residual_scale_values_and_by_hand():
    assert ModelConfig(**(preset("debug") | dict(n_loops=4, residual_scale="inverse"))).branch_scale == 0.25
    assert ModelConfig(**(preset("debug") | dict(n_loops=4, residual_scale="inverse_sqrt"))).branch_scale == 0.5
    model = make(n_loops=3, residual_scale="inverse")
    idx = torch.randint(0, 256, (2, 16))
    for n in (1, 3, 5):
        torch.testing.assert_close(model(idx, n_loops=n)[0], by_hand(model, idx, n), rtol=0, atol=1e-5)
    assert not torch.allclose(model(idx)[0], make(n_loops=3)(idx)[0])


def test_residual_scale_touches_only_the_loop_region():
    model = make(n_layer=4, n_loops=2, loop_start=1, loop_end=3, residual_scale="inverse")
    assert [b.branch_scale for b in model.transformer.h] == [1.0, 0.5, 0.5, 1.0]


def test_loop_embedding_starts_as_the_plain_model_and_adds_one_vector_per_loop():
    idx = torch.randint(0, 256, (2, 16))
    plain = make(n_loops=3)
    embedded = make(n_loops=3, loop_embedding=True)
    assert embedded.num_params() - plain.num_params() == 3 * embedded.config.n_embd
    assert bool((embedded.loop_embed == 0).all())
    torch.testing.assert_close(embedded(idx)[0], plain(idx)[0], rtol=0, atol=0)
    with torch.no_grad():
        embedded.loop_embed.normal_(0, 0.5)
    for n in (1, 3, 4):  # 4: loops past those trained reuse the last embedding
        torch.testing.assert_close(embedded(idx, n_loops=n)[0], by_hand(embedded, idx, n), rtol=0, atol=1e-5)
    assert not torch.allclose(embedded(idx)[0], plain(idx)[0])


def test_loop_embedding_gets_gradient_and_no_weight_decay():
    from loopnn.train import make_optimizer

    model = make(n_loops=2, loop_embedding=True).train()
    idx = torch.randint(0, 256, (2, 16))
    model(idx, idx)[1].backward()
    assert model.loop_embed.grad is not None and model.loop_embed.grad.abs().sum() > 0
    groups = make_optimizer(model, TrainConfig(), torch.device("cpu")).param_groups
    assert any(p is model.loop_embed for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0.0


@pytest.mark.parametrize("strategy", ["stack", "layer"])
def test_cached_generation_equals_uncached_with_levers(strategy):
    model = make(n_loops=2, loop_strategy=strategy, loop_embedding=True, residual_scale="inverse")
    with torch.no_grad():
        model.loop_embed.normal_(0, 0.5)
    prompts = [[5, 9, 1, 7, 3, 2], [4, 4]]  # a padded batch
    cached = generate(model, prompts, 8, temperature=0.0)
    assert cached == generate(model, prompts, 8, temperature=0.0, use_cache=False)
    x = torch.tensor([prompts[0]])
    for _ in range(8):  # greedy decoding by hand, no cache
        x = torch.cat([x, model(x)[0][:, -1:].argmax(-1)], dim=1)
    assert cached[0] == x[0, 6:].tolist()


def test_adaptive_threshold_zero_equals_fixed_loops_with_loop_embedding():
    model = make(n_loops=3, loop_embedding=True, residual_scale="inverse_sqrt")
    with torch.no_grad():
        model.loop_embed.normal_(0, 0.5)
    prompts = [[5, 9, 1, 7, 3], [4, 4, 8]]
    fixed = generate(model, prompts, 6, temperature=0.0)
    assert generate(model, prompts, 6, temperature=0.0, adaptive=AdaptiveConfig(threshold=0.0)) == fixed


def test_loop_schedule_delay_and_ramp():
    cfg = TrainConfig(max_steps=100, loop_delay=0.3)
    assert [cfg.scheduled_loops(4, s) for s in (0, 29, 30, 99)] == [1, 1, 4, 4]
    cfg = TrainConfig(max_steps=100, loop_ramp=0.6)  # 4 stages of 15 steps: 1, 2, 3, 4 loops, then 4
    counts = [cfg.scheduled_loops(4, s) for s in range(100)]
    assert counts[:15] == [1] * 15 and counts[15:30] == [2] * 15 and counts[45:60] == [4] * 15
    assert counts[60:] == [4] * 40 and counts == sorted(counts)
    cfg = TrainConfig(max_steps=100, loop_delay=0.2, loop_ramp=0.4)
    assert [cfg.scheduled_loops(2, s) for s in (0, 19, 20, 39, 40, 99)] == [1, 1, 1, 1, 2, 2]
    # Sampled counts are capped by the schedule; the schedule alone decides fixed counts.
    cfg = TrainConfig(max_steps=100, loop_delay=0.5, loop_sampling="uniform", min_loops=1, max_loops=6)
    assert all(sample_loops(cfg, 3, s) == 1 for s in range(50))
    assert max(sample_loops(cfg, 3, s) for s in range(50, 100)) > 1
    for bad in (dict(loop_delay=1.0), dict(loop_ramp=-0.1), dict(loop_delay=0.6, loop_ramp=0.6)):
        with pytest.raises(LoopnnError, match="loop_delay"):
            TrainConfig(**bad)


def test_mean_training_flops_counts_the_schedule():
    mc = ModelConfig(**(preset("debug") | dict(n_loops=3)))
    cfg = TrainConfig(max_steps=10, loop_delay=0.4)  # 4 steps at 1 loop, 6 at 3
    one, three = (training_flops_per_token(mc, 32, n)["total"] for n in (1, 3))
    assert mean_training_flops(mc, cfg, 32)["total"] == round((4 * one + 6 * three) / 10)
    assert mean_training_flops(mc, TrainConfig(max_steps=10), 32) == training_flops_per_token(mc, 32)


def _train(data_dir, out_dir, mc_kw, **tc_kw):
    mc = ModelConfig(**(preset("debug") | mc_kw))
    base = dict(data_dir=str(data_dir), out_dir=str(out_dir), batch_size=4, seq_len=32, max_steps=8)
    base |= dict(warmup_steps=2, eval_interval=0, eval_tokens=256, log_interval=1, lr=3e-3, progress=False)
    return mc, TrainConfig(**(base | tc_kw))


def _train_records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def test_delayed_looping_equals_the_base_model_before_the_switch(pydoc_data, tmp_path):
    train(*_train(pydoc_data, tmp_path / "base", dict(n_loops=1)))
    train(*_train(pydoc_data, tmp_path / "delayed", dict(n_loops=3), loop_delay=0.5))
    base, delayed = _train_records(tmp_path / "base"), _train_records(tmp_path / "delayed")
    assert [r["n_loops"] for r in delayed] == [1, 1, 1, 1, 3, 3, 3, 3]
    # Same seed, same init (n_loops does not change a 'repeat' model's weights): identical until the switch.
    assert [r["loss"] for r in delayed[:4]] == [r["loss"] for r in base[:4]]
    assert delayed[4]["loss"] != base[4]["loss"]


def test_curriculum_counts_survive_resume(pydoc_data, tmp_path):
    mc, tc = _train(pydoc_data, tmp_path / "full", dict(n_loops=3), loop_ramp=0.75)
    train(mc, tc)
    mc, tc = _train(pydoc_data, tmp_path / "split", dict(n_loops=3), loop_ramp=0.75, max_steps=5)
    train(mc, tc)
    mc, tc = _train(pydoc_data, tmp_path / "split", dict(n_loops=3), loop_ramp=0.75)
    train(mc, tc, resume=True)
    full, split = _train_records(tmp_path / "full"), _train_records(tmp_path / "split")
    assert [r["n_loops"] for r in full] == [1, 1, 2, 2, 3, 3, 3, 3]
    # max_steps changed from 5 to 8, and the schedule is a fraction of max_steps: only the resumed part must agree
    assert [r["n_loops"] for r in split[5:]] == [r["n_loops"] for r in full[5:]]


def test_loop_schedule_needs_loops(pydoc_data, tmp_path):
    with pytest.raises(LoopnnError, match="n_loops >= 2"):
        train(*_train(pydoc_data, tmp_path / "r", dict(n_loops=1), loop_delay=0.5))


def test_levers_are_cli_flags(pydoc_data, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "loopnn", "train", "--preset", "debug", "--data-dir", str(pydoc_data)]
    cmd += ["--out-dir", str(out), "--max-steps", "4", "--batch-size", "2", "--seq-len", "16", "--no-progress"]
    cmd += ["--n-loops", "2", "--loop-embedding", "--residual-scale", "inverse", "--loop-ramp", "0.5"]
    cmd += ["--eval-tokens", "128"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_config"]["loop_embedding"] is True and saved["model_config"]["residual_scale"] == "inverse"
    assert saved["train_config"]["loop_ramp"] == 0.5
    assert math.isclose(
        saved["flops_per_token"]["total"],
        mean_training_flops(ModelConfig(**saved["model_config"]), TrainConfig(**saved["train_config"]), 16)["total"],
    )
