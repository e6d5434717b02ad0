"""Help text of config fields, read from the attribute docstring under each field.

A config dataclass documents a field with a string literal on the line after it:

    n_loops: int = 1
    \"\"\"Times the loop region runs per forward pass (the paper's N).\"\"\"

`field_help(cls)` returns those strings by field name; the CLI turns them into `--help` text, so a flag's
explanation has one home, next to its default. Reading them parses the class's source (no import of torch).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap


@functools.cache
def field_help(cls: type) -> dict[str, str]:
    """{field name: its docstring, whitespace folded to single spaces} for a dataclass, base classes included."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # no source (frozen or zipped install): flags keep their defaults only
            continue
        body = ast.parse(source).body[0].body
        for stmt, after in zip(body, body[1:]):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[stmt.target.id] = " ".join(after.value.value.split())
    return docs


def undocumented(cls: type) -> list[str]:
    """Fields of `cls` without a docstring (tests keep this empty for every config behind a flag)."""
    docs = field_help(cls)
    return [f.name for f in dataclasses.fields(cls) if f.name not in docs]
