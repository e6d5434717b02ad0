"""Sizes checked against memory before anything is allocated.

A config from a flag, a TOML file or a checkpoint's metadata can ask for a model no machine holds (`--n-embd 1048576`,
a vocab_size of 1e12, n_layer 1e9): building it would run until the allocator or the OOM killer stops the
process. `check_fits` estimates a lower bound on the bytes a model (and, for training, its gradients, AdamW
state and one activation per block application) needs and refuses it, naming the estimate, when it exceeds the
device's memory. It is a lower bound: passing it does not promise the run fits, failing it means it cannot.
"""

from __future__ import annotations

import os

from loopnn.config import ModelConfig
from loopnn.errors import LoopnnError


def param_count(cfg: ModelConfig) -> int:
    """Exactly the parameters LoopGPT allocates (embeddings with the padded vocab, blocks, norms, loop extras);
    the tied lm_head is counted once. tests/test_memory.py holds it equal to the model's over every option."""
    c, b = cfg.n_embd, 1 if cfg.bias else 0
    per_block = 12 * c * c + 9 * c * b + 2 * c * (1 + b)  # attention and MLP weights (and biases), two LayerNorms
    extra = cfg.n_loops * c * (int(cfg.gated) + int(cfg.loop_embedding))
    if cfg.injection == "concat":
        extra += 2 * c * c + c * b
    return cfg.padded_vocab_size * c + cfg.block_size * c + cfg.n_layer * per_block + c * (1 + b) + extra


def estimate_bytes(cfg: ModelConfig, batch_size: int = 0, seq_len: int = 0, training: bool = False) -> int:
    """A lower bound on the bytes of a model (fp32), plus for training gradients, AdamW state and activations."""
    params = param_count(cfg) * 4
    if not training:
        return params
    activations = batch_size * seq_len * cfg.n_embd * 4 * (cfg.effective_depth() + 2)
    return params * 4 + activations


def device_bytes(device: str = "cpu") -> int | None:
    """Total memory of the device (physical RAM for the CPU); None when unknown."""
    if str(device).startswith("cuda"):
        try:
            import torch

            index = int(str(device).split(":")[1]) if ":" in str(device) else torch.cuda.current_device()
            return int(torch.cuda.get_device_properties(index).total_memory)
        except Exception:  # noqa: BLE001 - no CUDA, bad index: the device check elsewhere reports it
            return None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _fmt(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.3g} PiB"


def check_fits(
    cfg: ModelConfig, batch_size: int = 0, seq_len: int = 0, training: bool = False, device: str = "cpu",
    where: str = "this model",
) -> None:  # fmt: skip
    """Raise LoopnnError naming the estimate when `cfg` cannot fit in the device's memory."""
    need = estimate_bytes(cfg, batch_size, seq_len, training)
    have = device_bytes(device)
    if have is None or need <= have:
        return
    what = f"{param_count(cfg):,} parameters"
    if training:
        what += f", batch {batch_size} x {seq_len} tokens, with gradients and AdamW state"
    raise LoopnnError(
        f"{where} needs at least {_fmt(need)} ({what}), more than the {_fmt(have)} of {device}; "
        "use a smaller n_embd, n_layer, vocab_size, block_size or batch_size"
    )
