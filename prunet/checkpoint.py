"""Checkpoints: safetensors weights (masks included) plus JSON metadata, written atomically.

A checkpoint holds the model's ``state_dict`` (with any ``*_prunet_mask`` buffers) and
enough metadata to rebuild the model from the registry: its name, keyword
arguments and, for a model whose layers were shrunk by neuron removal, the
shapes in the file itself. Nothing is unpickled on load.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from prunet.factory import Trust, check_trusted
from prunet.files import atomic_path
from prunet.masks import MASK_SUFFIX, from_torch_pruned_state, masked_params, upgrade_state
from prunet.meta import validate_meta
from prunet.models import create_model
from prunet.pruner import Pruner

_META_KEY = "prunet"
_CHECKSUM_KEY = "prunet_checksum"  # SHA-256 of the metadata and every tensor; checkpoints written before it have none


def checksum(tensors: dict[str, torch.Tensor], meta_json: str) -> str:
    """SHA-256 of ``meta_json`` and of every tensor's name, dtype, shape and bytes: a flipped bit is an error.

    Example:
        >>> checksum({"w": torch.zeros(2)}, "{}")[:15]
        'sha256:25387ddd'
    """
    digest = hashlib.sha256(meta_json.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(tensors[name].shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + digest.hexdigest()


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or does not fit the model."""


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Write ``model.state_dict()`` and ``meta`` to ``path`` atomically.

    The file is written under a temporary name in the same folder and renamed,
    so a crash never leaves a half-written checkpoint where a good one was.

    Args:
        path: destination, conventionally ``*.safetensors``.
        model: the model (masks are saved with it).
        meta: JSON-serialisable metadata; ``model`` (name) and ``model_kwargs`` let
            :func:`load_checkpoint` rebuild it.
    """
    path = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # Masks are 0/1 in the weight's dtype in memory (fast to multiply); store them as bool.
    state = {k: v.bool() if k.endswith(MASK_SUFFIX) else v for k, v in state.items()}
    with atomic_path(path) as tmp:
        raw = json.dumps(meta)
        save_file(own_storage(state), str(tmp), metadata={_META_KEY: raw, _CHECKSUM_KEY: checksum(state, raw)})
    return path


def own_storage(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with each one in memory of its own, as safetensors needs.

    A tied weight (one parameter under two names, ``proj.weight`` and ``proj2.weight``)
    is stored under both names; loading it back copies the same values into the one
    parameter twice, so the tie holds.
    """
    seen: set[int] = set()
    out = {}
    for name, t in tensors.items():
        key = t.untyped_storage().data_ptr() if t.numel() else None
        out[name] = t.clone() if key is not None and key in seen else t
        if key is not None:
            seen.add(key)
    return out


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load ``(state_dict, meta)`` from a checkpoint; a clear error for a bad file.

    Besides prunet's own files (safetensors), a ``torch.save``-d state dict is read (with
    ``weights_only=True``: no code runs), with empty metadata; one saved under
    ``torch.nn.utils.prune`` (``weight_orig``, ``weight_mask``) comes with its masks.
    """
    path = Path(path)
    if is_torch_file(path):
        return _read_torch(path), {}
    header = _header(path)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path} is unreadable or corrupt ({str(e).splitlines()[0]})") from None
    raw = header.get(_META_KEY, "{}")
    if _CHECKSUM_KEY in header and checksum(state, raw) != header[_CHECKSUM_KEY]:
        raise CheckpointError(f"checkpoint {path} is corrupt: its checksum does not match its contents")
    return upgrade_state(state), _checked_meta(raw, path)  # masks saved as *_mask before they were *_prunet_mask


def read_meta(path: str | Path) -> dict[str, Any]:
    """A checkpoint's metadata, checked, without reading its tensors (what it holds, not the model)."""
    path = Path(path)
    if is_torch_file(path):
        return {}
    return _checked_meta(_header(path).get(_META_KEY, "{}"), path)


def is_torch_file(path: Path) -> bool:
    """Whether ``path`` is a ``torch.save`` file: a zip archive, or the legacy format (a protocol-2 pickle
    of torch's magic number first; a safetensors file starts with its header's length, which these bytes
    would make over 40 GB)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head in (b"PK\x03\x04", b"\x80\x02\x8a\x0a")


def _read_torch(path: Path) -> dict[str, torch.Tensor]:
    """The state dict a ``torch.save`` file holds (``weights_only``: no code runs), as prunet names masks."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError... for one cause
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(
            f"{path} is a torch file prunet reads only as a state dict of tensors, and this one is not "
            f"({first[:200]}); save the weights with torch.save(model.state_dict(), path) or prunet.save(model, path)"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # a training checkpoint holding the state dict among other things
    if not (isinstance(obj, dict) and obj and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                   for k, v in obj.items())):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors; save "
                              f"model.state_dict() with torch.save, or use prunet.save(model, path)")
    return upgrade_state(from_torch_pruned_state(dict(obj)))


def _header(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path} is unreadable or corrupt ({str(e).splitlines()[0]})") from None


def _checked_meta(raw: str, path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(raw)
        if not isinstance(meta, dict):
            raise ValueError("its metadata is not a JSON object")
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"checkpoint {path} is unreadable or corrupt ({str(e).splitlines()[0]})") from None
    try:
        return validate_meta(meta, f"checkpoint {path}")
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def load_checkpoint(
    path: str | Path, trust_factory: Trust = False, model: nn.Module | None = None
) -> tuple[nn.Module, Pruner | None, dict[str, Any]]:
    """Rebuild the model of a checkpoint, with its masks if it has any.

    Args:
        path: a checkpoint prunet wrote, or a ``torch.save``-d state dict.
        trust_factory: a checkpoint of the user's own model names the factory that builds it
            (``mypkg.nets:resnet20``), code that loading would run: it is called only when
            ``True`` or in this collection of trusted specs. Registry models need no trust.
        model: load into this model (a fresh instance of the saved one) instead of building
            the one the file names; needed for a file that names none (a torch state dict).

    Returns:
        ``(model, pruner, meta)``; ``pruner`` is None for a checkpoint without masks.

    Raises:
        CheckpointError: a missing or corrupt file, one that does not fit its model.
        prunet.factory.UntrustedFactoryError: the checkpoint names a factory that is not trusted (nothing ran).
    """
    state, meta = read_checkpoint(path)
    name = meta.get("model")
    if model is not None:
        model, pruner = state_into(model, state, path)  # the given model is the one checked
        return model, pruner, meta
    if not name:
        raise CheckpointError(f"checkpoint {path} does not say which model it holds; name it: --model "
                              f"module:function (a factory that builds it), or load(path, model=MyNet()) in Python")
    check_trusted(name, trust_factory, f"checkpoint {path}")
    model, pruner = model_from_state(name, meta.get("model_kwargs", {}), state, path)
    return model, pruner, meta


def model_from_state(
    name: str, kwargs: dict[str, Any], state: dict[str, torch.Tensor], path: str | Path = "state"
) -> tuple[nn.Module, Pruner | None]:
    """Build registry model ``name`` with the shapes, weights and masks of ``state``.

    Returns:
        ``(model, pruner)``; ``pruner`` wraps the masked parameters, None when ``state`` has no masks.

    Raises:
        CheckpointError: the model cannot be built, or ``state`` does not fit it (``path`` names the source).
    """
    try:
        model = create_model(name, **kwargs)
    except (ValueError, TypeError, RuntimeError, MemoryError, OverflowError) as e:
        raise CheckpointError(f"checkpoint {path}: cannot build {name} {kwargs} "
                              f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return state_into(model, state, path, name)


def state_into(
    model: nn.Module, state: dict[str, torch.Tensor], path: str | Path = "state", name: str | None = None
) -> tuple[nn.Module, Pruner | None]:
    """Give ``model`` the shapes, weights and masks of ``state`` (a checkpoint's), masks enforced.

    Returns:
        ``(model, pruner)``; ``pruner`` wraps the masked parameters, None when ``state`` has no masks.

    Raises:
        CheckpointError: ``state`` does not fit ``model`` (``path`` names the source).
    """
    resize_to_state(model, state)
    masked = masked_params(state)
    params = dict(model.named_parameters())
    strays = [k for k in masked if k not in params]
    if strays:
        raise CheckpointError(f"{path} does not fit the model: masks for parameters "
                              f"{name or type(model).__name__} does not have ({', '.join(strays[:3])})")
    pruner = Pruner(model, include=masked) if masked else None
    load_state(model, state, path)
    if pruner is not None:
        pruner.enforce()
    return model, pruner


def load_state(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path = "state") -> None:
    """``model.load_state_dict(state)`` with a one-line error naming what does not fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}")
        if wrong:
            parts.append(f"shape mismatch {[(k, tuple(state[k].shape), tuple(own[k].shape)) for k in wrong[:3]]}")
        raise CheckpointError(f"{path} does not fit the model: {'; '.join(parts)}")
    model.load_state_dict(state)


def resize_to_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give Linear/Conv/BatchNorm layers the shapes found in ``state`` (a model shrunk by neuron removal).

    Only the sizes of parameters and buffers change; values come from ``load_state``.

    Raises:
        CheckpointError: a tensor of another number of dimensions than the model's.
    """
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        for attr, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            new = state.get(prefix + attr)
            if new is None or new.shape == tensor.shape or attr.endswith(MASK_SUFFIX):
                continue
            if new.dim() != tensor.dim():  # a layer keeps its kind: only its sizes change
                raise CheckpointError(f"{prefix + attr}: the file holds a {new.dim()}-D tensor {tuple(new.shape)}, "
                                      f"the model's is {tensor.dim()}-D {tuple(tensor.shape)}")
            fresh = torch.empty(new.shape, dtype=tensor.dtype)
            if attr in module._parameters:
                module._parameters[attr] = nn.Parameter(fresh, requires_grad=tensor.requires_grad)
            else:
                module._buffers[attr] = fresh
        w = state.get(prefix + "weight")
        if w is None:
            continue
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = w.shape
        elif isinstance(module, nn.modules.conv._ConvNd):
            module.out_channels = w.shape[0]
            module.in_channels = w.shape[1] * module.groups
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.num_features = w.shape[0]
