"""A model and data from outside prunet's registry: a small CIFAR-style ResNet, and two data factories.

Recipes name them by file (or module) and function, e.g. ``recipes/resnet_fashion.yaml``::

    model: {factory: "examples/resnet.py:resnet", kwargs: {depth: 8, width: 16}}
    data:  {factory: "examples/resnet.py:fashion_splits", kwargs: {size: 32}}

Paths are relative to the folder ``prunet`` runs in (or use a module on the Python path:
``mypkg.nets:resnet``). Any function returning an ``nn.Module`` works as a model factory;
any function returning ``(train, val, test)`` ``torch.utils.data.Dataset``s of ``(x, y)``
pairs works as a data factory.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from prunet.data import load_dataset


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a shortcut (He et al. 2016, the CIFAR variant)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """``depth = 6n + 2`` layers in three stages of ``n`` blocks (widths w, 2w, 4w), global pooling, one FC."""

    def __init__(self, depth: int = 20, width: int = 16, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2 with n >= 1 (8, 14, 20, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages, cin = [], width
        for i, cout in enumerate((width, 2 * width, 4 * width)):
            for j in range(n):
                stages.append(BasicBlock(cin, cout, stride=2 if i > 0 and j == 0 else 1))
                cin = cout
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.stages(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, C)
        return self.fc(x)


def resnet(depth: int = 20, width: int = 16, num_classes: int = 10, in_channels: int = 1) -> ResNet:
    """The model factory: ``model: {factory: "examples/resnet.py:resnet", kwargs: {depth: 20}}``."""
    return ResNet(depth, width, num_classes, in_channels)


class PaddedImages(Dataset):
    """Fashion-MNIST images as float tensors, zero-padded from 28x28 to ``size`` x ``size`` and normalised."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: float, std: float, size: int):
        self.images, self.labels, self.mean, self.std = images, labels, mean, std
        self.pad = (size - 28) // 2

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = (self.images[i].to(torch.float32) / 255.0 - self.mean) / self.std
        x = F.pad(x.unsqueeze(0), (self.pad,) * 4)  # (1, size, size)
        return x, int(self.labels[i])


def fashion_splits(size: int = 32, val_size: int = 5000, data_dir: str | None = None) -> dict:
    """The data factory over real data: Fashion-MNIST at ``size`` x ``size``, through a DataLoader."""
    if size < 28 or size % 2:
        raise ValueError(f"size must be even and >= 28, got {size}")
    d = load_dataset("fashion-mnist", data_dir=data_dir, val_size=val_size)
    wrap = [PaddedImages(s.images, s.labels, d.mean, d.std, size) for s in (d.train, d.val, d.test)]
    return {"train": wrap[0], "val": wrap[1], "test": wrap[2], "classes": d.classes}


def synthetic_splits(n_train: int = 1024, n_val: int = 256, n_test: int = 256, classes: int = 4, size: int = 16,
                     seed: int = 0) -> tuple[TensorDataset, None, TensorDataset]:
    """A learnable toy task, for tests: each class a fixed random pattern plus noise, ``(1, size, size)``.

    The validation split is None: prunet holds out ``data.val_size`` training examples itself.
    """
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(classes, 1, size, size, generator=g)

    def draw(n: int) -> TensorDataset:
        y = torch.randint(0, classes, (n,), generator=g)
        x = patterns[y] + 1.5 * torch.randn(n, 1, size, size, generator=g)
        return TensorDataset(x, y)

    return draw(n_train + n_val), None, draw(n_test)
