"""Ahn, Hu, Damianou, Lawrence & Dai, "Variational Information Distillation for Knowledge Transfer"
(CVPR 2019, arXiv 1904.05835).

VID maximises a variational lower bound on the mutual information between a teacher feature t and a student
feature s: a regressor μ(s) predicts t under a Gaussian q(t | s) = N(μ(s), σ²) whose variance is learned per
channel, σ²_c = softplus(α_c) + ε, and the student minimises −log q(t | s) (Sec. 3 of the paper:
−log q(t|s) = Σ_{c,h,w} log σ_c + (t_{c,h,w} − μ_{c,h,w}(s))² / (2σ²_c) + const).

What this file holds: :func:`vid_loss`, the Gaussian negative log-likelihood; :class:`VIDRegressor`, the head a
VID module owns per distilled layer pair (its 1×1-conv mean regressor and the per-channel variance parameter α);
and :class:`VID`, the method (loss = CE (+ KD) + β·Σ_pairs vid_loss).

Choices — the authors' code as RepDistiller ships it (HobbitLong/RepDistiller ``distiller_zoo/VID.py``, "code
from author" ssahn0215/variational-information-distillation; mdistiller's ``VID.py`` is the same computation):

- The loss is the *mean* over batch, channels and positions of ½·((t − μ)²/σ² + log σ²), the constant ½·log 2π
  dropped. The paper sums over C·H·W per sample, so the code's weight λ per layer is the paper's λ/(C·H·W).
- μ(s) = conv1×1(C_s→C_mid) – ReLU – conv1×1(C_mid→C_mid) – ReLU – conv1×1(C_mid→C_t), no biases, PyTorch's
  default initialisation; C_mid = C_t (RepDistiller builds ``VIDLoss(s, t, t)``).
- σ²_c = softplus(α_c) + ε, ε = 1e-5, α initialised so that σ² = 5 (``init_pred_var``):
  α = log(exp(5 − ε) − 1). α is trained with the regressor (RepDistiller puts the whole ``VIDLoss`` in its
  optimiser, with weight decay 5e-4 like every trainable parameter). mdistiller keeps α in a plain Python list,
  so its α is never registered, never optimised and σ² stays 5; we follow RepDistiller and the paper (learned).
- Spatial sizes: when they differ, the larger map is adaptive-average-pooled to the smaller size *before* the
  regressor (RepDistiller pools both to (min H, min H), i.e. assumes square maps; we pool height and width to
  their minima separately, the same for square maps).

Layers and hyper-parameters (CIFAR-100, RepDistiller ``train_student.py`` / ``scripts/run_cifar_distill.sh``):
every stage output of RepDistiller's ``is_feat`` list but the stem and the pooled vector, ``feat[1:-1]``, taken
after the block's ReLU (``preact=False``): resnet8x4/32x4, resnet20/32/56/110: the three ``layer1..3`` outputs;
wrn: ``block1..3`` outputs (block3's raw output, before the final BN-ReLU); vgg: the relu'd outputs of
``block1..4``; one :class:`VIDRegressor` per pair (C_s, C_t). Loss = 1·CE + 0·KD + 1·Σ_layers vid_loss
(``-r 1 -a 0 -b 1``; mdistiller: CE 1, feat weight 1, eps 1e-5, init var 5). Schedule: the RepDistiller one
(SGD 0.9, wd 5e-4, batch 64, lr 0.05, 0.01 for MobileNetV2/ShuffleNets, ×0.1 at 150/180/210, 240 epochs).
RepDistiller reports e.g. resnet32x4 → resnet8x4 73.09, wrn_40_2 → wrn_16_2 74.11, vgg13 → vgg8 71.23.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lightning_kd.core import Step, check_range
from lightning_kd.methods.feature_distillation import FeatureDistillation


def vid_loss(predicted_mean: torch.Tensor, teacher_features: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """mean over (B, C, H, W) of ½·((t − μ)² / σ²_c + log σ²_c): VID's −log q(t | s) (Sec. 3), constant dropped.

    Args:
        predicted_mean: μ(s), the regressor's output, (B, C, H, W) (or (B, C)).
        teacher_features: t, the same shape.
        variance: σ², one positive value per channel, (C,).
    """
    if predicted_mean.shape != teacher_features.shape:
        raise ValueError(
            f"vid_loss needs the predicted mean and the teacher feature in the same shape, got "
            f"{tuple(predicted_mean.shape)} and {tuple(teacher_features.shape)}"
        )
    if predicted_mean.dim() < 2:
        raise ValueError(f"vid_loss needs (B, C, ...) features, got shape {tuple(predicted_mean.shape)}")
    if variance.shape != (predicted_mean.shape[1],):
        raise ValueError(
            f"vid_loss needs one variance per channel, shape ({predicted_mean.shape[1]},), got {tuple(variance.shape)}"
        )
    variance = variance.to(predicted_mean.dtype).view(1, -1, *([1] * (predicted_mean.dim() - 2)))
    neg_log_prob = 0.5 * ((predicted_mean - teacher_features) ** 2 / variance + torch.log(variance))
    return neg_log_prob.mean()


class VIDRegressor(nn.Module):
    """VID's head for one (student layer, teacher layer) pair: the mean regressor μ and the per-channel variance.

    ``forward(student_features)`` is μ(s), (B, C_t, H, W); :meth:`variance` is σ² = softplus(α) + ε, (C_t,);
    :meth:`loss` pools the two maps to a common size and returns :func:`vid_loss`.

    Args:
        student_channels: C_s of the student feature.
        teacher_channels: C_t of the teacher feature.
        mid_channels: width of the two hidden 1×1 convs (default C_t, as RepDistiller).
        init_variance: σ² at initialisation (5), must exceed ``eps``.
        eps: ε added to softplus(α) (1e-5).
    """

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        mid_channels: int | None = None,
        init_variance: float = 5.0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        mid_channels = teacher_channels if mid_channels is None else mid_channels
        for name, value in (("student_channels", student_channels), ("teacher_channels", teacher_channels),
                            ("mid_channels", mid_channels)):
            check_range(name, value, 1)
        check_range("eps", eps, 0.0)
        check_range("init_variance", init_variance, eps, low_open=True)
        self.eps = eps
        self.regressor = nn.Sequential(
            nn.Conv2d(student_channels, mid_channels, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(mid_channels, mid_channels, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(mid_channels, teacher_channels, kernel_size=1, bias=False),
        )
        # softplus(α) + ε = init_variance: α = log(exp(init_variance − ε) − 1), computed stably as the inverse softplus.
        alpha = math.log(math.expm1(init_variance - eps))
        self.log_scale = nn.Parameter(torch.full((teacher_channels,), alpha))

    def variance(self) -> torch.Tensor:
        """σ²_c = softplus(α_c) + ε, (C_t,); softplus as log(e^α + 1) without overflow for large α."""
        return torch.logaddexp(self.log_scale, torch.zeros_like(self.log_scale)) + self.eps

    def forward(self, student_features: torch.Tensor) -> torch.Tensor:
        if student_features.dim() != 4 or student_features.shape[1] != self.regressor[0].in_channels:
            raise ValueError(
                f"VIDRegressor expects a (B, {self.regressor[0].in_channels}, H, W) student feature, got "
                f"{tuple(student_features.shape)}"
            )
        return self.regressor(student_features)

    def loss(self, student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
        """vid_loss(μ(s'), t', σ²), s' and t' the two maps adaptive-average-pooled to their smallest H and W."""
        if teacher_features.dim() != 4 or student_features.dim() != 4:
            raise ValueError(
                f"VID needs (B, C, H, W) feature maps, got student {tuple(student_features.shape)} and teacher "
                f"{tuple(teacher_features.shape)}"
            )
        size = (min(student_features.shape[2], teacher_features.shape[2]),
                min(student_features.shape[3], teacher_features.shape[3]))
        if tuple(student_features.shape[2:]) != size:
            student_features = F.adaptive_avg_pool2d(student_features, size)
        if tuple(teacher_features.shape[2:]) != size:
            teacher_features = F.adaptive_avg_pool2d(teacher_features, size)
        return vid_loss(self(student_features), teacher_features, self.variance())


class VID(FeatureDistillation):
    """Variational information distillation: loss = CE (+ KD) + β·Σ_pairs vid_loss(μ_i(s_i), t_i, σ²_i).

    Ahn, Hu, Damianou, Lawrence & Dai, "Variational Information Distillation for Knowledge Transfer" (CVPR 2019,
    arXiv 1904.05835): for every pair i of (student layer, teacher layer), a regressor μ_i predicts the teacher's
    feature t_i from the student's s_i under a Gaussian with a learned per-channel variance σ²_i, and the student
    minimises the negative log-likelihood −log q(t_i | s_i) (:func:`vid_loss`: the mean over batch, channels and
    positions of ½·((t − μ)²/σ² + log σ²), the constant ½·log 2π dropped), here summed over the pairs and
    weighted by β.

    Owned heads: one :class:`VIDRegressor` per pair in :attr:`regressors` (an ``nn.ModuleList``, trained,
    checkpointed, left out of export), sized in ``__init__`` from the two layers' output shapes: C_s → C_t → C_t
    → C_t, three bias-free 1×1 convolutions with ReLUs between them (hidden width C_t, RepDistiller's
    ``VIDLoss(s, t, t)``), and the variance σ²_c = softplus(α_c) + ε of each teacher channel, α initialised so
    that σ² = ``init_variance``. The regressors and α learn with the student (same optimizer, learning rate and
    weight decay, as RepDistiller puts the whole ``VIDLoss`` in its optimiser); the teacher's features carry no
    gradient. When a pair's spatial sizes differ the larger map is adaptive-average-pooled to the smaller (height
    and width separately) *before* the regressor (RepDistiller pools to a square of the smaller height: the same
    for square maps). Parameter names (``regressor.0/2/4.weight``, ``log_scale``) are RepDistiller's, so its
    ``VIDLoss`` state dicts load into each head.

    Choices (RepDistiller, HobbitLong/RepDistiller ``distiller_zoo/VID.py``, ``train_student.py``,
    ``helper/loops.py``, ``scripts/run_cifar_distill.sh``, which produced the CIFAR-100 "VID" row of its table):

    - Weights: CE 1, no KD (``-r 1 -a 0 -b 1``), β = 1 for the sum over the pairs; ``kd_weight`` adds KD
      ("VID+KD"). The code's per-layer weight is the paper's λ/(C·H·W): its loss is a mean, the paper's a sum.
    - Layers: every stage output of RepDistiller's ``is_feat`` list but the stem and the pooled vector,
      ``feat[1:-1]``, post-activation, paired in order. The default here is every stage end of each network
      (:func:`lightning_kd.models.stage_names`), which is RepDistiller's choice on the CIFAR ResNets
      (``layer1..3``); on the WRNs RepDistiller's last map is ``block3``'s raw output (before the final BN-ReLU)
      and on the VGGs it leaves out ``block0``: name ``block1, block2, block3`` / ``block1`` .. ``block4``
      explicitly (the configs under ``configs/cifar100/vid`` do, the same layers as ``configs/cifar100/nst``).
      Every paired layer must output a (C, H, W) map (checked at construction).
    - ε = 1e-5, initial variance 5 (``init_pred_var``); α is learned (mdistiller leaves it unregistered, so fixed).
    - Schedule (the configs): SGD 0.05, momentum 0.9, weight decay 5e-4 (on α too), batch 64, ×0.1 at
      150/180/210, 240 epochs; one stage (no pre-training of the regressors).

    Args:
        beta: weight β of the summed VID terms (RepDistiller: 1).
        init_variance: σ² of every channel at initialisation (RepDistiller: 5), must exceed ``eps``.
        eps: ε, the floor added to softplus(α) (RepDistiller: 1e-5).
        **kwargs (Any): layers (``student_layers``/``teacher_layers``, paired in order), ``ce_weight``/``kd_weight``/
            ``temperature``, ``image_size`` (:class:`~lightning_kd.methods.feature_distillation.FeatureDistillation`)
            and the base arguments.
    """

    def __init__(self, beta: float = 1.0, init_variance: float = 5.0, eps: float = 1e-5, **kwargs) -> None:
        super().__init__(**kwargs)
        check_range("beta", beta, 0.0)
        check_range("eps", eps, 0.0)
        check_range("init_variance", init_variance, eps, low_open=True)
        self.beta = beta
        self.init_variance = init_variance
        self.eps = eps
        student, teacher = self.feature_map_shapes("regresses (B, C, H, W) feature maps with 1x1 convolutions")
        self.regressors = nn.ModuleList(
            VIDRegressor(s[0], t[0], init_variance=init_variance, eps=eps) for s, t in zip(student, teacher)
        )

    def loss_terms(self, step: Step) -> dict[str, torch.Tensor]:
        pairs = self.paired_features(step)
        vid = sum(regressor.loss(student, teacher) for regressor, (student, teacher) in zip(self.regressors, pairs))
        return {**self.task_terms(step), "vid": self.beta * vid}
