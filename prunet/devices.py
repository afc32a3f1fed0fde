"""Which device a run computes on: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.

A recipe's ``device`` (or ``--device``) is checked twice: its spelling when the recipe
is read (:func:`check_device_spec`), and whether this machine has it when a run starts
(:func:`resolve_device`), so ``device: cuda`` on a machine without a GPU fails in one
line before anything is trained or written.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn

__all__ = ["DeviceError", "check_device_spec", "model_device", "resolve_device"]

_SPEC = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class DeviceError(ValueError):
    """A device this machine does not have; one line."""


def check_device_spec(spec: str, field: str = "device") -> str | None:
    """Why ``spec`` is not a device name, or None when it is one (whether or not this machine has it)."""
    if not isinstance(spec, str) or not _SPEC.match(spec):
        return f"{field}: {spec!r} is not one of auto, cpu, cuda, cuda:N, mps"
    return None


def resolve_device(spec: str, field: str = "device", local_rank: int | None = None) -> torch.device:
    """The ``torch.device`` that ``spec`` names on this machine.

    Args:
        spec: ``auto`` (CUDA when present, else the CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        field: the recipe field or flag it came from, for the error message.
        local_rank: under torchrun, this process's index on its node: ``cuda`` and ``auto``
            then mean ``cuda:local_rank`` (and ``cuda:N``, one GPU for all processes, is refused).

    Raises:
        DeviceError: a misspelt device, or one this machine (or this build of torch) does not have.
    """
    problem = check_device_spec(spec, field)
    if problem:
        raise DeviceError(problem)
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise DeviceError(f"{field}: mps requested, but this machine has no Apple GPU available to torch; "
                              f"use cpu or auto")
        return torch.device("mps")
    if not torch.cuda.is_available():
        build = "a CPU-only build of torch" if torch.version.cuda is None else f"torch built for CUDA {torch.version.cuda}"
        raise DeviceError(f"{field}: {spec} requested, but this machine has no CUDA GPU ({build}); use cpu or auto")
    if ":" in spec and local_rank is not None:
        raise DeviceError(f"{field}: {spec} names one GPU, but this is one of several processes (torchrun); "
                          f"use cuda: each process takes cuda:LOCAL_RANK")
    count = torch.cuda.device_count()
    index = int(spec.split(":")[1]) if ":" in spec else (local_rank or 0)
    if index >= count:
        raise DeviceError(f"{field}: {spec if ':' in spec else f'cuda:{index}'} requested, but this machine has "
                          f"{count} CUDA device{'s' if count != 1 else ''} (cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters are (the CPU for a model without any)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
