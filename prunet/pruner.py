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
import warnings
from typing import Any, Iterable, Mapping

import torch
import torch.nn as nn
import torch.nn.utils.prune as torch_prune

from prunet import masks as M
from prunet.criteria import Criterion
from prunet.layers import (
    DEFAULT_GROUPS,
    PRUNABLE_TYPES,
    Coverage,
    Layer,
    LayerRow,
    check_names,
    coverage,
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
        include: what to prune: groups (``fc``: Linear and Hugging Face ``Conv1D``; ``conv``;
            ``attn``: ``nn.MultiheadAttention`` in-projections; ``embed``: embeddings; ``all``),
            layer names, or globs on layer or parameter names (``encoder.*``, ``fc1.bias``);
            default ``fc``, ``conv`` and ``attn`` (biases are not pruned, as in the paper).
        exclude: the same kinds of names, left alone (applied after include).
        types: module types whose ``weight`` is in ``fc``/``conv``.

    A glob or name that names no parameter is an error, and so is a regular expression.
    :meth:`coverage` says what share of the model's matrix weights is pruned and what is
    skipped; a matrix parameter of a type prunet does not know is named in a warning.

    The masks live on the model as buffers (``fc1.weight_prunet_mask``), so
    ``model.state_dict()`` holds them. To resume, build the model, wrap it in a
    ``Pruner`` and ``load_state_dict``: the masks come back with the weights
    (:meth:`state_dict` holds the masks alone). Every ``torch.optim`` optimizer's
    step enforces them (see :mod:`prunet.masks`), whether or not it was given to
    :meth:`prune` or :meth:`attach`; so does the step of a ``copy.deepcopy``, an
    unpickled or a ``torch.load``-ed copy of the model.
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
        self.include = None if include is None else ([include] if isinstance(include, str) else list(include))
        self.exclude = None if exclude is None else ([exclude] if isinstance(exclude, str) else list(exclude))
        self.targets: list[Layer] = find_layers(model, self.include, self.exclude, types, strict=True)
        self._types = types
        cover = self.coverage()
        if not self.targets:
            raise ValueError(f"no prunable parameters found in {type(model).__name__}: {cover}")
        if self.include is None and any(s.what == "not a known layer type" for s in cover.skipped):
            warnings.warn(f"Pruner({type(model).__name__}) {cover}", stacklevel=2)
        self.criterion = criterion
        self._handles = {t.param: M.attach_mask(t.module, t.attr) for t in self.targets}
        self._optimizers: list[torch.optim.Optimizer] = []
        self._optimizer_handles: list = []

    @classmethod
    def from_zeros(cls, model: nn.Module, **kwargs: Any) -> "Pruner":
        """A Pruner whose masks prune exactly the weights that are zero now (sparsity made elsewhere).

        Use it on a model pruned by other means, e.g. after ``torch.nn.utils.prune.remove``,
        so that its zeros count as pruned and stay zero.

        Args:
            model: the model; ``kwargs`` as for :class:`Pruner`.

        Example:
            >>> layer = nn.Sequential(nn.Linear(4, 4))
            >>> with torch.no_grad():
            ...     layer[0].weight[0] = 0
            >>> Pruner.from_zeros(layer).summary()[0].kept
            12
        """
        pruner = cls(model, **kwargs)
        for t in pruner.targets:
            M.set_mask(t.module, t.attr, t.weight.detach() != 0)
        return pruner

    @classmethod
    def from_torch_prune(cls, model: nn.Module, **kwargs: Any) -> "Pruner":
        """Take over ``torch.nn.utils.prune``'s masks: make them permanent and enforce them with prunet's.

        Every parameter torch prunes (``weight_orig`` with ``weight_mask``) becomes a plain
        parameter again (``torch.nn.utils.prune.remove``, same values) with a prunet mask
        equal to torch's, taken even when not in the default groups (a pruned bias).

        Args:
            model: the model; ``kwargs`` as for :class:`Pruner`.
        """
        masks = _take_torch_masks(model)
        include = kwargs.pop("include", None)
        covered = {t.param for t in find_layers(model, include)}
        names = [n for n in masks if n not in covered]
        pruner = cls(model, include=[*(include if include is not None else DEFAULT_GROUPS), *names], **kwargs)
        for t in pruner.targets:
            if t.param in masks:
                M.set_mask(t.module, t.attr, masks[t.param])
        return pruner

    def coverage(self) -> Coverage:
        """What share of the model's matrix weights this pruner prunes, and what it skips and why.

        ``print(pruner.coverage())`` prints one line, e.g. ``prunes 16,384 of 22,784 matrix
        weights (71.9%); skipped: embeddings 6,400 (embed.weight; opt-in: include embed or all)``.
        """
        return coverage(self.model, self.targets, self._types)

    def state_dict(self) -> dict[str, Any]:
        """The masks, by parameter name (bool tensors), and what was included and excluded.

        ``model.state_dict()`` holds the masks already; this is for a checkpoint of its own.
        """
        return {"include": self.include, "exclude": self.exclude,
                "masks": {t.param: t.mask.detach().to(torch.bool).clone() for t in self.targets}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Set the masks to those of :meth:`state_dict` (and zero what they prune; optimizers cleaned).

        Raises:
            ValueError: the masks name other parameters than this pruner's.
        """
        masks = state["masks"]
        mine = [t.param for t in self.targets]
        if sorted(masks) != sorted(mine):
            extra = sorted(set(masks) - set(mine))
            missing = sorted(set(mine) - set(masks))
            raise ValueError(f"the pruner state does not fit: masks for {extra[:3] or 'none'} not pruned here; "
                             f"no mask for {missing[:3] or 'none'}")
        for t in self.targets:
            M.set_mask(t.module, t.attr, masks[t.param].to(t.weight.device))
            for opt in self._optimizers:
                M.mask_optimizer_state(opt, t.weight, t.mask)

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
            layers: restrict to these layers (names, groups such as ``fc``/``conv``/``attn``,
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

    def release(self, layers: Iterable[str] | None = None) -> None:
        """Give every pruned connection of ``layers`` (default all targets) back: their masks all ones.

        The released weights stay zero until training moves them (nothing is re-initialised), and
        their optimizer state is the zero the masks left. A :meth:`prune` after it chooses among every
        weight again, which is how AC/DC's compressed phases start (:meth:`PruningSchedule.acdc`).

        Example:
            >>> from prunet import Sparsity
            >>> pruner = Pruner(torch.nn.Linear(10, 10))
            >>> _ = pruner.prune(Sparsity(0.9))
            >>> pruner.release(); pruner.compression()
            1.0
        """
        for t in self.select(layers):
            M.set_mask(t.module, t.attr, torch.ones_like(t.mask, dtype=torch.bool))

    def _masks_on_cpu(self, criterion: Criterion, selected: list[Layer]) -> dict[str, torch.Tensor]:
        """The criterion's masks computed on a CPU copy of the model, moved back to each weight's device.

        Criteria keep their statistics in float64, which some accelerators (Apple's MPS) lack.
        """
        twin = copy.deepcopy(self.model).to("cpu")
        targets = {t.param: t for t in find_layers(twin, [t.param for t in self.targets])}
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


def _take_torch_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Remove ``torch.nn.utils.prune``'s reparametrizations from ``model``; their masks by parameter name."""
    masks = {}
    for name, module in model.named_modules():
        hooks = [h for h in module._forward_pre_hooks.values() if isinstance(h, torch_prune.BasePruningMethod)]
        for hook in hooks:
            attr = hook._tensor_name
            masks[f"{name}.{attr}" if name else attr] = getattr(module, attr + "_mask").detach() != 0
            torch_prune.remove(module, attr)
    return masks
