"""Optional Hugging Face integration (`pip install loopnn[hf]`): importing this module needs transformers.

    import loopnn.hf                                     # registers model_type "loopnn" with the Auto classes
    loopnn.hf.export_hf("runs/x", "hf/x")                # checkpoint -> HF directory: weights, tokenizer, card
    model = AutoModelForCausalLM.from_pretrained("hf/x")
    model.generate(ids, max_new_tokens=20, n_loops=8)    # test-time loop count
    loopnn.hf.export_hf("runs/x", "hf/x-gpt2", unroll=True)   # repeat-rule loops as a plain GPT-2 (no loopnn needed)
Importing `loopnn` itself never imports transformers. See docs/hf.md.
"""

from loopnn.hf.convert import export_hf, import_hf, load_gpt2, loop_from_dense, to_gpt2
from loopnn.hf.modeling import LoopKVCache, LoopnnConfig, LoopnnForCausalLM, gpt2_tokenizer, register_auto_classes
from loopnn.hf.unroll import unrolled_gpt2, why_not_unrollable

register_auto_classes()  # model_type "loopnn" for AutoConfig / AutoModelForCausalLM / pipeline()

__all__ = [
    "LoopnnConfig",
    "LoopnnForCausalLM",
    "LoopKVCache",
    "gpt2_tokenizer",
    "export_hf",
    "import_hf",
    "load_gpt2",
    "to_gpt2",
    "loop_from_dense",
    "unrolled_gpt2",
    "why_not_unrollable",
]
