"""Pure schedule helpers: the learning rate of each epoch.

A round's criterion comes from the criterion registry (``RoundConfig.make_criterion``)
and a retraining phase's settings from its recipe (``Recipe.retrain_config``).
"""

from __future__ import annotations

import math


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
