"""Regularisation penalties and the paper's dropout ratio adjustment.

L2 is applied as weight decay by the reference loop (same gradient as
:func:`l2_penalty`, cheaper); L1 is added to the loss with :func:`l1_penalty`.
Both act on weights (tensors of two or more dimensions), not on biases.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch
import torch.nn as nn

from prunet.layers import find_layers


def l1_penalty(params: Iterable[torch.Tensor], strength: float) -> torch.Tensor:
    """``strength * sum |w|``: gradient ``strength * sign(w)`` (0 at w = 0)."""
    return strength * sum(p.abs().sum() for p in params)


def l2_penalty(params: Iterable[torch.Tensor], strength: float) -> torch.Tensor:
    """``strength / 2 * sum w²``: gradient ``strength * w``, exactly weight decay ``strength``."""
    return 0.5 * strength * sum(p.pow(2).sum() for p in params)


def decayed_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters a regularizer acts on: weights of two or more dimensions, trainable."""
    return [p for p in model.parameters() if p.dim() > 1 and p.requires_grad]


def adjusted_dropout(original: float, kept: int, dense: int) -> float:
    """Han et al. eq. 2: ``D_r = D_o * sqrt(C_ir / C_io)``.

    Args:
        original: the dropout ratio used in dense training, ``D_o``.
        kept: connections left in the layer the dropout feeds, ``C_ir``.
        dense: that layer's original connections, ``C_io``.

    >>> adjusted_dropout(0.5, 25, 100)
    0.25
    """
    if dense <= 0 or not 0 <= kept <= dense:
        raise ValueError(f"need 0 <= kept ({kept}) <= dense ({dense}) and dense > 0")
    return original * math.sqrt(kept / dense)


def dropout_feeds(model: nn.Module, prunable: Iterable[str]) -> dict[str, str]:
    """Map each dropout module to the prunable layer it feeds.

    The mapping follows registration order of leaf modules, which is forward
    order for ``nn.Sequential`` models and the registered models. For a model
    whose ``forward`` runs modules in another order, give the mapping yourself.

    Args:
        model: the network.
        prunable: names of the prunable layers (e.g. ``["fc1", "fc2", "fc3"]``).

    Returns:
        dropout module name -> layer name, e.g. ``{"drop6": "fc7", "drop7": "fc8"}``.
    """
    prunable = set(prunable)
    # Every layer a dropout can feed, pruned or not: a dropout feeding an unpruned layer is not scaled.
    layers = {layer.layer for layer in find_layers(model)} | prunable
    pending: list[str] = []
    out: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            pending.append(name)
        elif name in layers:
            if name in prunable:
                out.update({d: name for d in pending})
            pending = []
    return out


class DropoutAdjuster:
    """Remembers a model's original dropout ratios and sets the paper's adjusted ones.

    Create it before any retraining (the ratios it finds are taken as ``D_o``);
    then, after each pruning step, :meth:`adjust` with the layers' kept and dense
    connection counts. :meth:`restore` puts the originals back.

    Args:
        model: the network.
        prunable: names of the prunable layers.
        feeds: dropout name -> layer name; found by :func:`dropout_feeds` when None.
    """

    def __init__(self, model: nn.Module, prunable: Iterable[str], feeds: Mapping[str, str] | None = None):
        self.model = model
        self.feeds = dict(feeds) if feeds is not None else dropout_feeds(model, prunable)
        modules = dict(model.named_modules())
        self.original = {d: modules[d].p for d in self.feeds}

    def adjust(self, kept: Mapping[str, int], dense: Mapping[str, int]) -> dict[str, float]:
        """Set every mapped dropout to ``D_o * sqrt(kept / dense)``; returns dropout name -> ratio."""
        return set_dropout(self.model, self.original, self.feeds, kept, dense)

    def restore(self) -> None:
        """Put the original ratios back (e.g. before saving a model that is rebuilt from its recipe)."""
        modules = dict(self.model.named_modules())
        for d, p in self.original.items():
            modules[d].p = p


def set_dropout(
    model: nn.Module,
    original: Mapping[str, float],
    feeds: Mapping[str, str],
    kept: Mapping[str, int],
    dense: Mapping[str, int],
) -> dict[str, float]:
    """Set every mapped dropout to its adjusted ratio; returns dropout name -> ratio used.

    Args:
        model: the network whose dropout modules are changed in place.
        original: dropout name -> ``D_o``.
        feeds: dropout name -> layer name (:func:`dropout_feeds`).
        kept, dense: layer name -> kept and original connection counts.
    """
    modules = dict(model.named_modules())
    used = {}
    for d, layer in feeds.items():
        ratio = adjusted_dropout(original[d], kept[layer], dense[layer])
        modules[d].p = ratio
        used[d] = ratio
    return used
