"""Pure schedule helpers: learning rate per epoch, and the criterion of each pruning round."""

from __future__ import annotations

import math

from prunet.config import RoundConfig
from prunet.pruner import Criterion, GlobalMagnitude, Sparsity, Threshold


def lr_at(epoch: int, epochs: int, base_lr: float, schedule: str, step_epochs: int = 5, gamma: float = 0.1) -> float:
    """Learning rate for ``epoch`` (0-based) of ``epochs``.

    Args:
        schedule: ``constant``; ``step`` (× ``gamma`` every ``step_epochs``);
            ``cosine`` (from ``base_lr`` towards 0, half a cosine over the epochs,
            evaluated at the start of each epoch so the first epoch uses ``base_lr``).

    >>> [round(lr_at(e, 4, 0.1, "cosine"), 4) for e in range(4)]
    [0.1, 0.0854, 0.05, 0.0146]
    """
    if not 0 <= epoch < max(epochs, 1):
        raise ValueError(f"epoch {epoch} outside 0..{epochs - 1}")
    if schedule == "constant":
        return base_lr
    if schedule == "step":
        return base_lr * gamma ** (epoch // step_epochs)
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    raise ValueError(f"unknown lr schedule {schedule!r}")


def round_criterion(rnd: RoundConfig) -> Criterion:
    """The criterion object a recipe round describes."""
    if rnd.criterion == "threshold":
        return Threshold(rnd.quality)
    if rnd.criterion == "sparsity":
        return Sparsity(rnd.sparsity)
    if rnd.criterion == "global":
        return GlobalMagnitude(float(rnd.sparsity))
    raise ValueError(f"unknown criterion {rnd.criterion!r}")
