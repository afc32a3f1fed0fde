"""The folder a run writes: :class:`Folder`, what a run calls; :class:`RunFolder`, which writes;
:class:`RankFolder`, what ranks other than 0 of a distributed run hold (it writes nothing)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import torch.nn as nn
import yaml

from prunet.checkpoint import save_checkpoint
from prunet.files import write_text
from prunet.runfolder.aside import Aside
from prunet.runfolder.lock import RunLock
from prunet.runfolder.manifest import Manifest
from prunet.runfolder.names import METRICS, PRUNET_NAMES, PROGRESS, SUMMARY, MissingRunFileError, RunError
from prunet.runfolder.progress import Progress


class Folder(Protocol):
    """What a run calls on its folder, whichever rank it is."""

    path: Path

    def record(self, name: str) -> Path: ...
    def write_text(self, name: str, text: str) -> Path: ...
    def write_json(self, name: str, data: Any) -> Path: ...
    def write_yaml(self, name: str, data: Any) -> Path: ...
    def save_checkpoint(self, name: str, model: nn.Module, meta: dict[str, Any]) -> Path: ...
    def log_metrics(self, event: str, **fields: Any) -> None: ...
    def save_progress(self, progress: dict[str, Any]) -> None: ...
    def rewind(self, progress: dict[str, Any]) -> None: ...
    def forget(self, name: str) -> None: ...
    def commit(self) -> None: ...
    def abandon(self) -> str: ...


class RunFolder:
    """Writes the files of one run, each whole, and records their names.

    Use :meth:`create` to start a run and :meth:`open` to add files to an existing
    one (the report, the sensitivity analysis). A run that :meth:`create` started
    ends with :meth:`commit` (it finished) or :meth:`abandon` (it failed or was
    interrupted): an earlier run it replaces is moved aside into ``.prunet-previous``
    and deleted only at :meth:`commit`, put back at :meth:`abandon`, and put back by
    the next :meth:`create` if the process was killed in between. While it runs,
    the folder is locked: a second run into it is refused.

    Its parts: the :class:`~prunet.runfolder.manifest.Manifest` of the files it wrote, the
    :class:`~prunet.runfolder.lock.RunLock`, the earlier run moved
    :class:`~prunet.runfolder.aside.Aside`, and the resume point,
    :class:`~prunet.runfolder.progress.Progress`.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = Manifest(self.path)
        self.lock = RunLock(self.path)
        self.aside = Aside(self.manifest)
        self.progress = Progress(self.manifest)
        self._resumed = False
        self._moved_aside = False  # by this create: what a failing create puts back

    def _undo_create(self) -> None:
        """A create that failed (a full disk) puts back the earlier run it moved aside, at once (renames need
        no room), and unlocks; a run it found aside from before (a killed one, to resume) stays as it is."""
        try:
            if self._moved_aside:
                with self.manifest.locked():
                    self.aside.put_back()
        finally:
            self.lock.release()

    @classmethod
    def create(cls, path: str | Path, overwrite: bool = False) -> "RunFolder":
        """A folder for a new run: new, or holding an earlier run that ``overwrite`` lets it replace.

        Raises:
            RunError: the folder holds a run and ``overwrite`` is False; another run is writing it;
                it cannot be made (a file in its place, no permission, a full disk).
        """
        folder = cls(path)
        try:
            folder.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunError(f"cannot make run folder {folder.path}: {e.strerror or e}") from None
        folder._lock()
        try:
            with folder.manifest.locked():
                folder._make_room(overwrite)
            folder.write_text(METRICS, "")
        except BaseException as e:
            folder._undo_create()
            if isinstance(e, OSError):
                raise RunError(f"cannot write run folder {folder.path}: {e.strerror or e}") from None
            raise
        return folder

    def _make_room(self, overwrite: bool) -> None:
        """Put back a run a killed replacement left aside; move the folder's run aside if ``overwrite`` allows."""
        # A stopped run is offered for resuming before anything is put back (that would delete it).
        if not overwrite and PROGRESS in self.written():
            raise RunError(f"run folder {self.path} holds an unfinished run; continue it with 'prunet run --resume "
                           f"{self.path}', or pass --overwrite to replace it")
        self.aside.clean_discarded()
        written = self.written()
        if self.aside.exists() and self.aside.complete() and SUMMARY in written and PROGRESS not in written:
            self.aside.discard()  # a replacement that finished and died before deleting the earlier run
        else:
            self.aside.put_back()  # a run killed mid-way left the one before it aside
        earlier = self.written()
        if earlier and not overwrite:
            raise RunError(f"run folder {self.path} already holds a run ({earlier[0]}, ...); pass --overwrite to "
                           f"replace it, or --run-dir / a new recipe name to keep it")
        if earlier:
            self.aside.move(earlier)
            self._moved_aside = True
        recorded = set(self.manifest.names())
        strangers = sorted(p.name for p in self.path.iterdir()
                           if p.is_file() and PRUNET_NAMES.fullmatch(p.name) and p.name not in recorded)
        if strangers:  # the run would write over them: they are the user's, not prunet's
            shown = ", ".join(strangers[:3]) + (", ..." if len(strangers) > 3 else "")
            raise RunError(f"run folder {self.path} holds {shown}, named like prunet's files but not written by it; "
                           f"move them away, or choose another --run-dir")
        self.manifest.save([])

    @classmethod
    def resume(cls, path: str | Path) -> "RunFolder":
        """The folder of an unfinished run, to continue it in place (``prunet run --resume``).

        An earlier run it replaces stays aside until :meth:`commit`; :meth:`abandon`
        keeps this run's progress for another resume.

        Raises:
            MissingRunFileError: no such folder.
            RunError: nothing to resume there, or another run is writing it.
        """
        folder = cls.open(path)
        folder._lock()
        if not folder.progress.path.is_file():
            folder.lock.release()
            done = (folder.path / SUMMARY).is_file()
            raise RunError(f"run folder {folder.path} has no unfinished run to resume"
                           + (" (its run finished: summary.json)" if done else f" (no {PROGRESS})"))
        folder._resumed = True
        return folder

    @classmethod
    def open(cls, path: str | Path) -> "RunFolder":
        """An existing run folder, to add files to.

        Raises:
            MissingRunFileError: no such folder.
        """
        folder = cls(path)
        if not folder.path.is_dir():
            raise MissingRunFileError(f"run folder {folder.path} does not exist")
        return folder

    def _lock(self) -> None:
        try:
            self.lock.acquire()
        except OSError as e:
            raise RunError(f"cannot write run folder {self.path}: {e.strerror or e}") from None

    def commit(self) -> None:
        """The run finished: delete the earlier run moved aside, and unlock the folder."""
        try:
            self.aside.discard()
        finally:
            self.lock.release()

    def abandon(self) -> str:
        """The run failed: put an earlier run back (this run's files go), or keep this run's files.

        Returns:
            What happened, for the log.
        """
        resume = f"; 'prunet run --resume {self.path}' continues it"
        try:
            with self.manifest.locked():
                if self._resumed:  # the earlier run, if any, stays aside until the resumed run finishes
                    return f"the progress so far is in {self.path}{resume}"
                if self.aside.exists():
                    self.aside.put_back()
                    return f"the earlier run in {self.path} is back in place"
                has = self.progress.path.is_file()
                return f"the files this run finished writing are in {self.path}{resume if has else ''}"
        finally:
            self.lock.release()

    def save_progress(self, progress: dict[str, Any]) -> None:
        """Write the run's resume point whole (:class:`~prunet.runfolder.progress.Progress`)."""
        self.progress.save(progress)

    def load_progress(self) -> dict[str, Any]:
        """The run's resume point, checked against ``metrics.jsonl`` (nothing changes yet)."""
        return self.progress.load()

    def rewind(self, progress: dict[str, Any]) -> None:
        """Cut ``metrics.jsonl`` back to the resume point ``progress``: the lines logged after it are redone."""
        self.progress.rewind(progress)

    def written(self) -> list[str]:
        """The files prunet wrote here that are still there, in the order they were first written."""
        return self.manifest.written()

    def forget(self, name: str) -> None:
        """Delete file ``name`` of this run and its record."""
        self.manifest.remove(name)

    def record(self, name: str) -> Path:
        """Record ``name`` as a file of this run and return its path, for a writer that writes whole files.

        The writers of :mod:`prunet.checkpoint`, :mod:`prunet.analysis` and
        :mod:`prunet.files` all do (through :func:`prunet.files.atomic_path`).
        """
        return self.manifest.add(name)

    def write_text(self, name: str, text: str) -> Path:
        return write_text(self.record(name), text)

    def write_json(self, name: str, data: Any) -> Path:
        return self.write_text(name, json.dumps(data, indent=2) + "\n")

    def write_yaml(self, name: str, data: Any) -> Path:
        return self.write_text(name, yaml.safe_dump(data, sort_keys=False))

    def save_checkpoint(self, name: str, model: nn.Module, meta: dict[str, Any]) -> Path:
        """Save ``model`` as checkpoint ``name`` (:func:`prunet.checkpoint.save_checkpoint`, itself atomic)."""
        return save_checkpoint(self.record(name), model, meta)

    def log_metrics(self, event: str, **fields: Any) -> None:
        """Append one JSON line to ``metrics.jsonl``."""
        with (self.path / METRICS).open("a") as f:
            f.write(json.dumps({"event": event, **fields}) + "\n")


class RankFolder:
    """The run folder as a rank other than 0 of a distributed run sees it: rank 0 writes, this rank writes nothing.

    It is a :class:`Folder` whose every call does nothing, so every rank runs the same pipeline code.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def record(self, name: str) -> Path:
        return self.path / name

    def write_text(self, name: str, text: str) -> Path:
        return self.path / name

    write_json = write_yaml = write_text

    def save_checkpoint(self, name: str, model: nn.Module, meta: dict[str, Any]) -> Path:
        return self.path / name

    def log_metrics(self, event: str, **fields: Any) -> None:
        pass

    def save_progress(self, progress: dict[str, Any]) -> None:
        pass

    def rewind(self, progress: dict[str, Any]) -> None:
        pass

    def forget(self, name: str) -> None:
        pass

    def commit(self) -> None:
        pass

    def abandon(self) -> str:
        return "rank 0 keeps the run folder"
