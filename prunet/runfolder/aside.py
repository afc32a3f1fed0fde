"""An earlier run moved aside (``.prunet-previous``) while a new run replaces it: put back if the new run fails
or was killed, discarded once it finishes. Each step can be interrupted and done again."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from prunet.files import write_text
from prunet.runfolder.manifest import Manifest
from prunet.runfolder.names import MANIFEST, PREVIOUS, RunError, plain_name

MOVED = ".prunet-moved"  # in the aside folder: the earlier run moved there whole


def names_in(aside: Path) -> list[str]:
    """The names a moved-aside run recorded (its manifest), checked like any manifest's."""
    try:
        names = json.loads((aside / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) and plain_name(n) for n in names):
        raise RunError(f"{aside / MANIFEST} is missing or corrupt; the earlier run's files are in {aside}: move "
                       f"them back by hand")
    return names


class Aside:
    """The earlier run of ``manifest``'s folder, while a new run replaces it."""

    def __init__(self, manifest: Manifest):
        self.manifest = manifest
        self.folder = manifest.folder
        self.path = self.folder / PREVIOUS

    def exists(self) -> bool:
        return self.path.is_dir()

    def move(self, earlier: list[str]) -> None:
        """Move the earlier run's files here, its manifest first.

        The manifest is written before any file moves, so an interruption at any point
        leaves a folder :meth:`put_back` can restore; a failure here (a full disk) puts
        back what moved before it raises.
        """
        self.path.mkdir(exist_ok=True)
        write_text(self.path / MANIFEST, json.dumps(earlier) + "\n")
        try:
            for name in earlier:
                os.replace(self.folder / name, self.path / name)
            (self.path / MOVED).touch()  # all moved: from here the new run's files are the folder's
        except BaseException:
            self.put_back()
            raise

    def complete(self) -> bool:
        """Whether the earlier run was moved aside whole (a kill half-way leaves it split between the folders)."""
        return (self.path / MOVED).is_file()

    def put_back(self) -> None:
        """Replace the (unfinished) new run's files by the earlier run's.

        Safe to interrupt and to run again: the aside manifest is read (and checked)
        before anything changes and moved over the folder's last; a name both runs wrote
        is never deleted, only replaced by the earlier run's file. It needs no free space
        (renames and deletions only), so it works on the full disk that stopped the new run.
        """
        if not self.exists():
            return
        if not (self.path / MANIFEST).exists() and not [p for p in self.path.iterdir() if ".tmp" not in p.name]:
            shutil.rmtree(self.path)  # stopped before its manifest was written: nothing had moved yet
            return
        names = names_in(self.path)
        current = self.manifest.names() if self.manifest.path.is_file() else []
        for name in current:
            if name not in names and (self.folder / name).is_file():
                (self.folder / name).unlink()  # only the new run's own files
        for name in names:
            if (self.path / name).is_file():
                os.replace(self.path / name, self.folder / name)
        os.replace(self.path / MANIFEST, self.manifest.path)  # the earlier run's record, as it was
        (self.path / MOVED).unlink(missing_ok=True)
        if not any(self.path.iterdir()):  # anything else there is not ours: left alone
            self.path.rmdir()

    def clean_discarded(self) -> None:
        """Finish deleting earlier runs whose deletion was cut short (``.prunet-discard-*``): only their files."""
        for leftover in self.folder.glob(".prunet-discard-*"):
            if leftover.is_dir():
                _delete_run(leftover)

    def discard(self) -> None:
        """The new run finished: delete the earlier run's files.

        The aside folder is first renamed out of the way, so a crash while deleting it
        can never be taken for an unfinished replacement. What is left in it that is
        not the earlier run's (a file the user put there) stays.
        """
        if not self.exists():
            return
        discard = self.folder / f".prunet-discard-{os.getpid()}-{time.monotonic_ns()}"
        os.replace(self.path, discard)
        _delete_run(discard)


def _delete_run(folder: Path) -> None:
    """Delete the earlier run's files in a discarded aside folder, then the folder if nothing else is in it."""
    try:
        names = names_in(folder)
    except RunError:
        names = []
    for name in [*names, MANIFEST, MOVED]:
        (folder / name).unlink(missing_ok=True)
    if not any(folder.iterdir()):  # anything else there is not ours: left alone
        folder.rmdir()
