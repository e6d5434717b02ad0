"""`loopnn bench`: runs end to end on the debug preset and reports both implementations with sane values."""

import json

import pytest
import torch

from loopnn.cli import main

pytest.importorskip("transformers")


def test_bench_cli_debug_json(tmp_path, capsys):
    out = tmp_path / "bench.jsonl"
    argv = [
        "bench",
        "--preset",
        "debug",
        "--n-loops",
        "1",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--prompt-len",
        "4",
        "--new-tokens",
        "4",
        "--device",
        "cpu",
        "--no-memory",  # measured in subprocesses; test_bench_summary_keys covers it
        "--json",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| loopnn |" in printed and "| hf |" in printed
    records = {r["impl"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(records) == {"loopnn", "hf", "summary"}
    for impl in ("loopnn", "hf"):
        r = records[impl]
        assert r["train_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0
        assert 0 < r["mfu"] < 1
        assert r["train_loss"] == pytest.approx(5.55, abs=0.5)  # ln(256): random weights, random tokens
        assert r["n_loops"] == 1 and r["seq_len"] == 16
    s = records["summary"]
    assert s["torch"] == torch.__version__ and s["device"] == "cpu" and s["threads"] >= 1
    assert s["git_sha"] and s["peak_flops"] > 1e8
    assert s["train_speedup_vs_hf"] > 0 and s["decode_speedup_vs_hf"] > 0
    assert s["greedy_tokens_match"]  # same weights, same greedy tokens: HF runs the same computation


def test_bench_summary_keys(capsys):
    """One run reports train speed-up, MFU, memory at 1 and N loops with/without checkpointing and adaptive wall
    time side by side with HF; the summary holds the four headline figures (cheap settings)."""
    from loopnn.bench import BenchConfig, run_bench, table

    bc = BenchConfig(
        preset="debug", n_loops=2, batch_size=8, seq_len=64, steps=1, warmup=1, prompt_len=4, new_tokens=4,
        gen_repeats=1, device="cpu", memory_loops=3, memory_subprocess=False,
    )  # fmt: skip
    records = run_bench(bc, log=lambda m: None)
    ours, ref, s = records
    assert (ours["impl"], ref["impl"], s["impl"]) == ("loopnn", "hf", "summary")
    for key in ("train_speedup_vs_hf", "mfu", "memory_ratio_6_loops", "adaptive_wall_ratio"):
        assert isinstance(s[key], float) and s[key] > 0, key
    assert s["mfu"] == ours["mfu"] and s["hf_mfu"] == ref["mfu"] and s["memory_loops"] == 3
    assert 0 <= s["adaptive_loops_saved"] <= 0.5 and s["adaptive_decode_s"] > 0 and s["fixed_decode_s"] > 0
    for r in (ours, ref):
        for key in ("loops1", "loops1_ckpt", "loops3", "loops3_ckpt"):
            assert r[f"train_peak_mem_mb_{key}"] is not None and r[f"train_peak_mem_mb_{key}"] >= 0
    text = table(records)
    assert "peak MB 3 loops ckpt" in text and "adaptive decode wall time" in text


def test_bench_adaptive_on_a_trained_run(tmp_path):
    """--adaptive-run: the adaptive figure comes from a saved run's model (random prompts once its data is gone),
    and a missing run fails before any benchmark runs."""
    from loopnn.bench import BenchConfig, adaptive_on_run, run_bench
    from loopnn.checkpoint import save_checkpoint
    from loopnn.config import ModelConfig, preset
    from loopnn.errors import LoopnnError
    from loopnn.model import LoopGPT

    torch.manual_seed(0)
    cfg = ModelConfig(**dict(preset("debug"), n_loops=3, injection="add"))
    save_checkpoint(tmp_path / "run", 1, LoopGPT(cfg), cfg, {"data_dir": str(tmp_path / "gone")})
    bc = BenchConfig(prompt_len=4, new_tokens=5, gen_repeats=1, adaptive_run=str(tmp_path / "run"), adaptive_prompts=2)
    r = adaptive_on_run(bc, torch.device("cpu"), log=lambda m: None)
    assert r["adaptive_n_loops"] == 3 and r["adaptive_prompts"].startswith("random tokens")
    assert "gone" in r["adaptive_prompts"]  # the reason: the data directory named by the checkpoint is missing
    assert r["adaptive_wall_ratio"] == pytest.approx(r["adaptive_decode_s"] / r["fixed_decode_s"])
    assert 0 <= r["adaptive_loops_saved"] <= 2 / 3 + 1e-9  # at least one of 3 loops
    bad = BenchConfig(preset="debug", device="cpu", adaptive_run=str(tmp_path / "missing"))
    with pytest.raises(LoopnnError, match="not found"):
        run_bench(bad, log=lambda m: pytest.fail("benchmarks ran before the run was checked"))
    layer = ModelConfig(**dict(preset("debug"), n_loops=3, loop_strategy="layer"))
    save_checkpoint(tmp_path / "layer", 1, LoopGPT(layer), layer, {})
    bad = BenchConfig(preset="debug", device="cpu", adaptive_run=str(tmp_path / "layer"))
    with pytest.raises(LoopnnError, match="stack"):
        run_bench(bad, log=lambda m: pytest.fail("benchmarks ran before the run was checked"))


def test_bench_adaptive_prompts_come_from_the_runs_validation_data(tmp_path):
    from loopnn.data import TokenData, prepare
    from loopnn.genbench import _val_prompts

    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(400)))
    prepare(str(text), tmp_path / "data", tokenizer="bytes", progress=False)
    prompts, source = _val_prompts(tmp_path / "data", 3, 8, 256, 0)
    windows = next(iter(TokenData(tmp_path / "data").val_batches(3, 8)))[0]
    assert source.startswith("validation data") and prompts == windows.tolist() and len(prompts) == 3
    _, source = _val_prompts(tmp_path / "data", 3, 8, 100, 0)
    assert source.startswith("random tokens") and "vocab" in source  # data of another tokenizer is not used


def test_bench_adaptive_run_reads_its_validation_prompts_from_another_directory(tmp_path, monkeypatch):
    """A run trained with a relative --data-dir: `bench --adaptive-run RUN` started elsewhere still reads the
    run's validation prompts (open_run gives the data directory the checkpoint recorded, absolute)."""
    from loopnn.bench import BenchConfig, adaptive_on_run
    from loopnn.checkpoint import save_checkpoint
    from loopnn.config import ModelConfig, preset
    from loopnn.data import prepare
    from loopnn.model import LoopGPT

    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(400)))
    (tmp_path / "train-here").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "train-here")
    prepare(str(text), "data", tokenizer="bytes", progress=False)
    cfg = ModelConfig(**dict(preset("debug"), vocab_size=256, n_loops=3, injection="add"))
    recorded = {"data": {"dir": str((tmp_path / "train-here" / "data").resolve()), "tokenizer": "bytes"}}
    save_checkpoint("run", 1, LoopGPT(cfg), cfg, {"data_dir": "data"}, info=recorded)  # as the trainer saves it
    monkeypatch.chdir(tmp_path / "elsewhere")
    run = str(tmp_path / "train-here" / "run")
    bc = BenchConfig(prompt_len=4, new_tokens=5, gen_repeats=1, adaptive_run=run, adaptive_prompts=2)
    r = adaptive_on_run(bc, torch.device("cpu"), log=lambda m: None)
    assert r["adaptive_prompts"].startswith("validation data"), r["adaptive_prompts"]
    assert str(tmp_path / "train-here" / "data") in r["adaptive_prompts"]


def test_bench_memory_in_subprocesses():
    """The real memory path: each setting in a fresh process (here loopnn only, 1 loop, with/without ckpt)."""
    from loopnn.bench import BenchConfig, bench_memory, model_config

    bc = BenchConfig(preset="debug", batch_size=2, seq_len=16, memory_loops=1)
    mem = bench_memory(model_config(bc), bc, 16, torch.device("cpu"), ["loopnn"])
    assert set(mem["loopnn"]) == {"loops1", "loops1_ckpt"}
    assert all(v is not None and v >= 0 for v in mem["loopnn"].values())


@pytest.mark.parametrize("residual_scale,injection", [("none", "none"), ("inverse", "none"), ("inverse", "add")])
def test_hf_looped_matches_loopgpt(debug_cfg, residual_scale, injection):
    """The HF reference runs loopnn's schedule: same logits as LoopGPT with looped blocks and a gated rule (and
    the looped blocks' residual scale folded into HF's output projections)."""
    from dataclasses import replace

    from loopnn.bench import hf_twin
    from loopnn.model import LoopGPT

    torch.manual_seed(0)
    cfg = replace(debug_cfg, n_loops=3, loop_rule="gated_residual", residual_scale=residual_scale, injection=injection)
    model = LoopGPT(cfg).eval()
    twin = hf_twin(model).eval()
    idx = torch.randint(0, debug_cfg.vocab_size, (2, 12))
    with torch.no_grad():
        ref, _ = model(idx)
        out, _ = twin(idx)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_bench_head_loss_and_no_hf(capsys):
    assert main(["bench", "--head-loss", "256", "--head-rows", "64", "--head-n-embd", "16"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["vocab_size"] == 256 and r["plain_ms"] > 0 and r["chunked_ms"] > 0


def test_bench_bad_flags(capsys):
    assert main(["bench", "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err
