"""The device a run uses and its process-wide numerics: `resolve_device("auto")`, bf16 autocast, TF32, threads.

Shared by training, evaluation, generation, the benchmarks and the server (each picks its device the same way).
"""

from __future__ import annotations

import torch

from loopnn.config import TrainConfig
from loopnn.errors import LoopnnError


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LoopnnError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise LoopnnError(f"device must be auto, cpu, cuda or cuda:N; got {name!r}")
    return device


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA by default; on CPU only when asked (dtype='bfloat16'): without AMX, bf16 matmuls are
    ~100x slower than fp32; with AMX (Xeon Sapphire Rapids and later) it halves a width-256 step but not the demo's
    width-128 one (docs/benchmarks.md), and it changes the numerics, so 'auto' keeps fp32 there."""
    if cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def set_speed_options(cfg: TrainConfig, device: torch.device) -> None:
    """Process-wide speed settings: CPU thread count; TF32 matmuls on CUDA (Ampere+; fp32 work outside autocast)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
