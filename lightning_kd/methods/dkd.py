"""Zhao, Cui, Song, Qiu & Liang, "Decoupled Knowledge Distillation" (CVPR 2022, arXiv 2203.08679).

The paper splits Hinton's KL at temperature T into two parts (its Sec. 3.1):

- TCKD, the KL between the binary distributions b = [p_target, 1 − p_target] of teacher and student;
- NCKD, the KL between the distributions p̂ over the non-target classes (softmax of the other logits);

so that KD = TCKD + (1 − p_target^teacher)·NCKD. The weight (1 − p_target) shrinks NCKD exactly where the
teacher is confident; DKD decouples the two: DKD = α·TCKD + β·NCKD (Sec. 3.3 and its Algorithm 1).

Choices (the authors' code, megvii-research/mdistiller ``mdistiller/distillers/DKD.py`` and
``mdistiller/engine/cfg.py``, which produced the reported figures):

- loss = ce_weight·CE + w(epoch)·(α·TCKD + β·NCKD), with CE weight 1, α = 1, β = 8, T = 4 and the T² factor on
  both parts (as in Hinton KD).
- w(epoch) = min(epoch / warmup_epochs, 1) with epochs counted from 1: the DKD term is ramped up linearly, one
  step per epoch, over the first 20 epochs (mdistiller's ``WARMUP``; 1 on ImageNet, i.e. no ramp). The loss as
  the paper's equations write it, without a ramp: ``warmup_epochs: 0``.
- β per CIFAR-100 teacher from mdistiller's configs: resnet56/resnet110 2, wrn_40_2/vgg13 6, resnet32x4 8.
- The non-target distribution is the softmax with the target logit removed (mdistiller subtracts 1000 from
  it; the same to float precision). log(1 − p_target) is computed from the logits (a log-sum-exp over the
  non-target classes) instead of log of a sum of probabilities, so a student that gives the target class a
  probability that rounds to 0 or 1 still has a finite loss and gradient (mdistiller's loss is inf there).
- ``logit_standardization: true`` z-scores both logits first (Sun et al., CVPR 2024, see
  :mod:`lightning_kd.methods.logit_standardization`), their "DKD+Ours": T is then their base temperature
  and α, β are multiplied by their KD weight (9 to 18 by pair in their CIFAR-100 logs, several with β = 2),
  e.g. resnet32x4 → resnet8x4: T = 2, α = 9, β = 72; CE weight and warm-up stay as above.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_kd.core import DistillationModule, Step, check_range, check_weights
from lightning_kd.methods.logit_standardization import standardize


def dkd_terms(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(TCKD, NCKD) of Zhao et al. 2022 at temperature T, each times T², summed over classes and averaged
    over the batch.

    TCKD = KL(b^t ‖ b^s) with b = [p_target, 1 − p_target] of softmax(z / T); NCKD = KL(p̂^t ‖ p̂^s) with
    p̂ = softmax over the non-target classes of z / T. KD = TCKD + (1 − p_target^t)·NCKD, sample by sample.
    """
    batch = student_logits.shape[0]
    target = F.one_hot(targets, student_logits.shape[-1]).bool()

    def log_parts(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log b (B, 2) and log p̂ (B, K; −inf at the target) of logits / T."""
        scaled = logits / temperature
        others = scaled.masked_fill(target, float("-inf"))
        log_all = torch.logsumexp(scaled, dim=-1, keepdim=True)
        log_others = torch.logsumexp(others, dim=-1, keepdim=True)
        log_binary = torch.cat([scaled.gather(1, targets[:, None]) - log_all, log_others - log_all], dim=-1)
        return log_binary, others - log_others

    def kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
        """KL(p ‖ q) summed over the last dimension and averaged over the batch; where p is 0 (log p = −inf: the
        target class of p̂, or a class a masking teacher rules out) the term is 0, not NaN."""
        return torch.where(log_p == float("-inf"), 0.0, log_p.exp() * (log_p - log_q)).sum() / batch

    binary_s, non_target_s = log_parts(student_logits)
    binary_t, non_target_t = log_parts(teacher_logits)
    tckd = kl(binary_t, binary_s)
    nckd = kl(non_target_t, non_target_s)
    return tckd * temperature**2, nckd * temperature**2


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
) -> torch.Tensor:
    """DKD = α·TCKD + β·NCKD (Zhao et al. 2022, Sec. 3.3), both parts from :func:`dkd_terms` (times T²).

    Defaults: mdistiller's CIFAR-100 setting (α = 1, β = 8, T = 4); α = 1, β = 1 − p_target^t per sample
    would give back Hinton's KD.
    """
    tckd, nckd = dkd_terms(student_logits, teacher_logits, targets, temperature)
    return alpha * tckd + beta * nckd


class DKD(DistillationModule):
    """Decoupled KD: loss = ce_weight·CE(s, y) + w·(α·TCKD + β·NCKD), w = min(epoch / warmup_epochs, 1).

    Logged as ``ce``, ``tckd`` (w·α·TCKD) and ``nckd`` (w·β·NCKD). Defaults are mdistiller's CIFAR-100
    setting; the module docstring says where code and paper differ.

    Args:
        alpha: weight α ≥ 0 of TCKD.
        beta: weight β ≥ 0 of NCKD (CIFAR-100: 2 for resnet56/110 teachers, 6 for wrn_40_2/vgg13, 8 for
            resnet32x4; ImageNet: 0.5).
        temperature: T > 0 (CIFAR-100: 4, ImageNet: 1).
        ce_weight: weight of the cross-entropy with the labels (≥ 0).
        warmup_epochs: the DKD term grows linearly over this many epochs, 1/warmup_epochs in the first one
            (mdistiller: 20); 0 or 1: full weight from the start (the paper's loss).
        logit_standardization: z-score student and teacher logits before the DKD term (Sun et al. 2024); the
            cross-entropy keeps the raw logits.
    """

    needs_teacher = True

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
        ce_weight: float = 1.0,
        warmup_epochs: int = 20,
        logit_standardization: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        check_weights(alpha=alpha, beta=beta, ce_weight=ce_weight)
        check_range("temperature", temperature, 0.0, low_open=True)
        check_range("warmup_epochs", warmup_epochs, 0)
        if warmup_epochs != int(warmup_epochs):
            raise ValueError(f"warmup_epochs must be a whole number of epochs, got {warmup_epochs}")
        self.alpha = alpha
        self.beta = beta
        self.temperature = temperature
        self.ce_weight = ce_weight
        self.warmup_epochs = int(warmup_epochs)
        self.logit_standardization = logit_standardization

    def warmup(self) -> float:
        """The DKD term's weight w in the current epoch: min(epoch / warmup_epochs, 1), epochs counted from 1."""
        if self.warmup_epochs <= 1:
            return 1.0
        return min((self.current_epoch + 1) / self.warmup_epochs, 1.0)

    def loss_terms(self, step: Step) -> dict[str, torch.Tensor]:
        student, teacher = step.student_logits, step.teacher_logits
        if self.logit_standardization:
            student, teacher = standardize(student), standardize(teacher)
        tckd, nckd = dkd_terms(student, teacher, step.targets, self.temperature)
        w = self.warmup()
        return {
            "ce": self.ce_weight * F.cross_entropy(step.student_logits, step.targets),
            "tckd": w * self.alpha * tckd,
            "nckd": w * self.beta * nckd,
        }
