"""LeNet-300-100 and LeNet-5 as pruned in Han et al. (2015), Caffe's variants."""

from __future__ import annotations

from collections import OrderedDict

import torch.nn as nn

from prunet.models.registry import register_model


@register_model("lenet_300_100", (1, 28, 28), "MLP 784-300-100-10 (266,610 parameters)")
def lenet_300_100(num_classes: int = 10, in_features: int = 784, dropout: float = 0.0) -> nn.Sequential:
    """LeNet-300-100: two hidden fully connected layers of 300 and 100 ReLU units.

    Args:
        num_classes: outputs of the last layer.
        in_features: flattened input size (784 for 28x28 images).
        dropout: dropout ratio before ``fc2`` and ``fc3``; 0 (the paper's LeNets) adds none.
    """
    layers: list[tuple[str, nn.Module]] = [
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(in_features, 300)),
        ("relu1", nn.ReLU()),
    ]
    if dropout:
        layers.append(("drop1", nn.Dropout(dropout)))
    layers += [("fc2", nn.Linear(300, 100)), ("relu2", nn.ReLU())]
    if dropout:
        layers.append(("drop2", nn.Dropout(dropout)))
    layers.append(("fc3", nn.Linear(100, num_classes)))
    return nn.Sequential(OrderedDict(layers))


@register_model("lenet_5", (1, 28, 28), "Caffe LeNet-5: conv20-pool-conv50-pool-fc500-fc10 (431,080 parameters)")
def lenet_5(num_classes: int = 10, in_channels: int = 1, dropout: float = 0.0) -> nn.Sequential:
    """Caffe's LeNet-5: no activation after the convolutions, ReLU after ``fc1``.

    Args:
        num_classes: outputs of the last layer.
        in_channels: input image channels.
        dropout: dropout ratio before ``fc2``; 0 (the paper) adds none.
    """
    layers: list[tuple[str, nn.Module]] = [
        ("conv1", nn.Conv2d(in_channels, 20, kernel_size=5)),  # 28 -> 24
        ("pool1", nn.MaxPool2d(2, 2)),  # 24 -> 12
        ("conv2", nn.Conv2d(20, 50, kernel_size=5)),  # 12 -> 8
        ("pool2", nn.MaxPool2d(2, 2)),  # 8 -> 4
        ("flatten", nn.Flatten()),  # 50 * 4 * 4 = 800
        ("fc1", nn.Linear(800, 500)),
        ("relu1", nn.ReLU()),
    ]
    if dropout:
        layers.append(("drop1", nn.Dropout(dropout)))
    layers.append(("fc2", nn.Linear(500, num_classes)))
    return nn.Sequential(OrderedDict(layers))
