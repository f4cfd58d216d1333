"""Yim, Joo, Bae & Kim, "A Gift from Knowledge Distillation: Fast Optimization, Network Minimization
and Transfer Learning" (CVPR 2017)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Optional

import torch

from lightning_kd.core import Stage, Step, check_choice, check_range, renamed_argument
from lightning_kd.core.features import pool_to_smallest
from lightning_kd.methods.feature_distillation import FeatureDistillation

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


class FSP(FeatureDistillation):
    """FSP: match the FSP matrices of consecutive layers of student and teacher.

    Schedules: ``two_stage`` (the paper's, as RepDistiller runs it): a stage ``fsp`` of ``stage1_epochs`` epochs
    minimises beta·FSP alone with a fresh optimizer at its constant learning rate (RepDistiller's
    ``init``: 30 epochs, SGD 0.05), then a stage ``task`` minimises the task loss alone (CE, optionally + KD)
    with a fresh optimizer and the full schedule counted from its start, running the teacher only when KD needs
    it. ``joint``: task loss + beta·FSP at every step, one stage.

    Paired layers must have equal channel counts in student and teacher; a mismatch fails at construction.
    Layers default to every stage end; RepDistiller also includes the stem's output (name it first in
    ``student_layers``/``teacher_layers``, e.g. ``relu`` of a CIFAR ResNet).

    Args:
        beta: weight of the FSP term (RepDistiller's stage 1: 1).
        schedule: ``two_stage`` or ``joint``.
        stage1_epochs: epochs of FSP alone in the two-stage schedule.
        **kwargs (Any): layers, ``ce_weight``/``kd_weight``/``temperature`` (:class:`FeatureDistillation`)
            and the base arguments.
        fsp_weight: deprecated name of ``beta``; removed in the next release.
    """

    def __init__(
        self,
        beta: float = 1.0,
        schedule: Literal["two_stage", "joint"] = "two_stage",
        stage1_epochs: int = 30,
        fsp_weight: Optional[float] = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        beta = renamed_argument("FSP", "fsp_weight", fsp_weight, "beta", beta, 1.0)
        check_range("beta", beta, 0.0, low_open=True)
        check_range("stage1_epochs", stage1_epochs, 0)
        check_choice("schedule", schedule, ("two_stage", "joint"))
        if len(self.student_layers) < 2:
            raise ValueError(f"FSP relates consecutive layers, so it needs at least two, got {self.student_layers}")
        if schedule == "two_stage" and self.ce_weight == 0 and self.kd_weight == 0:
            raise ValueError("FSP needs a task loss after its first stage: ce_weight or kd_weight must be > 0")
        self.beta = beta
        self.schedule = schedule
        self.stage1_epochs = stage1_epochs
        self._check_maps()

    def _check_maps(self) -> None:
        """Paired layers must output (C, H, W) maps of equal channel counts."""
        student, teacher = self.feature_shapes()
        for name, shape in [*zip(self.student_layers, student), *zip(self.teacher_layers, teacher)]:
            if len(shape) != 3:
                raise ValueError(f"FSP needs (B, C, H, W) feature maps, but layer {name!r} outputs {shape}")
        mismatches = [
            f"student {s!r} has {s_shape[0]}, teacher {t!r} has {t_shape[0]}"
            for s, t, s_shape, t_shape in zip(self.student_layers, self.teacher_layers, student, teacher)
            if s_shape[0] != t_shape[0]
        ]
        if mismatches:
            raise ValueError(
                "FSP compares matrices of student and teacher, so paired layers need equal channel counts: "
                + "; ".join(mismatches)
                + ". Name layers of matching widths in model.student_layers / model.teacher_layers."
            )

    def training_stages(self) -> list[Stage]:
        if self.schedule == "joint":
            return [Stage("main")]
        return [Stage("fsp", epochs=self.stage1_epochs, constant_lr=True), Stage("task", teacher=self.kd_weight > 0)]

    def loss_terms(self, step: Step) -> dict[str, torch.Tensor]:
        if self.stage.name == "task":
            return self.task_terms(step)
        student, teacher = zip(*self.paired_features(step))
        fsp = self.beta * fsp_loss(student, teacher)
        return {"fsp": fsp} if self.stage.name == "fsp" else {**self.task_terms(step), "fsp": fsp}
