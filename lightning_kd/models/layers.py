"""Pieces several zoo models share: the channel shuffle of the ShuffleNets and the weight initialisation of the
RepDistiller VGG and MobileNetV2 ports."""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["ShuffleBlock", "init_conv_bn_linear"]


class ShuffleBlock(nn.Module):
    """Channel shuffle (Zhang et al., ShuffleNet, 2018): (N, g·c, H, W) -> view (N, g, c) -> transpose ->
    (N, c·g, H, W). No parameters."""

    def __init__(self, groups: int = 2) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = self.groups
        return x.view(n, g, c // g, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


def init_conv_bn_linear(network: nn.Module) -> None:
    """Kaiming-normal (fan out) convolutions, unit BatchNorm, N(0, 0.01) linear layers, zero biases, module by module
    in ``network.modules()`` order (so a seeded run draws what the original ports drew)."""
    for m in network.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
