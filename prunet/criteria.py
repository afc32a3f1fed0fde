"""Pruning criteria: pure functions from weights and the previous mask to a new mask.

Every criterion looks only at the surviving weights (the previous mask) and its
result is AND-ed with the previous mask, so a pruned connection never returns.
None of them touches a module or an optimizer.

Three magnitude rules are provided:

* :func:`threshold_mask`: Han et al.'s rule. Keep ``|w| >= quality * std(w)``,
  the standard deviation taken over the layer's surviving weights, recomputed
  every round.
* :func:`sparsity_mask`: keep the largest-magnitude weights of a layer so that
  a target fraction of the whole layer is pruned.
* :func:`global_sparsity_masks`: one magnitude cut across several layers.

and two allocations of one budget among layers, each a :class:`LayerAllocation`
set by a sparsity or a target compression: :class:`LAMP` (a global cut on
:func:`lamp_scores`) and :class:`ERK` (densities from the layers' shapes,
:func:`erk_densities`).

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
    n = int(prev.count_nonzero())
    if n < 2:
        return prev.clone()
    return _threshold_with_std(weight, prev, quality, survivor_std(weight, prev, n))


def _threshold_with_std(weight: torch.Tensor, prev: torch.Tensor, quality: float, std: float) -> torch.Tensor:
    """:func:`threshold_mask` for a layer whose survivors' ``std`` is known (at least two survivors)."""
    return at_least(weight, quality * std).logical_and_(prev)


def survivor_std(weight: torch.Tensor, prev: torch.Tensor, n: int | None = None) -> float:
    """Population standard deviation of the surviving weights, in float64, a chunk at a time.

    Two passes (the mean, then the squared deviations) over chunks of the
    weight, so no copy of the whole weight is made.
    """
    n = int(prev.count_nonzero()) if n is None else n
    total = sum(float(c.sum(dtype=torch.float64)) for c in _survivor_chunks(weight, prev))
    mean = total / n
    squares = 0.0
    for c in _survivor_chunks(weight, prev):
        d = c.float() - mean
        squares += float(torch.dot(d, d))  # float32 products, blocked sums: 1e-6 relative at worst
    return math.sqrt(squares / n)


def at_least(weight: torch.Tensor, threshold: float) -> torch.Tensor:
    """Boolean ``|weight| >= threshold`` as float64 would compare it, a chunk at a time.

    A float32 (or smaller) weight is at least a float64 ``threshold`` exactly when it
    is at least the smallest float32 not below it: no float64 copy is made.
    """
    flat = weight.detach().reshape(-1)
    if flat.dtype == torch.float64:
        t = torch.tensor(threshold, dtype=torch.float64)
    else:
        t = torch.tensor(threshold, dtype=torch.float32)
        if float(t) < threshold:
            t = torch.nextafter(t, torch.tensor(math.inf))
    t = t.to(flat.device)
    out = torch.empty(flat.shape, dtype=torch.bool, device=flat.device)
    for i in range(0, flat.numel(), _CHUNK):
        # Compared in t's type: a float16 weight is widened (exactly), never the threshold narrowed.
        torch.ge(flat[i:i + _CHUNK].abs().to(t.dtype), t, out=out[i:i + _CHUNK])
    return out.view(weight.shape)


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
    return _keep_top(weight.detach(), prev, keep)


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
    parts = [(weights[n].detach(), _prev_or_ones(weights[n], prev_masks.get(n))) for n in names]
    total = sum(weights[n].numel() for n in names)
    return dict(zip(names, _keep_top_parts(parts, keep_count(total, sparsity))))


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
    """Boolean mask keeping the ``keep`` largest-magnitude ``scores`` among ``prev``; never adds entries.

    Ties at the cut are broken by position (earlier entries kept first).
    """
    return _keep_top_parts([(scores, prev)], keep)[0]


def _keep_top_parts(parts: list[tuple[torch.Tensor, torch.Tensor]], keep: int) -> list[torch.Tensor]:
    """:func:`_keep_top` over several (scores, prev) pairs as if concatenated, without concatenating them.

    The cut is found by selection (:func:`_kth_largest`), not by sorting: a few
    passes over the scores instead of an ``n log n`` sort and its copies.
    """
    survivors = sum(int(prev.count_nonzero()) for _, prev in parts)
    if survivors <= keep:
        return [prev.clone() for _, prev in parts]
    if keep <= 0:
        return [torch.zeros_like(prev) for _, prev in parts]
    cut = _kth_largest(parts, keep)
    out = [at_least(scores, cut).logical_and_(prev) for scores, prev in parts]
    extra = sum(int(m.count_nonzero()) for m in out) - keep
    for mask, (scores, _) in zip(reversed(out), reversed(parts)):  # ties at the cut: the last ones go
        if extra <= 0:
            break
        flat = mask.view(-1)
        ties = (flat & (scores.reshape(-1).abs() == cut)).nonzero().flatten()
        drop = ties[max(0, len(ties) - extra):]
        flat[drop] = False
        extra -= len(drop)
    return out


def _kth_largest(parts: list[tuple[torch.Tensor, torch.Tensor]], k: int,
                 scales: list[float] | None = None) -> float:
    """The ``k``-th largest magnitude (1-based) among the entries of ``parts`` their masks keep.

    With ``scales``, part ``i``'s values count multiplied by ``scales[i]`` (no scaled copy is made).
    Three passes over the values, a chunk at a time: the maximum, a histogram of
    65,536 bins, then the exact selection among the few values of the bin the
    ``k``-th falls in. Memory beyond the inputs is one chunk's worth.
    """
    scales = scales or [1.0] * len(parts)
    # float64 weights are ranked in float64 (two of them may be equal in float32); the rest in float32, exactly.
    dtype = torch.float64 if any(v.dtype == torch.float64 for v, _ in parts) else torch.float32

    def chunks():
        for (v, m), scale in zip(parts, scales):
            for c in _survivor_chunks(v, m):
                c = c.to(dtype).abs()
                yield c * scale if scale != 1.0 else c

    top = max(float(c.max()) for c in chunks() if c.numel())
    if not math.isfinite(top):
        raise ValueError("the weights hold NaN or inf: they cannot be ranked by magnitude")
    bins = 1 << 16
    if not top > 0:
        return top
    hist = None
    for c in chunks():
        h = torch.histc(c, bins=bins, min=0.0, max=top).double()
        hist = h if hist is None else hist + h
    above = hist.flip(0).cumsum(0)
    b = bins - 1 - int(torch.searchsorted(above, torch.tensor([float(k)], dtype=torch.float64, device=above.device)))
    # The bin's edges, widened by a float step: histc's own rounding may put a value either side.
    lo = float(torch.nextafter(torch.tensor(b * top / bins, dtype=dtype), torch.tensor(-math.inf, dtype=dtype)))
    hi = float(torch.nextafter(torch.tensor((b + 1) * top / bins, dtype=dtype), torch.tensor(math.inf, dtype=dtype)))
    count_above, inside = 0, []
    for c in chunks():
        count_above += int((c > hi).count_nonzero())
        inside.append(c[(c >= lo) & (c <= hi)])
    pool = torch.cat(inside)
    rank = k - count_above
    if not 1 <= rank <= pool.numel():  # never seen; the exact answer at the cost of a copy
        return float(torch.cat(list(chunks())).topk(k).values[-1])
    return float(pool.topk(rank).values[-1])


_CHUNK = 1 << 22  # elements per chunk of the passes above: 16 MB of float32


def _survivor_chunks(weight: torch.Tensor, prev: torch.Tensor):
    """The surviving values of the flattened ``weight``, a chunk at a time."""
    flat, keep = weight.detach().reshape(-1), prev.reshape(-1)
    everyone = bool(keep.all())
    for i in range(0, flat.numel(), _CHUNK):
        part = flat[i:i + _CHUNK]
        yield part if everyone else part[keep[i:i + _CHUNK]]


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

    def masks_in(self, layers: list[Layer], targets: list[Layer]) -> dict[str, torch.Tensor]:
        """:meth:`masks` for ``layers``, a subset of all the pruner's ``targets``.

        A criterion whose result depends on the layers it does not prune (an overall
        compression target) overrides this; the others prune ``layers`` alone.
        """
        return self.masks(layers)

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


class TargetError(ValueError):
    """A target compression this pruning step cannot reach (the layers it leaves alone keep too much)."""


@dataclass
class TargetThreshold(Criterion):
    """The paper's rule, its qualities found for an overall compression: ``quality_l = factor × relative_l``.

    Every pruned layer keeps ``|w| >= factor × relative_l × std(surviving w)``, as
    :class:`Threshold`; one ``factor`` is found by bisection so that all the pruner's
    targets together (the layers not pruned now included, as they stand) keep
    ``weights / target`` weights, within 1% where the weights allow it.

    Args:
        target: the overall compression after this step (weights / kept), > 1.
        quality: relative qualities, one value or a per-layer mapping as for
            :class:`Threshold` (layers not named are left alone); default 1 everywhere.

    Attributes:
        factor: after :meth:`masks_in`, the factor found.
        qualities: after :meth:`masks_in`, layer name -> the quality used (``factor × relative``).
    """

    target: float
    quality: Setting = 1.0
    name: ClassVar[str] = "threshold"
    setting_field: ClassVar[str] = "quality"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.target) and self.target >= 1):
            raise ValueError(f"target must be a compression >= 1, got {self.target}")
        self.factor: float | None = None
        self.qualities: dict[str, float] = {}

    def masks(self, layers: list[Layer]) -> dict[str, torch.Tensor]:
        return self.masks_in(layers, layers)

    def masks_in(self, layers: list[Layer], targets: list[Layer]) -> dict[str, torch.Tensor]:
        chosen = {id(layer) for layer in layers}
        free: list[tuple[Layer, float, torch.Tensor, float]] = []  # layer, relative quality, survivors mask, std
        fixed, survivors = 0, 0
        for t in targets:
            rel = resolve(self.quality, t) if id(t) in chosen else None
            prev = _prev_or_ones(t.weight, t.mask)
            n = int(prev.count_nonzero())
            if rel is None or rel == 0 or n < 2:
                fixed += n  # as threshold_mask leaves it
                continue
            free.append((t, rel, prev, survivor_std(t.weight, prev, n)))
            survivors += n
        total = sum(t.weight.numel() for t in targets)
        want = total / self.target - fixed  # what the free layers may keep
        if survivors <= want:
            factor = 0.0  # already at the target: nothing pruned
        elif want < 1:
            reach = f"at most {total / fixed:.3g}x" if fixed else "nothing"
            raise TargetError(f"target {self.target:g}x is out of reach: the weights this step does not prune "
                              f"(other layers, layers without a quality) keep {fixed:,} of {total:,}, {reach}")
        else:
            # A weight survives factor f when |w| / (relative × std) >= f: the factor that keeps
            # `keep` weights is the keep-th largest of those ratios over all free layers.
            parts = [(t.weight.detach(), prev) for t, _, prev, _ in free]
            scales = [1.0 / (rel * std) if std > 0 else 0.0 for _, rel, _, std in free]
            factor = _kth_largest(parts, round(want), scales)
        self.factor = factor
        self.qualities = {t.layer: factor * rel for t, rel, _, _ in free}
        return {t.param: _threshold_with_std(t.weight, prev, factor * rel, std) for t, rel, prev, std in free}


# --------------------------------------------------------------------------- allocation across layers


def lamp_scores(weight: torch.Tensor, prev_mask: torch.Tensor | None = None) -> torch.Tensor:
    """LAMP scores (Lee et al. 2021) of a layer's surviving weights; pruned entries score 0.

    With the survivors sorted by magnitude, smallest first, weight ``u`` scores
    ``w_u² / Σ_{v >= u} w_v²``: its square over the squares of itself and every
    survivor ranked after it. The largest survivor scores 1. Equal magnitudes are
    ranked by position (the earlier one first, so it scores less).

    Args:
        weight: the layer's weights, any shape.
        prev_mask: boolean mask of survivors (None: all).

    Returns:
        float64 scores of ``weight``'s shape, in [0, 1].

    Example:
        >>> lamp_scores(torch.tensor([1.0, -2.0, 2.0])).tolist()  # 1/9, 4/8, 4/4
        [0.1111111111111111, 0.5, 1.0]
    """
    prev = _prev_or_ones(weight, prev_mask).reshape(-1)
    flat = weight.detach().reshape(-1).to(torch.float64)
    alive = prev.nonzero().flatten()
    squares = flat[alive].square()
    order = torch.sort(squares, stable=True).indices  # a sort, not a selection: the sums need the order
    tail = squares[order].flip(0).cumsum(0).flip(0)  # Σ of the squares from each rank to the largest
    ranked = torch.where(tail > 0, squares[order] / tail.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    out = torch.zeros_like(flat)
    out[alive[order]] = ranked
    return out.view(weight.shape)


def erk_densities(shapes: Mapping[str, tuple[int, ...]], keep: int,
                  caps: Mapping[str, float] | None = None) -> dict[str, float]:
    """Erdős–Rényi-Kernel densities (Evci et al., RigL), scaled so the layers keep ``keep`` weights in all.

    A layer's density is ``ε · sum(shape) / prod(shape)``: ``(n_in + n_out) / (n_in · n_out)``
    for a Linear layer, the kernel's sides added for a convolution. One ``ε`` is found
    for the whole network; a layer whose density would exceed its cap is held at the cap
    and ``ε`` found again for the others, until none does.

    Args:
        shapes: layer name -> weight shape.
        keep: the weights all layers together keep (0 <= keep <= their total).
        caps: layer name -> the largest density allowed (default 1: a layer kept whole);
            its survivors' share, so a criterion never asks a layer for weights it no longer has.

    Returns:
        layer name -> fraction of its weights kept; ``Σ density × size == keep`` up to rounding.

    Example:
        >>> d = erk_densities({"a": (4, 4), "b": (100, 100)}, 2000)
        >>> d["a"], round(d["b"], 4)  # "a" would get 4.8: held at 1, the rest shared by "b"
        (1.0, 0.1984)
    """
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    caps = {n: 1.0 if caps is None else float(caps.get(n, 1.0)) for n in shapes}
    raw = {n: sum(s) / sizes[n] if sizes[n] else 0.0 for n, s in shapes.items()}
    held: dict[str, float] = {}
    while True:
        free = [n for n in shapes if n not in held and raw[n] > 0]
        budget = keep - sum(held[n] * sizes[n] for n in held)
        divisor = sum(raw[n] * sizes[n] for n in free)
        eps = budget / divisor if divisor > 0 else 0.0
        over = [n for n in free if eps * raw[n] > caps[n]]
        if not over:
            return {n: held.get(n, min(caps[n], max(0.0, eps * raw[n]))) for n in shapes}
        held.update((n, caps[n]) for n in over)


def apportion(shares: Mapping[str, float], total: int, caps: Mapping[str, int]) -> dict[str, int]:
    """Whole counts per layer, each at most its cap, summing to ``total``: largest remainders first.

    >>> apportion({"a": 1.5, "b": 1.5, "c": 2.0}, 5, {"a": 9, "b": 9, "c": 9})
    {'a': 2, 'b': 1, 'c': 2}
    """
    counts = {n: min(caps[n], math.floor(v)) for n, v in shares.items()}
    left = total - sum(counts.values())
    order = sorted(shares, key=lambda n: -(shares[n] - math.floor(shares[n])))  # stable: ties by order given
    for n in order + order:  # a second pass for layers the first could not give a weight to
        if left <= 0:
            break
        if counts[n] < caps[n]:
            counts[n] += 1
            left -= 1
    return counts


@dataclass
class LayerAllocation(Criterion):
    """A criterion that shares one budget of kept weights among layers: set by ``sparsity`` or ``target``.

    Args:
        sparsity: the fraction of the pruned layers' weights pruned after this step, in [0, 1].
        target: instead, the overall compression (weights / kept) of all the pruner's
            targets after this step, the layers it does not prune counted as they stand.

    Subclasses implement :meth:`allocate`; the result is AND-ed with the previous masks.
    """

    sparsity: float | None = None
    target: float | None = None
    setting_field: ClassVar[str] = "sparsity"
    setting_max: ClassVar[float | None] = 1.0
    per_layer: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if (self.sparsity is None) == (self.target is None):
            raise ValueError(f"{self.name}: give a sparsity or a target (one of them)")
        if self.sparsity is not None:
            self.check_value(self.sparsity)
        elif not (math.isfinite(self.target) and self.target >= 1):
            raise ValueError(f"target must be a compression >= 1, got {self.target}")

    def masks(self, layers: list[Layer]) -> dict[str, torch.Tensor]:
        return self.masks_in(layers, layers)

    def masks_in(self, layers: list[Layer], targets: list[Layer]) -> dict[str, torch.Tensor]:
        if not layers:
            return {}
        weights = {t.param: t.weight.detach() for t in layers}
        prev = {t.param: _prev_or_ones(t.weight, t.mask) for t in layers}
        if self.sparsity is not None:
            keep = keep_count(sum(w.numel() for w in weights.values()), self.sparsity)
        else:
            chosen = {t.param for t in layers}
            fixed = sum(t.kept() for t in targets if t.param not in chosen)
            total = sum(t.weight.numel() for t in targets)
            keep = round(total / self.target) - fixed
            if keep < 1 and fixed:
                raise TargetError(f"target {self.target:g}x is out of reach: the layers this step does not prune "
                                  f"keep {fixed:,} of {total:,}, at most {total / max(fixed, 1):.3g}x")
        return self.allocate(weights, prev, max(0, keep))

    def allocate(self, weights: Mapping[str, torch.Tensor], prev: Mapping[str, torch.Tensor],
                 keep: int) -> dict[str, torch.Tensor]:
        """layer param -> new mask, the layers keeping ``keep`` weights in all (or what they have, if fewer)."""
        raise NotImplementedError


@dataclass
class LAMP(LayerAllocation):
    """Layer-adaptive magnitude pruning (Lee et al., ICLR 2021): one global cut on :func:`lamp_scores`.

    Each layer's weights are scored relative to the larger ones of the same layer, so the
    cut adapts the sparsity of each layer without a setting per layer; every layer keeps
    at least its largest weight while the budget allows one weight per layer.

    Example:
        >>> layers = {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([10.0, 20.0, 40.0])}
        >>> masks = LAMP(0.5).allocate(layers, {n: torch.ones(3, dtype=torch.bool) for n in layers}, 3)
        >>> masks["a"].tolist(), masks["b"].tolist()  # a magnitude cut would keep b alone
        ([False, True, True], [False, False, True])
    """

    name: ClassVar[str] = "lamp"

    def allocate(self, weights, prev, keep):
        names = list(weights)
        parts = [(lamp_scores(weights[n], prev[n]), prev[n]) for n in names]
        return dict(zip(names, _keep_top_parts(parts, keep)))


@dataclass
class ERK(LayerAllocation):
    """Erdős–Rényi-Kernel allocation (Evci et al., RigL 2020): per-layer densities from the layer's shape.

    The densities of :func:`erk_densities` (capped at each layer's survivors), turned into
    whole counts that sum to the budget exactly; within a layer, the largest-magnitude
    survivors are kept.
    """

    name: ClassVar[str] = "erk"

    def allocate(self, weights, prev, keep):
        kept = {n: int(p.count_nonzero()) for n, p in prev.items()}
        keep = min(keep, sum(kept.values()))
        shapes = {n: tuple(w.shape) for n, w in weights.items()}
        caps = {n: kept[n] / w.numel() if w.numel() else 0.0 for n, w in weights.items()}
        density = erk_densities(shapes, keep, caps)
        counts = apportion({n: density[n] * w.numel() for n, w in weights.items()}, keep, kept)
        return {n: _keep_top(weights[n], prev[n], counts[n]) for n in weights}


CRITERIA: dict[str, type[Criterion]] = {c.name: c for c in (Threshold, Sparsity, GlobalMagnitude, LAMP, ERK)}
"""Criterion name (as recipes spell it) -> class. A new criterion is one entry here."""

ALLOCATIONS: dict[str, type[Criterion]] = {"sparsity": Sparsity, "global": GlobalMagnitude, "lamp": LAMP, "erk": ERK}
"""How a gradual or AC/DC step shares one sparsity among the layers (``criterion`` of those schedules): each
layer alike (Zhu & Gupta), one global magnitude cut, LAMP's layer-adaptive scores, or ERK's densities from
the layers' shapes."""


LADDER_STEP = 2.2  # a target ladder's compression grows about this much per round


def ladder_targets(target: float, step: float = LADDER_STEP) -> list[float]:
    """The compressions of a ladder of rounds up to ``target``, each about ``step`` times the one before.

    Example:
        >>> ladder_targets(12)
        [1.8612, 3.4641, 6.4474, 12]
    """
    if not (math.isfinite(target) and target >= 1):
        raise ValueError(f"target: a compression >= 1, got {target}")
    n = max(1, math.ceil(math.log(target) / math.log(step) - 1e-9))
    return [round(target ** (k / n), 4) for k in range(1, n)] + [target]


def criteria_names(*, per_layer: bool | None = None, setting: str | None = None) -> tuple[str, ...]:
    """Names of the registered criteria: all, those that take a setting per layer (``per_layer``: what a
    sensitivity sweep varies), or those whose recipe field is ``setting`` (``"sparsity"``: what a trade-off
    study drives to a fraction). Read at each call, so a criterion registered later is found.

    Example:
        >>> criteria_names(per_layer=True)
        ('threshold', 'sparsity')
    """
    return tuple(name for name, c in CRITERIA.items()
                 if (per_layer is None or c.per_layer == per_layer) and (setting is None or c.setting_field == setting))


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
