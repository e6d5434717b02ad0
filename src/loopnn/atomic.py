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


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: the file system or kernel cannot exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(new: Path, target: Path) -> None:
    """Put directory `new` in place of directory `target`; afterwards `new` holds the old contents.

    One atomic exchange where the system supports it; otherwise target -> aside, new -> target (and back on
    failure), so at every moment the old or the new directory is complete under some name.
    """
    new, target = Path(new), Path(target)
    try:
        if not _exchange(new, target):
            aside = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, aside)
            try:
                os.replace(new, target)
            except OSError:
                os.replace(aside, target)
                raise
            os.replace(aside, new)
    except OSError as e:
        what = f"{e.strerror or e}; {target} is unchanged"
        raise LoopnnError(f"could not move {new} into place as {target}: {what}") from None
    fsync_dir(target.parent)
