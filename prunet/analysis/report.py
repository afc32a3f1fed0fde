"""One self-contained report of a run folder: ``report.md`` and ``report.html``.

:func:`write_report` reads what :func:`prunet.pipeline.run` left in a run folder
(``summary.json``, ``config.yaml``, ``dense.safetensors``, ``final.safetensors``,
and ``sensitivity.csv`` when the sensitivity analysis was run) and writes:

* ``report.md``: Markdown, its figures as PNG files next to it;
* ``report.html``: the same content in one file that opens in a browser with
  no server and no network: figures embedded as base64 ``data:`` URIs, CSS
  inline, every text escaped, and a Content-Security-Policy that forbids any
  request;
* ``layers.csv``: the final model's per-layer table (raw numbers).

It reads the folder through :class:`prunet.runfolder.Run` and writes through
:class:`prunet.runfolder.RunFolder`, so every file is written whole and
recorded as the run's; the document model and its two renderers are
:mod:`prunet.analysis.document`'s.

The report is built from tables first (summary, rounds, layers, energy) and the
figures are drawn from those tables, never from training state.

Example, on the folder of a finished run (so not run as a test); open the HTML file in a browser:
    >>> md, html = write_report("runs/lenet300_fashion")  # doctest: +SKIP
    >>> html  # doctest: +SKIP
    PosixPath('runs/lenet300_fashion/report.html')
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from prunet.analysis import document as D
from prunet.analysis.energy import DEFAULT_SRAM_BYTES, estimate_energy
from prunet.analysis.plots import plot_weight_histogram, save_figure
from prunet.analysis.sensitivity import (
    format_sensitivity_table,
    plot_sensitivity,
    propose_qualities,
    read_sensitivity_csv,
    setting_label,
)
from prunet.analysis.tables import layer_table, write_table_csv
from prunet.data import DatasetSplits, head, load_data, loader
from prunet.layers import LayerRow, Totals, format_table, totals
from prunet.runfolder import (
    COMPACT,
    DENSE,
    LAYERS_CSV,
    REPORT_HTML,
    REPORT_MD,
    ROUNDS_PNG,
    SENSITIVITY_CSV,
    SENSITIVITY_PNG,
    SHARED_COMPACT,
    Run,
    RunError,
    RunFolder,
)
from prunet.sparse.compact import shared_stats, stored_bytes
from prunet.tasks import Metric

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Act% is a fraction of non-zero activations; a couple of thousand images pin it
# to well under a percent and keep the report fast even for conv nets.
ACTIVATION_EXAMPLES = 2000
# Accuracy budgets (points) for which the report proposes per-layer settings.
PROPOSAL_DROPS = (0.5, 1.0)


ReportError = RunError
"""What the report cannot read or show: a missing or corrupt run file, a histogram layer that is not a layer.

The same class as :class:`prunet.runfolder.RunError` (the name code written against 0.1 catches)."""


def _activation_batches(data: DatasetSplits, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Up to ``n`` normalised validation images (test images when there is no validation split)."""
    split = data.val if len(data.val) else data.test
    return list(loader(head(split, n), 500, shuffle=False, mean=data.mean, std=data.std))


# --------------------------------------------------------------------------- formatting


def _setting(value: Any) -> str:
    """A round's quality or sparsity: ``1``, or ``fc1 0.9, fc 0.5`` for a mapping."""
    if value is None:
        return ""
    if isinstance(value, Mapping):
        return ", ".join(f"{k} {_setting(v)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _times(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "–"
    return "∞" if math.isinf(value) else f"{value:.1f}×"


def _names(value: Any) -> str:
    return ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value if value is not None else "")


def _safe_file_part(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


# --------------------------------------------------------------------------- figures


def plot_rounds(summary: Mapping[str, Any], path: str | Path | None = None) -> Figure:
    """Accuracy (or the run's metric) and compression per round, from ``summary.json``'s data.

    Left axis: validation and test accuracy after each round's retraining, and
    validation accuracy just after pruning (before retraining); right axis: the
    compression of the prunable weights. Round 0 is the dense model; a rejected
    round is shaded. A summary whose ``metric`` is not accuracy (bits/char, say)
    plots and names that metric instead.

    Args:
        summary: the run's summary (``dense`` and ``rounds`` are used).
        path: also write the figure to this PNG file (parent folders are created).

    Returns:
        The figure: the accuracy axes and, sharing its x axis, the compression axes.

    Example:
        >>> summary = {"dense": {"val_acc": 89.8, "test_acc": 89.1},
        ...            "rounds": [{"round": 1, "val_acc": 89.9, "test_acc": 89.0, "val_acc_pruned": 88.2,
        ...                        "compression": 3.1},
        ...                       {"round": 2, "val_acc": 89.5, "test_acc": 88.8, "val_acc_pruned": 85.0,
        ...                        "compression": 8.4}]}
        >>> fig = plot_rounds(summary, "rounds.png")
        >>> accuracy, compression = fig.axes
        >>> [line.get_label() for line in accuracy.lines]
        ['validation (after retraining)', 'test (after retraining)', 'validation (pruned, before retraining)']
        >>> compression.get_ylabel(), compression.lines[0].get_ydata().tolist()
        ('compression (×, prunable weights)', [1.0, 3.1, 8.4])
    """
    from matplotlib.figure import Figure

    rounds = list(summary.get("rounds") or [])
    dense, m = summary["dense"], Metric.described(summary.get("metric"))
    val_key, test_key = m.field("val"), m.field("test")
    x = [0] + [r.get("round", i + 1) for i, r in enumerate(rounds)]
    val = [dense[val_key]] + [r.get(val_key) for r in rounds]
    test = [dense[test_key]] + [r.get(test_key) for r in rounds]
    before = [r.get(val_key + "_pruned") for r in rounds]
    comp = [1.0] + [r.get("compression") or float("nan") for r in rounds]

    fig = Figure(figsize=(9, 4.2), layout="constrained")
    ax = fig.subplots()
    ax.plot(x, val, marker="o", label="validation (after retraining)")
    ax.plot(x, test, marker="s", label="test (after retraining)")
    if rounds:
        ax.plot(x[1:], before, marker="x", ls=":", color="tab:red", label="validation (pruned, before retraining)")
    rejected = [r.get("round") for r in rounds if r.get("accepted") is False]
    for rnd in rejected:
        ax.axvspan(rnd - 0.5, rnd + 0.5, color="tab:red", alpha=0.08)
    ax.set_xlabel("round (0 = dense)")
    ax.set_ylabel(f"{m.name} (%)" if m.unit == "%" else f"{m.name} ({'higher' if m.higher_is_better else 'lower'} "
                  f"is better)")
    ax.set_xticks(x)
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(x, comp, color="tab:gray", marker="D", ms=4, ls="--", label="compression")
    ax2.set_ylabel("compression (×, prunable weights)")
    ax2.set_ylim(bottom=0)
    lines, labels = ax.get_legend_handles_labels()
    lines2, labels2 = ax2.get_legend_handles_labels()
    # Below the axes: inside, it would cover the curves whatever corner it took.
    fig.legend(lines + lines2, labels + labels2, fontsize=8, loc="outside lower center", ncol=4)
    ax.set_title(f"{m.name} and compression per round" + (" (shaded: rejected)" if rejected else ""), fontsize=10)
    if path is not None:
        save_figure(fig, path, dpi=90)
    return fig


# --------------------------------------------------------------------------- sections


def _metric_rows(summary: Mapping[str, Any], m: Metric) -> list[list[str]]:
    """The summary table's rows of the metric: validation and test, dense and pruned, and the test change."""
    dense, final, val, test = summary["dense"], summary["final"], m.field("val"), m.field("test")
    direction = "" if m.unit == "%" else f" ({'higher' if m.higher_is_better else 'lower'} is better)"
    rows = [
        [f"Validation {m.name}{direction}", f"{m.format(dense.get(val))} dense → {m.format(final.get(val))} pruned"],
        [f"Test {m.name}", f"{m.format(dense.get(test))} dense → {m.format(final.get(test))} pruned"],
    ]
    change = summary.get(m.change_field("test"))
    if isinstance(change, (int, float)):
        rows.append([f"Test {m.name} change", f"{change:+.{m.digits}f} {m.points}"])
    return rows


def _summary_section(summary: Mapping[str, Any], t: Totals, run_dir: Path) -> list[D.Block]:
    dense, final, m = summary["dense"], summary["final"], Metric.described(summary.get("metric"))
    weights, kept = summary.get("weights"), summary.get("weights_kept")
    params, params_kept = summary.get("parameters"), summary.get("parameters_kept")
    compression = summary.get("compression")
    rows = [
        ["Model", str(summary["model"])],
        ["Dataset", str(summary.get("dataset", "?"))],
        *_metric_rows(summary, m),
    ]
    if isinstance(weights, int) and isinstance(kept, int):
        rows.append(["Weights (prunable layers)", f"{kept:,} of {weights:,} kept ({100 * kept / weights:.2f}%)"])
    rows.append(["Compression", f"{_times(compression)} fewer weights"])
    if isinstance(params, int) and isinstance(params_kept, int):
        ratio = _times(summary.get("parameter_compression"))
        rows.append(["Parameters (biases included)", f"{params_kept:,} of {params:,} kept ({ratio})"])
    rows.append(["FLOPs per example", f"{t.flops:,} dense → {100 * t.flops_kept_frac:.1f}% kept"])
    compact = summary.get("compact")
    if isinstance(compact, Mapping) and isinstance(compact.get("bytes"), int):
        dense_bytes = compact.get("dense_file_bytes")
        versus = (f", {dense_bytes / compact['bytes']:.1f}× smaller than `{DENSE}` ({dense_bytes:,} bytes)"
                  if isinstance(dense_bytes, int) else "")
        rows.append(["Compact file", f"`{compact.get('file')}` {compact['bytes']:,} bytes{versus}"])
    shared = summary.get("quantize")
    if isinstance(shared, Mapping) and isinstance(shared.get("bytes"), int):
        bits = ", ".join(f"{k} {v}" for k, v in (shared.get("bits") or {}).items())
        rows.append(["Weight sharing + Huffman", f"`{shared.get('file')}` {shared['bytes']:,} bytes, "
                     f"{_times(shared.get('ratio_to_dense_file'))} smaller than `{DENSE}`; bits per index: {bits}; "
                     f"test {m.format(shared.get(m.field('test'), float('nan')))}, validation "
                     f"{m.format(shared.get(m.field('val'), float('nan')))}"])
    n_rounds = len(summary["rounds"])
    accepted = sum(1 for r in summary["rounds"] if r.get("accepted", True))
    rows.append(["Rounds", f"{accepted} of {n_rounds} accepted"])
    if summary.get("stopped"):
        rows.append(["Stopped", str(summary["stopped"])])
    if isinstance(summary.get("seconds"), (int, float)):
        rows.append(["Run time", f"{summary['seconds']:.0f} s"])
    rows.append(["Run folder", str(run_dir)])
    headline = (
        f"{summary['model']} on {summary.get('dataset', '?')}: {_times(compression)} fewer weights, "
        f"test {m.name} {m.format(dense.get(m.field('test')))} → {m.format(final.get(m.field('test')))}."
    )
    return [D.Heading("Summary"), D.Para(headline), D.Table(["Quantity", "Value"], rows, "ll")]


def _rounds_section(summary: Mapping[str, Any], folder: RunFolder) -> list[D.Block]:
    dense, m = summary["dense"], Metric.described(summary.get("metric"))
    val, test, fmt = m.field("val"), m.field("test"), m.format
    weights = summary.get("weights")
    header = ["Round", "Criterion", "Setting", "Pruned", "Trained", "Epochs", "Kept weights", "Compression",
              "Val pruned", "Val", "Test", "Accepted"]  # fmt: skip
    rows = [["dense", "", "", "", "", "", f"{weights:,}" if isinstance(weights, int) else "", "1.0×", "",
             fmt(dense.get(val)), fmt(dense.get(test)), ""]]  # fmt: skip
    for r in summary["rounds"]:
        kept = r.get("weights_kept")
        rows.append([
            str(r.get("round", "")), str(r.get("criterion", "")), _setting(r.get("setting")),
            _names(r.get("pruned_layers")), _names(r.get("trained_layers")), str(r.get("epochs", "")),
            f"{kept:,}" if isinstance(kept, int) else "", _times(r.get("compression")),
            fmt(r.get(val + "_pruned")), fmt(r.get(val)), fmt(r.get(test)),
            {True: "yes", False: "no"}.get(r.get("accepted"), ""),
        ])  # fmt: skip
    blocks: list[D.Block] = [
        D.Heading("Rounds"),
        D.Para("Each round prunes the named layers, then retrains the named ones with the pruned connections "
              f"held at zero. “Val pruned” is validation {m.name} right after pruning, before retraining."),
        D.Table(header, rows, "llllllrrrrrl"),
    ]
    if summary["rounds"]:
        png = folder.record(ROUNDS_PNG)
        plot_rounds(summary, png)
        blocks.append(D.Image(png, f"{m.name} and compression per round"))
    return blocks


def _layers_section(
    final_rows: Sequence[LayerRow], dense_rows: Sequence[LayerRow] | None, n_act: int
) -> list[D.Block]:
    blocks: list[D.Block] = [
        D.Heading("Layers"),
        D.Para("In the form of the paper's Tables 2–5. Weights% is the fraction of a layer's weights kept; Act% the "
              "fraction of its outputs that are non-zero where the next layer reads them, measured on "
              f"{n_act:,} validation images; FLOP% = Weights% × the previous layer's Act%, the work left "
              f"when zero weights and zero inputs are skipped. Raw numbers: `{LAYERS_CSV}`."),
        D.Heading("Final model", 3),
        D.Table.from_markdown(format_table(final_rows, markdown=True)),
    ]
    if dense_rows is not None:
        blocks += [D.Heading("Dense model, for comparison", 3),
                   D.Table.from_markdown(format_table(dense_rows, markdown=True))]
    return blocks


def _histogram_section(
    run: Run, folder: RunFolder, final_rows: Sequence[LayerRow], final_state: Mapping[str, torch.Tensor],
    layer: str | None,
) -> list[D.Block]:
    names = [r.layer for r in final_rows]
    if layer is None:
        layer = max(final_rows, key=lambda r: r.weights).layer
    elif layer not in names:
        raise ReportError(f"histogram layer {layer!r} is not a layer of the model; layers are: {', '.join(names)}")
    blocks: list[D.Block] = [D.Heading("Weight distribution")]
    if not run.has(DENSE):
        return blocks + [D.Para(f"No `{DENSE}` in the run folder: no before/after histogram of {layer}.")]
    dense_state = run.read_state(DENSE)
    key = f"{layer}.weight"
    if key not in dense_state:
        return blocks + [D.Para(f"`{DENSE}` has no `{key}`: no histogram.")]
    png = folder.record(f"report_weights_{_safe_file_part(layer)}.png")
    plot_weight_histogram(dense_state[key], final_state[key], layer, png)
    return blocks + [
        D.Para(f"The paper's Figure 7 for {layer}, the largest layer unless chosen: its weights before pruning, and "
              "its surviving weights after pruning and retraining. Magnitude pruning cuts the band around zero; "
              "retraining spreads the survivors into it."),
        D.Image(png, f"weight histogram of {layer}"),
    ]


def _sensitivity_section(run: Run, folder: RunFolder) -> list[D.Block]:
    run_dir = run.path
    blocks: list[D.Block] = [D.Heading("Sensitivity")]
    csv_path = run_dir / SENSITIVITY_CSV
    if not csv_path.is_file():
        return blocks + [
            D.Para("Not run. The paper's Figure 6 prunes each layer alone, without retraining, over a range of "
                  "thresholds, and shows how sensitive each layer is; its thresholds were chosen from it. To run "
                  f"it on this run's dense model (it writes `{SENSITIVITY_CSV}` and `{SENSITIVITY_PNG}` here, and "
                  "the next report includes them):"),
            D.Pre(f"prunet sensitivity {run_dir / DENSE}\nprunet report {run_dir}"),
        ]
    try:
        rows = read_sensitivity_csv(csv_path)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ReportError(f"{csv_path} is unreadable or corrupt ({e})") from None
    if not rows:
        return blocks + [D.Para(f"`{SENSITIVITY_CSV}` is empty.")]
    png = run_dir / SENSITIVITY_PNG
    if not png.is_file():
        plot_sensitivity(rows, folder.record(SENSITIVITY_PNG))  # figures come from the table: redraw a missing one
    label = setting_label(rows[0].criterion)
    blocks += [
        D.Para(f"Each layer pruned alone by {rows[0].criterion}, no retraining; columns are the {label} values "
              f"({label[0]}=…). Cells: validation accuracy (%) and, in brackets, the fraction of the layer pruned."),
        D.Table.from_markdown(format_sensitivity_table(rows)),
        D.Image(png, "sensitivity of each layer to pruning"),
    ]
    proposals = {drop: propose_qualities(rows, drop) for drop in PROPOSAL_DROPS}
    layers = list(dict.fromkeys(r.layer for r in rows))
    table = [[layer] + [_setting(proposals[d].get(layer, "not pruned")) for d in PROPOSAL_DROPS] for layer in layers]
    blocks += [
        D.Para(f"Largest {label} per layer whose accuracy drop stays within a budget (scanning upwards, stopping at "
              "the first setting over it):"),
        D.Table(["Layer"] + [f"drop ≤ {d:g} points" for d in PROPOSAL_DROPS], table, "l" + "r" * len(PROPOSAL_DROPS)),
    ]
    return blocks


def _energy_section(final_rows: Sequence[LayerRow], sram_bytes: int) -> list[D.Block]:
    est = estimate_energy(final_rows, sram_bytes=sram_bytes)
    return [
        D.Heading("Energy"),
        D.Para(f"Estimated energy per inference: {est.ratio:.1f}× less for the pruned model. The paper's argument: "
              "a DRAM read costs over a hundred times an SRAM read or a multiply-add, so weights that move on chip "
              "and multiply-adds that are skipped both count. A model of weight traffic and arithmetic, "
              "not of a chip:"),
        D.Pre(est.describe()),
    ]


def _neurons_section(neurons: Mapping[str, Any]) -> list[D.Block]:
    blocks: list[D.Block] = [D.Heading("Neuron removal")]
    if isinstance(neurons.get("skipped"), str):
        return blocks + [D.Para(f"Dead neurons were not removed: {neurons['skipped']}. The pruned model "
                                f"(`final.safetensors`) keeps its layers' full sizes.")]
    before, after = neurons.get("params_before"), neurons.get("params_after")
    if isinstance(before, int) and isinstance(after, int):
        ratio = f" ({before / after:.2f}× fewer)" if after else ""
        nonzero = neurons.get("params_nonzero_after")
        nonzero = f", {nonzero:,} of them non-zero" if isinstance(nonzero, int) else ""
        blocks.append(D.Para("Neurons left with no inputs or no outputs were removed and their layers shrunk "
                            f"(`final_shrunk.safetensors`): parameters {before:,} → {after:,}{ratio}{nonzero}."))
    layers = [r for r in neurons.get("layers") or [] if isinstance(r, Mapping)]
    if layers:
        keys = list(dict.fromkeys(k for r in layers for k in r))
        if "name" in keys:
            keys.remove("name")
            keys.insert(0, "name")
        header = ["Layer" if k == "name" else k.replace("_", " ") for k in keys]
        rows = [[_cell(r.get(k)) for k in keys] for r in layers]
        align = "".join("r" if _numeric([r.get(k) for r in layers]) else "l" for k in keys)
        blocks.append(D.Table(header, rows, align))
    if isinstance(neurons.get("max_abs_diff"), (int, float)):
        blocks.append(D.Para(f"Largest output difference between the masked and the shrunken model: "
                            f"{neurons['max_abs_diff']:.3g}."))  # fmt: skip
    boundaries = neurons.get("boundaries")
    if boundaries:
        blocks += [D.Para("Left alone at these boundaries:"), D.Bullets([str(b) for b in boundaries])]
    return blocks


def _numeric(values: Sequence[Any]) -> bool:
    """A column is right-aligned when every value it has is a number (missing ones allowed)."""
    present = [v for v in values if v is not None]
    return bool(present) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present)


def _cell(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return _names(value)


# --------------------------------------------------------------------------- entry point


def _stages_section(run: Run, summary: Mapping[str, Any], rows: list) -> list[D.Block]:
    """Deep Compression's Table 1/3 per layer: bits per weight and per index, bytes and compression at each stage."""
    shared = summary.get("quantize")
    if not (isinstance(shared, Mapping) and run.has(COMPACT) and run.has(SHARED_COMPACT)):
        return []
    pruned, coded = stored_bytes(run.path / COMPACT), stored_bytes(run.path / SHARED_COMPACT)
    stats = shared_stats(run.path / SHARED_COMPACT)
    table = []
    for r in rows:
        name = f"{r.layer}.weight"
        dense = 4 * r.weights
        p, q, st = pruned.get(name, dense), coded.get(name, dense), stats.get(name)
        shared_b = st.shared_bytes if st else q
        table.append([
            r.layer, f"{r.weights:,}", f"{100 * r.kept_frac:.1f}%",
            f"{st.weight_bits} / {st.weight_bits_huffman:.1f}" if st else "32",
            f"{st.index_bits:.1f} / {st.index_bits_huffman:.1f}" if st else "–",
            f"{dense:,}", f"{p:,}", f"{shared_b:,}", f"{q:,}",
            " / ".join(_times(dense / b if b else None) for b in (p, shared_b, q)),
        ])
    sizes = [(run.path / n).stat().st_size for n in (DENSE, COMPACT, SHARED_COMPACT)]
    table.append(["whole file", "", "", "", "", f"{sizes[0]:,}", f"{sizes[1]:,}", "", f"{sizes[2]:,}",
                  f"{_times(sizes[0] / sizes[1])} / – / {_times(sizes[0] / sizes[2])}"])
    return [D.Heading("Weight sharing and Huffman coding"),
            D.Para("Deep Compression's Table 1/3 per layer. Bits per weight and per index are before / after "
                   "Huffman coding, per surviving weight (an index is the relative position; a filler code "
                   "bridges a longer gap). Bytes at each stage: dense float32; pruned "
                   f"(`{COMPACT}`: float32 survivors and relative indices); pruned and shared (a codebook, "
                   "fixed-width cluster indices and positions); shared and Huffman coded "
                   f"(`{SHARED_COMPACT}`). The compression of each stage is against dense float32."),
            D.Table(["Layer", "Weights", "Kept", "Weight bits", "Index bits", "Dense", "Pruned", "Shared",
                     "+ Huffman", "× P / P+Q / P+Q+H"], table, "lrrrrrrrrr")]


def write_report(
    run_dir: str | Path | Run,
    data: DatasetSplits | None = None,
    sram_bytes: int | None = None,
    progress: bool = True,
    *,
    histogram_layer: str | None = None,
    activation_examples: int = ACTIVATION_EXAMPLES,
    device: torch.device | str = "cpu",
) -> tuple[Path, Path]:
    """Write ``report.md``, ``report.html`` and ``layers.csv`` into a run folder.

    Args:
        run_dir: a folder written by ``prunet run`` (``summary.json``,
            ``config.yaml``, ``final.safetensors``; ``dense.safetensors`` and
            ``sensitivity.csv`` are used when present), or its :class:`~prunet.runfolder.Run`:
            ``Run(path, trust_factory=True)`` for a run of your own model or data, whose factories
            it names are then built (they are not, otherwise).
        data: the run's dataset, for Act%; default: the dataset its ``config.yaml``
            names, loaded with :func:`prunet.data.load_data`. Pass it when you have it
            (``pipeline.run`` does) to skip reading it again.
        sram_bytes: on-chip SRAM for the energy estimate; default
            :data:`~prunet.analysis.energy.DEFAULT_SRAM_BYTES` (4 MiB).
        progress: show a progress bar over the report's steps.
        histogram_layer: the layer whose weights are histogrammed (Figure 7);
            default the layer with the most weights.
        activation_examples: validation images used to measure Act%.
        device: where the models run for Act% (the figures and tables do not depend on it).

    Returns:
        ``(md_path, html_path)``.

    Raises:
        prunet.runfolder.MissingRunFileError: the folder or a required file is missing (the message names it).
        prunet.runfolder.RunError: a corrupt file; :class:`ReportError`: a ``histogram_layer`` that is not a layer.
        prunet.data.DataError: the run's dataset cannot be found (pass ``data``).

    Example, on the folder of a finished run (so not run as a test):
        >>> md, html = write_report("runs/lenet300_fashion", sram_bytes=2 * 2**20)  # doctest: +SKIP
    """
    run = run_dir if isinstance(run_dir, Run) else Run(run_dir)
    folder = RunFolder.open(run.path)
    if activation_examples < 1:
        raise ValueError(f"activation_examples must be >= 1, got {activation_examples}")
    steps = tqdm(total=6, desc="report", disable=None if progress else True, leave=False)
    with steps:
        steps.set_postfix_str("reading the run")
        summary = run.summary
        # Every run file is read before the dataset, so a broken folder fails fast.
        model, pruner, _ = run.load(run.final_checkpoint)
        model.to(device)
        if data is None:
            data = load_data(run.recipe.data)
        steps.update()

        steps.set_postfix_str("layer tables")
        act = _activation_batches(data, activation_examples)
        final_rows, dense_rows = _layer_tables(run, model, pruner, act, device)
        write_table_csv(final_rows, folder.record(LAYERS_CSV))
        n_act = sum(len(y) for _, y in act)
        steps.update()

        blocks: list[D.Block] = []
        blocks += _summary_section(summary, totals(final_rows), run.path)
        steps.set_postfix_str("rounds")
        blocks += _rounds_section(summary, folder)
        steps.update()
        blocks += _layers_section(final_rows, dense_rows, n_act)
        steps.set_postfix_str("histogram")
        weights = {k: v.cpu() for k, v in model.state_dict().items()}
        blocks += _histogram_section(run, folder, final_rows, weights, histogram_layer)
        steps.update()
        steps.set_postfix_str("sensitivity")
        blocks += _sensitivity_section(run, folder)
        steps.update()
        blocks += _energy_section(final_rows, DEFAULT_SRAM_BYTES if sram_bytes is None else sram_bytes)
        blocks += _stages_section(run, summary, final_rows)
        if isinstance(summary.get("neurons"), Mapping):
            blocks += _neurons_section(summary["neurons"])
        blocks += _files_section(run)

        steps.set_postfix_str("writing")
        title = f"Pruning report: {summary.get('recipe') or run.path.name}"
        md_path = folder.write_text(REPORT_MD, D.render_markdown(title, blocks))
        html_path = folder.write_text(REPORT_HTML, D.render_html(title, blocks))
        steps.update()
    return md_path, html_path


def _layer_tables(run: Run, model: torch.nn.Module, pruner, act, device) -> tuple[list, list | None]:
    """The per-layer rows of the final model and, when the run has one, of its dense model (one more pass)."""
    example = act[0][0][:1].to(device)  # (1, C, H, W): the model's real input size fixes conv FLOPs
    final_rows = layer_table(model, example, masks=pruner.masks if pruner else None, activation_data=act)
    dense_rows = None
    if run.has(DENSE):  # the comparison costs one more pass over the activation images
        dense_model, _, _ = run.load(DENSE)
        dense_rows = layer_table(dense_model.to(device), example, activation_data=act)
    return final_rows, dense_rows


def _files_section(run: Run) -> list[D.Block]:
    names = [n for n in run.files() if n not in (REPORT_MD, REPORT_HTML)] + [REPORT_MD, REPORT_HTML]
    return [D.Heading("Files"), D.Para("In the run folder:"), D.Bullets([f"`{n}`" for n in names])]
