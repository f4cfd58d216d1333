"""ImageNet-layout ResNet50 adapted to 32x32 inputs (RepDistiller's ``ResNet50``).

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016: the
4-stage bottleneck ResNet-50 ([3, 4, 6, 3] blocks, widths 64-512, expansion 4)
with the CIFAR stem of kuangliu/pytorch-cifar (3x3 stride-1 conv, no max-pool),
as in HobbitLong/RepDistiller ``models/resnetv2.py`` (Tian et al., ICLR 2020)
and mdistiller. Names, shapes and forward semantics match RepDistiller so its
checkpoints load with ``strict=True``; ``forward`` returns logits only. Each
block's residual sum, before its final ReLU, is the output of the
parameter-free ``preact`` module (``nn.Identity``; see ``preact_names``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_kd.models.layers import StagedNetwork, init_resnet

__all__ = ["ImageNetStyleResNet", "ResNet50"]


class Bottleneck(nn.Module):
    """1x1 reduce - 3x3 (strided) - 1x1 expand (x4), each with BN; add shortcut; ReLU.

    ``preact`` (identity) outputs the residual sum before the final ReLU: RepDistiller's ``preact``.
    """

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = self.expansion * planes
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()  # identity
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )
        self.preact = nn.Identity()  # hook point of the pre-ReLU sum; no parameters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(self.preact(out + self.shortcut(x)))


class ImageNetStyleResNet(StagedNetwork):
    """4-stage bottleneck ResNet with a 3x3 stride-1 stem (32 -> 32, 16, 8, 4 spatially).

    ``preact_names``: each stage's last residual sum before its ReLU.
    """

    # Stage ends; 'layer4' output (post-ReLU, 4x4 for 32x32 input) is the final pre-pool map.
    stage_names = stage_layers = ("layer1", "layer2", "layer3", "layer4")

    def __init__(self, num_blocks: list[int], num_classes: int = 100) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(512, num_blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512 * Bottleneck.expansion, num_classes)
        init_resnet(self)

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(Bottleneck(self.in_planes, planes, s))
            self.in_planes = planes * Bottleneck.expansion
        return nn.Sequential(*layers)


def ResNet50(num_classes: int = 100) -> ImageNetStyleResNet:
    return ImageNetStyleResNet([3, 4, 6, 3], num_classes)
