"""Caffe's reference AlexNet (BVLC), the network Han et al. pruned 9x."""

from __future__ import annotations

from collections import OrderedDict

import torch.nn as nn

from prunet.models.registry import register_model


@register_model("alexnet", (3, 227, 227), "Caffe reference AlexNet, grouped conv2/4/5, LRN (60,965,224 parameters)")
def alexnet(num_classes: int = 1000, dropout: float = 0.5) -> nn.Sequential:
    """AlexNet as in Caffe's ``bvlc_alexnet``: 227x227 input, two-group convolutions, LRN.

    Args:
        num_classes: outputs of ``fc8``.
        dropout: dropout ratio before ``fc7`` and ``fc8``.
    """

    def lrn() -> nn.LocalResponseNorm:
        # Caffe: local_size 5, alpha 1e-4, beta 0.75 (k = 1).
        return nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)

    layers = [
        ("conv1", nn.Conv2d(3, 96, 11, stride=4)),  # 227 -> 55
        ("relu1", nn.ReLU()),
        ("norm1", lrn()),
        ("pool1", nn.MaxPool2d(3, 2)),  # 55 -> 27
        ("conv2", nn.Conv2d(96, 256, 5, padding=2, groups=2)),
        ("relu2", nn.ReLU()),
        ("norm2", lrn()),
        ("pool2", nn.MaxPool2d(3, 2)),  # 27 -> 13
        ("conv3", nn.Conv2d(256, 384, 3, padding=1)),
        ("relu3", nn.ReLU()),
        ("conv4", nn.Conv2d(384, 384, 3, padding=1, groups=2)),
        ("relu4", nn.ReLU()),
        ("conv5", nn.Conv2d(384, 256, 3, padding=1, groups=2)),
        ("relu5", nn.ReLU()),
        ("pool5", nn.MaxPool2d(3, 2)),  # 13 -> 6
        ("flatten", nn.Flatten()),  # 256 * 6 * 6 = 9216
        ("fc6", nn.Linear(9216, 4096)),
        ("relu6", nn.ReLU()),
        ("drop6", nn.Dropout(dropout)),
        ("fc7", nn.Linear(4096, 4096)),
        ("relu7", nn.ReLU()),
        ("drop7", nn.Dropout(dropout)),
        ("fc8", nn.Linear(4096, num_classes)),
    ]
    return nn.Sequential(OrderedDict(layers))
