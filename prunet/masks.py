"""The one mask representation, and the one place it is enforced.

A pruned parameter keeps its identity (no re-parametrisation, so optimizers
that already hold it keep working). Next to it lives a 0/1 buffer
``<param>_mask`` on the same module, in the parameter's dtype (multiplying by a
boolean tensor costs several times more: it is converted on every use), so
masks are part of ``state_dict`` under stable names (``fc1.weight_prunet_mask``), move
with ``model.to(device)`` and are broadcast like any buffer under DDP. The
parameter knows where its mask lives (an attribute; its class and identity are
unchanged, so optimizers keep their fast paths), through ``copy.deepcopy``,
``pickle`` and ``torch.save(model)`` too.

Enforcement does not depend on what the user's loop calls, or in which order.
PyTorch's global optimizer step hooks run for every ``step()`` of every
``torch.optim`` optimizer, told about prunet or not:

* before the step, every masked gradient is zeroed where its mask is 0 (a
  bitwise AND with the mask's bit pattern, :func:`keep_bits`: a NaN or inf
  gradient there is cleared too, where a multiply would leave NaN; a gradient
  changed after ``backward()``, by noise, by assignment or through ``.data``,
  cannot move a pruned weight), and per-weight optimizer state (momentum, Adam
  moments) is zeroed where the mask is 0 whenever the optimizer has not yet seen
  the mask (the first step after pruning, after ``load_state_dict``);
* after the step, pruned weights are set to exactly zero (which also clears a
  NaN) for any optimizer that is not exactly one of :data:`ZERO_PRESERVING` (a
  subclass may change ``step``; LBFGS mixes entries) and for weights below
  float32, where an update of zeros can be 0/0.

A hook on each parameter also masks its gradient as soon as it is accumulated,
so gradients the user reads after ``backward()`` (for clipping, logging) are
already masked. What the hooks keep between steps (each optimizer's masked
parameters, the bit patterns) is cached and found again when a mask or the
optimizer's parameters change: a step costs two passes over each masked
gradient and a few microseconds of bookkeeping (``docs/benchmarks.md``).
"""

from __future__ import annotations

import copy
import weakref
from typing import Any, Iterable, Mapping

import torch
import torch.nn as nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle

MASK_SUFFIX = "_prunet_mask"  # not torch.nn.utils.prune's "_mask": the two can be on one model without clashing
LEGACY_MASK_SUFFIX = "_mask"  # what prunet's checkpoints called masks before; read, never written

# Optimizers whose update of an entry is exactly zero when its gradient, its state and the
# weight itself are zero (weight decay of a zero weight is zero). Exact types only: a subclass
# may do anything in its step. Not LBFGS: its direction mixes all entries.
ZERO_PRESERVING: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax, torch.optim.NAdam,
    torch.optim.RAdam, torch.optim.RMSprop, torch.optim.Adagrad, torch.optim.Adadelta,
)
_EXACT_FLOATS = (torch.float32, torch.float64)


def mask_buffer_name(param_name: str) -> str:
    """The buffer name holding the mask of ``param_name`` (``weight`` -> ``weight_prunet_mask``)."""
    return param_name + MASK_SUFFIX


def get_mask(module: nn.Module, param_name: str) -> torch.Tensor | None:
    """The 0/1 mask of ``module.<param_name>`` (the parameter's dtype), or None when it has none."""
    return getattr(module, mask_buffer_name(param_name), None)


def _own(param: torch.Tensor, module: nn.Module, buffer_name: str) -> None:
    param._prunet_owner = (module, buffer_name)
    param._prunet_version = getattr(param, "_prunet_version", 0) + 1
    _GENERATION[0] += 1


def _mask_grad(p: torch.Tensor) -> None:
    """Mask a gradient the moment it is accumulated (a module-level function: picklable, unlike a closure)."""
    mask = mask_of(p)
    if mask is not None:  # None once baked: a stale hook does nothing
        zero_pruned(p.grad, p, mask)


# Signed integers as wide as a float of each size: the bit pattern keep_bits uses.
_BITS_OF_WIDTH = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class _Derived:
    """What is derived from a parameter's mask, cached on the parameter until the mask changes.

    A cache, never saved: pickling it (``torch.save(model)``) gives an empty one, and
    ``copy.deepcopy`` of a parameter does not copy its attributes at all.
    """

    __slots__ = ("mask", "version", "bits")

    def __init__(self) -> None:
        self.mask, self.version, self.bits = _nothing, -1, None

    def __reduce__(self) -> tuple:
        return (_Derived, ())


def keep_bits(p: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
    """``mask`` as integers of ``p``'s width: all bits set where kept, none where pruned.

    ``x.view(bits.dtype).bitwise_and_(bits)`` sets the pruned entries of a float tensor to exactly
    zero in one pass, a NaN or inf among them (where ``x * mask`` leaves NaN * 0 = NaN), and leaves
    the bits of every kept entry as they are (a kept NaN stays: that is the user's divergence to
    see). Cached on ``p`` until the mask is another tensor or changes in place (its version
    counter moves: ``set_mask``, ``load_state_dict``). None when the mask is not floating point.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(3))
        >>> keep_bits(w, torch.tensor([1.0, 0.0, 1.0])).tolist()
        [-1, 0, -1]
    """
    cache = p.__dict__.get("_prunet_derived")
    if cache is None:
        cache = p._prunet_derived = _Derived()
    if cache.mask() is not mask or cache.version != mask._version:
        if not mask.is_floating_point():
            return None
        cache.bits = (mask != 0).to(_BITS_OF_WIDTH[mask.element_size()]).neg_()
        cache.mask, cache.version = weakref.ref(mask), mask._version
    return cache.bits


def zero_pruned(t: torch.Tensor, p: torch.Tensor, mask: torch.Tensor) -> None:
    """Zero ``t`` (a gradient, a weight or a state tensor of ``p``) where ``mask`` is 0, in place.

    A NaN or inf there is cleared too. One bitwise AND with :func:`keep_bits` (the cost of a
    multiply, without NaN * 0 = NaN); a tensor that cannot be viewed so (a sparse gradient,
    another dtype than the mask's) is multiplied by the mask and, where the sum shows a NaN or
    inf, filled with ``masked_fill``.
    """
    bits = keep_bits(p, mask)
    if bits is not None and t.dtype == mask.dtype and t.layout == torch.strided:
        t.view(bits.dtype).bitwise_and_(bits)
        return
    if t.layout != torch.strided or t.dtype != mask.dtype:
        t.mul_(mask)
        if bool(torch.isfinite(t.sum())):
            return
    t.masked_fill_(mask == 0, 0)


def mask_of(param: torch.Tensor) -> torch.Tensor | None:
    """The live mask of a parameter, or None when it has none (or it was baked)."""
    owner = getattr(param, "_prunet_owner", None)
    if owner is None:
        return None
    module, name = owner
    return module._buffers.get(name)


class _Reapply:
    """After ``load_state_dict``, apply the (loaded) mask to the (loaded) weight; and survive a deep copy.

    ``copy.deepcopy`` of a module gives it new parameter objects without their
    ``_prunet_owner`` attribute (``Parameter.__deepcopy__`` copies the data only),
    but copies this hook with the module, after its parameters. Copying the hook
    tells the copied parameter where its copied mask lives, so the copy's steps
    enforce it. (``pickle`` and ``torch.save(model)`` keep the attribute themselves.)
    """

    def __init__(self, module: nn.Module | None, param_name: str):
        self.module = weakref.ref(module) if module is not None else _nothing
        self.param_name = param_name

    def __call__(self, module: nn.Module, incompatible_keys: Any) -> None:
        name = mask_buffer_name(self.param_name)
        if name in module._buffers:
            # load_state_dict(assign=True) puts a new Parameter in place: it is told where its mask is.
            _own(getattr(module, self.param_name), module, name)
            apply_mask(module, self.param_name)

    def __deepcopy__(self, memo: dict) -> "_Reapply":
        module = self.module()
        twin = memo.get(id(module)) if module is not None else None
        param = module._parameters.get(self.param_name) if module is not None else None
        copied = memo.get(id(param)) if param is not None else None
        if twin is not None and copied is not None:
            _own(copied, twin, mask_buffer_name(self.param_name))
            copied.register_post_accumulate_grad_hook(_mask_grad)  # a copied parameter has no hooks
        return _Reapply(twin if twin is not None else module, self.param_name)

    def __getstate__(self) -> dict:
        # The module itself, not the weak reference (which does not pickle); pickle's memo
        # makes it the unpickled module.
        return {"param_name": self.param_name, "module": self.module()}

    def __setstate__(self, state: dict) -> None:
        self.param_name = state["param_name"]
        module = state.get("module")
        self.module = weakref.ref(module) if module is not None else _nothing


def _nothing() -> None:
    return None


def attach_mask(module: nn.Module, param_name: str, mask: torch.Tensor | None = None) -> list[RemovableHandle]:
    """Give ``module.<param_name>`` a mask buffer; from then on every optimizer step enforces it.

    Args:
        module: the module owning the parameter.
        param_name: e.g. ``"weight"``.
        mask: initial mask (anything castable to bool, the parameter's shape);
            all ones when None. A mask already on the module (e.g. loaded from a
            checkpoint) is kept when ``mask`` is None.

    Returns:
        The hooks' handles (gradient masking on accumulation; re-applying the mask
        after ``load_state_dict``, so loading weights never revives a pruned one);
        :func:`bake` removes them.
    """
    param = getattr(module, param_name)
    if not isinstance(param, nn.Parameter):
        raise TypeError(f"{type(module).__name__}.{param_name} is not a Parameter")
    name = mask_buffer_name(param_name)
    if mask is None and getattr(module, name, None) is None:
        mask = torch.ones_like(param, requires_grad=False)  # new: no copy of it needed
    else:
        mask = getattr(module, name) if mask is None else mask
        _check_shape(param, mask, param_name)
        mask = mask.detach().to(device=param.device, dtype=param.dtype, copy=True)
    if name in module._buffers:
        module._buffers[name] = mask
    else:
        module.register_buffer(name, mask)
    _own(param, module, name)
    _install_global_hooks()
    handles = [param.register_post_accumulate_grad_hook(_mask_grad),
               module.register_load_state_dict_post_hook(_Reapply(module, param_name))]
    apply_mask(module, param_name)
    return handles


def set_mask(
    module: nn.Module, param_name: str, mask: torch.Tensor, optimizer: torch.optim.Optimizer | None = None
) -> None:
    """Replace the mask of an attached parameter and zero what it removes.

    Every optimizer's state for the parameter is zeroed where the mask is zero
    before its next step (``optimizer``, when given, at once).

    Args:
        module, param_name: an attached parameter (see :func:`attach_mask`).
        mask: the new mask, the parameter's shape.
        optimizer: an optimizer whose state to clean now.
    """
    buf = get_mask(module, param_name)
    if buf is None:
        raise KeyError(f"{type(module).__name__}.{param_name} has no mask; attach one first")
    param = getattr(module, param_name)
    _check_shape(param, mask, param_name)
    buf.copy_(mask.to(dtype=torch.bool))  # through bool: any non-zero means kept
    apply_mask(module, param_name)
    _changed(param)
    if optimizer is not None:
        mask_optimizer_state(optimizer, param, buf)


def _changed(param: torch.Tensor) -> None:
    param._prunet_version = getattr(param, "_prunet_version", 0) + 1


@torch.no_grad()
def apply_mask(module: nn.Module, param_name: str) -> None:
    """Set the pruned entries of ``module.<param_name>`` to exactly zero, in place (identity is kept)."""
    getattr(module, param_name).masked_fill_(get_mask(module, param_name) == 0, 0)


@torch.no_grad()
def mask_optimizer_state(optimizer: torch.optim.Optimizer, param: torch.Tensor, mask: torch.Tensor) -> None:
    """Zero every per-element state tensor of ``param`` (momentum, Adam moments) where ``mask`` is 0."""
    state = optimizer.state.get(param)
    if not state:
        return
    for value in state.values():
        if torch.is_tensor(value) and value.shape == param.shape:
            zero_pruned(value, param, mask)


# --------------------------------------------------------------------------- global enforcement

# Optimizers whose pruned weights are zeroed after every step whatever their type (Pruner.attach(..., True)).
ALWAYS_ENFORCE: "weakref.WeakSet[torch.optim.Optimizer]" = weakref.WeakSet()
_HOOKS: list[RemovableHandle] = []
# Moves whenever a parameter is given a mask or loses it: the optimizers' lists of masked parameters are stale.
_GENERATION = [0]


def _install_global_hooks() -> None:
    if not _HOOKS:
        _HOOKS.append(register_optimizer_step_pre_hook(_before_step))
        _HOOKS.append(register_optimizer_step_post_hook(_after_step))


class _Steps:
    """What the global hooks keep of one optimizer between its steps.

    ``owners``: its masked parameters and where each mask lives, found again only when its
    parameters (their ids, held alive here or by the optimizer) or ``_GENERATION`` change; the
    mask itself is read from its module at every step (``model.to()`` and ``load_state_dict``
    replace buffers). ``seen``: per parameter id, the mask version and the state tensors (weak
    references) it last cleaned. ``zero_after``: the step now running must be followed by
    zeroing the pruned weights: the optimizer is not exactly a ZERO_PRESERVING type, was asked to
    (ALWAYS_ENFORCE), a weight is below float32 (an update of zeros can be 0/0 there), or the step
    was called with a closure (its gradients are computed inside the step, after the masking).
    """

    __slots__ = ("key", "owners", "seen", "zero_after", "__weakref__")

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.owners: list[tuple[torch.Tensor, tuple[nn.Module, str]]] = []
        self.seen: dict[int, tuple] = {}
        self.zero_after = False


_STEPS: "weakref.WeakKeyDictionary[torch.optim.Optimizer, _Steps]" = weakref.WeakKeyDictionary()


def _steps_of(optimizer: torch.optim.Optimizer) -> _Steps:
    steps = _STEPS.get(optimizer)
    if steps is None:
        steps = _STEPS[optimizer] = _Steps()
    key = (_GENERATION[0], [id(p) for group in optimizer.param_groups for p in group["params"]])
    if steps.key != key:
        steps.key = key
        steps.owners = [(p, p._prunet_owner) for group in optimizer.param_groups for p in group["params"]
                        if getattr(p, "_prunet_owner", None) is not None]
    return steps


def _masked(steps: _Steps) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    for p, (module, name) in steps.owners:
        mask = module._buffers.get(name)
        if mask is not None:  # None once baked
            yield p, mask


@torch.no_grad()
def _before_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    # torch passes step's own arguments, the optimizer first: step(self, closure=None).
    closure = kwargs.get("closure", args[1] if len(args) > 1 else None) is not None
    after = closure or type(optimizer) not in ZERO_PRESERVING or optimizer in ALWAYS_ENFORCE
    steps = _steps_of(optimizer)
    state = optimizer.state
    for p, mask in _masked(steps):
        after = after or p.dtype not in _EXACT_FLOATS
        _clean_new_state(optimizer, state.get(p), p, mask, steps.seen)
        grad = p.grad
        if grad is not None:
            # Every step: a gradient can change after backward() in ways no counter shows
            # (p.grad.data.add_, a mask changed in between).
            zero_pruned(grad, p, mask)
    steps.zero_after = after and bool(steps.seen)


def _clean_new_state(optimizer: torch.optim.Optimizer, state: dict | None, p: torch.Tensor, mask: torch.Tensor,
                     seen: dict[int, tuple]) -> None:
    """Zero ``p``'s optimizer state at pruned entries unless this optimizer has seen it so already.

    State is new after ``load_state_dict`` or an assignment; the parameter's version moves with a
    new mask. Weak references, not ids: a freed tensor's id can be reused by its replacement.
    """
    tensors = [v for v in state.values() if isinstance(v, torch.Tensor)] if state else []
    known = seen.get(id(p))
    if known is not None and known[0] == p._prunet_version and len(known[1]) == len(tensors) \
            and all(ref() is t for ref, t in zip(known[1], tensors)):
        return
    mask_optimizer_state(optimizer, p, mask)
    seen[id(p)] = (p._prunet_version, [weakref.ref(t) for t in tensors])


def _after_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    # Not reset here: a subclass's step that calls super().step() runs these hooks twice,
    # nested, and the outer post-step (after the subclass's own changes) must zero again.
    steps = _STEPS.get(optimizer)
    if steps is None or not steps.zero_after:
        return  # the common case (no torch.no_grad() entered: it costs more than this check)
    with torch.no_grad():
        for p, mask in _masked(steps):
            zero_pruned(p.detach(), p, mask)  # a NaN there is cleared too
            mask_optimizer_state(optimizer, p, mask)


# --------------------------------------------------------------------------- ending pruning


@torch.no_grad()
def bake(module: nn.Module, param_name: str, handles: Iterable[RemovableHandle] = ()) -> None:
    """Multiply the mask in for good and remove the buffer and the hooks.

    The result is a plain parameter whose pruned entries are zero: the module
    computes exactly what it computed with the mask attached.
    """
    apply_mask(module, param_name)
    del module._buffers[mask_buffer_name(param_name)]
    _unmask(getattr(module, param_name))
    for handle in handles:
        handle.remove()


def _unmask(param: torch.Tensor) -> None:
    for attr in ("_prunet_owner", "_prunet_version", "_prunet_derived"):
        param.__dict__.pop(attr, None)
    _GENERATION[0] += 1


def _check_shape(param: torch.Tensor, mask: torch.Tensor, param_name: str) -> None:
    if mask.shape != param.shape:
        raise ValueError(f"mask for {param_name} has shape {tuple(mask.shape)}, parameter has {tuple(param.shape)}")


@torch.no_grad()
def baked_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every mask multiplied in and the mask buffers dropped.

    The original keeps its masks and hooks. Use it to export or analyse without ending pruning.
    """
    plain = copy.deepcopy(model)
    for module in plain.modules():
        for name in [b for b in module._buffers if b.endswith(MASK_SUFFIX)]:
            param = getattr(module, name[: -len(MASK_SUFFIX)])
            param.masked_fill_(module._buffers.pop(name) == 0, 0)
            _unmask(param)
    for module in plain.modules():
        hooks = module._load_state_dict_post_hooks
        for key in [k for k, h in hooks.items() if isinstance(h, _Reapply)]:
            del hooks[key]
    return plain


def masked_params(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Parameter names that have a mask in a state dict (``fc1.weight_prunet_mask`` -> ``fc1.weight``)."""
    return [k[: -len(MASK_SUFFIX)] for k in state if k.endswith(MASK_SUFFIX)]


def upgrade_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict of prunet's from before its masks were ``*_prunet_mask``: ``fc1.weight_mask`` renamed.

    Only a mask beside its own weight is renamed; ``torch.nn.utils.prune``'s ``weight_mask`` sits
    beside ``weight_orig`` and stays as it is.

    Example:
        >>> sorted(upgrade_state({"w": torch.ones(1), "w_mask": torch.ones(1)}))
        ['w', 'w_prunet_mask']
    """
    out = {}
    for key, value in state.items():
        base = key[: -len(LEGACY_MASK_SUFFIX)]
        legacy = key.endswith(LEGACY_MASK_SUFFIX) and not key.endswith(MASK_SUFFIX) and base in state \
            and base + "_orig" not in state and base + MASK_SUFFIX not in state
        out[base + MASK_SUFFIX if legacy else key] = value
    return out


def from_torch_pruned_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict saved under ``torch.nn.utils.prune`` as prunet's: ``w_orig`` and ``w_mask`` -> ``w``, its mask.

    The weight is ``w_orig * w_mask`` (what torch's forward computes); the mask becomes ``w_prunet_mask``.

    Example:
        >>> state = {"w_orig": torch.tensor([2.0, 3.0]), "w_mask": torch.tensor([1.0, 0.0])}
        >>> {k: v.tolist() for k, v in from_torch_pruned_state(state).items()}
        {'w': [2.0, 0.0], 'w_prunet_mask': [1.0, 0.0]}
    """
    out = dict(state)
    for key in [k for k in state if k.endswith("_orig") and k[: -len("_orig")] + LEGACY_MASK_SUFFIX in state]:
        base = key[: -len("_orig")]
        mask = out.pop(base + LEGACY_MASK_SUFFIX)
        orig = out.pop(key)
        out[base] = orig * mask.to(orig.dtype)
        out[base + MASK_SUFFIX] = (mask != 0).to(orig.dtype)
    return out
