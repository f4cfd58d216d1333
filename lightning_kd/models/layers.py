"""Pieces several zoo models share: the channel shuffle of the ShuffleNets, the staged forward of the CIFAR ResNets
and ShuffleNets, and the weight initialisations of the RepDistiller ports."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ShuffleBlock", "StagedNetwork", "init_conv_bn_linear", "init_resnet"]


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


def init_resnet(network: nn.Module) -> None:
    """Kaiming-normal (fan out) convolutions, unit BatchNorm / GroupNorm, module by module in ``network.modules()``
    order; linear layers keep PyTorch's initialisation (He et al. 2016, as in RepDistiller's ResNet ports)."""
    for m in network.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


class StagedNetwork(nn.Module):
    """Base of the zoo networks that run stem -> stages -> head -> global average pool -> linear classifier.

    A subclass builds the modules: ``avgpool``, the stages named in ``stage_layers`` (each an ``nn.Sequential``
    of blocks with a parameter-free ``preact`` hook point) and the classifier named ``classifier_name``; its
    :meth:`stem` defaults to ``relu(bn1(conv1(x)))`` and its :meth:`head` to the identity.
    """

    stage_layers: tuple[str, ...] = ("layer1", "layer2", "layer3")
    classifier_name = "linear"

    @property
    def preact_names(self) -> tuple[str, ...]:
        """The stages' pre-activations: the ``preact`` of each stage's last block (``layerK.<last>.preact``)."""
        return tuple(f"{layer}.{len(getattr(self, layer)) - 1}.preact" for layer in self.stage_layers)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn1(self.conv1(x)))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for layer in self.stage_layers:
            x = getattr(self, layer)(x)
        x = torch.flatten(self.avgpool(self.head(x)), 1)
        return getattr(self, self.classifier_name)(x)
