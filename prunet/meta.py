"""The metadata a prunet file carries about its model: one schema for checkpoints and compact files.

A checkpoint (``prunet.checkpoint``) and a compact file (``prunet.sparse.compact``)
both hold a ``meta`` mapping, written by the run (``pipeline``) and by export; a
loader builds a model and allocates an example input from it. A file can be
damaged or crafted (its checksum can be recomputed by anyone), so every field is
checked here, by type and range, before anything is built:

============== ===============================================================================
field          rule
============== ===============================================================================
model          a non-empty string (a registry name, or a factory ``module:function``), or null
model_kwargs   a mapping of string keys; for a registry model its values are scalars (null,
               booleans, strings, finite numbers) with whole numbers in 0..1,000,000; for a
               factory any JSON (finite numbers, nested at most 16 deep)
input_shape    one example's shape: a list of 1 to 4 whole numbers >= 1, at most 2^24
               elements in all, or null
input_dtype    one example's element type: one of ``INPUT_DTYPES`` (``float32`` when absent;
               ``int64`` for a model of token ids)
recipe, phase, exported_from
               strings
shrunk         a boolean
split          a mapping: ``dataset`` a string, ``val_size`` a whole number >= 0,
               ``split_seed`` a whole number, ``kwargs`` a mapping
shared_bits    a mapping of tensor names to whole numbers in 1..16
============== ===============================================================================

Any other key is kept as it is (a user's own notes), with finite numbers. A
missing key is allowed: loaders say what they need when they need it.

Example:
    >>> validate_meta({"model": "lenet_300_100", "input_shape": [1, 28, 28]}, "final.safetensors")
    {'model': 'lenet_300_100', 'input_shape': [1, 28, 28]}
    >>> validate_meta({"input_shape": "abc"}, "final.safetensors")
    Traceback (most recent call last):
    ...
    ValueError: final.safetensors: meta.input_shape: 'abc' is not a list of 1 to 4 whole numbers in 1..16777216
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

from prunet.factory import is_factory

__all__ = ["INPUT_DTYPES", "MAX_INPUT_ELEMENTS", "MAX_SHARED_BITS", "check_int", "check_mapping", "check_str", "shown",
           "validate_meta"]

MAX_INPUT_DIMS = 4
MAX_INPUT_ELEMENTS = 2**24  # one example (load(sparse=True) allocates a batch of one)
MAX_INPUT_SIZE = MAX_INPUT_ELEMENTS  # one dimension (long 1-D examples, audio, are fine): the total bounds it
# A registry model's sizes (num_classes, in_features, in_channels): the recipe's own bound on
# num_classes (config.MAX_CLASSES); more would be a layer of gigabytes, built before the file's
# shapes are compared with it.
MAX_REGISTRY_INT = 1_000_000
MAX_DEPTH = 16  # JSON nesting in model_kwargs and other keys
MAX_SHARED_BITS = 16  # prunet.share: 1..16 bits per weight index
# What an example input may be made of: a file names one of these, never an arbitrary attribute of torch.
INPUT_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "uint8", "bool")


def shown(value: Any, width: int = 60) -> str:
    """``repr(value)`` cut to ``width`` characters: a message stays one short line whatever a file holds."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def check_int(value: Any, field: str, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` if it is a whole number (not a boolean, not a float) in ``lo..hi`` (a missing bound: none).

    Raises:
        ValueError: ``"<field>: <value> is not a whole number in lo..hi"``.
    """
    if isinstance(value, bool) or not isinstance(value, int) or (lo is not None and value < lo) or \
            (hi is not None and value > hi):
        if lo is not None and hi is not None:
            allowed = f" in {lo:,}..{hi:,}"
        else:
            allowed = f" >= {lo:,}" if lo is not None else f" <= {hi:,}" if hi is not None else ""
        raise ValueError(f"{field}: {shown(value)} is not a whole number{allowed}")
    return value


def _subfield(field: str, key: Any) -> str:
    """The name of ``field``'s entry ``key``: ``meta.model``, or ``meta['a b']`` for a key that is no identifier."""
    return f"{field}.{key}" if isinstance(key, str) and key.isidentifier() else f"{field}[{shown(key)}]"


def check_str(value: Any, field: str) -> str:
    """``value`` if it is a string."""
    if not isinstance(value, str):
        raise ValueError(f"{field}: {shown(value)} is not a string")
    return value


def check_mapping(value: Any, field: str) -> Mapping[str, Any]:
    """``value`` if it is a mapping with string keys (a JSON object)."""
    if not isinstance(value, Mapping):
        raise ValueError(f"{field}: {shown(value)} is not a mapping")
    for key in value:
        if not isinstance(key, str):
            raise ValueError(f"{field}: the key {shown(key)} is not a string")
    return value


def _json(value: Any, field: str, depth: int = 0) -> None:
    """JSON data with finite numbers, nested at most :data:`MAX_DEPTH` deep."""
    if depth > MAX_DEPTH:
        raise ValueError(f"{field}: nested more than {MAX_DEPTH} deep")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{field}: {shown(value)} is not a finite number")
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _json(v, f"{field}[{i}]", depth + 1)
    elif isinstance(value, Mapping):
        for k, v in check_mapping(value, field).items():
            _json(v, _subfield(field, k), depth + 1)
    elif value is not None and not isinstance(value, (bool, int, float, str)):
        raise ValueError(f"{field}: {shown(value)} is not JSON data")


def _model(value: Any, field: str) -> None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"{field}: {shown(value)} is not a model name (a non-empty string) or null")


def _model_kwargs(value: Any, field: str, registry: bool) -> None:
    for key, v in check_mapping(value, field).items():
        where = _subfield(field, key)
        if not registry:
            _json(v, where, 1)
        elif isinstance(v, int) and not isinstance(v, bool):
            check_int(v, where, 0, MAX_REGISTRY_INT)
        elif isinstance(v, float):
            _json(v, where)
        elif v is not None and not isinstance(v, (bool, str)):
            raise ValueError(f"{where}: {shown(v)} is not an argument of a registry model (a number, a string, "
                             "a boolean or null)")


def _check_input_shape(value: Any, field: str) -> None:
    if value is None:
        return
    problem = (f"{shown(value)} is not a list of 1 to {MAX_INPUT_DIMS} whole numbers in 1..{MAX_INPUT_SIZE}")
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_INPUT_DIMS:
        raise ValueError(f"{field}: {problem}")
    for size in value:
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_INPUT_SIZE:
            raise ValueError(f"{field}: {problem}")
    if math.prod(value) > MAX_INPUT_ELEMENTS:
        raise ValueError(f"{field}: {shown(value)} is {math.prod(value):,} elements an example, "
                         f"more than {MAX_INPUT_ELEMENTS:,}")


def _input_dtype(value: Any, field: str) -> None:
    if value is not None and value not in INPUT_DTYPES:
        raise ValueError(f"{field}: {shown(value)} is not one of {', '.join(INPUT_DTYPES)}")


def _split(value: Any, field: str) -> None:
    split = check_mapping(value, field)
    if "dataset" in split:
        check_str(split["dataset"], f"{field}.dataset")
    if "val_size" in split:
        check_int(split["val_size"], f"{field}.val_size", 0)
    if "split_seed" in split:
        check_int(split["split_seed"], f"{field}.split_seed")
    if "kwargs" in split:
        check_mapping(split["kwargs"], f"{field}.kwargs")
    _json(split, field)


def _shared_bits(value: Any, field: str) -> None:
    for name, bits in check_mapping(value, field).items():
        check_int(bits, f"{field}[{shown(name)}]", 1, MAX_SHARED_BITS)


def _bool(value: Any, field: str) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{field}: {shown(value)} is not true or false")


_FIELDS: dict[str, Callable[[Any, str], None]] = {
    "model": _model,
    "input_shape": _check_input_shape,
    "input_dtype": _input_dtype,
    "recipe": check_str,
    "phase": check_str,
    "exported_from": check_str,
    "shrunk": _bool,
    "split": _split,
    "shared_bits": _shared_bits,
}


def validate_meta(meta: Any, source: str) -> dict[str, Any]:
    """``meta`` checked against the schema above, before a model is built from it.

    Args:
        meta: a file's metadata, as read from its JSON.
        source: the file, for the message (e.g. ``"checkpoint runs/x/final.safetensors"``).

    Returns:
        ``meta`` as a new dict with the same contents.

    Raises:
        ValueError: one line, ``"<source>: meta.<field>: <what is wrong>"``; callers raise
            it again as their own error (``CheckpointError``, ``CompactFileError``).
    """
    try:
        meta = check_mapping(meta, "meta")
        for key, value in meta.items():
            field = _subfield("meta", key)
            if key in _FIELDS:
                _FIELDS[key](value, field)
            elif key == "model_kwargs":
                name = meta.get("model")
                _model_kwargs(value, field, registry=not (isinstance(name, str) and is_factory(name)))
            else:
                _json(value, field, 1)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    return dict(meta)
