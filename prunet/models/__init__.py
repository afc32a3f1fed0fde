"""Model registry: ``create_model(name, **kwargs)`` and ``list_models()``.

The registry is a convenience: every prunet feature works on any ``nn.Module``.
The reference models are flat ``nn.Sequential`` containers with the layer names
the paper uses (``fc1``, ``conv2``, ``fc6`` ...), so tables and recipes can name
layers the way the paper does.
"""

from prunet.models.registry import ModelInfo, create_model, get_model_info, list_models, register_model

# Importing the definitions fills the registry.
from prunet.models import lenet as _lenet  # noqa: F401
from prunet.models import alexnet as _alexnet  # noqa: F401
from prunet.models import vgg as _vgg  # noqa: F401

from prunet.models.paper import PAPER_KEPT, PAPER_TOTALS, paper_sparsity

__all__ = ["PAPER_KEPT", "PAPER_TOTALS", "ModelInfo", "create_model", "get_model_info", "list_models",
           "paper_sparsity", "register_model"]
