"""MobileNetV2 for CIFAR (width 0.5: RepDistiller's ``mobile_half``).

Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks",
CVPR 2018, in the CIFAR form of HobbitLong/RepDistiller ``models/mobilenetv2.py``
(Tian et al., ICLR 2020; also mdistiller): stride-2 3x3 stem, ReLU (not ReLU6),
the t=1 first block keeps its 1x1 expansion conv, the second stage is not
strided, and the 1x1 head keeps 1280 channels at width 0.5. Names, shapes and
forward semantics match RepDistiller so its checkpoints load with
``strict=True``; ``forward`` returns logits only and pooling is adaptive (equal
to RepDistiller's ``AvgPool2d(2, ceil_mode=True)`` on the 2x2 map of a 32x32 input).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from lightning_kd.models.layers import init_conv_bn_linear

__all__ = ["MobileNetV2", "mobile_half"]


def conv_bn(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


def conv_1x1_bn(inp: int, oup: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):
    """1x1 expand-BN-ReLU, 3x3 depthwise-BN-ReLU, 1x1 linear projection-BN; residual if shapes match."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = inp * expand_ratio
        self.stride = stride
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """CIFAR MobileNetV2: stem (stride 2), seven inverted-residual stages in ``blocks``, 1x1 head, linear."""

    # Ends of the resolution stages for a 32x32 input (16, 8, 4, 2 pixels): the
    # last block before each stride-2 block, then 'conv2', the 1x1-BN-ReLU head
    # whose output is the post-activation final map before pooling.
    stage_names = ("blocks.1", "blocks.2", "blocks.4", "conv2")
    # RepDistiller's features for AB (``is_feat`` with or without ``preact``; mdistiller's ``feats``): the outputs
    # of blocks 1, 2, 4 and 6. Inverted residuals end with a linear (BN, no ReLU) projection, so these are
    # pre-activation already.
    preact_names = ("blocks.1", "blocks.2", "blocks.4", "blocks.6")

    def __init__(self, expand_ratio: int = 6, num_classes: int = 100, width_mult: float = 1.0) -> None:
        super().__init__()
        t = expand_ratio
        setting = [  # t, c, n, s
            [1, 16, 1, 1],
            [t, 24, 2, 1],
            [t, 32, 3, 2],
            [t, 64, 4, 2],
            [t, 96, 3, 1],
            [t, 160, 3, 2],
            [t, 320, 1, 1],
        ]
        input_channel = int(32 * width_mult)
        self.conv1 = conv_bn(3, input_channel, 2)
        self.blocks = nn.ModuleList()
        for t_, c, n, s in setting:
            output_channel = int(c * width_mult)
            layers = []
            for stride in [s] + [1] * (n - 1):
                layers.append(InvertedResidual(input_channel, output_channel, stride, t_))
                input_channel = output_channel
            self.blocks.append(nn.Sequential(*layers))
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = conv_1x1_bn(input_channel, self.last_channel)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))

        init_conv_bn_linear(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for block in self.blocks:
            x = block(x)
        x = self.conv2(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.classifier(x)


def mobile_half(num_classes: int = 100) -> MobileNetV2:
    """MobileNetV2 x0.5 (expansion 6); the zoo name is ``MobileNetV2``."""
    return MobileNetV2(6, num_classes, width_mult=0.5)
