"""The one mask representation, and the one place it is enforced.

A pruned parameter keeps its identity (no re-parametrisation, so optimizers
that already hold it keep working). Next to it lives a 0/1 buffer
``<param>_mask`` on the same module, in the parameter's dtype (multiplying by a
boolean tensor costs several times more: it is converted on every use), so masks are part of ``state_dict`` under
stable names (``fc1.weight_mask``), move with ``model.to(device)`` and are
broadcast like any buffer under DDP.

Three mechanisms keep pruned entries exactly zero:

* the weight is multiplied by its mask whenever the mask changes;
* a hook that runs when a gradient is accumulated into ``.grad`` multiplies it
  by the mask, so masked entries get exactly zero gradient (also under
  gradient accumulation), and
  momentum / Adam moments that start at zero stay at zero;
* after each optimizer step (a step post-hook, or ``Pruner.enforce`` by hand)
  the weight can be multiplied by the mask again, which catches an optimizer
  that moves a weight without a gradient (LBFGS, a custom one). The pruner
  skips this for torch's first-order optimizers, which provably leave such a
  weight at zero (``Pruner.attach``).

When a mask is set, the optimizer's per-parameter state of the same shape
(momentum buffers, Adam moments) is zeroed where the mask is zero, so the
state can never revive a pruned connection either.
"""

from __future__ import annotations

import copy
from typing import Iterable, Mapping

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

MASK_SUFFIX = "_mask"


def mask_buffer_name(param_name: str) -> str:
    """The buffer name holding the mask of ``param_name`` (``weight`` -> ``weight_mask``)."""
    return param_name + MASK_SUFFIX


def get_mask(module: nn.Module, param_name: str) -> torch.Tensor | None:
    """The 0/1 mask of ``module.<param_name>`` (the parameter's dtype), or None when it has none."""
    return getattr(module, mask_buffer_name(param_name), None)


def attach_mask(module: nn.Module, param_name: str, mask: torch.Tensor | None = None) -> list[RemovableHandle]:
    """Give ``module.<param_name>`` a mask buffer and a gradient-masking hook.

    Args:
        module: the module owning the parameter.
        param_name: e.g. ``"weight"``.
        mask: initial mask (anything castable to bool, the parameter's shape);
            all ones when None. A mask already on the module (e.g. loaded from a
            checkpoint) is kept when ``mask`` is None.

    Returns:
        The hooks' handles (gradient masking; re-applying the mask after
        ``load_state_dict``, so loading weights never revives a pruned one);
        :func:`bake` removes them.
    """
    param = getattr(module, param_name)
    if not isinstance(param, nn.Parameter):
        raise TypeError(f"{type(module).__name__}.{param_name} is not a Parameter")
    name = mask_buffer_name(param_name)
    if mask is None:
        existing = getattr(module, name, None)
        mask = existing if existing is not None else torch.ones_like(param)
    _check_shape(param, mask, param_name)
    mask = mask.detach().to(device=param.device, dtype=param.dtype).clone()
    if name in module._buffers:
        module._buffers[name] = mask
    else:
        module.register_buffer(name, mask)

    def mask_grad(p: torch.Tensor) -> None:
        # Runs once the gradient is accumulated into p.grad, so masking in place is
        # allowed and allocates nothing. The buffer is read at call time:
        # load_state_dict and set_mask replace its values.
        mask = module._buffers.get(name)
        if mask is not None:  # None once baked: a second Pruner's stale hook does nothing
            p.grad.mul_(mask)

    def reapply(mod: nn.Module, incompatible_keys) -> None:
        if name in mod._buffers:
            apply_mask(mod, param_name)

    handles = [param.register_post_accumulate_grad_hook(mask_grad), module.register_load_state_dict_post_hook(reapply)]
    apply_mask(module, param_name)
    return handles


def set_mask(
    module: nn.Module, param_name: str, mask: torch.Tensor, optimizer: torch.optim.Optimizer | None = None
) -> None:
    """Replace the mask of an attached parameter and zero what it removes.

    Args:
        module, param_name: an attached parameter (see :func:`attach_mask`).
        mask: the new mask, the parameter's shape.
        optimizer: when given, its state for this parameter is zeroed where the mask is zero.
    """
    buf = get_mask(module, param_name)
    if buf is None:
        raise KeyError(f"{type(module).__name__}.{param_name} has no mask; attach one first")
    param = getattr(module, param_name)
    _check_shape(param, mask, param_name)
    buf.copy_(mask.to(dtype=torch.bool))  # through bool: any non-zero means kept
    apply_mask(module, param_name)
    if optimizer is not None:
        mask_optimizer_state(optimizer, param, buf)


@torch.no_grad()
def apply_mask(module: nn.Module, param_name: str) -> None:
    """Multiply ``module.<param_name>`` by its mask, in place (identity is kept)."""
    getattr(module, param_name).mul_(get_mask(module, param_name))


@torch.no_grad()
def mask_optimizer_state(optimizer: torch.optim.Optimizer, param: torch.Tensor, mask: torch.Tensor) -> None:
    """Zero every per-element state tensor of ``param`` (momentum, Adam moments) where ``mask`` is 0."""
    state = optimizer.state.get(param)
    if not state:
        return
    for value in state.values():
        if torch.is_tensor(value) and value.shape == param.shape:
            value.mul_(mask)


@torch.no_grad()
def bake(module: nn.Module, param_name: str, handles: Iterable[RemovableHandle] = ()) -> None:
    """Multiply the mask in for good and remove the buffer and the hook.

    The result is a plain parameter whose pruned entries are zero: the module
    computes exactly what it computed with the mask attached.
    """
    apply_mask(module, param_name)
    del module._buffers[mask_buffer_name(param_name)]
    for handle in handles:
        handle.remove()


def _check_shape(param: torch.Tensor, mask: torch.Tensor, param_name: str) -> None:
    if mask.shape != param.shape:
        raise ValueError(f"mask for {param_name} has shape {tuple(mask.shape)}, parameter has {tuple(param.shape)}")


@torch.no_grad()
def baked_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every mask multiplied in and the mask buffers dropped.

    The original keeps its masks and hooks (``deepcopy`` does not copy tensor hooks,
    so the copy is a plain model). Use it to export or analyse without ending pruning.
    """
    plain = copy.deepcopy(model)
    for module in plain.modules():
        for name in [b for b in module._buffers if b.endswith(MASK_SUFFIX)]:
            getattr(module, name[: -len(MASK_SUFFIX)]).mul_(module._buffers.pop(name))
    return plain


def masked_params(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Parameter names that have a mask in a state dict (``fc1.weight_mask`` -> ``fc1.weight``)."""
    return [k[: -len(MASK_SUFFIX)] for k in state if k.endswith(MASK_SUFFIX)]
