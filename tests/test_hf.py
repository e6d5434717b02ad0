"""HF integration: save/load, generate, pipeline, export/import, GPT-2 weights, dense->looped (lm-eval: test_export.py).

All models are random-init tiny ones in tmp directories; nothing touches the hub.
"""

import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel  # noqa: E402

import loopnn.hf as lh  # noqa: E402
from loopnn import LoopGPT, ModelConfig, preset  # noqa: E402
from loopnn.checkpoint import load_model, save_checkpoint  # noqa: E402
from loopnn.errors import LoopnnError  # noqa: E402


def tiny(seed: int = 0, **overrides) -> LoopGPT:
    torch.manual_seed(seed)
    return LoopGPT(ModelConfig(**{**preset("debug"), **overrides})).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return lh.gpt2_tokenizer()


def greedy(model: LoopGPT, idx: torch.Tensor, steps: int, n_loops: int | None = None) -> torch.Tensor:
    """Reference decoder: full recompute, no cache, no HF."""
    for _ in range(steps):
        logits, _ = model(idx, n_loops=n_loops)
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


def test_import_loopnn_does_not_import_transformers():
    code = "import sys, loopnn, loopnn.model, loopnn.checkpoint; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("rule", ["repeat", "gated"])
def test_save_pretrained_roundtrip_keeps_tied_head(tmp_path, rule):
    model = tiny(loop_rule=rule, loop_start=1)
    if model.loop_gate is not None:
        with torch.no_grad():
            model.loop_gate.uniform_(0.5, 1.5)
    lh.LoopnnForCausalLM.from_loopgpt(model).save_pretrained(tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    assert "model.lm_head.weight" not in stored  # the tied head is stored once
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, lh.LoopnnForCausalLM)
    assert loaded.model.lm_head.weight is loaded.model.transformer.wte.weight
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.model.state_dict()[key]), key
    idx = torch.randint(0, 256, (2, 12))
    assert torch.equal(loaded(idx).logits, model(idx)[0])
    assert torch.equal(loaded(idx, n_loops=4).logits, model(idx, n_loops=4)[0])


def test_generate_greedy_matches_reference_with_and_without_cache():
    model = tiny()
    hf = lh.LoopnnForCausalLM.from_loopgpt(model)
    idx = torch.randint(0, 256, (2, 7))
    for n_loops in (None, 4):
        expected = greedy(model, idx, 6, n_loops)
        kw = {} if n_loops is None else {"n_loops": n_loops}
        cached = hf.generate(idx, max_new_tokens=6, do_sample=False, **kw)
        uncached = hf.generate(idx, max_new_tokens=6, do_sample=False, use_cache=False, **kw)
        assert torch.equal(cached, expected) and torch.equal(uncached, expected)
    beams = [hf.generate(idx, max_new_tokens=4, num_beams=3, n_loops=3, use_cache=c) for c in (True, False)]
    assert torch.equal(beams[0], beams[1])  # beam search reorders loopnn's cache correctly
    hf.config.inference_n_loops = 4  # loop count chosen once, for every later call
    assert torch.equal(hf.generate(idx, max_new_tokens=6, do_sample=False), greedy(model, idx, 6, 4))


def test_generate_sampling_is_seeded():
    hf = lh.LoopnnForCausalLM.from_loopgpt(tiny())
    idx = torch.randint(0, 256, (3, 5))
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(hf.generate(idx, max_new_tokens=8, do_sample=True, top_k=50, temperature=1.3, n_loops=3))
    assert runs[0].shape == (3, 13) and torch.equal(runs[0], runs[1])


def test_left_padded_batch_equals_unpadded():
    model = tiny(n_loops=3)
    hf = lh.LoopnnForCausalLM.from_loopgpt(model)
    prompts = [torch.randint(1, 256, (n,)) for n in (9, 4)]
    width = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([p.new_zeros(width - len(p)), p]) for p in prompts])
    mask = torch.stack([torch.cat([p.new_zeros(width - len(p)), torch.ones_like(p)]) for p in prompts])
    for use_cache in (True, False):
        batch = hf.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                            use_cache=use_cache)  # fmt: skip
        for row, p in zip(batch, prompts):
            alone = greedy(model, p[None], 6)[0]
            assert torch.equal(row[width - len(p) :], alone)


def test_pipeline_text_generation_offline(tokenizer):
    hf = lh.LoopnnForCausalLM.from_loopgpt(tiny(vocab_size=50257))
    pipe = transformers.pipeline("text-generation", model=hf, tokenizer=tokenizer, device="cpu")
    out = pipe("Hello world", max_new_tokens=5, do_sample=False)
    assert out[0]["generated_text"].startswith("Hello world")
    assert len(tokenizer.encode(out[0]["generated_text"])) > len(tokenizer.encode("Hello world"))


def test_export_import_is_lossless(tmp_path):
    model = tiny(loop_rule="gated_residual", n_loops=3)
    with torch.no_grad():
        model.loop_gate.normal_()
    cfg = model.config
    save_checkpoint(tmp_path / "run", 42, model, cfg, {"lr": 1e-3}, info={"tokens": 123})
    out = lh.export_hf(tmp_path / "run", tmp_path / "hf")
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    ckpt = lh.import_hf(tmp_path / "hf", tmp_path / "back")
    assert ckpt.name == "step-0000042"
    back, meta = load_model(tmp_path / "back")
    assert back.config == cfg and meta["train_config"] == {"lr": 1e-3} and meta["info"]["tokens"] == 123
    for key, value in model.state_dict().items():
        assert torch.equal(value, back.state_dict()[key]), key
    assert back.lm_head.weight is back.transformer.wte.weight


def test_import_refuses_gpt2_directory(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)).save_pretrained(tmp_path)
    with pytest.raises(LoopnnError, match="load_gpt2"):
        lh.import_hf(tmp_path, tmp_path / "run")


@pytest.fixture
def gpt2_dir(tmp_path):
    torch.manual_seed(0)
    ref = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64)).eval()
    ref.save_pretrained(tmp_path / "gpt2")
    return tmp_path / "gpt2", ref


def test_load_gpt2_matches_hf_logits(gpt2_dir):
    path, ref = gpt2_dir
    model = lh.load_gpt2(path)
    assert model.config.vocab_size == 100 and model.config.padded_vocab_size == 128
    idx = torch.randint(0, 100, (2, 20))
    with torch.no_grad():
        expected = ref(idx).logits
    assert torch.allclose(model(idx)[0], expected, atol=1e-5, rtol=0)
    assert torch.allclose(lh.load_gpt2(ref)(idx)[0], expected, atol=1e-5, rtol=0)  # from an instance too
    back = lh.to_gpt2(model)
    with torch.no_grad():
        assert torch.allclose(back(idx).logits, expected, atol=1e-5, rtol=0)


def test_to_gpt2_refuses_looped_models():
    with pytest.raises(LoopnnError, match="n_loops=1"):
        lh.to_gpt2(tiny(n_loops=2))


def test_loop_from_dense(gpt2_dir):
    path, ref = gpt2_dir
    dense = lh.load_gpt2(path)
    idx = torch.randint(0, 100, (2, 16))
    same = lh.loop_from_dense(path, blocks=[0, 1], n_loops=1)
    assert torch.equal(same(idx)[0], dense(idx)[0])
    looped = lh.loop_from_dense(dense, blocks=[1], n_loops=3, prelude=[0], loop_rule="gated")
    cfg = looped.config
    assert (cfg.n_layer, cfg.loop_start, cfg.loop_end, cfg.n_loops) == (2, 1, 2, 3)
    for new, old in ((0, 0), (1, 1)):
        for key, value in dense.transformer.h[old].state_dict().items():
            assert torch.equal(looped.transformer.h[new].state_dict()[key], value)
    assert torch.equal(looped.transformer.wte.weight, dense.transformer.wte.weight)
    assert looped.lm_head.weight is looped.transformer.wte.weight
    assert torch.isfinite(looped(idx)[0]).all()
    with pytest.raises(LoopnnError, match="outside"):
        lh.loop_from_dense(dense, blocks=[5], n_loops=2)
