"""Sun, Ren, Li, Wang & Cao, "Logit Standardization in Knowledge Distillation" (CVPR 2024, arXiv 2403.01427).

The paper replaces the shared temperature of KD by a per-sample one, the standard deviation of each logit
vector: student and teacher logits are z-scored (Z(l) = (l − mean(l)) / std(l), its Algorithm 1) before the
usual temperature-τ softmax and KL. The student then has to match the teacher's logit *relations*, not their
range and variance. It is a pre-process, usable with any logit loss:

- :func:`standardize` is the pre-process itself (a pure function);
- :class:`LogitStandardization` is Hinton KD with it ("KD+Ours" of the paper);
- :class:`~lightning_kd.methods.DKD` takes ``logit_standardization: true`` ("DKD+Ours").

Choices (the authors' code, sunshangquan/logit-standardization-KD, ``mdistiller/distillers/KD.py``, and
``tools/train.py``, which produced the reported figures):

- The z-score divides by ``std + 1e-7`` with the unbiased (K − 1) standard deviation, as ``torch.std``
  does. A 1/K standard deviation gives the same z-scores times sqrt(K/(K−1)) (1.005 for 100 classes), i.e.
  a base temperature smaller by that factor, so no option for it.
- Base temperature τ = 2 and loss = 0.1·CE + 9·τ²·KL (their ``--base-temp 2 --kd-weight 9``, CE weight left at
  mdistiller's 0.1). The τ² factor is kept, as in their KD. The CIFAR-100 logs use τ = 3 for vgg13 → vgg8.
- With DKD their code z-scores both logits, sets T = τ and multiplies both α and β by the KD weight
  (e.g. resnet32x4 → resnet8x4: T = 2, α = 9, β = 72); CE weight and warm-up stay DKD's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_kd.core import DistillationModule, Step, check_range
from lightning_kd.methods.kd import kd_loss


def standardize(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Z-score of each logit vector over the classes (last dimension): (l − mean(l)) / (std(l) + eps).

    Sun et al. 2024, Algorithm 1; ``std`` is the unbiased (K − 1) one and ``eps`` guards a constant
    vector (which maps to zeros, a uniform softmax), both as in the authors' code. The result does not change
    when ``logits`` are shifted or scaled by a positive factor per sample. Logits must be finite: a −inf
    (masked) class makes the whole row NaN.
    """
    mean = logits.mean(dim=-1, keepdim=True)
    std = logits.std(dim=-1, keepdim=True)
    return (logits - mean) / (std + eps)


def logit_standardized_kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0
) -> torch.Tensor:
    """τ²·KL(softmax(Z(t)/τ) ‖ softmax(Z(s)/τ)), summed over classes and averaged over the batch.

    Z is :func:`standardize`, τ the base temperature (Sun et al. 2024, Algorithm 1): Hinton's
    :func:`~lightning_kd.methods.kd_loss` on z-scored logits.
    """
    return kd_loss(standardize(student_logits), standardize(teacher_logits), temperature)


class LogitStandardization(DistillationModule):
    """KD with logit standardization (Sun et al., CVPR 2024):
    loss = ce_weight·CE(s, y) + kd_weight·τ²·KL(softmax(Z(t)/τ) ‖ softmax(Z(s)/τ)).

    Defaults are the authors' CIFAR-100 setting (CE 0.1, KD 9, τ = 2; the module docstring says where it
    comes from). For DKD with logit standardization use ``DKD(logit_standardization=True, ...)``.

    Args:
        temperature: base temperature τ > 0 applied to the z-scored logits (CIFAR-100: 2; 3 for vgg13 → vgg8).
        ce_weight: weight of the cross-entropy with the labels (≥ 0).
        kd_weight: weight of the standardized KD term (≥ 0).
    """

    needs_teacher = True

    def __init__(self, temperature: float = 2.0, ce_weight: float = 0.1, kd_weight: float = 9.0, **kwargs) -> None:
        super().__init__(**kwargs)
        check_range("temperature", temperature, 0.0, low_open=True)
        check_range("ce_weight", ce_weight, 0.0)
        check_range("kd_weight", kd_weight, 0.0)
        self.temperature = temperature
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight

    def loss_terms(self, step: Step) -> dict[str, torch.Tensor]:
        return {
            "ce": self.ce_weight * F.cross_entropy(step.student_logits, step.targets),
            "kd": self.kd_weight
            * logit_standardized_kd_loss(step.student_logits, step.teacher_logits, self.temperature),
        }
