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


def test_hf_looped_matches_loopgpt(debug_cfg):
    """The HF reference runs loopnn's schedule: same logits as LoopGPT with looped blocks and a gated rule."""
    from dataclasses import replace

    from loopnn.bench import hf_twin
    from loopnn.model import LoopGPT

    torch.manual_seed(0)
    model = LoopGPT(replace(debug_cfg, n_loops=3, loop_rule="gated_residual")).eval()
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
