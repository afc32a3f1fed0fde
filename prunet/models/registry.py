"""A name -> constructor registry for the reference models."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from prunet.factory import FactoryError, call_factory, is_factory


@dataclass(frozen=True)
class ModelInfo:
    """What a registered model is and what input it expects.

    Attributes:
        name: registry name, e.g. ``"lenet_300_100"``.
        builder: callable returning the ``nn.Module``.
        input_shape: one example's shape, ``(C, H, W)``.
        description: one line for ``prunet models``.
    """

    name: str
    builder: Callable[..., nn.Module]
    input_shape: tuple[int, int, int]
    description: str


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(name: str, input_shape: tuple[int, int, int], description: str):
    """Decorator adding a model builder to the registry under ``name``."""

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = ModelInfo(name, builder, input_shape, description)
        return builder

    return wrap


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_REGISTRY)


def get_model_info(name: str) -> ModelInfo:
    """The registry entry for ``name``; a clear ``ValueError`` for an unknown one."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}") from None


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model, or call a factory (the user's own model).

    Args:
        name: a name from :func:`list_models`, or a factory ``"mypkg.nets:resnet20"`` /
            ``"nets.py:resnet20"`` (see :mod:`prunet.factory`) returning an ``nn.Module``.
        **kwargs: passed to the builder, e.g. ``num_classes=10``, ``dropout=0.5``.

    Returns:
        A freshly initialised ``nn.Module``.

    Example:
        >>> model = create_model("lenet_300_100")
        >>> sum(p.numel() for p in model.parameters())
        266610
    """
    if is_factory(name):
        model = call_factory(name, kwargs, "model.factory")
        if not isinstance(model, nn.Module):
            raise FactoryError(f"model.factory: {name} returned a {type(model).__name__}, not a torch.nn.Module")
        return model
    return get_model_info(name).builder(**kwargs)
