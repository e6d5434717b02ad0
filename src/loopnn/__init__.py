"""loopnn: loop neural networks (GPT-2 models that loop a subset of their blocks), after Ng & Wang 2024.

from loopnn import ModelConfig, LoopGPT
model = LoopGPT(ModelConfig(n_layer=6, n_loops=6))
logits, loss = model(idx, targets)            # trained loop count
logits, _ = model(idx, n_loops=8)             # test-time looping
"""

from loopnn.config import PRESETS, ModelConfig, TrainConfig, preset, resolve
from loopnn.errors import LoopnnError
from loopnn.model import KVCache, LoopGPT

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
