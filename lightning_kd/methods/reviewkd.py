"""Chen, Liu, Zhao & Jia, "Distilling Knowledge via Knowledge Review" (CVPR 2021, arXiv 2104.09044).

ReviewKD lets each teacher stage supervise a fusion of the student's features of that stage *and all deeper
ones*. The student's features, taken deepest first, go through attention-based fusion (ABF) modules: each
transforms its stage's feature with a 1×1 conv + BN, fuses it with the (upsampled) running result from the deeper
stages using two spatial attention maps predicted from both, and maps the fusion to the teacher's channels and
size with a 3×3 conv + BN. Every output is compared with the teacher feature of the same stage by the
hierarchical context loss (HCL): an MSE on the full map plus MSEs between spatial-pyramid poolings of the two maps
(Sec. 3 of the paper: the review mechanism, ABF and HCL).

What this file holds: :func:`hcl_loss`, :class:`ABF`, :class:`ReviewKDFusion` (the chain of ABFs a ReviewKD module
owns, built from the student's and teacher's feature shapes) and :class:`ReviewKD`, the method's module.

Choices — the authors' code (dvlab-research/ReviewKD ``CIFAR-100/model/reviewkd.py``, ``train.py``,
``script/reviewKD.sh``) as ported by mdistiller (``mdistiller/distillers/ReviewKD.py``, ``engine/cfg.py``,
``configs/cifar100/reviewkd.yaml``); both compute the same loss:

- HCL per (student output, teacher feature) pair of size h: MSE(full) + Σ over the pyramid levels l ∈ (4, 2, 1)
  with l < h of w_l·MSE(adaptive-avg-pool to l×l), w = 1/2, 1/4, 1/8 for the levels kept, in that order, the sum
  divided by 1 + Σ w (levels ≥ h are skipped: an 8×8 map uses 4, 2, 1; a 4×4 map 2 and 1 with weights 1/2, 1/4; a
  1×1 map only the full MSE). The pairs' losses are summed. The test on h uses the height (square maps in the
  authors' code); the pooling is to l×l.
- ABF: conv1×1(C_in → C_mid, no bias) + BN; fusion (every stage but the deepest): sigmoid(conv1×1(2·C_mid → 2,
  with bias)) applied to [x, nearest-upsampled residual], x·a₀ + residual·a₁; nearest-upsample to the teacher's
  size when it differs; conv3×3(C_mid → C_t, no bias, padding 1) + BN. Kaiming-uniform init (a = 1) of the two
  convs, PyTorch's default for the attention conv. C_mid = min(512, C_in of the deepest, pooled, feature) for
  every ABF (mdistiller reads ``MAX_MID_CHANNEL`` from its config but never uses it).
- The deepest "feature" is the globally pooled vector (B, C) viewed as (B, C, 1, 1), on both sides.
- Weights: CE 1 + λ·min(epoch / 20, 1)·HCL. mdistiller counts epochs from 1 (1/20 of λ in the first epoch), the
  original from 0 (no ReviewKD term in the first epoch). λ per CIFAR pair below. No KD term.

Features (CIFAR, mdistiller / original): the student's features *after* the stage's ReLU (``feats``,
``STU_PREACT: False``), the teacher's *before* it (``preact_feats[1:]``, as OFD), plus both pooled vectors; the
student's list is cut to its last len(teacher list) entries (its stem is not used). As (C, H, W), shallowest first
(the ``student_shapes`` / ``teacher_shapes`` of :class:`ReviewKDFusion`), with the original's λ
(``script/reviewKD.sh``; mdistiller ships only resnet32x4 → resnet8x4, λ = 5):

- resnet56 → resnet20 (λ 0.6), resnet110 → resnet32 (λ 1.0), resnet110 → resnet20: student and teacher
  (16,32,32) (32,16,16) (64,8,8) (64,1,1).
- resnet32x4 → resnet8x4 (λ 5.0): both (64,32,32) (128,16,16) (256,8,8) (256,1,1).
- wrn_40_2 → wrn_16_2 (λ 5.0): both (32,32,32) (64,16,16) (128,8,8) (128,1,1); wrn_40_2 → wrn_40_1 (λ 5.0):
  student (16,32,32) (32,16,16) (64,8,8) (64,1,1), teacher as for wrn_16_2.
- vgg13 → vgg8: both (128,16,16) (256,8,8) (512,4,4) (512,4,4) (512,1,1) (λ not published).
- resnet32x4 → ShuffleV1 (λ 5.0): student (240,16,16) (480,8,8) (960,4,4) (960,1,1), teacher as for resnet8x4;
  wrn_40_2 → ShuffleV1 (λ 5.0): same student, teacher as for wrn_16_2 — the student's maps are upsampled ×2.
- resnet32x4 → ShuffleV2 (λ 8.0): student (116,16,16) (232,8,8) (464,4,4) (1024,1,1), teacher as for resnet8x4.
- vgg13 → MobileNetV2: student (12,16,16) (16,8,8) (48,4,4) (160,2,2) (1280,1,1), teacher as for vgg8;
  ResNet50 → MobileNetV2: same student, teacher (256,32,32) (512,16,16) (1024,8,8) (2048,4,4) (2048,1,1);
  ResNet50 → vgg8: vgg8's student list, ResNet50's teacher list (λ not published for these three).

Schedules: mdistiller — SGD 0.9, wd 5e-4, batch 64, lr 0.05, ×0.1 at 150/180/210, 240 epochs, warm-up 20;
original — the same milestones and wd but lr 0.1 (0.02 for ShuffleNets/MobileNet) with Nesterov momentum.
ImageNet (mdistiller): warm-up 1, λ 1 (ResNet34 → ResNet18, student pre-ReLU features) or 8 (ResNet50 →
MobileNetV1).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lightning_kd.core import Step, check_range, classifier
from lightning_kd.methods.feature_distillation import FeatureDistillation
from lightning_kd.models import preact_names, stage_names

#: Spatial-pyramid levels of the hierarchical context loss, coarsest last.
HCL_LEVELS = (4, 2, 1)


def hcl_loss(student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor]) -> torch.Tensor:
    """Hierarchical context loss (Sec. 3 of the paper), summed over the (student, teacher) pairs.

    For a pair of (B, C, h, w) maps: [MSE + Σ_{l ∈ (4, 2, 1), l < h} w_l·MSE(pool_l)] / (1 + Σ w_l), with w halving
    from 1/2 at each level kept and pool_l the adaptive average pooling to l×l.

    Args:
        student_features: the fused student outputs (:class:`ReviewKDFusion`), shallowest first.
        teacher_features: the teacher features, the same shapes, same order.
    """
    if len(student_features) != len(teacher_features) or not student_features:
        raise ValueError(
            f"hcl_loss needs as many student as teacher features (at least one), got {len(student_features)} and "
            f"{len(teacher_features)}"
        )
    total = 0.0
    for i, (fs, ft) in enumerate(zip(student_features, teacher_features)):
        if fs.dim() != 4 or fs.shape != ft.shape:
            raise ValueError(
                f"hcl_loss pair {i}: student and teacher features must be (B, C, H, W) of the same shape, got "
                f"{tuple(fs.shape)} and {tuple(ft.shape)}"
            )
        h = fs.shape[2]
        loss = F.mse_loss(fs, ft, reduction="mean")
        weight, weights = 1.0, 1.0
        for level in HCL_LEVELS:
            if level >= h:
                continue
            weight /= 2.0
            loss = loss + F.mse_loss(F.adaptive_avg_pool2d(fs, (level, level)),
                                     F.adaptive_avg_pool2d(ft, (level, level)), reduction="mean") * weight
            weights += weight
        total = total + loss / weights
    return total


class ABF(nn.Module):
    """Attention-based fusion of one student stage (the authors' ``ABF``).

    ``forward(x, residual=None, out_size=None)`` → ``(output, new_residual)``: ``output`` (B, C_t, *out_size) is
    compared with the teacher; ``new_residual`` (B, C_mid, *out_size) is fused into the next, shallower, stage.

    Args:
        in_channels: C_in of the student feature.
        mid_channels: C_mid of the fused representation.
        out_channels: C_t of the teacher feature.
        fuse: whether a residual from a deeper stage is fused in (every stage but the deepest).
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("mid_channels", mid_channels),
                            ("out_channels", out_channels)):
            check_range(name, value, 1)
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(mid_channels),
        )
        self.conv2 = nn.Sequential(
            nn.Conv2d(mid_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.att_conv = (
            nn.Sequential(nn.Conv2d(mid_channels * 2, 2, kernel_size=1), nn.Sigmoid()) if fuse else None
        )
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(
        self,
        x: torch.Tensor,
        residual: Optional[torch.Tensor] = None,
        out_size: Optional[tuple[int, int]] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 4 or x.shape[1] != self.conv1[0].in_channels:
            raise ValueError(f"ABF expects a (B, {self.conv1[0].in_channels}, H, W) feature, got {tuple(x.shape)}")
        n, _, h, w = x.shape
        x = self.conv1(x)
        if self.att_conv is not None:
            if residual is None:
                raise ValueError("this ABF fuses a residual from the deeper stage: pass residual=")
            residual = F.interpolate(residual, (h, w), mode="nearest")
            z = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * z[:, 0].view(n, 1, h, w) + residual * z[:, 1].view(n, 1, h, w)
        if out_size is not None and tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, tuple(out_size), mode="nearest")
        return self.conv2(x), x


def _shape(shape: Sequence[int], what: str) -> tuple[int, int, int]:
    shape = tuple(int(v) for v in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"{what} must be (C, H, W) with positive sizes, got {shape}")
    return shape


class ReviewKDFusion(nn.Module):
    """The review chain of ABFs a ReviewKD module owns (the authors' ``ReviewKD`` minus the student).

    ``forward(student_features)`` takes the student's features shallowest first, the last one the pooled vector
    ((B, C) or (B, C, 1, 1)), and returns one output per teacher feature, shallowest first, each shaped as the
    matching entry of ``teacher_shapes``: feed them to :func:`hcl_loss` with the teacher's features.

    Args:
        student_shapes: (C, H, W) of each student feature, shallowest first, the pooled vector last as (C, 1, 1).
        teacher_shapes: (C, H, W) of each teacher feature, the same count and order.
        mid_channels: C_mid of every ABF (default min(512, C of the pooled student vector), as the authors).

    ``abfs`` is stored deepest first (``abfs.0`` handles the pooled vector), as the authors' ``self.abfs``, so their
    state dicts load key for key.
    """

    def __init__(
        self,
        student_shapes: Sequence[Sequence[int]],
        teacher_shapes: Sequence[Sequence[int]],
        mid_channels: Optional[int] = None,
    ) -> None:
        super().__init__()
        if len(student_shapes) != len(teacher_shapes) or not student_shapes:
            raise ValueError(
                f"ReviewKDFusion needs one student shape per teacher shape (at least one), got {len(student_shapes)} "
                f"and {len(teacher_shapes)}"
            )
        self.student_shapes = [_shape(s, f"student_shapes[{i}]") for i, s in enumerate(student_shapes)]
        self.teacher_shapes = [_shape(t, f"teacher_shapes[{i}]") for i, t in enumerate(teacher_shapes)]
        in_channels = [s[0] for s in self.student_shapes]
        mid_channels = min(512, in_channels[-1]) if mid_channels is None else mid_channels
        check_range("mid_channels", mid_channels, 1)
        self.mid_channels = mid_channels
        count = len(in_channels)
        abfs = [ABF(c, mid_channels, t[0], fuse=i < count - 1)
                for i, (c, t) in enumerate(zip(in_channels, self.teacher_shapes))]
        self.abfs = nn.ModuleList(abfs[::-1])

    def forward(self, student_features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(student_features) != len(self.student_shapes):
            raise ValueError(
                f"ReviewKDFusion was built for {len(self.student_shapes)} student features, got {len(student_features)}"
            )
        features = []
        for i, (feature, shape) in enumerate(zip(student_features, self.student_shapes)):
            if feature.dim() == 2:
                feature = feature[:, :, None, None]
            if feature.dim() != 4 or tuple(feature.shape[1:]) != shape:
                raise ValueError(
                    f"student feature {i} must be (B, {', '.join(map(str, shape))}) as declared, "
                    f"got {tuple(feature.shape)}"
                )
            features.append(feature)
        results = []
        residual = None
        for feature, abf, shape in zip(features[::-1], self.abfs, self.teacher_shapes[::-1]):
            out, residual = abf(feature, residual, shape[1:])
            results.insert(0, out)
        return results


def pooled_layer(network: nn.Module) -> str:
    """The layer name of ``network``'s pooled penultimate feature: what its classifier receives (``fc:input``)."""
    return f"{classifier(network)[0]}:input"


class ReviewKD(FeatureDistillation):
    """ReviewKD: loss = CE (+ KD) + λ·min(epoch/warmup_epochs, 1)·hcl_loss(fusion(student features), teacher
    features).

    Chen et al., "Distilling Knowledge via Knowledge Review" (CVPR 2021): the student's features, shallowest first
    and its pooled vector last, go through the owned :class:`ReviewKDFusion` (:attr:`fusion`: a chain of ABFs,
    trained with the student, checkpointed, left out of export, sized in ``__init__`` from
    :meth:`feature_shapes`); each output is compared with the teacher feature of the same position by
    :func:`hcl_loss`. ``epoch`` counts from 1 as mdistiller (``current_epoch + 1``: 1/20 of λ in the first epoch;
    the original counts from 0). See the module docstring for the authors' choices.

    Layers (default): student — :func:`lightning_kd.models.stage_names` + the pooled vector (``<classifier>:input``,
    ``fc:input`` on the CIFAR ResNets/WRNs), cut to its last len(teacher layers) entries (mdistiller drops the
    student's surplus shallow entries the same way); teacher — :func:`lightning_kd.models.preact_names` + the pooled
    vector (mdistiller's ``preact_feats[1:] + [pooled_feat]``). The stage names give the authors' student features
    on the CIFAR ResNets (``layer1..3``) and the VGGs (``block1..4`` after the cut); on the WRNs the authors take the
    raw ``block1..3`` outputs (the last one before the final BN-ReLU, ``stage_names`` ends with ``relu``), on
    ShuffleV2 ``layer3`` (not the 1024-channel head ``relu2``) and on MobileNetV2 ``blocks.6`` (not ``conv2``): name
    those in the config (``configs/cifar100/reviewkd/wrn_40_2-wrn_16_2.yaml`` does). The teacher runs in eval mode
    (running statistics), as every teacher in this library and as mdistiller's ``Distiller.train`` keeps it.

    Args:
        beta: λ (mdistiller's default 1; the authors' per pair: resnet56→20 0.6, resnet110→32 1.0,
            resnet32x4→8x4 5.0, wrn_40_2→wrn_16_2 5.0, ShuffleV1 5.0, ShuffleV2 8.0).
        warmup_epochs: epochs over which λ ramps up linearly (20 on CIFAR, 1 on ImageNet); 0: no warm-up.
        mid_channels: C_mid of every ABF (default min(512, channels of the student's pooled vector)).
        **kwargs (Any): ``student_layers``/``teacher_layers`` (equal counts, the pooled vectors last: ``(C,)`` or
            ``(C, H, W)`` outputs), ``ce_weight``/``kd_weight``/``temperature`` (the authors': CE 1, no KD),
            ``image_size`` and the base arguments.
    """

    def __init__(
        self,
        beta: float = 1.0,
        warmup_epochs: int = 20,
        mid_channels: Optional[int] = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        check_range("beta", beta, 0.0, low_open=True)
        check_range("warmup_epochs", warmup_epochs, 0)
        if mid_channels is not None:
            check_range("mid_channels", mid_channels, 1)
        self.beta = beta
        self.warmup_epochs = warmup_epochs
        student, teacher = self.feature_shapes()
        pairs = [("student", self.student_layers, student), ("teacher", self.teacher_layers, teacher)]
        maps: dict[str, list[tuple[int, ...]]] = {}
        for who, names, shapes in pairs:
            maps[who] = []
            for name, shape in zip(names, shapes):
                if len(shape) == 1:
                    shape = (shape[0], 1, 1)  # the pooled vector
                if len(shape) != 3:
                    raise ValueError(
                        f"ReviewKD fuses (B, C, H, W) feature maps and (B, C) pooled vectors, but the {who} layer "
                        f"{name!r} outputs {shape}: name stage outputs and the pooled vector (e.g. 'fc:input')"
                    )
                maps[who].append(tuple(shape))
        self.fusion = ReviewKDFusion(maps["student"], maps["teacher"], mid_channels)

    def default_layers(self, network: nn.Module) -> list[str]:
        """Teacher: pre-activations + pooled vector; student: stage outputs + pooled vector, cut to the teacher's
        count (see the class docstring)."""
        if network is self.teacher:
            return preact_names(network) + [pooled_layer(network)]
        names = stage_names(network) + [pooled_layer(network)]
        try:
            count = len(preact_names(self.teacher)) + 1
        except ValueError:  # the teacher names its layers in the config
            return names
        return names[-min(len(names), count):]

    def warmup_factor(self) -> float:
        """min(epoch / warmup_epochs, 1) with epoch = ``current_epoch + 1`` (mdistiller's count from 1)."""
        if self.warmup_epochs == 0:
            return 1.0
        return min((self.current_epoch + 1) / self.warmup_epochs, 1.0)

    def loss_terms(self, step: Step) -> dict[str, torch.Tensor]:
        student, teacher = zip(*self.paired_features(step))
        teacher = [t[:, :, None, None] if t.dim() == 2 else t for t in teacher]
        hcl = hcl_loss(self.fusion(list(student)), teacher)
        return {**self.task_terms(step), "reviewkd": self.beta * self.warmup_factor() * hcl}
