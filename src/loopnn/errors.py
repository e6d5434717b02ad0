"""The one exception type users see.

Every expected failure (bad config, missing corpus, mismatched checkpoint, ...) raises `LoopnnError` with a
message that names the problem and the fix. The CLI prints it as one line and exits with status 2.
"""


class LoopnnError(Exception):
    """A user-facing error: the message is complete on its own, no traceback needed."""
