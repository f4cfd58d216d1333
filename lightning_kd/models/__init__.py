"""Model zoo: the CIFAR networks of the distillation benchmarks, plus torchvision.

The zoo reimplements the models of HobbitLong/RepDistiller (also used by
megvii-research/mdistiller) with identical parameter names, shapes and forward
semantics, so their published CIFAR-100 teacher checkpoints load with
``load_state_dict(..., strict=True)``. Zoo models return plain logits from
``forward(x)``; intermediate features are taken with forward hooks on the
module paths in ``stage_names`` (stage outputs) and ``preact_names`` (the
stages' pre-activations, for AB and OFD).
"""
from __future__ import annotations

import difflib
from typing import Callable

import torch.nn as nn

from .cifar_resnet import (resnet8, resnet8x4, resnet14, resnet20, resnet32, resnet32x4, resnet44,
                           resnet56, resnet110)
from .cifar_resnet_imagenet_style import ResNet50
from .mobilenetv2 import mobile_half
from .shufflenetv1 import ShuffleV1
from .shufflenetv2 import ShuffleV2
from .vgg import vgg8, vgg11, vgg13, vgg16, vgg19
from .wrn import wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2

__all__ = ["ZOO", "get_model", "list_models", "preact_names", "stage_names"]

#: Zoo name (exact case, as in RepDistiller) -> constructor ``f(num_classes) -> nn.Module``.
ZOO: dict[str, Callable[..., nn.Module]] = {
    "resnet8": resnet8,
    "resnet14": resnet14,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "resnet8x4": resnet8x4,
    "resnet32x4": resnet32x4,
    "ResNet50": ResNet50,
    "wrn_16_1": wrn_16_1,
    "wrn_16_2": wrn_16_2,
    "wrn_40_1": wrn_40_1,
    "wrn_40_2": wrn_40_2,
    "vgg8": vgg8,
    "vgg11": vgg11,
    "vgg13": vgg13,
    "vgg16": vgg16,
    "vgg19": vgg19,
    "MobileNetV2": mobile_half,  # RepDistiller's mobile_half (width 0.5)
    "ShuffleV1": ShuffleV1,
    "ShuffleV2": ShuffleV2,
}


def list_models() -> list[str]:
    """Names of the zoo models (torchvision names are accepted by ``get_model`` too)."""
    return list(ZOO)


def _torchvision_names() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models())


def get_model(name: str, num_classes: int = 100, weights: str | None = None) -> nn.Module:
    """Build a zoo model, or else a torchvision model, by name.

    Zoo names (``list_models()``, exact case) take precedence: e.g. ``vgg16`` is
    the CIFAR VGG-16-BN of the zoo, not torchvision's. Zoo models have no
    weights registry, so ``weights`` must be None (load a checkpoint instead).
    Any other name is a torchvision model: built with ``num_classes`` when
    ``weights`` is None, else with those weights (e.g. ``"IMAGENET1K_V1"``,
    ``"DEFAULT"``) and the weights' own class count (``num_classes`` is ignored).
    """
    if name in ZOO:
        if weights is not None:
            raise ValueError(
                f"Zoo model {name!r} has no pretrained weights registry, got weights={weights!r}; "
                "pass weights=None and load a checkpoint's state_dict instead")
        return ZOO[name](num_classes=num_classes)

    tv_names = _torchvision_names()
    if name in tv_names:
        import torchvision

        if weights is None:
            return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        return torchvision.models.get_model(name, weights=weights)

    candidates = list(ZOO) + [n for n in tv_names if n not in ZOO]
    by_lower = {}
    for n in candidates:
        by_lower.setdefault(n.lower(), n)
    close = [by_lower[m] for m in difflib.get_close_matches(name.lower(), list(by_lower), n=5, cutoff=0.6)]
    hint = f"did you mean {', '.join(repr(c) for c in close)}?" if close else \
        f"zoo models are {', '.join(ZOO)}; other names are looked up in torchvision.models.list_models()"
    raise ValueError(f"Unknown model {name!r}: {hint}")


def _max_conv_stride(module: nn.Module) -> int:
    strides = [m.stride[0] for m in module.modules() if isinstance(m, nn.Conv2d)]
    return max(strides, default=1)


def stage_names(model: nn.Module) -> list[str]:
    """Module paths whose outputs end the model's stages, in depth order.

    The last one is the final feature map before global pooling. Uses the
    model's ``stage_names`` attribute if it has one (all zoo models do); else
    defaults for torchvision ResNets (``layer1``..``layer4``) and MobileNetV2
    (the last ``features`` entry before each stride-2 entry, and ``features.18``).
    """
    names = getattr(model, "stage_names", None)
    if names is not None:
        return list(names)

    import torchvision

    if isinstance(model, torchvision.models.ResNet):
        return ["layer1", "layer2", "layer3", "layer4"]
    if isinstance(model, torchvision.models.MobileNetV2):
        features = model.features
        ends = [f"features.{i}" for i in range(len(features) - 1)
                if i + 1 < len(features) - 1 and _max_conv_stride(features[i + 1]) > 1]
        return ends + [f"features.{len(features) - 1}"]

    children = [n for n, _ in model.named_children()]
    shown = ", ".join(children[:8]) + (", ..." if len(children) > 8 else "")
    raise ValueError(
        f"{type(model).__name__} has no default stages: name its stage module paths (as in "
        f"named_modules()) in the config. Its top-level children are: {shown}")


def preact_names(model: nn.Module) -> list[str]:
    """Module paths whose outputs are the stages' pre-activations (before the ReLU that ends each stage), in
    depth order.

    These are the features RepDistiller returns with ``is_feat=True, preact=True`` (its ``feat[1:-1]``, which AB
    distils) and mdistiller's ``preact_feats[1:]`` (which OFD distils), module by module: the last block's
    residual sum (``preact``) for the CIFAR ResNets, ResNet50 and ShuffleV1; the unshuffled concatenation
    (``preact``) for ShuffleV2; the BN that opens the next stage, or the final BN, for the WRNs; the last BN of
    ``block1``..``block4`` for the VGGs; the outputs of ``blocks.1/2/4/6`` (linear bottlenecks) for MobileNetV2.
    Uses the model's ``preact_names`` attribute (all zoo models have one); other models must name their layers.
    """
    names = getattr(model, "preact_names", None)
    if names is not None:
        return list(names)
    raise ValueError(
        f"{type(model).__name__} has no default pre-activation layers: name the module paths (as in "
        "named_modules()) whose outputs are its stages' pre-activations in the config. A pre-activation that is "
        "not any module's output (e.g. a residual sum followed by an in-place ReLU) needs a module such as "
        "nn.Identity around it"
    )
