"""Reading a run folder: :class:`Run`, a finished run's recipe, summary, checkpoints and metrics; and
:func:`run_file_at`, whether a path a command would write is a run's own file."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

import torch.nn as nn
import yaml

from prunet.checkpoint import CheckpointError, load_checkpoint, read_checkpoint
from prunet.config import ConfigError, Recipe, recipe_from_dict
from prunet.factory import Trust
from prunet.pruner import Pruner
from prunet.runfolder.manifest import Manifest
from prunet.runfolder.names import CONFIG, DENSE, FINAL, MANIFEST, METRICS, SUMMARY, MissingRunFileError, RunError


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
        """``summary.json`` of a run. A dense-only run (``prunet train``) reads as a run of no rounds whose
        final model is its dense one."""
        path = self.require(SUMMARY)
        try:
            summary = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise RunError(f"{path} is not valid JSON ({e})") from None
        if not isinstance(summary, dict):
            raise RunError(f"{path}: expected a JSON object, got {type(summary).__name__}")
        for key in ("model", "dense"):
            if key not in summary:
                raise RunError(f"{path} lacks '{key}'; is it a prunet run summary?")
        if "final" not in summary and "rounds" not in summary:  # dense training only
            summary = {**summary, "final": summary["dense"], "rounds": [], "compression": 1.0}
        for key in ("final", "rounds"):
            if key not in summary:
                raise RunError(f"{path} lacks '{key}'; is it a prunet run summary?")
        return summary

    @property
    def final_checkpoint(self) -> str:
        """The run's final model: ``final.safetensors``, or a dense-only run's ``dense.safetensors``."""
        return DENSE if not self.summary["rounds"] and not self.has(FINAL) else FINAL

    def load(self, name: str) -> tuple[nn.Module, Pruner | None, dict[str, Any]]:
        """Rebuild the model of checkpoint ``name`` (:func:`prunet.checkpoint.load_checkpoint`)."""
        try:
            return load_checkpoint(self.require(name), self.trust_factory)
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
            recorded = Manifest(candidate.parent).names() if (candidate.parent / MANIFEST).is_file() else []
        except RunError:
            recorded = []
        if candidate.name in recorded:
            return f"a file of the run in {candidate.parent} ({candidate.name})"
    return None
