"""Recipes: every shipped one loads; every mistake is a one-line ConfigError naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from prunet.config import ConfigError, Recipe, load_recipe, parse_override, recipe_from_dict
from prunet.checks import check_rounds
from prunet.layers import find_layers
from prunet.models import create_model, list_models

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def error_of(data: dict) -> str:
    with pytest.raises(ConfigError) as err:
        recipe_from_dict(data)
    message = str(err.value)
    assert "\n" not in message
    return message


# --- shipped recipes --------------------------------------------------------------------------


def test_recipes_are_shipped():
    assert RECIPES, "recipes/ holds no *.yaml"


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipe_loads(path, monkeypatch):
    recipe = load_recipe(path)
    if recipe.model.factory:  # its model builds (from the repository root, as the recipe says) and its rounds fit it
        monkeypatch.chdir(path.parent.parent)
        check_rounds(recipe, find_layers(create_model(recipe.model.spec, **recipe.model.arguments())))
    else:
        assert recipe.model.name in list_models()
    assert recipe.prune.rounds or recipe.prune.gradual, "a shipped recipe prunes"
    # Round trip: what the pipeline writes to config.yaml reads back the same.
    assert recipe_from_dict(yaml.safe_load(yaml.safe_dump(recipe.to_dict()))) == recipe


def test_defaults_are_valid():
    recipe = recipe_from_dict({})
    assert recipe == Recipe().validate()
    assert recipe.model.name == "lenet_300_100" and recipe.prune.rounds == []


def test_values_parsed_and_typed(tmp_path):
    path = write(
        tmp_path,
        """
name: t
train: {epochs: 2, lr: 1}
prune:
  rounds:
    - {criterion: threshold, quality: {fc1: 1, fc: 0.5}, prune: fc, train: [fc1, fc2]}
    - {criterion: global, sparsity: 0.9}
""",
    )
    recipe = load_recipe(path)
    assert recipe.train.lr == 1.0 and isinstance(recipe.train.lr, float)  # ints accepted where floats are
    first, second = recipe.prune.rounds
    assert first.quality == {"fc1": 1.0, "fc": 0.5}
    assert first.prune == ["fc"]  # a single name becomes a list
    assert first.train == ["fc1", "fc2"]
    assert second.sparsity == 0.9 and second.prune == ["all"]


# --- validation errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, field",
    [
        ({"trian": {}}, "trian"),
        ({"train": {"lrr": 0.1}}, "train.lrr"),
        ({"prune": {"rounds": [{"criterion": "threshold", "quality": 1, "qualty": 2}]}}, "prune.rounds[0].qualty"),
    ],
)
def test_unknown_field(data, field):
    message = error_of(data)
    assert message.startswith(f"{field}: unknown field")
    assert "allowed:" in message


@pytest.mark.parametrize(
    "data, field, words",
    [
        ({"train": {"epochs": "ten"}}, "train.epochs", "expected an integer"),
        ({"train": {"epochs": 1.5}}, "train.epochs", "expected an integer"),
        ({"train": {"epochs": True}}, "train.epochs", "expected an integer"),
        ({"train": {"lr": "fast"}}, "train.lr", "expected a number"),
        ({"prune": {"adjust_dropout": "yes"}}, "prune.adjust_dropout", "expected true or false"),
        ({"model": {"name": 3}}, "model.name", "expected a string"),
        ({"train": 5}, "train", "expected a mapping"),
        ({"prune": {"rounds": {"criterion": "threshold"}}}, "prune.rounds", "expected a list"),
        ({"prune": {"rounds": [3]}}, "prune.rounds[0]", "expected a mapping"),
        ({"prune": {"rounds": [{"quality": [1, 2]}]}}, "prune.rounds[0].quality", "expected a number or a mapping"),
        ({"prune": {"rounds": [{"quality": {"fc1": "x"}}]}}, "prune.rounds[0].quality.fc1", "expected a number"),
        ({"model": {"dropout": "half"}}, "model.dropout", "expected a number"),
    ],
)
def test_wrong_type(data, field, words):
    message = error_of(data)
    assert message.startswith(f"{field}: ")
    assert words in message


@pytest.mark.parametrize(
    "data, field",
    [
        ({"train": {"lr": -0.1}}, "train.lr"),
        ({"train": {"lr": 0}}, "train.lr"),
        ({"train": {"epochs": -1}}, "train.epochs"),
        ({"train": {"momentum": 1.0}}, "train.momentum"),
        ({"train": {"lr_gamma": 0}}, "train.lr_gamma"),
        ({"train": {"warmup_steps": -1}}, "train.warmup_steps"),
        ({"model": {"dropout": 1.0}}, "model.dropout"),
        ({"model": {"dropout": -0.1}}, "model.dropout"),
        ({"model": {"num_classes": 1}}, "model.num_classes"),
        ({"data": {"batch_size": 0}}, "data.batch_size"),
        ({"data": {"val_size": -5}}, "data.val_size"),
        ({"data": {"train_subset": 0}}, "data.train_subset"),
        ({"threads": 0}, "threads"),
        ({"prune": {"lr_fraction": 0}}, "prune.lr_fraction"),
        ({"prune": {"max_accuracy_drop": -1}}, "prune.max_accuracy_drop"),
        ({"prune": {"rounds": [{"quality": -1}]}}, "prune.rounds[0].quality"),
        ({"prune": {"rounds": [{"quality": {"fc1": 1, "fc2": -1}}]}}, "prune.rounds[0].quality.fc2"),
        ({"prune": {"rounds": [{"criterion": "sparsity", "sparsity": 1.5}]}}, "prune.rounds[0].sparsity"),
        ({"prune": {"rounds": [{"quality": 1}, {"quality": 1, "epochs": -2}]}}, "prune.rounds[1].epochs"),
    ],
)
def test_out_of_range(data, field):
    message = error_of(data)
    assert message.startswith(f"{field}: ")
    assert "out of range" in message and "allowed" in message


@pytest.mark.parametrize(
    "data, field, value",
    [
        ({"model": {"name": "resnet50"}}, "model.name", "resnet50"),
        ({"data": {"dataset": "cifar10"}}, "data.dataset", "cifar10"),
        ({"train": {"optimizer": "lbfgs"}}, "train.optimizer", "lbfgs"),
        ({"train": {"lr_schedule": "linear"}}, "train.lr_schedule", "linear"),
        ({"train": {"regularization": "l3"}}, "train.regularization", "l3"),
        ({"prune": {"rounds": [{"criterion": "random", "sparsity": 0.5}]}}, "prune.rounds[0].criterion", "random"),
    ],
)
def test_unknown_choice_lists_the_allowed(data, field, value):
    message = error_of(data)
    assert message.startswith(f"{field}: '{value}' is not one of")


def test_unknown_model_lists_registered_models():
    message = error_of({"model": {"name": "resnet50"}})
    assert all(name in message for name in list_models())


def test_threshold_needs_quality():
    assert error_of({"prune": {"rounds": [{"criterion": "threshold"}]}}).startswith(
        "prune.rounds[0].quality: required with criterion 'threshold'"
    )


@pytest.mark.parametrize("criterion", ["sparsity", "global"])
def test_sparsity_criteria_need_sparsity(criterion):
    message = error_of({"prune": {"rounds": [{"criterion": criterion, "quality": 1.0}]}})
    assert message.startswith("prune.rounds[0].sparsity: required")


def test_global_takes_one_number_not_a_mapping():
    message = error_of({"prune": {"rounds": [{"criterion": "global", "sparsity": {"fc1": 0.9}}]}})
    assert message.startswith("prune.rounds[0].sparsity: criterion 'global' takes one number")


@pytest.mark.parametrize("field", ["prune", "train"])
def test_round_must_name_layers(field):
    message = error_of({"prune": {"rounds": [{"quality": 1.0, field: []}]}})
    assert message.startswith(f"prune.rounds[0].{field}: must name at least one layer")


@pytest.mark.parametrize("name", ["", "a/b"])
def test_bad_run_name(name):
    assert error_of({"name": name}).startswith("name: ")


# --- files ------------------------------------------------------------------------------------


def test_bad_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "name: x\ntrain:\n  epochs: [1, 2\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"recipe\.yaml: not valid YAML at line \d+"):
        load_recipe(path)


def test_recipe_that_is_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="a recipe is a mapping of fields, got list"):
        load_recipe(write(tmp_path, "- 1\n- 2\n"))


def test_empty_file_is_the_default_recipe(tmp_path):
    assert load_recipe(write(tmp_path, "")) == Recipe()


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot read recipe .*nope\.yaml"):
        load_recipe(tmp_path / "nope.yaml")


# --- overrides (--set) ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, key, value",
    [
        ("train.epochs=3", "train.epochs", 3),
        ("train.lr=0.01", "train.lr", 0.01),
        (" train.lr = 0.5", "train.lr", 0.5),
        ("data.data_dir=/tmp/x", "data.data_dir", "/tmp/x"),
        ("model.dropout=null", "model.dropout", None),
        ("prune.adjust_dropout=false", "prune.adjust_dropout", False),
        ("name=a=b", "name", "a=b"),
        ("prune.rounds=[{criterion: global, sparsity: 0.9}]", "prune.rounds", [{"criterion": "global", "sparsity": 0.9}]),
    ],
)
def test_parse_override(text, key, value):
    assert parse_override(text) == (key, value)


def test_parse_override_needs_equals():
    with pytest.raises(ConfigError, match="FIELD=VALUE"):
        parse_override("train.epochs")


def test_exponent_without_dot_is_a_number(tmp_path):
    assert parse_override("train.lr=1e-3") == ("train.lr", 0.001)
    assert load_recipe(write(tmp_path, "train: {reg_strength: 5e-4}\n")).train.reg_strength == 0.0005


def test_overrides_applied_and_validated(tmp_path):
    path = write(tmp_path, "name: base\ntrain: {epochs: 10}\n")
    recipe = load_recipe(path, dict([parse_override("train.epochs=2"), parse_override("data.train_subset=100")]))
    assert recipe.train.epochs == 2 and recipe.data.train_subset == 100
    assert recipe.name == "base"
    with pytest.raises(ConfigError, match=r"^train\.epoch: unknown field"):
        load_recipe(path, {"train.epoch": 2})
    with pytest.raises(ConfigError, match=r"^train\.lr: .*out of range"):
        load_recipe(path, {"train.lr": -1})
    with pytest.raises(ConfigError, match=r"name is not a section"):
        load_recipe(path, {"name.x": 1})


@pytest.mark.parametrize("name", [".", "..", "a/b", "..\\\\x", ""])
def test_a_run_name_is_a_plain_name(name):
    with pytest.raises(ConfigError, match=r"^name: must be a plain name"):
        recipe_from_dict({"name": name})


def test_a_recipe_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"not UTF-8 text \(byte 9\)"):
        load_recipe(path)


def test_an_override_that_is_not_yaml_is_one_line():
    with pytest.raises(ConfigError, match=r"--set train\.lr: '\[1' is not a valid YAML value"):
        parse_override("train.lr=[1")


def test_an_absurd_class_count_is_refused_before_anything_is_built():
    with pytest.raises(ConfigError, match=r"model\.num_classes: 1000000000000 is out of range"):
        recipe_from_dict({"model": {"num_classes": 10**12}})
