"""The one vocabulary for layers: which are prunable, how a recipe names them, one row per layer.

Everything in prunet that speaks of layers goes through this module:

* :data:`PRUNABLE_TYPES` and :func:`layer_kind`: Linear and Conv layers, in the
  groups ``fc`` and ``conv``;
* :func:`find_layers`: the prunable parameters of any ``nn.Module``, in
  ``named_modules`` order (the order of execution for the registry models and
  most feed-forward networks);
* :func:`unprunable_layers`: the layers of those types that :func:`find_layers`
  cannot take, their weight not a parameter of their own (weight norm, for one);
* :func:`matches`, :func:`resolve`, :func:`select`: how a layer name, a parameter
  name, a group (``fc``, ``conv``, ``all``) or a glob names layers, with one
  error for a name that names none (:class:`LayerNameError`);
* :class:`LayerRow`, :func:`totals`, :func:`format_table`: one row per layer
  (weights, kept and, where measured, the paper's FLOP and Act% columns), the
  whole-network totals and compression, and one formatter for the console and
  for Markdown.

Example:
    >>> from prunet.models import create_model
    >>> model = create_model("lenet_300_100")
    >>> [layer.layer for layer in select(find_layers(model), ["fc?"])]
    ['fc1', 'fc2', 'fc3']
    >>> print(format_table(rows_of(find_layers(model))))
    Layer  Weights  Weights%            Kept
    fc1    235,200   100.00%         235,200
    fc2     30,000   100.00%          30,000
    fc3      1,000   100.00%           1,000
    Total  266,200   100.00%  266,200 (1.0x)
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.utils.prune as torch_prune

from prunet import masks as M

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""Module types whose ``weight`` is pruned by default (biases are not, as in the paper).

Beside them, by default: Hugging Face's ``Conv1D`` (GPT-2's linear layers, recognised by
duck type) in ``fc`` and ``nn.MultiheadAttention``'s in-projections in ``attn``; on request
(``include=["embed"]`` or ``["all"]``): ``nn.Embedding`` and ``nn.EmbeddingBag`` weights.
"""

GROUPS: tuple[str, ...] = ("fc", "conv", "attn", "embed", "all")
"""Names that select layers by group rather than by name: ``fc`` (Linear, HF Conv1D),
``conv`` (Conv1d/2d/3d), ``attn`` (MultiheadAttention in-projections), ``embed``
(Embedding, opt-in), ``all`` (every one of these, embeddings included)."""

DEFAULT_GROUPS: tuple[str, ...] = ("fc", "conv", "attn")
"""The groups pruned when no ``include`` is given (embeddings are opt-in)."""

_ATTN_PARAMS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
_REGEX_CHARS = frozenset("^$\\()|+{}")

Setting = Union[float, Mapping[str, float]]
"""A per-layer setting: one number for every layer, or layer name / group / glob -> number."""


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is Hugging Face's ``Conv1D`` (a Linear whose weight is stored (in, out)).

    Recognised by duck type, so prunet needs no ``transformers`` import.
    """
    weight = module._parameters.get("weight")
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and weight is not None and weight.dim() == 2


def layer_kind(module: nn.Module) -> str:
    """The layer group a module belongs to: ``fc``, ``conv``, ``attn``, ``embed``, else its type's name."""
    if isinstance(module, nn.Linear) or is_hf_conv1d(module):
        return "fc"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, nn.MultiheadAttention):
        return "attn"
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return "embed"
    return type(module).__name__.lower()


def param_kind(module: nn.Module, attr: str, types: tuple[type[nn.Module], ...] = PRUNABLE_TYPES) -> str | None:
    """The group of ``module.<attr>`` when it is a weight prunet knows how to prune, else None.

    >>> param_kind(nn.MultiheadAttention(8, 2), "in_proj_weight"), param_kind(nn.Linear(2, 2), "bias")
    ('attn', None)
    """
    if attr == "weight" and (isinstance(module, types) or is_hf_conv1d(module)):
        return layer_kind(module)
    if isinstance(module, nn.MultiheadAttention) and attr in _ATTN_PARAMS:
        return "attn"
    if attr == "weight" and isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return "embed"
    return None


def is_prunable(module: nn.Module) -> bool:
    """Whether ``module`` is a layer whose ``weight`` is pruned by default (Linear, ConvNd, HF Conv1D)."""
    return isinstance(module, PRUNABLE_TYPES) or is_hf_conv1d(module)


@dataclass
class Layer:
    """One prunable parameter of a model, as recipes, tables and masks name it.

    Attributes:
        layer: the owning module's name, e.g. ``"fc1"`` (what tables and recipes name).
        param: the full parameter name, e.g. ``"fc1.weight"`` (its mask is ``fc1.weight_prunet_mask``).
        module: the owning module.
        attr: the attribute on the module, e.g. ``"weight"``.
        kind: the layer group (``fc``, ``conv``, ``attn``, ``embed``), or ``other`` for a
            parameter named by a glob that is none of these.
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
    def mask(self) -> torch.Tensor | None:
        """The live 0/1 mask buffer (the weight's dtype), or None when the parameter has none."""
        return M.get_mask(self.module, self.attr)

    def kept(self) -> int:
        """Surviving weights: the mask's ones, or every weight when there is no mask."""
        mask = self.mask
        return self.weight.numel() if mask is None else int(mask.count_nonzero())


class PatternError(ValueError):
    """An include/exclude pattern that is a regular expression, or that names nothing."""


def check_patterns(patterns: Iterable[str] | None, field: str = "include") -> list[str] | None:
    """``patterns`` as a list, refusing regular expressions with a hint (they take globs and groups).

    Raises:
        PatternError: a pattern with a character only a regex uses (``^ $ \\ ( ) | + { }``).
    """
    if patterns is None:
        return None
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise PatternError(f"{field} takes layer names, globs or groups as strings, got {pattern!r}")
        if _REGEX_CHARS & set(pattern):
            raise PatternError(
                f"{field} pattern {pattern!r} looks like a regular expression; {field} takes globs on layer or "
                f"parameter names (fc*, encoder.*.weight, fc1.bias) and groups ({', '.join(GROUPS)})")
    return patterns


def _named(pattern: str, name: str, param: str, kind: str | None) -> bool:
    """Whether ``pattern`` (a group or a glob) names the parameter ``param`` of the module ``name``.

    A group or a layer name takes the layer's prunable weights only; a glob on the full
    parameter name takes any parameter (``fc1.bias``, ``pos_embedding``).
    """
    if pattern in GROUPS:
        return kind is not None and (pattern == "all" or pattern == kind)
    if fnmatch.fnmatchcase(param, pattern):
        return True
    return kind is not None and fnmatch.fnmatchcase(name, pattern)


def _candidates(model: nn.Module, types: tuple[type[nn.Module], ...]):
    """``(layer name, module, attr, full name, kind or None, param)`` per distinct floating parameter."""
    seen = set()
    for name, module in model.named_modules():
        for attr, param in module.named_parameters(recurse=False):
            if id(param) in seen or not param.is_floating_point():
                continue  # a parameter shared by two modules is one layer, with one mask: its first owner's
            seen.add(id(param))
            full = f"{name}.{attr}" if name else attr
            yield name, module, attr, full, param_kind(module, attr, types), param


def find_layers(
    model: nn.Module,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    types: tuple[type[nn.Module], ...] = PRUNABLE_TYPES,
    strict: bool = False,
) -> list[Layer]:
    """The prunable parameters of ``model``, in ``named_modules`` order.

    Args:
        model: any ``nn.Module``.
        include: what to take: groups (``fc``, ``conv``, ``attn``, ``embed``, ``all``), layer
            names or globs on layer or parameter names (``encoder.*``, ``*.in_proj_weight``);
            default :data:`DEFAULT_GROUPS`.
        exclude: the same kinds of names, left out (after include).
        types: the module types whose ``weight`` is in ``fc``/``conv``.
        strict: raise :class:`PatternError` for an include or exclude glob that names no parameter.

    Returns:
        One :class:`Layer` per parameter; a parameter that two modules share appears
        once, under the first module that holds it.

    Raises:
        PatternError: a pattern that is a regular expression (they take globs).
    """
    inc = check_patterns(include, "include")
    exc = check_patterns(exclude, "exclude") or []
    inc = list(DEFAULT_GROUPS) if inc is None else inc
    used, found = set(), []
    for name, module, attr, full, kind, _ in _candidates(model, types):
        taken = {p for p in inc if _named(p, name, full, kind)}
        left = {p for p in exc if _named(p, name, full, kind)}
        used |= taken | left
        if taken and not left:
            found.append(Layer(name, full, module, attr, kind or "other"))
    unused = [p for p in inc + exc if p not in used and p not in GROUPS]
    if strict and unused:
        raise PatternError(f"{unused[0]!r} names no parameter of {type(model).__name__} (globs on layer or "
                           f"parameter names, or a group: {', '.join(GROUPS)})")
    return found


@dataclass(frozen=True)
class Skipped:
    """Matrix parameters left unpruned for one reason: what they are, their weights, their names, the way in."""

    what: str
    weights: int
    names: tuple[str, ...]
    hint: str

    def __str__(self) -> str:
        names = ", ".join(self.names[:3]) + (f", ... {len(self.names) - 3} more" if len(self.names) > 3 else "")
        return f"{self.what} {self.weights:,} ({names}; {self.hint})"


_SKIP_REASONS = {  # kind -> (what, how to prune them)
    "embed": ("embeddings", "opt-in: include embed or all"),
    None: ("not a known layer type", "name them in include to prune them"),
}


@dataclass(frozen=True)
class Coverage:
    """What a set of layers covers of a model's matrix weights (every floating parameter of 2+ dimensions).

    Attributes:
        pruned: weights in the pruned layers.
        total: weights in all matrix parameters of the model (and any 1-D parameter pruned).
        skipped: the matrix parameters not pruned, one :class:`Skipped` per reason.
    """

    pruned: int
    total: int
    skipped: tuple[Skipped, ...]

    @property
    def line(self) -> str:
        """One line: ``prunes 16 of 56 matrix weights (28.6%); skipped: embeddings 40 (0.weight; opt-in: ...)``."""
        share = f" ({100 * self.pruned / self.total:.1f}%)" if self.total else ""
        text = f"prunes {self.pruned:,} of {self.total:,} matrix weights{share}"
        return text + ("; skipped: " + "; ".join(map(str, self.skipped)) if self.skipped else "")

    def __str__(self) -> str:
        return self.line


def coverage(model: nn.Module, layers: Iterable[Layer], types: tuple[type[nn.Module], ...] = PRUNABLE_TYPES) -> Coverage:
    """How much of ``model``'s matrix weights ``layers`` prune, and what is left out and why.

    Example:
        >>> model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4))
        >>> print(coverage(model, find_layers(model)))
        prunes 16 of 56 matrix weights (28.6%); skipped: embeddings 40 (0.weight; opt-in: include embed or all)
    """
    taken = {layer.param for layer in layers}
    left: dict[str | None, list[tuple[str, int]]] = {}
    pruned = total = 0
    for _, _, _, full, kind, param in _candidates(model, types):
        if param.dim() < 2 and full not in taken:
            continue
        total += param.numel()
        if full in taken:
            pruned += param.numel()
        else:
            reason = kind if kind in _SKIP_REASONS else ("left out" if kind else None)
            left.setdefault(reason, []).append((full, param.numel()))
    skipped = []
    for reason, items in left.items():
        what, hint = _SKIP_REASONS.get(reason, ("left out", "by include/exclude"))
        skipped.append(Skipped(what, sum(n for _, n in items), tuple(n for n, _ in items), hint))
    return Coverage(pruned, total, tuple(skipped))


# How a layer computes a weight it does not hold, and what folds it into a plain parameter (same outputs).
_FOLD_HOOKS = {"WeightNorm": "torch.nn.utils.remove_weight_norm(layer)",
               "SpectralNorm": "torch.nn.utils.remove_spectral_norm(layer)"}


def unprunable_layers(model: nn.Module, types: tuple[type[nn.Module], ...] = PRUNABLE_TYPES) -> list[tuple[str, str]]:
    """The layers of ``types`` whose ``weight`` is not a parameter of their own, which :func:`find_layers` skips.

    A mask lives beside a parameter, so a weight computed at each call cannot carry one: a
    parametrization's (``torch.nn.utils.parametrizations.weight_norm``, ``spectral_norm``), the older
    hooks' (``torch.nn.utils.weight_norm`` from ``weight_g`` and ``weight_v``), or a plain tensor
    assigned in ``forward``.

    Returns:
        ``(layer name, how its weight is held and what makes it a parameter)`` per such layer.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        >>> _ = torch.nn.utils.parametrizations.weight_norm(model[1])
        >>> unprunable_layers(model)[0][0]
        '1'
    """
    found = []
    for name, module in model.named_modules():
        held = isinstance(module, types) and not isinstance(module._parameters.get("weight"), nn.Parameter)
        if held or torch_pruned(module):
            found.append((name, _how_held(module)))
    return found


def torch_pruned(module: nn.Module) -> bool:
    """Whether ``torch.nn.utils.prune`` reparametrizes ``module`` (its weight computed from ``weight_orig``)."""
    return any(isinstance(h, torch_prune.BasePruningMethod) for h in module._forward_pre_hooks.values())


def _how_held(module: nn.Module) -> str:
    """How ``module`` holds a weight that is not its parameter, and what makes it one."""
    parametrizations = getattr(module, "parametrizations", None)
    if parametrizations is not None and "weight" in parametrizations:
        kinds = ", ".join(type(p).__name__.lstrip("_") for p in parametrizations["weight"])
        return (f"computed by a parametrization ({kinds}); fold it into a plain weight (same outputs) with "
                f"torch.nn.utils.parametrize.remove_parametrizations(layer, 'weight')")
    if torch_pruned(module):
        name = next(h._tensor_name for h in module._forward_pre_hooks.values()
                    if isinstance(h, torch_prune.BasePruningMethod))
        return (f"pruned by torch.nn.utils.prune ({name} = {name}_orig * its {name}_mask); make that permanent "
                f"with torch.nn.utils.prune.remove(layer, {name!r}) or take its masks over with "
                f"Pruner.from_torch_prune(model)")
    hooks = [type(h).__name__ for h in module._forward_pre_hooks.values()]
    hook = next((h for h in hooks if h in _FOLD_HOOKS), None)
    if hook is not None:
        sources = ", ".join(n for n, _ in module.named_parameters(recurse=False) if n.startswith("weight"))
        return f"computed from {sources} by a {hook} hook; fold it in (same outputs) with {_FOLD_HOOKS[hook]}"
    plain = isinstance(module.__dict__.get("weight"), torch.Tensor)
    return (f"{'a plain tensor' if plain else 'set elsewhere (in forward?)'}, not an nn.Parameter; hold it as one "
            f"to prune it, or compute this layer with torch.nn.functional in a module of your own to leave it "
            f"unpruned")


# --------------------------------------------------------------------------- naming layers


class LayerNameError(ValueError):
    """A layer name, group or glob that names no layer of the model; the message lists the layers."""


def matches(layer: Layer, key: str) -> bool:
    """Whether a recipe key names this layer: layer or parameter name, group, ``all``, or a glob.

    The rule :func:`find_layers` selects by (one definition for both).
    """
    return _named(key, layer.layer, layer.param, layer.kind)


def resolve(setting: Setting | None, layer: Layer) -> float | None:
    """The value of a per-layer setting for one layer (None: the layer is not named).

    A scalar applies to every layer. In a mapping, an exact layer or parameter
    name wins over a group (``fc``, ``conv``), which wins over a glob or ``all``.

    >>> resolve({"fc": 0.5, "fc3": 0.3}, Layer("fc3", "fc3.weight", nn.Linear(1, 1), "weight", "fc"))
    0.3
    """
    if setting is None:
        return None
    if not isinstance(setting, Mapping):
        return float(setting)
    for key in (layer.layer, layer.param):
        if key in setting:
            return float(setting[key])
    if layer.kind in setting:
        return float(setting[layer.kind])
    for key, value in setting.items():
        if matches(layer, key):
            return float(value)
    return None


def check_names(layers: Sequence[Layer], keys: Iterable[str], model: str = "the model") -> None:
    """Raise :class:`LayerNameError` for the first key that names none of ``layers``.

    Args:
        layers: the model's prunable layers (:func:`find_layers`).
        keys: layer names, parameter names, groups or globs.
        model: how the message names the model, e.g. ``"lenet_300_100"``.
    """
    for key in keys:
        if not any(matches(layer, key) for layer in layers):
            names = ", ".join(dict.fromkeys(layer.layer for layer in layers)) or "none"
            raise LayerNameError(f"{key!r} names no layer of {model}; layers: {names} (groups: {', '.join(GROUPS)})")


def select(layers: Sequence[Layer], keys: Iterable[str] | None, model: str = "the model") -> list[Layer]:
    """The layers named by ``keys`` (names, groups, globs), in model order; all when ``keys`` is None.

    Raises:
        LayerNameError: a key names no layer.
    """
    if keys is None:
        return list(layers)
    keys = [keys] if isinstance(keys, str) else list(keys)
    check_names(layers, keys, model)
    return [layer for layer in layers if any(matches(layer, k) for k in keys)]


# --------------------------------------------------------------------------- rows and totals


@dataclass(frozen=True)
class LayerRow:
    """One layer's row: what remains of it and, where measured, what it costs (the paper's Tables 1-5).

    Attributes:
        layer: module name, e.g. ``"fc1"`` or ``"features.0"``.
        kind: ``"fc"`` or ``"conv"``.
        shape: weight shape, e.g. ``(300, 784)``.
        weights: number of weights (bias excluded, as in the paper).
        kept: weights that survive pruning.
        flops: dense FLOPs for one example, a multiply-add counted as 2; None when not measured.
        act_frac: fraction of non-zero outputs as the next weight layer sees them
            (the paper's Act%); 1.0 for the last layer; None when not measured.
        flops_kept_frac: ``kept_frac`` times the previous layer's ``act_frac``
            (the paper's FLOP%); None when FLOPs were not measured.
    """

    layer: str
    kind: str
    shape: tuple[int, ...]
    weights: int
    kept: int
    flops: int | None = None
    act_frac: float | None = None
    flops_kept_frac: float | None = None

    @property
    def kept_frac(self) -> float:
        """``kept / weights`` (the paper's Weights%); 1.0 for a layer without weights."""
        return self.kept / self.weights if self.weights else 1.0

    @property
    def flops_kept(self) -> float | None:
        """FLOPs left after pruning: ``flops * flops_kept_frac``."""
        if self.flops is None or self.flops_kept_frac is None:
            return None
        return self.flops * self.flops_kept_frac

    def to_dict(self) -> dict[str, Any]:
        """The row as plain data (for JSON): the measured fields only, shape as a list."""
        data = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        data["shape"] = list(self.shape)
        return data


def rows_of(layers: Iterable[Layer]) -> list[LayerRow]:
    """One :class:`LayerRow` (weights and kept) per layer; kept counts the mask, or all weights without one."""
    return [LayerRow(layer.layer, layer.kind, tuple(layer.weight.shape), layer.weight.numel(), layer.kept())
            for layer in layers]


@dataclass(frozen=True)
class Totals:
    """Whole-network totals of a table.

    Attributes:
        weights, kept: summed over the rows.
        flops, flops_kept: summed where measured (0 when no row has FLOPs).
    """

    weights: int
    kept: int
    flops: int
    flops_kept: float

    @property
    def kept_frac(self) -> float:
        return self.kept / self.weights if self.weights else 0.0

    @property
    def compression(self) -> float:
        """``weights / kept``: how many times fewer weights; inf when nothing is kept."""
        return self.weights / self.kept if self.kept else math.inf

    @property
    def pruned_frac(self) -> float:
        """``1 - kept / weights``; 0 for no weights."""
        return 1.0 - self.kept_frac if self.weights else 0.0

    @property
    def flops_kept_frac(self) -> float:
        return self.flops_kept / self.flops if self.flops else 0.0

    def compression_or_none(self) -> float | None:
        """:attr:`compression`, None instead of inf (JSON has no infinity)."""
        return self.compression if self.kept else None


def totals(rows: Iterable[LayerRow]) -> Totals:
    """The totals of ``rows``: weights, kept, FLOPs and what remains of them."""
    rows = list(rows)
    return Totals(
        weights=sum(r.weights for r in rows),
        kept=sum(r.kept for r in rows),
        flops=sum(r.flops or 0 for r in rows),
        flops_kept=sum(r.flops_kept or 0.0 for r in rows),
    )


# --------------------------------------------------------------------------- formatting

_UNITS = [(10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K")]


def human_count(n: float) -> str:
    """A count as the paper prints it: ``235K``, ``3.7B``, ``1.45B``.

    Three significant digits (never finer than units), trailing zeros dropped,
    rounded half up; the unit is chosen after rounding, so 999,500 is ``1M``.

    Args:
        n: a non-negative count (floats allowed, e.g. FLOPs kept).

    Returns:
        The short string; numbers under 1000 print as integers (``500``).
    """
    if not math.isfinite(n) or n < 0:
        raise ValueError(f"human_count expects a finite non-negative number, got {n!r}")
    d = Decimal(n) if isinstance(n, int) else Decimal(repr(float(n)))
    if d == 0:
        return "0"
    quantum = Decimal(1).scaleb(max(d.adjusted() - 2, 0))  # 3 significant digits, at least units
    d = d.quantize(quantum, rounding=ROUND_HALF_UP)
    for factor, suffix in _UNITS:
        if d >= factor:
            return f"{(d / factor).normalize():f}{suffix}"
    return f"{d.normalize():f}"


def short_pct(frac: float | None) -> str:
    """``84%``; one decimal below 10% so that small fractions do not print as 0%; ``–`` for None."""
    if frac is None:
        return "–"
    pct = 100 * frac
    return f"{pct:.0f}%" if pct >= 10 or pct == 0 else f"{pct:.1f}%"


@dataclass(frozen=True)
class _Column:
    header: str
    cell: Callable[[LayerRow], str]
    total: Callable[[Totals], str]
    numeric: bool = True


def _columns(rows: Sequence[LayerRow], markdown: bool) -> list[_Column]:
    """The table's columns: the FLOP ones only when the rows have FLOPs; counts short in Markdown."""
    count = human_count if markdown else (lambda n: f"{n:,}")
    pct = short_pct if markdown else (lambda f: f"{100 * f:.2f}%")
    compression = "{:.1f}×" if markdown else "{:.1f}x"
    measured = any(r.flops is not None for r in rows)
    cols = [_Column("Layer", lambda r: r.layer, lambda t: "Total", numeric=False),
            _Column("Weights", lambda r: count(r.weights), lambda t: count(t.weights))]
    if measured:
        cols += [_Column("FLOP", lambda r: count(r.flops or 0), lambda t: count(t.flops)),
                 _Column("Act%", lambda r: short_pct(r.act_frac), lambda t: "")]
    cols.append(_Column("Weights%", lambda r: pct(r.kept_frac), lambda t: pct(t.kept_frac)))
    if measured:
        cols.append(_Column("FLOP%", lambda r: short_pct(r.flops_kept_frac), lambda t: short_pct(t.flops_kept_frac)))
    cols.append(_Column("Kept", lambda r: count(r.kept),
                        lambda t: f"{count(t.kept)} ({compression.format(t.compression)})"))
    return cols


def format_table(rows: Sequence[LayerRow], markdown: bool = False) -> str:
    """The per-layer table: Layer, Weights, [FLOP, Act%], Weights%, [FLOP%], Kept, and a Total row.

    The FLOP columns appear when the rows have FLOPs (:func:`prunet.analysis.tables.layer_table`).
    The Total row's Kept cell carries the compression, e.g. ``16,546 (16.1x)``.

    Args:
        rows: e.g. ``Pruner.summary()`` or ``layer_table(...)``.
        markdown: a Markdown pipe table with counts as the paper prints them
            (``235K``, ``8%``); otherwise aligned plain text with exact counts.

    Returns:
        The table; Markdown ends in a newline.
    """
    cols = _columns(rows, markdown)
    t = totals(rows)
    body = [[c.cell(r) for c in cols] for r in rows] + [[c.total(t) for c in cols]]
    header = [c.header for c in cols]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("--:" if c.numeric else ":--" for c in cols) + "|"]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return "\n".join(lines) + "\n"
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    return "\n".join(
        "  ".join(x.rjust(w) if c.numeric else x.ljust(w) for x, w, c in zip(line, widths, cols)).rstrip()
        for line in [header, *body]
    )
