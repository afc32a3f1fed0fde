"""A crafted or damaged compact-file header: one line naming the file and the field, never a traceback.

The checksum covers the header, but anyone can recompute it, so every file here is
crafted with a valid one: what stops a bad header is :func:`prunet.sparse.compact.read_header`
checking each field by type and range (the model's metadata by :func:`prunet.meta.validate_meta`)
and :func:`~prunet.sparse.compact.read_compact` checking the tensors against it, before
anything is built or allocated.
"""

from __future__ import annotations

import copy
import doctest
import functools
import importlib
import json
import random
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import prunet
import prunet.meta
from prunet import Pruner, Sparsity
from prunet.cli import USER_ERRORS, main
from prunet.factory import UntrustedFactoryError
from prunet.masks import baked_copy
from prunet.meta import validate_meta
from prunet.models import create_model
from prunet.share import share, unshare
from prunet.sparse import CompactFileError, huffman
from prunet.sparse.compact import _META_KEY, _checksum, read_header
from prunet.sparse.export import save_compact
from prunet.sparse.modules import sparsify

META = {"model": "lenet_300_100", "model_kwargs": {"num_classes": 10, "dropout": 0.0}, "input_shape": [1, 28, 28],
        "recipe": "tiny", "split": {"dataset": "fashion-mnist", "val_size": 500, "split_seed": 0},
        "phase": "final", "exported_from": "runs/tiny/final.safetensors", "shrunk": False}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A pruned LeNet-300-100 as a compact file: fc1 and fc3 sparse, fc2 weight-shared (Huffman coded)."""
    torch.manual_seed(0)
    model = create_model("lenet_300_100", num_classes=10, dropout=0.0)
    pruner = Pruner(model)
    pruner.prune(Sparsity(0.9))
    keep = {p: m.bool() for p, m in pruner.masks.items()}
    plain = baked_copy(model).eval()
    shared = share(plain, {"fc2": 4}, masks=keep)
    unshare(plain)
    return save_compact(tmp_path_factory.mktemp("base") / "base.prunet", plain, META, keep=keep, shared=shared)


def header_of(path: Path) -> dict[str, Any]:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()[_META_KEY])


def craft(base: Path, out: Path, edit: Callable[[dict], Any] | None = None,
          edit_tensors: Callable[[dict], Any] | None = None) -> Path:
    """``base`` with its header (and tensors) edited and a valid checksum: only the checks stand in the way."""
    header, tensors = header_of(base), load_file(str(base))
    if edit is not None:
        edit(header)
    if edit_tensors is not None:
        edit_tensors(tensors)
    header.pop("checksum", None)
    header["checksum"] = _checksum(tensors, header)
    save_file(tensors, str(out), metadata={_META_KEY: json.dumps(header)})
    return out


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("prunet: error: "), lines
    return lines[0]


def test_the_base_file_loads(base):
    header = read_header(base)
    assert header["sparse"]["fc2.weight"]["shared"] and header["meta"]["shared_bits"] == {"fc2.weight": 4}
    out = prunet.load(base)(torch.zeros(1, 1, 28, 28))
    assert out.shape == (1, 10) and torch.isfinite(out).all()


# --- the cases that were tracebacks, through the command line -------------------------------------

def fc1(**fields) -> Callable[[dict], None]:
    return lambda h: h["sparse"]["fc1.weight"].update(fields)


@pytest.mark.parametrize("edit, field", [
    (lambda h: h.update(sparse=list(h["sparse"])), "sparse: ['fc1.weight', "),
    (lambda h: h.update(meta="lenet_300_100"), "meta: 'lenet_300_100' is not a mapping"),
    (fc1(bits=70), "sparse['fc1.weight'].bits: 70 is not a whole number in 1..16"),
    (fc1(shape=[10**6, 10**6]), "sparse['fc1.weight'].shape: [1000000, 1000000] brings the dense tensors to "
                                "1,000,000,000,000 elements"),
    (fc1(survivors=300 * 784 + 1), "sparse['fc1.weight'].survivors: 235201 is not a whole number in 0..235,200"),
    (fc1(codes=10), "sparse['fc1.weight'].codes: 10 is not a whole number in 23,520.."),
    (fc1(survivors=-1), "sparse['fc1.weight'].survivors: -1 is not"),
    (fc1(bits=True), "sparse['fc1.weight'].bits: True is not a whole number"),
    (fc1(codes=float("nan")), "sparse['fc1.weight'].codes: nan is not a whole number"),
    (fc1(shape=[300, 784.0]), "sparse['fc1.weight'].shape: [300, 784.0] is not a list of at most 8 whole numbers"),
    (lambda h: h["meta"].update(model_kwargs={"num_classes": 10**12}),
     "meta.model_kwargs.num_classes: 1000000000000 is not a whole number in 0..1,000,000"),
])  # fmt: skip
def test_a_crafted_header_is_one_line_naming_file_and_field(base, tmp_path, capsys, edit, field):
    path = craft(base, tmp_path / "x.prunet", edit)
    assert main(["eval", str(path)]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"prunet: error: {path}: ") and field in line, line


@pytest.mark.parametrize("shape", ["abc", [-1, 28], [1e12], [[1], [2]], [], [1, 2, 3, 4, 5], [True, 28, 28],
                                   [4096, 4096, 4096], None])
def test_eval_sparse_refuses_a_malformed_input_shape(base, tmp_path, capsys, shape):
    path = craft(base, tmp_path / "x.prunet", lambda h: h["meta"].update(input_shape=shape))
    if shape is None:  # null: the registry's input shape is used instead
        assert prunet.load(path, sparse=True)(torch.zeros(1, 1, 28, 28)).shape == (1, 10)
        return
    assert main(["eval", str(path), "--sparse"]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"prunet: error: {path}: meta.input_shape: "), line


def test_a_3d_shape_in_a_2d_slot(base, tmp_path, capsys):
    path = craft(base, tmp_path / "x.prunet", fc1(shape=[300, 28, 28]))  # as many elements: the header is valid
    assert main(["eval", str(path)]) == 2
    assert "fc1.weight" in one_error_line(capsys)


@pytest.mark.parametrize("name, shape", [("fc1.weight", [300, 784, 2]), ("fc3.weight", [100, 10]),
                                         ("fc2.weight", [100, 600])])
def test_a_shape_the_model_cannot_take(base, tmp_path, name, shape):
    """Each header is valid; only the model can tell: a tensor of another rank, or shapes that do not chain."""
    path = craft(base, tmp_path / "x.prunet", lambda h: h["sparse"][name].update(shape=shape))
    with pytest.raises(USER_ERRORS) as info:
        prunet.load(path)
    message = str(info.value)
    assert "\n" not in message and (name in message or "does not run on its input shape [1, 28, 28]" in message)


def test_a_well_formed_input_shape_the_model_does_not_take(base, tmp_path, capsys):
    path = craft(base, tmp_path / "x.prunet", lambda h: h["meta"].update(input_shape=[1, 28]))
    assert main(["eval", str(path), "--sparse"]) == 2
    assert "input_shape" in one_error_line(capsys)


# --- more fields, through prunet.load ----------------------------------------------------------------

def fc2_meta(values) -> Callable[[dict], None]:
    def edit(tensors):
        tensors["fc2.weight.meta"] = torch.tensor(values, dtype=torch.int64)
    return edit


@pytest.mark.parametrize("edit, edit_tensors, field", [
    (lambda h: h.update(version="2"), None, "version: '2' is not a whole number in 1..2"),
    (lambda h: h.update(version=0), None, "version: 0 is not"),
    (lambda h: h.pop("plain"), None, "plain: missing"),
    (lambda h: h.update(plain=["fc1.bias", 3]), None, "plain: ['fc1.bias', 3] is not a list of tensor names"),
    (lambda h: h.update(plain=[*h["plain"], "fc1.weight"]), None, "plain: 'fc1.weight' is also in sparse"),
    (lambda h: h["plain"].append("fc1.bias"), None, "plain: 'fc1.bias' is named twice"),
    (lambda h: h.update(value_dtype=["float32"]), None, "value_dtype: ['float32'] is not one of float32"),
    (lambda h: h["sparse"].update(fc3={"shape": [1]}), None, "sparse['fc3'].survivors: missing"),
    (lambda h: h["sparse"]["fc2.weight"].update(shared="yes"), None, "sparse['fc2.weight'].shared: 'yes' is not"),
    (lambda h: h["sparse"].pop("fc3.weight"), None, "the file holds the tensor 'fc3.weight.index', which its "
                                                    "header does not name"),
    (lambda h: h["plain"].append("fc4.bias"), None, "the header names the tensor 'fc4.bias', which the file "
                                                    "does not hold"),
    (fc1(bits=5), None, "sparse['fc1.weight']: the tensor 'fc1.weight.index' holds uint8 of shape [14837]; "
                        "expected 18,546 uint8 values"),
    (lambda h: h.update(value_dtype="float16"), None, "'fc1.weight.values' holds float32 of shape [23520]; expected "
                                                      "23,520 float16 values"),
    (None, lambda t: t.update({"fc1.weight.values": t["fc1.weight.values"][:-1]}),
     "'fc1.weight.values' holds float32 of shape [23519]; expected 23,520 float32 values"),
    (None, fc2_meta([70, 1, 1]), "'fc2.weight.meta', bits: 70 is not"),
    (None, fc2_meta([4, 40000, 30001]), "'fc2.weight.meta', survivors: 30001 is not a whole number in 0..30,000"),
    (None, fc2_meta([4, 10**15, 3000]), "'fc2.weight.meta', codes: 1000000000000000 is not"),
    (None, fc2_meta([4, 3000]), "the tensor 'fc2.weight.meta' holds int64 of shape [2]; expected 3 int64 values"),
    (None, lambda t: t.update({"fc2.weight.index_lengths": t["fc2.weight.index_lengths"][:3]}),
     "the tensor 'fc2.weight.index_lengths' holds uint8 of shape [3]; expected 16 uint8 values"),
    (None, lambda t: t["fc2.weight.clusters_lengths"].fill_(1), "the Huffman stream is corrupt"),
    (lambda h: h["meta"].update(model=["lenet_300_100"]), None, "meta.model: ['lenet_300_100'] is not a model name"),
    (lambda h: h["meta"].update(model_kwargs={"num_classes": -3}), None, "meta.model_kwargs.num_classes: -3"),
    (lambda h: h["meta"].update(model_kwargs={"num_classes": [10]}), None, "is not an argument of a registry model"),
    (lambda h: h["meta"].update(shrunk="no"), None, "meta.shrunk: 'no' is not true or false"),
    (lambda h: h["meta"].update(split={"val_size": -1}), None, "meta.split.val_size: -1 is not a whole number >= 0"),
    (lambda h: h["meta"].update(shared_bits={"fc2.weight": 17}), None, "meta.shared_bits['fc2.weight']: 17 is not"),
    (lambda h: h["meta"].update(notes=[float("inf")]), None, "meta.notes[0]: inf is not a finite number"),
])  # fmt: skip
def test_each_field_is_checked(base, tmp_path, edit, edit_tensors, field):
    path = craft(base, tmp_path / "x.prunet", edit, edit_tensors)
    with pytest.raises(CompactFileError) as info:
        prunet.load(path)
    assert str(info.value).startswith(f"{path}") and field in str(info.value), str(info.value)
    assert "\n" not in str(info.value)


def test_a_header_nested_too_deep_for_json_is_one_line(base, tmp_path):
    path = tmp_path / "deep.prunet"
    save_file(load_file(str(base)), str(path), metadata={_META_KEY: "[" * 100_000 + "]" * 100_000})
    with pytest.raises(CompactFileError, match="not valid JSON"):
        prunet.load(path)


def test_huffman_refuses_code_lengths_that_are_no_prefix_code():
    with pytest.raises(ValueError, match="not those of a prefix code"):
        huffman.decode(b"\x00", np.array([1, 1, 1], dtype=np.uint8), 3)


# --- the metadata schema --------------------------------------------------------------------------

@pytest.mark.parametrize("meta", [
    {},
    {"model": None},
    META,
    {**META, "shared_bits": {"fc2.weight": 4}, "x": [1, 2], "notes": {"a": [None, "b", 1.5]}},
    {"model": "nets.py:small", "model_kwargs": {"widths": [64, 128], "act": {"name": "relu"}, "seed": 2**40}},
    {"input_shape": [3, 224, 224]},
])  # fmt: skip
def test_valid_metadata_passes_unchanged(meta):
    assert validate_meta(meta, "f") == meta


def test_the_meta_examples_run():
    assert doctest.testmod(prunet.meta, raise_on_error=False).failed == 0


# --- fuzz: one header field changed at a time ------------------------------------------------------

# Values swapped in. `module:function` strings are factories: the fuzz adds some (and a file of its own
# that leaves a marker when imported or called), which must never run without trust.
POOL = ["abc", "", 0, 1, 7, -1, 2.5, -1e308, 10**12, 2**70, float("nan"), float("inf"), True, False, None,
        [], [1, 2, 3], ["abc"], [[1]], {}, {"abc": 1}]
CASES = 600


def paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key and index of a JSON tree, at every depth (the checksum left out: the fuzz recomputes it)."""
    if isinstance(node, dict):
        items = [(k, v) for k, v in node.items() if prefix or k != "checksum"]
    elif isinstance(node, list):
        items = list(enumerate(node))
    else:
        return []
    return [p for k, v in items for p in [prefix + (k,), *paths(v, prefix + (k,))]]


def mutate(header: dict, rng: random.Random, factories: list[str]) -> str:
    """Replace one field at random (or delete it); returns what was done, for the failure message.

    One case in ten names a factory as the model, the attack itself; the others may put one anywhere.
    """
    if rng.random() < 0.1 and isinstance(header.get("meta"), dict):
        header["meta"]["model"] = rng.choice(factories)
        return f"meta.model = {header['meta']['model']!r}"
    path = rng.choice(paths(header))
    parent = functools.reduce(lambda node, key: node[key], path[:-1], header)
    if rng.random() < 0.1:
        del parent[path[-1]]
        return f"deleted {list(path)}"
    value = copy.deepcopy(rng.choice(POOL + factories))
    parent[path[-1]] = value
    return f"{list(path)} = {value!r}"


def check_loaded(model: torch.nn.Module, what: str) -> None:
    out = model(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 10) and torch.isfinite(out).all(), what


@pytest.mark.slow
def test_fuzz_one_field_at_a_time(base, tmp_path, monkeypatch):
    # The kernel choice is timed 15 times a layer, caches evicted: once is enough to run the same path.
    export_module = importlib.import_module("prunet.sparse.export")  # the package's `export` is the function
    monkeypatch.setattr(export_module, "sparsify", functools.partial(sparsify, repeats=1))
    marker = tmp_path / "RAN"
    evil = tmp_path / "evil_factory.py"
    evil.write_text(f"open({str(marker)!r}, 'w').close()\n\n\ndef make(**kwargs):\n    open({str(marker)!r}, 'w').close()\n")
    factories = ["os:system", "builtins:eval", "subprocess:run", f"{evil}:make", "prunet.cli:main"]
    rng = random.Random(0)
    original, tensors = header_of(base), load_file(str(base))
    outcomes = {"loaded": 0, "refused": 0, "untrusted": 0}
    for case in range(CASES):
        header = copy.deepcopy(original)
        header.pop("checksum")
        what = f"case {case}: {mutate(header, rng, factories)}"
        names_code = isinstance(header.get("meta"), dict) and header["meta"].get("model") in factories
        header["checksum"] = _checksum(tensors, header)
        path = tmp_path / "fuzz.prunet"
        save_file(tensors, str(path), metadata={_META_KEY: json.dumps(header)})
        for sparse in (False, True):
            try:
                model = prunet.load(path, sparse=sparse)
            except USER_ERRORS as e:
                assert "\n" not in str(e) and str(e), f"{what}: {e!r}"
                outcomes["refused"] += 1
                outcomes["untrusted"] += isinstance(e, UntrustedFactoryError)
                continue
            except Exception as e:  # noqa: BLE001  the failure this test looks for
                pytest.fail(f"{what}, sparse={sparse}: {type(e).__name__}: {str(e)[:300]}")
            assert not names_code, f"{what}: loaded a model whose file names code"
            with torch.no_grad():
                check_loaded(model, f"{what}, sparse={sparse}")
            outcomes["loaded"] += 1
        assert not marker.exists(), f"{what}: the file's factory ran"
    assert outcomes["loaded"] > 20 and outcomes["refused"] > 100, outcomes  # both sides were exercised
    assert outcomes["untrusted"] > 50, outcomes  # and the attack itself, many times
