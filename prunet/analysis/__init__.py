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
