"""Zhang, Song, Gao, Chen, Bao & Ma, "Be Your Own Teacher: Improve the Performance of Convolutional Neural
Networks via Self Distillation" (BYOT, ICCV 2019, arXiv 1905.08094)."""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.ops import Conv2dNormActivation

from lightning_kd.core import (
    DistillationModule,
    FeatureHooks,
    Step,
    check_range,
    check_weights,
    layer_shapes,
    renamed_argument,
    renamed_mix,
)
from lightning_kd.methods.kd import kd_loss
from lightning_kd.models import stage_names


def feature_hint(features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """‖F_i − F_C‖² averaged over the batch and the feature's D elements (the mean squared error).

    Under this normalisation λ = 0.03 weighs the hint in the same order as the public reproduction's 1e-6
    on raw sums (over a batch of 128 pooled 512-wide features: 1e-6·128·512 ≈ 0.07).
    """
    return F.mse_loss(features, target)


def deepest_teaches(exit_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """BYOT's distillation term: Σ_{i<C} T²·KL(q_C ‖ q_i), the deepest exit's q_C a fixed (detached) target."""
    deepest = exit_logits[-1].detach()
    return sum(kd_loss(logits, deepest, temperature) for logits in exit_logits[:-1])


def byot_loss(
    exit_logits: torch.Tensor,
    exit_features: torch.Tensor,
    targets: torch.Tensor,
    *,
    ce_weight: float,
    kd_weight: float,
    temperature: float,
    beta: float,
    distillation: Callable[[torch.Tensor, float], torch.Tensor] = deepest_teaches,
) -> dict[str, torch.Tensor]:
    """The BYOT objective (Zhang et al. 2019), summed over the exits i = 1…C, C the deepest:

        ce_weight·CE(q_i, y) + kd_weight·T²·KL(q_C ‖ q_i) + β·‖F_i − F_C‖²

    with q = softmax(logits/T) in the KL term; the deepest exit's logits and feature are fixed targets
    (detached), so for i = C only the cross-entropy remains. The weights are keyword-only: two swapped
    weights would give another loss without an error.

    Args:
        exit_logits: (C, B, K) logits of every exit, shallowest first, the deepest last.
        exit_features: (C, B, D) features of every exit, aligned by the bottlenecks to the deepest's width.
        targets: (B,) class labels.
        ce_weight: weight of the cross-entropy terms (the paper's 1 − α).
        kd_weight: weight of the distillation terms (the paper's α).
        temperature: softening temperature T.
        beta: weight of the feature hint (the paper's λ).
        distillation: the distillation term ``distillation(exit_logits, temperature)``; BYOT's
            :func:`deepest_teaches` by default (MSD's :func:`~lightning_kd.methods.msd.all_teach` is the other).

    Returns:
        the weighted terms ``ce``, ``kd`` and ``hint``.
    """
    ce = sum(F.cross_entropy(logits, targets) for logits in exit_logits)
    kd = distillation(exit_logits, temperature)
    deepest_feature = exit_features[-1].detach()
    hint = sum(feature_hint(features, deepest_feature) for features in exit_features[:-1])
    return {"ce": ce_weight * ce, "kd": kd_weight * kd, "hint": beta * hint}


class ExitHead(nn.Module):
    """An auxiliary classifier: a bottleneck to the deepest stage's width and resolution, pooling and a linear layer.

    The bottleneck halves the resolution with one 3×3 stride-2 conv-BN-ReLU per halving between the two
    shapes, the width growing geometrically to the deepest's (a 1×1 conv-BN-ReLU when no halving is needed).

    Args:
        in_shape: (C, H, W) of the stage the head reads.
        out_shape: (C, H, W) of the deepest stage.
        num_classes: number of classes.
    """

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], num_classes: int) -> None:
        super().__init__()
        (in_width, in_height, _), (out_width, out_height, _) = in_shape, out_shape
        halvings = max(0, round(math.log2(in_height / out_height)))
        if halvings == 0:
            layers = [Conv2dNormActivation(in_width, out_width, kernel_size=1)]
        else:
            widths = [round(in_width * (out_width / in_width) ** (k / halvings)) for k in range(halvings + 1)]
            layers = [Conv2dNormActivation(a, b, kernel_size=3, stride=2) for a, b in zip(widths, widths[1:])]
        self.bottleneck = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(out_width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The (B, D) feature aligned with the deepest stage's pooled feature."""
        return self.pool(self.bottleneck(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class HookedTrunk(nn.Module):
    """A whole network run for the output of one of its modules, taken by a hook: ``{stage: output}``."""

    def __init__(self, network: nn.Module, stage: str) -> None:
        super().__init__()
        self.network = network
        self.stage = stage

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        hooks = FeatureHooks(self.network, [self.stage])
        try:
            self.network(x)
        finally:
            hooks.remove()
        return hooks.pop()


class EarlyExit(nn.Module):
    """A network up to one stage, then that stage's head: what deploying a shallow exit needs.

    The trunk is the network cut after the stage by ``torch.fx`` (what follows is left out). A network fx
    cannot trace (data-dependent control flow, like the zoo's VGG) runs whole instead, with a warning.
    """

    def __init__(self, network: nn.Module, stage: str, head: ExitHead) -> None:
        super().__init__()
        try:
            self.trunk = create_feature_extractor(network, return_nodes=[stage])
        except Exception as error:  # fx tracing fails with many exception types
            warnings.warn(
                f"torch.fx cannot cut {type(network).__name__} after {stage!r} ({type(error).__name__}: {error}); "
                "the exit runs the whole network",
                stacklevel=2,
            )
            self.trunk = HookedTrunk(network, stage)
        self.stage = stage
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x)[self.stage])


class BYOT(DistillationModule):
    """Be Your Own Teacher: classifiers after the stages of one network, the deepest teaching the others.

    An :class:`ExitHead` (bottleneck + pooling + fc) is attached after every stage but the last, whose
    classifier is the network's own; the heads are sized by probing the stages' shapes with a dummy
    forward, so any backbone works whose stages output (B, C, H, W) maps. Loss: :func:`byot_loss`.
    Validation logs every exit (``val/acc1/exit_1`` … ``exit_C``) and the ensemble of all of them (mean of
    their softmax, ``val/acc1/ensemble``); ``val/acc1`` is the deepest exit. Export picks an exit by name
    (``--network exit_2``); the default, the deepest, is the plain network without any head.

    As in :func:`byot_loss` and the public reproduction, every exit's cross-entropy, the deepest's included,
    is weighted ce_weight (the paper's 1 − α); the hint compares the pooled features (:func:`feature_hint`).

    Args:
        stages: module paths after which the exits read, in depth order; the last is the final feature map
            (its exit is the network's own classifier). Default: :func:`lightning_kd.models.stage_names`.
        ce_weight: weight ≥ 0 of the exits' cross-entropy, the paper's 1 − α (usual: 0.7 or 0.9).
        kd_weight: weight ≥ 0 of the distillation from the deepest exit, the paper's α (usual: 0.3 or 0.1).
        temperature: softening temperature T > 0 (paper: 3).
        beta: weight ≥ 0 of the feature hint, the paper's λ (paper: 0.03).
        image_size: side of the square RGB input used to probe the stages' shapes (the training size).
        alpha: deprecated, ``ce_weight = 1 − alpha, kd_weight = alpha``; removed in the next release.
        feature_weight: deprecated name of ``beta``; removed in the next release.
    """

    needs_teacher = False
    #: The loss of the exits' logits and features (a subclass may swap it for another taking the same keywords).
    objective = staticmethod(byot_loss)

    def __init__(
        self,
        stages: Optional[list[str]] = None,
        ce_weight: float = 0.7,
        kd_weight: float = 0.3,
        temperature: float = 3.0,
        beta: float = 0.03,
        image_size: int = 32,
        alpha: Optional[float] = None,
        feature_weight: Optional[float] = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        name = type(self).__name__
        ce_weight, kd_weight = renamed_mix(name, alpha, ce_weight, kd_weight, defaults=(0.7, 0.3))
        beta = renamed_argument(name, "feature_weight", feature_weight, "beta", beta, 0.03)
        check_weights(ce_weight=ce_weight, kd_weight=kd_weight, beta=beta)
        check_range("temperature", temperature, 0.0, low_open=True)
        check_range("image_size", image_size, 1)
        self.ce_weight, self.kd_weight = ce_weight, kd_weight
        self.temperature = temperature
        self.beta = beta
        self.image_size = image_size
        self.stages = list(stages) if stages is not None else stage_names(self.student)
        if len(self.stages) < 2:
            name = type(self).__name__
            raise ValueError(f"{name} needs at least 2 stages (an exit besides the last), got {self.stages}")
        shapes = layer_shapes(self.student, self.stages, image_size, "student")
        for stage in self.stages:
            if len(shapes[stage]) != 3:
                raise ValueError(
                    f"Stage {stage!r} outputs shape {shapes[stage]}: every stage must output a (B, C, H, W) feature map"
                )
        deepest = shapes[self.stages[-1]]
        self.heads = nn.ModuleList(ExitHead(shapes[stage], deepest, self.num_classes) for stage in self.stages[:-1])
        self.student_layers = list(self.stages)
        self.exit_names = [f"exit_{k}" for k in range(1, len(self.stages) + 1)]
        self.score_outputs([*self.exit_names, "ensemble"])

    def exit_inputs(self, features: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The feature map each head reads: the output of its stage."""
        return [features[stage] for stage in self.stages[:-1]]

    def exits(self, logits: torch.Tensor, features: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (C, B, K) and aligned features (C, B, D) of every exit, the network's own last."""
        aligned = [head.features(x) for head, x in zip(self.heads, self.exit_inputs(features))]
        exit_logits = [head.fc(feature) for head, feature in zip(self.heads, aligned)] + [logits]
        aligned.append(F.adaptive_avg_pool2d(features[self.stages[-1]], 1).flatten(1))
        return torch.stack(exit_logits), torch.stack(aligned)

    def forward_step(self, x: torch.Tensor, y: torch.Tensor, fields: Optional[dict] = None) -> Step:
        """The base step, plus ``outputs["exit_logits"]`` (C, B, K) and ``outputs["exit_features"]`` (C, B, D)."""
        step = super().forward_step(x, y, fields)
        step.outputs["exit_logits"], step.outputs["exit_features"] = self.exits(
            step.student_logits, step.student_features
        )
        return step

    def loss_terms(self, step: Step) -> dict[str, torch.Tensor]:
        return self.objective(
            step.outputs["exit_logits"], step.outputs["exit_features"], step.targets, ce_weight=self.ce_weight,
            kd_weight=self.kd_weight, temperature=self.temperature, beta=self.beta,
        )

    def evaluation_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.student(x)
        exit_logits, _ = self.exits(logits, self._student_hooks.pop())
        named = dict(zip(self.exit_names, exit_logits))
        named["ensemble"] = exit_logits.float().softmax(dim=-1).mean(dim=0)
        return logits, named

    def deployable(self, name: Optional[str] = None) -> nn.Module:
        """The network up to exit ``name`` (``exit_1`` … ``exit_C``) with its head; default: the deepest, the
        network alone."""
        if name is None or name == self.exit_names[-1]:
            return self.student
        if name not in self.exit_names:
            raise ValueError(f"{type(self).__name__} deploys one of the exits {self.exit_names}, got {name!r}")
        k = self.exit_names.index(name)
        return EarlyExit(self.student, self.stages[k], self.heads[k])
