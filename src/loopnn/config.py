"""Configuration: `ModelConfig`, `TrainConfig` and named presets.

Every config validates itself in `__post_init__` and raises `LoopnnError` naming the field and the allowed values.
Reading configs from JSON and TOML, the shipped recipes and the precedence defaults < preset < TOML file < CLI
flags live in loopnn.recipes; `to_dict` is what runs and checkpoints save.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from loopnn.errors import LoopnnError

LOOP_STRATEGIES = ("stack", "layer")
# repeat: x <- F(x); residual: x <- x + F(x); gated: x <- x + a_n * (F(x) - x); gated_residual: x <- x + a_n * F(x)
LOOP_RULES = ("repeat", "residual", "gated", "gated_residual")
INIT_DEPTHS = ("unique", "effective")
# Input injection before every loop after the first (stack strategy): none (the paper), add: x <- x + e0,
# concat: x <- W [x; e0] (Huginn's adapter). e0 is the state entering the loop region.
INJECTIONS = ("none", "add", "concat")
# Scale of the looped blocks' residual branches (arXiv 2606.18524): none, 1/n_loops, 1/sqrt(n_loops), with n_loops the
# trained loop count, or a constant (residual_multiplier). With n_loops = 1 every choice is the plain model.
RESIDUAL_SCALES = ("none", "inverse", "inverse_sqrt", "constant")
# Normalisation of the state at each loop boundary, before injection: none, unit (no-affine RMSNorm), input (the same,
# rescaled to the RMS of the loop region's input e0, position by position).
LOOP_NORMS = ("none", "unit", "input")
PARALLEL = ("ddp", "fsdp")
LOOP_SAMPLING = ("fixed", "uniform", "poisson")
MAX_LOOPS = 1024  # the most loops a model is trained or run with (a larger count would run for hours)
TRACKERS = ("none", "tensorboard", "wandb")  # TrainConfig.tracker (loopnn.tracking)
DTYPES = ("auto", "float32", "bfloat16", "float16")  # auto: bf16 autocast on CUDA (fp16 before Ampere), else fp32
FLOAT32_MAX = 3.4028234663852886e38  # values torch keeps in float32 (lr, gates, weight decay) must stay below


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise LoopnnError(msg)


def _check_floats(cfg: Any) -> None:
    """Every float field finite and within float32's range: torch holds these values (and the optimizer's products
    of them) in float32, where a larger one ends in an overflow deep inside a step. Field-specific ranges follow in
    each __post_init__."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if str(f.type).startswith("float") and isinstance(value, int | float) and not isinstance(value, bool):
            _check(
                math.isfinite(value) and abs(value) <= FLOAT32_MAX,
                f"{f.name} must be a number finite in float32 (|{f.name}| <= {FLOAT32_MAX:.4g}), got {value}",
            )


@dataclass
class ModelConfig:
    """GPT-2 shape plus the loop: blocks [loop_start, loop_end) run n_loops times."""

    vocab_size: int = 50257
    """Token ids the model knows (GPT-2 BPE: 50257; `prepare` records the corpus's, which train reads)."""
    block_size: int = 1024
    """Longest sequence the model can read (rows of the learned position embedding)."""
    n_layer: int = 12
    """Unique transformer blocks (each registered once, however often it is looped)."""
    n_head: int = 12
    """Attention heads per block; n_embd must be a multiple of it."""
    n_embd: int = 768
    """Width of the residual stream."""
    dropout: float = 0.0
    """Dropout on attention weights and residual branches while training (0 turns it off)."""
    bias: bool = True
    """Bias vectors in the linear layers and LayerNorms, as GPT-2 has them."""
    loop_start: int = 0
    """First block of the loop region [loop_start, loop_end); blocks before it run once (a prelude)."""
    loop_end: int | None = None
    """End of the loop region, exclusive; blocks from here on run once (a coda). Unset: the last block, so the
    whole stack loops (the paper's setting)."""
    n_loops: int = 1
    """Times the loop region runs per forward pass when training (the paper's N; 1 is the plain model)."""
    loop_strategy: str = "stack"
    """stack: run the whole region, then again; layer: loop each block in place before the next."""
    loop_rule: str = "repeat"
    """Update between loops: repeat x <- F(x); residual x <- x + F(x); gated x <- x + a_n (F(x) - x); gated_residual
    x <- x + a_n F(x), with a_n a learned vector per loop."""
    gate_init: float | None = None
    """Initial value of the gated rules' a_n. Unset: 1.0 for gated (starts as repeat), 0.1 for gated_residual."""
    init_depth: str = "unique"
    """Depth L in GPT-2's scaled init of residual projections (std 0.02 / sqrt(2L)): unique blocks or effective
    block applications."""
    injection: str = "none"
    """Re-inject the loop region's input e0 before loops 2..N (stack strategy): none (the paper); add x <- x + e0;
    concat x <- W [x; e0] (a learned adapter)."""
    loop_embedding: bool = False
    """Add a learned vector per loop to the state before that loop (zero at init, so training starts from the plain
    looped model), letting shared blocks tell their iterations apart."""
    residual_scale: str = "none"
    """Multiply the looped blocks' residual branches by 1 (none), 1/N (inverse), 1/sqrt(N) (inverse_sqrt) or
    residual_multiplier (constant), N the trained loop count; with N = 1 every choice is the plain model."""
    residual_multiplier: float = 0.25
    """The looped blocks' branch multiplier under residual_scale constant (0.25 in the 2026 looped GPT-2 recipe)."""
    loop_norm: str = "none"
    """Normalise the state at each loop boundary (before loops 2..N, ahead of injection; stack strategy): none;
    unit, a no-affine RMSNorm; input, the same rescaled to the RMS of the loop region's input e0 at each position
    (GPT-2's residual stream starts far below unit RMS, so unit shrinks every later branch relative to the state)."""
    injection_scale: float = 1.0
    """Multiplier of e0 in injection add (x <- x + s e0; 0.707 in the 2026 looped GPT-2 recipe)."""
    coda_injection: bool = False
    """Apply the boundary norm and injection once more after the last loop, where the loop region hands its state to
    the coda (or to ln_f and the head when there is no coda). Needs injection add or concat."""

    def __post_init__(self) -> None:
        if self.loop_end is None:
            self.loop_end = self.n_layer
        _check_floats(self)
        _check(self.vocab_size >= 2, f"vocab_size must be >= 2, got {self.vocab_size}")
        _check(self.block_size >= 1, f"block_size must be >= 1, got {self.block_size}")
        _check(self.n_layer >= 1, f"n_layer must be >= 1, got {self.n_layer}")
        _check(self.n_head >= 1, f"n_head must be >= 1, got {self.n_head}")
        _check(
            self.n_embd >= 1 and self.n_embd % self.n_head == 0,
            f"n_embd ({self.n_embd}) must be a positive multiple of n_head ({self.n_head})",
        )
        _check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        _check(
            0 <= self.loop_start < self.loop_end <= self.n_layer,
            f"loop range [loop_start, loop_end) = [{self.loop_start}, {self.loop_end}) must satisfy "
            f"0 <= loop_start < loop_end <= n_layer ({self.n_layer})",
        )
        _check(1 <= self.n_loops <= MAX_LOOPS, f"n_loops must be between 1 and {MAX_LOOPS}, got {self.n_loops}")
        _check(
            self.loop_strategy in LOOP_STRATEGIES,
            f"loop_strategy must be one of {', '.join(LOOP_STRATEGIES)}; got {self.loop_strategy!r}",
        )
        _check(
            self.loop_rule in LOOP_RULES,
            f"loop_rule must be one of {', '.join(LOOP_RULES)}; got {self.loop_rule!r}",
        )
        _check(
            self.init_depth in INIT_DEPTHS,
            f"init_depth must be one of {', '.join(INIT_DEPTHS)}; got {self.init_depth!r}",
        )
        if self.gate_init is not None:  # a_n scales a branch, like residual_multiplier
            _check(abs(self.gate_init) <= 1e3, f"gate_init must be in [-1000, 1000], got {self.gate_init}")
        _check(
            self.injection in INJECTIONS,
            f"injection must be one of {', '.join(INJECTIONS)}; got {self.injection!r}",
        )
        _check(
            self.residual_scale in RESIDUAL_SCALES,
            f"residual_scale must be one of {', '.join(RESIDUAL_SCALES)}; got {self.residual_scale!r}",
        )
        _check(
            self.injection == "none" or self.loop_strategy == "stack",
            f"injection {self.injection!r} needs loop_strategy 'stack' (the layer strategy has no loop-wide state)",
        )
        _check(
            self.loop_norm in LOOP_NORMS, f"loop_norm must be one of {', '.join(LOOP_NORMS)}; got {self.loop_norm!r}"
        )
        _check(
            self.loop_norm == "none" or self.loop_strategy == "stack",
            f"loop_norm {self.loop_norm!r} needs loop_strategy 'stack' (the layer strategy has no loop boundary)",
        )
        for name in ("residual_multiplier", "injection_scale"):
            value = getattr(self, name)
            _check(0 < value <= 1e3, f"{name} must be in (0, 1000], got {value}")
        _check(
            not self.coda_injection or self.injection != "none",
            "coda_injection needs injection add or concat (it re-injects e0 once more, at the hand-over to the coda)",
        )

    @property
    def padded_vocab_size(self) -> int:
        """Embedding rows: vocab rounded up to a multiple of 64 (faster matmuls); logits are cut back."""
        return (self.vocab_size + 63) // 64 * 64

    @property
    def n_loop_blocks(self) -> int:
        return self.loop_end - self.loop_start

    def effective_depth(self, n_loops: int | None = None) -> int:
        """Block applications per forward pass."""
        n = self.n_loops if n_loops is None else n_loops
        return self.n_layer + (n - 1) * self.n_loop_blocks

    @property
    def branch_scale(self) -> float:
        """Multiplier of the looped blocks' residual branches (ModelConfig.residual_scale)."""
        if self.residual_scale == "inverse":
            return 1.0 / self.n_loops
        if self.residual_scale == "inverse_sqrt":
            return 1.0 / math.sqrt(self.n_loops)
        if self.residual_scale == "constant" and self.n_loops > 1:
            return self.residual_multiplier
        return 1.0

    @property
    def gated(self) -> bool:
        return self.loop_rule in ("gated", "gated_residual")

    @property
    def resolved_gate_init(self) -> float:
        if self.gate_init is not None:
            return self.gate_init
        return 1.0 if self.loop_rule == "gated" else 0.1


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping. Defaults follow nanoGPT's GPT-2 recipe (the paper gives none)."""

    data_dir: str = "data/shakespeare-bytes"
    """Prepared corpus to train on (a directory written by `loopnn prepare`)."""
    out_dir: str = "runs/default"
    """Run directory (runs.RunDir: its config, metrics, checkpoints and summary)."""
    batch_size: int = 8
    """Sequences per micro-batch, per process."""
    grad_accum: int = 1
    """Micro-batches per optimizer step, over all processes (must be divisible by their number), so the global
    batch does not change with the GPU count."""
    seq_len: int | None = None
    """Tokens per training sequence. Unset: the model's block_size."""
    max_steps: int = 1000
    """Optimizer steps to train for (the learning-rate schedule spans them)."""
    lr: float = 6e-4
    """Peak learning rate of AdamW, reached after warmup_steps."""
    min_lr_ratio: float = 0.1
    """The cosine schedule decays to lr x min_lr_ratio at max_steps."""
    warmup_steps: int = 100
    """Steps of linear learning-rate warmup from 0 (too few can break small models: docs/results.md)."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay on 2-D weights (matrices, embeddings); biases, norms and per-loop vectors get
    none."""
    beta1: float = 0.9
    """AdamW's first-moment decay."""
    beta2: float = 0.95
    """AdamW's second-moment decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    eval_interval: int = 100
    """Evaluate on the validation stream every this many steps (0: only at the end)."""
    eval_tokens: int = 65536
    """Tokens of the fixed validation stream used for the periodic evaluations."""
    log_interval: int = 10
    """Write a training line to metrics.jsonl every this many steps."""
    ckpt_interval: int = 0
    """Write a checkpoint every this many steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept in out_dir/checkpoints; older ones are deleted."""
    seed: int = 1337
    """Seed of the initial weights, the batch order and any sampled loop counts."""
    device: str = "auto"
    """auto (CUDA if present, else MPS on Apple silicon, else CPU), cpu, mps, cuda or cuda:N."""
    dtype: str = "auto"
    """Autocast dtype: auto (bf16 on CUDA, fp16 on CUDA GPUs without bf16 such as T4 and V100, fp32 on MPS and CPU),
    float32, bfloat16 or float16 (with a GradScaler; not with parallel fsdp)."""
    compile: bool = False
    """torch.compile each block (a looped block compiles once)."""
    activation_checkpointing: bool = False
    """Recompute each block application in backward (non-reentrant) to save activation memory."""
    threads: int = 0
    """CPU threads for torch (torch.set_num_threads); 0: torch's default, one per core."""
    parallel: str = "ddp"
    """Under torchrun: ddp (weights replicated) or fsdp (FSDP2: each block, then the root, sharded)."""
    loop_sampling: str = "fixed"
    """Loop count per step: fixed (the model's n_loops), uniform in [min_loops, max_loops], or poisson with mean
    n_loops; the draw depends on (seed, step) only, so all ranks and resumed runs agree."""
    min_loops: int = 1
    """Lowest sampled loop count (flag alias --loop-min)."""
    max_loops: int | None = None
    """Highest sampled loop count (flag alias --loop-max). Unset: 2 x n_loops - min_loops, so a uniform draw has
    mean n_loops."""
    backprop_loops: int | None = None
    """Truncated backprop: gradients flow through the last k loops only. Unset: through all of them."""
    loop_delay: float = 0.0
    """Fraction of max_steps trained with 1 loop before looping starts."""
    loop_ramp: float = 0.0
    """Fraction of max_steps, after loop_delay, over which the loop count grows 1 -> n_loops in equal stages."""
    loop_grow_at: float = 0.0
    """Loop growth: train with loop_grow_from loops until this fraction of max_steps, then with the model's n_loops
    (0: off). The 2026 recipe grows 2 -> 4 at 0.75-0.88."""
    loop_grow_from: int = 2
    """Loop count trained before loop_grow_at."""
    rewarm_steps: int = 0
    """Re-warm the learning rate linearly over this many steps whenever the scheduled loop count rises (loop growth,
    delay or ramp); 0: no re-warm."""
    progress: bool = True
    """Show a progress bar while training."""
    tracker: str = "none"
    """Mirror metrics.jsonl to an experiment tracker: none, tensorboard (event files in RUN/tensorboard) or wandb
    (offline unless WANDB_MODE is set); needs loopnn[track]. Rank 0 only; a resume continues the same curves."""
    tracker_project: str | None = None
    """W&B project of the run. Unset: loopnn. (TensorBoard has no projects: point it at the runs' directory.)"""

    def __post_init__(self) -> None:
        _check_floats(self)
        for name in ("batch_size", "grad_accum", "max_steps", "eval_tokens", "log_interval"):
            _check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_interval", "ckpt_interval"):
            _check(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        _check(0 <= self.threads <= 4096, f"threads must be in [0, 4096] (0: torch's default), got {self.threads}")
        _check(-(2**63) <= self.seed < 2**64, f"seed must fit in 64 bits, got {self.seed}")
        _check(self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.seq_len is not None:
            _check(self.seq_len >= 1, f"seq_len must be >= 1, got {self.seq_len}")
        _check(0 < self.lr <= FLOAT32_MAX, f"lr must be a positive number finite in float32, got {self.lr}")
        _check(0.0 <= self.min_lr_ratio <= 1.0, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _check(0 <= self.weight_decay <= FLOAT32_MAX, f"weight_decay must be >= 0 and finite, got {self.weight_decay}")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1 and beta2 must be in [0, 1)")
        # AdamW's first step moves a weight by lr / (1 - beta1) and scales it by 1 - lr * weight_decay, in float32.
        first_step = self.lr / (1 - self.beta1)
        _check(
            first_step <= FLOAT32_MAX,
            f"lr ({self.lr}) overflows float32 in AdamW's first step (lr / (1 - beta1) = {first_step:.3g} > "
            f"{FLOAT32_MAX:.4g}); use a smaller lr",
        )
        _check(
            self.lr * self.weight_decay < 1,
            f"lr x weight_decay ({self.lr * self.weight_decay:.3g}) must be below 1, or each step would zero or flip "
            "the sign of every decayed weight; lower lr or weight_decay",
        )
        _check(self.grad_clip >= 0, f"grad_clip must be >= 0 (0 disables), got {self.grad_clip}")
        _check(
            self.dtype in DTYPES,
            f"dtype must be auto, float32, bfloat16 or float16; got {self.dtype!r}",
        )
        _check(
            self.device in ("auto", "cpu", "mps") or self.device.startswith("cuda"),
            f"device must be auto, cpu, mps, cuda or cuda:N; got {self.device!r}",
        )
        _check(self.parallel in PARALLEL, f"parallel must be one of {', '.join(PARALLEL)}; got {self.parallel!r}")
        _check(
            self.loop_sampling in LOOP_SAMPLING,
            f"loop_sampling must be one of {', '.join(LOOP_SAMPLING)}; got {self.loop_sampling!r}",
        )
        _check(1 <= self.min_loops < 2**31, f"min_loops must be in [1, 2**31), got {self.min_loops}")
        if self.max_loops is not None:
            _check(self.max_loops < 2**31, f"max_loops must be below 2**31, got {self.max_loops}")
        if self.max_loops is not None:
            _check(
                self.max_loops >= self.min_loops,
                f"max_loops ({self.max_loops}) must be >= min_loops ({self.min_loops})",
            )
        _check(
            0.0 <= self.loop_delay < 1.0 and 0.0 <= self.loop_ramp <= 1.0 and self.loop_delay + self.loop_ramp <= 1.0,
            f"loop_delay ({self.loop_delay}) and loop_ramp ({self.loop_ramp}) must be fractions of the steps in "
            "[0, 1) and [0, 1] with a sum of at most 1",
        )
        _check(0.0 <= self.loop_grow_at < 1.0, f"loop_grow_at must be a fraction in [0, 1), got {self.loop_grow_at}")
        _check(
            self.loop_grow_at == 0.0 or (self.loop_delay == 0.0 and self.loop_ramp == 0.0),
            "loop_grow_at cannot be combined with loop_delay or loop_ramp (one loop schedule at a time)",
        )
        _check(1 <= self.loop_grow_from < 2**31, f"loop_grow_from must be >= 1, got {self.loop_grow_from}")
        _check(self.tracker in TRACKERS, f"tracker must be one of {', '.join(TRACKERS)}; got {self.tracker!r}")
        _check(self.rewarm_steps >= 0, f"rewarm_steps must be >= 0, got {self.rewarm_steps}")
        if self.backprop_loops is not None:
            _check(
                self.backprop_loops >= 1, f"backprop_loops must be >= 1 (or unset for all), got {self.backprop_loops}"
            )

    def scheduled_loops(self, n_loops: int, step: int) -> int:
        """The most loops step `step` may run under loop_grow_at / loop_delay / loop_ramp (n_loops when none is set)."""
        position = step / self.max_steps
        if position < self.loop_grow_at:
            return min(self.loop_grow_from, n_loops)
        if position < self.loop_delay:
            return 1
        if position < self.loop_delay + self.loop_ramp:
            return min(1 + int((position - self.loop_delay) / self.loop_ramp * n_loops), n_loops)
        return n_loops

    def rewarm_factor(self, n_loops: int, step: int) -> float:
        """Learning-rate multiplier at `step`: (steps since the scheduled loop count last rose + 1) / rewarm_steps
        within rewarm_steps of a rise, else 1."""
        for s in range(step, max(step - self.rewarm_steps, 0), -1):
            if self.scheduled_loops(n_loops, s) > self.scheduled_loops(n_loops, s - 1):
                return (step - s + 1) / self.rewarm_steps
        return 1.0

    def loop_range(self, n_loops: int) -> tuple[int, int]:
        """(lowest, highest) loop count a step may run, for a model trained with n_loops."""
        if self.loop_sampling == "fixed":
            return n_loops, n_loops
        high = self.max_loops if self.max_loops is not None else max(2 * n_loops - self.min_loops, self.min_loops)
        return self.min_loops, high


# Presets name model shapes only; TOML recipes in loopnn/configs/ add the training settings.
_GPT2 = dict(vocab_size=50257, block_size=1024, n_head=12, n_embd=768)
_DEMO_SHAPE = dict(vocab_size=2048, block_size=128, n_layer=1, n_head=4, n_embd=128, n_loops=2)
PRESETS: dict[str, dict[str, Any]] = {
    # The paper's table of models. Names count parameters without position embeddings, as nanoGPT does.
    "gpt2-124m": dict(_GPT2, n_layer=12),
    "loop-81m": dict(_GPT2, n_layer=6, n_loops=6),
    "gpt2-45m": dict(_GPT2, n_layer=1),
    "loop-45m": dict(_GPT2, n_layer=1, n_loops=2),
    # Unit-test size: every test builds this.
    "debug": dict(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=32, n_loops=2),
    # CPU sizes (byte-level vocab by default; prepare sets vocab_size from the data).
    "cpu-small": dict(vocab_size=256, block_size=256, n_layer=2, n_head=4, n_embd=128),
    "cpu-base": dict(vocab_size=256, block_size=256, n_layer=4, n_head=4, n_embd=256),
    # The shape of `loopnn demo --lm`'s looped model (1 block x 2 loops, 1/N residual scale + input injection 'add',
    # BPE 2048; the demo adds the loop-boundary norm, demo.RECIPE); `loopnn bench` measures it by default.
    "demo": dict(_DEMO_SHAPE, residual_scale="inverse", injection="add"),
}


def preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise LoopnnError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return dict(PRESETS[name])


def to_dict(cfg: ModelConfig | TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


__all__ = [
    "ModelConfig",
    "TrainConfig",
    "PRESETS",
    "LOOP_RULES",
    "LOOP_STRATEGIES",
    "INJECTIONS",
    "RESIDUAL_SCALES",
    "preset",
    "to_dict",
]
