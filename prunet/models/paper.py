"""The paper's per-layer pruning rates, shipped with the models (Han et al. 2015, Tables 4 and 5).

``PAPER_KEPT[model][layer]`` is the fraction of the layer's weights the paper
kept (its "Weights%" column, rounded there to whole percent);
:func:`paper_sparsity` turns it into the :class:`prunet.Sparsity` criterion that
prunes a model to those rates, e.g. to study the paper's result on your own
weights or to compare a schedule of your own with it::

    pruner = Pruner(create_model("alexnet"))
    pruner.prune(paper_sparsity("alexnet"))     # 6.7M of 61M weights kept, 9x
"""

from __future__ import annotations

from prunet.criteria import Sparsity

PAPER_KEPT: dict[str, dict[str, float]] = {
    # Table 4: AlexNet, 61M -> 6.7M weights (9x).
    "alexnet": {"conv1": 0.84, "conv2": 0.38, "conv3": 0.35, "conv4": 0.37, "conv5": 0.37,
                "fc6": 0.09, "fc7": 0.09, "fc8": 0.25},
    # Table 5: VGG-16, 138M -> 10.3M weights (13x).
    "vgg16": {"conv1_1": 0.58, "conv1_2": 0.22, "conv2_1": 0.34, "conv2_2": 0.36, "conv3_1": 0.53,
              "conv3_2": 0.24, "conv3_3": 0.42, "conv4_1": 0.32, "conv4_2": 0.27, "conv4_3": 0.34,
              "conv5_1": 0.35, "conv5_2": 0.29, "conv5_3": 0.36, "fc6": 0.04, "fc7": 0.04, "fc8": 0.23},
}

PAPER_TOTALS: dict[str, tuple[int, int]] = {"alexnet": (61_000_000, 6_700_000), "vgg16": (138_000_000, 10_300_000)}
"""model -> (weights, kept weights) as the paper's tables give them (rounded to 0.1M)."""


def paper_sparsity(model: str) -> Sparsity:
    """The :class:`prunet.Sparsity` criterion that prunes ``model`` to the paper's per-layer rates.

    Raises:
        ValueError: a model the paper has no per-layer table for.
    """
    if model not in PAPER_KEPT:
        raise ValueError(f"the paper gives per-layer rates for {', '.join(PAPER_KEPT)}, not {model!r}")
    return Sparsity({layer: round(1.0 - kept, 6) for layer, kept in PAPER_KEPT[model].items()})
