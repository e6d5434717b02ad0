"""Hugging Face hub corpora: the named catalogue (openwebtext, fineweb-edu, ...), a reachability probe, and rows.

    spec = hub_corpus("tinystories")          # or "hf:owner/name[:config]"
    hub_unreachable_reason()                  # None, or why the hub cannot be used (in about a second)
    for text in hub_rows("tinystories", spec, skip=0): ...

A source of loopnn.data's pipeline like loopnn.data.sources; `datasets` is imported only when rows are read.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlparse

from loopnn.data.sources import INSTALL_HINT
from loopnn.errors import LoopnnError


@dataclass(frozen=True)
class HubCorpus:
    repo: str
    config: str | None = None
    split: str = "train"
    text_field: str = "text"
    documents: int | None = None  # approximate sizes, for the estimate printed before starting
    text_bytes: float | None = None
    gpt2_tokens: float | None = None
    val_fraction: float = 0.001  # default val share for this corpus (0.1 of a 10B-token corpus is wasteful)
    wikitext: bool = False  # rows are lines; articles start at " = Title = " lines


# Sizes are approximate public figures (dataset cards, nanoGPT's openwebtext counts), used only for estimates.
HUB_CORPORA: dict[str, HubCorpus] = {
    "openwebtext": HubCorpus("Skylion007/openwebtext", None, "train", "text", 8_013_769, 40e9, 9.04e9, 0.0005),
    "fineweb-edu": HubCorpus("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", "text", 9_670_000, 46e9, 10e9),
    "tinystories": HubCorpus("roneneldan/TinyStories", None, "train", "text", 2_119_719, 1.9e9, 4.7e8, 0.01),
    "wikitext-103": HubCorpus(
        "Salesforce/wikitext", "wikitext-103-raw-v1", "train", "text", 28_475, 5.4e8, 1.2e8, 0.01, wikitext=True
    ),
}


def is_hub_source(source: str) -> bool:
    return source in HUB_CORPORA or source.startswith("hf:")


def hub_corpus(source: str, text_field: str | None = None) -> HubCorpus:
    if source in HUB_CORPORA:
        spec = HUB_CORPORA[source]
    else:  # hf:owner/name[:config]
        repo, _, config = source[3:].partition(":")
        if not repo or "/" not in repo:
            raise LoopnnError(f"hub source {source!r} must look like hf:owner/name or hf:owner/name:config")
        spec = HubCorpus(repo, config or None)
    if text_field and text_field != spec.text_field:
        spec = HubCorpus(**{**spec.__dict__, "text_field": text_field})
    return spec


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_unreachable_reason(timeout: float = 1.0) -> str | None:
    """Why the hub cannot be used right now, or None. Costs at most ~timeout seconds (DNS included)."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if _env_true(var):
            return f"{var} is set"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    target = urlparse(proxy) if proxy else endpoint
    host, port = target.hostname or "huggingface.co", target.port or (443 if target.scheme != "http" else 80)
    result: list[str | None] = []

    def probe() -> None:  # in a thread: getaddrinfo ignores socket timeouts and can hang for many seconds
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as e:
            result.append(f"cannot connect to {host}:{port} ({e.strerror or e})")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.25)
    return result[0] if result else f"no answer from {host}:{port} within {timeout:.0f} s"


def offline_help(source: str, spec: HubCorpus) -> str:
    return (
        f"to prepare {source} without the hub, download the files of https://huggingface.co/datasets/{spec.repo} "
        "(parquet or jsonl) on a connected machine and run "
        "`loopnn prepare path/to/folder --format parquet|jsonl|text --text-field text`"
    )


def hub_rows(source: str, spec: HubCorpus, skip: int) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise LoopnnError(f"hub corpora need the `datasets` package: {INSTALL_HINT}") from None
    try:
        ds = datasets.load_dataset(spec.repo, spec.config, split=spec.split, streaming=True)
        if skip:
            ds = ds.skip(skip)
        for row in ds:
            text = row.get(spec.text_field)
            if not isinstance(text, str):
                raise LoopnnError(f"{spec.repo} rows have no string field {spec.text_field!r}; use --text-field")
            yield text
    except LoopnnError:
        raise
    except Exception as e:  # datasets/huggingface_hub raise many types (connection, 404, gated, script-based)
        raise LoopnnError(
            f"loading {spec.repo} from the hub failed ({type(e).__name__}: {e}); {offline_help(source, spec)}"
        ) from None
