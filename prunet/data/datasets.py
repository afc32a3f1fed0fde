"""MNIST and Fashion-MNIST: find the files, load them, split, batch.

Everything is held in memory as tensors (a 60000x28x28 uint8 set is 47 MB) and
batched by indexing, which on a two-core machine beats a ``DataLoader`` with
workers.

Example:
    >>> data = load_dataset("fashion-mnist")  # doctest: +SKIP
    >>> len(data.train), len(data.val), len(data.test)  # doctest: +SKIP
    (55000, 5000, 10000)
    >>> g = torch.Generator().manual_seed(0)
    >>> for x, y in batches(data.train, 128, shuffle=True, generator=g,
    ...                     mean=data.mean, std=data.std):  # doctest: +SKIP
    ...     break
    >>> x.shape, y.shape  # doctest: +SKIP
    (torch.Size([128, 1, 28, 28]), torch.Size([128]))
"""

from __future__ import annotations

import http.client
import math
import os
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from prunet.data.idx import DataError, read_idx
from prunet.files import atomic_path

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "DatasetSplits",
    "Split",
    "batches",
    "cache_dir",
    "find_data_dir",
    "load_dataset",
    "num_batches",
    "system_dir",
]

# The four files of both datasets, keyed by role; each may also end in ".gz".
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class DatasetInfo:
    """What we know about a dataset before reading any of it.

    Attributes:
        name: registry key, also the folder name looked for under each data root.
        classes: class names, indexed by label.
        mean: pixel mean of the training set, pixels scaled to [0, 1].
        std: pixel standard deviation of the training set, same scale.
        mirrors: base URLs that serve ``<file>.gz`` for each of ``files``.
        debian_package: the Debian package installing it under ``/usr/share/datasets``, if any.
        files: role -> file name without ``.gz``.
    """

    name: str
    classes: tuple[str, ...]
    mean: float
    std: float
    mirrors: tuple[str, ...]
    debian_package: str | None = None
    files: dict[str, str] = field(default_factory=lambda: dict(FILES))


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(
        name="mnist",
        classes=tuple(str(d) for d in range(10)),
        mean=0.1307,
        std=0.3081,
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/",),
    ),
    "fashion-mnist": DatasetInfo(
        name="fashion-mnist",
        classes=(
            "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
            "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
        ),
        mean=0.2860,
        std=0.3530,
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        debian_package="dataset-fashion-mnist",
    ),
}

# Where Debian's dataset-* packages install; module-level so tests can point it elsewhere.
SYSTEM_DATA_ROOT = Path("/usr/share/datasets")
DOWNLOAD_TIMEOUT_S = 20.0
IMAGE_SHAPE = (28, 28)


@dataclass
class Split:
    """One part of a dataset, in memory.

    Attributes:
        images: (N, 28, 28) uint8.
        labels: (N,) int64.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels):
            raise DataError(f"split has {len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class DatasetSplits:
    """A dataset as train / validation / test splits plus what is needed to use them.

    Attributes:
        train: training examples not held out for validation.
        val: held-out part of the original training set.
        test: the original test set.
        name: registry key, e.g. ``"fashion-mnist"``.
        classes: class names, indexed by label.
        mean: normalisation mean, for :func:`batches`.
        std: normalisation standard deviation, for :func:`batches`.
        source: the folder the files were read from.
    """

    train: Split
    val: Split
    test: Split
    name: str
    classes: tuple[str, ...]
    mean: float
    std: float
    source: Path


def system_dir(name: str) -> Path:
    """The folder a Debian package installs dataset ``name`` into."""
    return SYSTEM_DATA_ROOT / name


def cache_dir(name: str) -> Path:
    """The per-user folder downloads of dataset ``name`` go to (``$XDG_CACHE_HOME`` honoured)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "prunet" / name


def find_data_dir(
    name: str, data_dir: str | os.PathLike | None = None, download: bool = True
) -> Path:
    """Find the folder holding the four IDX files of dataset ``name``.

    Looks in order at: ``data_dir``; ``$PRUNET_DATA`` (the folder itself, or its
    subfolder ``name``); the Debian package folder (:func:`system_dir`); the user
    cache (:func:`cache_dir`). A folder counts when it holds all four files, raw
    or ``.gz``. If none does, downloads into the cache, unless ``download`` is
    False or ``$PRUNET_NO_DOWNLOAD`` is set.

    Args:
        name: a key of :data:`DATASETS`.
        data_dir: a folder the user named. It must hold the files (itself or in
            its subfolder ``name``): there is no silent fallback to other places.
        download: allow downloading when no folder has the files.

    Returns:
        The folder holding the files.

    Raises:
        DataError: unknown name; ``data_dir`` lacks files; nothing found and
            download disabled or failed. The message lists where it looked.
    """
    info = _info(name)
    if data_dir is not None:
        folder = Path(data_dir).expanduser()
        found = _first_complete(_with_subfolder(folder, name), info)
        if found is None:
            missing = ", ".join(_missing_files(folder, info))
            raise DataError(f"data dir {folder} lacks {missing} (each may also end in .gz)")
        return found

    looked: list[Path] = []
    if env := os.environ.get("PRUNET_DATA"):
        looked += _with_subfolder(Path(env).expanduser(), name)
    looked += [system_dir(name), cache_dir(name)]
    found = _first_complete(looked, info)
    if found is not None:
        return found

    failure = "download disabled"
    if download and os.environ.get("PRUNET_NO_DOWNLOAD", "") in ("", "0"):
        try:
            return _download(info, cache_dir(name))
        except DataError as e:
            failure = f"download failed: {e}"

    hint = f"apt-get install {info.debian_package}, or " if info.debian_package else ""
    raise DataError(
        f"{name} not found; looked in: {', '.join(map(str, looked))} ({failure}). "
        f"To get it: {hint}pass --data-dir / set PRUNET_DATA to a folder holding "
        f"{', '.join(info.files.values())} (raw or .gz)"
    )


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    val_size: int = 5000,
    seed: int = 0,
    download: bool = True,
) -> DatasetSplits:
    """Load a dataset and hold out a validation split from its training set.

    The validation split is the first ``val_size`` entries of a permutation drawn
    from ``torch.Generator().manual_seed(seed)``: the same seed always gives the
    same split, on any machine. Both parts keep the file's order.

    Args:
        name: a key of :data:`DATASETS`.
        data_dir: where the files are; see :func:`find_data_dir`.
        val_size: examples held out, ``0 <= val_size < len(train)``.
        seed: seed of the train/validation split.
        download: allow downloading if the files are nowhere local.

    Returns:
        The three splits with name, classes, normalisation and source folder.

    Raises:
        DataError: unknown name, files not found or inconsistent, bad ``val_size``.
    """
    info = _info(name)
    folder = find_data_dir(name, data_dir, download=download)
    full_train = _load_split(folder, info, "train")
    test = _load_split(folder, info, "test")

    n = len(full_train)
    if not 0 <= val_size < n:
        raise DataError(f"val_size must be in [0, {n}) for {n} training examples, got {val_size}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = perm[:val_size].sort().values, perm[val_size:].sort().values
    return DatasetSplits(
        train=Split(full_train.images[train_idx], full_train.labels[train_idx]),
        val=Split(full_train.images[val_idx], full_train.labels[val_idx]),
        test=test,
        name=name,
        classes=info.classes,
        mean=info.mean,
        std=info.std,
        source=folder,
    )


def batches(
    split: Split,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    mean: float,
    std: float,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Iterate over a split in normalised batches, one epoch.

    With ``rank``/``world_size`` each process takes every ``world_size``-th
    index of the (shared) order, starting at ``rank``: the ranks' parts are
    disjoint and together cover the split once. Give every rank a generator
    with the same seed so they agree on the order; sizes may differ by one.

    Args:
        split: the examples.
        batch_size: examples per batch; the last batch may be smaller.
        shuffle: draw a fresh order from ``generator`` (pass a seeded one for
            reproducible training); otherwise keep the split's order.
        generator: source of the permutation; None uses torch's global RNG.
        mean: subtracted after scaling pixels to [0, 1].
        std: divided by after subtracting ``mean``.
        rank: this process's index, ``0 <= rank < world_size``.
        world_size: number of processes sharing the split.

    Returns:
        An iterator of ``(x, y)``: x (B, 1, 28, 28) float32, y (B,) int64.

    Raises:
        ValueError: bad ``batch_size``, ``rank`` or ``world_size``.
    """
    # Checked here, not inside the generator, so mistakes surface at the call.
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")

    n = len(split)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    order = order[rank::world_size]
    return _iter_batches(split, order, batch_size, mean, std)


def num_batches(n: int, batch_size: int) -> int:
    """Batches :func:`batches` yields for ``n`` examples (the last may be partial)."""
    return math.ceil(n / batch_size)


def _iter_batches(
    split: Split, order: torch.Tensor, batch_size: int, mean: float, std: float
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        # (B, 28, 28) uint8 -> (B, 1, 28, 28) float32, normalised in place.
        x = split.images[idx].unsqueeze(1).to(torch.float32).div_(255.0).sub_(mean).div_(std)
        yield x, split.labels[idx]


def _info(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}") from None


def _find_file(folder: Path, stem: str) -> Path | None:
    """``folder/stem`` or ``folder/stem.gz``; raw first, as it reads faster."""
    for path in (folder / stem, folder / f"{stem}.gz"):
        if path.is_file():
            return path
    return None


def _missing_files(folder: Path, info: DatasetInfo) -> list[str]:
    return [stem for stem in info.files.values() if _find_file(folder, stem) is None]


def _with_subfolder(folder: Path, name: str) -> list[Path]:
    """A user-named folder may hold the files itself or in a subfolder per dataset."""
    return [folder, folder / name]


def _first_complete(folders: list[Path], info: DatasetInfo) -> Path | None:
    """The first of ``folders`` holding all files of ``info``."""
    return next((f for f in folders if not _missing_files(f, info)), None)


def _load_split(folder: Path, info: DatasetInfo, part: str) -> Split:
    """Read and check the images and labels of ``part`` ("train" or "test")."""
    image_path = _find_file(folder, info.files[f"{part}_images"])
    label_path = _find_file(folder, info.files[f"{part}_labels"])
    images, labels = read_idx(image_path), read_idx(label_path)

    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise DataError(
            f"{image_path}: expected uint8 images of shape (N, 28, 28), "
            f"got {images.dtype} {images.shape}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DataError(
            f"{label_path}: expected uint8 labels of shape (N,), got {labels.dtype} {labels.shape}"
        )
    if len(images) != len(labels):
        raise DataError(
            f"{label_path}: {len(labels)} labels for {len(images)} images in {image_path.name}"
        )
    if not len(images):  # accuracy on no images would read 0.00%
        raise DataError(f"{image_path}: holds no images")
    if labels.max() >= len(info.classes):
        raise DataError(
            f"{label_path}: label {labels.max()} out of range 0..{len(info.classes) - 1}"
        )
    return Split(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)))


def _download(info: DatasetInfo, folder: Path) -> Path:
    """Download the missing files of ``info`` into ``folder``; return it.

    Each file goes to a temporary name in ``folder`` and is checked with
    :func:`read_idx` before ``os.replace`` gives it its real name, so an
    interrupted or corrupt download never leaves a file that looks complete.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for stem in _missing_files(folder, info):
        errors = []
        for base in info.mirrors:
            url = f"{base}{stem}.gz"
            try:
                _fetch_checked(url, folder / f"{stem}.gz")
                break
            # HTTPException covers a connection dropped mid-body (IncompleteRead).
            except (OSError, http.client.HTTPException, DataError) as e:
                errors.append(f"{url}: {e}")
        else:
            raise DataError("; ".join(errors))
    return folder


def _fetch_checked(url: str, dest: Path) -> None:
    with atomic_path(dest) as tmp:
        with tmp.open("wb") as out, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            while chunk := response.read(1 << 20):
                out.write(chunk)
        read_idx(tmp)  # a corrupt download raises here and never takes the real name
