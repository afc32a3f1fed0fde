"""The user's handle on pruning: ``Pruner(model) -> prune(), attach(), enforce(), bake(), summary()``.

Example:
    >>> model = prunet.create_model("lenet_300_100")
    >>> pruner = prunet.Pruner(model)
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    >>> pruner.attach(optimizer)            # masks enforced after every step
    >>> pruner.prune(prunet.Threshold(1.0), optimizer=optimizer)
    >>> ...                                 # the user's own training loop
    >>> plain = pruner.bake()               # a plain model, same outputs
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Union

import torch
import torch.nn as nn

from prunet import masks as M
from prunet.criteria import global_sparsity_masks, sparsity_mask, threshold_mask

Setting = Union[float, Mapping[str, float]]

DEFAULT_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

# Optimizers whose update of an entry is exactly zero when its gradient, its state and the
# weight itself are zero (weight decay of a zero weight is zero). Not LBFGS: its direction
# mixes all entries.
ZERO_PRESERVING: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax, torch.optim.NAdam,
    torch.optim.RAdam, torch.optim.RMSprop, torch.optim.Adagrad, torch.optim.Adadelta,
)


def layer_kind(module: nn.Module) -> str:
    """The layer group a module belongs to: ``"fc"`` for Linear, ``"conv"`` for convolutions."""
    if isinstance(module, nn.Linear):
        return "fc"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    return type(module).__name__.lower()


@dataclass
class Target:
    """One prunable parameter.

    Attributes:
        layer: the owning module's name, e.g. ``"fc1"`` (what tables and recipes name).
        param: the full parameter name, e.g. ``"fc1.weight"`` (the mask is ``fc1.weight_mask``).
        module: the owning module.
        attr: the attribute on the module, e.g. ``"weight"``.
        kind: ``"fc"`` or ``"conv"`` (layer group).
    """

    layer: str
    param: str
    module: nn.Module
    attr: str
    kind: str

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.module, self.attr)

    @property
    def mask(self) -> torch.Tensor:
        """The live 0/1 mask buffer (the weight's dtype)."""
        return M.get_mask(self.module, self.attr)


@dataclass
class LayerSummary:
    """What remains of one layer: the paper's table row (weights, kept, kept %)."""

    layer: str
    kind: str
    shape: tuple[int, ...]
    weights: int
    kept: int

    @property
    def kept_frac(self) -> float:
        return self.kept / self.weights if self.weights else 1.0


def matches(target: Target, key: str) -> bool:
    """Whether a recipe key names this target: layer or parameter name, group, ``all``, or a glob."""
    if key in ("all", "*", target.layer, target.param, target.kind):
        return True
    return fnmatch.fnmatchcase(target.layer, key) or fnmatch.fnmatchcase(target.param, key)


def resolve(setting: Setting | None, target: Target) -> float | None:
    """The value of a per-layer setting for one target (None: the layer is not pruned).

    A scalar applies to every layer. In a mapping, an exact layer or parameter
    name wins over a group (``fc``, ``conv``), which wins over a glob or ``all``.
    """
    if setting is None:
        return None
    if not isinstance(setting, Mapping):
        return float(setting)
    for key in (target.layer, target.param):
        if key in setting:
            return float(setting[key])
    if target.kind in setting:
        return float(setting[target.kind])
    for key, value in setting.items():
        if matches(target, key):
            return float(value)
    return None


class Criterion:
    """A rule that turns weights and previous masks into new masks, layer by layer.

    A per-layer criterion names its setting (``setting``) and its rule, a pure
    function ``(weight, previous mask, value) -> mask`` from :mod:`prunet.criteria`.
    A custom criterion may instead override :meth:`masks` alone.
    """

    rule: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]

    @property
    def setting(self) -> Setting | None:
        """The per-layer setting; None for a custom criterion that overrides :meth:`masks`."""
        return None

    def masks(self, targets: list[Target]) -> dict[str, torch.Tensor]:
        """param name -> new boolean mask for the targets this criterion prunes."""
        out = {}
        for t in targets:
            value = resolve(self.setting, t)
            if value is not None:
                out[t.param] = type(self).rule(t.weight.detach(), t.mask, value)
        return out

    def keys(self) -> list[str]:
        """The layer names, groups or globs a per-layer setting names (empty for a scalar)."""
        return list(self.setting) if isinstance(self.setting, Mapping) else []


@dataclass
class Threshold(Criterion):
    """Han et al.: prune weights below ``quality × std`` of the layer's surviving weights.

    Args:
        quality: one value for every layer, or a mapping from layer name, group
            (``fc``, ``conv``) or glob to a value. Layers not named are left alone.
    """

    quality: Setting
    rule = threshold_mask

    @property
    def setting(self) -> Setting:
        return self.quality


@dataclass
class Sparsity(Criterion):
    """Prune each layer to a target sparsity (fraction of its weights removed), by magnitude."""

    sparsity: Setting
    rule = sparsity_mask

    @property
    def setting(self) -> Setting:
        return self.sparsity


@dataclass
class GlobalMagnitude(Criterion):
    """One magnitude cut across all targeted layers, to a total ``sparsity``."""

    sparsity: float

    @property
    def setting(self) -> Setting:
        return self.sparsity

    def masks(self, targets: list[Target]) -> dict[str, torch.Tensor]:
        if not targets:
            return {}
        weights = {t.param: t.weight.detach() for t in targets}
        prev = {t.param: t.mask for t in targets}
        return global_sparsity_masks(weights, prev, self.sparsity)


class Pruner:
    """Attach masks to a model's prunable parameters and keep pruned weights at exactly zero.

    Args:
        model: any ``nn.Module``.
        criterion: the default criterion of :meth:`prune`.
        include: regex patterns on parameter names to prune; default: the
            ``weight`` of every Linear and Conv layer (biases are not pruned, as in the paper).
        exclude: regex patterns on parameter names to leave alone (applied after include).
        types: module types whose weights are pruned by default.

    The masks live on the model as buffers (``fc1.weight_mask``), so
    ``model.state_dict()`` holds them. To resume, build the model, wrap it in a
    ``Pruner`` and ``load_state_dict``: the masks come back with the weights.
    Enforcement lives in hooks, which ``copy.deepcopy`` does not copy: a copy of
    a pruned model keeps its masks and is enforced again once wrapped in a new
    ``Pruner`` (which finds and keeps the masks).
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: Criterion | None = None,
        include: Iterable[str] | None = None,
        exclude: Iterable[str] | None = None,
        types: tuple[type[nn.Module], ...] = DEFAULT_TYPES,
    ):
        self.model = model
        self.targets: list[Target] = find_targets(model, include, exclude, types)
        if not self.targets:
            raise ValueError("no prunable parameters found (check include/exclude patterns)")
        self.criterion = criterion
        self._handles = {t.param: M.attach_mask(t.module, t.attr) for t in self.targets}
        self._optimizers: list[torch.optim.Optimizer] = []
        self._optimizer_handles: list = []

    # --- pruning -----------------------------------------------------------------------------

    def prune(
        self,
        criterion: Criterion | None = None,
        layers: Iterable[str] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> dict[str, LayerSummary]:
        """Compute new masks with ``criterion`` and apply them.

        Args:
            criterion: e.g. ``Threshold(1.0)``, ``Sparsity({"fc1": 0.9})``, ``GlobalMagnitude(0.9)``;
                default the one given to the constructor.
            layers: restrict to these layers (names, groups such as ``fc``/``conv``,
                globs); default all targets.
            optimizer: its state is zeroed at the pruned entries (so is the state of
                every optimizer given to :meth:`attach`).

        Returns:
            The summary after pruning, by layer name.
        """
        criterion = criterion or self.criterion
        if criterion is None:
            raise ValueError("prune() needs a criterion: pass one here or to Pruner(model, criterion)")
        unknown = [k for k in criterion.keys() if not any(matches(t, k) for t in self.targets)]
        if unknown:
            names = ", ".join(t.layer for t in self.targets)
            raise ValueError(f"{unknown} names no prunable layer; layers are: {names} (groups: fc, conv, all)")
        selected = self.select(layers)
        new = criterion.masks(selected)
        for t in selected:
            if t.param in new:
                # AND with the current mask: a criterion can only remove connections.
                M.set_mask(t.module, t.attr, new[t.param] & t.mask.bool(), optimizer)
                for opt in self._optimizers:
                    M.mask_optimizer_state(opt, t.weight, t.mask)
        return {s.layer: s for s in self.summary()}

    def select(self, layers: Iterable[str] | None) -> list[Target]:
        """Targets named by ``layers`` (names, groups, globs); all when None."""
        if layers is None:
            return list(self.targets)
        keys = list(layers)
        chosen = [t for t in self.targets if any(matches(t, k) for k in keys)]
        unknown = [k for k in keys if not any(matches(t, k) for t in self.targets)]
        if unknown:
            names = ", ".join(t.layer for t in self.targets)
            raise ValueError(f"no prunable layer matches {unknown}; layers are: {names} (groups: fc, conv, all)")
        return chosen

    # --- enforcement -------------------------------------------------------------------------

    def attach(self, optimizer: torch.optim.Optimizer, enforce_each_step: bool | None = None) -> None:
        """Keep ``optimizer`` from ever moving a pruned weight.

        Its state is masked now, after every later :meth:`prune`, and after
        ``optimizer.load_state_dict`` (an old momentum buffer must not revive a pruned weight).

        Args:
            optimizer: the optimizer training the model.
            enforce_each_step: multiply the masks into the weights after every
                ``step()``. Default (None): only for optimizers outside
                :data:`ZERO_PRESERVING`. Those compute a zero update from a zero
                gradient, zero state and a zero weight, so with gradients masked
                and state clean the multiply would change nothing; skipping it is
                what keeps a masked step close to a dense one in cost (``make bench``).
        """
        self.clean_optimizer(optimizer)
        self._optimizers.append(optimizer)
        if enforce_each_step is None:
            enforce_each_step = not isinstance(optimizer, ZERO_PRESERVING)
        if enforce_each_step:
            self._optimizer_handles.append(optimizer.register_step_post_hook(lambda *_: self.enforce()))
        self._optimizer_handles.append(optimizer.register_load_state_dict_post_hook(self.clean_optimizer))

    def clean_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero ``optimizer``'s per-weight state (momentum, Adam moments) at every pruned entry."""
        for t in self.targets:
            M.mask_optimizer_state(optimizer, t.weight, t.mask)

    def detach_optimizers(self) -> None:
        """Remove the step hooks installed by :meth:`attach`."""
        for h in self._optimizer_handles:
            h.remove()
        self._optimizer_handles.clear()
        self._optimizers.clear()

    def enforce(self) -> None:
        """Zero every pruned weight now (call after ``optimizer.step()`` if not attached)."""
        # One fused multiply over all weights: this runs after every step, where
        # per-tensor Python overhead is most of its cost.
        with torch.no_grad():
            torch._foreach_mul_([t.weight for t in self.targets], [t.mask for t in self.targets])

    # --- results -----------------------------------------------------------------------------

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """param name -> live 0/1 mask (the weight's dtype; 1 kept, 0 pruned)."""
        return {t.param: t.mask for t in self.targets}

    def summary(self) -> list[LayerSummary]:
        """One row per pruned layer: shape, weights, kept."""
        return [
            LayerSummary(t.layer, t.kind, tuple(t.weight.shape), t.weight.numel(), int(t.mask.count_nonzero()))
            for t in self.targets
        ]

    def compression(self) -> float:
        """Prunable weights / kept prunable weights."""
        rows = self.summary()
        kept = sum(r.kept for r in rows)
        return sum(r.weights for r in rows) / kept if kept else float("inf")

    def bake(self) -> nn.Module:
        """Multiply masks in, drop buffers and hooks; returns the (same) plain model.

        Its outputs are exactly those of the masked model. The pruner is unusable afterwards.
        """
        self.detach_optimizers()
        for t in self.targets:
            M.bake(t.module, t.attr, self._handles.pop(t.param, ()))
        self.targets = []
        return self.model


def find_targets(
    model: nn.Module,
    include: Iterable[str] | None,
    exclude: Iterable[str] | None,
    types: tuple[type[nn.Module], ...],
) -> list[Target]:
    inc = [re.compile(p) for p in include] if include is not None else None
    exc = [re.compile(p) for p in (exclude or [])]
    targets = []
    for layer, module in model.named_modules():
        for attr, param in module.named_parameters(recurse=False):
            full = f"{layer}.{attr}" if layer else attr
            if inc is None:
                wanted = isinstance(module, types) and attr == "weight"
            else:
                wanted = any(p.search(full) for p in inc)
            if wanted and not any(p.search(full) for p in exc):
                targets.append(Target(layer, full, module, attr, layer_kind(module)))
    return targets


def masked_state_keys(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Parameter names that have a mask in a state dict (``fc1.weight_mask`` -> ``fc1.weight``)."""
    return [k[: -len(M.MASK_SUFFIX)] for k in state if k.endswith(M.MASK_SUFFIX)]

