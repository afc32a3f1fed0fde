"""Tests for prunet.analysis.report on a tiny real run folder (Fashion-MNIST, seconds to make)."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from prunet.analysis.report import ReportError, plot_rounds, write_report
from prunet.analysis.sensitivity import SensitivityRow, write_sensitivity_csv
from prunet.analysis.tables import CSV_COLUMNS
from prunet.config import recipe_from_dict
from prunet.data import DataError, find_data_dir, load_data
from prunet.layers import human_count
from prunet.pipeline import run
from prunet.runfolder import MissingRunFileError, Run, RunError
from conftest import use_data_cache

# A name with markup in it: it ends up in the report's title and must arrive escaped.
RECIPE_NAME = "tiny<&>"


@pytest.fixture(scope="module", autouse=True)
def read_data_once():
    """The run and every report read Fashion-MNIST through the pipeline: decompress it once per session."""
    with pytest.MonkeyPatch.context() as mp:
        use_data_cache(mp)
        yield


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, dict]:
    """A real run folder: 1000 training images, 1 dense epoch, 2 prune -> retrain rounds of 1 epoch."""
    try:
        find_data_dir("fashion-mnist", download=False)
    except DataError as e:
        pytest.skip(f"Fashion-MNIST not available: {e}")
    recipe = recipe_from_dict({
        "name": RECIPE_NAME,
        "model": {"name": "lenet_300_100"},
        "data": {"train_subset": 1000, "val_size": 500},
        "train": {"epochs": 1},
        "prune": {"rounds": [
            {"criterion": "threshold", "quality": 1.0, "epochs": 1},
            {"criterion": "sparsity", "sparsity": {"fc1": 0.9, "fc": 0.6}, "epochs": 1, "train": ["fc1"]},
        ]},
    })  # fmt: skip
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    summary = run(recipe, run_dir=run_dir, log=lambda _: None)
    return run_dir, summary


@pytest.fixture(scope="module")
def data(tiny_run):
    return load_data(Run(tiny_run[0]).recipe.data)


@pytest.fixture(scope="module")
def report(tiny_run) -> tuple[Path, Path]:
    """The report of the untouched run folder, its data loaded from config.yaml as the CLI would."""
    return write_report(tiny_run[0], progress=False)


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(run_dir, dest)
    for name in ("report.md", "report.html", "layers.csv"):
        (dest / name).unlink(missing_ok=True)
    return dest


# ------------------------------------------------------------------ the report of a real run


def test_report_files_written(tiny_run, report):
    run_dir, summary = tiny_run
    md, html = report
    assert md == run_dir / "report.md" and html == run_dir / "report.html"
    text = md.read_text()
    # The final model's layer table: each layer's weights and kept count, as the paper prints them.
    for r in summary["layers"]:
        row = rf"^\| {r['layer']} \| {human_count(r['weights'])} \| [^\n]* \| {re.escape(human_count(r['kept']))} \|$"
        assert re.search(row, text, re.M), r["layer"]
    # The Files section names every file of the run, the report last.
    listed = re.findall(r"^- `([^`]+)`$", text, re.M)
    assert listed[-2:] == ["report.md", "report.html"]
    assert set(listed) == {p.name for p in run_dir.iterdir() if p.is_file() and not p.name.startswith(".")}
    for heading in ("## Summary", "## Rounds", "## Layers", "## Weight distribution", "## Sensitivity", "## Energy"):
        assert heading in text
    # Rendered exactly when the pipeline removed dead neurons after the last round.
    assert ("## Neuron removal" in text) == bool(summary.get("neurons"))
    # Markdown figures are files next to it.
    for name in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (run_dir / name).is_file(), name


def test_html_is_self_contained(report):
    page = report[1].read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert page.count('src="data:image/png;base64,') >= 2  # rounds plot and weight histogram
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "<link" not in page and "<script" not in page.lower()
    assert "<style>" in page


def test_text_is_escaped(report):
    page = report[1].read_text()
    assert "tiny&lt;&amp;&gt;" in page
    assert RECIPE_NAME not in page
    assert f"# Pruning report: {RECIPE_NAME}" in report[0].read_text()


def test_report_states_the_summary_numbers(tiny_run, report):
    _, summary = tiny_run
    for path in report:
        text = path.read_text()
        assert f"{summary['compression']:.1f}×" in text
        assert f"{summary['final']['test_acc']:.2f}%" in text
        assert f"`final.prunet` {summary['compact']['bytes']:,} bytes" in text
        assert f"{summary['dense']['val_acc']:.2f}%" in text
        for r in summary["rounds"]:
            assert f"{r['val_acc_pruned']:.2f}%" in text  # the per-round table
            assert f"{r['weights_kept']:,}" in text


def test_layers_csv_has_one_row_per_layer(tiny_run, report):
    run_dir, summary = tiny_run
    with (run_dir / "layers.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == CSV_COLUMNS
    assert [r["layer"] for r in rows] == [layer["layer"] for layer in summary["layers"]]
    assert [int(r["kept"]) for r in rows] == [layer["kept"] for layer in summary["layers"]]
    assert all(r["act_frac"] != "" for r in rows)  # measured on validation images


def test_sensitivity_not_run_says_how(tiny_run, report):
    text = report[0].read_text()
    assert "prunet sensitivity" in text and str(tiny_run[0] / "dense.safetensors") in text


# ------------------------------------------------------------------ optional parts


def _sens_rows() -> list[SensitivityRow]:
    return [
        SensitivityRow(layer, "fc", "threshold", q, 1 - q / 3, 80.0 - 2 * q * i, 2 * q * i)
        for i, layer in enumerate(["fc1", "fc2", "fc3"], start=1)
        for q in (0.0, 0.5, 1.0)
    ]


def test_sensitivity_and_neurons_rendered_when_present(tiny_run, data, tmp_path):
    run_dir = _copy(tiny_run[0], tmp_path)
    write_sensitivity_csv(_sens_rows(), run_dir / "sensitivity.csv")
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["neurons"] = {
        "params_before": 266_610,
        "params_after": 201_234,
        "layers": [
            {"name": "fc1", "before": 300, "after": 211, "removed_no_input": 80, "removed_no_output": 9},
            {"name": "fc2", "before": 100, "after": 77, "removed_no_input": 23, "removed_no_output": 0},
            {"name": "fc3", "before": 10, "after": 10},
        ],
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))

    md, html = write_report(run_dir, data=data, progress=False, histogram_layer="fc2")
    text = md.read_text()
    assert "| Layer | unpruned | q=0 | q=0.5 | q=1 |" in text
    assert (run_dir / "sensitivity.png").is_file()  # redrawn from the CSV
    assert "(sensitivity.png)" in text
    assert "## Neuron removal" in text and "266,610 → 201,234" in text
    assert "| fc1 | 300 | 211 | 80 | 9 |" in text  # a key missing from some rows leaves a blank cell
    assert "| fc3 | 10 | 10 |  |  |" in text
    assert (run_dir / "report_weights_fc2.png").is_file()
    assert html.read_text().count("data:image/png;base64,") >= 3


def test_neurons_skipped_when_absent(tiny_run, data, tmp_path):
    run_dir = _copy(tiny_run[0], tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    summary.pop("neurons", None)
    (run_dir / "summary.json").write_text(json.dumps(summary))
    md, _ = write_report(run_dir, data=data, progress=False)
    assert "Neuron removal" not in md.read_text()


def test_run_without_rounds(tiny_run, data, tmp_path):
    # What `prunet train` leaves: no rounds, final == dense.
    run_dir = _copy(tiny_run[0], tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["rounds"] = []
    (run_dir / "summary.json").write_text(json.dumps(summary))
    shutil.copy(run_dir / "dense.safetensors", run_dir / "final.safetensors")
    md, _ = write_report(run_dir, data=data, progress=False)
    assert "0 of 0 accepted" in md.read_text()


# ------------------------------------------------------------------ the rounds figure

SUMMARY = {
    "dense": {"val_acc": 89.8, "test_acc": 89.1},
    "rounds": [
        {"round": 1, "val_acc": 89.9, "test_acc": 89.0, "val_acc_pruned": 88.2, "compression": 3.1, "accepted": True},
        {"round": 2, "val_acc": 89.5, "test_acc": 88.8, "val_acc_pruned": 85.0, "compression": 8.4, "accepted": True},
        {"round": 3, "val_acc": 86.0, "test_acc": 85.7, "val_acc_pruned": 60.0, "compression": 20.0, "accepted": False},
    ],
}



def test_rounds_figure_plots_the_summary(figures, tmp_path):
    fig = figures(plot_rounds(SUMMARY, tmp_path / "figs" / "rounds.png"))
    assert (tmp_path / "figs" / "rounds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    accuracy, compression = fig.axes
    assert accuracy.get_title() == "accuracy and compression per round (shaded: rejected)"
    assert (accuracy.get_xlabel(), accuracy.get_ylabel()) == ("round (0 = dense)", "accuracy (%)")
    assert compression.get_ylabel() == "compression (×, prunable weights)"
    assert list(accuracy.get_xticks()) == [0, 1, 2, 3]
    val, test, pruned = accuracy.lines
    assert list(val.get_xdata()) == [0, 1, 2, 3] and list(pruned.get_xdata()) == [1, 2, 3]
    assert list(val.get_ydata()) == [89.8, 89.9, 89.5, 86.0]  # round 0 is the dense model
    assert list(test.get_ydata()) == [89.1, 89.0, 88.8, 85.7]
    assert list(pruned.get_ydata()) == [88.2, 85.0, 60.0]
    (comp,) = compression.lines
    assert list(comp.get_ydata()) == [1.0, 3.1, 8.4, 20.0]
    # One legend below both axes names all four lines.
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [
        "validation (after retraining)", "test (after retraining)", "validation (pruned, before retraining)",
        "compression",
    ]
    # The rejected round 3 is shaded, and only it.
    (shade,) = accuracy.patches
    span = shade.get_path().get_extents(shade.get_patch_transform())  # a Rectangle or a Polygon, by version
    assert (span.x0, span.x1) == (2.5, 3.5)


def test_rounds_figure_of_a_run_without_rounds(figures, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fig = figures(plot_rounds({"dense": {"val_acc": 89.8, "test_acc": 89.1}, "rounds": []}))
    accuracy, compression = fig.axes
    assert accuracy.get_title() == "accuracy and compression per round"
    assert [line.get_label() for line in accuracy.lines] == ["validation (after retraining)", "test (after retraining)"]
    assert [list(line.get_ydata()) for line in accuracy.lines] == [[89.8], [89.1]]
    assert len(accuracy.patches) == 0 and list(compression.lines[0].get_ydata()) == [1.0]
    assert list(tmp_path.iterdir()) == []  # no path: nothing written


# ------------------------------------------------------------------ broken folders


def test_missing_summary_is_named(tiny_run, tmp_path):
    run_dir = _copy(tiny_run[0], tmp_path)
    (run_dir / "summary.json").unlink()
    with pytest.raises(RunError, match="summary.json") as info:
        write_report(run_dir, progress=False)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("summary.json", "{not json", "summary.json is not valid JSON"),
        ("summary.json", "[1, 2]", "expected a JSON object"),
        ("summary.json", '{"model": "x"}', "lacks 'dense'"),
        ("final.safetensors", "garbage", "final.safetensors"),
        ("config.yaml", "model: {name: no_such_model}", "config.yaml"),
    ],
)
def test_corrupt_files_are_named(tiny_run, tmp_path, name, content, message):
    run_dir = _copy(tiny_run[0], tmp_path)
    (run_dir / name).write_text(content)
    with pytest.raises(RunError, match=re.escape(message)):
        write_report(run_dir, progress=False)


@pytest.mark.parametrize("name", ["final.safetensors", "config.yaml"])
def test_missing_files_are_named(tiny_run, tmp_path, name):
    run_dir = _copy(tiny_run[0], tmp_path)
    (run_dir / name).unlink()
    with pytest.raises(MissingRunFileError, match=re.escape(name)):
        write_report(run_dir, progress=False)


def test_missing_folder(tmp_path):
    with pytest.raises(MissingRunFileError, match="does not exist"):
        write_report(tmp_path / "nowhere")


def test_unknown_histogram_layer(tiny_run, data, tmp_path):
    with pytest.raises(ReportError, match="fc9.*fc1, fc2, fc3"):
        write_report(_copy(tiny_run[0], tmp_path), data=data, progress=False, histogram_layer="fc9")


# ------------------------------------------------------------------ it renders


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium binary for a headless render")
def test_headless_browser_renders_the_report(report, tmp_path):
    shot = tmp_path / "report.png"
    profile = tempfile.mkdtemp(dir=tmp_path)
    cmd = [
        "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1000,1400",
        report[1].resolve().as_uri(),
    ]  # fmt: skip
    subprocess.run(cmd, capture_output=True, timeout=60, check=False)
    assert shot.is_file(), "chromium wrote no screenshot"
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 20_000  # a rendered page with tables and figures, not a blank one
