"""The GPU paths, checked on a CPU as far as torch allows: the torch floor, device selection (cuda > mps > cpu), the
autocast dtype, fp16 with a GradScaler (torch.amp.GradScaler("cpu")), TF32 and fused AdamW on CUDA, the CUDA
defaults of the chunked loss and compile. What only a GPU can show is in scripts/gpu_check.sh (docs/gpu.md)."""

import json
import re
import tomllib
from pathlib import Path

import pytest
import torch

from loopnn import LoopGPT, ModelConfig, TrainConfig, preset
from loopnn import checkpoint as ckpt
from loopnn import device as dev
from loopnn.errors import LoopnnError
from loopnn.train import make_optimizer, train

ROOT = Path(__file__).resolve().parents[1]


# --- the torch floor ---------------------------------------------------------------------------------------------

# The first torch release whose public API has each name the code imports from torch.distributed (the newest of
# these sets the floor). fully_shard / FSDPModule: docs.pytorch.org/docs/stable/distributed.fsdp.fully_shard.html
# ("Created On: Dec 04, 2024", first in the 2.6 docs; 2.4-2.5 had them under torch.distributed._composable.fsdp).
SINCE = {
    "torch.distributed.fsdp.fully_shard": (2, 6),
    "torch.distributed.fsdp.FSDPModule": (2, 6),
    "torch.distributed.device_mesh.init_device_mesh": (2, 2),
    "torch.distributed.checkpoint.state_dict.get_model_state_dict": (2, 2),
    "torch.amp.GradScaler": (2, 3),
}


def declared_floor() -> tuple[int, int]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [d for d in deps if d.replace(" ", "").startswith("torch>=")]
    major, minor = re.match(r"torch\s*>=\s*(\d+)\.(\d+)", spec).groups()
    return int(major), int(minor)


def imported_torch_names() -> set[str]:
    """Every `from torch.X import Y` in src/loopnn, as 'torch.X.Y', plus torch.amp.GradScaler where it is used."""
    found = set()
    for path in (ROOT / "src" / "loopnn").rglob("*.py"):
        text = path.read_text()
        for module, names in re.findall(r"from (torch[\w.]*) import \(?([\w, \n]+)\)?", text):
            found |= {f"{module}.{n.strip()}" for n in names.replace("\n", ",").split(",") if n.strip()}
        if "torch.amp.GradScaler" in text:
            found.add("torch.amp.GradScaler")
    return found


def test_declared_torch_floor_is_what_the_imports_need():
    used = imported_torch_names()
    assert "torch.distributed.fsdp.fully_shard" in used and "torch.distributed.fsdp.FSDPModule" in used
    need = max(since for name, since in SINCE.items() if name in used)
    assert declared_floor() == need == dev.TORCH_FLOOR


def test_the_installed_torch_has_the_imports_the_floor_covers():
    from torch.distributed.fsdp import FSDPModule, fully_shard  # noqa: F401

    dev.check_torch()


@pytest.mark.parametrize("version", ["2.4.1+cu121", "2.5.0", "1.13.1"])
def test_an_older_torch_is_refused_in_one_line(version):
    with pytest.raises(LoopnnError, match=r"torch >= 2\.6 .*found " + re.escape(version)):
        dev.check_torch(version)


@pytest.mark.parametrize("version", ["2.6.0", "2.6.0a0+ecf3bae40a", "2.13.0+cpu", "3.0.0"])
def test_the_floor_and_later_pass(version):
    dev.check_torch(version)


# --- device selection ---------------------------------------------------------------------------------------------


def fake_devices(monkeypatch, cuda: bool, mps: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


@pytest.mark.parametrize(
    "cuda, mps, expected",
    [(True, True, "cuda:0"), (True, False, "cuda:0"), (False, True, "mps"), (False, False, "cpu")],
)
def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    fake_devices(monkeypatch, cuda, mps)
    assert str(dev.resolve_device("auto")) == expected


def test_auto_under_torchrun_takes_the_local_rank(monkeypatch):
    fake_devices(monkeypatch, True, False)
    assert dev.resolve_device("auto", local_rank=3) == torch.device("cuda:3")


def test_device_override_wins_over_auto(monkeypatch):
    fake_devices(monkeypatch, True, True)
    assert dev.resolve_device("cpu") == torch.device("cpu")
    assert dev.resolve_device("mps") == torch.device("mps")


@pytest.mark.parametrize("name, fix", [("mps", "MPS is not available"), ("cuda:1", "CUDA is not available")])
def test_an_absent_device_is_refused(monkeypatch, name, fix):
    fake_devices(monkeypatch, False, False)
    with pytest.raises(LoopnnError, match=fix + ".*--device cpu"):
        dev.resolve_device(name)


def test_config_accepts_mps_and_float16_and_names_them_when_refusing():
    TrainConfig(device="mps", dtype="float16")
    with pytest.raises(LoopnnError, match="auto, cpu, mps, cuda or cuda:N"):
        TrainConfig(device="tpu")
    with pytest.raises(LoopnnError, match="auto, float32, bfloat16 or float16"):
        TrainConfig(dtype="half")


def test_cli_device_and_dtype_flags_reach_the_config(pydoc_data):
    from loopnn.cli import build_parser, resolve_train_configs

    flags = ["--preset", "debug", "--data-dir", str(pydoc_data), "--device", "mps", "--dtype", "float16"]
    args = build_parser().parse_args(["train", *flags])
    _, tc = resolve_train_configs(args)
    assert (tc.device, tc.dtype) == ("mps", "float16")


# --- autocast dtype, TF32, fused AdamW ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, device, major, expected",
    [
        ("auto", "cuda", 9, torch.bfloat16),  # H100
        ("auto", "cuda", 8, torch.bfloat16),  # A100
        ("auto", "cuda", 7, torch.float16),  # V100 / T4: no native bf16
        ("auto", "mps", 0, None),
        ("auto", "cpu", 0, None),
        ("float16", "cpu", 0, torch.float16),
        ("bfloat16", "cpu", 0, torch.bfloat16),
        ("float32", "cuda", 9, None),
    ],
)
def test_autocast_dtype(monkeypatch, dtype, device, major, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (major, 0))
    monkeypatch.setattr(torch.version, "hip", None)
    assert dev.amp_dtype(TrainConfig(dtype=dtype), torch.device(device)) == expected


def test_grad_scaler_is_on_for_float16_only():
    assert dev.grad_scaler(torch.device("cpu"), torch.float16).is_enabled()
    assert not dev.grad_scaler(torch.device("cpu"), torch.bfloat16).is_enabled()
    assert not dev.grad_scaler(torch.device("cpu"), None).is_enabled()


def test_tf32_is_set_on_cuda_only():
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.get_float32_matmul_precision(),
    )
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        dev.set_speed_options(TrainConfig(), torch.device("cpu"))
        assert not torch.backends.cuda.matmul.allow_tf32 and torch.get_float32_matmul_precision() == "highest"
        dev.set_speed_options(TrainConfig(), torch.device("cuda"))
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


def test_adamw_is_fused_on_cuda_only(debug_cfg):
    model = LoopGPT(debug_cfg)
    assert make_optimizer(model, TrainConfig(), torch.device("cuda")).defaults["fused"] is True
    assert not make_optimizer(model, TrainConfig(), torch.device("cpu")).defaults["fused"]


def test_compile_is_off_by_default():
    assert TrainConfig().compile is False  # on by default only once scripts/gpu_check.sh shows it pays


# --- fp16 + GradScaler, on CPU -----------------------------------------------------------------------------------


def tiny(data_dir, out_dir, **kw):
    mc = ModelConfig(**(preset("debug") | dict(n_loops=2)))
    base = dict(data_dir=str(data_dir), out_dir=str(out_dir), batch_size=4, seq_len=32, max_steps=6, warmup_steps=1)
    base |= dict(eval_interval=0, eval_tokens=256, log_interval=1, lr=3e-3, device="cpu", progress=False)
    return mc, TrainConfig(**(base | kw))


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_float16_trains_on_cpu_through_the_grad_scaler(pydoc_data, tmp_path):
    mc, tc = tiny(pydoc_data, tmp_path / "run", dtype="float16", max_steps=12)
    summary = train(mc, tc)
    train_lines = [r for r in records(tmp_path / "run") if r["kind"] == "train"]
    assert all("grad_scale" in r for r in train_lines)  # the scaler ran
    assert summary["val"]["loss"] < 5.4  # learned (random init ~ln 256 = 5.55)
    assert ckpt.load_checkpoint(tmp_path / "run")["info"]["grad_scaler"]["scale"] == train_lines[-1]["grad_scale"]


def test_float32_and_bfloat16_leave_the_scaler_off(pydoc_data, tmp_path):
    mc, tc = tiny(pydoc_data, tmp_path / "run", max_steps=2)
    train(mc, tc)
    assert not any("grad_scale" in r for r in records(tmp_path / "run"))
    assert "grad_scaler" not in ckpt.load_checkpoint(tmp_path / "run")["info"]


def test_float16_overflow_skips_the_step_and_halves_the_scale(pydoc_data, tmp_path, monkeypatch):
    # A scale so large that the scaled gradients overflow fp32: the scaler skips the update and halves the
    # scale until the gradients fit; those steps are skipped, not fatal, and the weights are untouched by them.
    def huge_scale(device, dtype):  # fp16 holds at most 65504: scaled gradients overflow it
        return torch.amp.GradScaler(device.type, init_scale=2.0**24, enabled=dtype == torch.float16)

    monkeypatch.setattr("loopnn.train.grad_scaler", huge_scale)
    mc, tc = tiny(pydoc_data, tmp_path / "run", dtype="float16", max_steps=20)
    summary = train(mc, tc)
    lines = records(tmp_path / "run")
    skips = [r for r in lines if r["kind"] == "skip"]
    assert 1 <= len(skips) < 20 and summary["skipped_steps"] == len(skips)
    scales = [r["grad_scale"] for r in lines if r["kind"] == "train"]
    assert scales[-1] == 2.0 ** (24 - len(skips))  # halved once per skipped step
    assert summary["tokens"] == (20 - len(skips)) * 4 * 32  # skipped steps trained no tokens


def test_float16_resume_restores_the_scale_bit_for_bit(pydoc_data, tmp_path, monkeypatch):
    mc, tc = tiny(pydoc_data, tmp_path / "full", dtype="float16")
    train(mc, tc)
    # The same run, killed right after its step-3 checkpoint, then resumed.
    mc2, tc2 = tiny(pydoc_data, tmp_path / "split", dtype="float16", ckpt_interval=3)
    real_save = ckpt.save_checkpoint

    def save_then_die(*a, **k):
        path = real_save(*a, **k)
        if a[1] == 3:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr("loopnn.train.ckpt.save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(mc2, tc2)
    monkeypatch.setattr("loopnn.train.ckpt.save_checkpoint", real_save)
    train(mc2, tc2, resume=True)
    a, b = ckpt.load_checkpoint(tmp_path / "full"), ckpt.load_checkpoint(tmp_path / "split")
    assert a["info"]["grad_scaler"] == b["info"]["grad_scaler"]
    for name, value in a["model_state"].items():
        assert torch.equal(value, b["model_state"][name]), name


# --- on CUDA only (scripts/gpu_check.sh runs these: pytest -m gpu) ------------------------------------------------


def cuda_only(test):
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(test))


@cuda_only
@pytest.mark.parametrize("dtype", ["auto", "float16"])
def test_cuda_training_in_bf16_and_fp16(pydoc_data, tmp_path, dtype):
    mc, tc = tiny(pydoc_data, tmp_path / "run", dtype=dtype, device="cuda", max_steps=8)
    summary = train(mc, tc)
    assert summary["device"].startswith("cuda") and summary["skipped_steps"] < 8
    assert summary["val"]["loss"] < 5.55
    scaled = any("grad_scale" in r for r in records(tmp_path / "run"))
    assert scaled == (dtype == "float16")


@cuda_only
def test_cuda_chunked_loss_matches_plain_under_bf16_autocast():
    from loopnn.loss import chunked_head_loss, plain_head_loss

    g = torch.Generator().manual_seed(0)
    h = torch.randn(512, 64, generator=g).cuda().requires_grad_()
    w = (0.02 * torch.randn(50304, 64, generator=g)).cuda().requires_grad_()
    t = torch.randint(0, 50257, (512,), generator=g).cuda()
    grads = []
    for fn in (plain_head_loss, chunked_head_loss):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn(h, w, t, 50257)
        loss.backward()
        grads.append((loss.detach(), h.grad.clone(), w.grad.clone()))
        h.grad = w.grad = None
    for a, b in zip(*grads):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=1e-4)
