"""The files of a run: one folder, known names, every file written whole, and a view to read it.

A run folder (``runs/<recipe name>`` by default) holds what ``prunet run`` and
the commands after it write:

* ``config.yaml``: the recipe as run; ``metrics.jsonl``: one JSON object per
  epoch, per dense evaluation and per round; ``summary.json``: the results;
* ``dense.safetensors``, ``round<k>.safetensors``, ``final.safetensors``,
  ``final_shrunk.safetensors``: checkpoints; ``final.prunet``: the final model's compact file;
  ``final_shared.prunet``: with weight sharing, the shared model's;
* ``report.md``, ``report.html``, ``layers.csv``, ``report_*.png``: the report;
  ``sensitivity.csv`` and ``sensitivity.png``: the sensitivity analysis;
* ``.prunet-progress.pt``: while a run is unfinished, its resume point (saved after
  every epoch and phase, read by ``prunet run --resume``).

:class:`RunFolder` writes them. Every file is written whole
(:func:`prunet.files.atomic_path`) and its name is recorded in the folder's
manifest (``.prunet-files``), so ``--overwrite`` removes exactly the files prunet
wrote there and nothing else: a user's own file in the folder is never touched.
:class:`Run` reads a finished run (recipe, summary, checkpoints, metrics) for
the report and ``prunet report``.

Example:
    >>> folder = RunFolder.create("runs/lenet", overwrite=True)
    >>> _ = folder.write_json(METRICS, {"compression": 16.1})
    >>> folder.commit()
    >>> folder.written()
    ['metrics.jsonl']
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

try:
    import fcntl
except ImportError:  # not on Windows
    fcntl = None

import torch
import torch.nn as nn
import yaml

from prunet.checkpoint import (
    CheckpointError,
    load_model,
    read_checkpoint,
    save_checkpoint,
)
from prunet.config import ConfigError, Recipe, recipe_from_dict
from prunet.factory import Trust
from prunet.files import atomic_path, write_text
from prunet.pruner import Pruner

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
DENSE = "dense.safetensors"
FINAL = "final.safetensors"
SHRUNK = "final_shrunk.safetensors"
COMPACT = "final.prunet"
SHARED_COMPACT = "final_shared.prunet"  # with recipe.quantize: weights shared, Huffman coded
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
LAYERS_CSV = "layers.csv"
ROUNDS_PNG = "report_rounds.png"
SENSITIVITY_CSV = "sensitivity.csv"
SENSITIVITY_PNG = "sensitivity.png"
BITS_CSV = "bits.csv"  # prunet bits: accuracy against bits per shared weight
BITS_PNG = "bits.png"
MANIFEST = ".prunet-files"
PREVIOUS = ".prunet-previous"  # an earlier run's files, moved aside while a new run replaces them
LOCK = ".prunet-lock"  # held (flock) by the run writing the folder
PROGRESS = ".prunet-progress.pt"  # an unfinished run's resume point; removed when the run finishes
PROGRESS_FORMAT = 1

# What a folder written before the manifest existed holds; only these names are replaced there.
_LEGACY = re.compile(
    r"(config\.yaml|metrics\.jsonl|summary\.json|(dense|final|final_shrunk|round\d+)\.safetensors|final\.prunet"
    r"|report\.(md|html)|report_[A-Za-z0-9_.-]+\.png|layers\.csv|sensitivity\.(csv|png))"
)


def _names_in(aside: Path) -> list[str]:
    """The names a moved-aside run recorded (its manifest), checked like any manifest's."""
    try:
        names = json.loads((aside / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) and _plain_name(n) for n in names):
        raise RunError(f"{aside / MANIFEST} is missing or corrupt; the earlier run's files are in {aside}: move "
                       f"them back by hand")
    return names


def _plain_name(name: str) -> bool:
    """A file name directly in the folder: no separator, not ``.``/``..``, not the manifest."""
    return bool(name) and Path(name).name == name and "/" not in name and name not in (".", "..", MANIFEST)


def run_file_at(path: str | Path) -> str | None:
    """What ``path`` is to a run, when it is a file a run wrote or prunet's own state; None for anything else.

    A command that writes where the user says (``prunet export -o``, ``prunet tradeoff --plot``)
    calls this first, so it never replaces a run's recorded files (its folder's manifest lists
    them) nor anything in prunet's hidden files and folders (``.prunet-*``). A link is judged
    by what it points to, as well as by its own name.

    Returns:
        A phrase naming the run file (``"a file of the run in runs/x (dense.safetensors)"``), or None.
    """
    for candidate in dict.fromkeys((Path(path).absolute(), Path(path).resolve())):
        hidden = next((part for part in candidate.parts if part.startswith(".prunet")), None)
        if hidden is not None:
            return f"inside prunet's own {hidden}"
        try:
            recorded = RunFolder(candidate.parent)._recorded() if (candidate.parent / MANIFEST).is_file() else []
        except RunError:
            recorded = []
        if candidate.name in recorded:
            return f"a file of the run in {candidate.parent} ({candidate.name})"
    return None


def round_checkpoint(i: int) -> str:
    """The checkpoint name of round ``i`` (1-based): ``round<i>.safetensors``."""
    return f"round{i}.safetensors"


class RunError(ValueError):
    """A run folder that is missing, incomplete, corrupt or taken; the message names the file."""


class MissingRunFileError(RunError, FileNotFoundError):
    """A file a command needs is not in the run folder (also a ``FileNotFoundError``)."""


class RunFolder:
    """Writes the files of one run, each whole, and records their names.

    Use :meth:`create` to start a run and :meth:`open` to add files to an existing
    one (the report, the sensitivity analysis). A run that :meth:`create` started
    ends with :meth:`commit` (it finished) or :meth:`abandon` (it failed or was
    interrupted): an earlier run it replaces is moved aside into ``.prunet-previous``
    and deleted only at :meth:`commit`, put back at :meth:`abandon`, and put back by
    the next :meth:`create` if the process was killed in between. While it runs,
    the folder is locked: a second run into it is refused.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._run_lock: int | None = None
        self._resumed = False

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
        try:
            folder._lock_run()
        except OSError as e:
            raise RunError(f"cannot write run folder {folder.path}: {e.strerror or e}") from None
        try:
            with folder._locked():
                # A stopped run is offered for resuming before anything is put back (that would delete it).
                if not overwrite and PROGRESS in folder.written():
                    raise RunError(
                        f"run folder {folder.path} holds an unfinished run; continue it with 'prunet run --resume "
                        f"{folder.path}', or pass --overwrite to replace it"
                    )
                folder._put_back_previous()  # a run killed mid-way left the one before it aside
                earlier = folder.written()
                if earlier and not overwrite:
                    raise RunError(
                        f"run folder {folder.path} already holds a run ({earlier[0]}, ...); pass --overwrite to "
                        f"replace it, or --run-dir / a new recipe name to keep it"
                    )
                if earlier:
                    folder._move_aside(earlier)
                folder._save_manifest([])
            folder.write_text(METRICS, "")
        except OSError as e:
            folder._unlock_run()
            raise RunError(f"cannot write run folder {folder.path}: {e.strerror or e}") from None
        except BaseException:
            folder._unlock_run()
            raise
        return folder

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
        try:
            folder._lock_run()
        except OSError as e:
            raise RunError(f"cannot write run folder {folder.path}: {e.strerror or e}") from None
        if not (folder.path / PROGRESS).is_file():
            folder._unlock_run()
            done = (folder.path / SUMMARY).is_file()
            raise RunError(f"run folder {folder.path} has no unfinished run to resume"
                           + (" (its run finished: summary.json)" if done else f" (no {PROGRESS})"))
        folder._resumed = True
        return folder

    def save_progress(self, progress: dict[str, Any]) -> None:
        """Write the run's resume point whole (the previous one stays until the new one is complete)."""
        progress = {"format": PROGRESS_FORMAT, "metrics_bytes": (self.path / METRICS).stat().st_size, **progress}
        with atomic_path(self.record(PROGRESS)) as tmp:
            torch.save(progress, tmp)

    def load_progress(self) -> dict[str, Any]:
        """The resume point :meth:`save_progress` wrote, checked against ``metrics.jsonl`` (nothing changes yet).

        Read with ``torch.load(weights_only=True)``: tensors and plain values only, nothing executed.
        :meth:`rewind` then cuts the metrics back to it, once the run is known to go on.
        """
        path = self.path / PROGRESS
        try:
            progress = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as e:  # torch raises many kinds for a damaged file
            raise RunError(f"{path} is unreadable or corrupt ({str(e).splitlines()[0] if str(e) else e!r}); "
                           f"start the run again with --overwrite") from None
        if not isinstance(progress, dict) or progress.get("format") != PROGRESS_FORMAT:
            raise RunError(f"{path} is not a resume point this prunet can read (format "
                           f"{progress.get('format') if isinstance(progress, dict) else '?'}, expected "
                           f"{PROGRESS_FORMAT}); start the run again with --overwrite")
        metrics = self.path / METRICS
        size = metrics.stat().st_size if metrics.is_file() else -1
        if size < progress["metrics_bytes"]:
            raise RunError(f"{metrics} is shorter than when the resume point was saved; start the run again "
                           f"with --overwrite")
        return progress

    def rewind(self, progress: dict[str, Any]) -> None:
        """Cut ``metrics.jsonl`` back to the resume point ``progress``: the lines logged after it are redone."""
        os.truncate(self.path / METRICS, progress["metrics_bytes"])

    def forget(self, name: str) -> None:
        """Delete file ``name`` of this run and its record."""
        with self._locked():
            (self.path / name).unlink(missing_ok=True)
            self._save_manifest([n for n in self._recorded() if n != name])

    def _move_aside(self, earlier: list[str]) -> None:
        """Move the earlier run's files into ``.prunet-previous``, its manifest first.

        The manifest is written before any file moves, so an interruption at any point
        leaves a folder :meth:`_put_back_previous` can restore; a failure here (a full
        disk) puts back what moved before it raises.
        """
        aside = self.path / PREVIOUS
        aside.mkdir(exist_ok=True)
        write_text(aside / MANIFEST, json.dumps(earlier) + "\n")
        try:
            for name in earlier:
                os.replace(self.path / name, aside / name)
        except BaseException:
            self._put_back_previous()
            raise

    def commit(self) -> None:
        """The run finished: delete the earlier run moved aside, and unlock the folder.

        The aside folder is first renamed out of the way, so a crash while deleting it
        can never be taken for an unfinished replacement. What is left in it that is
        not the earlier run's (a file the user put there) stays.
        """
        aside = self.path / PREVIOUS
        try:
            if aside.is_dir():
                discard = self.path / f".prunet-discard-{os.getpid()}-{time.monotonic_ns()}"
                os.replace(aside, discard)
                try:
                    names = _names_in(discard)
                except RunError:
                    names = []
                for name in names:
                    (discard / name).unlink(missing_ok=True)
                (discard / MANIFEST).unlink(missing_ok=True)
                if not any(discard.iterdir()):
                    discard.rmdir()
        finally:
            self._unlock_run()

    def abandon(self) -> str:
        """The run failed: put an earlier run back (this run's files go), or keep this run's files.

        Returns:
            What happened, for the log.
        """
        resume = f"; 'prunet run --resume {self.path}' continues it"
        try:
            with self._locked():
                if self._resumed:  # the earlier run, if any, stays aside until the resumed run finishes
                    return f"the progress so far is in {self.path}{resume}"
                if (self.path / PREVIOUS).is_dir():
                    self._put_back_previous()
                    return f"the earlier run in {self.path} is back in place"
                has = (self.path / PROGRESS).is_file()
                return f"the files this run finished writing are in {self.path}{resume if has else ''}"
        finally:
            self._unlock_run()

    def _put_back_previous(self) -> None:
        """Replace this (unfinished) run's files by the earlier run's from ``.prunet-previous``.

        Safe to interrupt and to run again: the aside manifest is read (and checked)
        before anything changes and removed last; a name both runs wrote is never
        deleted, only replaced by the earlier run's file.
        """
        aside = self.path / PREVIOUS
        if not aside.is_dir():
            return
        names = _names_in(aside)
        current = self._recorded() if (self.path / MANIFEST).is_file() else []
        for name in current:
            if name not in names and (self.path / name).is_file():
                (self.path / name).unlink()  # only the new run's own files
        self._save_manifest(names)
        for name in names:
            if (aside / name).is_file():
                os.replace(aside / name, self.path / name)
        (aside / MANIFEST).unlink(missing_ok=True)
        if not any(aside.iterdir()):  # anything else there is not ours: left alone
            aside.rmdir()

    def _lock_run(self) -> None:
        if fcntl is None:
            return
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunError(f"run folder {self.path} is being written by another prunet run (pid {holder}); "
                           f"wait for it, or choose another --run-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._run_lock = fd

    def _unlock_run(self) -> None:
        if self._run_lock is not None:
            os.close(self._run_lock)  # closing releases the lock
            self._run_lock = None

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

    def written(self) -> list[str]:
        """The files prunet wrote here that are still there, in the order they were first written."""
        return [n for n in self._recorded() if (self.path / n).is_file()]

    def _recorded(self) -> list[str]:
        """Every name in the manifest; for a folder from before the manifest, the files named as prunet names them."""
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            if not self.path.is_dir():
                return []
            return sorted(p.name for p in self.path.iterdir() if p.is_file() and _LEGACY.fullmatch(p.name))
        try:
            names = json.loads(manifest.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            names = e
        if not isinstance(names, list) or not all(isinstance(n, str) and _plain_name(n) for n in names):
            raise RunError(f"{manifest} is corrupt (it must list the run's file names); delete it and prunet will "
                           f"recognise the run's files by their names") from None
        return names

    def _save_manifest(self, names: list[str]) -> None:
        write_text(self.path / MANIFEST, json.dumps(names) + "\n")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold an exclusive lock on the folder while the manifest is read and rewritten.

        Several commands may add files to one folder at once (a run saving a
        checkpoint while ``prunet report`` writes); the lock keeps one from
        dropping the other's name. On systems without ``fcntl`` there is no lock.
        """
        if fcntl is None:
            yield
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def record(self, name: str) -> Path:
        """Record ``name`` as a file of this run and return its path, for a writer that writes whole files.

        The writers of :mod:`prunet.checkpoint`, :mod:`prunet.analysis` and
        :mod:`prunet.files` all do (through :func:`prunet.files.atomic_path`).
        """
        if not _plain_name(name):
            raise ValueError(f"{name!r} is not a file name in the run folder")
        self.path.mkdir(parents=True, exist_ok=True)
        with self._locked():
            names = self._recorded()  # an older folder's files are kept on record, not forgotten
            if name not in names:
                self._save_manifest(names + [name])
        return self.path / name

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

    It has the :class:`RunFolder` methods a run calls, each doing nothing, so every rank
    runs the same pipeline code.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def save_progress(self, progress: dict[str, Any]) -> None:
        pass

    def forget(self, name: str) -> None:
        pass

    def rewind(self, progress: dict[str, Any]) -> None:
        pass

    def commit(self) -> None:
        pass

    def abandon(self) -> str:
        return "rank 0 keeps the run folder"

    def write_text(self, name: str, text: str) -> Path:
        return self.path / name

    write_json = write_yaml = write_text

    def save_checkpoint(self, name: str, model: nn.Module, meta: dict[str, Any]) -> Path:
        return self.path / name

    def log_metrics(self, event: str, **fields: Any) -> None:
        pass


class Run:
    """A read-only view of a run folder: its recipe, summary, checkpoints and metrics.

    Files are read when first asked for; a missing or corrupt one is a
    :class:`RunError` naming it.

    A run of the user's own model or data names the factories that build them (in
    ``config.yaml`` and the checkpoints): code that reading the run would call. The
    view builds them only when they are trusted.

    Args:
        path: a folder written by ``prunet run``.
        trust_factory: ``True`` (the user trusts the folder), or the factory specs that are
            trusted (the user's own recipe's); registry models and datasets need no trust.

    Raises:
        MissingRunFileError: the folder does not exist.
    """

    def __init__(self, path: str | Path, trust_factory: Trust = False):
        self.path = Path(path)
        self.trust_factory = trust_factory
        if not self.path.is_dir():
            raise MissingRunFileError(f"run folder {self.path} does not exist")

    def require(self, name: str, made_by: str = "prunet run") -> Path:
        """The path of ``name`` in the folder; :class:`MissingRunFileError` when it is not there."""
        path = self.path / name
        if not path.is_file():
            raise MissingRunFileError(f"run folder {self.path} has no {name} (written by '{made_by}')")
        return path

    def has(self, name: str) -> bool:
        return (self.path / name).is_file()

    @cached_property
    def recipe(self) -> Recipe:
        """The recipe the run was made with, from ``config.yaml``."""
        path = self.require(CONFIG)
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise RunError(f"{path} is not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise RunError(f"{path}: expected a recipe mapping, got {type(data).__name__}")
        try:
            recipe = recipe_from_dict(data)
        except ConfigError as e:
            raise RunError(f"{path}: {e}") from None
        recipe.check_trusted(self.trust_factory, path)
        return recipe

    @cached_property
    def summary(self) -> dict[str, Any]:
        """``summary.json`` of a run with pruning rounds."""
        path = self.require(SUMMARY)
        try:
            summary = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise RunError(f"{path} is not valid JSON ({e})") from None
        if not isinstance(summary, dict):
            raise RunError(f"{path}: expected a JSON object, got {type(summary).__name__}")
        for key in ("model", "dense", "final", "rounds"):
            if key not in summary:
                raise RunError(f"{path} lacks '{key}'; is it a prunet run summary?")
        return summary

    def load(self, name: str) -> tuple[nn.Module, Pruner | None, dict[str, Any]]:
        """Rebuild the model of checkpoint ``name`` (:func:`prunet.checkpoint.load_model`)."""
        try:
            return load_model(self.require(name), self.trust_factory)
        except CheckpointError as e:
            raise RunError(str(e)) from None

    def read_state(self, name: str) -> dict[str, Any]:
        """The state dict of checkpoint ``name``, without building a model."""
        try:
            state, _ = read_checkpoint(self.require(name))
        except CheckpointError as e:
            raise RunError(str(e)) from None
        return state

    def metrics(self) -> list[dict[str, Any]]:
        """The records of ``metrics.jsonl``, in order."""
        path = self.require(METRICS)
        records = []
        for i, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError:
                raise RunError(f"{path}, line {i}: not a JSON object") from None
        return records

    def files(self) -> list[str]:
        """The names of the files in the folder (hidden ones, such as temporary files, left out)."""
        return sorted(p.name for p in self.path.iterdir() if p.is_file() and not p.name.startswith("."))
