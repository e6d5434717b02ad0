"""The one exception type users see.

Every expected failure (bad config, missing corpus, mismatched checkpoint, ...) raises `LoopnnError` with a
message that names the problem and the fix. The CLI prints it as one line and exits with status 2.
"""


class LoopnnError(Exception):
    """A user-facing error: the message is complete on its own, no traceback needed."""


class StopRequested(Exception):
    """A stop request (SIGINT/SIGTERM) ended a run early; multi-run commands (demo, ablation) end with it.

    The message says what was saved and how to continue; the CLI prints it as one line and exits 130.
    """


def one_line(text: str) -> str:
    """`text` as one printable line: newlines become spaces, every other character that is not printable its
    escape (`\\r`, `\\x1e`, `\\u2028`: str.splitlines and terminals break lines at those too, and a message may
    quote hostile input)."""
    text = " ".join(text.split("\n"))
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
