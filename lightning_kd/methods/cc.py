"""Peng, Jin, Liu, Zhou, Wu, Liu, Li & Zhang, "Correlation Congruence for Knowledge Distillation" (ICCV 2019,
arXiv 1904.01802).

Besides instance-level KD, the student matches the teacher's correlations between the instances of a batch:
L_CC = 1/n²·‖ψ(F_t) − ψ(F_s)‖²₂, ψ(F) = [k(f_i, f_j)] the n×n correlation matrix of the batch's embeddings,
with a Gaussian RBF kernel approximated by its P-order Taylor series,
k(x, y) ≈ Σ_{p=0}^{P} e^{−2γ}·(2γ)^p/p!·(xᵀy)^p for L2-normalised x, y.

Two losses here:

- :func:`cc_loss` is what RepDistiller (HobbitLong/RepDistiller ``distiller_zoo/CC.py``, written from code
  the CC authors sent, per its README) computed for the CIFAR-100 "CC" row of its table, and is *not* the
  paper's formula: with δ = |e_s − e_t| the absolute student-teacher difference of the embeddings, it is
  the mean over the B − 1 pairs of consecutive samples (i, i + 1) of Σ_d δ_{i,d}·δ_{i+1,d}. It depends on
  the order of the samples in the batch (with shuffled batches: random pairs), has no kernel and no γ or P.
- :func:`cc_kernel_loss` is the paper's L_CC with the Taylor-expanded Gaussian kernel (γ = 0.4, P = 2 by
  default, as in the implementations of the paper's formula that are public, e.g. AberHu's
  Knowledge-Distillation-Zoo): both embeddings L2-normalised, the squared difference of the correlation
  matrices averaged over the n² entries. No RepDistiller figure comes from it.

RepDistiller's setting (``train_student.py``, ``helper/loops.py``, ``models/util.py`` ``LinearEmbed``):

- Layer: the pooled penultimate feature, the classifier's input (entry −1 of the ``is_feat`` list), of both
  networks, each mapped by its own :class:`LinearEmbed` (one ``nn.Linear`` to ``--feat_dim 128``, no
  normalisation: not ``Embed``, which L2-normalises and is CRD's). Both embeddings, the teacher's included,
  are trained with the student (same SGD, lr and weight decay).
- loss = CE + β·cc_loss(embed_s(f_s), embed_t(f_t)), β = 0.02, no KD (``-a 0``), CE weight 1.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lightning_kd.core import Step, check_choice, check_range, classifier
from lightning_kd.methods.feature_distillation import FeatureDistillation


def cc_loss(embed_s: torch.Tensor, embed_t: torch.Tensor) -> torch.Tensor:
    """RepDistiller's correlation loss: mean over i < B of Σ_d |e_s − e_t|_{i,d}·|e_s − e_t|_{i+1,d}.

    embed_s, embed_t: (B, ...) student and teacher embeddings of one shape, B ≥ 2, flattened to (B, D).
    """
    if embed_s.shape != embed_t.shape or embed_s.dim() < 2 or embed_s.shape[0] < 2:
        raise ValueError(
            "cc_loss compares student and teacher embeddings entry by entry across consecutive samples, so it "
            f"needs two (B, D) tensors of one shape with B ≥ 2, got {tuple(embed_s.shape)} and {tuple(embed_t.shape)}"
        )
    delta = (embed_s - embed_t).abs().flatten(1)
    return (delta[:-1] * delta[1:]).sum(dim=1).mean()


def correlation_matrix(embeddings: torch.Tensor, gamma: float = 0.4, order: int = 2) -> torch.Tensor:
    """ψ(F): (B, B) Taylor-approximated Gaussian-RBF correlations Σ_{p=0}^{P} e^{−2γ}(2γ)^p/p!·(f_iᵀf_j)^p of the
    L2-normalised flattened embeddings."""
    check_range("gamma", gamma, 0.0)
    check_range("order", order, 0)
    if int(order) != order:
        raise ValueError(f"order must be a whole number of Taylor terms, got {order}")
    flat = F.normalize(embeddings.flatten(1), dim=1)
    similarity = flat @ flat.T
    return sum(
        math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * similarity.pow(p) for p in range(int(order) + 1)
    )


def cc_kernel_loss(embed_s: torch.Tensor, embed_t: torch.Tensor, gamma: float = 0.4, order: int = 2) -> torch.Tensor:
    """The paper's L_CC = ‖ψ(F_t) − ψ(F_s)‖²₂ / n² with ψ from :func:`correlation_matrix` (Gaussian RBF, P-order
    Taylor series). Student and teacher widths may differ (ψ is n×n)."""
    if embed_s.dim() < 2 or embed_t.dim() < 2 or embed_s.shape[0] != embed_t.shape[0]:
        raise ValueError(
            "cc_kernel_loss needs (B, ...) student and teacher embeddings of one batch, got shapes "
            f"{tuple(embed_s.shape)} and {tuple(embed_t.shape)}"
        )
    return F.mse_loss(correlation_matrix(embed_s, gamma, order), correlation_matrix(embed_t, gamma, order))


class LinearEmbed(nn.Module):
    """Flatten, then one linear map to ``out_features`` (RepDistiller's ``LinearEmbed``: ``--feat_dim 128``, no
    normalisation). The parameter names (``linear``) are RepDistiller's, so its state dicts load.

    Args:
        in_features: width of the pooled feature it embeds (the network's classifier input).
        out_features: embedding width (RepDistiller: 128).
    """

    def __init__(self, in_features: int, out_features: int = 128) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value}")
        self.linear = nn.Linear(int(in_features), int(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


class CC(FeatureDistillation):
    """Correlation congruence: loss = CE (+ KD) + β·cc_loss(embed_s(student feature), embed_t(teacher feature)).

    Two owned heads (trained, checkpointed, left out of export), each a :class:`LinearEmbed` to ``embed_dim``
    sized in ``__init__`` from its layer's shape: ``embed_s`` on the student's feature and ``embed_t`` on the
    teacher's. As in RepDistiller, the teacher-side embedding is trained with the student (same optimizer,
    learning rate and weight decay) while the teacher network stays frozen: its name does not start with
    ``teacher.``, so :meth:`~lightning_kd.core.DistillationModule.trainable_parameters` keeps it. The teacher's
    feature carries no gradient; ``embed_t`` learns from the CC term alone.

    ``variant`` picks the correlation term:

    - ``repdistiller`` (default): :func:`cc_loss`, RepDistiller's ``Correlation`` loss, which produced the "CC"
      row of its CIFAR-100 table (``-a 0 -b 0.02``): the mean over consecutive samples (i, i + 1) of
      Σ_d |e_s − e_t|_{i,d}·|e_s − e_t|_{i+1,d}; not the paper's formula (see the module docstring).
    - ``paper``: :func:`cc_kernel_loss`, the paper's L_CC = ‖ψ(F_t) − ψ(F_s)‖²₂ / n² (Peng et al., ICCV
      2019, arXiv 1904.01802) with the P-order Taylor expansion of the Gaussian RBF kernel (``gamma``, ``order``),
      applied to the same two embeddings. No RepDistiller figure comes from it and β = 0.02 is not tuned for it.

    Layers: one each, default the pooled penultimate feature of each network, the classifier's input
    (``"<classifier>:input"``), RepDistiller's ``feat[-1]``. The paper's instance-level KD term is
    ``kd_weight`` (RepDistiller: 0). The batch must hold at least two samples.

    Args:
        beta: weight β of the correlation term (RepDistiller: 0.02).
        embed_dim: width of both embeddings (RepDistiller's ``--feat_dim``: 128).
        variant: ``repdistiller`` or ``paper`` (above).
        gamma: γ of the Gaussian kernel, ``paper`` variant only (default 0.4).
        order: P, the Taylor expansion's order, ``paper`` variant only (default 2).
        **kwargs (Any): layers, ``ce_weight``/``kd_weight``/``temperature``, ``image_size``
            (:class:`~lightning_kd.methods.feature_distillation.FeatureDistillation`) and the base arguments.
    """

    def __init__(
        self,
        beta: float = 0.02,
        embed_dim: int = 128,
        variant: Literal["repdistiller", "paper"] = "repdistiller",
        gamma: float = 0.4,
        order: int = 2,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        check_range("beta", beta, 0.0)
        check_range("embed_dim", embed_dim, 1)
        check_choice("variant", variant, ("repdistiller", "paper"))
        check_range("gamma", gamma, 0.0)
        check_range("order", order, 0)
        for name, value in (("embed_dim", embed_dim), ("order", order)):
            if int(value) != value:
                raise ValueError(f"{name} must be a whole number, got {value}")
        if len(self.student_layers) != 1:
            raise ValueError(
                f"CC embeds one student feature and one teacher feature, got {self.student_layers} and "
                f"{self.teacher_layers}"
            )
        self.beta = beta
        self.embed_dim = int(embed_dim)
        self.variant = variant
        self.gamma = gamma
        self.order = int(order)
        (student_shape,), (teacher_shape,) = self.feature_shapes()
        self.embed_s = LinearEmbed(math.prod(student_shape), self.embed_dim)
        self.embed_t = LinearEmbed(math.prod(teacher_shape), self.embed_dim)  # not "teacher.": trained

    def default_layers(self, network: nn.Module) -> list[str]:
        return [f"{classifier(network)[0]}:input"]

    def loss_terms(self, step: Step) -> dict[str, torch.Tensor]:
        ((student, teacher),) = self.paired_features(step)
        embed_s, embed_t = self.embed_s(student), self.embed_t(teacher)
        if self.variant == "paper":
            correlation = cc_kernel_loss(embed_s, embed_t, self.gamma, self.order)
        else:
            correlation = cc_loss(embed_s, embed_t)
        return {**self.task_terms(step), "cc": self.beta * correlation}
