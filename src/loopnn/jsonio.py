"""The one JSON reader: every JSON file loopnn reads goes through `read_json` / `read_jsonl`.

A file loopnn reads may have been cut short, hand-edited or written by someone hostile. The reader bounds the
size (checked before reading) and the nesting depth, turns every parse failure (cut JSON, 5,000-digit integers,
deeply nested documents, bytes that are not UTF-8) into a `LoopnnError` naming the file, and `field` checks a
value's type and range, naming the file and the field. Callers hold the per-file schema (a checkpoint's in
checkpoint.py, meta.json in data/meta.py, run and export files in runs.py and report.py, HF files in hf/convert.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from loopnn.errors import LoopnnError

MAX_BYTES = 16 << 20  # the largest JSON loopnn writes (a sharded meta.json) is well under 1 MB
MAX_JSONL_BYTES = 1 << 30  # metrics.jsonl grows with the run
MAX_DEPTH = 32  # loopnn writes at most 4 levels
_MISSING = object()


def _depth_ok(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict | list):
            if d > limit:
                return False
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return True


def parse(text: str | bytes, where: str, max_depth: int = MAX_DEPTH) -> Any:
    """json.loads with every failure as a LoopnnError naming `where`."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        value = json.loads(text)
    except UnicodeDecodeError as e:
        raise LoopnnError(f"{where} is unreadable (not UTF-8 text, byte {e.start})") from None
    except RecursionError:
        raise LoopnnError(f"{where} is unreadable (nested too deeply: more than {max_depth} levels)") from None
    except ValueError as e:  # JSONDecodeError, and integers longer than Python's 4300-digit limit
        raise LoopnnError(f"{where} is unreadable (not valid JSON: {str(e)[:120]})") from None
    if not _depth_ok(value, max_depth):
        raise LoopnnError(f"{where} is unreadable (nested too deeply: more than {max_depth} levels)")
    return value


def _read_bytes(path: Path, what: str, max_bytes: int) -> bytes:
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size > max_bytes:
                raise LoopnnError(
                    f"{path} is {size:,} bytes, more than the {max_bytes:,} a {what} may have; "
                    "the file is damaged or not from loopnn"
                )
            f.seek(0)
            return f.read(max_bytes + 1)
    except FileNotFoundError:
        raise LoopnnError(f"{path} is missing") from None
    except IsADirectoryError:
        raise LoopnnError(f"{path} is a directory, expected a {what} file") from None
    except OSError as e:
        raise LoopnnError(f"cannot read {path} ({e.strerror or e})") from None


def read_json(path: str | Path, what: str = "JSON file", max_bytes: int = MAX_BYTES, object_only: bool = True) -> Any:
    """Read and parse one JSON file (an object unless object_only=False) or raise LoopnnError naming it."""
    path = Path(path)
    value = parse(_read_bytes(path, what, max_bytes), str(path))
    if object_only and not isinstance(value, dict):
        raise LoopnnError(f"{path} holds a JSON {type(value).__name__}, expected an object ({what})")
    return value


def read_jsonl(path: str | Path, what: str = "JSON lines file", max_bytes: int = MAX_JSONL_BYTES) -> list[dict]:
    """The objects of a JSON-lines file. Lines that do not parse to an object (a line cut short by a killed
    writer, say) are skipped: a log stays readable up to its damage."""
    path = Path(path)
    records = []
    text = _read_bytes(path, what, max_bytes).decode("utf-8", errors="replace")
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = parse(line, f"{path} line {i}")
        except LoopnnError:
            continue
        if isinstance(value, dict):
            records.append(value)
    return records


_KINDS: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "number": (int, float),
    "str": (str,),
    "bool": (bool,),
    "object": (dict,),
    "list": (list,),
}


def field(
    obj: dict[str, Any],
    key: str,
    kind: str,
    where: str,
    *,
    default: Any = _MISSING,
    nullable: bool = False,
    lo: float | None = None,
    hi: float | None = None,
    choices: tuple | None = None,
) -> Any:
    """obj[key] checked against `kind` (int, number, str, bool, object, list) and a range or choice list.

    A missing key returns `default` (or fails when no default is given); numbers must be finite; bools are never
    numbers. The error names `where` (the file) and the field.
    """
    if key not in obj:
        if default is _MISSING:
            raise LoopnnError(f"{where} lacks the field {key}")
        return default
    value = obj[key]
    if value is None and nullable:
        return None
    types = _KINDS[kind]
    ok = isinstance(value, types) and (kind == "bool" or not isinstance(value, bool))
    if ok and kind == "number":
        ok = isinstance(value, int) or math.isfinite(value)
    if ok and kind in ("int", "number"):
        ok = (lo is None or value >= lo) and (hi is None or value <= hi)
    if ok and choices is not None:
        ok = value in choices
    if not ok:
        want = {"int": "an integer", "number": "a finite number", "object": "an object", "list": "a list"}
        expected = want.get(kind, f"a {kind}")
        if choices is not None:
            expected = f"one of {list(choices)}"
        elif lo is not None or hi is not None:
            expected += f" in [{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise LoopnnError(f"{where}: field {key} must be {expected}{' or null' if nullable else ''}, got {shown}")
    return value
