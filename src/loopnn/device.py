"""The device a run uses and its process-wide numerics: `resolve_device("auto")`, autocast dtype, GradScaler, TF32,
threads, and the torch release the code needs (`check_torch`).

Shared by training, evaluation, generation, the benchmarks and the server (each picks its device the same way):
auto is CUDA, else Apple's MPS, else the CPU.
"""

from __future__ import annotations

import torch

from loopnn.config import TrainConfig
from loopnn.errors import LoopnnError

# The oldest torch whose public API covers every import in src/loopnn: FSDP2's `fully_shard` and `FSDPModule` under
# torch.distributed.fsdp (dist.wrap, dist.is_fsdp) first shipped in 2.6; 2.4-2.5 had them only under the private
# torch.distributed._composable.fsdp. pyproject.toml declares the same floor (tests/test_gpu_paths.py checks both).
TORCH_FLOOR = (2, 6)


def check_torch(version: str | None = None) -> None:
    """Refuse, in one line, a torch older than TORCH_FLOOR (one installed outside pip's resolver, say)."""
    version = version or torch.__version__
    parts = version.split("+")[0].split(".")
    try:
        found = (int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0))
    except (IndexError, ValueError):
        return  # an unparseable local build: let it run
    if found < TORCH_FLOOR:
        floor = ".".join(map(str, TORCH_FLOOR))
        raise LoopnnError(
            f"loopnn needs torch >= {floor} (FSDP2's public API); found {version}: pip install 'torch>={floor}'"
        )


def mps_available() -> bool:
    return torch.backends.mps.is_available()


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """auto: cuda:<local_rank> if CUDA is present, else mps (Apple silicon), else cpu; or the device named."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device(f"cuda:{local_rank}")
        return torch.device("mps" if mps_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LoopnnError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    if name == "mps" and not mps_available():
        raise LoopnnError(
            "device 'mps' requested but MPS is not available (Apple silicon and macOS only); use --device cpu"
        )
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise LoopnnError(f"device must be auto, cpu, mps, cuda or cuda:N; got {name!r}")
    return device


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a training forward (None: fp32). 'auto' is bf16 on CUDA, or fp16 (with a GradScaler)
    on a CUDA GPU without bf16 (T4, V100); fp32 on MPS and CPU. On CPU bf16 is used only when asked: without AMX,
    bf16 matmuls are ~100x slower than fp32; with AMX (Xeon Sapphire Rapids and later) it halves a width-256 step
    but not the demo's width-128 one (docs/benchmarks.md), and it changes the numerics."""
    if cfg.dtype == "auto" and device.type == "cuda":
        return torch.bfloat16 if cuda_has_bf16(device) else torch.float16
    if cfg.dtype == "bfloat16":
        return torch.bfloat16
    if cfg.dtype == "float16":
        return torch.float16
    return None


def cuda_has_bf16(device: torch.device) -> bool:
    """Native bf16 matmuls: compute capability 8.0 (Ampere) and later, or ROCm. torch.cuda.is_bf16_supported() also
    says yes where bf16 is only emulated (slowly) on older GPUs."""
    return bool(torch.version.hip) or torch.cuda.get_device_capability(device)[0] >= 8


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """A GradScaler, enabled for fp16 only (its 5-bit exponent underflows small gradients; bf16 has fp32's range).
    Disabled, its scale/unscale_/step/update are the plain backward and optimizer step."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def set_speed_options(cfg: TrainConfig, device: torch.device) -> None:
    """Process-wide speed settings: CPU thread count; TF32 matmuls on CUDA (Ampere+; fp32 work outside autocast)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
