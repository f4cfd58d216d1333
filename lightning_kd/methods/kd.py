"""Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (arXiv 1503.02531)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from lightning_kd.core import DistillationModule, Step, check_range, renamed_mix


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
    """Hinton KD: loss = ce_weight·CE(s, y) + kd_weight·T²·KL(softmax(t/T) ‖ softmax(s/T)).

    The paper's convex mix (1−α)·CE + α·KD is ``ce_weight = 1 − α``, ``kd_weight = α``.

    Args:
        temperature: softening temperature T > 0 (CIFAR: 4, ImageNet: 1).
        ce_weight: weight ≥ 0 of the cross-entropy with the labels (CIFAR: 0.1, ImageNet: 0.5).
        kd_weight: weight ≥ 0 of the distillation term (CIFAR: 0.9, ImageNet: 0.5).
        alpha: deprecated, ``ce_weight = 1 − alpha, kd_weight = alpha``; removed in the next release.
    """

    needs_teacher = True

    def __init__(self, temperature: float = 4.0, ce_weight: float = 0.1, kd_weight: float = 0.9,
                 alpha: Optional[float] = None, **kwargs) -> None:
        super().__init__(**kwargs)
        check_range("temperature", temperature, 0.0, low_open=True)
        ce_weight, kd_weight = renamed_mix("KD", alpha, ce_weight, kd_weight, defaults=(0.1, 0.9))
        check_range("ce_weight", ce_weight, 0.0)
        check_range("kd_weight", kd_weight, 0.0)
        self.temperature = temperature
        self.ce_weight, self.kd_weight = ce_weight, kd_weight

    def loss_terms(self, step: Step) -> dict[str, torch.Tensor]:
        return {
            "ce": self.ce_weight * F.cross_entropy(step.student_logits, step.targets),
            "kd": self.kd_weight * kd_loss(step.student_logits, step.teacher_logits, self.temperature),
        }
