"""Shared fixtures: the `debug` model size, offline settings, deterministic torch."""

import os

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def debug_cfg():
    from loopnn import ModelConfig, preset

    return ModelConfig(**preset("debug"))


@pytest.fixture(scope="session")
def pydoc_data(tmp_path_factory):
    """The built-in `pydoc` corpus, bytes tokenizer, prepared once per test session (read-only for tests)."""
    from loopnn.data import prepare

    out = tmp_path_factory.mktemp("data") / "pydoc-bytes"
    prepare("pydoc", out, tokenizer="bytes", progress=False)
    return out
