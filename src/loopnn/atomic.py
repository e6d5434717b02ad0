"""Atomic file writes (temp file in the same directory, fsync, rename) without importing torch.

Used by checkpoints, data preparation, reports and configs, so a crash never leaves a half-written file under
its final name.
"""

from __future__ import annotations

import os
from pathlib import Path

from loopnn.errors import LoopnnError


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, rename over the target."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # e.g. a read-only file system: report the original error, not this one
            pass
        raise LoopnnError(f"could not write {path}: {e.strerror or e}; check free space and permissions") from None
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())
