"""An exclusive lock on a run directory for the life of a `train`.

Two `train` processes on one run directory would delete each other's temporary checkpoint directories and mix
their configs, checkpoints and metrics. `RunLock(run_dir)` takes an advisory `flock` on RUN/.lock and writes the
holder's pid and host into it; a second holder is refused with one line naming that pid. The kernel drops the
lock when its process dies (SIGKILL included), so a lock left by a killed run is never stale: the next `train`
simply takes it. The file itself stays (removing it would race with a process that has just opened it).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from loopnn.errors import LoopnnError

try:
    import fcntl
except ImportError:  # not POSIX: no locking (loopnn's supported platforms are Linux and macOS)
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"


class RunLock:
    """Context manager: `with RunLock(run_dir): ...` holds RUN/.lock exclusively (creating RUN if needed)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise LoopnnError(f"cannot create run directory {self.run_dir}: {e.strerror or e}") from None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _read_holder(fd)
                os.close(fd)
                raise LoopnnError(
                    f"{self.run_dir} is in use by another loopnn train ({holder}); wait for it to finish or stop "
                    "it, or choose another --out-dir"
                ) from None
        if not os.access(self.run_dir, os.W_OK):
            self._fd = fd  # a read-only run directory: hold the lock but change nothing in it
            return self
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        except OSError:
            pass  # the lock is what matters; the pid is only for the message
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "pid unknown"
