"""What a run checks before it touches anything: the inputs must fit each other.

Each check raises :class:`~prunet.config.ConfigError` with one line naming the
recipe field at fault, so ``prunet run`` fails before it trains or writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from prunet.config import ConfigError, Recipe
from prunet.data import DatasetSplits, first_batch
from prunet.devices import model_device
from prunet.layers import Layer, LayerNameError, check_names, unprunable_layers
from prunet.train import output_problem


def split_identity(recipe: Recipe) -> dict[str, Any]:
    """What fixes the train / validation split; stored in checkpoints so a later run can check it."""
    d = recipe.data
    identity = {"dataset": d.dataset, "val_size": d.val_size, "split_seed": d.split_seed}
    if d.factory is not None:  # the factory and its arguments decide which examples there are
        identity.update(dataset=d.factory, kwargs=d.kwargs)
    return identity


def check_checkpoint_fits(recipe: Recipe, meta: dict[str, Any], path: str | Path) -> None:
    """A ``--from`` checkpoint must hold the recipe's model, trained on the recipe's training split.

    A different split would put the checkpoint's training images into this run's
    validation split, which then chooses epochs and thresholds on data the model has seen.
    """
    if meta.get("model") != recipe.model.spec or meta.get("model_kwargs", {}) != recipe.model.arguments():
        raise ConfigError(
            f"model: {path} holds {meta.get('model')} {meta.get('model_kwargs', {})}, the recipe asks for "
            f"{recipe.model.spec} {recipe.model.arguments()}"
        )
    split = meta.get("split")
    if split is not None and split != split_identity(recipe):
        raise ConfigError(f"data: {path} was trained with split {split}, the recipe's is {split_identity(recipe)}")


LABELS_LOOKED_AT = 512  # a factory dataset's labels are checked against the model's outputs on this many


def model_data_mismatch(model: nn.Module, data: DatasetSplits) -> tuple[str, str] | None:
    """Two images through the model: ``(recipe field, what does not fit)``, or None when it fits.

    The field is ``model.name`` (the model does not take the images, or does not return one
    row of class scores per image) or ``model.num_classes`` (its outputs are not the dataset's classes).
    """
    split = data.val if len(data.val) else data.test
    x, y = first_batch(split, LABELS_LOOKED_AT, mean=data.mean, std=data.std, device=model_device(model))
    x = x[:2]
    try:
        with torch.no_grad():
            out = model.eval()(x)
    except Exception as e:  # the model's own code: whatever it raises, the images do not go through it
        shape = tuple(x.shape[1:])
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        return "model.name", f"does not take {data.name} images of shape {shape} ({detail})"
    problem = output_problem(out, len(x))
    if problem is not None:
        return "model.name", f"returned {problem}"
    if data.classes and out.shape[-1] != len(data.classes):
        classes = len(data.classes)
        return "model.num_classes", f"the model has {out.shape[-1]} outputs, {data.name} has {classes} classes"
    if int(y.max()) >= out.shape[-1] or int(y.min()) < 0:  # a factory dataset need not name its classes
        bad = int(y.max()) if int(y.max()) >= out.shape[-1] else int(y.min())
        return "model.num_classes", f"the model has {out.shape[-1]} outputs, {data.name} has label {bad}"
    return None


def check_model_fits_data(recipe: Recipe, model: nn.Module, data: DatasetSplits) -> None:
    """The recipe's model must hold its layers' weights as parameters (what masks go beside), take the
    data's images and return one row of scores per image, one score per class."""
    unprunable = unprunable_layers(model)
    if unprunable:  # refused, not skipped: a layer left dense without a word would misstate the compression
        name, held = unprunable[0]
        more = f" (and {len(unprunable) - 1} more layers like it)" if len(unprunable) > 1 else ""
        field = "model.factory" if recipe.model.factory is not None else "model.name"
        raise ConfigError(f"{field}: layer {name or '(the model)'!r} ({type(model.get_submodule(name)).__name__})"
                          f"{more} has no weight parameter to prune: its weight is {held}")
    mismatch = model_data_mismatch(model, data)
    if mismatch is not None:
        field, problem = mismatch
        subject = f"{recipe.model.spec} " if field == "model.name" else ""
        if recipe.model.factory is not None:  # the recipe names the model by its factory
            field = {"model.name": "model.factory", "model.num_classes": "model.kwargs"}[field]
        raise ConfigError(f"{field}: {subject}{problem}")


def check_rounds(recipe: Recipe, layers: Sequence[Layer]) -> None:
    """Every layer name, group or glob in the rounds must name one of the model's prunable ``layers``."""
    for i, rnd in enumerate(recipe.prune.rounds):
        for field, keys in rnd.layer_keys().items():
            try:
                check_names(layers, keys, recipe.model.spec)
            except LayerNameError as e:
                raise ConfigError(f"prune.rounds[{i}].{field}: {e}") from None
    if recipe.quantize is not None:
        try:
            check_names(layers, recipe.quantize.layer_keys(), recipe.model.spec)
        except LayerNameError as e:
            raise ConfigError(f"quantize.bits: {e}") from None


def check_ranks(recipe: Recipe, world_size: int) -> None:
    """Under several processes every batch is split evenly between them: the batch size must divide."""
    if world_size > 1 and recipe.data.batch_size % world_size:
        raise ConfigError(f"data.batch_size: {recipe.data.batch_size} does not split over {world_size} processes "
                          f"(each takes an equal part of every batch); give a multiple of {world_size}")
