"""A looped model written out as a plain GPT-2: one GPT2LMHeadModel layer per block application.

    gpt2 = unrolled_gpt2(model)          # LoopGPT -> transformers GPT2LMHeadModel of depth effective_depth()
    reason = why_not_unrollable(model)   # None, or the one line that names the setting that cannot fold

Under the `repeat` rule a loop only re-applies the same blocks, so the model is the GPT-2 whose layers are its block
applications in loop order (loop.slot, the KV-cache order, is exactly that order). Residual scaling folds into
the weights: x + s * c_proj(y) = x + (s W) y + s b, so the looped blocks' attention and MLP output projections
are multiplied by s. Every other ModelConfig field either does not change the computation at inference (dropout,
init_depth, gate_init without a gate, injection_scale without injection, bias=False as zero biases; injection and
loop_norm when the loop runs once) or is refused.
"""

from __future__ import annotations

import torch

from loopnn import loop
from loopnn.model import LoopGPT

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_SCALED = ("attn.c_proj.weight", "attn.c_proj.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")


def why_not_unrollable(model: LoopGPT, n_loops: int | None = None) -> str | None:
    """The reason a model run at `n_loops` (default: trained) loops cannot be written as a plain GPT-2 (one line
    naming the setting), or None. Injection and the boundary norm act only between loops, so a one-loop model
    (a demo's base) unrolls whatever they are set to, unless coda_injection applies them at the coda."""
    cfg = model.config
    between_loops = (cfg.n_loops if n_loops is None else n_loops) > 1
    if cfg.loop_rule != "repeat":
        kind = "a learned per-loop gate a_n" if cfg.gated else "the loop's input state x"
        return f"loop_rule {cfg.loop_rule!r} mixes {kind} into each loop's update; a GPT-2 layer only adds its branches"
    if cfg.coda_injection:
        return "coda_injection re-injects e0 at the hand-over to the coda; GPT-2 has no such input"
    if cfg.injection != "none" and between_loops:
        return (
            f"injection {cfg.injection!r} re-adds the loop region's input e0 before each loop; GPT-2 has no such input"
        )
    if cfg.loop_norm != "none" and between_loops:
        return f"loop_norm {cfg.loop_norm!r} normalises the state between loops; GPT-2 has no norm between layers"
    if cfg.loop_embedding:
        return "loop_embedding adds a learned vector before each loop; GPT-2 layers have no such vector"
    return None


def unrolled_gpt2(model: LoopGPT, n_loops: int | None = None):
    """The GPT2LMHeadModel computing `model` at `n_loops` loops (default: the trained count); raises LoopnnError
    naming the setting when the loop cannot fold (why_not_unrollable)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from loopnn.errors import LoopnnError

    reason = why_not_unrollable(model, n_loops)
    if reason is not None:
        raise LoopnnError(f"cannot unroll into a plain GPT-2: {reason}; export it without --unroll")
    cfg = model.config
    n = cfg.n_loops if n_loops is None else n_loops
    hf_cfg = GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.block_size,
        n_embd=cfg.n_embd,
        n_layer=cfg.effective_depth(n),
        n_head=cfg.n_head,
        activation_function="gelu_new",  # GELU-tanh, as loopnn's MLP
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        layer_norm_epsilon=1e-5,
        bos_token_id=50256 if cfg.vocab_size > 50256 else None,  # GPT2Config's default ids fit GPT-2's vocab only
        eos_token_id=50256 if cfg.vocab_size > 50256 else None,
    )
    gpt2 = GPT2LMHeadModel(hf_cfg)
    tensors = _unrolled_state(model, n)
    for key, value in gpt2.state_dict().items():  # bias=False models: GPT-2 always has biases; zeros are the same
        if key not in tensors and key.endswith(".bias") and not key.endswith("attn.bias"):
            tensors[key] = torch.zeros_like(value)
    missing = [
        k for k in gpt2.state_dict() if k not in tensors and k != "lm_head.weight" and not k.endswith("attn.bias")
    ]
    if missing:
        raise LoopnnError(f"unroll: no loopnn tensor for {missing[:3]}")
    gpt2.load_state_dict(tensors, strict=False)
    gpt2.tie_weights()
    return gpt2.to(next(model.parameters()).dtype).eval()


def _unrolled_state(model: LoopGPT, n: int) -> dict[str, torch.Tensor]:
    """GPT-2 tensors: layer loop.slot(i, loop) <- block i, Conv1D-transposed, looped projections scaled."""
    cfg = model.config
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tensors = {
        "transformer.wte.weight": state["transformer.wte.weight"][: cfg.vocab_size].clone(),
        "transformer.wpe.weight": state["transformer.wpe.weight"].clone(),
    }
    tensors |= {k: state[k].clone() for k in ("transformer.ln_f.weight", "transformer.ln_f.bias") if k in state}
    for block in range(cfg.n_layer):
        looped = cfg.loop_start <= block < cfg.loop_end
        for index in range(n) if looped else [0]:
            layer = loop.slot(cfg, n, block, index)
            prefix = f"transformer.h.{block}."
            for key, value in state.items():
                if not key.startswith(prefix):
                    continue
                name = key[len(prefix) :]
                value = value.t() if name in _CONV1D else value
                if looped and name in _SCALED:
                    value = value * cfg.branch_scale  # x + s * (W y + b): the branch scale folds into W and b
                tensors[f"transformer.h.{layer}.{name}"] = value.contiguous().clone()
    return tensors
