"""Yuan et al., "Revisiting Knowledge Distillation via Label Smoothing Regularization" (CVPR 2020, arXiv 1909.11723).

Three ways to train without a stronger teacher:

* :class:`LabelSmoothing` — the LSR baseline the paper compares with (Sec. 3);
* :class:`TfKDSelf` — Tf-KD_self (Sec. 5): KD whose teacher is a trained copy of the student itself;
* :class:`TfKDReg` — Tf-KD_reg (Sec. 5): KD from a hand-designed "virtual teacher", no network.

Reverse KD (a weaker network teaching a stronger one) and defective KD (a poorly trained teacher) from
Sec. 2 are plain :class:`~lightning_kd.methods.KD` runs; see ``configs/cifar100/kd/{reverse,defective}-*.yaml``.

Two conventions of the authors' code (github.com/yuanli2333/Teacher-free-Knowledge-Distillation,
``my_loss_function.py``) differ from the paper's text and are options here:

* ``reduction``: the code's ``nn.KLDivLoss()`` averages the KL over B·K elements (``"mean"``); the paper's
  D_KL sums over classes, averaged over the batch (``"batchmean"``, as everywhere else in this library).
  ``"mean"`` is ``"batchmean"`` divided by K, so the code's ``multiplier`` m (50–100) is m/K with ``"batchmean"``.
* ``soften`` (Tf-KD_reg only): the code divides the virtual teacher's *probabilities* by T before a softmax
  and leaves the student at T=1 without a T² factor (``"probabilities"``), which makes the target nearly
  uniform; the paper's D_KL(p^d_τ ‖ p_τ) reads as KD with temperature on *logits* on both sides
  (``"logits"``: the virtual teacher's logits are log p^d, and T² is applied as in Hinton KD).

Defaults follow the authors' code (``"mean"``, ``"probabilities"``), because every reported figure and every
published per-model setting (α, T, multiplier) was obtained with it; under the other conventions the same
numbers describe a different loss.
"""
from __future__ import annotations

import warnings
from typing import Literal, Optional, get_args

import torch
import torch.nn.functional as F

from lightning_kd.core import DistillationModule, Step, check_choice, check_range, check_weights, renamed_mix

Reduction = Literal["mean", "batchmean"]
Soften = Literal["probabilities", "logits"]


def _kl_divergence(log_p_student: torch.Tensor, p_target: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    """KL(target ‖ student) summed, then divided by B·K (``"mean"``) or by B (``"batchmean"``).

    Written out rather than ``F.kl_div(reduction="mean")``, whose meaning torch announces it will change.
    """
    check_choice("reduction", reduction, get_args(Reduction))
    total = F.kl_div(log_p_student, p_target.to(log_p_student.dtype), reduction="sum")
    return total / (log_p_student.numel() if reduction == "mean" else log_p_student.shape[0])


def label_smoothing_loss(student_logits: torch.Tensor, targets: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Cross-entropy with smoothed labels q' = (1−ε)·q + ε·u, u uniform over the K classes (Sec. 3, LSR).

    This is the paper's formula (torch's ``label_smoothing``). The authors' code puts ε/(K−1) on the wrong
    classes and 1−ε on the true one instead, i.e. this loss with ε·K/(K−1) (0.101 instead of 0.1 for K=100).
    """
    return F.cross_entropy(student_logits, targets, label_smoothing=epsilon)


def tfkd_self_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, reduction: Reduction = "mean"
) -> torch.Tensor:
    """T²·KL(softmax(t/T) ‖ softmax(s/T)): the KD term of Tf-KD_self (Sec. 5), t from the trained student copy.

    ``reduction="mean"`` averages over B·K as the authors' code does, ``"batchmean"`` sums over classes and
    averages over the batch (then this is :func:`~lightning_kd.methods.kd_loss`).
    """
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    p_teacher = F.softmax(teacher_logits / temperature, dim=-1)
    return _kl_divergence(log_p_student, p_teacher, reduction) * temperature**2


def virtual_teacher(
    targets: torch.Tensor, num_classes: int, correct_prob: float, temperature: float, soften: Soften = "probabilities"
) -> torch.Tensor:
    """The softened virtual-teacher distribution p^d_τ of Tf-KD_reg (Sec. 5), shape (B, K).

    p^d puts ``correct_prob`` a on the true class and (1−a)/(K−1) on each other class. Softening with T:

    * ``"probabilities"`` (authors' code): softmax(p^d / T) — nearly uniform for the code's T ≥ 10;
    * ``"logits"`` (KD convention): softmax(log p^d / T), i.e. (p^d)^(1/T) renormalised.
    """
    check_choice("soften", soften, get_args(Soften))
    off_prob = (1.0 - correct_prob) / (num_classes - 1)
    one_hot = F.one_hot(targets, num_classes).float()
    probs = off_prob + (correct_prob - off_prob) * one_hot
    logits = probs if soften == "probabilities" else probs.log()
    return F.softmax(logits / temperature, dim=-1)


def tfkd_reg_loss(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    correct_prob: float,
    temperature: float,
    soften: Soften = "probabilities",
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """KL(p^d_τ ‖ student): the regularisation term of Tf-KD_reg (Sec. 5), before α and the multiplier.

    ``soften="probabilities"`` (authors' code): KL(softmax(p^d/T) ‖ softmax(s)), no T² factor.
    ``soften="logits"`` (paper's D_KL(p^d_τ ‖ p_τ) read as KD): T²·KL(softmax(log p^d/T) ‖ softmax(s/T)).
    ``reduction`` as in :func:`tfkd_self_loss`.
    """
    target = virtual_teacher(targets, student_logits.shape[-1], correct_prob, temperature, soften)
    student_temperature = 1.0 if soften == "probabilities" else temperature
    log_p_student = F.log_softmax(student_logits / student_temperature, dim=-1)
    return _kl_divergence(log_p_student, target, reduction) * student_temperature**2


class LabelSmoothing(DistillationModule):
    """The LSR baseline: cross-entropy with labels smoothed towards the uniform distribution. No teacher.

    Args:
        epsilon: smoothing weight ε ∈ [0, 1] (the paper: 0.1).
    """

    needs_teacher = False

    def __init__(self, epsilon: float = 0.1, **kwargs) -> None:
        super().__init__(**kwargs)
        check_range("epsilon", epsilon, 0.0, 1.0)
        self.epsilon = epsilon

    def loss_terms(self, step: Step) -> dict[str, torch.Tensor]:
        return {"lsr": label_smoothing_loss(step.student_logits, step.targets, self.epsilon)}


class _WeightedTerm(DistillationModule):
    """What Tf-KD_self and Tf-KD_reg share (Yuan et al. 2020, Sec. 5): loss = ce_weight·CE +
    kd_weight·multiplier·(the method's :meth:`teacher_term`), logged as ``ce`` and :attr:`term_name`."""

    term_name = "kd"

    def set_weighting(
        self, temperature: float, ce_weight: float, kd_weight: float, multiplier: float, reduction: Reduction
    ) -> None:
        """Check and keep the arguments both methods take (the weights once the deprecated ``alpha`` is resolved)."""
        check_range("temperature", temperature, 0.0, low_open=True)
        check_weights(ce_weight=ce_weight, kd_weight=kd_weight, multiplier=multiplier)
        check_choice("reduction", reduction, get_args(Reduction))
        self.temperature = temperature
        self.ce_weight, self.kd_weight = ce_weight, kd_weight
        self.multiplier = multiplier
        self.reduction = reduction

    def teacher_term(self, step: Step) -> torch.Tensor:
        """The distillation term before kd_weight and the multiplier."""
        raise NotImplementedError

    def loss_terms(self, step: Step) -> dict[str, torch.Tensor]:
        return {
            "ce": self.ce_weight * F.cross_entropy(step.student_logits, step.targets),
            self.term_name: self.kd_weight * self.multiplier * self.teacher_term(step),
        }


class TfKDSelf(_WeightedTerm):
    """Tf-KD_self: loss = ce_weight·CE + kd_weight·multiplier·T²·KL(softmax(t/T) ‖ softmax(s/T)).

    The paper's (1−α)·CE + α·KD is ``ce_weight = 1 − α``, ``kd_weight = α``.

    The teacher is the student's own architecture, trained normally first (e.g. the Baseline checkpoint of
    that architecture); see ``configs/cifar100/tfkd_self/``. A teacher of another architecture still trains,
    but that is plain KD, and a warning says so.

    Args:
        temperature: T > 0 (authors' ResNet18 setting: 6; MobileNetV2: 20).
        ce_weight: weight ≥ 0 of the cross-entropy with the labels (authors: 1 − α = 0.05).
        kd_weight: weight ≥ 0 of the distillation term (authors: α = 0.95).
        multiplier: extra factor ≥ 0 on the distillation term (authors: 1 in most cases, 50 for ResNet18
            with ``reduction="mean"``).
        reduction: ``"mean"`` over B·K (authors' code, default) or ``"batchmean"`` (paper, Hinton KD).
        alpha: deprecated, ``ce_weight = 1 − alpha, kd_weight = alpha``; removed in the next release.
    """

    needs_teacher = True

    def __init__(
        self,
        temperature: float = 6.0,
        ce_weight: float = 0.05,
        kd_weight: float = 0.95,
        multiplier: float = 50.0,
        reduction: Reduction = "mean",
        alpha: Optional[float] = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        ce_weight, kd_weight = renamed_mix("TfKDSelf", alpha, ce_weight, kd_weight, defaults=(0.05, 0.95))
        self.set_weighting(temperature, ce_weight, kd_weight, multiplier, reduction)
        self._warn_unless_self(kwargs.get("student"), kwargs.get("teacher"))

    def _warn_unless_self(self, student_spec, teacher_spec) -> None:
        """Compare architectures by model name when both are names, else by the built networks' classes."""
        if isinstance(student_spec, str) and isinstance(teacher_spec, str):
            same, student_arch, teacher_arch = student_spec == teacher_spec, student_spec, teacher_spec
        else:
            same = type(self.student) is type(self.teacher)
            student_arch, teacher_arch = type(self.student).__name__, type(self.teacher).__name__
        if not same:
            warnings.warn(
                f"TfKDSelf: the teacher ({teacher_arch}) is not the student's architecture ({student_arch}), "
                "so this is plain KD (lightning_kd.methods.KD), not self-distillation",
                stacklevel=3,
            )

    def teacher_term(self, step: Step) -> torch.Tensor:
        return tfkd_self_loss(step.student_logits, step.teacher_logits, self.temperature, self.reduction)


class TfKDReg(_WeightedTerm):
    """Tf-KD_reg: loss = ce_weight·CE + kd_weight·multiplier·KL(p^d_τ ‖ student), p^d a virtual teacher made from
    the label. The paper's (1−α)·CE + α·reg is ``ce_weight = 1 − α``, ``kd_weight = α``.

    No teacher network is loaded or run. See :func:`tfkd_reg_loss` and :func:`virtual_teacher` for the two
    temperature conventions; the defaults reproduce the authors' ResNet18 setting on CIFAR-100.

    Args:
        correct_prob: a, the virtual teacher's probability on the true class, in (1/K, 1] (authors: 0.99).
        temperature: T > 0 (authors: 20 for ResNet18, 40 for MobileNetV2).
        ce_weight: weight ≥ 0 of the cross-entropy with the labels (authors: 1 − α, 0.9 for ResNet18).
        kd_weight: weight ≥ 0 of the regularisation term (authors: α = 0.1 for ResNet18, 0.95 for MobileNetV2).
        multiplier: extra factor ≥ 0 on that term (authors: 100 for ResNet18, 1 for MobileNetV2).
        soften: ``"probabilities"`` (authors' code, default) or ``"logits"`` (KD convention).
        reduction: ``"mean"`` over B·K (authors' code, default) or ``"batchmean"``.
        alpha: deprecated, ``ce_weight = 1 − alpha, kd_weight = alpha``; removed in the next release.
    """

    needs_teacher = False
    term_name = "reg"

    def __init__(
        self,
        correct_prob: float = 0.99,
        temperature: float = 20.0,
        ce_weight: float = 0.9,
        kd_weight: float = 0.1,
        multiplier: float = 100.0,
        soften: Soften = "probabilities",
        reduction: Reduction = "mean",
        alpha: Optional[float] = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        check_range("correct_prob", correct_prob, 1.0 / self.num_classes, 1.0, low_open=True)
        check_choice("soften", soften, get_args(Soften))
        ce_weight, kd_weight = renamed_mix("TfKDReg", alpha, ce_weight, kd_weight, defaults=(0.9, 0.1))
        self.set_weighting(temperature, ce_weight, kd_weight, multiplier, reduction)
        self.correct_prob = correct_prob
        self.soften = soften

    def teacher_term(self, step: Step) -> torch.Tensor:
        return tfkd_reg_loss(
            step.student_logits, step.targets, self.correct_prob, self.temperature, self.soften, self.reduction
        )
