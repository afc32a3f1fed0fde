"""Any task in a recipe: ``train.loss`` and ``train.metric`` as factories, judged in the metric's direction.

The user's code these recipes name is this module's own: a tiny character-level language model
(outputs ``(B, T, V)``, targets ``(B, T)``) on a learnable synthetic sequence task (the next
character is the current one plus one), a label-smoothed loss, and a lower-is-better metric.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from torch.utils.data import TensorDataset

import prunet

from prunet.cli import main
from prunet.config import ConfigError, DataConfig, TrainConfig, recipe_from_dict
from prunet.data import first_batch, load_data
from prunet.factory import UntrustedFactoryError
from prunet.analysis.bits import bits_sweep
from prunet.pipeline import _stop_rule, run
from prunet.runfolder import Run
from prunet.sparse.export import example_input_of
from prunet.tasks import CrossEntropy, Metric, Task, accuracy, bits_per_token, make_loss, make_metric
from prunet.train import EpochRecord, FitOptions, Normalization, distillation_loss, evaluate, fit

HERE = Path(__file__).resolve()
VOCAB, LENGTH = 6, 8


# --------------------------------------------------------------------------- the user's code, named by the recipes


def sequences(n_train: int = 96, n_val: int = 32, n_test: int = 32):
    """(train, val, test) of ``(B, T)`` character ids whose targets are the next character: ``(x + 1) % V``."""
    g = torch.Generator().manual_seed(0)

    def split(n: int) -> TensorDataset:
        x = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
        return TensorDataset(x, (x + 1) % VOCAB)
    return split(n_train), split(n_val), split(n_test)


class TinyLM(nn.Module):
    """Embedding -> Linear -> ReLU -> Linear: ``(B, T)`` ids to ``(B, T, V)`` logits."""

    def __init__(self, vocab: int = VOCAB, width: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.hidden = nn.Linear(width, width)
        self.out = nn.Linear(width, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(self.embed(x))))


def tiny_lm(width: int = 16) -> TinyLM:
    return TinyLM(width=width)


def int8_sequences():
    """:func:`sequences` with int8 inputs: a type a file's ``input_dtype`` does not name."""
    return tuple(TensorDataset(d.tensors[0].to(torch.int8), d.tensors[1]) for d in sequences())


class CastLM(TinyLM):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.long())


def cast_lm() -> CastLM:
    return CastLM()


def smoothed(smoothing: float = 0.05):
    """A user's loss factory: label-smoothed cross-entropy over the last dimension."""
    def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1), label_smoothing=smoothing)
    return loss


def error_rate() -> Metric:
    """A user's metric factory: percent of characters predicted wrong (lower is better)."""
    def batch(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
        return 100.0 * (outputs.argmax(-1) != targets).sum().item(), targets.numel()
    return Metric("error rate", batch, higher_is_better=False, key="err", unit="%", digits=2)


def not_a_metric():
    return lambda outputs, targets: 0.0


def lm_recipe(tmp_path: Path, **changes) -> dict:
    recipe = {
        "name": "lm", "seed": 0, "output_dir": str(tmp_path / "runs"),
        "model": {"factory": f"{HERE}:tiny_lm"},
        "data": {"factory": f"{HERE}:sequences", "val_size": 32, "batch_size": 16, "eval_batch_size": 32},
        "train": {"epochs": 4, "lr": 0.02, "optimizer": "adam", "lr_schedule": "constant",
                  "metric": "bits_per_token", "metric_kwargs": {"name": "bits/char", "key": "bpc"}},
        "prune": {"rounds": [{"criterion": "sparsity", "sparsity": 0.3, "epochs": 1}],
                  "remove_dead_neurons": False},
    }
    for key, value in changes.items():
        node = recipe
        *parts, last = key.split(".")
        for p in parts:
            node = node.setdefault(p, {})
        node[last] = value
    return recipe


def write(tmp_path: Path, recipe: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_the_data_layer_takes_a_row_of_targets():
    """A language model's examples: a row of next-token ids per example, not one class."""
    data = load_data(DataConfig(factory=f"{HERE}:sequences", val_size=32))
    x, y = first_batch(data.val, 4)
    assert x.shape == y.shape == (4, LENGTH)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("prunet: error: ")
    return err


# --------------------------------------------------------------------------- the built-ins


def test_the_defaults_are_cross_entropy_and_accuracy_as_before():
    recipe = recipe_from_dict({})
    assert (recipe.train.loss, recipe.train.metric) == ("cross_entropy", "accuracy")
    assert recipe.factories() == frozenset()  # a built-in is no code of the user's
    g = torch.Generator().manual_seed(1)
    logits, y = torch.randn(50, 4, generator=g), torch.randint(0, 4, (50,), generator=g)
    task = recipe.train.make_task()
    assert torch.equal(task.loss(logits, y), F.cross_entropy(logits, y))
    total, count = task.metric.batch(logits, y)
    assert total / count == 100.0 * (logits.argmax(1) == y).sum().item() / 50
    record = EpochRecord("dense", 1, 0.1, 0.5, 80.0, 0.6, 79.0, 1.0)
    assert list(record.to_dict()) == ["phase", "epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc",
                                      "seconds"]
    assert record.val_acc == 79.0 and EpochRecord.from_dict(record.to_dict()) == record


def test_a_language_models_outputs_are_scored_over_every_token():
    g = torch.Generator().manual_seed(2)
    logits, y = torch.randn(3, 5, 7, generator=g), torch.randint(0, 7, (3, 5), generator=g)
    flat = F.cross_entropy(logits.reshape(-1, 7), y.reshape(-1))
    assert torch.allclose(CrossEntropy()(logits, y), flat)
    bits = bits_per_token("bits/char")
    total, count = bits.batch(logits, y)
    assert count == 15 and total / count == pytest.approx(flat.item() / math.log(2), rel=1e-5)
    assert (bits.name, bits.higher_is_better, bits.format(1.5)) == ("bits/char", False, "1.5000 bits/char")
    assert CrossEntropy().problem(logits, y) is None
    assert "expected (3, 5, classes)" in CrossEntropy().problem(logits[:, 0], y)


def test_distillation_scores_a_language_model_per_token():
    g = torch.Generator().manual_seed(3)
    teacher, x = tiny_lm(), torch.randint(0, VOCAB, (2, LENGTH), generator=g)
    logits = tiny_lm()(x)  # (2, T, V)
    with torch.no_grad():
        soft = F.log_softmax(teacher(x).reshape(-1, VOCAB) / 2.0, dim=-1)
    per_token = F.kl_div(F.log_softmax(logits.reshape(-1, VOCAB) / 2.0, dim=-1), soft, reduction="sum",
                         log_target=True) / (2 * LENGTH) * 4.0
    assert torch.allclose(distillation_loss(logits, teacher, x, 2.0), per_token)


def test_a_relative_py_factory_is_stored_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train = recipe_from_dict({"train": {"loss": "tasks.py:loss", "metric": "mypkg.tasks:metric"}}).train
    assert (train.loss, train.metric) == (f"{tmp_path}/tasks.py:loss", "mypkg.tasks:metric")


def test_evaluate_a_language_model_in_bits_per_character():
    _, val, _ = sequences()
    model = tiny_lm()
    task = Task(make_loss("cross_entropy"), make_metric("bits_per_token", {"name": "bits/char"}))
    loss, bpc = evaluate(model, val, Normalization(0.0, 1.0), 10, task=task)  # batches of 10, 10 and 12
    assert bpc == pytest.approx(loss / math.log(2), rel=1e-5)  # mean over tokens, not over batches


def test_the_best_epoch_of_a_lower_is_better_metric_is_its_lowest():
    """A metric that scripts its value per evaluation (3, 1, 2): fit must keep epoch 2's weights, not epoch 1's
    (the highest, as accuracy would be judged)."""
    train, val, _ = sequences(32, 8, 8)
    values = iter([3.0, 1.0, 2.0])
    scripted = Metric("scripted", lambda out, y: (next(values), 1) if len(y) == 8 else (0.0, 1),
                      higher_is_better=False, key="s")
    model, states = tiny_lm(), []
    records = fit(model, train, val, TrainConfig(epochs=3, lr=0.01, optimizer="adam"), Normalization(0.0, 1.0),
                  FitOptions(batch_size=16, eval_batch_size=8, task=Task(metric=scripted),
                             on_epoch=lambda r: states.append({k: v.clone() for k, v in model.state_dict().items()})))
    assert [r.val_metric for r in records] == [3.0, 1.0, 2.0]
    assert all(torch.equal(v, states[1][k]) for k, v in model.state_dict().items())
    assert not all(torch.equal(v, states[0][k]) for k, v in model.state_dict().items())


def test_the_stop_rule_judges_a_lower_is_better_metric_by_its_direction():
    """Ignoring the direction would accept a round whose bits/char rose, and stop one whose bits/char fell."""
    bits = bits_per_token("bits/char", key="bpc")
    assert _stop_rule(bits, {"val_bpc": 2.0}, {"val_bpc": 2.3}, 0.1) == \
        "validation bits/char rose 0.3000 above dense (> 0.1)"
    assert _stop_rule(bits, {"val_bpc": 2.0}, {"val_bpc": 1.2}, 0.1) is None
    acc = accuracy()
    assert _stop_rule(acc, {"val_acc": 90.0}, {"val_acc": 89.0}, 0.5) == \
        "validation accuracy fell 1.00 points below dense (> 0.5)"
    assert _stop_rule(acc, {"val_acc": 90.0}, {"val_acc": 95.0}, 0.5) is None


# --------------------------------------------------------------------------- end to end


def test_a_language_model_recipe_runs_end_to_end_in_bits_per_character(tmp_path):
    """A mild round is accepted; a round pruning 99.5% with no retraining raises bits/char past the budget and
    is rejected (it would be accepted if bits/char were judged as accuracy, higher being better)."""
    recipe = lm_recipe(tmp_path, **{"prune.max_accuracy_drop": 0.3, "prune.rounds": [
        {"criterion": "sparsity", "sparsity": 0.3, "epochs": 1},
        {"criterion": "global", "sparsity": 0.995, "epochs": 0}]})
    lines: list[str] = []
    summary = run(recipe_from_dict(recipe), log=lines.append)
    folder = tmp_path / "runs" / "lm"
    assert summary["metric"] == {"name": "bits/char", "key": "bpc", "higher_is_better": False,
                                 "unit": "bits/char", "digits": 4}
    dense, final = summary["dense"], summary["final"]
    assert dense["val_bpc"] < 0.5 * math.log2(VOCAB)  # it learns the next character
    assert "val_acc" not in dense and summary["bpc_change_test"] == final["test_bpc"] - dense["test_bpc"]
    assert [r["accepted"] for r in summary["rounds"]] == [True, False]
    assert summary["stopped"].startswith("round 2: validation bits/char rose")
    assert summary["rounds"][1]["val_bpc"] > dense["val_bpc"] + 0.3
    epochs = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    epochs = [e for e in epochs if e["event"] == "epoch"]
    assert len(epochs) == 5 and all({"train_bpc", "val_bpc"} <= set(e) and "val_acc" not in e for e in epochs)
    assert any(line.startswith("dense: val ") and line.endswith(" bits/char") for line in lines)
    coverage = [line for line in lines if line.startswith("pruner: ")]  # what the run prunes, said once
    assert len(coverage) == 1 and coverage[0].startswith("pruner: prunes ") and "skipped: embeddings" in coverage[0]
    report = (folder / "report.md").read_text()
    assert "Validation bits/char (lower is better)" in report and "Test bits/char change" in report
    assert "accuracy" not in report.split("## Layers")[0]
    assert Run(folder, trust_factory=True).summary["metric"]["name"] == "bits/char"


def test_a_custom_loss_and_lower_is_better_metric_run_through_the_command_line(tmp_path, capsys):
    recipe = lm_recipe(tmp_path, **{"train.epochs": 2, "train.loss": f"{HERE}:smoothed",
                                    "train.loss_kwargs": {"smoothing": 0.1}, "train.metric": f"{HERE}:error_rate",
                                    "train.metric_kwargs": {}})
    assert main(["run", str(write(tmp_path, recipe))]) == 0, capsys.readouterr().err
    folder = tmp_path / "runs" / "lm"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["metric"]["name"] == "error rate" and summary["metric"]["higher_is_better"] is False
    assert summary["dense"]["val_err"] < 50.0  # far better than guessing one of six
    assert "err_change_test" in summary and "accuracy_change_test" not in summary
    assert "Validation error rate" in (folder / "report.md").read_text()
    # The run folder's recipe names the user's loss and metric: code that reading it back would call.
    assert yaml.safe_load((folder / "config.yaml").read_text())["train"]["loss"] == f"{HERE}:smoothed"
    with pytest.raises(UntrustedFactoryError, match="names train.loss"):
        Run(folder, trust_factory={f"{HERE}:tiny_lm", f"{HERE}:sequences"}).recipe
    with pytest.raises(UntrustedFactoryError, match="names train.metric"):
        Run(folder, trust_factory={f"{HERE}:tiny_lm", f"{HERE}:sequences", f"{HERE}:smoothed"}).recipe
    assert Run(folder, trust_factory=True).recipe.train.metric == f"{HERE}:error_rate"


# --------------------------------------------------------------------------- trust and bad specs


def test_a_loss_or_metric_factory_in_a_file_is_refused_unless_trusted(tmp_path):
    for field in ("loss", "metric"):
        recipe = recipe_from_dict({"train": {field: "subprocess:run"}})
        assert recipe.factories() == {"subprocess:run"}
        with pytest.raises(UntrustedFactoryError, match=f"config.yaml names train.{field} 'subprocess:run'"):
            recipe.check_trusted(False, "config.yaml")
        recipe.check_trusted(True, "config.yaml")
        recipe.check_trusted(recipe.factories(), "config.yaml")
        with pytest.raises(UntrustedFactoryError):
            recipe.check_trusted({"mypkg.nets:resnet"}, "config.yaml")


def test_a_command_on_a_run_folder_naming_an_untrusted_loss_runs_nothing(tmp_path, capsys):
    """``prunet sensitivity RUN/dense.safetensors`` reads the folder's ``config.yaml``: its loss is code."""
    folder = tmp_path / "runs" / "lm"
    folder.mkdir(parents=True)
    recipe = recipe_from_dict({"train": {"loss": "subprocess:run"}})
    (folder / "config.yaml").write_text(yaml.safe_dump(recipe.to_dict()))
    (folder / "dense.safetensors").write_bytes(b"never read")
    assert main(["sensitivity", str(folder / "dense.safetensors")]) == 2
    err = one_line_error(capsys)
    assert "names train.loss 'subprocess:run'" in err and "--trust-factory" in err


@pytest.mark.parametrize("train, words", [
    ({"loss": "mse"}, ["train.loss: 'mse' is neither a built-in (cross_entropy) nor MODULE:FUNCTION"]),
    ({"metric": "f1"}, ["train.metric: 'f1' is neither a built-in (accuracy, bits_per_token)"]),
    ({"metric_kwargs": {"name": "x"}}, ["train.metric: accuracy takes no argument 'name'"]),
    ({"metric": "bits_per_token", "metric_kwargs": {"base": 2}}, ["train.metric: bits_per_token takes no "
                                                                  "argument 'base' (it takes name, key)"]),
    ({"loss": 3}, ["train.loss: expected a string"]),
])
def test_a_bad_spec_is_one_line_naming_the_field(train, words):
    with pytest.raises(ConfigError) as e:
        recipe_from_dict({"train": train})
    assert len(str(e.value).splitlines()) == 1
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("changes, words", [
    ({"train.metric": f"{HERE}:not_a_metric"}, ["train.metric: ", "returned a function, not a prunet.tasks.Metric"]),
    ({"train.loss": f"{HERE}:smoothed", "train.loss_kwargs": {"smooth": 1}},
     ["train.loss: ", "raised TypeError", "smooth"]),
    ({"train.loss": "no_such_module_xyz:loss"}, ["train.loss: cannot import no_such_module_xyz"]),
    ({"train.loss": f"{HERE}:smoothed", "train.loss_kwargs": {"smoothing": 2.0}},
     ["train.loss: ", "on outputs (2, 8, 6) and targets (2, 8) raised RuntimeError", "label_smoothing"]),
    ({"train.metric": "accuracy", "data.factory": f"{HERE}:flat_sequences"},
     ["model.factory: returned shape (2, 8, 6) for a batch of 2", "expected (2, classes)"]),
])
def test_a_loss_or_metric_that_cannot_be_built_or_used_stops_the_run_in_one_line(tmp_path, capsys, changes, words):
    changes = {"train.metric_kwargs": {}, **changes} if "train.metric" in changes else changes
    assert main(["run", str(write(tmp_path, lm_recipe(tmp_path, **changes)))]) == 2
    err = one_line_error(capsys)
    for w in words:
        assert w in err
    assert not (tmp_path / "runs" / "lm").exists()


def flat_sequences():
    """Targets of one label per sequence, for a model that scores every character: the shapes do not fit."""
    train, val, test = sequences()
    return tuple(TensorDataset(s.tensors[0], s.tensors[1][:, 0]) for s in (train, val, test))


def test_bits_sweep_measures_the_recipe_metric_not_accuracy():
    """prunet bits judged an LM in accuracy; it measures the task's metric (bits/char here)."""
    torch.manual_seed(0)
    model = TinyLM()
    _, val, _ = sequences()
    task = Task(CrossEntropy(), bits_per_token(name="bits/char"))
    rows = bits_sweep(model, val, Normalization(0.0, 1.0), [1, 8], batch_size=32, task=task)
    base = evaluate(model, val, Normalization(0.0, 1.0), 32, task=task)[1]
    assert [r.bits for r in rows] == [1, 8] and all(r.base_acc == base for r in rows)
    assert base == pytest.approx(math.log2(VOCAB), abs=0.5)  # an untrained model: about log2(V) bits per character
    assert rows[1].val_acc == pytest.approx(base, abs=0.02) and rows[0].val_acc != rows[1].val_acc


def test_a_token_model_a_run_wrote_loads_exports_and_reports_from_its_files(tmp_path, capsys):
    """A file's check ran float zeros through the model: an Embedding of token ids failed to load from its
    own run's files. The run records the input type (int64) beside the shape, and every loader uses it."""
    recipe = lm_recipe(tmp_path, **{"train.epochs": 1})
    run(recipe_from_dict(recipe), log=lambda line: None)
    folder = tmp_path / "runs" / "lm"
    final = folder / "final.safetensors"
    model = prunet.load(final, trust_factory=True)
    x = torch.randint(0, VOCAB, (3, LENGTH))
    assert model(x).shape == (3, LENGTH, VOCAB)
    assert main(["export", str(folder), "-o", str(tmp_path / "lm.prunet"), "--trust-factory"]) == 0
    back = prunet.load(tmp_path / "lm.prunet", trust_factory=True)
    assert torch.equal(back(x), model(x))
    sparse = prunet.load(tmp_path / "lm.prunet", sparse=True, trust_factory=True)
    assert torch.allclose(sparse(x), model(x), rtol=1e-5, atol=1e-6)
    assert main(["report", str(tmp_path / "lm.prunet"), "--trust-factory"]) == 0
    md = (tmp_path / "lm_report" / "report.md").read_text()
    assert "| hidden | 256 | 4.1K |" in md  # the zero example of token ids ran: FLOPs (8 tokens x 256 x 2) counted


def test_a_file_naming_an_unknown_input_type_is_one_line(tmp_path):
    path = prunet.save(TinyLM(), tmp_path / "m.safetensors", {"input_shape": [LENGTH], "input_dtype": "os.system"})
    with pytest.raises(Exception, match=r"meta.input_dtype: 'os.system' is not one of float32, "):
        prunet.load(path, model=TinyLM())
    with pytest.raises(ValueError, match=r"'__class__' is not one of"):  # never looked up on torch by its name
        example_input_of({"input_shape": [LENGTH], "input_dtype": "__class__"})


def test_inputs_of_a_type_meta_does_not_name_leave_the_type_unrecorded_and_the_files_readable(tmp_path):
    recipe = lm_recipe(tmp_path, **{"train.epochs": 1, "model.factory": f"{HERE}:cast_lm",
                                    "data.factory": f"{HERE}:int8_sequences"})
    run(recipe_from_dict(recipe), log=lambda line: None)
    model = prunet.load(tmp_path / "runs" / "lm" / "final.safetensors", trust_factory=True)
    x = torch.randint(0, VOCAB, (2, LENGTH), dtype=torch.int8)
    assert model(x).shape == (2, LENGTH, VOCAB)
