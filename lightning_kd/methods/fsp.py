"""Yim, Joo, Bae & Kim, "A Gift from Knowledge Distillation: Fast Optimization, Network Minimization
and Transfer Learning" (CVPR 2017)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from lightning_kd.core import Step, check_range
from lightning_kd.core.features import FeatureHooks, pool_to_smallest
from lightning_kd.methods.kd import FeatureDistillation

#: Side of the dummy input that reads the layers' channel counts at set-up. Channel counts of conv nets do
#: not depend on the input size, and 32 px passes through every CIFAR zoo and torchvision model.
PROBE_SIZE = 32


def fsp_matrix(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The flow of solution procedure between two (B, C1, H, W) and (B, C2, H', W') maps, (B, C1, C2).

    G[i, j] = Σ_hw F1[i, h, w]·F2[j, h, w] / (H·W) (eq. 1); the larger map is first
    adaptive-average-pooled to the smaller one's size, as in RepDistiller.
    """
    first, second = (f.flatten(2) for f in pool_to_smallest(first, second))
    return first @ second.transpose(1, 2) / first.shape[-1]


def fsp_loss(student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ over consecutive layer pairs (k, k+1) of mean((G_s − G_t)²), G the FSP matrices.

    Eq. (2) with equal pair weights λ and, as in RepDistiller, the mean over batch and matrix entries.
    """
    return sum(
        (fsp_matrix(*student_features[k : k + 2]) - fsp_matrix(*teacher_features[k : k + 2])).pow(2).mean()
        for k in range(len(student_features) - 1)
    )


@torch.no_grad()
def _output_shapes(network: nn.Module, hooks: FeatureHooks) -> dict[str, torch.Size]:
    """Shapes of the hooked layers' outputs on a dummy input, run in eval mode (BatchNorm statistics stay)."""
    conv = next((m for m in network.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise ValueError(f"FSP needs convolutional feature maps, but {type(network).__name__} has no Conv2d")
    was_training = network.training
    network.eval()
    try:
        network(torch.zeros(2, conv.in_channels, PROBE_SIZE, PROBE_SIZE, device=conv.weight.device))
    finally:
        network.train(was_training)
    outputs = hooks.pop()
    for name in hooks.names:
        if name not in outputs:
            raise ValueError(f"FSP layer {name!r} of {type(network).__name__} does not run in its forward pass")
        if outputs[name].dim() != 4:
            shape = tuple(outputs[name].shape)
            raise ValueError(f"FSP needs (B, C, H, W) feature maps, but layer {name!r} outputs {shape}")
    return {name: output.shape for name, output in outputs.items()}


class FSP(FeatureDistillation):
    """FSP: match the FSP matrices of consecutive layers of student and teacher.

    Schedules: ``two_stage`` (the paper's): the first ``stage1_epochs`` epochs minimise fsp_weight·FSP
    alone (RepDistiller: 30, its lr schedule then restarts, so shift the milestones by as many
    epochs), afterwards the task loss alone (CE, optionally + KD), with no teacher forward unless KD
    needs it. ``joint``: task loss + fsp_weight·FSP at every step.

    Paired layers must have equal channel counts in student and teacher; a mismatch fails at set-up.
    Layers default to every stage end; RepDistiller also includes the stem's output (name it first in
    ``student_layers``/``teacher_layers``, e.g. ``relu`` of a CIFAR ResNet).

    Args:
        fsp_weight: weight of the FSP term (RepDistiller's stage 1: 1).
        schedule: ``two_stage`` or ``joint``.
        stage1_epochs: epochs of FSP alone in the two-stage schedule.
        **kwargs: layers, ``ce_weight``/``kd_weight``/``temperature`` (:class:`FeatureDistillation`)
            and the base arguments.
    """

    def __init__(
        self,
        fsp_weight: float = 1.0,
        schedule: Literal["two_stage", "joint"] = "two_stage",
        stage1_epochs: int = 30,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        check_range("fsp_weight", fsp_weight, 0.0, low_open=True)
        check_range("stage1_epochs", stage1_epochs, 0)
        if schedule not in ("two_stage", "joint"):
            raise ValueError(f"schedule must be 'two_stage' or 'joint', got {schedule!r}")
        if len(self.student_layers) < 2:
            raise ValueError(f"FSP relates consecutive layers, so it needs at least two, got {self.student_layers}")
        if schedule == "two_stage" and self.ce_weight == 0 and self.kd_weight == 0:
            raise ValueError("FSP needs a task loss after its first stage: ce_weight or kd_weight must be > 0")
        self.fsp_weight = fsp_weight
        self.schedule = schedule
        self.stage1_epochs = stage1_epochs

    def setup(self, stage: str) -> None:
        """Register the hooks, then check the paired layers' channel counts on a dummy input."""
        super().setup(stage)
        student = _output_shapes(self.student, self._student_hooks)
        teacher = _output_shapes(self.teacher, self._teacher_hooks)
        mismatches = [
            f"student {s!r} has {student[s][1]}, teacher {t!r} has {teacher[t][1]}"
            for s, t in zip(self.student_layers, self.teacher_layers)
            if student[s][1] != teacher[t][1]
        ]
        if mismatches:
            raise ValueError(
                "FSP compares matrices of student and teacher, so paired layers need equal channel counts: "
                + "; ".join(mismatches)
                + ". Name layers of matching widths in model.student_layers / model.teacher_layers."
            )

    @property
    def in_first_stage(self) -> bool:
        """Whether training is in the FSP-only first stage of the two-stage schedule."""
        return self.schedule == "two_stage" and self.current_epoch < self.stage1_epochs

    def needs_teacher_forward(self) -> bool:
        return self.schedule == "joint" or self.in_first_stage or self.kd_weight > 0

    def loss_terms(self, step: Step) -> dict[str, torch.Tensor]:
        if self.schedule == "two_stage" and not self.in_first_stage:
            return self.task_terms(step)
        fsp = self.fsp_weight * fsp_loss(
            [step.student_features[name] for name in self.student_layers],
            [step.teacher_features[name] for name in self.teacher_layers],
        )
        return {"fsp": fsp} if self.in_first_stage else {**self.task_terms(step), "fsp": fsp}
