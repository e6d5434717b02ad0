"""Settings of the commands other than train: AdaptiveConfig (per-token early exit in eval, generate and serve) and
BenchConfig (`loopnn bench`), and the choice lists of flags whose owners import torch or numpy (CRITERIA,
LOCAL_FORMATS). Torch-free, so the CLI builds their flags from these classes, each field's docstring its `--help`
(loopnn.fields), without importing torch.

    from loopnn.options import AdaptiveConfig, BenchConfig
    AdaptiveConfig(criterion="kl", threshold=0.05)     # also importable from loopnn.adaptive / loopnn.generate
    BenchConfig(preset="demo", steps=20)               # also importable from loopnn.bench
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from loopnn.errors import LoopnnError

CRITERIA = ("kl", "entropy", "hidden")
LOCAL_FORMATS = ("text", "jsonl", "parquet")  # the local file formats `prepare` reads (loopnn.data.sources)


@dataclass
class AdaptiveConfig:
    """When a token stops looping. max_loops None: the model's trained n_loops (or the call's n_loops)."""

    criterion: str = "kl"
    """What settles a token: kl, the KL divergence between the predictions of successive loops; entropy, the change
    of the prediction's entropy; hidden, the relative change of the loop state."""
    threshold: float = 0.05
    """A token stops looping once the criterion falls below this (kl 0.05 is the setting measured in
    docs/benchmarks.md; 0 never stops early)."""
    min_loops: int = 1
    """Loops every token runs before it may stop."""
    max_loops: int | None = None
    """Most loops a token runs. Unset: the trained n_loops (or --n-loops)."""

    def __post_init__(self) -> None:
        if self.criterion not in CRITERIA:
            raise LoopnnError(f"adaptive criterion must be one of {', '.join(CRITERIA)}; got {self.criterion!r}")
        if not (self.threshold >= 0 and math.isfinite(self.threshold)):
            raise LoopnnError(f"adaptive threshold must be a finite number >= 0, got {self.threshold}")
        if self.min_loops < 1:
            raise LoopnnError(f"adaptive min_loops must be >= 1, got {self.min_loops}")
        if self.max_loops is not None and self.max_loops < self.min_loops:
            raise LoopnnError(f"adaptive max_loops ({self.max_loops}) must be >= min_loops ({self.min_loops})")


@dataclass
class BenchConfig:
    """What `loopnn bench` measures, on a random-weight model of a preset's shape (docs/benchmarks.md)."""

    preset: str = "demo"
    """Model shape (random weights)."""
    n_loops: int | None = None
    """Loop count. Unset: the preset's."""
    loop_rule: str | None = None
    """Update rule between loops. Unset: the preset's."""
    batch_size: int = 16
    """Sequences per timed training step."""
    seq_len: int | None = None
    """Tokens per sequence. Unset: the model's block_size."""
    steps: int = 10
    """Timed training steps per implementation."""
    warmup: int = 3
    """Untimed steps before them (allocator, autotuning, compile)."""
    prompt_len: int = 32
    """Prompt tokens of the generation runs."""
    new_tokens: int = 64
    """Greedy tokens per generation run."""
    gen_repeats: int = 3
    """Timed repeats of each generation run (their median is reported)."""
    prefill_repeats: int = 30
    """Timed prefills per implementation (a prefill takes ~1.5 ms on the demo preset: 3 timings of it are noise)."""
    compile: bool = False
    """torch.compile each block (both implementations)."""
    device: str = "auto"
    """auto (CUDA if present, else CPU), cpu, cuda or cuda:N."""
    threads: int = 0
    """CPU threads for torch; 0: torch's default, one per core."""
    hf: bool = True
    """Also time the transformers GPT2LMHeadModel reference with the same weights and loops."""
    seed: int = 0
    """Seed of the random weights and token batches."""
    memory: bool = True
    """Peak training memory at 1 and memory_loops loops, with and without activation checkpointing."""
    memory_loops: int = 6
    """Loops of the memory comparison with 1 loop."""
    memory_subprocess: bool = True
    """Measure each memory figure in a fresh subprocess (off: in this process; quick, but freed memory can hide a
    peak)."""
    adaptive: bool = True
    """Wall time of adaptive-exit decoding against fixed looping."""
    adaptive_run: str | None = None
    """A trained run for the adaptive figure (a random-weight model settles nowhere useful): greedy decoding of its
    validation prompts. Unset: the preset's random-weight model."""
    adaptive_prompts: int = 4
    """Validation prompts of adaptive_run decoded (random tokens where its data is gone)."""

    def __post_init__(self) -> None:
        counts = ("batch_size", "steps", "prompt_len", "new_tokens", "gen_repeats", "prefill_repeats", "memory_loops")
        for name in (*counts, "adaptive_prompts"):
            if getattr(self, name) < 1:
                raise LoopnnError(f"bench --{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0 or self.threads < 0:
            raise LoopnnError(f"bench --warmup and --threads must be >= 0, got {self.warmup} and {self.threads}")
        for name in ("n_loops", "seq_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise LoopnnError(f"bench --{name.replace('_', '-')} must be >= 1 (or unset), got {value}")
