"""Layer-wise Optimal Brain Surgeon: prune a trained model without retraining, the survivors compensating.

One layer at a time, in model order, a layer's output on calibration inputs is kept as
close as its pruned weights allow (Optimal Brain Compression, Frantar & Alistarh 2022;
SparseGPT, Frantar & Alistarh 2023). For a row ``w`` of the weight and the layer's
inputs ``X`` (``d`` features × ``N`` calibration rows), the error of a pruned row ``ŵ`` is

    E(ŵ) = ‖(w − ŵ) X‖² / N = ½ (w − ŵ)ᵀ H (w − ŵ),   H = 2 X Xᵀ / N   (dampened: + λ·mean(diag H)·I).

Rows are independent given ``H``. Removing weight ``q`` and moving the others optimally
costs ``w_q² / (2 [H⁻¹]_qq)`` (its OBS saliency) and moves the row by
``δ = −w_q / [H⁻¹]_qq · H⁻¹[:, q]`` (:func:`obs_step`, the textbook formula).

:func:`obs_prune_weight` prunes a whole layer in a few steps, each keeping at least
:data:`STEP` of the survivors before it (4× is five steps). At each step every row's survivors
are refitted to their least-squares optimum for the row's mask, ``H_SS ŵ_S = (H w)_S`` (no other
values of them do better), each survivor's saliency is its OBS loss in its row as the row stands,
``ŵ_j² / (2 [H_SS⁻¹]_jj)``, and the least salient of the whole layer go: one cut over all rows,
so rows keep what they need. Pruning a single weight this way is exactly :func:`obs_step`. It
costs a Cholesky factorisation per row and step, ``O(Σ kept³)``; a layer whose estimate is over
:data:`EXACT_FLOPS` is pruned by SparseGPT's pass instead (columns left to right, each block's
mask chosen on the weights compensated so far, each pruned weight's error pushed onto the
columns to its right through the Cholesky factor of ``H⁻¹``: ``O(d³ + rows·d²)``).

:func:`obs_prune` runs it over a model: each layer's Hessian comes from the calibration
batches passed through the layers pruned before it (so later layers compensate earlier
errors), and each layer's share of the target comes from an allocation criterion
(:class:`prunet.criteria.LAMP` by default: the layers keep what a LAMP cut would keep).

Bounds: a layer's Hessian is ``d × d`` float64, ``d`` its inputs (a convolution's
``in_channels × kernel area``); a few copies of it are held at once, about ``32·d²`` bytes
(2 GiB at the limit). A layer with ``d`` over :data:`MAX_DIM` (8192; AlexNet's fc6 has 9216)
is refused in one line before anything is pruned, as are layer types this module cannot
unfold (grouped or non-2-D convolutions, attention in-projections): use ``lamp`` for those.
LeNet's Hessians (784², 300², 100²; LeNet-5's 800² at most) take well under a second each.

Example:
    >>> import prunet, torch
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    >>> pruner = prunet.Pruner(model)
    >>> batches = [torch.randn(128, 64) for _ in range(2)]  # your calibration inputs, ready for the model
    >>> _ = obs_prune(pruner, batches, prunet.criteria.LAMP(target=4))
    >>> round(pruner.compression(), 2)
    4.0
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from prunet import masks as M
from prunet.criteria import LAMP, Criterion, GlobalMagnitude
from prunet.layers import Layer, LayerRow
from prunet.pruner import Pruner

MAX_DIM = 8192  # a layer's inputs: its Hessian is MAX_DIM² float64, 512 MiB, and a few copies are held
EXACT_FLOPS = 3e11  # the exact form's estimated cost (about a minute on one core) above which SparseGPT's pass runs
STEP = 0.75  # each step of the exact form keeps at least this share of the survivors before it
DAMP = 0.01  # λ: H + λ·mean(diag H)·I keeps H invertible when inputs are few or correlated
BLOCK = 128  # columns whose mask SparseGPT's pass chooses together
METHODS = ("magnitude", "lamp", "obs")  # what prune_once (and `prunet prune --method`) offers


class ObsError(ValueError):
    """A layer OBS cannot prune (its type, or its Hessian over the size limit); one line naming it."""


def obs_step(w: torch.Tensor, hinv: torch.Tensor, q: int) -> tuple[torch.Tensor, float]:
    """The Optimal Brain Surgeon step for one row: remove weight ``q``, move the others to compensate.

    Args:
        w: the row, shape ``(d,)``.
        hinv: the inverse Hessian of the row's error, ``(d, d)``.
        q: the weight removed.

    Returns:
        ``(δ, loss)``: ``w + δ`` has ``δ_q = −w_q`` and is the best such row,
        ``δ = −w_q / [H⁻¹]_qq · H⁻¹[:, q]``; ``loss = w_q² / (2 [H⁻¹]_qq)``, the error's increase.

    Example:
        >>> delta, loss = obs_step(torch.tensor([1.0, 2.0]), torch.tensor([[1.0, 0.5], [0.5, 1.0]]), 0)
        >>> delta.tolist(), loss
        ([-1.0, -0.5], 0.5)
    """
    delta = -w[q] / hinv[q, q] * hinv[:, q]
    return delta, float(w[q] ** 2 / (2 * hinv[q, q]))


def dampen(hessian: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """``H + damp · mean(diag H) · I`` (a copy); an all-zero ``H`` gets ``damp · I``."""
    diag = hessian.diagonal()
    scale = float(diag.mean()) if float(diag.mean()) > 0 else 1.0
    return hessian + damp * scale * torch.eye(len(hessian), dtype=hessian.dtype, device=hessian.device)


def input_dim(layer: Layer) -> int:
    """The size ``d`` of a layer's Hessian: its inputs as one row of its flattened weight sees them.

    Raises:
        ObsError: a layer type OBS cannot unfold, or ``d`` over :data:`MAX_DIM`.
    """
    module = layer.module
    if layer.attr != "weight" or not isinstance(module, (nn.Linear, nn.Conv2d)):
        raise ObsError(f"OBS: layer {layer.layer} ({type(module).__name__}.{layer.attr}) is not a Linear or "
                       f"Conv2d weight; prune it by magnitude (--method lamp)")
    if isinstance(module, nn.Conv2d) and (module.groups != 1 or isinstance(module.padding, str)
                                         or module.padding_mode != "zeros"):
        raise ObsError(f"OBS: layer {layer.layer} is a grouped, 'same'-padded or non-zero-padded convolution, "
                       f"which OBS does not unfold; prune it by magnitude (--method lamp)")
    d = layer.weight[0].numel()
    if d > MAX_DIM:
        raise ObsError(f"OBS: layer {layer.layer} has {d:,} inputs, a {d:,}² Hessian ({8 * d * d / 2**30:.1f} GiB); "
                       f"the limit is {MAX_DIM:,} (prunet.obs.MAX_DIM); prune it by magnitude (--method lamp)")
    return d


def _rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows its flattened weight multiplies: ``(N, d)``."""
    if isinstance(module, nn.Conv2d):  # im2col: one row per output position, (C, kh, kw) as the weight flattens
        cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)  # B, C·kh·kw, L
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


def layer_hessian(model: nn.Module, layer: Layer, batches: Sequence[torch.Tensor]) -> torch.Tensor:
    """``H = 2 X Xᵀ / N`` (undampened, float64) of ``layer``'s inputs when ``batches`` run through ``model``.

    Args:
        model: the model, as it is now (layers pruned before this one give this one its inputs).
        layer: one of its prunable Linear or Conv2d layers.
        batches: model inputs, each a tensor on the model's device.

    Returns:
        ``(d, d)`` float64, on the layer's device (the CPU for a device without float64).
    """
    d = input_dim(layer)
    device = layer.weight.device if layer.weight.device.type != "mps" else torch.device("cpu")
    total = torch.zeros(d, d, dtype=torch.float64, device=device)
    count = 0

    def hook(module, inputs, output):
        nonlocal total, count
        rows = _rows(module, inputs[0].detach()).to(device=device, dtype=torch.float64)
        total.addmm_(rows.T, rows)
        count += rows.shape[0]

    handle = layer.module.register_forward_hook(hook)
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()
            for x in batches:
                model(x)
    finally:
        handle.remove()
        model.train(was_training)
    return total * (2.0 / max(count, 1))


def obs_prune_weight(weight: torch.Tensor, hessian: torch.Tensor, keep: int, prev: torch.Tensor | None = None,
                     damp: float = DAMP, exact: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune one layer's weight to ``keep`` survivors by OBS, the survivors compensating.

    Args:
        weight: ``(rows, ...)``; each row flattens to the ``d`` inputs ``hessian`` is over.
        hessian: ``(d, d)``, from :func:`layer_hessian` (undampened).
        keep: survivors wanted in the whole layer (fewer if ``prev`` already keeps fewer).
        prev: boolean mask of the survivors so far (None: all); its pruned weights stay pruned.
        damp: λ of :func:`dampen`.
        exact: the iterative exact form (True) or SparseGPT's pass (False); None: exact
            unless its estimated cost is over :data:`EXACT_FLOPS`.

    Returns:
        ``(new weight, mask)``, both ``weight``'s shape: the weight in its dtype, zero where the
        boolean mask is False; the mask a subset of ``prev``.

    Example:
        >>> w = torch.tensor([[1.0, 0.1], [0.5, -2.0]])
        >>> new, mask = obs_prune_weight(w, torch.tensor([[2.0, 1.0], [1.0, 2.0]]), keep=2, damp=0.0)
        >>> mask.tolist(), [round(v, 2) for v in new.flatten().tolist()]  # 0.1 goes, 1.0 takes its share
        ([[True, False], [False, True]], [1.05, 0.0, 0.0, -1.75])
    """
    rows = weight.shape[0]
    w0 = weight.detach().reshape(rows, -1).to(device=hessian.device, dtype=torch.float64)
    prev2 = (torch.ones_like(w0, dtype=torch.bool) if prev is None
             else prev.detach().reshape(rows, -1).to(device=hessian.device, dtype=torch.bool))
    w0 = w0 * prev2  # a pruned weight is zero, whatever the tensor holds
    h = dampen(hessian.to(torch.float64), damp)
    counts = step_counts(int(prev2.sum()), max(keep, 0))
    if exact if exact is not None else exact_cost(counts, rows) <= EXACT_FLOPS:
        new, mask = _iterative(w0, h, prev2, counts)
    else:
        new = w0.clone()
        upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
        mask = _sequential_pass(new, upper, prev2, w0.numel() - counts[-1] if counts else 0, BLOCK)
    new = new * mask
    return new.reshape(weight.shape).to(device=weight.device, dtype=weight.dtype), mask.reshape(weight.shape)


def step_counts(kept: int, keep: int, step: float = STEP) -> list[int]:
    """The survivors after each step of the exact form, from ``kept`` down to ``keep``: each keeps >= ``step`` of the last.

    >>> step_counts(1000, 250)
    [758, 574, 435, 330, 250]
    """
    if keep >= kept:
        return []
    n = max(1, math.ceil(math.log(keep / kept) / math.log(step) - 1e-9)) if keep > 0 else 1
    return [round(kept * (keep / kept) ** (t / n)) for t in range(1, n)] + [keep]


def exact_cost(counts: list[int], rows: int) -> float:
    """Floating-point operations of the exact form, about: a Cholesky and a triangular inverse per row and step."""
    return sum(rows * (c / rows) ** 3 for c in counts)


def _iterative(w0: torch.Tensor, h: torch.Tensor, prev: torch.Tensor,
               counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact form: at each step the rows' survivors are refitted and the least salient of the layer go.

    A survivor's saliency is the OBS loss of removing it from its row as the row stands,
    ``ŵ_j² / (2 [H_SS⁻¹]_jj)`` with ``S`` the row's survivors: comparable across rows, so one
    cut over the layer adapts each row's sparsity. Each step keeps ``counts[t]``.
    """
    mask = prev.clone()
    for count in counts:
        w, saliency = _refit(w0, h, mask)
        order = torch.sort(saliency.masked_fill(~mask, math.inf).reshape(-1), stable=True).indices
        mask.view(-1)[order[:int(mask.sum()) - count]] = False
    w, _ = _refit(w0, h, mask)
    return w, mask


def _refit(w0: torch.Tensor, h: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's survivors at their least-squares optimum, ``H_SS ŵ_S = (H w0)_S``, and their OBS saliencies.

    Returns:
        ``(ŵ, saliency)``, ``(rows, d)`` each; zero and infinite where ``mask`` prunes.
    """
    target = w0 @ h  # H is symmetric: row i is (H w0_i)ᵀ
    out, saliency = torch.zeros_like(w0), torch.full_like(w0, math.inf)
    full_diag = None
    for i in range(w0.shape[0]):
        idx = mask[i].nonzero().flatten()
        if idx.numel() == w0.shape[1]:  # a whole row: it is its own optimum, and H⁻¹ is shared
            if full_diag is None:
                full_diag = torch.cholesky_inverse(torch.linalg.cholesky(h)).diagonal()
            out[i], saliency[i] = w0[i], w0[i] ** 2 / (2 * full_diag)
        elif idx.numel():
            chol = torch.linalg.cholesky(h[idx][:, idx])
            w = torch.cholesky_solve(target[i, idx, None], chol).flatten()
            inv_l = torch.linalg.solve_triangular(chol, torch.eye(len(idx), dtype=h.dtype, device=h.device),
                                                  upper=False)
            out[i, idx], saliency[i, idx] = w, w ** 2 / (2 * inv_l.square().sum(0))  # [H⁻¹]_jj = ‖L⁻¹[:, j]‖²
    return out, saliency


def _sequential_pass(work: torch.Tensor, upper: torch.Tensor, prev: torch.Tensor, prune: int,
                     block: int) -> torch.Tensor:
    """SparseGPT's pass over the columns of ``work`` (changed in place); returns the kept mask.

    Each block of columns prunes its share of ``prune`` (the weights ``prev`` prunes always among
    them) with the smallest saliency ``w² / U_jj²``; pruning column ``j``'s weights moves the
    columns right of it by ``−(w_j / U_jj) · U[j, j:]``: the OBS update restricted to the columns
    not yet visited, ``U`` the upper Cholesky factor of ``H⁻¹``. For layers too large for the
    exact form: ``O(d³ + rows·d²)``, but a block's choice is made before its columns are updated.
    """
    cols = work.shape[1]
    diag = upper.diagonal()
    mask = prev.clone()
    done = 0
    for start in range(0, cols, block):
        end = min(start + block, cols)
        want = round(prune * end / cols) - done  # the pruned count so far follows the layer's share
        mask[:, start:end] = _block_mask(work[:, start:end], diag[start:end], prev[:, start:end], want)
        done += int((~mask[:, start:end]).sum())
        for j in range(start, end):
            err = work[:, j] / diag[j] * ~mask[:, j]  # R
            work[:, j:] -= err[:, None] * upper[j, j:][None, :]
    return mask


def _block_mask(w: torch.Tensor, diag: torch.Tensor, prev: torch.Tensor, want: int) -> torch.Tensor:
    """Keep mask of one block: ``want`` weights pruned by smallest ``w² / diag²`` (at least ``prev``'s pruned)."""
    saliency = (w ** 2 / diag[None, :] ** 2).masked_fill(~prev, -math.inf).reshape(-1)
    n = min(max(want, int((~prev).sum())), saliency.numel())
    order = torch.sort(saliency, stable=True).indices  # ties: the earlier weight goes first
    keep = torch.ones_like(saliency, dtype=torch.bool)
    keep[order[:n]] = False
    return keep.view_as(w)


def obs_prune(pruner: Pruner, batches: Sequence[torch.Tensor], allocation: Criterion,
              damp: float = DAMP) -> dict[str, LayerRow]:
    """Prune every target of ``pruner`` by layer-wise OBS, each layer to its share of ``allocation``.

    Args:
        pruner: the model's pruner; its masks so far are kept (pruned weights stay pruned).
        batches: calibration inputs (a few hundred to a few thousand training examples), each a
            tensor ready for the model (normalised, on its device).
        allocation: a criterion whose masks say how many weights each layer keeps, e.g.
            ``LAMP(target=4)`` or ``ERK(target=4)``; ``Sparsity(0.75)`` for the same share everywhere.
            Only its counts are used: OBS chooses which weights.
        damp: as for :func:`obs_prune_weight`.

    Returns:
        The pruner's summary after pruning, by layer name.

    Raises:
        ObsError: a layer OBS cannot prune (checked for all layers before any is pruned).
    """
    for t in pruner.targets:
        input_dim(t)
    counts = {name: int(m.count_nonzero()) for name, m in allocation.masks_in(pruner.targets, pruner.targets).items()}
    for t in pruner.targets:
        if t.param not in counts:
            continue
        hessian = layer_hessian(pruner.model, t, batches)
        weight, mask = obs_prune_weight(t.weight, hessian, counts[t.param], t.mask, damp)
        with torch.no_grad():
            t.weight.copy_(weight)
        M.set_mask(t.module, t.attr, mask.to(t.weight.device))
    return {s.layer: s for s in pruner.summary()}


def prune_once(pruner: Pruner, method: str, target: float,
               batches: Sequence[torch.Tensor] | None = None) -> dict[str, LayerRow]:
    """One-shot pruning to ``target`` times fewer prunable weights, no retraining.

    Args:
        pruner: the model's pruner (masks so far kept).
        method: ``magnitude`` (one global magnitude cut), ``lamp`` (:class:`~prunet.criteria.LAMP`)
            or ``obs`` (:func:`obs_prune` with LAMP's per-layer counts).
        target: the compression of the pruner's targets afterwards (weights / kept), >= 1.
        batches: calibration inputs, needed by ``obs``.

    Returns:
        The pruner's summary after pruning, by layer name.
    """
    if method not in METHODS:
        raise ValueError(f"method: {method!r} is not one of {', '.join(METHODS)}")
    if not (math.isfinite(target) and target >= 1):
        raise ValueError(f"target: a compression >= 1, got {target}")
    if method == "magnitude":
        return pruner.prune(GlobalMagnitude(1.0 - 1.0 / target))
    if method == "lamp":
        return pruner.prune(LAMP(target=target))
    if not batches:
        raise ValueError("obs needs calibration batches")
    return obs_prune(pruner, batches, LAMP(target=target))
