"""Wide Residual Networks (wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2).

Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016: pre-activation
(BN-ReLU-conv) blocks, depth ``6n + 4``, widths ``16k, 32k, 64k``, and a final
BN-ReLU before pooling. Follows HobbitLong/RepDistiller ``models/wrn.py``
(Tian et al., ICLR 2020; also mdistiller): names, shapes and forward semantics
match so its checkpoints load with ``strict=True`` and reproduce its logits.
``forward`` returns logits only; pooling is adaptive (equal to RepDistiller's
``avg_pool2d(8)`` on a 32x32 input). A stage's pre-activation (RepDistiller's
``preact``: the BN that opens the next stage, or the final BN, applied to the
stage's output) is the output of that BN module (see ``preact_names``): the
ReLUs after the blocks' first BN are out of place so that it stays intact.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["WideResNet", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2"]


class BasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3, plus shortcut.

    When the block changes width, the *activated* input feeds both the residual
    branch and the 1x1 ``convShortcut``; otherwise the raw input is the shortcut.
    ``relu1`` is out of place: a hook on ``bn1`` sees its pre-activation output (same results and
    memory as in place: nothing keeps the BN output for the backward pass).
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()  # not in-place: a hook on bn1 keeps the pre-activation
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = None
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride,
                                          padding=0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        return shortcut + out


class NetworkBlock(nn.Module):
    """One stage: ``nb_layers`` blocks, the first one strided / widening."""

    def __init__(self, nb_layers: int, in_planes: int, out_planes: int, stride: int,
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        self.layer = nn.Sequential(*[
            BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
            for i in range(nb_layers)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-k: conv3x3 stem, three NetworkBlocks (stride 1, 2, 2), BN-ReLU, pool, fc."""

    # 'block1', 'block2' end the first two stages. The last stage ends with the
    # network-level BN-ReLU after block3, so its end is the module 'relu', whose
    # output is the post-activation final map before pooling (same resolution
    # as block3's raw, pre-BN output, which a hook on 'block3' still gives).
    stage_names = ("block1", "block2", "relu")
    # The stages' pre-activations (RepDistiller's preact, also mdistiller's preact_feats and OFD's BNs): the BN
    # that opens the next stage, or the final BN, applied to each stage's output.
    preact_names = ("block2.layer.0.bn1", "block3.layer.0.bn1", "bn1")

    def __init__(self, depth: int, num_classes: int = 100, widen_factor: int = 1,
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, channels[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU()  # not in-place: a hook on it sees the pre-activation input too
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels[3], num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.block1(x)
        x = self.block2(x)
        x = self.block3(x)
        x = self.relu(self.bn1(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def wrn_16_1(num_classes: int = 100) -> WideResNet:
    return WideResNet(16, num_classes, widen_factor=1)


def wrn_16_2(num_classes: int = 100) -> WideResNet:
    return WideResNet(16, num_classes, widen_factor=2)


def wrn_40_1(num_classes: int = 100) -> WideResNet:
    return WideResNet(40, num_classes, widen_factor=1)


def wrn_40_2(num_classes: int = 100) -> WideResNet:
    return WideResNet(40, num_classes, widen_factor=2)
