"""The pipeline end to end on a Fashion-MNIST slice: the run folder, monotone masks, stopping, resuming.

One tiny run (1000 training images, 1 dense epoch, two 1-epoch rounds) is shared
by the tests that only read its folder.
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from conftest import REAL_FASHION, TINY_RECIPE, cached_load_dataset, use_data_cache

import prunet.phases
import prunet.pipeline
from prunet.analysis.sensitivity import SensitivityRow, write_sensitivity_csv
from prunet.checkpoint import CheckpointError, load_checkpoint, read_checkpoint
from prunet.config import ConfigError, load_recipe, recipe_from_dict
from prunet.data import DataError
from prunet.pipeline import run
from prunet.runfolder import RunError, RunFolder
from prunet.sparse import load
from prunet.train import Normalization, evaluate

pytestmark = pytest.mark.skipif(not REAL_FASHION.is_dir(), reason="dataset-fashion-mnist not installed")


def run_recipe(data: dict, run_dir, **kwargs) -> dict:
    lines: list[str] = []
    summary = run(recipe_from_dict(data), run_dir=run_dir, log=lines.append, **kwargs)
    summary["_log"] = lines
    return summary


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """(recipe dict, run folder, summary) of the tiny recipe, run once for this module."""
    folder = tmp_path_factory.mktemp("base") / "tiny"
    data = copy.deepcopy(TINY_RECIPE)
    with pytest.MonkeyPatch.context() as mp:
        use_data_cache(mp)
        summary = run_recipe(data, folder)
    return data, folder, summary


def masks_of(path) -> dict[str, torch.Tensor]:
    state, _ = read_checkpoint(path)
    return {k: v for k, v in state.items() if k.endswith("_prunet_mask")}


def read_metrics(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


# --- the run folder ---------------------------------------------------------------------------


def test_run_folder_holds_every_artifact(base_run):
    _, folder, _ = base_run
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "dense.safetensors", "round1.safetensors",
                 "round2.safetensors", "final.safetensors", "final_shrunk.safetensors", "final.prunet"):
        assert (folder / name).is_file(), name
    assert not list(folder.glob("*.tmp"))


def test_config_yaml_is_the_recipe_as_run(base_run):
    data, folder, _ = base_run
    assert load_recipe(folder / "config.yaml") == recipe_from_dict(copy.deepcopy(data))


def test_metrics_lines(base_run):
    _, folder, _ = base_run
    events = read_metrics(folder)
    assert [(e["event"], e.get("phase")) for e in events] == [
        ("epoch", "dense"), ("dense", None), ("epoch", "round1"), ("round", None), ("epoch", "round2"), ("round", None),
    ]
    epoch = events[0]
    assert {"epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds"} <= set(epoch)
    assert {"val_acc", "test_acc", "val_loss", "test_loss"} <= set(events[1])
    assert [e["round"] for e in events if e["event"] == "round"] == [1, 2]
    assert events[2]["lr"] == pytest.approx(0.05 * 0.1)  # retraining at lr_fraction of train.lr


def test_summary(base_run):
    _, folder, summary = base_run
    on_disk = json.loads((folder / "summary.json").read_text())
    assert on_disk["weights_kept"] == summary["weights_kept"]
    assert on_disk["stopped"] is None
    assert [r["accepted"] for r in on_disk["rounds"]] == [True, True]
    masks = masks_of(folder / "final.safetensors")
    kept = sum(int(m.sum()) for m in masks.values())
    assert on_disk["weights"] == 266_200 and on_disk["weights_kept"] == kept
    assert on_disk["compression"] == pytest.approx(266_200 / kept)
    assert on_disk["parameters"] == 266_610 and on_disk["parameters_kept"] == 266_610 - (266_200 - kept)
    assert [(r["layer"], r["kept"]) for r in on_disk["layers"]] == [
        (k.split(".")[0], int(m.sum())) for k, m in masks.items()
    ]
    assert on_disk["rounds"][1]["weights_kept"] == kept
    assert on_disk["rounds"][0]["weights_kept"] > kept  # the second round pruned more


def test_masks_only_lose_entries_from_round_to_round(base_run):
    _, folder, _ = base_run
    assert masks_of(folder / "dense.safetensors") == {}
    first, second = masks_of(folder / "round1.safetensors"), masks_of(folder / "round2.safetensors")
    assert set(first) == set(second) == {"fc1.weight_prunet_mask", "fc2.weight_prunet_mask", "fc3.weight_prunet_mask"}
    for k in first:
        assert not bool(((second[k] != 0) & (first[k] == 0)).any()), k
        assert int(second[k].sum()) < int(first[k].sum()), k
    for name in ("round1", "round2", "final"):
        state, _ = read_checkpoint(folder / f"{name}.safetensors")
        for k in first:
            weight = state[k[: -len("_prunet_mask")]]
            assert bool((weight[state[k] == 0] == 0).all()), f"{name}: {k}"


def test_final_is_the_last_round_and_its_accuracy_is_reported(base_run):
    data, folder, summary = base_run
    final, _ = read_checkpoint(folder / "final.safetensors")
    last, _ = read_checkpoint(folder / "round2.safetensors")
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)
    model, pruner, meta = load_checkpoint(folder / "final.safetensors")
    assert meta["phase"] == "final" and meta["model"] == "lenet_300_100"
    full = cached_load_dataset("fashion-mnist", data_dir=data["data"]["data_dir"], val_size=500, seed=0)
    _, test_acc = evaluate(model, full.test, Normalization(full.mean, full.std))
    assert test_acc == summary["final"]["test_acc"]


def test_final_shrunk_computes_what_final_computes(base_run):
    _, folder, summary = base_run
    final, _, _ = load_checkpoint(folder / "final.safetensors")
    small, _, meta = load_checkpoint(folder / "final_shrunk.safetensors")
    assert meta["phase"] == "final_shrunk"
    assert sum(p.numel() for p in small.parameters()) == summary["neurons"]["params_after"]
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(small.eval()(x), final.eval()(x), atol=1e-5, rtol=0)


def test_round_retrains_only_the_named_layers(tiny_recipe, fast_data, tmp_path):
    tiny_recipe["prune"]["rounds"] = [
        {"criterion": "threshold", "quality": 1.0, "prune": ["fc1"], "train": ["fc3"], "epochs": 1},
    ]
    folder = tmp_path / "frozen"
    run_recipe(tiny_recipe, folder)
    dense, _ = read_checkpoint(folder / "dense.safetensors")
    after, _ = read_checkpoint(folder / "round1.safetensors")
    assert torch.equal(after["fc1.weight"], dense["fc1.weight"] * after["fc1.weight_prunet_mask"])  # pruned, not trained
    assert int(after["fc1.weight_prunet_mask"].sum()) < 235_200
    for k in ("fc1.bias", "fc2.weight", "fc2.bias"):
        assert torch.equal(after[k], dense[k]), k
    assert not torch.equal(after["fc3.weight"], dense["fc3.weight"])
    assert int(after["fc2.weight_prunet_mask"].sum()) == 30_000 and int(after["fc3.weight_prunet_mask"].sum()) == 1000


def test_dropout_adjusted_while_retraining(tiny_recipe, fast_data, tmp_path):
    tiny_recipe["model"]["dropout"] = 0.5
    tiny_recipe["prune"]["rounds"] = tiny_recipe["prune"]["rounds"][:1]
    folder = tmp_path / "dropout"
    summary = run_recipe(tiny_recipe, folder)
    kept = {r["layer"]: r["kept"] for r in summary["rounds"][0]["layers"]}
    assert summary["rounds"][0]["dropout"] == {
        "drop1": pytest.approx(0.5 * (kept["fc2"] / 30_000) ** 0.5),
        "drop2": pytest.approx(0.5 * (kept["fc3"] / 1000) ** 0.5),
    }
    model, _, _ = load_checkpoint(folder / "final.safetensors")  # rebuilt with the recipe's ratio
    assert (model.drop1.p, model.drop2.p) == (0.5, 0.5)


@pytest.mark.parametrize("problem", ["data_dir", "checkpoint"])
def test_run_that_fails_to_start_leaves_an_existing_run_folder_alone(tiny_recipe, fast_data, tmp_path, problem):
    folder = tmp_path / "existing"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text('{"event": "dense"}\n')
    (folder / "config.yaml").write_text("name: earlier\n")
    kwargs = {}
    if problem == "data_dir":
        tiny_recipe["data"]["data_dir"] = str(tmp_path / "nonexistent")
        error = DataError
    else:
        (tmp_path / "bad.safetensors").write_bytes(b"garbage")
        kwargs["from_checkpoint"] = tmp_path / "bad.safetensors"
        error = CheckpointError
    with pytest.raises(error):
        run_recipe(tiny_recipe, folder, **kwargs)
    assert (folder / "metrics.jsonl").read_text() == '{"event": "dense"}\n'
    assert (folder / "config.yaml").read_text() == "name: earlier\n"


# --- stopping ---------------------------------------------------------------------------------


def test_max_accuracy_drop_keeps_the_previous_round(tiny_recipe, fast_data, tmp_path):
    tiny_recipe["prune"]["max_accuracy_drop"] = 10.0
    tiny_recipe["prune"]["rounds"] = [
        {"criterion": "threshold", "quality": 0.3, "epochs": 1},
        {"criterion": "sparsity", "sparsity": 0.999, "epochs": 0},  # nothing survives this
        {"criterion": "threshold", "quality": 0.3, "epochs": 1},  # never reached
    ]
    folder = tmp_path / "stop"
    summary = run_recipe(tiny_recipe, folder)
    assert [r["accepted"] for r in summary["rounds"]] == [True, False]
    assert summary["stopped"].startswith("round 2:")
    assert not (folder / "round2.safetensors").exists() and not (folder / "round3.safetensors").exists()
    final, _ = read_checkpoint(folder / "final.safetensors")
    kept, _ = read_checkpoint(folder / "round1.safetensors")
    assert final.keys() == kept.keys() and all(torch.equal(final[k], kept[k]) for k in final)
    assert summary["weights_kept"] == summary["rounds"][0]["weights_kept"]
    assert summary["final"]["val_acc"] == summary["rounds"][0]["val_acc"]
    assert json.loads((folder / "summary.json").read_text())["stopped"] == summary["stopped"]
    assert any(line.startswith("stop: round 2") for line in summary["_log"])


def test_first_round_rejected_keeps_the_dense_model(tiny_recipe, fast_data, tmp_path):
    tiny_recipe["prune"]["max_accuracy_drop"] = 5.0
    tiny_recipe["prune"]["rounds"] = [{"criterion": "global", "sparsity": 0.999, "epochs": 0}]
    folder = tmp_path / "stop1"
    summary = run_recipe(tiny_recipe, folder)
    assert summary["rounds"][0]["accepted"] is False
    assert summary["weights_kept"] == summary["weights"]
    assert summary["final"] == summary["dense"]


# --- resuming from a checkpoint ---------------------------------------------------------------


def test_from_dense_checkpoint_repeats_the_rounds(base_run, fast_data, tmp_path):
    data, base_folder, base_summary = base_run
    folder = tmp_path / "resumed"
    summary = run_recipe(copy.deepcopy(data), folder, from_checkpoint=base_folder / "dense.safetensors")
    events = read_metrics(folder)
    assert not any(e.get("phase") == "dense" for e in events)  # no dense training
    assert summary["dense"] == base_summary["dense"]
    for name in ("round1", "round2"):  # seeded: the same rounds, bit for bit
        mine, _ = read_checkpoint(folder / f"{name}.safetensors")
        theirs, _ = read_checkpoint(base_folder / f"{name}.safetensors")
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs), name


# --- guarding earlier runs and mismatched inputs ------------------------------------------------


def test_second_run_into_a_used_folder_needs_overwrite(base_run, fast_data, tmp_path):
    data, folder, _ = base_run
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    with pytest.raises(RunError, match="--overwrite"):
        run_recipe(copy.deepcopy(data), folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before


@pytest.mark.slow
def test_overwrite_removes_the_earlier_runs_files_and_only_those(tiny_recipe, fast_data, tmp_path):
    folder = tmp_path / "again"
    run_recipe(copy.deepcopy(tiny_recipe), folder)
    assert (folder / "round2.safetensors").exists()
    # A sensitivity table of the earlier dense model, written by prunet into the run folder.
    write_sensitivity_csv([SensitivityRow("fc1", "fc", "threshold", 0.5, 0.6, 80.0, 1.0)],
                          RunFolder(folder).record("sensitivity.csv"))
    # The user's own files, named like prunet's.
    for name in ("notes.txt", "report_notes.txt", "my_export.safetensors"):
        (folder / name).write_text("the user's own file\n")
    (folder / "report_archive").mkdir()
    tiny_recipe["prune"]["rounds"] = tiny_recipe["prune"]["rounds"][:1]
    run_recipe(tiny_recipe, folder, overwrite=True)
    assert (folder / "round1.safetensors").exists() and not (folder / "round2.safetensors").exists()
    assert not (folder / "sensitivity.csv").exists()
    for name in ("notes.txt", "report_notes.txt", "my_export.safetensors"):
        assert (folder / name).read_text() == "the user's own file\n"
    assert (folder / "report_archive").is_dir()


def test_from_checkpoint_of_another_model_is_refused(base_run, fast_data, tmp_path):
    data, base_folder, _ = base_run
    other = copy.deepcopy(data)
    other["model"] = {"name": "lenet_5"}
    other["prune"]["rounds"] = [{"criterion": "sparsity", "sparsity": 0.5, "epochs": 0}]
    with pytest.raises(ConfigError, match="lenet_300_100"):
        run_recipe(other, tmp_path / "x", from_checkpoint=base_folder / "dense.safetensors")
    assert not (tmp_path / "x").exists()


def test_from_checkpoint_with_another_split_is_refused(base_run, fast_data, tmp_path):
    data, base_folder, _ = base_run
    other = copy.deepcopy(data)
    other["data"]["split_seed"] = 1  # its validation images were the checkpoint's training images
    with pytest.raises(ConfigError, match="split"):
        run_recipe(other, tmp_path / "x", from_checkpoint=base_folder / "dense.safetensors")


def test_model_that_does_not_fit_the_data_fails_before_training(tiny_recipe, fast_data, tmp_path):
    tiny_recipe["model"]["num_classes"] = 5
    with pytest.raises(ConfigError, match="model.num_classes: the model has 5 outputs"):
        run_recipe(tiny_recipe, tmp_path / "x")
    tiny_recipe["model"] = {"name": "alexnet", "num_classes": 10}
    with pytest.raises(ConfigError, match="model.name: alexnet does not take"):
        run_recipe(tiny_recipe, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_the_recipe_seed_fixes_the_initial_model(tiny_recipe, fast_data, tmp_path):
    """Same recipe, same seed: the same dense model, bit for bit; another seed, another one."""
    tiny_recipe["train"]["epochs"] = 0
    tiny_recipe["prune"]["rounds"] = []
    states = []
    for seed, folder in ((0, "a"), (0, "b"), (1, "c")):
        tiny_recipe["seed"] = seed
        run_recipe(copy.deepcopy(tiny_recipe), tmp_path / folder)
        states.append(read_checkpoint(tmp_path / folder / "dense.safetensors")[0])
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not torch.equal(states[0]["fc1.weight"], states[2]["fc1.weight"])


def test_the_compact_file_is_the_final_model_and_smaller(base_run):
    _, folder, summary = base_run
    final, _, _ = load_checkpoint(folder / "final.safetensors")
    compact = load(folder / "final.prunet")
    x = torch.randn(16, 1, 28, 28)
    assert (compact(x) - final.eval()(x)).abs().max() <= 1e-6
    assert summary["compact"]["bytes"] == (folder / "final.prunet").stat().st_size
    assert summary["compact"]["dense_file_bytes"] == (folder / "dense.safetensors").stat().st_size
    assert summary["compact"]["ratio_to_dense_file"] > 2  # the tiny recipe prunes two rounds of quality 1


def test_an_interrupted_overwrite_leaves_the_earlier_run_intact(base_run, fast_data, tmp_path, monkeypatch):
    data, base_folder, _ = base_run
    folder = tmp_path / "run"
    shutil.copytree(base_folder, folder)
    (folder / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != ".prunet-lock"}
    real_fit = prunet.phases.fit

    def fit_then_ctrl_c(*args):
        if args[-1].phase == "round1":
            raise KeyboardInterrupt  # Ctrl-C (or SIGTERM) in the middle of the new run
        return real_fit(*args)

    monkeypatch.setattr(prunet.phases, "fit", fit_then_ctrl_c)
    lines: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        run(recipe_from_dict(copy.deepcopy(data)), run_dir=folder, overwrite=True, log=lines.append)
    assert lines[-1].startswith("run stopped: the earlier run") and "back in place" in lines[-1]
    after = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != ".prunet-lock"}
    assert after == before


def test_a_round_that_prunes_everything_finishes_with_a_report(tiny_recipe, fast_data, tmp_path):
    tiny_recipe["prune"]["rounds"] = [{"criterion": "sparsity", "sparsity": 1.0, "epochs": 1}]
    tiny_recipe["prune"]["max_accuracy_drop"] = None
    summary = run_recipe(tiny_recipe, tmp_path / "all")
    assert summary["weights_kept"] == 0 and summary["compression"] is None
    assert "every weight pruned" in summary["_log"][-2]
    assert (tmp_path / "all" / "report.html").is_file()


def test_a_diverging_round_stops_the_ladder_and_keeps_the_last_good_round(tiny_recipe, fast_data, tmp_path):
    tiny_recipe["prune"]["rounds"][1]["lr_fraction"] = 1e8  # round 2 retrains at lr 5e6
    summary = run_recipe(tiny_recipe, tmp_path / "nan")
    assert [r["accepted"] for r in summary["rounds"]] == [True, False]
    assert "round 2: train.lr: the training loss became nan" in summary["stopped"] or \
        "round 2: train.lr: the training loss became inf" in summary["stopped"]
    round1, _, _ = load_checkpoint(tmp_path / "nan" / "round1.safetensors")
    final, _, _ = load_checkpoint(tmp_path / "nan" / "final.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(round1.state_dict().values(), final.state_dict().values()))


def test_a_diverging_dense_phase_is_one_clear_error(tiny_recipe, fast_data, tmp_path):
    tiny_recipe["train"]["lr"] = 1e8
    with pytest.raises(ConfigError, match=r"^train\.lr: the training loss became (nan|inf) in dense epoch 1"):
        run_recipe(tiny_recipe, tmp_path / "dense_nan")


def test_distillation_from_the_dense_model_retrains_the_rounds(base_run, fast_data, tmp_path):
    data, base_folder, base = base_run
    data = copy.deepcopy(data)
    data["prune"]["distill_alpha"] = 0.7
    summary = run_recipe(data, tmp_path / "distilled")
    # Same dense model, same masks of round 1's pruning; the retrained weights (and so round 2's cut) differ.
    assert summary["dense"] == base["dense"]
    assert summary["rounds"][0]["val_acc_pruned"] == base["rounds"][0]["val_acc_pruned"]
    a, _ = read_checkpoint(tmp_path / "distilled" / "round1.safetensors")
    b, _ = read_checkpoint(base_folder / "round1.safetensors")
    assert not torch.equal(a["fc1.weight"], b["fc1.weight"])
    assert torch.equal(a["fc1.weight_prunet_mask"], b["fc1.weight_prunet_mask"])


@pytest.mark.slow
def test_target_rounds_take_relative_qualities_from_the_sensitivity_analysis(base_run, fast_data, tmp_path):
    from prunet.analysis.sensitivity import propose_qualities, sensitivity
    from prunet.data import load_data

    data, base_folder, _ = base_run
    data = copy.deepcopy(data)
    data["prune"]["relative_from_sensitivity"] = 2.0
    data["prune"]["rounds"] = [{"target": 3, "epochs": 0}, {"target": 6, "epochs": 0}]
    summary = run_recipe(data, tmp_path / "sens")
    recipe = recipe_from_dict(data)
    split = load_data(recipe.data)
    dense, _, _ = load_checkpoint(base_folder / "dense.safetensors")  # the same dense model: same seed and data
    proposal = propose_qualities(sensitivity(dense, split.val, Normalization(split.mean, split.std), progress=False),
                                 2.0)
    for r, target in zip(summary["rounds"], (3, 6)):
        assert r["compression"] == pytest.approx(target, rel=0.01)
        used = r["setting"]
        factor = used["fc1"] / proposal["fc1"]
        assert used == pytest.approx({k: factor * v for k, v in proposal.items()})
    assert any("relative qualities from sensitivity" in line for line in summary["_log"])
