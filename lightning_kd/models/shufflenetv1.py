"""ShuffleNet V1 for CIFAR (RepDistiller's ``ShuffleV1``: g=3, widths 240/480/960).

Zhang et al., "ShuffleNet: An Extremely Efficient Convolutional Neural Network
for Mobile Devices", CVPR 2018, in the CIFAR form of kuangliu/pytorch-cifar as
used by HobbitLong/RepDistiller ``models/ShuffleNetv1.py`` (Tian et al., ICLR
2020; also mdistiller): a 1x1 stride-1 stem (no max-pool) and three stages
that each start with a stride-2 concat unit. Names, shapes and forward
semantics match RepDistiller so its checkpoints load with ``strict=True``;
``forward`` returns logits only and pooling is adaptive (equal to
RepDistiller's ``avg_pool2d(4)`` on a 32x32 input). Each unit's merged output
before its ReLU is the output of the parameter-free ``preact`` module
(``nn.Identity``; see ``preact_names``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_kd.models.layers import ShuffleBlock, StagedNetwork

__all__ = ["ShuffleNetV1", "ShuffleV1"]


class Bottleneck(nn.Module):
    """ShuffleNet unit: 1x1 group conv-BN-ReLU, shuffle, 3x3 depthwise-BN, 1x1 group conv-BN.

    Stride 1 adds the input; stride 2 concatenates a 3x3 avg-pooled input (so
    ``out_planes`` is the residual branch's width only). ReLU after the merge;
    ``preact`` (identity) outputs the merge before it (RepDistiller's ``preact``).
    The first pointwise conv of the network (24 input channels) is not grouped.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        mid_planes = int(out_planes / 4)
        g = 1 if in_planes == 24 else groups
        self.conv1 = nn.Conv2d(in_planes, mid_planes, kernel_size=1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.shuffle1 = ShuffleBlock(groups=g)
        self.conv2 = nn.Conv2d(mid_planes, mid_planes, kernel_size=3, stride=stride, padding=1,
                               groups=mid_planes, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()  # identity
        if stride == 2:
            self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1))
        self.preact = nn.Identity()  # hook point of the pre-ReLU merge; no parameters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.shuffle1(out)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        out = self.preact(torch.cat([out, res], 1) if self.stride == 2 else out + res)
        return F.relu(out)


class ShuffleNetV1(StagedNetwork):
    """1x1 stem (24 ch), three stages (first unit stride 2: 32 -> 16, 8, 4), pool, linear.

    ``preact_names``: each stage's last merge before its ReLU.
    """

    # Stage ends; 'layer3' output (post-ReLU) is the final map before pooling.
    stage_names = ("layer1", "layer2", "layer3")

    def __init__(self, out_planes: list[int], num_blocks: list[int], groups: int,
                 num_classes: int = 100) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_planes = 24
        self.layer1 = self._make_layer(out_planes[0], num_blocks[0], groups)
        self.layer2 = self._make_layer(out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_layer(out_planes[2], num_blocks[2], groups)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(out_planes[2], num_classes)

    def _make_layer(self, out_planes: int, num_blocks: int, groups: int) -> nn.Sequential:
        layers = []
        for i in range(num_blocks):
            stride = 2 if i == 0 else 1
            cat_planes = self.in_planes if i == 0 else 0  # the pooled input is concatenated
            layers.append(Bottleneck(self.in_planes, out_planes - cat_planes, stride, groups))
            self.in_planes = out_planes
        return nn.Sequential(*layers)


def ShuffleV1(num_classes: int = 100) -> ShuffleNetV1:
    return ShuffleNetV1([240, 480, 960], [4, 8, 4], groups=3, num_classes=num_classes)
