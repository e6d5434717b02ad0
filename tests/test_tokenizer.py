"""Tokenizers: exact GPT-2 ids offline, lossless round trips, BPE train/save/load, clear errors."""

import pytest

from loopnn.errors import LoopnnError
from loopnn.tokenizer import EOT, get_tokenizer, train_bpe

CHECK_TEXT = "Hello world, this is a GPT-2 test.<|endoftext|>"
CHECK_IDS = [15496, 995, 11, 428, 318, 257, 402, 11571, 12, 17, 1332, 13, 50256]
SAMPLES = [
    "Hello world, this is a GPT-2 test.",
    "  leading spaces,\ttabs\nand\n\nblank lines\n",
    "unicode: naïve café — 東京 🚀",
    "",
]
CORPUS = [
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 20,
    "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n" * 20,
]


@pytest.fixture(scope="module")
def gpt2():
    return get_tokenizer("gpt2")


def test_gpt2_exact_ids_offline(gpt2):
    assert gpt2.name == "gpt2"
    assert gpt2.vocab_size == 50257
    assert gpt2.eot_id == 50256
    assert gpt2.encode(CHECK_TEXT) == CHECK_IDS
    assert gpt2.encode_batch([CHECK_TEXT, "Hello"]) == [CHECK_IDS, [15496]]
    assert gpt2.decode(CHECK_IDS) == CHECK_TEXT


@pytest.mark.parametrize("text", SAMPLES)
def test_gpt2_round_trip(gpt2, text):
    assert gpt2.decode(gpt2.encode(text)) == text


@pytest.mark.parametrize("text", SAMPLES)
def test_bytes_round_trip(text):
    tok = get_tokenizer("bytes")
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert (tok.vocab_size, tok.eot_id) == (256, None)


def test_bytes_decode_replaces_broken_utf8():
    tok = get_tokenizer("bytes")
    assert tok.decode(list("é".encode())[:1]) == "\ufffd"


def test_bpe_train_save_load_round_trip(tmp_path):
    path = tmp_path / "tokenizer.json"
    tok = train_bpe(CORPUS, vocab_size=400, out_path=path)
    assert path.is_file()
    assert 257 <= tok.vocab_size <= 400
    assert tok.eot_id is not None and tok.decode([tok.eot_id]) == EOT
    loaded = get_tokenizer("bpe", tmp_path)
    for text in [*SAMPLES, CORPUS[0][:200], "x" + EOT + "y"]:
        ids = tok.encode(text)
        assert loaded.encode(text) == ids
        assert loaded.decode(ids) == text
    # The special token is one id, and training compressed the corpus below one token per byte.
    assert tok.encode(EOT) == [tok.eot_id]
    assert len(tok.encode(CORPUS[0])) < len(CORPUS[0]) / 2
    assert loaded.encode_batch(CORPUS[:2]) == [tok.encode(CORPUS[0]), tok.encode(CORPUS[1])]


def test_bpe_vocab_size_out_of_range():
    with pytest.raises(LoopnnError, match="vocab_size"):
        train_bpe(CORPUS, vocab_size=100)


def test_unknown_tokenizer_lists_choices():
    with pytest.raises(LoopnnError, match="gpt2, bytes, bpe"):
        get_tokenizer("sentencepiece")


def test_bpe_without_trained_file_says_to_prepare(tmp_path):
    with pytest.raises(LoopnnError, match="loopnn prepare"):
        get_tokenizer("bpe", tmp_path)
    with pytest.raises(LoopnnError, match="loopnn prepare"):
        get_tokenizer("bpe")


def test_bpe_corrupt_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(LoopnnError, match="cannot read tokenizer"):
        get_tokenizer("bpe", tmp_path)
