"""Huang, You, Wang, Qian & Xu, "Knowledge Distillation from A Stronger Teacher" (DIST, NeurIPS 2022,
arXiv 2205.10536).

A stronger teacher's predictions are too far from what a small student can reach for an exact KL match to
help. DIST asks only that the *relations* between predictions match, measured by the Pearson correlation ρ of
the softmax outputs Y = softmax(z / τ) of shape (B, K):

- inter-class relation: for each sample, 1 − ρ(Y_s[i, :], Y_t[i, :]), averaged over the B samples;
- intra-class relation: for each class, 1 − ρ(Y_s[:, j], Y_t[:, j]) across the batch, averaged over the K classes;

loss = CE + β·τ²·inter + γ·τ²·intra.

Choices (the authors' code, hunto/image_classification_sota ``lib/models/losses/dist_kd.py``, ``kd_loss.py``
and ``configs/strategies/distill/dist_cifar.yaml``, the submodule of hunto/DIST_KD that produced the reported
figures):

- ρ(u, v) = ⟨u − ū, v − v̄⟩ / (‖u − ū‖·‖v − v̄‖ + 1e-8): the 1e-8 keeps a constant vector finite (ρ = 0 there).
- Both relations carry the τ² factor.
- CIFAR-100: τ = 4 (their ``dist_t4``), CE weight 1 and KD weight 2 around β = γ = 1, i.e. β = γ = 2 here; the
  same weights on ImageNet with τ = 1 (``resnet_dist.yaml``). These are the defaults of :class:`DIST`.
- The intra-class relation correlates the samples of the batch a device sees: under DDP it is computed per
  device (as in their code), so it depends on the per-device batch size; a batch of one sample gives ρ = 0 for
  every class (intra = 1, no gradient).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_kd.core import DistillationModule, Step, check_range, check_weights


def pearson_correlation(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b`` (both (N, D)): the cosine similarity
    of the mean-centred rows, with ``eps`` added to the product of the norms (Huang et al. 2022, as in their
    code)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_terms(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inter, intra): DIST's inter-class and intra-class relation losses at temperature τ, each times τ².

    With Y = softmax(z / τ) (B, K): inter = mean over samples i of 1 − ρ(Y_s[i, :], Y_t[i, :]);
    intra = mean over classes j of 1 − ρ(Y_s[:, j], Y_t[:, j]), ρ being :func:`pearson_correlation`.
    """
    y_s = F.softmax(student_logits / temperature, dim=1)
    y_t = F.softmax(teacher_logits / temperature, dim=1)
    inter = 1 - pearson_correlation(y_s, y_t).mean()
    intra = 1 - pearson_correlation(y_s.t(), y_t.t()).mean()
    return inter * temperature**2, intra * temperature**2


def dist_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
) -> torch.Tensor:
    """β·τ²·inter + γ·τ²·intra (Huang et al. 2022), both from :func:`dist_terms`; the defaults are those of the
    authors' ``DIST`` loss class (their training recipes then weight it by 2)."""
    inter, intra = dist_terms(student_logits, teacher_logits, temperature)
    return beta * inter + gamma * intra


class DIST(DistillationModule):
    """DIST: loss = ce_weight·CE(s, y) + β·τ²·inter + γ·τ²·intra, logged as ``ce``, ``inter`` and ``intra``.

    Defaults are the authors' CIFAR-100 recipe (CE 1, β = γ = 2, τ = 4); on ImageNet they use τ = 1.

    Args:
        beta: weight β ≥ 0 of the inter-class relation.
        gamma: weight γ ≥ 0 of the intra-class relation.
        temperature: τ > 0 of the softmax (CIFAR-100: 4, ImageNet: 1).
        ce_weight: weight of the cross-entropy with the labels (≥ 0).
    """

    needs_teacher = True

    def __init__(
        self, beta: float = 2.0, gamma: float = 2.0, temperature: float = 4.0, ce_weight: float = 1.0, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        check_weights(beta=beta, gamma=gamma, ce_weight=ce_weight)
        check_range("temperature", temperature, 0.0, low_open=True)
        self.beta = beta
        self.gamma = gamma
        self.temperature = temperature
        self.ce_weight = ce_weight

    def loss_terms(self, step: Step) -> dict[str, torch.Tensor]:
        inter, intra = dist_terms(step.student_logits, step.teacher_logits, self.temperature)
        return {
            "ce": self.ce_weight * F.cross_entropy(step.student_logits, step.targets),
            "inter": self.beta * inter,
            "intra": self.gamma * intra,
        }
