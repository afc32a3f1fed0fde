"""Schedules: the learning rate of each epoch, gradual sparsity, and a recipe's pruning in any loop.

* :func:`lr_at`: the learning rate of an epoch (constant, step, cosine).
* :func:`cubic_sparsity`: Zhu & Gupta's gradual pruning schedule.
* :class:`PruningSchedule`: a recipe's ladder of rounds or its gradual phase, driven
  by one call per training step of the user's own loop.

A round's criterion comes from the criterion registry (``RoundConfig.make_criterion``)
and a retraining phase's settings from its recipe (``Recipe.retrain_config``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from prunet.config import Recipe, TrainConfig
from prunet.criteria import ALLOCATIONS, LADDER_STEP, Criterion, TargetThreshold, ladder_targets
from prunet.pruner import Pruner


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


def cubic_sparsity(step: int, initial: float, final: float, begin: int, end: int) -> float:
    """Zhu & Gupta's gradual schedule: ``s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n Δt))^3``.

    Args:
        step: the optimizer step ``t``.
        initial, final: ``s_i`` and ``s_f``.
        begin, end: ``t0`` and ``t0 + n Δt``; before ``begin`` the sparsity is
            ``initial``, after ``end`` it is ``final``.

    >>> [round(cubic_sparsity(t, 0.0, 0.9, 0, 100), 4) for t in (0, 25, 50, 100)]
    [0.0, 0.5203, 0.7875, 0.9]
    """
    if end <= begin or step >= end:
        return final if step >= begin else initial
    if step <= begin:
        return initial
    return final + (initial - final) * (1.0 - (step - begin) / (end - begin)) ** 3


@dataclass
class PruneEvent:
    """One scheduled prune: before optimizer step ``step`` (0-based), prune ``layers`` with ``criterion``.

    With ``release``, the layers' pruned connections are given back first (:meth:`Pruner.release`),
    so the criterion chooses among every weight again; a release without a criterion leaves them dense.
    """

    step: int
    criterion: Criterion | None
    layers: list[str] | None
    label: str
    release: bool = False


def allocation(criterion: str, sparsity: float) -> Criterion:
    """The criterion of :data:`ALLOCATIONS` named ``criterion`` at ``sparsity`` (ValueError for another name)."""
    if criterion not in ALLOCATIONS:
        raise ValueError(f"criterion must be one of {', '.join(ALLOCATIONS)}; got {criterion!r}")
    return ALLOCATIONS[criterion](sparsity)


def gradual_events(begin: int, end: int, every: int, initial: float, final: float,
                   criterion: str = "sparsity") -> list[PruneEvent]:
    """The mask updates of a gradual phase: every ``every`` steps from ``begin``, and at ``end``.

    Each prunes to :func:`cubic_sparsity` at its step, shared among the layers as ``criterion``
    (:data:`ALLOCATIONS`) shares it.
    """
    events = []
    for t in [*range(begin, end, every), end]:
        s = cubic_sparsity(t, initial, final, begin, end)
        events.append(PruneEvent(t, allocation(criterion, s), None, f"gradual {s:.4f}"))
    return events


def acdc_events(begin: int, end: int, phase: int, warmup: int, final: int, sparsity: float,
                criterion: str = "sparsity") -> list[PruneEvent]:
    """AC/DC's mask changes (Peste et al. 2021) from step ``begin`` to ``end``: dense for ``warmup`` steps,
    then compressed and decompressed phases of ``phase`` steps in turn (whole pairs), then a last
    compressed phase of at least ``final`` steps (the steps no whole pair fills are added to it).

    A compressed phase starts from every weight (the masks released) and keeps the largest
    ``1 - sparsity`` of them (shared among layers as ``criterion`` says: :data:`ALLOCATIONS`); a
    decompressed phase releases them:
    the weights pruned in the phase before start again from zero.

    >>> [(e.step, e.label) for e in acdc_events(0, 100, 20, 10, 30, 0.9)]
    [(0, 'decompressed'), (10, 'compressed 0.9000'), (30, 'decompressed'), (50, 'compressed (final) 0.9000')]
    """
    if not (0 <= begin and phase >= 1 and warmup >= 0 and final >= 1 and begin + warmup + 2 * phase + final <= end):
        raise ValueError(f"acdc: needs phase >= 1, final >= 1, warmup >= 0 and warmup + two phases + final within "
                         f"the {end - begin} steps; got phase={phase}, warmup={warmup}, final={final}")

    def compress(step: int, label: str) -> PruneEvent:
        return PruneEvent(step, allocation(criterion, sparsity), None, f"{label} {sparsity:.4f}", release=True)

    events = [PruneEvent(begin, None, None, "decompressed", release=True)] if warmup else []
    start = begin + warmup
    pairs = (end - final - start) // (2 * phase)  # whole compressed + decompressed pairs; the rest goes to the last
    for k in range(pairs):
        events += [compress(start + 2 * k * phase, "compressed"),
                   PruneEvent(start + (2 * k + 1) * phase, None, None, "decompressed", release=True)]
    return events + [compress(start + 2 * pairs * phase, "compressed (final)")]


class PruningSchedule:
    """A recipe's pruning (the paper's ladder or gradual pruning) and learning rates, in any training loop.

    Call :meth:`step` once at the start of every training step, before the forward
    pass: it prunes when the schedule says so. Your optimizer's learning rate (and your
    learning-rate scheduler) stay yours: only a schedule built with ``lr=True`` sets the
    rate the recipe gives each step. What ``prunet run`` adds around them is not in it: choosing each
    round's best epoch on validation, stopping the ladder, dropout adjustment,
    distillation, relative qualities from sensitivity, checkpoints and the report.

    Example:
        >>> import torch.nn.functional as F
        >>> from prunet import create_model
        >>> from prunet.config import recipe_from_dict  # or load_recipe("recipes/lenet300_fashion.yaml")
        >>> recipe = recipe_from_dict({
        ...     "train": {"epochs": 1, "lr": 0.05},
        ...     "prune": {"lr_fraction": 0.1, "rounds": [{"criterion": "sparsity", "sparsity": 0.5, "epochs": 1},
        ...                                              {"criterion": "sparsity", "sparsity": 0.8, "epochs": 1}]},
        ... })
        >>> _ = torch.manual_seed(0)
        >>> model = create_model("lenet_300_100")
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        >>> loader = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))) for _ in range(2)]  # your data
        >>> pruner = Pruner(model)
        >>> schedule = PruningSchedule.from_recipe(recipe, pruner, steps_per_epoch=len(loader), lr=True)
        >>> for epoch in range(schedule.epochs):
        ...     for x, y in loader:
        ...         for event in schedule.step(optimizer):  # prunes on schedule, sets the recipe's lr (lr=True)
        ...             print(f"epoch {epoch}: {event.label}, lr {optimizer.param_groups[0]['lr']:g}")
        ...         loss = F.cross_entropy(model(x), y)
        ...         optimizer.zero_grad(); loss.backward(); optimizer.step()
        epoch 1: round 1, lr 0.005
        epoch 2: round 2, lr 0.005
        >>> pruner.compression()
        5.0

    Args:
        pruner: the pruner of the model being trained.
        events: the prunes, in step order.
        lrs: ``step -> learning rate``; None leaves the learning rate alone.
        total_steps: the length of the schedule in optimizer steps.
        steps_per_epoch: the steps of one epoch (for :attr:`epochs`).
    """

    def __init__(self, pruner: Pruner, events: list[PruneEvent], lrs: Callable[[int], float] | None = None,
                 total_steps: int | None = None, steps_per_epoch: int | None = None):
        self.pruner, self.events, self.lrs = pruner, sorted(events, key=lambda e: e.step), lrs
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        self.steps = 0  # steps started so far
        self._next = 0  # index of the first event not yet applied

    @classmethod
    def from_recipe(cls, recipe: Recipe, pruner: Pruner, steps_per_epoch: int, dense: bool = True,
                    lr: bool = False) -> "PruningSchedule":
        """The schedule of ``recipe``: its dense epochs (unless ``dense`` is False), then its rounds, gradual or
        AC/DC phase.

        Args:
            recipe: a validated recipe with ``prune.rounds``, ``prune.gradual`` or ``prune.acdc``.
            pruner: the model's pruner.
            steps_per_epoch: optimizer steps in one epoch of the user's loop.
            dense: include the recipe's dense training (False: the model is trained already).
            lr: also set the optimizer's learning rate to the recipe's at every :meth:`step`
                (default: the learning rate is the user's, never touched).
        """
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        phases: list[tuple[int, TrainConfig]] = []  # (first epoch, its training settings)
        epoch = 0
        if dense:
            phases.append((0, recipe.train))
            epoch = recipe.train.epochs
        events: list[PruneEvent] = []
        gradual = recipe.prune.gradual
        if gradual is not None:
            cfg = recipe.retrain_config(gradual.epochs, gradual.lr_fraction)
            begin = epoch * steps_per_epoch
            # The last change at the phase's last step at the latest: a loop runs epochs * steps_per_epoch steps.
            end = begin + min(round(gradual.ramp_epochs * steps_per_epoch), gradual.epochs * steps_per_epoch - 1)
            events += gradual_events(begin, end, gradual.every_steps, gradual.initial_sparsity, gradual.sparsity,
                                     gradual.criterion)
            phases.append((epoch, cfg))
            epoch += gradual.epochs
        acdc = recipe.prune.acdc
        if acdc is not None:
            begin = epoch * steps_per_epoch
            events += acdc_events(begin, begin + acdc.epochs * steps_per_epoch, acdc.phase_epochs * steps_per_epoch,
                                  acdc.warmup_epochs * steps_per_epoch, acdc.final * steps_per_epoch, acdc.sparsity,
                                  acdc.criterion)
            phases.append((epoch, recipe.retrain_config(acdc.epochs, acdc.lr_fraction)))
            epoch += acdc.epochs
        for i, rnd in enumerate(recipe.prune.rounds, start=1):
            events.append(PruneEvent(epoch * steps_per_epoch, rnd.make_criterion(), rnd.prune, f"round {i}"))
            phases.append((epoch, recipe.retrain_config(rnd.epochs, rnd.lr_fraction)))
            epoch += rnd.epochs

        def rate(step: int) -> float:
            e = min(step // steps_per_epoch, max(epoch - 1, 0))
            first, cfg = next(((f, c) for f, c in reversed(phases) if f <= e and c.epochs), phases[-1])
            return lr_at(min(e - first, max(cfg.epochs - 1, 0)), max(cfg.epochs, 1), cfg.lr, cfg.lr_schedule,
                         cfg.lr_step_epochs, cfg.lr_gamma)

        return cls(pruner, events, rate if lr and phases else None, epoch * steps_per_epoch, steps_per_epoch)

    @classmethod
    def gradual(cls, pruner: Pruner, target: float, start: int, end: int, every: int = 100,
                initial: float = 0.0, criterion: str = "sparsity") -> "PruningSchedule":
        """Gradual magnitude pruning (Zhu & Gupta) in your loop, no recipe needed.

        From step ``start`` to ``end`` the masks follow the cubic sparsity curve, updated every
        ``every`` steps, up to ``target`` times fewer weights, shared among the layers as ``criterion``
        says (:data:`prunet.criteria.ALLOCATIONS`: ``sparsity`` each alike, ``global``, ``lamp``, ``erk``).

        Example:
            >>> pruner = Pruner(torch.nn.Linear(100, 10))
            >>> schedule = PruningSchedule.gradual(pruner, target=10, start=0, end=40, every=10)
            >>> [e.step for e in schedule.events]
            [0, 10, 20, 30, 40]
        """
        if not (math.isfinite(target) and target >= 1):
            raise ValueError(f"target: a compression >= 1, got {target}")
        if not (0 <= start <= end) or every < 1 or criterion not in ALLOCATIONS:
            raise ValueError(f"gradual: needs 0 <= start <= end, every >= 1 and criterion {'|'.join(ALLOCATIONS)}; got "
                             f"start={start}, end={end}, every={every}, criterion={criterion!r}")
        if not 0 <= initial <= 1 - 1 / target:
            raise ValueError(f"gradual: initial sparsity {initial} outside 0..{1 - 1 / target:.4f} (the target's); "
                             f"masks only grow, so the schedule could never come back to the target")
        return cls(pruner, gradual_events(start, end, every, initial, 1 - 1 / target, criterion), total_steps=end + 1)

    @classmethod
    def acdc(cls, pruner: Pruner, target: float, steps: int, phase: int, warmup: int = 0, final: int | None = None,
             criterion: str = "sparsity") -> "PruningSchedule":
        """AC/DC (alternating compressed / decompressed training, Peste et al. 2021) in your loop.

        Over ``steps`` steps: dense for ``warmup``, then compressed (the largest ``1/target`` of the
        weights, chosen afresh from all of them) and decompressed (every weight trains) phases of
        ``phase`` steps in turn, then a last compressed phase of at least ``final`` steps (default
        ``2 * phase``) that ends sparse. See :func:`acdc_events`.

        Example:
            >>> pruner = Pruner(torch.nn.Linear(100, 10))
            >>> schedule = PruningSchedule.acdc(pruner, target=10, steps=100, phase=20)
            >>> [(e.step, e.label) for e in schedule.events]
            [(0, 'compressed 0.9000'), (20, 'decompressed'), (40, 'compressed (final) 0.9000')]
        """
        if not (math.isfinite(target) and target >= 1) or criterion not in ALLOCATIONS:
            raise ValueError(f"acdc: target must be a compression >= 1 and criterion {'|'.join(ALLOCATIONS)}; got "
                             f"target={target}, criterion={criterion!r}")
        final = 2 * phase if final is None else final
        return cls(pruner, acdc_events(0, steps, phase, warmup, final, 1 - 1 / target, criterion), total_steps=steps)

    @classmethod
    def ladder(cls, pruner: Pruner, target: float, steps_per_round: int,
               quality: float | dict[str, float] = 1.0, step: float = LADDER_STEP) -> "PruningSchedule":
        """The paper's iterative pruning in your loop: a round every ``steps_per_round`` steps, each the σ rule
        (relative ``quality`` per layer) at about ``step`` times the compression before, the last at ``target``.

        Example:
            >>> schedule = PruningSchedule.ladder(Pruner(torch.nn.Linear(100, 10)), target=12, steps_per_round=50)
            >>> [(e.step, e.label) for e in schedule.events][-1], schedule.total_steps
            ((150, 'round 4'), 200)
        """
        if steps_per_round < 1:
            raise ValueError(f"steps_per_round must be >= 1, got {steps_per_round}")
        targets = ladder_targets(target, step)
        events = [PruneEvent(k * steps_per_round, TargetThreshold(t, quality), None, f"round {k + 1}")
                  for k, t in enumerate(targets)]
        return cls(pruner, events, total_steps=len(targets) * steps_per_round, steps_per_epoch=steps_per_round)

    @property
    def epochs(self) -> int | None:
        """Whole epochs the schedule lasts (None without ``total_steps`` and ``steps_per_epoch``)."""
        if self.total_steps is None or not self.steps_per_epoch:
            return None
        return -(-self.total_steps // self.steps_per_epoch)

    def step(self, optimizer: torch.optim.Optimizer | None = None) -> list[PruneEvent]:
        """Start one training step: apply the prunes due now (their optimizer state masked), and set
        ``optimizer``'s learning rate only if the schedule was built with one (``lr=True``).

        Returns:
            The events applied (usually none).
        """
        fired = self.advance_to(self.steps, optimizer)
        if optimizer is not None and self.lrs is not None:
            for group in optimizer.param_groups:
                group["lr"] = self.lrs(self.steps)
        self.steps += 1
        return fired

    def advance_to(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> list[PruneEvent]:
        """Apply every prune due at or before ``step`` not applied yet (a loop that skips calls, a resume)."""
        fired = []
        while self._next < len(self.events) and self.events[self._next].step <= step:
            event = self.events[self._next]
            if event.release:
                self.pruner.release(event.layers)
            if event.criterion is not None:
                self.pruner.prune(event.criterion, layers=event.layers, optimizer=optimizer)
            fired.append(event)
            self._next += 1
        return fired

    def skip_to(self, step: int) -> None:
        """Count every event due at or before ``step`` as applied without applying it: the model (a resumed
        checkpoint) already holds the masks they made. A schedule that releases masks must not replay them."""
        while self._next < len(self.events) and self.events[self._next].step <= step:
            self._next += 1

    def state_dict(self) -> dict[str, int]:
        """Where the schedule is, to save with a checkpoint."""
        return {"steps": self.steps, "next": self._next}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from :meth:`state_dict` (the masks come back with the model's state)."""
        self.steps, self._next = int(state["steps"]), int(state["next"])
