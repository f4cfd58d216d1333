"""Park, Kim, Lu & Cho, "Relational Knowledge Distillation" (CVPR 2019, arXiv 1904.05068).

The student matches relations between the batch's embeddings rather than the embeddings: the
distance-wise potential ψ_D(t_i, t_j) = ‖t_i − t_j‖₂ / μ, μ the mean distance over the pairs, and the
angle-wise potential ψ_A(t_i, t_j, t_k) = ⟨e_ij, e_kj⟩, e_ij = (t_i − t_j)/‖t_i − t_j‖₂, each compared with
the Huber loss l_δ (δ = 1, PyTorch's smooth L1); RKD-DA = λ_D·L_RKD-D + λ_A·L_RKD-A.

Choices (RepDistiller, HobbitLong/RepDistiller ``distiller_zoo/RKD.py``, which follows the authors'
lenscloth/RKD code, and ``train_student.py``, ``helper/loops.py``, which produced the CIFAR-100 "RKD" row of
its table):

- Distances come from ‖a‖² + ‖b‖² − 2aᵀb clamped at 1e-12 before the square root (so two equal samples are
  1e-6 apart, not 0), with a 0 diagonal; μ is the mean of the positive entries.
- The Huber loss is averaged over all B² pairs (diagonal included, where both sides are 0), i.e. the paper's
  mean over the B(B − 1) pairs times (B − 1)/B, and over all B³ triplets (i, j, k), degenerate ones included
  (a zero difference vector normalises to 0; j = k gives cos = 1 on both sides), i.e. the paper's mean over
  distinct triplets times (B − 1)(B − 2)/B².
- The teacher's potentials carry no gradient (RepDistiller computes them under ``no_grad``).
- Features of any shape are flattened to (B, D); student and teacher widths may differ.
- loss = CE + β·(25·L_RKD-D + 50·L_RKD-A), β = 1, no KD (``-a 0``); layer: the pooled penultimate feature,
  the classifier's input (entry −1 of the ``is_feat`` list), in both networks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_kd.core import Step, check_range, classifier
from lightning_kd.methods.feature_distillation import FeatureDistillation


def pairwise_distances(embeddings: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """(B, B) Euclidean distances √max(‖e_i‖² + ‖e_j‖² − 2e_iᵀe_j, eps) of the rows, with a 0 diagonal."""
    squared_norms = embeddings.pow(2).sum(dim=1)
    squared = (squared_norms[:, None] + squared_norms[None, :] - 2 * embeddings @ embeddings.T).clamp(min=eps)
    eye = torch.eye(len(embeddings), dtype=torch.bool, device=embeddings.device)
    return squared.sqrt().masked_fill(eye, 0.0)


def _normalised_distances(embeddings: torch.Tensor) -> torch.Tensor:
    """ψ_D: pairwise distances divided by the mean of the positive ones."""
    distances = pairwise_distances(embeddings)
    return distances / distances[distances > 0].mean()


def _angles(embeddings: torch.Tensor) -> torch.Tensor:
    """ψ_A as a (B, B, B) tensor: [i, j, k] = ⟨e(x_j − x_i), e(x_k − x_i)⟩, e the L2 normalisation (0 stays 0)."""
    differences = F.normalize(embeddings[None, :, :] - embeddings[:, None, :], p=2, dim=2)
    return torch.bmm(differences, differences.transpose(1, 2))


def _flatten_pair(name: str, f_s: torch.Tensor, f_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if f_s.dim() < 2 or f_t.dim() < 2 or f_s.shape[0] != f_t.shape[0] or f_s.shape[0] < 2:
        raise ValueError(
            f"{name} relates samples of one batch, so it needs (B, ...) student and teacher features with the same "
            f"B ≥ 2, got shapes {tuple(f_s.shape)} and {tuple(f_t.shape)}"
        )
    return f_s.flatten(1), f_t.flatten(1)


def rkd_distance_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """L_RKD-D: smooth-L1 (δ = 1) between the student's and the teacher's mean-normalised pairwise distances,
    averaged over the B² pairs."""
    student, teacher = _flatten_pair("rkd_distance_loss", f_s, f_t)
    with torch.no_grad():
        teacher_potential = _normalised_distances(teacher)
    return F.smooth_l1_loss(_normalised_distances(student), teacher_potential)


def rkd_angle_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """L_RKD-A: smooth-L1 (δ = 1) between the student's and the teacher's cosines of the angles at every vertex of
    every triplet, averaged over the B³ triplets."""
    student, teacher = _flatten_pair("rkd_angle_loss", f_s, f_t)
    with torch.no_grad():
        teacher_potential = _angles(teacher)
    return F.smooth_l1_loss(_angles(student).flatten(), teacher_potential.flatten())


def rkd_loss(
    f_s: torch.Tensor, f_t: torch.Tensor, *, distance_weight: float = 25.0, angle_weight: float = 50.0
) -> torch.Tensor:
    """RKD-DA: λ_D·L_RKD-D + λ_A·L_RKD-A (RepDistiller: λ_D = 25, λ_A = 50)."""
    check_range("distance_weight", distance_weight, 0.0)
    check_range("angle_weight", angle_weight, 0.0)
    return distance_weight * rkd_distance_loss(f_s, f_t) + angle_weight * rkd_angle_loss(f_s, f_t)


class RKD(FeatureDistillation):
    """Relational KD (RKD-DA): loss = CE (+ KD) + β·Σ_layers (λ_D·L_RKD-D + λ_A·L_RKD-A).

    The paper's objective (Park et al., arXiv 1904.05068, RKD-DA): the Huber loss between the student's and the
    teacher's distance-wise (mean-normalised) and angle-wise potentials of the batch, weighted
    λ_D = 25 and λ_A = 50 as in the paper's and RepDistiller's RKD-DA; RepDistiller adds it to CE with β = 1
    and no KD (``-a 0 -b 1``) for its CIFAR-100 table. Averages as :func:`rkd_distance_loss` and
    :func:`rkd_angle_loss` (over all B² pairs and B³ triplets, RepDistiller's). No owned module, one stage.

    The two parts are logged apart, ``train/loss_rkd_distance`` = β·λ_D·L_RKD-D and ``train/loss_rkd_angle``
    = β·λ_A·L_RKD-A; a part whose weight is 0 is left out (not computed). Layers default to the pooled
    penultimate feature of each network, the classifier's input (``"<classifier>:input"``), RepDistiller's
    ``feat[-1]``; features of any shape are flattened, widths may differ, several pairs are summed. The batch
    must hold at least two samples.

    Args:
        beta: overall weight β of the relational terms (RepDistiller: 1).
        distance_weight: λ_D of the distance-wise term (paper and RepDistiller: 25).
        angle_weight: λ_A of the angle-wise term (paper and RepDistiller: 50).
        **kwargs (Any): layers, ``ce_weight``/``kd_weight``/``temperature``, ``image_size``
            (:class:`~lightning_kd.methods.feature_distillation.FeatureDistillation`) and the base arguments.
    """

    def __init__(
        self, beta: float = 1.0, distance_weight: float = 25.0, angle_weight: float = 50.0, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        check_range("beta", beta, 0.0)
        check_range("distance_weight", distance_weight, 0.0)
        check_range("angle_weight", angle_weight, 0.0)
        if self.ce_weight == 0 and self.kd_weight == 0 and beta * (distance_weight + angle_weight) == 0:
            raise ValueError(
                "RKD has nothing to minimise: ce_weight, kd_weight and beta·(distance_weight + angle_weight) are all 0"
            )
        self.beta = beta
        self.distance_weight = distance_weight
        self.angle_weight = angle_weight

    def default_layers(self, network: nn.Module) -> list[str]:
        return [f"{classifier(network)[0]}:input"]

    def loss_terms(self, step: Step) -> dict[str, torch.Tensor]:
        terms = self.task_terms(step)
        pairs = self.paired_features(step)
        if self.beta * self.distance_weight > 0:
            distance = sum(rkd_distance_loss(student, teacher) for student, teacher in pairs)
            terms["rkd_distance"] = self.beta * self.distance_weight * distance
        if self.beta * self.angle_weight > 0:
            angle = sum(rkd_angle_loss(student, teacher) for student, teacher in pairs)
            terms["rkd_angle"] = self.beta * self.angle_weight * angle
        return terms
