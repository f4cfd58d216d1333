"""Capture named intermediate outputs of any ``nn.Module`` with forward hooks.

Feature-based methods (AT, SP, FSP, ...) declare module paths such as ``"layer2"`` or
``"features.6"``; :class:`FeatureHooks` records what those modules return on every forward, so any
model (the CIFAR zoo, torchvision, timm, a user's own) works without being rewritten to return
features. A path ending in ``:input`` records what the module receives instead (its first argument):
``"fc:input"`` is the pooled feature a classifier reads, whatever function pooled it.
"""
from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterator, Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


#: Suffix of a layer name that asks for the module's input rather than its output.
INPUT_SUFFIX = ":input"


def resolve_modules(model: nn.Module, names: Sequence[str], owner: str = "model") -> dict[str, nn.Module]:
    """Map module paths (``:input`` allowed at the end) to modules; an unknown path raises one ``ValueError``
    with the nearest valid names."""
    modules = dict(model.named_modules())
    resolved = {}
    for name in names:
        path = name.removesuffix(INPUT_SUFFIX)
        if path not in modules:
            close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.4)
            hint = f" Closest valid names: {', '.join(close)}." if close else ""
            raise ValueError(f"Unknown {owner} layer {name!r} ({type(model).__name__} has no such module).{hint}")
        resolved[name] = modules[path]
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
    outlive the step that produced them. A name ending in ``:input`` records the module's first input.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], owner: str = "model") -> None:
        self.names = list(names)
        self._outputs: dict[str, torch.Tensor] = {}
        self._handles = [
            module.register_forward_pre_hook(self._input_recorder(name))
            if name.endswith(INPUT_SUFFIX)
            else module.register_forward_hook(self._recorder(name))
            for name, module in resolve_modules(model, self.names, owner).items()
        ]

    def _recorder(self, name: str):
        def hook(_module: nn.Module, _inputs, output) -> None:
            self._outputs[name] = output

        return hook

    def _input_recorder(self, name: str):
        def hook(_module: nn.Module, inputs) -> None:
            self._outputs[name] = inputs[0]

        return hook

    def pop(self) -> dict[str, torch.Tensor]:
        outputs, self._outputs = self._outputs, {}
        return outputs

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


@contextlib.contextmanager
def evaluation_mode(*networks: Optional[nn.Module]) -> Iterator[None]:
    """Run ``networks`` in eval mode under ``torch.no_grad`` (no BatchNorm statistic moves, no graph is kept),
    then give each its own mode back, whatever happens inside.

    Example::

        with evaluation_mode(self.student):
            confidence = self.student(images).softmax(-1).amax(-1)
    """
    present = [network for network in networks if network is not None]
    modes = [network.training for network in present]
    for network in present:
        network.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for network, mode in zip(present, modes):
            network.train(mode)


def layer_shapes(
    network: nn.Module, names: Sequence[str], image_size: int = 32, owner: str = "model"
) -> dict[str, tuple[int, ...]]:
    """The output shape (without the batch) of each named layer of ``network`` on ``image_size``² inputs.

    The one shape probe of the library: a method calls it in ``__init__`` to size the heads it owns (regressors,
    embeddings) from the layers it reads, e.g. ``{"layer2": (32, 16, 16)}``. It runs the network once on two
    zero images in :func:`evaluation_mode` on the network's device (channels: the first convolution's input,
    else 3). A layer that does not run in the forward pass, or does not output one tensor, is one clear error.

    Example::

        shapes = layer_shapes(self.student, ["layer2"], image_size=32)
        self.regressor = nn.Conv2d(shapes["layer2"][0], 64, kernel_size=1)
    """
    hooks = FeatureHooks(network, names, owner)
    conv = next((m for m in network.modules() if isinstance(m, nn.Conv2d)), None)
    parameter = next(network.parameters(), None)
    channels = conv.in_channels if conv is not None else 3
    device = parameter.device if parameter is not None else None
    try:
        with evaluation_mode(network):
            network(torch.zeros(2, channels, image_size, image_size, device=device))
        outputs = hooks.pop()
    finally:
        hooks.remove()
    shapes = {}
    for name in hooks.names:
        if name not in outputs:
            raise ValueError(f"The {owner} layer {name!r} of {type(network).__name__} does not run in its forward pass")
        if not torch.is_tensor(outputs[name]):
            raise ValueError(
                f"The {owner} layer {name!r} of {type(network).__name__} outputs a {type(outputs[name]).__name__}, "
                "not a tensor: name a layer that outputs one"
            )
        shapes[name] = tuple(outputs[name].shape[1:])
    return shapes
