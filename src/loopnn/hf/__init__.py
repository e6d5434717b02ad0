"""Optional Hugging Face integration (`pip install loopnn[hf]`): importing this module needs transformers.

    import loopnn.hf                                     # registers model_type "loopnn" with the Auto classes
    loopnn.hf.export_hf("runs/x", "hf/x")                # loopnn checkpoint -> HF directory (safetensors)
    model = AutoModelForCausalLM.from_pretrained("hf/x")
    model.generate(ids, max_new_tokens=20, n_loops=8)    # test-time loop count
Importing `loopnn` itself never imports transformers. See docs/hf.md.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from loopnn.hf.convert import export_hf, import_hf, load_gpt2, loop_from_dense, to_gpt2
from loopnn.hf.harness import LoopnnEvalLM
from loopnn.hf.modeling import LoopKVCache, LoopnnConfig, LoopnnForCausalLM, gpt2_tokenizer

# Registration is what lets AutoConfig / AutoModelForCausalLM / pipeline() resolve model_type "loopnn" without
# trust_remote_code. exist_ok: re-importing (or reloading) the module must not fail.
AutoConfig.register(LoopnnConfig.model_type, LoopnnConfig, exist_ok=True)
AutoModelForCausalLM.register(LoopnnConfig, LoopnnForCausalLM, exist_ok=True)

__all__ = [
    "LoopnnConfig",
    "LoopnnForCausalLM",
    "LoopKVCache",
    "LoopnnEvalLM",
    "gpt2_tokenizer",
    "export_hf",
    "import_hf",
    "load_gpt2",
    "to_gpt2",
    "loop_from_dense",
]
