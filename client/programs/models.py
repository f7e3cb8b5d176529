"""Image classifiers for the example trainer and the study (:mod:`client.programs`).

    from client.programs.models import build_model
    model = build_model("wrn40_2", num_classes=10)     # or "resnet18", "small_cnn"

- ``wrn40_2``: the Wide ResNet the AugMix paper trains on CIFAR (depth 40, widen factor 2,
  no dropout), written after the authors' ``third_party/WideResNet_pytorch/wideresnet.py``:
  pre-activation basic blocks (BN-ReLU-conv), a 1x1 projection shortcut that takes the
  activated input where the width or stride changes, and their initialisation (conv weights
  N(0, sqrt(2 / (k*k*out_channels))), BN weight 1 and bias 0, linear bias 0). About 2.2M
  parameters for 10 classes.
- ``resnet18``: ResNet-18 in its usual CIFAR form (3x3 stride-1 stem, no max-pool, basic
  blocks [2, 2, 2, 2] of 64..512 channels, 1x1 conv + BN projection shortcuts). About 11.2M
  parameters for 10 classes. For inputs of :data:`LARGE_IMAGE` pixels or more,
  ``build_model(..., image_size)`` gives it the ImageNet stem (7x7 stride-2 conv, max-pool).
- ``small_cnn``: three conv-BN-ReLU layers, for CPU demos and tests (seconds per epoch); a
  7x7 stride-4 first layer for large inputs.

All three end in global average pooling, so they accept any input size.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["MODELS", "ResNet18", "WideResNet", "build_model", "small_cnn"]


# ---------------------------------------------------------------------------- Wide ResNet


class _WideBasic(nn.Module):
    """Pre-activation basic block of the AugMix repository's WideResNet."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, padding=1, bias=False)
        self.shortcut = (
            None
            if in_planes == out_planes and stride == 1
            else nn.Conv2d(in_planes, out_planes, 1, stride, padding=0, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(activated))))
        # the projection shortcut sees the activated input, the identity one the raw input
        return out + (x if self.shortcut is None else self.shortcut(activated))


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` for CIFAR-sized inputs (no dropout)."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, padding=1, bias=False)
        self.block1 = self._group(n, widths[0], widths[1], 1)
        self.block2 = self._group(n, widths[1], widths[2], 2)
        self.block3 = self._group(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)  # = avg_pool2d(8) of the reference at 32x32
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    @staticmethod
    def _group(n: int, in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            *(_WideBasic(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
              for i in range(n))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.pool(self.relu(self.bn1(out)))
        return self.fc(torch.flatten(out, 1))


# ---------------------------------------------------------------------------- ResNet-18


class _BasicBlock(nn.Module):
    """Post-activation basic block (He et al. 2016) with a 1x1 conv + BN projection."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18: the CIFAR variant (3x3 stride-1 stem, no max-pool) for small images; with
    ``imagenet_stem`` the ImageNet one (7x7 stride-2 conv and a stride-2 max-pool, 16x fewer
    positions after the stem), which larger inputs need to be affordable."""

    def __init__(self, num_classes: int, imagenet_stem: bool = False) -> None:
        super().__init__()
        if imagenet_stem:
            self.stem = nn.Sequential(
                nn.Conv2d(3, 64, 7, 2, padding=3, bias=False), nn.BatchNorm2d(64),
                nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, padding=1))
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(3, 64, 3, 1, padding=1, bias=False), nn.BatchNorm2d(64),
                nn.ReLU(inplace=True))
        layers: list[nn.Module] = []
        in_planes = 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(_BasicBlock(in_planes, planes, stride),
                                        _BasicBlock(planes, planes, 1)))
            in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


# ---------------------------------------------------------------------------- small CNN


def small_cnn(num_classes: int = 10, imagenet_stem: bool = False) -> nn.Module:
    """A small CNN that trains in seconds on a CPU: for 32x32 inputs, or with
    ``imagenet_stem`` a 7x7 stride-4 first layer for 224x224 ones (CPU smoke runs)."""
    first = (nn.Conv2d(3, 16, 7, stride=4, padding=3) if imagenet_stem
             else nn.Conv2d(3, 16, 3, padding=1))
    return nn.Sequential(
        first, nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes),
    )  # fmt: skip


# ---------------------------------------------------------------------------- by name

_BUILDERS: dict[str, Callable[[int, bool], nn.Module]] = {
    "wrn40_2": lambda num_classes, large: WideResNet(40, 2, num_classes),
    "resnet18": ResNet18,
    "small_cnn": small_cnn,
}
LARGE_IMAGE = 96
"""Inputs at least this many pixels a side get the ImageNet stem (resnet18, small_cnn)."""
MODELS = tuple(_BUILDERS)
"""The names :func:`build_model` accepts."""


def build_model(name: str, num_classes: int, image_size: int = 32) -> nn.Module:
    """A freshly initialised model ``name`` (one of :data:`MODELS`) with ``num_classes``
    outputs for ``image_size`` inputs (the ImageNet stem from :data:`LARGE_IMAGE` on; the
    WideResNet is CIFAR's at any size); seed torch first for reproducible weights."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return _BUILDERS[name](num_classes, image_size >= LARGE_IMAGE)
