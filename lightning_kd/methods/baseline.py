"""The student alone, trained with cross-entropy on the hard labels — also how teachers are trained."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_kd.core import DistillationModule, Step


class Baseline(DistillationModule):
    """Plain supervised training: loss = CE(student(x), y). No teacher."""

    needs_teacher = False

    def loss_terms(self, step: Step) -> dict[str, torch.Tensor]:
        return {"ce": F.cross_entropy(step.student_logits, step.targets)}
