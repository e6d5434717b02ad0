"""What the two data writers share: data/write.py (single train.bin / val.bin) and data/sharded.py (sharded, streamed).

Reading text as UTF-8, cutting long texts into pieces that encode to exactly the ids of the whole, the separator
between documents for the bytes tokenizer, the token dtype and the on-disk format versions. It imports nothing
from loopnn but errors, so both writers (and TokenData, the reader) import it without an import cycle.
"""

from __future__ import annotations

import numpy as np

from loopnn.errors import LoopnnError

FORMAT_VERSION = 1  # meta.json format_version of a single train.bin / val.bin pair (data.prepare)
SHARDED_FORMAT_VERSION = 2  # train-NNNNN.bin / val-NNNNN.bin shards (corpora.prepare_sharded)
BYTES_SEPARATOR = "\n\n"  # the bytes tokenizer has no EOT token, so documents are separated by a blank line
ENCODE_CHUNK = 1 << 15  # characters per encode_batch item: many small items keep both threads busy


def decode_text(raw: bytes, where: str) -> str:
    """UTF-8 (a BOM dropped) with Windows line endings made "\\n"; anything else is a one-line error naming `where`."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise LoopnnError(
            f"{where} is not UTF-8 text (byte {e.start}); convert it first, e.g. `iconv -f latin1 -t utf-8`"
        ) from None
    # Windows line endings would otherwise double the newline tokens of some files but not others.
    return text.replace("\r\n", "\n")


def encoding_chunks(text: str) -> list[str]:
    """Cut a long text into ~ENCODE_CHUNK-character pieces at boundaries every tokenizer here splits at anyway.

    A lone newline between two non-space characters ("x\\ny") is always a pre-token of its own in GPT-2's
    regex (used by the gpt2 and bpe tokenizers; bytes have no merges), so cutting right after it gives
    exactly the ids of encoding the whole. Longer whitespace runs are not safe: "\\n\\nX" encodes as
    "\\n" "\\n" "X" but a piece ending in "\\n\\n" encodes it as one token.
    """
    pieces, start = [], 0
    while len(text) - start > ENCODE_CHUNK:
        pos = start + ENCODE_CHUNK
        while 0 <= pos < len(text) - 1:
            pos = text.find("\n", pos)
            if pos < 0 or pos + 1 >= len(text):
                pos = -1
            elif not text[pos - 1].isspace() and not text[pos + 1].isspace():
                break
            else:
                pos += 1
        if not 0 <= pos < len(text) - 1:
            break
        pieces.append(text[start : pos + 1])
        start = pos + 1
    pieces.append(text[start:])
    return pieces


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 holds ids below 65536 (GPT-2's 50257 included) at half the disk and memory of uint32."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)
