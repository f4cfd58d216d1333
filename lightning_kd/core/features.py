"""Capture named intermediate outputs of any ``nn.Module`` with forward hooks.

Feature-based methods (AT, SP, FSP, ...) declare module paths such as ``"layer2"`` or
``"features.6"``; :class:`FeatureHooks` records what those modules return on every forward, so any
model (the CIFAR zoo, torchvision, timm, a user's own) works without being rewritten to return
features.
"""
from __future__ import annotations

import difflib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def resolve_modules(model: nn.Module, names: Sequence[str], owner: str = "model") -> dict[str, nn.Module]:
    """Map module paths to modules; an unknown path raises one ``ValueError`` with the nearest valid names."""
    modules = dict(model.named_modules())
    resolved = {}
    for name in names:
        if name not in modules:
            close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.4)
            hint = f" Closest valid names: {', '.join(close)}." if close else ""
            raise ValueError(f"Unknown {owner} layer {name!r} ({type(model).__name__} has no such module).{hint}")
        resolved[name] = modules[name]
    return resolved


def pool_to_smallest(*maps: torch.Tensor) -> list[torch.Tensor]:
    """Adaptive-average-pool maps shaped (..., H, W) to the smallest height and width among them.

    Maps already of that size pass through untouched.
    """
    size = (min(m.shape[-2] for m in maps), min(m.shape[-1] for m in maps))
    return [m if tuple(m.shape[-2:]) == size else F.adaptive_avg_pool2d(m, size) for m in maps]


class FeatureHooks:
    """Record the outputs of named submodules of ``model`` during its forward pass.

    ``pop()`` returns ``{name: output}`` for the last forward and forgets them, so no activations
    outlive the step that produced them.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], owner: str = "model") -> None:
        self.names = list(names)
        self._outputs: dict[str, torch.Tensor] = {}
        self._handles = [
            module.register_forward_hook(self._recorder(name))
            for name, module in resolve_modules(model, self.names, owner).items()
        ]

    def _recorder(self, name: str):
        def hook(_module: nn.Module, _inputs, output) -> None:
            self._outputs[name] = output

        return hook

    def pop(self) -> dict[str, torch.Tensor]:
        outputs, self._outputs = self._outputs, {}
        return outputs

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
