"""Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (arXiv 1503.02531).

Also the base of the feature methods (AT, SP, FSP), whose task loss can mix in this KD term.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lightning_kd.core import DistillationModule, Step, check_range
from lightning_kd.models import stage_names


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T²·KL(softmax(t/T) ‖ softmax(s/T)), summed over classes and averaged over the batch.

    The factor T² keeps the gradient scale independent of T (Hinton et al., section 2). A class the teacher
    rules out (logit −inf: a teacher that masks classes) has probability 0 and adds 0 (0·log 0 = 0), where
    ``F.kl_div`` would give NaN; any other non-finite input still gives NaN.
    """
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    terms = log_p_teacher.exp() * (log_p_teacher - log_p_student)
    kl = torch.where(log_p_teacher == float("-inf"), 0.0, terms).sum() / student_logits.shape[0]
    return kl * temperature**2


class KD(DistillationModule):
    """Hinton KD: loss = (1−α)·CE(s, y) + α·T²·KL(softmax(t/T) ‖ softmax(s/T)).

    Args:
        temperature: softening temperature T > 0 (CIFAR: 4, ImageNet: 1).
        alpha: weight α ∈ [0, 1] of the distillation term (CIFAR: 0.9, ImageNet: 0.5).
    """

    needs_teacher = True

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9, **kwargs) -> None:
        super().__init__(**kwargs)
        check_range("temperature", temperature, 0.0, low_open=True)
        check_range("alpha", alpha, 0.0, 1.0)
        self.temperature = temperature
        self.alpha = alpha

    def loss_terms(self, step: Step) -> dict[str, torch.Tensor]:
        return {
            "ce": (1 - self.alpha) * F.cross_entropy(step.student_logits, step.targets),
            "kd": self.alpha * kd_loss(step.student_logits, step.teacher_logits, self.temperature),
        }


class FeatureDistillation(DistillationModule):
    """Base of the feature methods (AT, SP, FSP): paired student/teacher layers, and a task loss into
    which Hinton's KD term can be mixed from the config alone ("AT+KD" is AT with ``kd_weight: 0.9``).

    Task loss: ce_weight·CE(s, y) + kd_weight·T²·KL(softmax(t/T) ‖ softmax(s/T)); a zero weight leaves
    its term out. Layer i of ``student_layers`` is matched with layer i of ``teacher_layers``.

    Args:
        student_layers: module paths of the student's features; default: the stages the method picks
            (:meth:`default_layers`) among :func:`lightning_kd.models.stage_names`.
        teacher_layers: the same for the teacher.
        ce_weight: weight of the cross-entropy with the labels.
        kd_weight: weight of the KD term (RepDistiller's "+KD": ``ce_weight: 1, kd_weight: 1``).
        temperature: temperature T > 0 of the KD term.
    """

    needs_teacher = True

    def __init__(
        self,
        student_layers: Optional[list[str]] = None,
        teacher_layers: Optional[list[str]] = None,
        ce_weight: float = 1.0,
        kd_weight: float = 0.0,
        temperature: float = 4.0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        check_range("ce_weight", ce_weight, 0.0)
        check_range("kd_weight", kd_weight, 0.0)
        check_range("temperature", temperature, 0.0, low_open=True)
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight
        self.temperature = temperature
        self.student_layers = list(student_layers) if student_layers is not None else self.default_layers(self.student)
        self.teacher_layers = list(teacher_layers) if teacher_layers is not None else self.default_layers(self.teacher)
        if not self.student_layers or len(self.student_layers) != len(self.teacher_layers):
            raise ValueError(
                f"{type(self).__name__} matches student and teacher layers in pairs, but got "
                f"{len(self.student_layers)} student layers {self.student_layers} and {len(self.teacher_layers)} "
                f"teacher layers {self.teacher_layers}: set model.student_layers and model.teacher_layers to "
                "non-empty lists of equal length"
            )

    def default_layers(self, network: nn.Module) -> list[str]:
        """The layers used when the config names none: every stage of ``network``."""
        return stage_names(network)

    def task_terms(self, step: Step) -> dict[str, torch.Tensor]:
        """The weighted cross-entropy and KD terms (those with a non-zero weight)."""
        terms = {}
        if self.ce_weight > 0:
            terms["ce"] = self.ce_weight * F.cross_entropy(step.student_logits, step.targets)
        if self.kd_weight > 0:
            terms["kd"] = self.kd_weight * kd_loss(step.student_logits, step.teacher_logits, self.temperature)
        return terms
