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

from lightning_kd.models.layers import ShuffleBlock

__all__ = ["ShuffleNetV2", "ShuffleV2"]


class SplitBlock(nn.Module):
    """Split channels into the first ``int(C * ratio)`` and the rest."""

    def __init__(self, ratio: float) -> None:
        super().__init__()
        self.ratio = ratio

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = int(x.size(1) * self.ratio)
        return x[:, :c], x[:, c:]


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
        self.conv1 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, kernel_size=3, stride=1, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.shuffle = ShuffleBlock()
        self.preact = nn.Identity()  # hook point of the pre-ReLU concatenation; no parameters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.split(x)
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        pre = self.bn3(self.conv3(out))
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
        # right branch
        self.conv3 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, kernel_size=3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.shuffle = ShuffleBlock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = self.bn1(self.conv1(x))
        left = F.relu(self.bn2(self.conv2(left)))
        right = F.relu(self.bn3(self.conv3(x)))
        right = self.bn4(self.conv4(right))
        right = F.relu(self.bn5(self.conv5(right)))
        return self.shuffle(torch.cat([left, right], 1))


class ShuffleNetV2(nn.Module):
    """1x1 stem (24 ch), three stages (32 -> 16, 8, 4), 1x1 conv-BN-ReLU head, pool, linear."""

    # Ends of the first two stages, then 'relu2': the head's ReLU after
    # layer3 -> conv2 -> bn2, whose output is the post-activation final map
    # before pooling (a hook on 'layer3' still gives the last stage's own output).
    stage_names = ("layer1", "layer2", "relu2")

    @property
    def preact_names(self) -> tuple[str, ...]:
        """The stages' pre-activations (RepDistiller's): the last basic unit's ``preact`` of each stage."""
        return tuple(f"{layer}.{len(getattr(self, layer)) - 1}.preact" for layer in ("layer1", "layer2", "layer3"))

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.relu2(self.bn2(self.conv2(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.linear(x)


def ShuffleV2(num_classes: int = 100) -> ShuffleNetV2:
    """ShuffleNet V2 1x (net_size=1 in RepDistiller)."""
    return ShuffleNetV2([116, 232, 464, 1024], [3, 7, 3], num_classes)
