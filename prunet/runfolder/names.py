"""The names in a run folder: its files, prunet's hidden state, the errors about them."""

from __future__ import annotations

import re
from pathlib import Path

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

# The names a run writes: a file so named in a folder, that prunet did not write, is the user's.
PRUNET_NAMES = re.compile(
    r"(config\.yaml|metrics\.jsonl|summary\.json|(dense|final|final_shrunk|round\d+)\.safetensors"
    r"|final(_shared)?\.prunet|report\.(md|html)|report_[A-Za-z0-9_.-]+\.png|layers\.csv"
    r"|(sensitivity|bits)\.(csv|png))"
)


def round_checkpoint(i: int) -> str:
    """The checkpoint name of round ``i`` (1-based): ``round<i>.safetensors``."""
    return f"round{i}.safetensors"


def plain_name(name: str) -> bool:
    """A file name directly in the folder: no separator, not ``.``/``..``, not the manifest."""
    return bool(name) and Path(name).name == name and "/" not in name and name not in (".", "..", MANIFEST)


class RunError(ValueError):
    """A run folder that is missing, incomplete, corrupt or taken; the message names the file."""


class MissingRunFileError(RunError, FileNotFoundError):
    """A file a command needs is not in the run folder (also a ``FileNotFoundError``)."""
