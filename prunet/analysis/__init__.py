"""Analysis of pruned networks: per-layer tables, FLOPs, energy, sensitivity, trade-off, report.

The parts are loaded when first used, so ``import prunet.analysis.tables`` (or
any one part) loads no training, data or checkpoint code:

* :mod:`~prunet.analysis.tables`: ``layer_table`` (the paper's Tables 2-5:
  weights, FLOPs, Act%, Weights%, FLOP% per layer), ``write_table_csv``;
* :mod:`~prunet.analysis.energy`: ``estimate_energy`` (picojoules per inference);
* :mod:`~prunet.analysis.plots`: ``plot_weight_histogram`` (Figure 7);
* :mod:`~prunet.analysis.sensitivity`: each layer pruned alone (Figure 6);
* :mod:`~prunet.analysis.tradeoff`: accuracy loss vs. parameters pruned (Figure 5);
* :mod:`~prunet.analysis.report`: the report of a run folder.

The names below are also reachable here (``prunet.analysis.layer_table``). The
sensitivity sweep itself is not: a function named ``sensitivity`` here would
hide the submodule of that name; call it from there.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> the module that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(["CSV_COLUMNS", "activation_fractions", "count_flops", "layer_table", "write_csv",
                     "write_table_csv"], "prunet.analysis.tables"),
    **dict.fromkeys(["LayerRow", "Totals", "format_table", "human_count", "totals"], "prunet.layers"),
    **dict.fromkeys(["DEFAULT_SRAM_BYTES", "EnergyBreakdown", "EnergyCosts", "EnergyEstimate", "estimate_energy"],
                    "prunet.analysis.energy"),
    "plot_weight_histogram": "prunet.analysis.plots",
    **dict.fromkeys(["TradeoffRow", "format_tradeoff_table", "plot_tradeoff", "read_tradeoff_csv", "tradeoff_study",
                     "write_tradeoff_csv"], "prunet.analysis.tradeoff"),
    **dict.fromkeys(["SensitivityRow", "format_sensitivity_table", "plot_sensitivity", "propose_qualities",
                     "read_sensitivity_csv", "write_sensitivity_csv"], "prunet.analysis.sensitivity"),
    **dict.fromkeys(["ReportError", "write_report"], "prunet.analysis.report"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'prunet.analysis' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
