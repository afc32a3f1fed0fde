"""The user's handle on pruning: ``Pruner(model) -> prune(), attach(), enforce(), bake(), summary()``.

Example:
    >>> import prunet, torch
    >>> model = prunet.create_model("lenet_300_100")
    >>> pruner = prunet.Pruner(model)
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    >>> pruner.attach(optimizer)            # masks enforced after every step
    >>> _ = pruner.prune(prunet.Threshold(1.0), optimizer=optimizer)
    >>> # ... the user's own training loop ...
    >>> plain = pruner.bake()               # a plain model, same outputs
"""

from __future__ import annotations

import copy
import re
from typing import Iterable

import torch
import torch.nn as nn

from prunet import masks as M
from prunet.criteria import Criterion
from prunet.layers import (
    PRUNABLE_TYPES,
    Layer,
    LayerRow,
    check_names,
    find_layers,
    rows_of,
    select,
    totals,
    unprunable_layers,
)
from prunet.masks import ZERO_PRESERVING

__all__ = ["Pruner", "ZERO_PRESERVING"]

NO_FLOAT64 = ("mps",)  # devices without float64: a prune step's statistics are computed on the CPU


class Pruner:
    """Attach masks to a model's prunable parameters and keep pruned weights at exactly zero.

    Args:
        model: any ``nn.Module``.
        criterion: the default criterion of :meth:`prune`.
        include: regex patterns on parameter names to prune; default: the
            ``weight`` of every Linear and Conv layer (biases are not pruned, as in the paper).
        exclude: regex patterns on parameter names to leave alone (applied after include).
        types: module types whose weights are pruned by default.

    The masks live on the model as buffers (``fc1.weight_prunet_mask``), so
    ``model.state_dict()`` holds them. To resume, build the model, wrap it in a
    ``Pruner`` and ``load_state_dict``: the masks come back with the weights.
    Every ``torch.optim`` optimizer's step enforces them (see :mod:`prunet.masks`),
    whether or not it was given to :meth:`prune` or :meth:`attach`; so does the
    step of a ``copy.deepcopy``, an unpickled or a ``torch.load``-ed copy of the model.
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: Criterion | None = None,
        include: Iterable[str] | None = None,
        exclude: Iterable[str] | None = None,
        types: tuple[type[nn.Module], ...] = PRUNABLE_TYPES,
    ):
        self.model = model
        under_torch = [(name, how) for name, how in unprunable_layers(model, types) if "torch.nn.utils.prune" in how]
        if under_torch:  # skipping it would report a compression the model does not have
            name, how = under_torch[0]
            raise ValueError(f"layer {name!r} is {how}")
        self.targets: list[Layer] = find_layers(model, include, exclude, types)
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
    ) -> dict[str, LayerRow]:
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
        check_names(self.targets, criterion.keys(), self._model_name)
        selected = self.select(layers)
        if any(t.weight.device.type in NO_FLOAT64 for t in self.targets):
            new = self._masks_on_cpu(criterion, selected)
        else:
            new = criterion.masks_in(selected, self.targets)
        for t in selected:
            if t.param in new:
                # AND with the current mask: a criterion can only remove connections.
                M.set_mask(t.module, t.attr, new[t.param].to(torch.bool).logical_and_(t.mask != 0), optimizer)
                for opt in self._optimizers:
                    M.mask_optimizer_state(opt, t.weight, t.mask)
        return {s.layer: s for s in self.summary()}

    def _masks_on_cpu(self, criterion: Criterion, selected: list[Layer]) -> dict[str, torch.Tensor]:
        """The criterion's masks computed on a CPU copy of the model, moved back to each weight's device.

        Criteria keep their statistics in float64, which some accelerators (Apple's MPS) lack.
        """
        twin = copy.deepcopy(self.model).to("cpu")
        targets = {t.param: t for t in find_layers(twin, [f"^{re.escape(t.param)}$" for t in self.targets])}
        new = criterion.masks_in([targets[t.param] for t in selected], [targets[t.param] for t in self.targets])
        devices = {t.param: t.weight.device for t in self.targets}
        return {name: mask.to(devices[name]) for name, mask in new.items()}

    def select(self, layers: Iterable[str] | None) -> list[Layer]:
        """The targets named by ``layers`` (names, groups, globs); all when None.

        Raises:
            prunet.layers.LayerNameError: a name that names no target.
        """
        return select(self.targets, layers, self._model_name)

    @property
    def _model_name(self) -> str:
        return type(self.model).__name__

    # --- enforcement -------------------------------------------------------------------------

    def attach(self, optimizer: torch.optim.Optimizer, enforce_each_step: bool | None = None) -> None:
        """Clean ``optimizer``'s state now and after every later :meth:`prune` (optional).

        Masks hold without it: every optimizer step masks the gradients, cleans
        state the optimizer has not seen masked, and zeroes pruned weights after
        any optimizer not exactly one of :data:`ZERO_PRESERVING` (:mod:`prunet.masks`).

        Args:
            optimizer: the optimizer training the model.
            enforce_each_step: zero the pruned weights after every ``step()`` even
                for a :data:`ZERO_PRESERVING` optimizer. Default (None): only where
                needed; those compute a zero update from a zero gradient, zero state
                and a zero weight, so skipping it keeps a masked step close to a dense
                one in cost (``make bench``).
        """
        self.clean_optimizer(optimizer)
        self._optimizers.append(optimizer)
        if enforce_each_step:
            M.ALWAYS_ENFORCE.add(optimizer)
        # Loading an old state is cleaned at once (the next step would clean it too).
        self._optimizer_handles.append(optimizer.register_load_state_dict_post_hook(self.clean_optimizer))

    def clean_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero ``optimizer``'s per-weight state (momentum, Adam moments) at every pruned entry."""
        for t in self.targets:
            M.mask_optimizer_state(optimizer, t.weight, t.mask)

    def detach_optimizers(self) -> None:
        """Forget the optimizers given to :meth:`attach` (their steps still enforce the masks)."""
        for optimizer in self._optimizers:
            M.ALWAYS_ENFORCE.discard(optimizer)
        for handle in self._optimizer_handles:
            handle.remove()
        self._optimizers.clear()
        self._optimizer_handles.clear()

    def enforce(self) -> None:
        """Set every pruned weight to exactly zero now (after an update made without a ``torch.optim`` step)."""
        for t in self.targets:
            M.apply_mask(t.module, t.attr)

    # --- results -----------------------------------------------------------------------------

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """param name -> live 0/1 mask (the weight's dtype; 1 kept, 0 pruned)."""
        return {t.param: t.mask for t in self.targets}

    def summary(self) -> list[LayerRow]:
        """One row per pruned layer: shape, weights, kept (``prunet.layers.format_table`` prints them)."""
        return rows_of(self.targets)

    def compression(self) -> float:
        """Prunable weights / kept prunable weights (inf when nothing is kept)."""
        return totals(self.summary()).compression

    def bake(self) -> nn.Module:
        """Multiply masks in, drop buffers and hooks; returns the (same) plain model.

        Its outputs are exactly those of the masked model. The pruner is unusable afterwards.
        """
        self.detach_optimizers()
        for t in self.targets:
            M.bake(t.module, t.attr, self._handles.pop(t.param, ()))
        self.targets = []
        return self.model
