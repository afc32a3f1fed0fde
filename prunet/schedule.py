"""Pure schedule helpers: learning rate per epoch, and the criterion of each pruning round."""

from __future__ import annotations

import math

import dataclasses

from prunet.config import Recipe, RoundConfig, TrainConfig
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


def retrain_config(
    recipe: Recipe,
    epochs: int,
    lr_fraction: float | None = None,
    regularization: str | None = None,
    reg_strength: float | None = None,
) -> TrainConfig:
    """The training settings of a retraining phase: the dense ones at a fraction of the learning rate.

    Args:
        recipe: gives the dense settings and the ``prune`` section's defaults.
        epochs: retraining epochs.
        lr_fraction, regularization, reg_strength: override ``prune.lr_fraction``,
            ``prune.regularization`` and ``prune.reg_strength`` (each falls back to
            the dense phase's value when the recipe leaves it unset).
    """
    p, train = recipe.prune, recipe.train
    fraction = lr_fraction if lr_fraction is not None else p.lr_fraction
    strength = reg_strength if reg_strength is not None else p.reg_strength
    return dataclasses.replace(
        train,
        epochs=epochs,
        lr=train.lr * fraction,
        lr_schedule=p.lr_schedule,
        regularization=regularization or p.regularization or train.regularization,
        reg_strength=strength if strength is not None else train.reg_strength,
    )


def round_criterion(rnd: RoundConfig) -> Criterion:
    """The criterion object a recipe round describes."""
    if rnd.criterion == "threshold":
        return Threshold(rnd.quality)
    if rnd.criterion == "sparsity":
        return Sparsity(rnd.sparsity)
    if rnd.criterion == "global":
        return GlobalMagnitude(float(rnd.sparsity))
    raise ValueError(f"unknown criterion {rnd.criterion!r}")
