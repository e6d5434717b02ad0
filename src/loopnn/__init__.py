"""loopnn: loop neural networks (GPT-2 models that loop a subset of their blocks), after Ng & Wang 2024.

from loopnn import ModelConfig, LoopGPT
model = LoopGPT(ModelConfig(n_layer=6, n_loops=6))
logits, loss = model(idx, targets)            # trained loop count
logits, _ = model(idx, n_loops=8)             # test-time looping
"""

from loopnn.config import PRESETS, ModelConfig, TrainConfig, preset
from loopnn.errors import LoopnnError
from loopnn.recipes import resolve


def __getattr__(name: str):
    # The model (and torch) load on first use, so `loopnn --help` and fast-failing commands stay quick.
    if name == "LoopGPT":
        from loopnn.model import LoopGPT

        return LoopGPT
    if name == "KVCache":
        from loopnn.kvcache import KVCache

        return KVCache
    raise AttributeError(f"module 'loopnn' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "ModelConfig",
    "TrainConfig",
    "PRESETS",
    "preset",
    "resolve",
    "LoopGPT",
    "KVCache",
    "LoopnnError",
    "__version__",
]
