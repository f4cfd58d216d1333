"""ShuffleNet V2 1x for CIFAR (RepDistiller's ``ShuffleV2``).

Ma et al., "ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture
Design", ECCV 2018, in the CIFAR form of kuangliu/pytorch-cifar as used by
HobbitLong/RepDistiller ``models/ShuffleNetv2.py`` (Tian et al., ICLR 2020;
also mdistiller): a 1x1 stride-1 stem (no max-pool), stages of widths
116/232/464 with [3, 7, 3] basic units after a down-sampling unit, and a 1x1
conv to 1024 channels. Names, shapes and forward semantics match RepDistiller
so its checkpoints load with ``strict=True``; ``forward`` returns logits only
and pooling is adaptive (equal to RepDistiller's ``avg_pool2d(4)`` on a 32x32
input). Each basic unit's pre-activation, as RepDistiller defines it (the
pass-through half concatenated with the branch's last BN output, before the
ReLU and the channel shuffle), is the output of the parameter-free ``preact``
module (``nn.Identity``; see ``preact_names``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_kd.models.layers import ShuffleBlock, StagedNetwork

__all__ = ["ShuffleNetV2", "ShuffleV2"]


class SplitBlock(nn.Module):
    """Split channels into the first ``int(C * ratio)`` and the rest."""

    def __init__(self, ratio: float) -> None:
        super().__init__()
        self.ratio = ratio

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = int(x.size(1) * self.ratio)
        return x[:, :c], x[:, c:]


def add_branch(unit: nn.Module, first: int, in_channels: int, channels: int, stride: int) -> None:
    """Register the units' branch on ``unit`` under RepDistiller's flat names ``conv{first}``/``bn{first}`` onwards:
    1x1 conv, 3x3 depthwise conv of ``stride``, 1x1 conv, each followed by its BN."""
    specs = ((in_channels, 1, 1, 1), (channels, 3, stride, channels), (channels, 1, 1, 1))
    for index, (inputs, kernel, conv_stride, groups) in enumerate(specs, start=first):
        conv = nn.Conv2d(inputs, channels, kernel, conv_stride, kernel // 2, groups=groups, bias=False)
        setattr(unit, f"conv{index}", conv)
        setattr(unit, f"bn{index}", nn.BatchNorm2d(channels))


def run_branch(unit: nn.Module, first: int, x: torch.Tensor) -> torch.Tensor:
    """The branch of :func:`add_branch`: 1x1-BN-ReLU, 3x3 dw-BN, 1x1-BN (before its final ReLU)."""

    def conv_bn(k: int, y: torch.Tensor) -> torch.Tensor:
        return getattr(unit, f"bn{first + k}")(getattr(unit, f"conv{first + k}")(y))

    return conv_bn(2, conv_bn(1, F.relu(conv_bn(0, x))))


class BasicBlock(nn.Module):
    """Stride-1 unit: split; second half 1x1-BN-ReLU, 3x3 dw-BN, 1x1-BN-ReLU; concat with first half; shuffle.

    ``preact`` (identity) outputs RepDistiller's ``preact``: the first half concatenated with the last BN's
    output, before the ReLU and unshuffled. That concatenation is computed for the hook only; the unit's output
    is computed exactly as without it.
    """

    def __init__(self, in_channels: int, split_ratio: float = 0.5) -> None:
        super().__init__()
        self.split = SplitBlock(split_ratio)
        c = int(in_channels * split_ratio)
        add_branch(self, 1, c, c, stride=1)
        self.shuffle = ShuffleBlock()
        self.preact = nn.Identity()  # hook point of the pre-ReLU concatenation; no parameters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.split(x)
        pre = run_branch(self, 1, x2)
        self.preact(torch.cat([x1, pre], 1))  # for hooks only (freed at once when none holds it)
        out = F.relu(pre)
        return self.shuffle(torch.cat([x1, out], 1))


class DownBlock(nn.Module):
    """Stride-2 unit: left 3x3 dw(s2)-BN, 1x1-BN-ReLU; right 1x1-BN-ReLU, 3x3 dw(s2)-BN, 1x1-BN-ReLU; concat; shuffle."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        # left branch
        self.conv1 = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=1,
                               groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        # right branch: the basic unit's, strided
        add_branch(self, 3, in_channels, mid, stride=2)
        self.shuffle = ShuffleBlock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = self.bn1(self.conv1(x))
        left = F.relu(self.bn2(self.conv2(left)))
        right = F.relu(run_branch(self, 3, x))
        return self.shuffle(torch.cat([left, right], 1))


class ShuffleNetV2(StagedNetwork):
    """1x1 stem (24 ch), three stages (32 -> 16, 8, 4), 1x1 conv-BN-ReLU head, pool, linear.

    ``preact_names``: RepDistiller's pre-activation of each stage's last basic unit.
    """

    # Ends of the first two stages, then 'relu2': the head's ReLU after
    # layer3 -> conv2 -> bn2, whose output is the post-activation final map
    # before pooling (a hook on 'layer3' still gives the last stage's own output).
    stage_names = ("layer1", "layer2", "relu2")

    def __init__(self, out_channels: list[int], num_blocks: list[int], num_classes: int = 100) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_channels = 24
        self.layer1 = self._make_layer(out_channels[0], num_blocks[0])
        self.layer2 = self._make_layer(out_channels[1], num_blocks[1])
        self.layer3 = self._make_layer(out_channels[2], num_blocks[2])
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], kernel_size=1, stride=1, padding=0, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.relu2 = nn.ReLU()  # not in-place: a hook on it also sees the pre-activation input
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(out_channels[3], num_classes)

    def _make_layer(self, out_channels: int, num_blocks: int) -> nn.Sequential:
        layers: list[nn.Module] = [DownBlock(self.in_channels, out_channels)]
        layers += [BasicBlock(out_channels) for _ in range(num_blocks)]
        self.in_channels = out_channels
        return nn.Sequential(*layers)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu2(self.bn2(self.conv2(x)))


def ShuffleV2(num_classes: int = 100) -> ShuffleNetV2:
    """ShuffleNet V2 1x (net_size=1 in RepDistiller)."""
    return ShuffleNetV2([116, 232, 464, 1024], [3, 7, 3], num_classes)
