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

from typing import Iterable

import torch
import torch.nn as nn

from prunet import masks as M
from prunet.criteria import Criterion
from prunet.layers import PRUNABLE_TYPES, Layer, LayerRow, check_names, find_layers, rows_of, select, totals

# Optimizers whose update of an entry is exactly zero when its gradient, its state and the
# weight itself are zero (weight decay of a zero weight is zero). Not LBFGS: its direction
# mixes all entries.
ZERO_PRESERVING: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax, torch.optim.NAdam,
    torch.optim.RAdam, torch.optim.RMSprop, torch.optim.Adagrad, torch.optim.Adadelta,
)


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
        types: tuple[type[nn.Module], ...] = PRUNABLE_TYPES,
    ):
        self.model = model
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
        new = criterion.masks(selected)
        for t in selected:
            if t.param in new:
                # AND with the current mask: a criterion can only remove connections.
                M.set_mask(t.module, t.attr, new[t.param] & t.mask.bool(), optimizer)
                for opt in self._optimizers:
                    M.mask_optimizer_state(opt, t.weight, t.mask)
        return {s.layer: s for s in self.summary()}

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
