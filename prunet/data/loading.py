"""Where a run's data comes from and how it reaches the model: the one loader every phase uses.

Two kinds of source give the same :class:`~prunet.data.DatasetSplits`:

- the IDX datasets (MNIST, Fashion-MNIST), held in memory as :class:`~prunet.data.Split`
  and batched by slicing tensors (no per-example Python, bit-identical to earlier runs);
- the user's own ``torch.utils.data.Dataset`` objects, from a recipe's ``data.factory``,
  read through a ``DataLoader`` (worker processes, pinned memory) in the same order.

:func:`loader` takes either, shards it over the ranks of a distributed run, and moves
each batch to the device.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, Sized

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from prunet.data.datasets import DatasetSplits, Split, batches, load_dataset
from prunet.data.idx import DataError
from prunet.factory import call_factory

__all__ = ["first_batch", "head", "load_data", "loader", "loader_batches"]

Batch = tuple[torch.Tensor, torch.Tensor]


def load_data(cfg) -> DatasetSplits:
    """The data a recipe's ``data`` section names, split into train / validation / test.

    Args:
        cfg: a :class:`prunet.config.DataConfig`: an IDX ``dataset`` (``data_dir``, ``val_size``,
            ``split_seed``) or a ``factory`` with its ``kwargs``; ``train_subset`` cuts either.

    Returns:
        The splits; the training split cut to its first ``train_subset`` examples when that is set.

    Raises:
        DataError: as :func:`prunet.data.load_dataset`; a factory whose result is not three datasets, whose
            datasets cannot give their first and last examples as a batch, or whose ``mean``, ``std`` or
            ``classes`` is not what they mean.
        prunet.factory.FactoryError: a factory that cannot be imported, or raised.
    """
    if cfg.factory is not None:
        data = _factory_splits(cfg)
    else:
        data = load_dataset(cfg.dataset, data_dir=cfg.data_dir, val_size=cfg.val_size, seed=cfg.split_seed)
    if cfg.train_subset is not None and cfg.train_subset < len(data.train):
        data.train = head(data.train, cfg.train_subset)
    return data


def head(dataset: Dataset, n: int) -> Dataset:
    """The first ``n`` examples of ``dataset`` (all of them when it has fewer)."""
    n = min(n, len(dataset))
    if isinstance(dataset, Split):
        return Split(dataset.images[:n], dataset.labels[:n])
    return Subset(dataset, range(n))


def first_batch(dataset: Dataset, n: int, *, mean: float = 0.0, std: float = 1.0,
                device: torch.device | str | None = None) -> Batch:
    """The first ``n`` examples of ``dataset`` (fewer if it has fewer) as one normalised batch on ``device``."""
    return next(iter(loader(head(dataset, n), n, shuffle=False, mean=mean, std=std, device=device)))


def loader_batches(n: int, batch_size: int, world_size: int = 1, *, train: bool = False) -> int:
    """Batches each rank takes from :func:`loader` for ``n`` examples (the last may be partial).

    With ``train`` and several ranks, the ``n % world_size`` examples left over are dropped
    (a different few each epoch), so every rank takes the same number of steps.
    """
    per_rank = n // world_size if train else math.ceil(n / world_size)
    return math.ceil(per_rank / max(1, batch_size // world_size if train else batch_size))


def loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    mean: float = 0.0,
    std: float = 1.0,
    device: torch.device | str | None = None,
    rank: int = 0,
    world_size: int = 1,
    train: bool = False,
    workers: int = 0,
    pin_memory: bool | None = None,
) -> Iterator[Batch]:
    """One epoch of ``(x, y)`` batches of ``dataset`` on ``device``.

    Args:
        dataset: a :class:`~prunet.data.Split` (normalised with ``mean``/``std``) or any
            map-style dataset of ``(x, y)`` pairs (``mean``/``std`` applied when not 0/1).
        batch_size: examples per batch, over all ranks: with ``train`` each of
            ``world_size`` ranks takes ``batch_size // world_size`` of every batch.
        shuffle: draw a fresh order from ``generator`` (every rank must pass one with the same seed).
        device: where the batches go (default: stay on the CPU).
        rank, world_size: this process's part of a distributed run. Ranks take disjoint
            parts that together cover the epoch once (less the leftover of ``train``).
        train: a training epoch. Under several ranks every rank then takes the same number of
            batches (DDP needs it); evaluation covers every example once instead.
        workers: ``DataLoader`` worker processes for a dataset that is not a ``Split``.
        pin_memory: pin host memory before copying to CUDA; default: when ``device`` is CUDA.

    Raises:
        ValueError: a ``batch_size`` not divisible by ``world_size`` in training, or below 1.
        DataError: while iterating, a dataset (not a ``Split``) that raises reading a batch, or
            gives examples that make none; one line naming ``data.factory``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    per_rank = batch_size
    if train and world_size > 1:
        if batch_size % world_size:
            raise ValueError(f"data.batch_size: {batch_size} does not split over {world_size} processes; "
                             f"give a multiple of {world_size}")
        per_rank = batch_size // world_size
    device = torch.device(device) if device is not None else None
    n = len(dataset)
    if isinstance(dataset, Split) and train and world_size > 1:
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        dataset, shuffle = Split(dataset.images[order], dataset.labels[order]), False
        n = world_size * (n // world_size)
        dataset = Split(dataset.images[:n], dataset.labels[:n])
    if isinstance(dataset, Split):
        it = batches(dataset, per_rank, shuffle=shuffle, generator=generator, mean=mean, std=std,
                     rank=rank, world_size=world_size)
        return _to(it, device, non_blocking=False)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    if train and world_size > 1:
        order = order[: world_size * (n // world_size)]
    order = order[rank::world_size].tolist()
    index_batches = [order[i: i + per_rank] for i in range(0, len(order), per_rank)]
    pin = device is not None and device.type == "cuda" if pin_memory is None else pin_memory
    dl = DataLoader(dataset, batch_sampler=index_batches, num_workers=workers, pin_memory=pin,
                    collate_fn=_collate)
    it = _read(dl, index_batches)
    it = _normalised(it, mean, std) if (mean, std) != (0.0, 1.0) else it
    return _to(it, device, non_blocking=pin)


def _to(it: Iterator[Batch], device: torch.device | None, non_blocking: bool) -> Iterator[Batch]:
    for x, y in it:
        if device is not None and device.type != "cpu":
            x, y = x.to(device, non_blocking=non_blocking), y.to(device, non_blocking=non_blocking)
        yield x, y


def _normalised(it, mean: float, std: float) -> Iterator[Batch]:
    for x, y in it:
        yield (x.to(torch.float32) - mean) / std, y


def _read(dl: DataLoader, index_batches: list[list[int]]) -> Iterator[Batch]:
    """The batches of ``dl``; whatever the user's dataset raises while they are read, told in one line.

    A ``DataLoader`` worker's error reaches here re-raised with the worker's traceback in its message
    (``Caught RuntimeError in DataLoader worker process 0 ...``): only the original's line is kept.
    """
    it = iter(dl)
    for indices in index_batches:
        try:
            batch = next(it)
        except Exception as e:
            # A worker's error holds the iterator in a reference cycle: freed by the garbage collector, its
            # workers would stall it for 5 s (torch's join timeout). They are stopped now instead.
            getattr(it, "_shutdown_workers", lambda: None)()
            original = _from_worker(e)
            if isinstance(e, DataError):  # _collate's: one line, unless a worker wrapped it
                if original is None:
                    raise
                raise DataError(original.removeprefix(f"{DataError.__module__}.DataError: ")) from None
            told = original or f"{type(e).__name__}{f': {_first_line(e)}' if str(e) else ''}"
            raise DataError(f"data.factory: reading a batch of {len(indices)} from its dataset of "
                            f"{len(dl.dataset)} examples raised {told}") from e
        yield batch


def _from_worker(e: BaseException) -> str | None:
    """The original error's last line (``RuntimeError: disk gone``) when ``e`` was re-raised from a worker."""
    text = str(e)
    if not (text.startswith("Caught ") and "DataLoader worker" in text.split("\n", 1)[0]):
        return None
    return text.strip().splitlines()[-1].strip()


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else ""


class _BadExamples(ValueError):
    """Examples that do not make a batch; the message says why (the caller says where)."""


def _collate(items: list[Any]) -> Batch:
    """``(x, y)`` pairs to a batch; a label is an integer (an int, or a 0-d tensor or array of a whole number)."""
    try:
        return _stack(items)
    except _BadExamples as e:
        raise DataError(f"data.factory: {e}") from None


def _stack(items: list[Any]) -> Batch:
    """:func:`_collate`'s batch, or :class:`_BadExamples` saying what in ``items`` does not fit."""
    odd = next((item for item in items if isinstance(item, (str, bytes))
                or not (isinstance(item, Sequence) and len(item) == 2)), None)
    if odd is not None:
        raise _BadExamples(f"a dataset example must be an (input, label) pair, got {_shown(odd)}")
    xs, ys = zip(*items)
    x = torch.stack(_tensors(xs, "input", "a tensor or an array of numbers, all of one shape (resize or pad "
                                          "in your dataset)"))
    y = torch.stack(_tensors(ys, "label", "one integer, the class index (map class names to 0..N-1), or a row "
                                          "of integers (a sequence's next tokens)"))
    if y.dim() != 1 and (y.is_floating_point() or y.dtype == torch.bool):
        # Integer rows are targets per position (a language model's next tokens); float rows are one-hot labels.
        raise _BadExamples(f"a label must be one integer (the class) or a row of integers, got floats of shape "
                           f"{tuple(y.shape[1:])} (one-hot labels: give the class index)")
    if y.is_floating_point():
        if not torch.equal(y, y.round()):
            raise _BadExamples(f"labels must be whole numbers (class indices), got {y[y != y.round()][0].item()}")
    elif y.dtype == torch.bool or y.is_complex():
        raise _BadExamples(f"labels must be integer class indices, got {y.dtype}")
    return x, y.to(torch.int64)


def _tensors(values: tuple[Any, ...], noun: str, wanted: str) -> list[torch.Tensor]:
    """Each value as a tensor, all of one shape; else :class:`_BadExamples` naming the first that is not."""
    out = []
    for v in values:
        try:
            out.append(torch.as_tensor(v))
        except (TypeError, ValueError, RuntimeError):
            article = "an" if noun[0] in "aeiou" else "a"
            raise _BadExamples(f"{article} {noun} must be {wanted}, got {_shown(v)}") from None
    shapes = list(dict.fromkeys(tuple(t.shape) for t in out))
    if len(shapes) > 1:
        raise _BadExamples(f"{noun}s of different shapes {shapes[0]} and {shapes[1]}; each must be {wanted}")
    return out


def _factory_splits(cfg) -> DatasetSplits:
    """Call ``data.factory`` and check its result: train / validation / test datasets.

    The factory returns ``(train, val, test)`` or a mapping with those keys (``validation``
    also names the second) and optionally ``classes``, ``mean`` and ``std``. A ``val`` of
    None holds out ``val_size`` training examples, drawn with ``split_seed``. The first and
    last example of each dataset are read here, so a dataset that cannot give them, or
    gives what no batch is made of, fails before anything trains.
    """
    where = "data.factory"
    out = call_factory(cfg.factory, cfg.kwargs, where)
    extra: dict[str, Any] = {}
    if isinstance(out, dict):
        unknown = set(out) - {"train", "val", "validation", "test", "classes", "mean", "std"}
        if unknown or "train" not in out or "test" not in out:
            raise DataError(f"{where}: {cfg.factory} returned a mapping with keys {sorted(out)}; expected train, "
                            f"val (or validation), test and optionally classes, mean, std")
        train, val, test = out["train"], out.get("val", out.get("validation")), out["test"]
        extra = {k: out[k] for k in ("classes", "mean", "std") if k in out}
    elif isinstance(out, (tuple, list)) and len(out) == 3:
        train, val, test = out
    else:
        raise DataError(f"{where}: {cfg.factory} returned {type(out).__name__}; expected (train, val, test) "
                        f"datasets or a mapping with those keys")
    for name, ds in (("train", train), ("test", test)) + ((("val", val),) if val is not None else ()):
        _check_dataset(ds, f"{where}: its {name}")
    if val is None:
        n = len(train)
        if not 0 < cfg.val_size < n:
            raise DataError(f"data.val_size must be in (0, {n}) to hold out from {n} training examples, "
                            f"got {cfg.val_size}")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.split_seed))
        val = Subset(train, perm[: cfg.val_size].sort().values.tolist())
        train = Subset(train, perm[cfg.val_size:].sort().values.tolist())
    classes = _classes(extra.get("classes", ()), where)
    mean = _number(extra.get("mean", 0.0), f"{where}: its mean", "the inputs' mean, subtracted from every input")
    std = _number(extra.get("std", 1.0), f"{where}: its std", "the inputs' standard deviation, dividing every input")
    if std <= 0:
        raise DataError(f"{where}: its std is {std}; expected a number > 0 (the inputs' standard deviation)")
    return DatasetSplits(train=train, val=val, test=test, name=cfg.factory, classes=classes,
                         mean=mean, std=std, source=cfg.factory)


def _check_dataset(ds: Any, where: str) -> None:
    """A factory's dataset: map-style, not empty, its first and last examples readable into a batch.

    The splits' inputs may differ in shape from one another (a network that pools globally can be
    evaluated on larger images than it trains on); the model check that follows tells if they do not fit.
    """
    if isinstance(ds, torch.Tensor):
        raise DataError(f"{where} is a tensor, not a dataset; wrap inputs and labels as "
                        f"torch.utils.data.TensorDataset(x, y)")
    if not (isinstance(ds, Sized) and hasattr(ds, "__getitem__")):
        raise DataError(f"{where} is a {type(ds).__name__}, not a map-style dataset (__len__ and __getitem__)")
    try:
        n = len(ds)
    except Exception as e:  # a negative or non-integer __len__, or one that raises
        raise DataError(f"{where} dataset: len() raised {type(e).__name__}: {_first_line(e)}") from None
    if not n:
        raise DataError(f"{where} dataset is empty")
    examples = []
    for i in dict.fromkeys((0, n - 1)):
        try:
            examples.append(ds[i])
        except Exception as e:
            beyond = f" (its __len__ says {n}: does it count more than it holds?)" if i == n - 1 and i else ""
            raise DataError(f"{where} dataset's example {i} raised {type(e).__name__}: {_first_line(e)}"
                            f"{beyond}") from e
    try:
        _stack(examples)
    except _BadExamples as e:
        raise DataError(f"{where} dataset: {e}") from None


def _classes(value: Any, where: str) -> tuple[str, ...]:
    """The mapping's ``classes``: a list of class names, label ``i`` named by the ``i``-th."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise DataError(f"{where}: its classes is {_shown(value)}; expected a list of class names, one per label "
                        f"(e.g. ['cat', 'dog']), or no classes key")
    return tuple(str(c) for c in value)


def _number(value: Any, where: str, meaning: str) -> float:
    """One finite number (a Python, NumPy or 0-d tensor scalar)."""
    number = None
    if not isinstance(value, (str, bytes, bool)):  # float("1.5") and float(True) would pass
        try:
            number = float(value)
        except (TypeError, ValueError, RuntimeError):
            pass
    if number is None:
        raise DataError(f"{where} is {_shown(value)}; expected one number ({meaning})")
    if not math.isfinite(number):
        raise DataError(f"{where} is {number}; expected a finite number ({meaning})")
    return number


def _shown(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"
