"""Arrays on disk as a dataset, without writing a line of code: a folder of ``.npz`` files.

``data: {factory: "prunet.data.npz:splits", kwargs: {folder: /data/mine}}`` reads
``train.npz``, ``test.npz`` and, when present, ``val.npz`` from the folder; each holds the
inputs as ``x`` (N, ...) and the integer labels as ``y`` (N,). Without ``val.npz`` the run
holds out ``data.val_size`` training examples. Inputs are used as stored (as float32):
normalise them before saving, or give ``mean`` and ``std``.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from prunet.data.idx import DataError

__all__ = ["splits"]


def splits(folder: str, mean: float = 0.0, std: float = 1.0) -> dict:
    """``{"train", "val", "test", "mean", "std"}`` from ``folder``'s ``.npz`` files (``val`` None without ``val.npz``).

    Raises:
        DataError: a missing or unreadable file, no ``x`` or ``y`` in it, labels that are not
            integers, or inputs and labels of different lengths.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DataError(f"data.kwargs.folder: {root} is not a folder")
    out = {name: _read(root / f"{name}.npz") for name in ("train", "test")}
    out["val"] = _read(root / "val.npz") if (root / "val.npz").is_file() else None
    return {**out, "mean": mean, "std": std}


def _read(path: Path) -> TensorDataset:
    if not path.is_file():
        raise DataError(f"{path} is missing (an .npz folder holds train.npz, test.npz and optionally val.npz)")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("x", "y") if k not in f.files]
            if missing:
                raise DataError(f"{path} has no array {missing[0]!r} (it holds {', '.join(f.files) or 'nothing'})")
            x, y = f["x"], f["y"]
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise DataError(f"{path} is not a readable .npz file ({e})") from None
    if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1:
        raise DataError(f"{path}: y must be integer labels of shape (N,), got {y.dtype} {y.shape}")
    if len(x) != len(y):
        raise DataError(f"{path}: {len(x)} inputs but {len(y)} labels")
    return TensorDataset(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(y.astype(np.int64)))
