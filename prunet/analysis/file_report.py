"""A report of one model file, without a run folder: ``prunet report FILE``.

A run folder's report (:mod:`prunet.analysis.report`) tells the story of a run: rounds, accuracy,
sensitivity. A file (a checkpoint from :func:`prunet.save`, a compact file, a ``torch.save``-d
state dict) has no history, so its report says what the file itself shows: what is pruned and
what is not (which layers hold zeros), the per-layer table (with FLOPs when the file records its input
shape), and the energy estimate.

Example:
    >>> import prunet, tempfile, pathlib
    >>> model = prunet.create_model("lenet_300_100")
    >>> _ = prunet.Pruner(model).prune(prunet.Sparsity(0.9))
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> _ = prunet.save(model, folder / "pruned.safetensors", {"model": "lenet_300_100"})
    >>> md, html = write_file_report(folder / "pruned.safetensors", folder / "report")
    >>> "Total" in md.read_text() and html.name
    'report.html'
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from prunet.analysis import document as D
from prunet.analysis.energy import DEFAULT_SRAM_BYTES, estimate_energy
from prunet.analysis.tables import layer_table
from prunet.factory import Trust
from prunet.files import write_text
from prunet.layers import LayerRow, find_layers, format_table, totals
from prunet.sparse.export import example_input_of, file_meta, load

MARK = "<!-- prunet file report -->"
"""The first line of every report.md this module writes: what it may replace."""


class FileReportError(ValueError):
    """An output folder holding a report.md prunet did not write, or a bad option."""


def write_file_report(
    path: str | Path,
    out_dir: str | Path,
    model: nn.Module | None = None,
    trust_factory: Trust = False,
    sram_bytes: int | None = None,
) -> tuple[Path, Path]:
    """Write ``report.md`` and a self-contained ``report.html`` about one model file into ``out_dir``.

    Args:
        path: a checkpoint, a compact file or a ``torch.save``-d state dict.
        out_dir: the folder to write into (made if missing); a ``report.md`` there that this
            function did not write is never replaced.
        model: a fresh instance of the model the file holds (needed when the file names none).
        trust_factory: build a model the file names by a factory (see :func:`prunet.load`).
        sram_bytes: on-chip SRAM for the energy estimate; default 4 MiB.

    Returns:
        ``(md_path, html_path)``.

    Raises:
        FileReportError: ``out_dir`` holds a report.md of someone else's.
        prunet.sparse.CompactFileError: the file cannot be read, or names no model and none was given.
    """
    out = Path(out_dir)
    md_path, html_path = out / "report.md", out / "report.html"
    for target in (md_path, html_path):
        if target.exists() and not _ours(md_path):
            raise FileReportError(f"{target} exists and is not a report prunet wrote about a file; choose -o")
    plain = load(path, model=model, trust_factory=trust_factory)
    rows = _rows(plain, example_input_of(file_meta(path)))
    blocks = _blocks(Path(path), plain, rows, DEFAULT_SRAM_BYTES if sram_bytes is None else sram_bytes)
    title = f"Pruned model: {Path(path).name}"
    out.mkdir(parents=True, exist_ok=True)
    write_text(md_path, MARK + "\n" + D.render_markdown(title, blocks))
    write_text(html_path, D.render_html(title, blocks))
    return md_path, html_path


def _ours(md_path: Path) -> bool:
    try:
        with open(md_path, encoding="utf-8", errors="replace") as f:
            return f.readline().rstrip("\n") == MARK
    except OSError:
        return False


def _rows(model: nn.Module, example: torch.Tensor | None) -> list[LayerRow]:
    """Per-layer rows, its zeros the pruned weights; FLOPs when the input shape is known and a zero example runs."""
    layers = find_layers(model, include=["all"])
    if example is not None:
        try:
            with torch.no_grad():
                return layer_table(model, example)
        except (RuntimeError, TypeError, ValueError, IndexError):
            pass  # a file that records no input type for a model of token ids, say: no FLOP columns
    return [LayerRow(layer.layer, layer.kind, tuple(layer.weight.shape), layer.weight.numel(),
                     int(torch.count_nonzero(layer.weight))) for layer in layers]


def _blocks(path: Path, model: nn.Module, rows: list[LayerRow], sram_bytes: int) -> list[D.Block]:
    t = totals(rows)
    unpruned = [r.layer for r in rows if r.kept == r.weights]
    blocks: list[D.Block] = [
        D.Heading("Summary"),
        D.Para(f"`{path.name}`: {t.kept:,} of {t.weights:,} weights kept, {t.compression:.1f}× fewer "
               f"({100 * t.pruned_frac:.1f}% pruned). A file, not a run folder: no training history, so no "
               f"accuracy here (`prunet eval` measures it)."),
        D.Para(f"{len(rows) - len(unpruned)} of {len(rows)} weight layers hold pruned (zero) weights"
               + (f"; unpruned: {', '.join(unpruned)}." if unpruned else ".")),
        D.Heading("Layers"),
        D.Table.from_markdown(format_table(rows, markdown=True)),
    ]
    if t.flops:
        est = estimate_energy(rows, sram_bytes=sram_bytes)
        blocks += [D.Heading("Energy"),
                   D.Para(f"Estimated energy per inference: {est.ratio:.1f}× less for the pruned model "
                          f"(dense activations assumed: no data was read)."),
                   D.Pre(est.describe())]
    else:
        blocks += [D.Para("No FLOPs: the file records no input shape a zero example runs through, so there is "
                          "no energy estimate.")]
    return blocks
