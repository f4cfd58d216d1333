"""CIFAR ResNets (resnet8 ... resnet110, resnet8x4, resnet32x4).

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016 (the
3-stage CIFAR variant of section 4.2), in the form used by the community
distillation benchmarks: HobbitLong/RepDistiller (Tian et al., "Contrastive
Representation Distillation", ICLR 2020) and megvii-research/mdistiller.

Parameter names, shapes and forward semantics match RepDistiller's
``models/resnet.py`` so that its published checkpoints load with
``strict=True`` and reproduce their logits. Differences: ``forward`` returns
logits only (take features with forward hooks on ``stage_names``, or on
``preact_names`` for the pre-ReLU stage outputs), and global pooling is
adaptive, which equals RepDistiller's ``AvgPool2d(8)`` on the 8x8 map of a
32x32 input. Each block's residual sum, before its final ReLU, is the output
of the parameter-free ``preact`` module (``nn.Identity``): no state_dict key
or output changes.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_kd.models.layers import StagedNetwork, init_resnet

__all__ = ["CifarResNet", "resnet8", "resnet14", "resnet20", "resnet32", "resnet44",
           "resnet56", "resnet110", "resnet8x4", "resnet32x4"]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, add the (projected) input, ReLU (post-activation).

    ``preact`` (identity) outputs the residual sum before the final ReLU: RepDistiller's ``preact``.
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride
        self.preact = nn.Identity()  # hook point of the pre-ReLU sum; no parameters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # Out of place, so hooks on bn2 keep the un-summed tensor and hooks on preact the pre-ReLU sum.
        return F.relu(self.preact(out + shortcut))


class CifarResNet(StagedNetwork):
    """3-stage CIFAR ResNet: 3x3 stem, three stages (stride 1, 2, 2), global pool, fc.

    ``num_filters`` is ``[stem, stage1, stage2, stage3]`` widths; ``depth = 6n + 2``.
    A 1x1 conv + BN projection is used whenever a block changes shape (option B).
    ``preact_names``: each stage's last residual sum before its ReLU.
    """

    # Stage ends; 'layer3' output (post-ReLU) is the final map before pooling.
    stage_names = ("layer1", "layer2", "layer3")
    classifier_name = "fc"

    def __init__(self, depth: int, num_filters: list[int], num_classes: int = 100) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n+2 for BasicBlock CIFAR ResNets, got {depth}")
        n = (depth - 2) // 6
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(3, num_filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(num_filters[1], n)
        self.layer2 = self._make_layer(num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(num_filters[3], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(num_filters[3] * BasicBlock.expansion, num_classes)
        init_resnet(self)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * BasicBlock.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * BasicBlock.expansion, kernel_size=1,
                          stride=stride, bias=False),
                nn.BatchNorm2d(planes * BasicBlock.expansion),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * BasicBlock.expansion
        layers += [BasicBlock(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn1(self.conv1(x)))


def _constructor(name: str, depth: int, num_filters: list[int]) -> Callable[..., CifarResNet]:
    """The zoo constructor ``name(num_classes=100)`` of the CIFAR ResNet of ``depth`` and ``num_filters``."""

    def build(num_classes: int = 100) -> CifarResNet:
        return CifarResNet(depth, num_filters, num_classes)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"CIFAR ResNet-{depth} of widths {num_filters} (stem, stages)."
    return build


_WIDTHS, _WIDTHS_X4 = [16, 16, 32, 64], [32, 64, 128, 256]  # x4: 4x wider stages (stem 32, stages 64/128/256)
resnet8 = _constructor("resnet8", 8, _WIDTHS)
resnet14 = _constructor("resnet14", 14, _WIDTHS)
resnet20 = _constructor("resnet20", 20, _WIDTHS)
resnet32 = _constructor("resnet32", 32, _WIDTHS)
resnet44 = _constructor("resnet44", 44, _WIDTHS)
resnet56 = _constructor("resnet56", 56, _WIDTHS)
resnet110 = _constructor("resnet110", 110, _WIDTHS)
resnet8x4 = _constructor("resnet8x4", 8, _WIDTHS_X4)
resnet32x4 = _constructor("resnet32x4", 32, _WIDTHS_X4)
