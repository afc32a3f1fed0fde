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

:class:`RunFolder` writes them (its parts: :mod:`.manifest`, :mod:`.lock`, :mod:`.aside`, :mod:`.progress`;
:class:`RankFolder` is the :class:`Folder` of ranks other than 0). Every file is written whole
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

from prunet.runfolder.folder import Folder, RankFolder, RunFolder
from prunet.runfolder.names import (
    BITS_CSV,
    BITS_PNG,
    COMPACT,
    CONFIG,
    DENSE,
    FINAL,
    LAYERS_CSV,
    LOCK,
    MANIFEST,
    METRICS,
    PREVIOUS,
    PROGRESS,
    PROGRESS_FORMAT,
    REPORT_HTML,
    REPORT_MD,
    ROUNDS_PNG,
    SENSITIVITY_CSV,
    SENSITIVITY_PNG,
    SHARED_COMPACT,
    SHRUNK,
    SUMMARY,
    MissingRunFileError,
    RunError,
    round_checkpoint,
)
from prunet.runfolder.run import Run, run_file_at

__all__ = [
    "BITS_CSV", "BITS_PNG", "COMPACT", "CONFIG", "DENSE", "FINAL", "LAYERS_CSV", "LOCK", "MANIFEST", "METRICS",
    "PREVIOUS", "PROGRESS", "PROGRESS_FORMAT", "REPORT_HTML", "REPORT_MD", "ROUNDS_PNG", "SENSITIVITY_CSV",
    "SENSITIVITY_PNG", "SHARED_COMPACT", "SHRUNK", "SUMMARY", "Folder", "MissingRunFileError", "RankFolder", "Run",
    "RunError", "RunFolder", "round_checkpoint", "run_file_at",
]
