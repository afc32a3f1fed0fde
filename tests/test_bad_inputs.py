"""A user's mistake in a recipe, a data file or their own factory: one line on stderr and exit code 2.

Each case runs the command line in-process on tiny data (a factory's 32 examples of 1x4x4, a
linear model) and checks the one line names the recipe field at fault; a case that stops a run
which already has a resume point is resumed too, and fails the same way.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import yaml

from prunet.cli import main
from prunet.data import DataError, write_idx

USER_CODE = '''
import torch
import torch.nn as nn
from torch.utils.data import Dataset, TensorDataset


def examples(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def good():
    return TensorDataset(*examples(32)), TensorDataset(*examples(16, 1)), TensorDataset(*examples(16, 2))


class Made(Dataset):
    """16 examples; ``get(i)`` makes example i (or raises)."""

    def __init__(self, get, n=16):
        self.get, self.n = get, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.get(i)


def with_train(train):
    _, val, test = good()
    return train, val, test


def str_labels():
    return with_train(Made(lambda i: (torch.zeros(1, 4, 4), "cat")))


def mixed_shapes():
    return with_train(Made(lambda i: (torch.zeros(1, 4, 4 + i % 2), 0)))


def getitem_raises():
    def get(i):
        raise RuntimeError("disk gone")
    return with_train(Made(get))


def len_too_large():
    x, y = examples(8)
    return with_train(Made(lambda i: (x[i], y[i]), n=16))


def len_negative():
    return with_train(Made(lambda i: (torch.zeros(1, 4, 4), 0), n=-1))


def late_raise():
    """Example 20 of 32 raises: only reading the training split in an epoch finds it."""
    x, y = examples(32)

    def get(i):
        if i == 20:
            raise OSError("bad sector")
        return x[i], y[i]
    return with_train(Made(get, n=32))


def late_odd_shape():
    """Example 20 of 32 is 1x4x5: only a batch of the training split holding it finds it."""
    x, y = examples(32)
    return with_train(Made(lambda i: (torch.zeros(1, 4, 5) if i == 20 else x[i], y[i]), n=32))


def mapping(**extra):
    train, val, test = good()
    return {"train": train, "val": val, "test": test, **extra}


def no_val():
    train, _, test = good()
    return train, None, test


class Net(nn.Module):
    def __init__(self, out="scores"):
        super().__init__()
        self.fc = nn.Linear(16, 6)
        self.out = out

    def forward(self, x):
        y = self.fc(x.flatten(1))
        if self.out == "b32":
            return y.view(-1, 3, 2)
        if self.out == "b":
            return y[:, 0]
        if self.out == "tuple" or (self.out == "tuple-in-training" and self.training):
            return y[:, :3], y
        return y[:, :3]


def net(out="scores"):
    return Net(out)


def weight_norm():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    torch.nn.utils.parametrizations.weight_norm(model[1])
    return model


class Computed(nn.Module):
    """A Linear whose weight is a plain tensor, computed from another parameter at each call."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 3)
        self.out = nn.Linear(3, 3)
        del self.out.weight
        self.scale = nn.Parameter(torch.ones(3, 1))

    def forward(self, x):
        self.out.weight = self.scale * torch.eye(3)
        return self.out(self.fc(x.flatten(1)))


def computed():
    return Computed()
'''


def recipe(tmp_path: Path, **changes) -> Path:
    """A recipe of the user's code in ``tmp_path`` (a linear model, 32 training examples), ``changes`` applied."""
    code = tmp_path / "usercode.py"
    code.write_text(USER_CODE)
    data = {"name": "bad", "seed": 0, "output_dir": str(tmp_path / "runs"),
            "model": {"factory": f"{code}:net"},
            "data": {"factory": f"{code}:good", "val_size": 8, "batch_size": 8, "eval_batch_size": 16},
            "train": {"epochs": 1, "lr": 0.05},
            "prune": {"rounds": [{"criterion": "threshold", "quality": 0.5, "epochs": 1}]}}
    for key, value in changes.items():
        node = data
        *parts, last = key.split(".")
        for p in parts:
            node = node.setdefault(p, {})
        node[last] = value.replace("CODE", str(code)) if isinstance(value, str) else value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def fails(capsys, args: list[str], *words: str) -> str:
    """Run the command line: exit code 2 and one line naming ``words``."""
    rc = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("prunet: error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def resume_fails_alike(capsys, tmp_path: Path, first: str) -> None:
    """Resuming the stopped run meets the same error, told the same way."""
    again = fails(capsys, ["run", "--resume", tmp_path / "runs" / "bad", "--trust-factory"])
    assert again == first


def resume_finds_nothing(capsys, tmp_path: Path) -> None:
    """The run stopped before its folder existed: resuming it says so in one line."""
    fails(capsys, ["run", "--resume", tmp_path / "runs" / "bad", "--trust-factory"], "does not exist")


# --------------------------------------------------------------------------- seeds


@pytest.mark.parametrize("field", ["seed", "data.split_seed"])
@pytest.mark.parametrize("value", [99999999999999999999, 2**63, -1])
def test_a_seed_out_of_range_names_the_field_and_the_range(tmp_path, capsys, field, value):
    path = recipe(tmp_path, **{field: value, "data.factory": "CODE:no_val"})
    fails(capsys, ["run", path], f"{field}: {value} is out of range", "[0, 9223372036854775807]")
    assert not (tmp_path / "runs").exists()


def test_the_largest_seeds_train(tmp_path, capsys):
    """Seeds up to 2^63 - 1: a run derives more by adding to them (per round, per rank), and those still fit."""
    path = recipe(tmp_path, **{"seed": 2**63 - 1, "data.split_seed": 2**63 - 1, "data.factory": "CODE:no_val"})
    assert main(["train", str(path)]) == 0, capsys.readouterr().err


# --------------------------------------------------------------------------- IDX files


def idx_folder(folder: Path, labels_header: bytes, labels_data: bytes) -> Path:
    """The four files of a tiny Fashion-MNIST, the training labels replaced by a header and data."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    for part, n in (("train", 40), ("t10k", 20)):
        write_idx(folder / f"{part}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(folder / f"{part}-labels-idx1-ubyte", rng.integers(0, 10, n, dtype=np.uint8))
    (folder / "train-labels-idx1-ubyte").write_bytes(labels_header + labels_data)
    return folder


@pytest.mark.parametrize("size, data", [(1, b"\x01"), (2, b"\x00" * 10)])
def test_an_idx_header_claiming_255_dimensions_is_one_line(tmp_path, capsys, size, data):
    header = struct.pack(">HBB", 0, 0x08, 255) + struct.pack(">255I", *([size] * 255))
    folder = idx_folder(tmp_path / "fashion", header, data)
    path = recipe(tmp_path, model={"name": "lenet_300_100"},
                  data={"dataset": "fashion-mnist", "data_dir": str(folder), "val_size": 10})
    fails(capsys, ["train", path], "train-labels-idx1-ubyte", "claims 255 dimensions", "at most 32")


def test_write_idx_refuses_what_read_idx_could_not_read_back(tmp_path):
    with pytest.raises(DataError, match="cannot store shape"):
        write_idx(tmp_path / "deep", np.zeros((1,) * 33, dtype=np.uint8))


# --------------------------------------------------------------------------- data factories


@pytest.mark.parametrize("factory, words", [
    ("str_labels", ["its train dataset", "a label must be one integer", "str 'cat'"]),
    ("mixed_shapes", ["its train dataset", "inputs of different shapes (1, 4, 4) and (1, 4, 5)"]),
    ("getitem_raises", ["its train dataset's example 0 raised RuntimeError: disk gone"]),
    ("len_too_large", ["example 15 raised IndexError", "__len__ says 16"]),
    ("len_negative", ["its train dataset: len() raised ValueError", "__len__() should return >= 0"]),
])
def test_a_data_factory_dataset_that_cannot_be_read_is_one_line(tmp_path, capsys, factory, words):
    path = recipe(tmp_path, **{"data.factory": f"CODE:{factory}"})
    fails(capsys, ["run", path], "data.factory: ", *words)
    assert not (tmp_path / "runs").exists()
    resume_finds_nothing(capsys, tmp_path)


@pytest.mark.parametrize("extra, words", [
    ({"mean": "abc"}, ["its mean is str 'abc'", "expected one number"]),
    ({"mean": [0.5, 0.5, 0.5]}, ["its mean is list", "expected one number"]),
    ({"std": 0}, ["its std is 0.0", "> 0"]),
    ({"std": float("nan")}, ["its std is nan", "finite"]),
    ({"classes": 3}, ["its classes is int 3", "a list of class names"]),
    ({"classes": "abc"}, ["its classes is str 'abc'", "a list of class names"]),
])
def test_a_data_factory_mapping_with_a_bad_value_is_one_line(tmp_path, capsys, extra, words):
    path = recipe(tmp_path, **{"data.factory": "CODE:mapping", "data.kwargs": extra})
    fails(capsys, ["run", path], "data.factory: ", *words)


def test_a_mapping_with_classes_mean_and_std_runs(tmp_path, capsys):
    path = recipe(tmp_path, **{"data.factory": "CODE:mapping",
                               "data.kwargs": {"classes": ["a", "b", "c"], "mean": 0.1, "std": 2}})
    assert main(["train", str(path)]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("factory, words", [
    ("late_raise", ["data.factory: reading a batch of 8 from its dataset of 32 examples raised OSError: bad sector"]),
    ("late_odd_shape", ["data.factory: inputs of different shapes", "(1, 4, 5)"]),
])
def test_a_dataset_failing_in_an_epoch_is_one_line_and_so_is_its_resume(tmp_path, capsys, factory, words, workers):
    """Only training reads example 20: after the run's first resume point. In a DataLoader worker the error
    comes back with the worker's traceback in its message; the line keeps only the original's."""
    path = recipe(tmp_path, **{"data.factory": f"CODE:{factory}", "data.workers": workers})
    first = fails(capsys, ["run", path], *words)
    resume_fails_alike(capsys, tmp_path, first)


# --------------------------------------------------------------------------- model factories


@pytest.mark.parametrize("out, words", [
    ("b32", ["returned shape (2, 3, 2) for a batch of 2", "expected (2, classes)"]),
    ("b", ["returned shape (2,) for a batch of 2"]),
    ("tuple", ["returned a tuple, not a tensor"]),
])
def test_a_model_returning_other_than_class_scores_is_one_line(tmp_path, capsys, out, words):
    path = recipe(tmp_path, **{"model.kwargs": {"out": out}})
    fails(capsys, ["run", path], "model.factory: ", *words)
    resume_finds_nothing(capsys, tmp_path)


def test_a_model_returning_a_tuple_only_in_training_is_one_line_and_so_is_its_resume(tmp_path, capsys):
    """Auxiliary outputs in training mode (GoogLeNet's): the check before the run sees the evaluation output."""
    path = recipe(tmp_path, **{"model.kwargs": {"out": "tuple-in-training"}})
    first = fails(capsys, ["run", path], "model.factory: in training the model returned a tuple")
    resume_fails_alike(capsys, tmp_path, first)


@pytest.mark.parametrize("factory, words", [
    ("weight_norm", ["layer '1'", "computed by a parametrization (WeightNorm)", "remove_parametrizations"]),
    ("computed", ["layer 'out' (Linear)", "not an nn.Parameter"]),
])
def test_a_layer_whose_weight_is_not_a_parameter_is_refused_in_one_line(tmp_path, capsys, factory, words):
    """Refused before training, not skipped: a layer left dense without a word would make the compression a lie."""
    path = recipe(tmp_path, **{"model.factory": f"CODE:{factory}"})
    fails(capsys, ["run", path], "model.factory: ", "has no weight parameter to prune", *words)
    assert not (tmp_path / "runs").exists()
    resume_finds_nothing(capsys, tmp_path)
