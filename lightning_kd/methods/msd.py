"""Luan, Zhao, Yang & Dai, "MSD: Multi-Self-Distillation Learning via Multi-classifiers within Deep Neural
Networks" (arXiv 1911.09418).

No public code exists; this is our reading of the paper:

* Classifiers: as in BYOT, an auxiliary classifier (bottleneck + pooling + fc) after every stage but the
  last, plus the network's own classifier.
* Every classifier learns from every other: classifier i gets (1−α)·CE(q_i, y) plus α·T² times the mean
  over the other classifiers j of KL(q_j ‖ q_i), each q_j a fixed target. Unlike BYOT, the shallow
  classifiers teach each other and the deepest one too. The feature hint from each aligned exit feature
  to the deepest stage's is kept from BYOT.
* Sampling-based branch augmentation: a stage that is a chain of blocks (an ``nn.Sequential`` of modules
  with submodules, like every ResNet stage) offers the output of each of its blocks that has the stage
  output's shape as a branch point. At every training step each head reads one of its stage's branch
  points, drawn uniformly, so one head trains as a family of classifiers of graded depth; this narrows the
  capacity gap between neighbouring classifiers, which the paper names as what makes the mutual
  distillation effective. Validation, test and export read the stage outputs, as BYOT does.
* Defaults are BYOT's: ce_weight 0.7, kd_weight 0.3 (α = 0.3), T = 3, beta 0.03 (λ).
"""
from __future__ import annotations

import torch
from torch import nn

from lightning_kd.core import layer_shapes
from lightning_kd.methods.byot import BYOT, byot_loss
from lightning_kd.methods.kd import kd_loss


def all_teach(exit_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """MSD's distillation term as we read Luan et al. 2019: 1/(C−1)·Σ_i Σ_{j≠i} T²·KL(q_j ‖ q_i), every
    classifier taught by all the others, each q_j a fixed (detached) target."""
    count = exit_logits.shape[0]
    fixed = exit_logits.detach()
    return sum(
        kd_loss(exit_logits[i], fixed[j], temperature) for i in range(count) for j in range(count) if j != i
    ) / (count - 1)


def msd_loss(
    exit_logits: torch.Tensor, exit_features: torch.Tensor, targets: torch.Tensor, **weights: float
) -> dict[str, torch.Tensor]:
    """The MSD objective as we read Luan et al. 2019, summed over the classifiers i = 1…C, C the deepest:

        ce_weight·CE(q_i, y) + kd_weight·T²·1/(C−1)·Σ_{j≠i} KL(q_j ‖ q_i) + β·‖F_i − F_C‖²

    with q = softmax(logits/T) in the KL terms; every target (q_j, F_C) is detached. It is BYOT's objective
    (:func:`~lightning_kd.methods.byot.byot_loss`: same tensors, same keyword-only ``ce_weight``, ``kd_weight``,
    ``temperature`` and ``beta``) with :func:`all_teach` as its distillation term.

    Returns:
        the weighted terms ``ce``, ``kd`` and ``hint``.
    """
    return byot_loss(exit_logits, exit_features, targets, distillation=all_teach, **weights)


class MSD(BYOT):
    """Multi-self-distillation: BYOT's exits, each classifier taught by all the others (:func:`msd_loss`),
    and each head fed from a block of its stage sampled at every training step (see the module docstring).

    Takes BYOT's arguments (``stages``, ``ce_weight``, ``kd_weight``, ``temperature``, ``beta``, ``image_size``);
    logs and exports the same way.
    """

    objective = staticmethod(msd_loss)

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        blocks = {stage: self.chained_blocks(stage) for stage in self.stages[:-1]}
        candidates = [name for names in blocks.values() for name in names]
        shapes = layer_shapes(self.student, [*blocks, *candidates], self.image_size, "student")
        self.branch_points = [
            [name for name in names if shapes.get(name) == shapes[stage]] or [stage] for stage, names in blocks.items()
        ]
        points = [name for names in self.branch_points for name in names]
        self.student_layers = list(dict.fromkeys([*self.stages, *points]))

    def chained_blocks(self, stage: str) -> list[str]:
        """The blocks (children with submodules of their own, not single layers) of a stage that is an
        ``nn.Sequential``; none for any other stage."""
        module = self.student.get_submodule(stage)
        if not isinstance(module, nn.Sequential):
            return []
        return [f"{stage}.{name}" for name, child in module.named_children() if list(child.children())]

    def exit_inputs(self, features: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """In training, each head reads a branch point of its stage drawn at random; else the stage output."""
        if not self.training:
            return super().exit_inputs(features)
        return [features[points[int(torch.randint(len(points), ()))]] for points in self.branch_points]
