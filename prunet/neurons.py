"""Dead neurons: find them and physically shrink the layers (Han et al. 2015, section 3.5).

"After pruning, neurons with zero input connections or zero output connections
may be safely pruned." A neuron is an output feature of an ``nn.Linear`` or an
output channel of an ``nn.Conv1d/2d/3d``. Once its incoming or outgoing weights
are all pruned, it can be deleted from both sides: the rows of its own layer
and the columns of the next one. The shrunken model computes the same function:

* no outgoing weights: the neuron contributes nothing downstream; drop it.
* no incoming weights: the neuron emits its bias ``b`` everywhere. Through the
  elementwise / per-channel modules that follow (activation, BatchNorm, pooling,
  Flatten, Dropout in eval mode) that stays a constant ``v = act(b)``, so its
  contribution to the next layer is a constant we fold into that layer's bias:
  ``next.bias += v * next.weight[:, j]`` (summed over the kernel for a conv,
  over the channel's block of features after a Flatten).

Removing neurons can kill more (a column of the next layer may have had its only
surviving weight in a removed row), so removal repeats until nothing changes.

Scope. Neuron removal follows the data from one layer to the next, which only an
``nn.Sequential`` (nested ones included) states explicitly. Between two layers
it understands elementwise activations, Dropout, BatchNorm, max / average /
adaptive pooling and a ``Flatten`` from a conv to a Linear layer. Anything else
(LocalResponseNorm mixes channels, grouped convolutions, custom modules) is a
*boundary*: the layers on either side keep their widths there, and the report
says so. Exactness holds in eval mode (Dropout off, BatchNorm on its running
statistics).

Example:
    >>> from prunet import Pruner, Sparsity, create_model
    >>> _ = torch.manual_seed(0)
    >>> model = create_model("lenet_300_100")
    >>> pruner = Pruner(model)
    >>> _ = pruner.prune(Sparsity(0.9))
    >>> masks = pruner.masks
    >>> small, report = remove_dead_neurons(pruner.bake(), masks, example_input=torch.randn(8, 1, 28, 28))
    >>> print(report.table())  # fc2 neurons whose 10 outgoing weights were all pruned are gone
    layer  before  after  no input  no output  dead kept
      fc1     300    300         0          0          0
      fc2     100     66         0         34          0
      fc3      10     10         0          0          0
    parameters: 266,610 -> 256,036 (-10,574)
    >>> small.fc2
    Linear(in_features=300, out_features=66, bias=True)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Iterator, Mapping

import torch
import torch.nn as nn
from torch import Tensor

from prunet.layers import is_prunable

__all__ = [
    "DeadNeurons",
    "LayerNeurons",
    "NeuronReport",
    "find_dead_neurons",
    "remove_dead_neurons",
]

# Modules that map each element independently: a neuron stays the same neuron
# and a constant stays a constant. All are parameter-free.
_ELEMENTWISE = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.Softplus,
)
# Identity in eval mode, which is the mode exactness is promised for.
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Per-channel spatial reductions.
_POOLS = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class DeadNeurons:
    """The dead neurons of one layer, as output indices of that layer.

    Attributes:
        no_input: neurons whose incoming weights are all pruned (a whole weight
            row, or a whole conv filter); they emit only their bias.
        no_output: neurons whose outgoing weights in ``next_layer`` are all
            pruned (a whole column, or all columns of the channel's block after
            a Flatten). Empty when the next layer is unknown: for the final layer
            (its outputs are the model's) and for a layer before a boundary.
        next_layer: the layer that consumes this one's outputs, or ``None`` when
            there is none or a boundary sits in between.
    """

    no_input: list[int]
    no_output: list[int]
    next_layer: str | None = None

    @property
    def dead(self) -> list[int]:
        """Neurons dead either way, sorted."""
        return sorted(set(self.no_input) | set(self.no_output))


@dataclass
class LayerNeurons:
    """One layer's row in a :class:`NeuronReport`.

    Attributes:
        name: the layer's module name, e.g. ``"fc1"``.
        before: neurons (output features / channels) in the input model.
        after: neurons in the shrunken model; ``before - after`` equals
            ``removed_no_input + removed_no_output``.
        removed_no_input: removed neurons that had no incoming weights (their
            constant output, if non-zero, was folded into the next layer's bias).
        removed_no_output: removed neurons that had incoming weights but no
            outgoing ones.
        dead_kept: neurons still dead in the shrunken model: the one kept so a
            layer is never emptied, constants that cannot be folded exactly
            (into a zero-padded conv), and dead neurons of layers next to a
            boundary or of the final layer.
    """

    name: str
    before: int
    after: int
    removed_no_input: int = 0
    removed_no_output: int = 0
    dead_kept: int = 0


@dataclass
class NeuronReport:
    """What :func:`remove_dead_neurons` did.

    Attributes:
        layers: one row per Linear / Conv layer, in forward order.
        params_before: parameters of the input model.
        params_after: parameters of the shrunken model.
        iterations: removal passes that changed something (cascades need more than one).
        boundaries: why some pairs of consecutive layers were left alone.
        masks: the masks sliced to the shrunken shapes (same keys as given), or
            ``None`` when no masks were given.
        max_abs_diff: largest absolute output difference between the input and
            the shrunken model on ``example_input`` (eval mode), or ``None``.
    """

    layers: list[LayerNeurons]
    params_before: int
    params_after: int
    iterations: int = 0
    boundaries: list[str] = field(default_factory=list)
    masks: dict[str, Tensor] | None = None
    max_abs_diff: float | None = None

    @property
    def params_removed(self) -> int:
        return self.params_before - self.params_after

    def rows(self) -> list[dict]:
        """One dict per layer, ready for a table or a CSV writer."""
        return [vars(row).copy() for row in self.layers]

    def table(self) -> str:
        """A plain-text table of :meth:`rows` plus the parameter totals."""
        header = ("layer", "before", "after", "no input", "no output", "dead kept")
        body = [
            (r.name, r.before, r.after, r.removed_no_input, r.removed_no_output, r.dead_kept) for r in self.layers
        ]
        widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
        lines = ["  ".join(str(x).rjust(w) for x, w in zip(line, widths)) for line in [header, *body]]
        lines.append(f"parameters: {self.params_before:,} -> {self.params_after:,} (-{self.params_removed:,})")
        lines += [f"boundary: {note}" for note in self.boundaries]
        return "\n".join(lines)


# --------------------------------------------------------------------------- structure


@dataclass(frozen=True)
class _Link:
    """Two consecutive neuron layers whose shared dimension can be shrunk.

    Attributes:
        src: the layer whose outputs (neurons) may be removed.
        dst: the layer whose inputs are ``src``'s outputs.
        between: names of the modules in between, in forward order.
        spatial: inputs of ``dst`` per ``src`` neuron: ``H * W`` for a conv
            followed by a Flatten, else 1. It does not change as layers shrink.
        constant_ok: a neuron of ``src`` emitting a constant reaches ``dst`` as a
            constant, so its contribution to ``dst`` is a constant bias. False
            when a zero-padded conv or a zero-padded average pool sees the
            channel's borders differently from its interior.
    """

    src: str
    dst: str
    between: tuple[str, ...]
    spatial: int
    constant_ok: bool


@dataclass(frozen=True)
class _Plan:
    layers: tuple[str, ...]  # every Linear / Conv layer, in forward order
    links: tuple[_Link, ...]  # in forward order
    boundaries: tuple[str, ...]


def _in_forward_order(module: nn.Sequential, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """The steps of a Sequential in the order data flows through them, nested Sequentials flattened.

    Not a layer walker (``prunet.layers.find_layers`` is the one): it yields every
    step, layers and what lies between them, because the steps in between decide
    whether two layers can be shrunk together.
    """
    for name, child in module.named_children():
        full = f"{prefix}.{name}" if prefix else name
        if isinstance(child, nn.Sequential):
            yield from _in_forward_order(child, full)
        else:
            yield full, child


def _width(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _zero_padded(conv: nn.Module) -> bool:
    """Whether the conv pads its input with zeros (so a constant channel is not constant at borders)."""
    if conv.padding_mode != "zeros":
        return False  # reflect / replicate / circular padding of a constant is that constant
    if isinstance(conv.padding, str):
        return conv.padding == "same" and any(k > 1 for k in conv.kernel_size)
    return any(p > 0 for p in conv.padding)


def _pool_keeps_constant(pool: nn.Module) -> bool:
    """Whether the pool maps a constant channel to the same constant everywhere."""
    if isinstance(pool, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
        padding = pool.padding if isinstance(pool.padding, tuple) else (pool.padding,)
        if any(p > 0 for p in padding) and pool.count_include_pad:
            return False  # border windows average in padded zeros
        if getattr(pool, "divisor_override", None) is not None:
            return False
    return True  # max pools pad with -inf; adaptive pools do not pad


def _check_link(
    src_name: str, src: nn.Module, dst_name: str, dst: nn.Module, between: list[tuple[str, nn.Module]]
) -> _Link | str:
    """A :class:`_Link` when ``src``'s neurons can be removed from ``dst``'s inputs, else every reason why not."""
    reasons = []
    for name, layer in ((src_name, src), (dst_name, dst)):
        if isinstance(layer, _CONVS) and layer.groups > 1:
            reasons.append(f"grouped convolution {name!r} (groups={layer.groups}) ties channels into groups")
    channels = _width(src)
    flattened = False
    constant_ok = True
    for name, module in between:
        kind = type(module).__name__
        if isinstance(module, _ELEMENTWISE + _DROPOUT):
            continue
        if flattened:
            reasons.append(f"{kind} {name!r} after Flatten is not elementwise")
        elif isinstance(module, _BATCHNORM):
            if module.num_features != channels:
                reasons.append(f"{kind} {name!r} has {module.num_features} features, {src_name} has {channels}")
        elif isinstance(module, _POOLS) and not isinstance(src, nn.Linear):
            constant_ok = constant_ok and _pool_keeps_constant(module)
        elif isinstance(module, nn.Flatten) and not isinstance(src, nn.Linear):
            flattened = True
            if (module.start_dim, module.end_dim) != (1, -1):
                reasons.append(f"Flatten {name!r} must flatten dims 1..-1")
        else:
            reasons.append(f"{kind} {name!r} is not elementwise or per-channel")

    spatial = 1
    if isinstance(dst, nn.Linear):
        if isinstance(src, _CONVS) and not flattened:
            reasons.append("a Linear layer after a conv needs a Flatten in between")
        elif dst.in_features % channels:
            reasons.append(f"{dst.in_features} inputs of {dst_name} are not a multiple of {channels} neurons")
        else:
            spatial = dst.in_features // channels
    else:
        if isinstance(src, nn.Linear) or flattened:
            reasons.append("a conv after a Linear layer or a Flatten")
        elif dst.in_channels != channels:
            reasons.append(f"{dst_name} has {dst.in_channels} input channels, {src_name} {channels} outputs")
        constant_ok = constant_ok and not _zero_padded(dst)
    if reasons:
        return f"{src_name} -> {dst_name}: " + "; ".join(reasons)
    return _Link(src_name, dst_name, tuple(name for name, _ in between), spatial, constant_ok)


def _plan(model: nn.Module) -> _Plan:
    """Find the layers of a Sequential model and which consecutive pairs can be shrunk."""
    if not isinstance(model, nn.Sequential):
        raise ValueError(
            f"neuron removal needs an nn.Sequential model, whose order states which layer feeds which; "
            f"got {type(model).__name__}. Express the model as an nn.Sequential (nested ones are fine)."
        )
    layers: list[str] = []
    links: list[_Link] = []
    boundaries: list[str] = []
    previous: tuple[str, nn.Module] | None = None
    between: list[tuple[str, nn.Module]] = []
    for name, module in _in_forward_order(model):
        if not is_prunable(module):
            between.append((name, module))
            continue
        layers.append(name)
        if previous is not None:
            link = _check_link(*previous, name, module, between)
            (links if isinstance(link, _Link) else boundaries).append(link)
        previous, between = (name, module), []
    return _Plan(tuple(layers), tuple(links), tuple(boundaries))


# --------------------------------------------------------------------------- masks


def _check_masks(model: nn.Module, masks: Mapping[str, Tensor] | None) -> None:
    """Masks must name parameters, match their shapes, and already be baked into them."""
    if masks is None:
        return
    params = dict(model.named_parameters())
    for key, mask in masks.items():
        if key not in params:
            raise ValueError(f"mask {key!r} names no parameter of the model")
        if mask.shape != params[key].shape:
            raise ValueError(f"mask {key!r} has shape {tuple(mask.shape)}, the parameter {tuple(params[key].shape)}")
        if (params[key].detach()[mask.to(params[key].device) == 0] != 0).any():
            raise ValueError(
                f"parameter {key!r} is non-zero where its mask is 0; bake the masks into the weights first"
            )


def _pruned(model: nn.Module, name: str, masks: Mapping[str, Tensor] | None) -> Tensor:
    """Boolean tensor, True where the parameter ``name`` is pruned (mask 0 if masked, else weight 0)."""
    if masks is not None and name in masks:
        return masks[name] == 0
    return model.get_parameter(name).detach() == 0


# --------------------------------------------------------------------------- finding


def _find(model: nn.Module, plan: _Plan, masks: Mapping[str, Tensor] | None) -> dict[str, DeadNeurons]:
    links = {link.src: link for link in plan.links}
    found = {}
    for name in plan.layers:
        # weight: (out, in) or (out, in / groups, *kernel)
        rows = _pruned(model, f"{name}.weight", masks).flatten(1).all(1)  # (out,)
        no_input = rows.nonzero().flatten().tolist()
        no_output: list[int] = []
        link = links.get(name)
        if link is not None:
            channels = _width(model.get_submodule(name))
            # dst weight (out, C * spatial) or (out, C, *kernel) -> (C, spatial * out * kernel):
            # everything leaving channel c, contiguous because Flatten is channel-major.
            cols = _pruned(model, f"{link.dst}.weight", masks).transpose(0, 1).reshape(channels, -1).all(1)
            no_output = cols.nonzero().flatten().tolist()
        found[name] = DeadNeurons(no_input, no_output, link.dst if link else None)
    return found


def find_dead_neurons(model: nn.Module, masks: Mapping[str, Tensor] | None = None) -> dict[str, DeadNeurons]:
    """Neurons of each Linear / Conv layer with no incoming or no outgoing weights.

    Args:
        model: an ``nn.Sequential`` (nested Sequentials are flattened in forward order).
        masks: optional ``{"fc1.weight": mask}`` with 1 = kept, 0 = pruned. A
            parameter with a mask is pruned where its mask is 0; one without is
            pruned where its value is exactly 0. Masks must be baked (the weight
            is 0 wherever the mask is).

    Returns:
        ``{layer name: DeadNeurons}`` for every Linear / Conv layer in forward
        order. ``no_output`` is computed only where the next layer is known
        (see :class:`DeadNeurons`).

    Raises:
        ValueError: for a model that is not an ``nn.Sequential``, or masks that
            name unknown parameters, have the wrong shape or are not baked.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> with torch.no_grad():
        ...     model[0].weight[1] = 0     # neuron 1 of layer "0" has no inputs left
        ...     model[2].weight[:, 2] = 0  # neuron 2 has no outputs left
        >>> dead = find_dead_neurons(model)
        >>> dead["0"].no_input, dead["0"].no_output
        ([1], [2])
    """
    plan = _plan(model)
    _check_masks(model, masks)
    return _find(model, plan, masks)


# --------------------------------------------------------------------------- removing


def _constants(model: nn.Module, link: _Link) -> Tensor:
    """What each ``src`` neuron emits into ``dst`` if it had no incoming weights (float64, (C,)).

    Such a neuron outputs its bias everywhere; the modules in between map that
    constant to another one per channel (eval-mode semantics).
    """
    src = model.get_submodule(link.src)
    bias = src.bias
    if bias is not None:
        v = bias.detach().double().clone()
    else:
        v = torch.zeros(_width(src), dtype=torch.float64, device=src.weight.device)
    for name in link.between:
        module = model.get_submodule(name)
        if isinstance(module, _ELEMENTWISE):
            v = module(v)
        elif isinstance(module, _BATCHNORM):
            if module.running_mean is not None:
                v = (v - module.running_mean.double()) / torch.sqrt(module.running_var.double() + module.eps)
            else:
                v = torch.zeros_like(v)  # batch statistics of a constant: mean = v, variance 0
            if module.affine:
                v = v * module.weight.detach().double() + module.bias.detach().double()
        # Dropout (eval), pools of a constant and Flatten leave the value as it is.
    return v


def _removable(model: nn.Module, link: _Link, dead: DeadNeurons) -> tuple[list[int], list[int]]:
    """Which neurons of ``link.src`` to remove now: ``(all removed, those with no input)``."""
    values = _constants(model, link)
    # A constant reaches dst exactly only along a constant-preserving path; a zero is zero anywhere.
    foldable = {j for j in dead.no_input if link.constant_ok or values[j] == 0}
    remove = sorted(foldable | set(dead.no_output))
    if len(remove) == _width(model.get_submodule(link.src)):
        remove = remove[1:]  # keep one neuron so the layer still exists; it is dead but harmless
    return remove, [j for j in remove if j in dead.no_input]


def _replace(module: nn.Module, attr: str, value: Tensor) -> None:
    """Swap a parameter or buffer for a resized one (a new tensor: the input model shares nothing)."""
    old = getattr(module, attr)
    if isinstance(old, nn.Parameter):
        setattr(module, attr, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))
    else:
        setattr(module, attr, value.contiguous())


def _slice_param(
    model: nn.Module, module_name: str, attr: str, index: Tensor, dim: int, masks: dict[str, Tensor] | None
) -> None:
    """``param = param.index_select(dim, index)`` for a module's parameter / buffer and its mask."""
    module = model.get_submodule(module_name)
    if getattr(module, attr, None) is None:
        return
    _replace(module, attr, getattr(module, attr).detach().index_select(dim, index))
    key = f"{module_name}.{attr}"
    if masks is not None and key in masks:
        masks[key] = masks[key].index_select(dim, index.to(masks[key].device))


def _shrink_link(
    model: nn.Module, link: _Link, remove: list[int], no_input: list[int], masks: dict[str, Tensor] | None
) -> None:
    """Remove neurons ``remove`` of ``link.src`` (rows there, columns of ``link.dst``), folding constants first."""
    src, dst = model.get_submodule(link.src), model.get_submodule(link.dst)
    channels = _width(src)

    if no_input:
        values = _constants(model, link)
        weight = dst.weight.detach().double()
        # dst weight (out, C * spatial) or (out, C, *kernel) -> (C, out): what a constant 1 on
        # channel c adds to each output, summed over its block of features or its kernel.
        per_channel = weight.transpose(0, 1).reshape(channels, link.spatial, weight.shape[0], -1).sum((1, 3))
        fold = values[no_input] @ per_channel[no_input]  # (out,)
        if (fold != 0).any():
            if dst.bias is None:
                dst.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=dst.weight.dtype, device=dst.weight.device))
            _replace(dst, "bias", dst.bias.detach() + fold.to(dst.bias.dtype))
            key = f"{link.dst}.bias"
            if masks is not None and key in masks:
                # The bias now carries the folded constant; a pruned entry must come back or it is lost.
                masks[key] = masks[key].masked_fill((fold != 0).to(masks[key].device), 1)

    removed = set(remove)
    keep = torch.tensor([c for c in range(channels) if c not in removed], dtype=torch.long, device=src.weight.device)
    # dst inputs kept: each kept channel's block of `spatial` flattened features, channel-major.
    columns = (keep[:, None] * link.spatial + torch.arange(link.spatial, device=keep.device)).flatten()

    _slice_param(model, link.src, "weight", keep, 0, masks)  # (out, ...) -> (kept, ...)
    _slice_param(model, link.src, "bias", keep, 0, masks)
    for name in link.between:
        if isinstance(model.get_submodule(name), _BATCHNORM):
            for attr in ("weight", "bias", "running_mean", "running_var"):
                _slice_param(model, name, attr, keep, 0, masks)
            model.get_submodule(name).num_features = len(keep)
    _slice_param(model, link.dst, "weight", columns, 1, masks)  # (out, in, ...) -> (out, kept inputs, ...)

    if isinstance(src, nn.Linear):
        src.out_features = len(keep)
    else:
        src.out_channels = len(keep)
    if isinstance(dst, nn.Linear):
        dst.in_features = len(columns)
    else:
        dst.in_channels = len(keep)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def _max_abs_diff(a: nn.Module, b: nn.Module, example_input: Tensor) -> float:
    """Largest output difference of two models in eval mode; their modes are restored."""
    modes = {m: m.training for m in (*a.modules(), *b.modules())}
    a.eval()
    b.eval()
    try:
        return (a(example_input) - b(example_input)).abs().max().item()
    finally:
        for module, training in modes.items():
            module.training = training


def remove_dead_neurons(
    model: nn.Module,
    masks: Mapping[str, Tensor] | None = None,
    example_input: Tensor | None = None,
) -> tuple[nn.Module, NeuronReport]:
    """Physically remove dead neurons, repeating until none can be removed.

    Works on a copy: the input model and masks are not changed. Removed neurons
    disappear from their layer's weight rows and bias, from any BatchNorm in
    between, and from the next layer's weight columns. A removed neuron with no
    incoming weights has its constant output folded into the next layer's bias
    (one is created if needed), so the shrunken model computes the same outputs
    in eval mode. Never removed: the final layer's outputs, the last neuron of a
    layer, neurons next to a boundary (see the module docstring), and constant
    neurons feeding a zero-padded conv (whose borders would see the constant
    differently), unless the constant is 0.

    Args:
        model: an ``nn.Sequential`` whose pruned weights are exactly zero.
        masks: optional ``{"fc1.weight": mask}`` (1 kept, 0 pruned), baked into
            the weights; when given, a masked parameter is pruned where the mask
            is 0. The shrunken masks are returned in ``report.masks``. If a
            constant is folded into a bias entry whose mask is 0, that entry's
            mask becomes 1: the bias is needed now.
        example_input: optional batch; if given, both models are run on it in
            eval mode and the largest output difference is recorded in
            ``report.max_abs_diff``.

    Returns:
        ``(new_model, report)``: the shrunken deep copy and a :class:`NeuronReport`.

    Raises:
        ValueError: for a model that is not an ``nn.Sequential``, or bad masks.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> with torch.no_grad():
        ...     model[0].weight[1] = 0     # neuron 1: no inputs, its constant output is folded
        ...     model[2].weight[:, 2] = 0  # neuron 2: no outputs
        >>> small, report = remove_dead_neurons(model, example_input=torch.randn(5, 4))
        >>> small[0], small[2]
        (Linear(in_features=4, out_features=1, bias=True), Linear(in_features=1, out_features=2, bias=True))
        >>> report.params_removed, report.max_abs_diff < 1e-6
        (14, True)
    """
    plan = _plan(model)
    _check_masks(model, masks)
    new = copy.deepcopy(model)
    new_masks = {key: mask.clone() for key, mask in masks.items()} if masks is not None else None
    rows = {name: LayerNeurons(name, _width(new.get_submodule(name)), 0) for name in plan.layers}

    iterations = 0
    while True:
        dead = _find(new, plan, new_masks)
        # Decide every link's removals first, then apply them in forward order. Rows of a
        # layer and its columns are different dimensions, so the decisions stay valid.
        removals = {link.src: _removable(new, link, dead[link.src]) for link in plan.links}
        if not any(remove for remove, _ in removals.values()):
            break
        iterations += 1
        for link in plan.links:
            remove, no_input = removals[link.src]
            if remove:
                _shrink_link(new, link, remove, no_input, new_masks)
                rows[link.src].removed_no_input += len(no_input)
                rows[link.src].removed_no_output += len(remove) - len(no_input)

    final = _find(new, plan, new_masks)
    for name, row in rows.items():
        row.after = _width(new.get_submodule(name))
        row.dead_kept = len(final[name].dead)

    report = NeuronReport(
        layers=list(rows.values()),
        params_before=_count(model),
        params_after=_count(new),
        iterations=iterations,
        boundaries=list(plan.boundaries),
        masks=new_masks,
        max_abs_diff=_max_abs_diff(model, new, example_input) if example_input is not None else None,
    )
    return new, report
