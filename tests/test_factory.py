"""The user's own model and data, named in a recipe: imported, called, run end to end, reloaded through the factory.

The worked example is ``examples/resnet.py``: a CIFAR-style ResNet (batch norm, shortcuts,
not an ``nn.Sequential``) on a learnable toy dataset that goes through a ``DataLoader``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import TensorDataset

from prunet import sparse
from prunet.checkpoint import load_checkpoint
from prunet.cli import main
from prunet.config import ConfigError, recipe_from_dict, set_dotted
from prunet.data import Split, head, load_data, loader
from prunet.factory import FactoryError, UntrustedFactoryError, import_factory

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "resnet.py"


def toy_recipe(tmp_path: Path, **changes) -> dict:
    recipe = {
        "name": "toy",
        "seed": 0,
        "output_dir": str(tmp_path / "runs"),
        "model": {"factory": f"{EXAMPLE}:resnet", "kwargs": {"depth": 8, "width": 8, "num_classes": 4}},
        "data": {"factory": f"{EXAMPLE}:synthetic_splits",
                 "kwargs": {"n_train": 512, "n_val": 128, "n_test": 128, "size": 12},
                 "val_size": 128, "batch_size": 64, "eval_batch_size": 128},
        "train": {"epochs": 2, "lr": 0.05},
        "prune": {"rounds": [{"criterion": "threshold", "quality": 0.6, "epochs": 1},
                             {"criterion": "threshold", "quality": 0.8, "epochs": 1}]},
    }
    for key, value in changes.items():
        set_dotted(recipe, key, value)
    return recipe


def write(tmp_path: Path, recipe: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("prunet: error: ")
    return err


@pytest.mark.slow
def test_a_factory_model_and_dataset_run_through_run_sensitivity_and_report(tmp_path, capsys):
    recipe = toy_recipe(tmp_path, quantize={"bits": {"conv": 6, "fc": 5}, "epochs": 1})
    path = write(tmp_path, recipe)
    assert main(["run", str(path)]) == 0
    run_dir = tmp_path / "runs" / "toy"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["dataset"] == recipe["data"]["factory"]
    assert summary["compression"] > 2.0 and len(summary["rounds"]) == 2
    assert summary["final"]["val_acc"] > 60.0  # four classes: the toy task is learnt
    # Neuron removal needs a chain of layers: the run says so instead of failing.
    assert "nn.Sequential" in summary["neurons"]["skipped"]

    # The checkpoint records the factory and rebuilds the model through it, masks exact: once trusted.
    with pytest.raises(UntrustedFactoryError, match="--trust-factory"):
        load_checkpoint(run_dir / "final.safetensors")
    model, pruner, meta = load_checkpoint(run_dir / "final.safetensors", trust_factory=True)
    assert type(model).__name__ == "ResNet" and meta["model"] == recipe["model"]["factory"]
    assert meta["model_kwargs"] == recipe["model"]["kwargs"] and meta["input_shape"] == [1, 12, 12]
    for t in pruner.targets:
        assert torch.all(t.module.weight[t.mask == 0] == 0)
    kept = sum(int(t.mask.sum()) for t in pruner.targets)
    assert kept == summary["weights_kept"]

    # Its compact files load back, through the trusted factory or into the user's own module, to the same outputs.
    x = torch.randn(5, 1, 12, 12)
    model.eval()
    own = import_factory(recipe["model"]["factory"])(**recipe["model"]["kwargs"])
    with torch.no_grad():
        expected = model(x)
        for loaded in (sparse.load(run_dir / "final.prunet", trust_factory=True),
                       sparse.load(run_dir / "final.prunet", sparse=True, trust_factory=[recipe["model"]["factory"]]),
                       sparse.load(run_dir / "final.prunet", model=own)):
            assert torch.allclose(loaded(x), expected, atol=1e-5)
    assert (run_dir / "final_shared.prunet").is_file() and summary["quantize"]["bits"]

    assert main(["sensitivity", str(run_dir / "dense.safetensors"), "--values", "0,0.5,1"]) == 2
    assert "--trust-factory" in one_line_error(capsys)
    assert main(["sensitivity", str(run_dir / "dense.safetensors"), "--values", "0,0.5,1", "--trust-factory"]) == 0
    with open(run_dir / "sensitivity.csv") as f:
        layers = {row["layer"] for row in csv.DictReader(f)}
    assert layers == {t.layer for t in pruner.targets}  # every conv of the blocks and shortcuts, and the fc

    assert main(["report", str(run_dir), "--trust-factory"]) == 0
    report = (run_dir / "report.md").read_text()
    assert "Dead neurons were not removed" in report and "stages.2.conv2" in report
    assert "## Sensitivity" in report


@pytest.mark.slow
def test_a_factory_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """Resume of a factory run: the model is rebuilt through the factory from the resume point."""
    import prunet.pipeline as pipeline
    from prunet import runfolder

    recipe = recipe_from_dict(toy_recipe(tmp_path, **{"train.epochs": 2}))
    whole = pipeline.run(recipe, run_dir=tmp_path / "whole", log=lambda s: None)

    real, saves = runfolder.RunFolder.save_progress, []

    def dies_in_round_one(self, progress):
        real(self, progress)
        saves.append(progress.get("fit_phase"))
        if progress.get("fit_phase") == "round1":
            raise KeyboardInterrupt

    monkeypatch.setattr(runfolder.RunFolder, "save_progress", dies_in_round_one)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(recipe, run_dir=tmp_path / "stopped", log=lambda s: None)
    monkeypatch.setattr(runfolder.RunFolder, "save_progress", real)
    # The resume point names the factories: they run only when the user trusts the folder.
    with pytest.raises(UntrustedFactoryError, match="model.factory"):
        pipeline.resume(tmp_path / "stopped", log=lambda s: None)
    resumed = pipeline.resume(tmp_path / "stopped", trust_factory=True, log=lambda s: None)
    assert resumed["weights_kept"] == whole["weights_kept"]
    assert resumed["final"] == whole["final"]
    a, _, _ = load_checkpoint(tmp_path / "whole" / "final.safetensors", trust_factory=True)
    b, _, _ = load_checkpoint(tmp_path / "stopped" / "final.safetensors", trust_factory=True)
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k


def test_factory_data_without_validation_holds_out_val_size_with_the_split_seed(tmp_path):
    cfg = recipe_from_dict(toy_recipe(tmp_path)).data
    a, b = load_data(cfg), load_data(cfg)
    assert (len(a.train), len(a.val), len(a.test)) == (512, 128, 128)
    assert a.val.indices == b.val.indices and not set(a.val.indices) & set(a.train.indices)
    other = load_data(recipe_from_dict(toy_recipe(tmp_path, **{"data.split_seed": 1})).data)
    assert other.val.indices != a.val.indices


def test_the_dataloader_path_gives_the_batches_the_tensor_path_gives():
    """A Split and the same examples as a plain Dataset: same order, same values, on one rank or two."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (203, 28, 28), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (203,), generator=g)
    split = Split(images, labels)
    mean, std = 0.3, 0.4
    plain = TensorDataset(((images.float() / 255 - mean) / std).unsqueeze(1), labels)
    for world, train in ((1, False), (1, True), (2, True), (2, False)):
        for rank in range(world):
            kw = dict(shuffle=True, rank=rank, world_size=world, train=train)
            a = list(loader(split, 32, generator=torch.Generator().manual_seed(5), mean=mean, std=std, **kw))
            b = list(loader(plain, 32, generator=torch.Generator().manual_seed(5), mean=0.0, std=1.0, **kw))
            assert len(a) == len(b)
            for (xa, ya), (xb, yb) in zip(a, b):
                assert torch.equal(ya, yb) and torch.allclose(xa, xb, atol=1e-6)


def test_training_shards_split_every_batch_evenly_between_ranks():
    """Two ranks take halves of each global batch; the leftover example is dropped, so both step alike."""
    data = TensorDataset(torch.arange(101).float().unsqueeze(1), torch.zeros(101, dtype=torch.int64))
    whole = [x.flatten().tolist() for x, _ in
             loader(data, 20, shuffle=True, generator=torch.Generator().manual_seed(1))]
    parts = [[x.flatten().tolist() for x, _ in loader(data, 20, shuffle=True, generator=torch.Generator().manual_seed(1),
                                                      rank=r, world_size=2, train=True)] for r in (0, 1)]
    assert len(parts[0]) == len(parts[1]) == 5
    for k in range(5):  # the k-th step of both ranks together is the k-th batch of one process
        assert sorted(parts[0][k] + parts[1][k]) == sorted(whole[k])
    covered = sorted(v for p in parts for batch in p for v in batch)
    assert len(covered) == 100 and len(set(covered)) == 100
    with pytest.raises(ValueError, match="does not split over 2"):
        list(loader(data, 15, shuffle=False, rank=0, world_size=2, train=True))


def test_a_workers_dataloader_gives_the_same_batches(tmp_path):
    cfg = recipe_from_dict(toy_recipe(tmp_path)).data
    data = load_data(cfg)
    a = list(loader(data.val, 50, shuffle=False))
    b = list(loader(data.val, 50, shuffle=False, workers=2))
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


@pytest.mark.parametrize("change, words", [
    ({"model.factory": "no_such_pkg.nets:resnet"}, ["model.factory", "cannot import no_such_pkg"]),
    ({"model.factory": f"{EXAMPLE}:no_such_fn"}, ["model.factory", "no 'no_such_fn'"]),
    ({"model.factory": "nets.py:resnet"}, ["model.factory", "no file", "nets.py"]),
    ({"model.kwargs": {"depth": 7}}, ["model.factory", "raised ValueError", "depth must be 6n + 2"]),
    ({"data.factory": f"{EXAMPLE}:resnet", "data.kwargs": {}}, ["data.factory", "returned ResNet"]),
    ({"data.kwargs": {"n_train": 100, "n_val": 0, "size": 12}, "data.val_size": 500}, ["data.val_size", "(0, 100)"]),
    ({"model.kwargs": {"depth": 8, "width": 8, "num_classes": 2}}, ["model.kwargs", "2 outputs", "label 3"]),
])
def test_a_bad_factory_is_one_line_and_exit_2(tmp_path, capsys, change, words):
    recipe = toy_recipe(tmp_path, **change)
    assert main(["run", str(write(tmp_path, recipe))]) == 2
    err = one_line_error(capsys)
    for w in words:
        assert w in err, (w, err)
    assert not (tmp_path / "runs" / "toy").exists()  # nothing written


def test_recipe_fields_of_factories_are_checked():
    with pytest.raises(ConfigError, match="model.factory: 'resnet' is not MODULE:FUNCTION"):
        recipe_from_dict({"model": {"factory": "resnet"}})
    with pytest.raises(ConfigError, match="model.kwargs: applies to a model.factory"):
        recipe_from_dict({"model": {"kwargs": {"depth": 8}}})
    with pytest.raises(ConfigError, match="model.dropout: applies to registry models"):
        recipe_from_dict({"model": {"factory": "a:b", "dropout": 0.5}})
    with pytest.raises(ConfigError, match="data.workers"):
        recipe_from_dict({"data": {"workers": -1}})


def test_import_factory_reads_modules_and_files(tmp_path, monkeypatch):
    (tmp_path / "mynets.py").write_text("def small(n=3):\n    return n * 2\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert import_factory("mynets:small")(n=4) == 8
    assert import_factory("mynets.py:small")() == 6
    with pytest.raises(FactoryError, match="is not MODULE:FUNCTION"):
        import_factory("mynets")
    with pytest.raises(FactoryError, match="is a int, not a function"):
        (tmp_path / "consts.py").write_text("N = 3\n")
        import_factory("consts.py:N")


def write_npz(folder: Path, n: dict[str, int], seed: int = 0) -> None:
    import numpy as np

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    patterns = rng.normal(size=(3, 1, 28, 28)).astype(np.float32)
    for name, count in n.items():
        y = rng.integers(0, 3, count)
        np.savez(folder / f"{name}.npz", x=patterns[y] + rng.normal(size=(count, 1, 28, 28)).astype(np.float32), y=y)


def test_a_folder_of_npz_arrays_is_a_dataset_without_code(tmp_path, capsys):
    write_npz(tmp_path / "arrays", {"train": 400, "test": 100})
    recipe = {"name": "npz", "output_dir": str(tmp_path / "runs"),
              "model": {"name": "lenet_300_100", "num_classes": 3},
              "data": {"factory": "prunet.data.npz:splits", "kwargs": {"folder": str(tmp_path / "arrays")},
                       "val_size": 100, "batch_size": 50},
              "train": {"epochs": 1}, "prune": {"rounds": [{"quality": 0.5, "epochs": 1}]}}
    assert main(["run", str(write(tmp_path, recipe))]) == 0
    summary = json.loads((tmp_path / "runs" / "npz" / "summary.json").read_text())
    assert summary["final"]["val_acc"] > 60.0 and summary["compression"] > 1.2
    data = load_data(recipe_from_dict(recipe).data)
    assert (len(data.train), len(data.val), len(data.test)) == (300, 100, 100)

    (tmp_path / "arrays" / "test.npz").write_bytes(b"not a zip")
    assert main(["run", str(write(tmp_path, recipe)), "--overwrite"]) == 2
    assert "test.npz is not a readable .npz file" in one_line_error(capsys)
    (tmp_path / "arrays" / "test.npz").unlink()
    assert main(["run", str(write(tmp_path, recipe)), "--overwrite"]) == 2
    assert "test.npz is missing" in one_line_error(capsys)


def test_a_file_factory_dataset_reaches_spawned_dataloader_workers(tmp_path):
    """macOS, Windows and Python >= 3.14 start DataLoader workers by spawn or forkserver: they import the file too."""
    import multiprocessing

    cfg = recipe_from_dict(toy_recipe(tmp_path, **{"data.factory": f"{EXAMPLE}:fashion_splits",
                                                   "data.kwargs": {"size": 28, "val_size": 100}})).data
    data = load_data(cfg)
    expected = list(loader(head(data.val, 64), 32, shuffle=False))
    ctx = multiprocessing.get_context("spawn")
    from torch.utils.data import DataLoader
    from prunet.data.loading import _collate

    got = list(DataLoader(head(data.val, 64), batch_size=32, num_workers=1, multiprocessing_context=ctx,
                          collate_fn=_collate))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(expected, got))


def test_a_relative_factory_path_works_from_any_folder_later(tmp_path, monkeypatch):
    """The recipe names examples/resnet.py from the repository root; the report, a reload and a resume run elsewhere."""
    monkeypatch.chdir(ROOT)
    recipe = toy_recipe(tmp_path)
    recipe["model"]["factory"] = "examples/resnet.py:resnet"
    recipe["data"]["factory"] = "examples/resnet.py:synthetic_splits"
    recipe["prune"]["rounds"] = recipe["prune"]["rounds"][:1]
    assert main(["run", str(write(tmp_path, recipe))]) == 0
    run_dir = tmp_path / "runs" / "toy"
    monkeypatch.chdir(tmp_path)
    assert main(["report", str(run_dir), "--trust-factory"]) == 0
    model, _, meta = load_checkpoint(run_dir / "final.safetensors", trust_factory=True)
    assert meta["model"] == f"{EXAMPLE}:resnet" and type(model).__name__ == "ResNet"
    assert type(sparse.load(run_dir / "final.prunet", trust_factory=True)).__name__ == "ResNet"


def test_from_a_checkpoint_of_other_factory_data_is_refused(tmp_path, capsys):
    """Another factory split would put the checkpoint's training examples into this run's validation split."""
    recipe = toy_recipe(tmp_path, **{"prune.rounds": []})
    assert main(["train", str(write(tmp_path, recipe))]) == 0
    dense = tmp_path / "runs" / "toy" / "dense.safetensors"
    other = toy_recipe(tmp_path, **{"data.kwargs": {"n_train": 512, "n_val": 128, "n_test": 128, "size": 12,
                                                    "seed": 1}, "name": "other"})
    assert main(["run", str(write(tmp_path, other)), "--from", str(dense)]) == 2
    err = one_line_error(capsys)
    assert err.startswith("prunet: error: data: ") and "was trained with split" in err


def test_a_factory_folder_shadows_nothing_and_odd_file_names_still_import(tmp_path):
    """The factory's folder goes at the end of sys.path: its random.py does not replace the standard library's,
    in this process or in a spawned DataLoader worker; a stem that is no module name imports all the same."""
    import multiprocessing

    from torch.utils.data import DataLoader

    folder = tmp_path / "proj"
    folder.mkdir()
    (folder / "random.py").write_text("raise RuntimeError('the standard library was shadowed')\n")
    (folder / "toydata.py").write_text(
        "import torch\nfrom torch.utils.data import Dataset\n\n"
        "class Squares(Dataset):\n    def __len__(self):\n        return 8\n\n"
        "    def __getitem__(self, i):\n        return torch.tensor([float(i * i)]), i % 2\n\n"
        "def make():\n    return Squares()\n")
    (folder / "nets.v2.py").write_text("def make():\n    return 'v2'\n")
    dataset = import_factory(f"{folder}/toydata.py:make")()
    batches = list(DataLoader(dataset, batch_size=4, num_workers=1,
                              multiprocessing_context=multiprocessing.get_context("spawn")))
    assert [b[0].flatten().tolist() for b in batches] == [[0, 1, 4, 9], [16, 25, 36, 49]]
    assert import_factory(f"{folder}/nets.v2.py:make")() == "v2"


def test_a_factory_file_in_the_current_folder_imports_under_its_own_name(tmp_path, monkeypatch):
    (tmp_path / "herenets.py").write_text("def make():\n    return __name__\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend("")  # as `python -m prunet` has it
    assert import_factory("herenets.py:make")() == "herenets"  # importable by name: picklable for any worker


USER_CODE = '''
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset


class Tied(nn.Module):
    """Two layers sharing one weight, used in a forward whose order is not the definition order."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(32, 4)
        self.proj = nn.Linear(32, 32)
        self.proj2 = nn.Linear(32, 32)
        self.proj2.weight = self.proj.weight
        self.inp = nn.Linear(144, 32)

    def forward(self, x):
        x = F.relu(self.inp(x.flatten(1)))
        x = F.relu(self.proj(x))
        x = F.relu(self.proj2(x))
        return self.head(x)


def tied():
    return Tied()


def not_a_module():
    return "a string"


def data(labels="good", n=600):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randn(4, 1, 12, 12, generator=g)[y] + 0.5 * torch.randn(n, 1, 12, 12, generator=g)
    if labels == "fractional":
        y = y.float() + 0.5
    elif labels == "one-hot":
        y = F.one_hot(y, 4).float()
    elif labels == "late-bad":
        y = y.clone()
        y[-1] = 12
    elif labels == "tensors":
        return x, None, x
    return TensorDataset(x, y), None, TensorDataset(x[:100], y[:100])
'''


def user_recipe(tmp_path: Path, model: str = "tied", labels: str = "good") -> dict:
    code = tmp_path / "usercode.py"
    code.write_text(USER_CODE)
    return {"name": "user", "output_dir": str(tmp_path / "runs"),
            "model": {"factory": f"{code}:{model}"},
            "data": {"factory": f"{code}:data", "kwargs": {"labels": labels}, "val_size": 100, "batch_size": 50},
            "train": {"epochs": 1}, "prune": {"rounds": [{"quality": 0.5, "epochs": 1}]}}


def test_a_model_with_a_tied_weight_runs_saves_and_reloads_with_the_tie(tmp_path):
    assert main(["run", str(write(tmp_path, user_recipe(tmp_path)))]) == 0
    run_dir = tmp_path / "runs" / "user"
    model, pruner, _ = load_checkpoint(run_dir / "final.safetensors", trust_factory=True)
    assert model.proj2.weight is model.proj.weight  # one parameter, one mask
    assert [t.layer for t in pruner.targets] == ["head", "proj", "inp"]
    x = torch.randn(3, 1, 12, 12)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(sparse.load(run_dir / "final.prunet", trust_factory=True)(x), model(x), atol=1e-6)


@pytest.mark.parametrize("model, labels, words", [
    ("not_a_module", "good", ["model.factory", "returned a str, not a torch.nn.Module"]),
    ("tied", "fractional", ["labels must be whole numbers", "0.5"]),
    ("tied", "one-hot", ["a label must be one integer", "shape (4,)"]),
    ("tied", "late-bad", ["label 12", "4 outputs"]),
    ("tied", "tensors", ["data.factory", "is a tensor, not a dataset", "TensorDataset"]),
])
def test_user_code_mistakes_are_one_line_and_exit_2(tmp_path, capsys, model, labels, words):
    assert main(["run", str(write(tmp_path, user_recipe(tmp_path, model, labels)))]) == 2
    err = one_line_error(capsys)
    for w in words:
        assert w in err, (w, err)


@pytest.mark.parametrize("raised, words", [
    ("class Boom(BaseException):\n    pass\n\n\ndef splits():\n    raise Boom('not an Exception')\n",
     ["data.factory", "raised Boom: not an Exception"]),
    ("import sys\n\n\ndef splits():\n    sys.exit(3)\n", ["data.factory", "raised SystemExit: 3"]),
    ("raise BaseException('at import')\n\n\ndef splits():\n    pass\n", ["data.factory", "raised BaseException"]),
])
def test_a_factory_raising_a_base_exception_is_one_line(tmp_path, capsys, raised, words):
    """Not only Exceptions: a BaseException or sys.exit in the user's code is theirs, told in one line (exit 2)."""
    (tmp_path / "odd_data.py").write_text(raised)
    recipe = toy_recipe(tmp_path, **{"data.factory": f"{tmp_path / 'odd_data.py'}:splits", "data.kwargs": {}})
    assert main(["run", str(write(tmp_path, recipe))]) == 2
    err = one_line_error(capsys)
    for w in words:
        assert w in err, (w, err)
