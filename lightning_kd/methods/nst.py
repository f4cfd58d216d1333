"""Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer" (arXiv 1707.01219).

Each channel k of a (C, H, W) map is a sample f^k ∈ R^{HW} of the distribution of "neuron selectivity
patterns", L2-normalised over positions; the student matches the teacher's distribution by the squared
maximum mean discrepancy
MMD² = 1/C_T² Σ_{i,i'} k(f_T^i, f_T^i') + 1/C_S² Σ_{j,j'} k(f_S^j, f_S^j') − 2/(C_T·C_S) Σ_{i,j} k(f_S^j, f_T^i),
here with the paper's polynomial kernel k(x, y) = (xᵀy + c)^d, d = 2, c = 0.

Choices (RepDistiller, HobbitLong/RepDistiller ``distiller_zoo/NST.py``, ``train_student.py``,
``helper/loops.py``, which produced the CIFAR-100 "NST" row of its table):

- :func:`nst_loss` is MMD² averaged over the batch, with all three terms (RepDistiller's ``full_loss``); the
  teacher-teacher term is a constant (detached). Channel counts may differ; when spatial sizes differ the
  larger map is adaptive-average-pooled to the smaller before normalising (per dimension here; RepDistiller
  compares heights only and pools to a square: the same for square maps).
- The paper's loss is CE + λ/2·MMD²; RepDistiller: CE + β·Σ_layers nst_loss with β = 50, no KD (``-a 0``).
- Layers: every stage output (entries 1 to −2 of the ``is_feat`` list, post-activation, not the stem or
  the pooled vector), paired in order (``zip``, so the shorter list decides): ``layer1``..``layer3`` of
  the CIFAR ResNets and ShuffleNets (ShuffleV2: ``layer3``, not ``relu2``), ``layer1``..``layer4`` of
  ResNet50, ``block1``..``block3`` of the WRNs (``block3`` raw, before the final BN-ReLU: not this library's
  ``relu``), ``block1``..``block4`` of the VGGs, ``blocks.1``, ``blocks.2``, ``blocks.4``, ``blocks.6`` of
  MobileNetV2.
- The kernel matrices come from a batched matrix product (B, C_s, C_t) instead of RepDistiller's broadcast
  (B, C_s, C_t, H·W) product: the same numbers up to rounding, without the H·W-fold memory.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_kd.core import Step, check_range
from lightning_kd.core.features import pool_to_smallest
from lightning_kd.methods.feature_distillation import FeatureDistillation


def poly_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(aᵢᵀ bⱼ)² for every pair of rows, batched: (B, N, D) × (B, M, D) → (B, N, M); d = 2, c = 0."""
    return torch.bmm(a, b.transpose(1, 2)).pow(2)


def nst_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """MMD² of the channels' normalised selectivity patterns under the polynomial kernel, averaged over the batch.

    f_s, f_t: (B, C, H, W) student and teacher maps of one batch (any channel counts). The teacher-teacher term
    is detached (a constant: it only makes the loss 0 when the distributions agree).
    """
    if f_s.dim() != 4 or f_t.dim() != 4 or f_s.shape[0] != f_t.shape[0]:
        raise ValueError(
            "nst_loss needs (B, C, H, W) student and teacher maps of one batch, got shapes "
            f"{tuple(f_s.shape)} and {tuple(f_t.shape)}"
        )
    f_s, f_t = (F.normalize(f.flatten(2), dim=2) for f in pool_to_smallest(f_s, f_t))
    return poly_kernel(f_t, f_t).mean().detach() + poly_kernel(f_s, f_s).mean() - 2 * poly_kernel(f_s, f_t).mean()


class NST(FeatureDistillation):
    """Neuron selectivity transfer: loss = CE (+ KD) + β·Σ_layers nst_loss(student layer, teacher layer).

    The paper's total loss (Huang & Wang, arXiv 1707.01219) is L_NST = H(y, p_S) + λ/2·L_MMD²(F_T, F_S) with the
    polynomial kernel (d = 2, c = 0); here β stands for λ/2 and the MMD² (:func:`nst_loss`) is summed over every
    layer pair, as RepDistiller (``-a 0 -b 50``) ran it for its CIFAR-100 table. No owned module, one stage.

    Layers default to every stage end of each network (:func:`lightning_kd.models.stage_names`), RepDistiller's
    ``feat[1:-1]`` on the CIFAR ResNets; on the WRNs RepDistiller's last map is ``block3`` (before the final
    BN-ReLU) and on the VGGs it leaves out ``block0``: name ``block1, block2, block3`` / ``block1`` .. ``block4``
    explicitly (the configs under ``configs/cifar100/nst`` do). Every paired layer must output a (C, H, W) map
    (checked at construction); channel counts may differ, spatial sizes are pooled to the smaller.

    Args:
        beta: weight β of the MMD² term (RepDistiller: 50; the paper's λ/2).
        **kwargs (Any): layers, ``ce_weight``/``kd_weight``/``temperature``, ``image_size``
            (:class:`~lightning_kd.methods.feature_distillation.FeatureDistillation`) and the base arguments.
    """

    def __init__(self, beta: float = 50.0, **kwargs) -> None:
        super().__init__(**kwargs)
        check_range("beta", beta, 0.0)
        self.beta = beta
        self.feature_map_shapes("compares the channels of (B, C, H, W) feature maps")

    def loss_terms(self, step: Step) -> dict[str, torch.Tensor]:
        mmd = sum(nst_loss(student, teacher) for student, teacher in self.paired_features(step))
        return {**self.task_terms(step), "nst": self.beta * mmd}
