"""Weights in and out: loopnn checkpoint <-> HF directory, GPT-2 -> LoopGPT -> GPT-2, dense -> looped init.

GPT-2's HF checkpoints store attention/MLP weights as Conv1D, i.e. (in, out): the transpose of nn.Linear's
(out, in). LoopGPT pads the vocabulary to a multiple of 64, so GPT-2's 50257 embedding rows gain zero rows
(never read: logits are cut back to vocab_size). Everything else maps key by key.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from loopnn.atomic import atomic_write_text, replace_dir
from loopnn.checkpoint import MAX_STEP, WEIGHTS, save_checkpoint
from loopnn.config import ModelConfig
from loopnn.errors import LoopnnError
from loopnn.hf.card import model_card
from loopnn.jsonio import field, read_json
from loopnn.memory import check_fits
from loopnn.model import LoopGPT
from loopnn.recipes import model_config_from_dict, train_config_from_dict
from loopnn.runs import EXPORT_META, RUN_CONFIG, Run, is_export, is_hf_directory, open_run, read_hf_config

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except FileNotFoundError:
        raise LoopnnError(f"{path} is missing") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LoopnnError(f"{path} is not a readable safetensors file ({str(e)[:160]})") from None


def _read_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, or the shards listed in model.safetensors.index.json. Pickle files are refused."""
    single, index = path / WEIGHTS, path / f"{WEIGHTS}.index.json"
    if single.is_file():
        return _load_safetensors(single)
    if index.is_file():
        weight_map = field(read_json(index, "safetensors index"), "weight_map", "object", str(index))
        shards = set()
        for key, shard in weight_map.items():
            if not isinstance(shard, str) or not shard or shard != Path(shard).name or shard in (".", ".."):
                raise LoopnnError(f"{index}: weight_map[{key[:40]!r}] must name a file in {path}, got {shard!r}")
            shards.add(shard)
        return {k: v for shard in sorted(shards) for k, v in _load_safetensors(path / shard).items()}
    raise LoopnnError(f"{path} holds no {WEIGHTS}; loopnn reads only safetensors HF directories")


def _read_json(path: Path) -> dict[str, Any]:
    return read_json(path, path.name)


# ---------------------------------------------------------------------------------------------------------------
# loopnn checkpoint <-> HF LoopnnForCausalLM directory


def export_hf(
    checkpoint_or_run_dir: str | Path | Run, out_dir: str | Path, tokenizer: Any = None, unroll: bool = False
) -> Path:
    """Write a loopnn checkpoint (or a run's newest one) as an HF directory loadable by AutoModelForCausalLM:
    weights, config, the run's tokenizer (so AutoTokenizer and pipeline() work), a model card (README.md) and
    loopnn.json. `tokenizer`: a transformers tokenizer to save instead of the run's own. unroll: a plain
    GPT2LMHeadModel of the effective depth (hf.unroll; refused, naming why, for loops that do not fold). A run
    that runs.open_run has opened already is taken as it is."""
    from loopnn.hf.modeling import LoopnnForCausalLM
    from loopnn.hf.unroll import unrolled_gpt2

    run = checkpoint_or_run_dir if isinstance(checkpoint_or_run_dir, Run) else open_run(checkpoint_or_run_dir)
    model, meta = run.model, run.meta
    hf_model = unrolled_gpt2(model) if unroll else LoopnnForCausalLM.from_loopgpt(model)
    if tokenizer is None and run.records_tokenizer:
        from loopnn.hf.tokenizer import hf_tokenizer

        tokenizer = hf_tokenizer(run.tokenizer, model.config.block_size)
    _set_special_tokens(hf_model, tokenizer)
    card = model_card(
        model.config, meta, tokenizer is not None, params=model.num_params(), where=str(out_dir), unrolled=unroll
    )
    return _write_export(out_dir, meta, lambda tmp: hf_model.save_pretrained(tmp), tokenizer, card)


def _set_special_tokens(hf_model: Any, tokenizer: Any) -> None:
    """End-of-text and padding ids in config and generation config, so generate() and pipeline() stop at EOT."""
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    for cfg in (hf_model.config, hf_model.generation_config):
        cfg.eos_token_id, cfg.pad_token_id = eos, pad
        if eos is not None:
            cfg.bos_token_id = tokenizer.bos_token_id


def _write_export(out_dir: str | Path, meta: dict[str, Any], save_model, tokenizer: Any, card: str) -> Path:
    out = Path(out_dir)
    if out.exists() and not (out.is_dir() and _replaceable(out)):
        raise LoopnnError(f"{out} exists and is not an empty directory or an HF model directory; choose a new --out")
    # Written beside the target, then moved into place: a failure (full disk, read-only target) leaves no
    # half-written directory and an earlier export at `out` intact.
    tmp = out.with_name(f".{out.name}.export-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        try:
            save_model(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            atomic_write_text(tmp / "README.md", card)
        except OSError as e:
            raise LoopnnError(f"could not write the export beside {out}: {e.strerror or e}") from None
        keep = {k: meta.get(k) for k in ("step", "train_config", "info")}
        payload = dict(keep, format="loopnn-hf-export-v1", source=str(meta["path"]))
        atomic_write_text(tmp / EXPORT_META, json.dumps(payload, indent=2, sort_keys=True) + "\n")
        if out.exists():
            replace_dir(tmp, out)  # tmp now holds the previous export, removed below
        else:
            try:
                os.replace(tmp, out)
            except OSError as e:
                raise LoopnnError(f"could not move the export into {out}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _replaceable(out: Path) -> bool:
    """An empty directory or an earlier HF export (config.json): what export may replace as a whole."""
    return not any(out.iterdir()) or (out / RUN_CONFIG).is_file()


def import_hf(hf_dir: str | Path, run_dir_or_ckpt_dir: str | Path, step: int | None = None) -> Path:
    """Read an HF loopnn directory back into a loopnn checkpoint; returns the checkpoint directory.

    A path of the form RUN/checkpoints/step-N is taken as that checkpoint; any other path as a run directory
    (the step then comes from `step`, the export's loopnn.json, or 0). Tensors are copied bit for bit.
    """
    hf_dir, target = Path(hf_dir), Path(run_dir_or_ckpt_dir)
    config = read_hf_config(hf_dir)
    if config.get("model_type") != "loopnn":
        raise LoopnnError(f"{hf_dir} holds model_type {config.get('model_type')!r}; for GPT-2 use load_gpt2")
    cfg = model_config_from_dict({k: config[k] for k in _model_fields() if k in config}, where=f"{hf_dir}")
    check_fits(cfg, where=f"{hf_dir}/{RUN_CONFIG}")
    tensors = {k.removeprefix("model."): v for k, v in _read_safetensors_dir(hf_dir).items()}
    tensors.pop("lm_head.weight", None)  # tied: it is transformer.wte.weight
    from loopnn.checkpoint import model_from_state

    model = model_from_state(cfg, tensors, f"{hf_dir}/{WEIGHTS}")
    meta = _export_meta(hf_dir / EXPORT_META) if (hf_dir / EXPORT_META).is_file() else {}
    match = re.fullmatch(r"step-(\d+)", target.name)
    if match and target.parent.name == "checkpoints":
        run_dir, step = target.parent.parent, int(match.group(1))
    else:
        run_dir = target
        step = step if step is not None else (meta.get("step") or 0)
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < MAX_STEP:
        raise LoopnnError(f"import step must be an integer in [0, {MAX_STEP}), got {str(step)[:40]}")
    info = dict(meta.get("info") or {}, imported_from=str(hf_dir))
    # save_checkpoint runs the checks `eval` and `train --resume` run on checkpoint.json before writing anything
    return save_checkpoint(run_dir, step, model, cfg, meta.get("train_config"), info=info)


def _export_meta(path: Path) -> dict[str, Any]:
    """loopnn.json of an export, checked as its fields will be checked once they are in a checkpoint."""
    meta = _read_json(path)
    where = str(path)
    field(meta, "step", "int", where, lo=0, hi=MAX_STEP - 1, default=None, nullable=True)
    train_cfg = field(meta, "train_config", "object", where, default=None, nullable=True)
    if train_cfg is not None:
        try:  # what resume and eval will read
            train_config_from_dict(train_cfg, where=f"{where} train_config")
        except LoopnnError as e:
            msg = str(e) if str(e).startswith(where) else f"{where} train_config: {e}"
            raise LoopnnError(msg) from None
    field(meta, "info", "object", where, default=None, nullable=True)
    return meta


def _model_fields() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(ModelConfig))


# ---------------------------------------------------------------------------------------------------------------
# GPT-2 (HF GPT2LMHeadModel) <-> LoopGPT


def _gpt2_source(src: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if isinstance(src, (str, Path)):
        path = Path(src)
        return read_hf_config(path), _read_safetensors_dir(path)
    if hasattr(src, "config") and hasattr(src, "state_dict"):  # a GPT2LMHeadModel instance
        return src.config.to_dict(), {k: v.detach().cpu() for k, v in src.state_dict().items()}
    raise LoopnnError(f"load_gpt2 takes a GPT-2 HF directory or a GPT2LMHeadModel, got {type(src).__name__}")


def _gpt2_config(hf: dict[str, Any], where: str) -> ModelConfig:
    """Refuse GPT-2 variants LoopGPT cannot reproduce exactly, naming the setting."""
    for key in ("vocab_size", "n_positions", "n_layer", "n_head", "n_embd"):
        field(hf, key, "int", f"{where} {RUN_CONFIG}", lo=1)
    checks = [
        (hf.get("model_type", "gpt2") == "gpt2", f"model_type {hf.get('model_type')!r} (expected gpt2)"),
        (hf.get("activation_function", "gelu_new") in _GELU_TANH, "activation_function is not GELU-tanh"),
        (hf.get("layer_norm_epsilon", 1e-5) == 1e-5, "layer_norm_epsilon != 1e-5"),
        (hf.get("n_inner") in (None, 4 * hf["n_embd"]), "n_inner != 4 * n_embd"),
        (hf.get("scale_attn_weights", True), "scale_attn_weights is off"),
        (not hf.get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx is on"),
        (not hf.get("add_cross_attention", False), "cross-attention"),
    ]
    for ok, what in checks:
        if not ok:
            raise LoopnnError(f"{where}: {what}; LoopGPT implements plain GPT-2 only")
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        block_size=hf["n_positions"],
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_embd=hf["n_embd"],
        dropout=0.0,
        bias=True,
        n_loops=1,
    )


def load_gpt2(src: str | Path | Any) -> LoopGPT:
    """A GPT2LMHeadModel (directory with config.json + model.safetensors, or an instance) as a LoopGPT, n_loops=1.

    Logits match HF's GPT-2 to float rounding. The result is in eval mode; dropout is 0.
    """
    hf_cfg, state = _gpt2_source(src)
    cfg = _gpt2_config(hf_cfg, str(src) if isinstance(src, (str, Path)) else "GPT2LMHeadModel")
    check_fits(cfg, where=f"GPT-2 {src if isinstance(src, (str, Path)) else 'model'}")
    model = LoopGPT(cfg)
    own = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers of old checkpoints
        if not key.startswith(("transformer.", "lm_head.")):
            key = "transformer." + key  # checkpoints saved from GPT2Model lack the prefix
        if key == "lm_head.weight":
            wte = state.get("transformer.wte.weight", state.get("wte.weight"))
            if wte is not None and not torch.equal(value, wte):
                raise LoopnnError("this GPT-2 has an untied lm_head; LoopGPT ties the head to wte")
            continue
        if key.endswith(_CONV1D):
            value = value.t()
        if key == "transformer.wte.weight":  # pad vocab rows up to the multiple of 64
            value = torch.cat([value, value.new_zeros(cfg.padded_vocab_size - value.shape[0], value.shape[1])])
        tensors[key] = value.to(own[key].dtype).contiguous() if key in own else value
    from loopnn.checkpoint import load_state_into

    load_state_into(model, tensors, "GPT-2 weights")
    return model.eval()


def to_gpt2(model: LoopGPT):
    """A non-looped LoopGPT (n_loops=1, loop_rule 'repeat') as a transformers GPT2LMHeadModel."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = model.config
    plain = cfg.loop_rule == "repeat" or (
        cfg.loop_rule == "gated" and model.loop_gate is not None and bool((model.loop_gate == 1).all())
    )
    plain = plain and (model.loop_embed is None or not bool(model.loop_embed.any()))
    if cfg.n_loops != 1 or not plain:
        raise LoopnnError(
            f"to_gpt2 needs a plain GPT-2 (n_loops=1, loop_rule='repeat'); this model has n_loops={cfg.n_loops}, "
            f"loop_rule={cfg.loop_rule!r}"
        )
    special = 50256 if cfg.vocab_size > 50256 else None
    hf_cfg = GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.block_size,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=special,
        eos_token_id=special,
    )
    gpt2 = GPT2LMHeadModel(hf_cfg)
    target = gpt2.state_dict()
    tensors = {}
    for key, value in model.state_dict().items():
        if key in ("lm_head.weight", "loop_gate"):
            continue
        value = value.detach().cpu()
        if key.endswith(_CONV1D):
            value = value.t()
        if key == "transformer.wte.weight":
            value = value[: cfg.vocab_size]
        tensors[key] = value.contiguous()
    for key, value in target.items():  # bias=False models: GPT-2 always has biases; zeros are equivalent
        if key not in tensors and key.endswith(".bias"):
            tensors[key] = torch.zeros_like(value)
    missing = [k for k in target if k not in tensors and k != "lm_head.weight"]
    if missing:
        raise LoopnnError(f"to_gpt2: no loopnn tensor for {missing[:3]}")
    gpt2.load_state_dict(tensors, strict=False)
    gpt2.tie_weights()
    return gpt2.eval()


# ---------------------------------------------------------------------------------------------------------------
# Dense -> looped initialisation (Relaxed Recursive Transformers' "initialise the shared block from pretrained")


def loop_from_dense(
    dense: LoopGPT | str | Path | Any,
    blocks: Sequence[int],
    n_loops: int,
    loop_rule: str = "repeat",
    *,
    prelude: Sequence[int] = (),
    coda: Sequence[int] = (),
    loop_strategy: str = "stack",
    gate_init: float | None = None,
) -> LoopGPT:
    """A looped LoopGPT initialised from a dense model's blocks, ready for fine-tuning.

    The new model's blocks are dense blocks `prelude` (run once), then `blocks` (the looped core, run n_loops
    times), then `coda` (run once); indices refer to the dense model's blocks and may repeat. Embeddings, ln_f
    and the tied head are copied. dense: a LoopGPT, a GPT-2 HF directory or GPT2LMHeadModel, or a loopnn
    checkpoint / run directory.
    """
    src = load_pretrained(dense)[0]
    order = [*prelude, *blocks, *coda]
    if not blocks:
        raise LoopnnError("loop_from_dense: blocks must name at least one dense block")
    bad = [i for i in order if not 0 <= i < src.config.n_layer]
    if bad:
        raise LoopnnError(f"loop_from_dense: block indices {bad} outside the dense model's 0..{src.config.n_layer - 1}")
    values = dataclasses.asdict(src.config)
    values.update(
        n_layer=len(order),
        loop_start=len(prelude),
        loop_end=len(prelude) + len(blocks),
        n_loops=n_loops,
        loop_rule=loop_rule,
        loop_strategy=loop_strategy,
        gate_init=gate_init,
    )
    model = LoopGPT(model_config_from_dict(values, where="loop_from_dense"))
    with torch.no_grad():
        for name in ("wte", "wpe", "ln_f"):
            model.transformer[name].load_state_dict(src.transformer[name].state_dict())
        for new, old in enumerate(order):
            model.transformer.h[new].load_state_dict(src.transformer.h[old].state_dict())
    return model.to(next(src.parameters()).dtype)


# ---------------------------------------------------------------------------------------------------------------
# The one loader: anything a LoopGPT can come from


def load_pretrained(source: LoopGPT | str | Path | Any) -> tuple[LoopGPT, int | None]:
    """(LoopGPT, the export's default inference loop count or None) from a LoopGPT, a LoopnnForCausalLM or
    GPT2LMHeadModel instance, an HF directory (a loopnn export or GPT-2), or loopnn's own checkpoint or run
    directory (its newest valid checkpoint, through runs.open_run)."""
    if isinstance(source, LoopGPT):
        return source, None
    if not isinstance(source, (str, Path)):
        from loopnn.hf.modeling import LoopnnForCausalLM

        if isinstance(source, LoopnnForCausalLM):
            return source.model, source.config.inference_n_loops
        return load_gpt2(source), None  # a GPT2LMHeadModel instance
    path = Path(source)
    if is_export(path):
        from loopnn.hf.modeling import LoopnnForCausalLM

        hf = LoopnnForCausalLM.from_pretrained(path)
        return hf.model, hf.config.inference_n_loops
    if is_hf_directory(path):  # GPT-2 (a run directory has a config.json too, with checkpoints/ beside it)
        return load_gpt2(path), None
    return open_run(path).model, None
