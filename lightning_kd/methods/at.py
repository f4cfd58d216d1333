"""Zagoruyko & Komodakis, "Paying More Attention to Attention" (ICLR 2017, arXiv 1612.03928)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_kd.core import Step, check_range
from lightning_kd.core.features import pool_to_smallest
from lightning_kd.methods.feature_distillation import FeatureDistillation


def attention_energy(features: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Spatial attention of a (B, C, H, W) map before normalisation: mean over channels of |A_c|^p, (B, H, W).

    The paper's F^p_sum (section 3.1) sums over channels; the mean differs by the factor 1/C, which the
    L2 normalisation of :func:`at_loss` removes.
    """
    return features.abs().pow(p).mean(dim=1)


def at_loss(student_features: torch.Tensor, teacher_features: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """mean((Q_s/‖Q_s‖₂ − Q_t/‖Q_t‖₂)²) over batch and positions, Q the flattened attention energy.

    The paper's eq. (2) term, with the squared difference averaged as in its reference code and
    RepDistiller (the β/2 of eq. 2 is folded into β). Channel counts may differ; when spatial sizes
    differ the larger attention map is adaptive-average-pooled to the smaller (RepDistiller pools
    the features instead).
    """
    energies = pool_to_smallest(attention_energy(student_features, p), attention_energy(teacher_features, p))
    student, teacher = (F.normalize(energy.flatten(1), dim=1) for energy in energies)
    return (student - teacher).pow(2).mean()


class AT(FeatureDistillation):
    """Attention transfer: loss = CE (+ KD) + β·Σ_layers at_loss(student layer, teacher layer).

    Layers default to every stage end of student and teacher (``lightning_kd.models.stage_names``).

    Args:
        beta: weight β of the attention term (paper and RepDistiller: 1000).
        p: exponent of the attention energy |A|^p (paper: 2).
        **kwargs (Any): layers, ``ce_weight``/``kd_weight``/``temperature`` (:class:`FeatureDistillation`)
            and the base arguments.
    """

    def __init__(self, beta: float = 1000.0, p: float = 2.0, **kwargs) -> None:
        super().__init__(**kwargs)
        check_range("beta", beta, 0.0)
        check_range("p", p, 0.0, low_open=True)
        self.beta = beta
        self.p = p

    def loss_terms(self, step: Step) -> dict[str, torch.Tensor]:
        attention = sum(
            at_loss(step.student_features[s], step.teacher_features[t], self.p)
            for s, t in zip(self.student_layers, self.teacher_layers)
        )
        return {**self.task_terms(step), "at": self.beta * attention}
