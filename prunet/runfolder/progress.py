"""An unfinished run's resume point (``.prunet-progress.pt``), written whole after every epoch and phase.

Read with ``torch.load(weights_only=True)``: tensors and plain values only, nothing executed. It
records how long ``metrics.jsonl`` was when it was saved, so a resumed run redoes the lines logged
after it.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from prunet.files import atomic_path
from prunet.runfolder.manifest import Manifest
from prunet.runfolder.names import METRICS, PROGRESS, PROGRESS_FORMAT, RunError


class Progress:
    """The resume point of ``manifest``'s folder (on record like any file the run wrote)."""

    def __init__(self, manifest: Manifest):
        self.manifest = manifest
        self.folder = manifest.folder
        self.path = self.folder / PROGRESS

    def save(self, progress: dict[str, Any]) -> None:
        """Write the resume point whole (the previous one stays until the new one is complete)."""
        progress = {"format": PROGRESS_FORMAT, "metrics_bytes": (self.folder / METRICS).stat().st_size, **progress}
        with atomic_path(self.manifest.add(PROGRESS)) as tmp:
            torch.save(progress, tmp)

    def load(self) -> dict[str, Any]:
        """The resume point :meth:`save` wrote, checked against ``metrics.jsonl`` (nothing changes yet).

        :meth:`rewind` then cuts the metrics back to it, once the run is known to go on.
        """
        try:
            progress = torch.load(self.path, weights_only=True, map_location="cpu")
        except Exception as e:  # torch raises many kinds for a damaged file
            raise RunError(f"{self.path} is unreadable or corrupt ({str(e).splitlines()[0] if str(e) else e!r}); "
                           f"start the run again with --overwrite") from None
        if not isinstance(progress, dict) or progress.get("format") != PROGRESS_FORMAT:
            raise RunError(f"{self.path} is not a resume point this prunet can read (format "
                           f"{progress.get('format') if isinstance(progress, dict) else '?'}, expected "
                           f"{PROGRESS_FORMAT}); start the run again with --overwrite")
        metrics = self.folder / METRICS
        size = metrics.stat().st_size if metrics.is_file() else -1
        if size < progress["metrics_bytes"]:
            raise RunError(f"{metrics} is shorter than when the resume point was saved; start the run again "
                           f"with --overwrite")
        return progress

    def rewind(self, progress: dict[str, Any]) -> None:
        """Cut ``metrics.jsonl`` back to the resume point ``progress``: the lines logged after it are redone."""
        os.truncate(self.folder / METRICS, progress["metrics_bytes"])
