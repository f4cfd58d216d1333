"""Tung & Mori, "Similarity-Preserving Knowledge Distillation" (ICCV 2019, arXiv 1907.09682)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lightning_kd.core import Step, check_range, renamed_argument
from lightning_kd.methods.feature_distillation import FeatureDistillation
from lightning_kd.models import stage_names


def similarity_matrix(features: torch.Tensor) -> torch.Tensor:
    """G = Q·Qᵀ with each row L2-normalised, Q the (B, D) flattening of a (B, ...) feature (eqs. 1-2)."""
    flat = features.flatten(1)
    return F.normalize(flat @ flat.T, dim=1)


def sp_loss(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """‖G_t − G_s‖²_F / B² (eq. 3): any widths, since G is B×B; both features must hold the same batch."""
    batch = student_features.shape[0]
    difference = similarity_matrix(teacher_features) - similarity_matrix(student_features)
    return difference.pow(2).sum() / batch**2


class SP(FeatureDistillation):
    """Similarity-preserving KD: loss = CE (+ KD) + β·Σ_layers sp_loss(student layer, teacher layer).

    Layers default to the last stage of each model, the final map before pooling (the paper's setting).

    Args:
        beta: weight of the similarity term, the paper's γ (paper and RepDistiller on CIFAR: 3000).
        **kwargs (Any): layers, ``ce_weight``/``kd_weight``/``temperature`` (:class:`FeatureDistillation`)
            and the base arguments.
        gamma: deprecated name of ``beta``; removed in the next release.
    """

    def __init__(self, beta: float = 3000.0, gamma: Optional[float] = None, **kwargs) -> None:
        super().__init__(**kwargs)
        beta = renamed_argument("SP", "gamma", gamma, "beta", beta, 3000.0)
        check_range("beta", beta, 0.0)
        self.beta = beta

    def default_layers(self, network: nn.Module) -> list[str]:
        return stage_names(network)[-1:]

    def loss_terms(self, step: Step) -> dict[str, torch.Tensor]:
        similarity = sum(
            sp_loss(step.student_features[s], step.teacher_features[t])
            for s, t in zip(self.student_layers, self.teacher_layers)
        )
        return {**self.task_terms(step), "sp": self.beta * similarity}
