"""Energy per inference, the argument of the paper's introduction.

Han et al. motivate pruning by energy: with Horowitz's 45 nm figures a 32-bit
DRAM read costs 640 pJ, over a hundred times an SRAM read (5 pJ) or a
multiply-add (4.6 pJ). A network whose weights do not fit on chip pays DRAM
energy for every weight it reads; pruning shrinks both the reads and the
multiply-adds, and can bring the weights on chip.

The model here is deliberately simple (see :func:`estimate_energy`): it is an
estimate of weight traffic and arithmetic, not a simulation of any chip.

Example:
    >>> import torch
    >>> from prunet import Pruner, Sparsity, create_model
    >>> from prunet.analysis import layer_table
    >>> model = create_model("lenet_300_100")
    >>> pruner = Pruner(model)
    >>> _ = pruner.prune(Sparsity(0.9))  # keep 10% of each layer's weights
    >>> rows = layer_table(model, torch.zeros(1, 1, 28, 28), masks=pruner.masks)
    >>> print(estimate_energy(rows).describe())
    Energy per inference, 32-bit float (default costs: Horowitz 2014, 45 nm):
      add 0.9 pJ, multiply 3.7 pJ, SRAM read 5 pJ, DRAM read 640 pJ per 32-bit word.
    Assumptions:
    ...
                arithmetic      memory       total      stored  in
      dense        1.22 µJ     1.33 µJ     2.56 µJ    1.02 MiB  SRAM
      pruned        122 nJ      150 nJ      272 nJ     117 KiB  SRAM
      pruned uses 9.4x less energy
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from prunet.layers import LayerRow, totals

# 4 MiB: the order of the on-chip SRAM of a mobile SoC of the paper's time. LeNets
# fit, AlexNet (244 MB of float weights) and VGG-16 (553 MB) do not.
DEFAULT_SRAM_BYTES = 4 * 2**20

_WORD_BYTES = 4  # the costs are per 32-bit word: weights are float32


@dataclass(frozen=True)
class EnergyCosts:
    """Energy of one operation in picojoules; defaults from Horowitz (ISSCC 2014), 45 nm.

    Attributes:
        add_pj: 32-bit float add.
        mult_pj: 32-bit float multiply.
        sram_read_pj: 32-bit read from (small, 8 KB) SRAM; larger SRAMs cost more,
            so the SRAM case is optimistic.
        dram_read_pj: 32-bit read from DRAM.
    """

    add_pj: float = 0.9
    mult_pj: float = 3.7
    sram_read_pj: float = 5.0
    dram_read_pj: float = 640.0


@dataclass(frozen=True)
class EnergyBreakdown:
    """Energy of one inference of one model (dense or pruned).

    Attributes:
        macs: multiply-adds performed.
        arithmetic_pj: ``macs * (add + mult)``.
        weight_words: 32-bit words read per inference (weights, plus packed indices when pruned).
        weight_bytes: storage of those words; decides SRAM or DRAM.
        in_sram: whether ``weight_bytes`` fits the SRAM.
        memory_pj: ``weight_words`` times the SRAM or DRAM read cost.
    """

    macs: float
    arithmetic_pj: float
    weight_words: float
    weight_bytes: float
    in_sram: bool
    memory_pj: float

    @property
    def total_pj(self) -> float:
        """Arithmetic plus memory."""
        return self.arithmetic_pj + self.memory_pj


@dataclass(frozen=True)
class EnergyEstimate:
    """Dense and pruned energy per inference, with the assumptions that produced them."""

    dense: EnergyBreakdown
    pruned: EnergyBreakdown
    costs: EnergyCosts
    sram_bytes: int
    index_bits: int

    @property
    def ratio(self) -> float:
        """How many times less energy the pruned model uses (dense / pruned); inf when it uses none."""
        return self.dense.total_pj / self.pruned.total_pj if self.pruned.total_pj else math.inf

    def describe(self) -> str:
        """The assumptions and the numbers, as plain text for a report."""
        c = self.costs
        lines = [
            "Energy per inference, 32-bit float (default costs: Horowitz 2014, 45 nm):",
            f"  add {c.add_pj:g} pJ, multiply {c.mult_pj:g} pJ, SRAM read {c.sram_read_pj:g} pJ, "
            f"DRAM read {c.dram_read_pj:g} pJ per 32-bit word.",
            "Assumptions:",
            "  - one multiply and one add per MAC of the weight layers; pruned: only MACs whose weight",
            "    is kept and whose input is non-zero (FLOP% = Weights% x previous Act%);",
            "  - every stored weight is read once per inference;",
            f"  - a kept weight carries a {self.index_bits}-bit relative index, packed into 32-bit words"
            " (padding zeros for long gaps ignored);",
            f"  - reads cost SRAM energy when all weights fit in {_bytes(self.sram_bytes)} of SRAM, else DRAM;",
            "  - biases, activation traffic, pooling and normalisation are ignored.",
            f"  {'':8}{'arithmetic':>12}{'memory':>12}{'total':>12}{'stored':>12}  in",
        ]
        for label, b in (("dense", self.dense), ("pruned", self.pruned)):
            where = "SRAM" if b.in_sram else "DRAM"
            lines.append(
                f"  {label:8}{_joules(b.arithmetic_pj):>12}{_joules(b.memory_pj):>12}{_joules(b.total_pj):>12}"
                f"{_bytes(b.weight_bytes):>12}  {where}"
            )
        lines.append(f"  pruned uses {self.ratio:.1f}x less energy")
        return "\n".join(lines)


def _joules(pj: float) -> str:
    """``1.2 µJ`` from picojoules."""
    for factor, unit in ((1e9, "mJ"), (1e6, "µJ"), (1e3, "nJ")):
        if pj >= factor:
            return f"{pj / factor:.3g} {unit}"
    return f"{pj:.3g} pJ"


def _bytes(n: float) -> str:
    """``4 MiB`` from bytes."""
    for factor, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= factor:
            return f"{n / factor:.3g} {unit}"
    return f"{n:.3g} B"


def _breakdown(macs: float, words: float, sram_bytes: int, costs: EnergyCosts) -> EnergyBreakdown:
    weight_bytes = words * _WORD_BYTES
    in_sram = weight_bytes <= sram_bytes
    read_pj = costs.sram_read_pj if in_sram else costs.dram_read_pj
    return EnergyBreakdown(
        macs=macs,
        arithmetic_pj=macs * (costs.add_pj + costs.mult_pj),
        weight_words=words,
        weight_bytes=weight_bytes,
        in_sram=in_sram,
        memory_pj=words * read_pj,
    )


def estimate_energy(
    rows: Sequence[LayerRow],
    sram_bytes: int = DEFAULT_SRAM_BYTES,
    costs: EnergyCosts = EnergyCosts(),
    index_bits: int = 4,
) -> EnergyEstimate:
    """Estimate energy per inference of the dense and the pruned network.

    Assumptions (also printed by :meth:`EnergyEstimate.describe`):

    * Arithmetic: ``flops / 2`` MACs, each one add and one multiply. Dense uses
      every layer's ``flops``; pruned uses ``flops * flops_kept_frac``.
    * Memory: each stored weight is read once per inference as a 32-bit word
      (dense: all weights; pruned: the kept ones). A kept weight also stores an
      ``index_bits`` relative index, packed ``32 / index_bits`` to a word and
      read with it; the padding zeros needed for gaps longer than the index can
      express are ignored. The default is 4 bits; the paper's discussion quotes
      5 bits for fc and 8 for conv layers, so pass those to match it, or
      ``index_bits=0`` to ignore the index overhead.
    * A read costs SRAM energy when the model's whole weight storage fits in
      ``sram_bytes``, else DRAM energy; pruning can move a model on chip.
    * Biases, activation reads/writes, pooling and normalisation are ignored.

    Args:
        rows: from :func:`~prunet.analysis.tables.layer_table`.
        sram_bytes: on-chip SRAM available for weights (default 4 MiB).
        costs: per-operation energies.
        index_bits: bits of sparse index stored per kept weight.

    Returns:
        An :class:`EnergyEstimate` with per-component picojoules for both models.
    """
    if index_bits < 0:
        raise ValueError(f"index_bits must be >= 0, got {index_bits}")
    t = totals(rows)
    dense = _breakdown(t.flops / 2, t.weights, sram_bytes, costs)
    pruned = _breakdown(t.flops_kept / 2, t.kept + t.kept * index_bits / 32, sram_bytes, costs)
    return EnergyEstimate(dense=dense, pruned=pruned, costs=costs, sram_bytes=sram_bytes, index_bits=index_bits)

