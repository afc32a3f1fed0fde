"""A folder's manifest (``.prunet-files``): the names of the files prunet wrote there, what ``--overwrite`` may
replace. Read and rewritten under a lock on the folder, so two commands adding files at once lose neither name."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # not on Windows
    fcntl = None

from prunet.files import write_text
from prunet.runfolder.names import MANIFEST, RunError, plain_name


class Manifest:
    """The files prunet wrote in ``folder``, in the order they were first written.

    A folder without a manifest holds no file of prunet's: a file there named like one of
    prunet's (``report.md``, ``round7.safetensors``) is the user's, and is never replaced.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.path = folder / MANIFEST

    def names(self) -> list[str]:
        """Every name on record (also those whose file is gone)."""
        if not self.path.is_file():
            return []
        try:
            names = json.loads(self.path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            names = e
        if not isinstance(names, list) or not all(isinstance(n, str) and plain_name(n) for n in names):
            raise RunError(f"{self.path} is corrupt (it must list the run's file names); delete it and prunet will "
                           f"recognise the run's files by their names") from None
        return names

    def written(self) -> list[str]:
        """The names on record whose files are still there."""
        return [n for n in self.names() if (self.folder / n).is_file()]

    def save(self, names: list[str]) -> None:
        write_text(self.path, json.dumps(names) + "\n")

    def add(self, name: str) -> Path:
        """Put ``name`` on record and return its path, for a writer that writes it whole.

        Raises:
            RunError: a file of that name is there and prunet did not write it (the user's own).
        """
        if not plain_name(name):
            raise ValueError(f"{name!r} is not a file name in the run folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        with self.locked():
            names = self.names()
            if name not in names:
                if (self.folder / name).exists():
                    raise RunError(f"{self.folder / name} is there and prunet did not write it; move it away, or "
                                   f"choose another folder")
                self.save(names + [name])
        return self.folder / name

    def remove(self, name: str) -> None:
        """Delete file ``name`` and take it off the record."""
        with self.locked():
            (self.folder / name).unlink(missing_ok=True)
            self.save([n for n in self.names() if n != name])

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold an exclusive lock on the folder while the manifest is read and rewritten.

        Several commands may add files to one folder at once (a run saving a
        checkpoint while ``prunet report`` writes); the lock keeps one from
        dropping the other's name. On systems without ``fcntl`` there is no lock.
        """
        if fcntl is None:
            yield
            return
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock
