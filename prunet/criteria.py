"""Pruning criteria: pure functions from weights and the previous mask to a new mask.

Every criterion looks only at the surviving weights (the previous mask) and its
result is AND-ed with the previous mask, so a pruned connection never returns.
None of them touches a module or an optimizer.

Three rules are provided:

* :func:`threshold_mask`: Han et al.'s rule. Keep ``|w| >= quality * std(w)``,
  the standard deviation taken over the layer's surviving weights, recomputed
  every round.
* :func:`sparsity_mask`: keep the largest-magnitude weights of a layer so that
  a target fraction of the whole layer is pruned.
* :func:`global_sparsity_masks`: one magnitude cut across several layers.

Each has a :class:`Criterion`, the object ``Pruner.prune`` takes
(:class:`Threshold`, :class:`Sparsity`, :class:`GlobalMagnitude`), and
:data:`CRITERIA` maps the names recipes use to them: recipes, schedules, the
sensitivity analysis and the trade-off study all look criteria up there, so a
new criterion is one class and one entry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Mapping

import torch

from prunet.layers import Layer, Setting, resolve


def threshold_mask(weight: torch.Tensor, prev_mask: torch.Tensor | None, quality: float) -> torch.Tensor:
    """The paper's per-layer threshold: prune ``|w| < quality * std(surviving w)``.

    Args:
        weight: the layer's weights, any shape.
        prev_mask: boolean mask of surviving weights (None: all survive).
        quality: the quality parameter, >= 0. 0 prunes nothing new.

    Returns:
        A boolean mask of ``weight``'s shape, a subset of ``prev_mask``.

    The standard deviation is the population one (divide by n) over the
    survivors. A layer with fewer than two survivors is left as it is.

    Example:
        >>> w = torch.tensor([0.1, -2.0, 0.5, 3.0])
        >>> threshold_mask(w, None, 0.5).tolist()  # std = 1.77, threshold 0.89
        [False, True, False, True]
    """
    if quality < 0 or not math.isfinite(quality):
        raise ValueError(f"quality must be a finite number >= 0, got {quality}")
    prev = _prev_or_ones(weight, prev_mask)
    survivors = weight[prev]
    if survivors.numel() < 2:
        return prev.clone()
    std = survivors.double().std(correction=0)
    threshold = quality * std
    return prev & (weight.double().abs() >= threshold)


def sparsity_mask(weight: torch.Tensor, prev_mask: torch.Tensor | None, sparsity: float) -> torch.Tensor:
    """Keep the largest-magnitude survivors so that ``sparsity`` of the whole layer is pruned.

    Args:
        weight: the layer's weights.
        prev_mask: boolean mask of survivors (None: all).
        sparsity: target fraction of the layer pruned, in [0, 1]. Already
            pruned weights count towards it; a layer already sparser is left alone.

    Returns:
        A boolean mask, a subset of ``prev_mask``. Ties at the cut are broken
        by position (earlier entries kept first), so the result is deterministic.
    """
    prev = _prev_or_ones(weight, prev_mask)
    keep = keep_count(weight.numel(), sparsity)
    return _keep_top(weight.abs().flatten(), prev.flatten(), keep).view_as(weight)


def global_sparsity_masks(
    weights: Mapping[str, torch.Tensor], prev_masks: Mapping[str, torch.Tensor | None], sparsity: float
) -> dict[str, torch.Tensor]:
    """One magnitude cut across all given layers, so ``sparsity`` of their weights is pruned.

    Args:
        weights: layer name -> weights.
        prev_masks: layer name -> boolean survivors mask (missing or None: all).
        sparsity: target fraction of all the given weights pruned, in [0, 1].

    Returns:
        layer name -> new boolean mask, each a subset of its previous one.
    """
    names = list(weights)
    flat_w = torch.cat([weights[n].detach().abs().flatten().float() for n in names])
    flat_prev = torch.cat([_prev_or_ones(weights[n], prev_masks.get(n)).flatten() for n in names])
    flat = _keep_top(flat_w, flat_prev, keep_count(flat_w.numel(), sparsity))
    out, start = {}, 0
    for n in names:
        size = weights[n].numel()
        out[n] = flat[start : start + size].view_as(weights[n])
        start += size
    return out


def keep_count(n: int, sparsity: float) -> int:
    """How many of ``n`` weights to keep for a target ``sparsity`` (rounded to nearest).

    >>> keep_count(10, 0.25)
    8
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    return n - int(round(sparsity * n))


def compression_to_keep_fraction(compression: float, prunable: int, unprunable: int = 0) -> float:
    """Fraction of prunable weights to keep for an overall ``compression`` (dense / kept).

    Weights that are never pruned (biases, excluded layers) count in both the
    dense and the kept total, so they eat into the budget.

    Args:
        compression: target ratio of all parameters to kept parameters, >= 1.
        prunable: number of prunable weights.
        unprunable: number of parameters that are always kept.

    Returns:
        The fraction of prunable weights to keep, in [0, 1].

    Raises:
        ValueError: when the unprunable parameters alone exceed the budget.
    """
    if not compression >= 1:  # also catches NaN
        raise ValueError(f"compression must be >= 1, got {compression}")
    if prunable <= 0:
        raise ValueError("there are no prunable weights")
    budget = (prunable + unprunable) / compression
    fraction = (budget - unprunable) / prunable
    if fraction < 0:
        raise ValueError(
            f"{compression}x is out of reach: the {unprunable} unprunable parameters alone give "
            f"{(prunable + unprunable) / unprunable:.2f}x at most"
        )
    return min(1.0, fraction)


def _prev_or_ones(weight: torch.Tensor, prev_mask: torch.Tensor | None) -> torch.Tensor:
    if prev_mask is None:
        return torch.ones_like(weight, dtype=torch.bool)
    if prev_mask.shape != weight.shape:
        raise ValueError(f"mask shape {tuple(prev_mask.shape)} != weight shape {tuple(weight.shape)}")
    return prev_mask.to(torch.bool)


def _keep_top(scores: torch.Tensor, prev: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean 1-D mask keeping the ``keep`` highest scores among ``prev``; never adds entries."""
    if int(prev.sum()) <= keep:
        return prev.clone()
    # Pruned entries sort last; a stable sort breaks ties by position.
    masked = torch.where(prev, scores.double(), torch.tensor(-1.0, dtype=torch.float64))
    order = torch.sort(masked, descending=True, stable=True).indices
    out = torch.zeros_like(prev)
    out[order[:keep]] = True
    return out


# --------------------------------------------------------------------------- criterion objects


class Criterion:
    """A rule that turns weights and previous masks into new masks, layer by layer.

    A per-layer criterion names its setting (:attr:`setting`) and its rule, a
    pure function ``(weight, previous mask, value) -> mask``. A custom
    criterion may instead override :meth:`masks` alone.

    Class attributes (what a recipe needs to know to build and check one):
        name: the name recipes use, the key in :data:`CRITERIA`.
        setting_field: the field holding the setting, on the criterion and in a
            recipe round (``quality`` or ``sparsity``); None for a custom criterion.
        setting_min, setting_max: the allowed range of each value (``None``: no upper bound).
        per_layer: True when the setting may differ per layer (a mapping) and the
            criterion prunes each layer alone by its :attr:`rule` (the
            sensitivity analysis needs that).
        sweep: the settings the sensitivity analysis tries when none are given.
    """

    name: ClassVar[str] = "custom"
    setting_field: ClassVar[str | None] = None
    setting_min: ClassVar[float] = 0.0
    setting_max: ClassVar[float | None] = None
    per_layer: ClassVar[bool] = True
    sweep: ClassVar[tuple[float, ...]] = ()
    rule: ClassVar[Callable[[torch.Tensor, torch.Tensor | None, float], torch.Tensor] | None] = None

    @property
    def setting(self) -> Setting | None:
        """The per-layer setting (the :attr:`setting_field`); None for a custom criterion."""
        return getattr(self, self.setting_field) if self.setting_field else None

    def masks(self, layers: list[Layer]) -> dict[str, torch.Tensor]:
        """param name -> new boolean mask for the layers this criterion prunes."""
        out = {}
        for layer in layers:
            value = resolve(self.setting, layer)
            if value is not None:
                out[layer.param] = type(self).rule(layer.weight.detach(), layer.mask, value)
        return out

    def keys(self) -> list[str]:
        """The layer names, groups or globs a per-layer setting names (empty for a scalar)."""
        return list(self.setting) if isinstance(self.setting, Mapping) else []

    @classmethod
    def check_value(cls, value: float) -> None:
        """Raise ``ValueError`` when one value of the setting is out of :attr:`setting_min`..:attr:`setting_max`."""
        hi = cls.setting_max
        if not (math.isfinite(value) and value >= cls.setting_min and (hi is None or value <= hi)):
            lo = cls.setting_min
            allowed = f"in [{lo:g}, {hi:g}]" if hi is not None else f"a finite number >= {lo:g}"
            raise ValueError(f"a {cls.setting_field} must be {allowed}, got {value}")


@dataclass
class Threshold(Criterion):
    """Han et al.: prune weights below ``quality × std`` of the layer's surviving weights.

    Args:
        quality: one value for every layer, or a mapping from layer name, group
            (``fc``, ``conv``) or glob to a value. Layers not named are left alone.
    """

    quality: Setting
    name: ClassVar[str] = "threshold"
    setting_field: ClassVar[str] = "quality"
    # 0 prunes nothing, 1 cuts below one standard deviation (about 60% of a Gaussian layer), 2 about 95%.
    sweep: ClassVar[tuple[float, ...]] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
    rule = staticmethod(threshold_mask)


@dataclass
class Sparsity(Criterion):
    """Prune each layer to a target sparsity (fraction of its weights removed), by magnitude."""

    sparsity: Setting
    name: ClassVar[str] = "sparsity"
    setting_field: ClassVar[str] = "sparsity"
    setting_max: ClassVar[float | None] = 1.0
    sweep: ClassVar[tuple[float, ...]] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
    rule = staticmethod(sparsity_mask)


@dataclass
class GlobalMagnitude(Criterion):
    """One magnitude cut across all targeted layers, to a total ``sparsity``."""

    sparsity: float
    name: ClassVar[str] = "global"
    setting_field: ClassVar[str] = "sparsity"
    setting_max: ClassVar[float | None] = 1.0
    per_layer: ClassVar[bool] = False

    def masks(self, layers: list[Layer]) -> dict[str, torch.Tensor]:
        if not layers:
            return {}
        weights = {layer.param: layer.weight.detach() for layer in layers}
        prev = {layer.param: layer.mask for layer in layers}
        return global_sparsity_masks(weights, prev, self.sparsity)


CRITERIA: dict[str, type[Criterion]] = {c.name: c for c in (Threshold, Sparsity, GlobalMagnitude)}
"""Criterion name (as recipes spell it) -> class. A new criterion is one entry here."""


def criterion_class(name: str) -> type[Criterion]:
    """The criterion class registered as ``name``.

    Raises:
        ValueError: an unknown name; the message lists the known ones.
    """
    if name not in CRITERIA:
        raise ValueError(f"criterion: {name!r} is not one of {', '.join(CRITERIA)}")
    return CRITERIA[name]


def make_criterion(name: str, setting: Setting) -> Criterion:
    """The criterion ``name`` with its setting, e.g. ``make_criterion("threshold", {"fc": 1.0})``."""
    return criterion_class(name)(setting)
