"""prunet: learning both weights and connections for efficient neural networks.

An implementation of Han, Pool, Tran & Dally (NIPS 2015): train, prune by a
per-layer magnitude threshold, retrain the survivors, iterate.

Example:
    >>> import prunet, torch
    >>> model = prunet.create_model("lenet_300_100")
    >>> pruner = prunet.Pruner(model)
    >>> _ = pruner.prune(prunet.Threshold({"fc1": 1.0, "fc2": 1.0, "fc3": 0.5}))
    >>> pruner.compression() > 1
    True
"""

__version__ = "0.1.0"

import importlib
from typing import Any

from prunet.criteria import (
    CRITERIA,
    Criterion,
    GlobalMagnitude,
    Sparsity,
    TargetThreshold,
    Threshold,
    compression_to_keep_fraction,
    global_sparsity_masks,
    sparsity_mask,
    threshold_mask,
)
from prunet.layers import LayerRow, find_layers, format_table
from prunet.models import create_model, list_models
from prunet.pruner import Pruner

__all__ = [
    "__version__",
    "CRITERIA",
    "Criterion",
    "GlobalMagnitude",
    "LayerRow",
    "Pruner",
    "Sparsity",
    "TargetThreshold",
    "Threshold",
    "compression_to_keep_fraction",
    "create_model",
    "find_layers",
    "format_table",
    "global_sparsity_masks",
    "list_models",
    "sparsity_mask",
    "threshold_mask",
    "export",
    "load",
    "save",
]

# Loaded on first use: the sparse package brings checkpoints, data and training with it, which
# `import prunet.layers` or `import prunet.criteria` must not load.
_LAZY = {"export": "prunet.sparse", "load": "prunet.sparse", "save": "prunet.sparse"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'prunet' has no attribute {name!r}")


def __dir__() -> list[str]:
    """Exactly the public API (``__all__``): what ``dir(prunet)`` and tab completion show."""
    return sorted(__all__)
