"""The lock a run holds on its folder while it writes it (``.prunet-lock``, flock): a second run is refused,
named by the first one's pid. The kernel releases it when the process dies, however it dies."""

from __future__ import annotations

import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # not on Windows
    fcntl = None

from prunet.runfolder.names import LOCK, RunError


class RunLock:
    """``acquire`` when a run starts writing ``folder``, ``release`` when it ends (or dies)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._fd: int | None = None

    def acquire(self) -> None:
        """Raises:
            RunError: another run holds it. OSError: the lock file cannot be made.
        """
        if fcntl is None:
            return
        fd = os.open(self.folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunError(f"run folder {self.folder} is being written by another prunet run (pid {holder}); "
                           f"wait for it, or choose another --run-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the lock
            self._fd = None
