"""Analysis of pruned networks: per-layer tables, FLOPs, energy, plots.

``layer_table`` gives the paper's Tables 2-5 (weights, FLOPs, Act%, Weights%,
FLOP% per layer); ``estimate_energy`` turns a table into picojoules per
inference; ``plot_weight_histogram`` draws Figure 7.
"""

from prunet.analysis.energy import (
    DEFAULT_SRAM_BYTES,
    EnergyBreakdown,
    EnergyCosts,
    EnergyEstimate,
    estimate_energy,
)
from prunet.analysis.layers import (
    CSV_COLUMNS,
    LayerRow,
    activation_fractions,
    count_flops,
    format_table_markdown,
    human_count,
    layer_table,
    prunable_layers,
    table_totals,
    write_table_csv,
)
from prunet.analysis.plots import plot_weight_histogram

__all__ = [
    "CSV_COLUMNS",
    "DEFAULT_SRAM_BYTES",
    "EnergyBreakdown",
    "EnergyCosts",
    "EnergyEstimate",
    "LayerRow",
    "activation_fractions",
    "count_flops",
    "estimate_energy",
    "format_table_markdown",
    "human_count",
    "layer_table",
    "plot_weight_histogram",
    "prunable_layers",
    "table_totals",
    "write_table_csv",
]

# Figure 5: accuracy loss vs. parameters pruned (L1/L2, with/without retraining, iterative).
from prunet.analysis.tradeoff import (  # noqa: E402
    TradeoffRow,
    format_tradeoff_table,
    plot_tradeoff,
    read_tradeoff_csv,
    tradeoff_study,
    write_tradeoff_csv,
)

__all__ += [
    "TradeoffRow",
    "format_tradeoff_table",
    "plot_tradeoff",
    "read_tradeoff_csv",
    "tradeoff_study",
    "write_tradeoff_csv",
]

# Figure 6: each layer pruned alone, no retraining; and the report of a run folder. The sweep
# itself is not re-exported: a function named `sensitivity` here would hide the submodule of that
# name (`import prunet.analysis.sensitivity as s` would give the function); call it from there.
from prunet.analysis.sensitivity import (  # noqa: E402
    SensitivityRow,
    format_sensitivity_table,
    plot_sensitivity,
    propose_qualities,
    read_sensitivity_csv,
    write_sensitivity_csv,
)
from prunet.analysis.report import ReportError, write_report  # noqa: E402

__all__ += [
    "ReportError",
    "SensitivityRow",
    "format_sensitivity_table",
    "plot_sensitivity",
    "propose_qualities",
    "read_sensitivity_csv",
    "write_report",
    "write_sensitivity_csv",
]
