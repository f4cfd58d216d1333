"""Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer" (ECCV 2018,
arXiv 1803.10837).

The student matches the teacher's distribution of pairwise similarities within the batch: with the cosine
kernel K(a, b) = ½(aᵀb / (‖a‖₂‖b‖₂) + 1) ∈ [0, 1], the conditional probabilities
p_{j|i} = K(x_i, x_j) / Σ_k K(x_i, x_k) of teacher (p) and student (q) features are compared by the
divergence Σ_i Σ_j p_{j|i} log(p_{j|i} / q_{j|i}).

Choices (RepDistiller, HobbitLong/RepDistiller ``distiller_zoo/PKT.py``, the authors' code from
passalis/probabilistic_kt, and ``train_student.py``, ``helper/loops.py``, which produced the CIFAR-100 "PKT"
row of its table):

- Every sample's own similarity (k = i, K = 1) stays in the normalisation and the sum; the paper leaves
  k = i out.
- The divergence is averaged over the B² pairs (the paper sums), and ε = 1e-7 is added to both
  probabilities inside the log and to the norms (x / (‖x‖₂ + ε)).
- RepDistiller then replaces NaN entries of the normalised features by 0; they cannot arise from finite
  features, and a NaN feature here gives a NaN loss for the library's non-finite check instead of being
  hidden.
- Features of any shape are flattened to (B, D); student and teacher widths may differ.
- loss = CE + β·pkt_loss, β = 30000, no KD (``-a 0``); layer: the pooled penultimate feature, the
  classifier's input (entry −1 of the ``is_feat`` list), in both networks.
"""
from __future__ import annotations

import torch
from torch import nn

from lightning_kd.core import Step, check_range, classifier
from lightning_kd.methods.feature_distillation import FeatureDistillation


def cosine_probabilities(features: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Row-stochastic (B, B) matrix K(x_i, x_j) / Σ_k K(x_i, x_k), K the cosine kernel ½(cos + 1), self included.

    Each flattened feature is divided by its L2 norm + ``eps`` before the dot products.
    """
    flat = features.flatten(1)
    flat = flat / (flat.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)
    similarity = (flat @ flat.T + 1.0) / 2.0
    return similarity / similarity.sum(dim=1, keepdim=True)


def pkt_loss(f_s: torch.Tensor, f_t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """mean_{i,j} p_{j|i}·log((p_{j|i} + ε) / (q_{j|i} + ε)), p the teacher's and q the student's
    :func:`cosine_probabilities`: the paper's KL averaged over the B² pairs, as RepDistiller."""
    check_range("eps", eps, 0.0)
    if f_s.dim() < 2 or f_t.dim() < 2 or f_s.shape[0] != f_t.shape[0]:
        raise ValueError(
            f"pkt_loss needs (B, ...) student and teacher features of one batch, got shapes {tuple(f_s.shape)} "
            f"and {tuple(f_t.shape)}"
        )
    student, teacher = cosine_probabilities(f_s, eps), cosine_probabilities(f_t, eps)
    return (teacher * torch.log((teacher + eps) / (student + eps))).mean()


class PKT(FeatureDistillation):
    """Probabilistic knowledge transfer: loss = CE (+ KD) + β·Σ_layers pkt_loss(student layer, teacher layer).

    The paper's loss (Passalis & Tefas, arXiv 1803.10837, with its cosine-similarity kernel) is the KL divergence
    between the teacher's and the student's conditional probabilities of the batch's pairwise similarities; here in
    RepDistiller's form (:func:`pkt_loss`: averaged over the B² pairs, every sample's own similarity included)
    with its weight β = 30000 and no KD (``-a 0``), as for its CIFAR-100 table. No owned module, one stage.

    Layers default to the pooled penultimate feature of each network, the classifier's input
    (``"<classifier>:input"``, e.g. ``fc:input``; :func:`lightning_kd.core.classifier`), RepDistiller's
    ``feat[-1]``. Features of any shape are flattened; widths may differ. Several pairs are summed.

    Args:
        beta: weight β of the PKT term (RepDistiller: 30000).
        **kwargs (Any): layers, ``ce_weight``/``kd_weight``/``temperature``, ``image_size``
            (:class:`~lightning_kd.methods.feature_distillation.FeatureDistillation`) and the base arguments.
    """

    def __init__(self, beta: float = 30000.0, **kwargs) -> None:
        super().__init__(**kwargs)
        check_range("beta", beta, 0.0)
        self.beta = beta

    def default_layers(self, network: nn.Module) -> list[str]:
        return [f"{classifier(network)[0]}:input"]

    def loss_terms(self, step: Step) -> dict[str, torch.Tensor]:
        divergence = sum(pkt_loss(student, teacher) for student, teacher in self.paired_features(step))
        return {**self.task_terms(step), "pkt": self.beta * divergence}
