"""VGG with batch norm for CIFAR (vgg8, vgg11, vgg13, vgg16, vgg19).

Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
Recognition", ICLR 2015, in the CIFAR form of HobbitLong/RepDistiller
``models/vgg.py`` (Tian et al., ICLR 2020; also mdistiller): five conv blocks
with 2x2 max-pools between the first four, global average pooling and a single
linear classifier (no fc-4096 head). ``vgg8`` is RepDistiller's extra
one-conv-per-block configuration. Names, shapes and forward semantics match
RepDistiller so its checkpoints load with ``strict=True``; ``forward`` returns
logits only.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from lightning_kd.models.layers import init_conv_bn_linear

__all__ = ["VGG", "vgg8", "vgg11", "vgg13", "vgg16", "vgg19"]

# Output widths of the convs of each of the five blocks.
CFGS: dict[str, list[list[int]]] = {
    "S": [[64], [128], [256], [512], [512]],  # vgg8
    "A": [[64], [128], [256, 256], [512, 512], [512, 512]],  # vgg11
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],  # vgg13
    "D": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],  # vgg16
    "E": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],  # vgg19
}


def make_block(widths: list[int], in_channels: int) -> nn.Sequential:
    """(conv3x3 with bias, BN, ReLU) per width.

    The block's last ReLU is a separate, not in-place module (RepDistiller applies
    it in ``forward``), so the block output is post-activation and a hook on the
    last BN (``block[-2]``) still sees the pre-activation map. A parameter-free
    module appended at the end leaves the state_dict keys unchanged.
    """
    layers: list[nn.Module] = []
    for v in widths:
        layers += [nn.Conv2d(in_channels, v, kernel_size=3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
        in_channels = v
    layers[-1] = nn.ReLU()
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """Five VGG blocks; max-pool after block0-2 (and block3 only for 64x64 inputs), GAP, linear.

    For a 32x32 input the block outputs are 32, 16, 8, 4, 4 pixels wide: like
    RepDistiller, the pool after block3 is applied only when the input is 64 high.
    """

    # The five conv blocks (post-ReLU outputs); 'block4' is the final pre-pool map.
    stage_names = ("block0", "block1", "block2", "block3", "block4")

    @property
    def preact_names(self) -> tuple[str, ...]:
        """RepDistiller's pre-activations: the last BN of ``block1``..``block4`` (``blockK.<len - 2>``), before the
        block's final ReLU (not ``block0``: RepDistiller's first feature is always post-ReLU)."""
        return tuple(f"block{i}.{len(getattr(self, f'block{i}')) - 2}" for i in range(1, 5))

    def __init__(self, cfg: list[list[int]], num_classes: int = 100) -> None:
        super().__init__()
        self.block0 = make_block(cfg[0], 3)
        self.block1 = make_block(cfg[1], cfg[0][-1])
        self.block2 = make_block(cfg[2], cfg[1][-1])
        self.block3 = make_block(cfg[3], cfg[2][-1])
        self.block4 = make_block(cfg[4], cfg[3][-1])
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cfg[4][-1], num_classes)

        init_conv_bn_linear(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[2]
        x = self.pool0(self.block0(x))
        x = self.pool1(self.block1(x))
        x = self.pool2(self.block2(x))
        x = self.block3(x)
        if h == 64:  # RepDistiller's Tiny-ImageNet special case
            x = self.pool3(x)
        x = self.block4(x)
        x = torch.flatten(self.pool4(x), 1)
        return self.classifier(x)


def vgg8(num_classes: int = 100) -> VGG:
    return VGG(CFGS["S"], num_classes)


def vgg11(num_classes: int = 100) -> VGG:
    return VGG(CFGS["A"], num_classes)


def vgg13(num_classes: int = 100) -> VGG:
    return VGG(CFGS["B"], num_classes)


def vgg16(num_classes: int = 100) -> VGG:
    return VGG(CFGS["D"], num_classes)


def vgg19(num_classes: int = 100) -> VGG:
    return VGG(CFGS["E"], num_classes)
