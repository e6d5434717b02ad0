"""scripts/gpu_check.sh and its helper on a CPU: the one-line "no GPU" exit, and checks run in --dry-run mode
(tiny models on the CPU) with their figures and failures in the JSON and the exit status."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU path needs a machine without CUDA")


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), PYTHON=sys.executable)  # the Python running the tests
    return subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


@no_cuda
def test_without_a_gpu_the_script_says_so_in_one_line_and_exits_0(tmp_path):
    out = run("bash", str(ROOT / "scripts" / "gpu_check.sh"), "--work-dir", str(tmp_path), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("no GPU") and len(out.stdout.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())  # nothing run, nothing written


@no_cuda
def test_the_helper_alone_also_refuses_politely_without_a_gpu(tmp_path):
    out = run(sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--work-dir", str(tmp_path))
    assert out.returncode == 0 and out.stdout.startswith("no GPU")


def test_dry_run_writes_the_figures_of_a_check(tmp_path):
    report_path = tmp_path / "report.json"
    args = ["--dry-run", "--only", "chunked_loss", "--work-dir", str(tmp_path), "--json", str(report_path)]
    out = run("bash", str(ROOT / "scripts" / "gpu_check.sh"), *args)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(report_path.read_text())
    figures = report["checks"]["chunked_loss"]
    assert figures["ok"] and figures["vocab_size"] == 50257
    assert figures["plain_ms"] > 0 and figures["chunked_ms"] > 0 and report["failed"] == []
    assert report["machine"]["mode"] == "dry" and "torch" in report["machine"]


def test_a_failed_check_is_reported_and_sets_the_exit_status(tmp_path):
    # generate_serve needs kill_resume's run; alone, in an empty work dir, it must fail, and say why
    report_path = tmp_path / "report.json"
    args = ["--dry-run", "--only", "generate_serve", "--work-dir", str(tmp_path), "--json", str(report_path)]
    out = run(sys.executable, str(ROOT / "scripts" / "gpu_check.py"), *args)
    assert out.returncode == 1
    report = json.loads(report_path.read_text())
    assert report["failed"] == ["generate_serve"]
    assert "kill_resume must run first" in report["checks"]["generate_serve"]["error"]
    assert "FAIL generate_serve" in out.stdout


def test_gpu_plan_counts_every_loop_and_prints_the_four_rows():
    sys.path.insert(0, str(ROOT / "scripts"))
    import gpu_plan

    from loopnn.config import ModelConfig, preset
    from loopnn.flops import training_flops_per_token

    rows = {name: gpu_plan.plan_row(name) for name in gpu_plan.ROWS}
    loop = rows["loop-81m"]
    assert loop["tokens"] == 12 * 1024 * 40 * 5000  # configs/paper: micro-batch x seq x accumulation x steps
    assert loop["flops_per_token"] == training_flops_per_token(ModelConfig(**preset("loop-81m")), 1024)["total"]
    assert loop["flops"] == loop["flops_per_token"] * loop["tokens"]
    # 36 block applications against 12: the looped row costs more per token, though it has fewer parameters
    assert loop["flops_per_token"] > 2 * rows["gpt2-124m"]["flops_per_token"] and loop["params"] < 90e6
    assert gpu_plan.hours(gpu_plan.H100 * 0.5 * 3600, gpus=1, mfu=0.5) == pytest.approx(1.0)
    out = run(sys.executable, str(ROOT / "scripts" / "gpu_plan.py"))
    assert out.returncode == 0 and all(f"| {name} |" in out.stdout for name in gpu_plan.ROWS)
    assert "assumed" in out.stdout
