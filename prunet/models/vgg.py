"""VGG-16 (configuration D), the network Han et al. pruned 13x."""

from __future__ import annotations

from collections import OrderedDict

import torch.nn as nn

from prunet.models.registry import register_model

# Output channels of each conv layer, block by block (Simonyan & Zisserman, table 1, column D).
_VGG16_BLOCKS = [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]]


@register_model("vgg16", (3, 224, 224), "VGG-16 configuration D with dropout (138,357,544 parameters)")
def vgg16(num_classes: int = 1000, dropout: float = 0.5) -> nn.Sequential:
    """VGG-16: thirteen 3x3 convolutions in five blocks, then fc6-fc7-fc8.

    Args:
        num_classes: outputs of ``fc8``.
        dropout: dropout ratio before ``fc7`` and ``fc8``.
    """
    layers: list[tuple[str, nn.Module]] = []
    in_channels = 3
    for block, widths in enumerate(_VGG16_BLOCKS, start=1):
        for i, out_channels in enumerate(widths, start=1):
            layers.append((f"conv{block}_{i}", nn.Conv2d(in_channels, out_channels, 3, padding=1)))
            layers.append((f"relu{block}_{i}", nn.ReLU()))
            in_channels = out_channels
        layers.append((f"pool{block}", nn.MaxPool2d(2, 2)))  # 224 -> 7 after five pools
    layers += [
        ("flatten", nn.Flatten()),  # 512 * 7 * 7 = 25088
        ("fc6", nn.Linear(512 * 7 * 7, 4096)),
        ("relu6", nn.ReLU()),
        ("drop6", nn.Dropout(dropout)),
        ("fc7", nn.Linear(4096, 4096)),
        ("relu7", nn.ReLU()),
        ("drop7", nn.Dropout(dropout)),
        ("fc8", nn.Linear(4096, num_classes)),
    ]
    return nn.Sequential(OrderedDict(layers))
