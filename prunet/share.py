"""Trained weight sharing (Han, Mao & Dally, *Deep Compression*, 2016): each layer's survivors share 2^b values.

:func:`share` clusters every pruned layer's surviving weights with k-means
(linear initialisation across [min, max], as the paper found best) and turns the
layer's weight into ``codebook[index]`` where the mask keeps it and exactly 0
elsewhere, through ``torch.nn.utils.parametrize``: the codebook is the layer's
only trainable weight, so training the model afterwards fine-tunes the
centroids (autograd sums the gradients of each cluster's members) while the
pruned entries stay zero whatever the optimizer does. :func:`unshare` bakes the
shared values into plain weights again.

Example:
    >>> from prunet import Pruner, Sparsity, create_model
    >>> model = create_model("lenet_300_100")
    >>> _ = Pruner(model).prune(Sparsity(0.9))         # prune first
    >>> shared = share(model, bits={"conv": 8, "fc": 5})
    >>> {name: s.codebook.numel() for name, s in shared.items()}
    {'fc1.weight': 32, 'fc2.weight': 32, 'fc3.weight': 32}
    >>> [name for name, p in model.named_parameters()][:2]  # what retraining moves: centroids and biases
    ['fc1.bias', 'fc1.parametrizations.weight.original']
    >>> plain = unshare(model)                           # after retraining: plain weights again

``prunet export --quantized`` writes a shared model to the compact file;
:func:`shared_layers` gives the codebooks and indices a writer needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from prunet.layers import DEFAULT_GROUPS, GROUPS, Setting, check_names, find_layers, resolve
from prunet.masks import bake, masked_params


def kmeans_1d(values: torch.Tensor, k: int, iters: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on scalars, from ``k`` centroids spread linearly over [min, max].

    In one dimension the nearest centroid is found exactly by the midpoints
    between sorted centroids; the iterations stop when no assignment changes.
    A centroid left with no members keeps its place.

    Returns:
        ``(centroids, assignment)``: ``k`` float32 centroids (ascending) and, per value, its cluster,
        on the CPU (computed there in float64, which not every accelerator has).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    x = values.detach().cpu().double().reshape(-1)
    if x.numel() == 0:
        return torch.zeros(k), torch.zeros(0, dtype=torch.long)
    lo, hi = float(x.min()), float(x.max())
    centroids = torch.linspace(lo, hi, k, dtype=torch.float64) if k > 1 else x.mean().reshape(1)
    assign = None
    for _ in range(iters):
        mids = (centroids[1:] + centroids[:-1]) / 2
        new = torch.bucketize(x, mids)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).double()
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
        centroids = centroids.sort().values  # stays ascending (empty clusters keep their place)
    mids = (centroids[1:] + centroids[:-1]) / 2
    return centroids.float(), torch.bucketize(x, mids)


class SharedWeight(nn.Module):
    """The parametrization ``weight = where(mask, codebook[index], 0)`` of one shared layer."""

    def __init__(self, index: torch.Tensor, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("index", index)
        self.register_buffer("keep", mask.bool())

    def forward(self, codebook: torch.Tensor) -> torch.Tensor:
        return torch.where(self.keep, codebook[self.index], torch.zeros((), dtype=codebook.dtype))

    def right_inverse(self, codebook: torch.Tensor) -> torch.Tensor:
        return codebook  # the stored "original" is the codebook itself


@dataclass
class SharedLayer:
    """One shared layer, for the compact file: its codebook, every entry's cluster, and which entries are kept."""

    param: str
    codebook: torch.Tensor
    index: torch.Tensor
    keep: torch.Tensor
    bits: int


def share(model: nn.Module, bits: Setting, masks: dict[str, torch.Tensor] | None = None) -> dict[str, SharedLayer]:
    """Cluster the surviving weights of every layer ``bits`` names and make them shared, in place.

    Args:
        model: a pruned model (masks baked or not: ``masks`` or the model's ``*_prunet_mask``
            buffers say what survives; otherwise its non-zero weights).
        bits: bits per weight index, one number or per layer / group / glob
            (``{"conv": 8, "fc": 5}``, the paper's AlexNet setting). Layers not named stay as they are.
        masks: parameter name -> 0/1 mask; default the model's mask buffers.

    Returns:
        Parameter name -> :class:`SharedLayer`.
    """
    shared = {}
    masked = [*(masks or {}), *masked_params(dict(model.named_buffers()))]
    layers = find_layers(model, include=[*DEFAULT_GROUPS, *dict.fromkeys(masked)])  # pruned embeddings too
    if isinstance(bits, dict):  # a typo is an error, not an unshared layer; a group may match nothing (conv=8 on an MLP)
        check_names(layers, [k for k in bits if k not in GROUPS], type(model).__name__)
    for layer in layers:
        b = resolve(bits, layer)
        if b is None:
            continue
        if not (1 <= b <= 16 and float(b).is_integer()):
            raise ValueError(f"bits for {layer.layer}: a whole number in 1..16, got {b}")
        b = int(b)
        w = layer.weight.detach()
        mask = masks.get(layer.param) if masks else None
        mask = (layer.mask if layer.mask is not None else w != 0) if mask is None else mask
        keep = mask.bool()
        centroids, assign = kmeans_1d(w[keep], min(1 << b, max(int(keep.sum()), 1)))
        centroids = centroids.to(w.device)
        index = torch.zeros(w.shape, dtype=torch.long, device=w.device)
        index[keep] = assign.to(w.device)
        module, attr = layer.module, layer.attr
        if layer.mask is not None:  # prunet's mask buffer is replaced by the parametrization's own
            bake(module, attr)
        with torch.no_grad():
            getattr(module, attr).copy_(torch.where(keep, centroids.to(w.dtype)[index], torch.zeros((), dtype=w.dtype)))
        codebook = nn.Parameter(centroids.to(w.dtype))
        parametrize.register_parametrization(module, attr, SharedWeight(index, keep), unsafe=True)
        module.parametrizations[attr].original = codebook
        shared[layer.param] = SharedLayer(layer.param, codebook, index, keep, b)
    return shared


def shared_layers(model: nn.Module) -> dict[str, SharedLayer]:
    """The shared layers of a model :func:`share` made, with their current (fine-tuned) codebooks."""
    out = {}
    for name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for attr, plist in module.parametrizations.items():
            p = plist[0]
            if isinstance(p, SharedWeight):
                codebook = plist.original.detach()
                bits = max(1, (codebook.numel() - 1).bit_length())
                out[f"{name}.{attr}" if name else attr] = SharedLayer(f"{name}.{attr}", codebook, p.index, p.keep, bits)
    return out


def unshare(model: nn.Module) -> nn.Module:
    """Bake the shared values into plain weights (same outputs); returns the model.

    The codebooks :func:`share` returned are left as they were.
    """
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for attr in list(module.parametrizations.keys()):
                if isinstance(module.parametrizations[attr][0], SharedWeight):
                    # Not leave_parametrized=True: that would overwrite the codebook Parameter in place.
                    weight = getattr(module, attr).detach().clone()
                    parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
                    setattr(module, attr, nn.Parameter(weight))
    return model
