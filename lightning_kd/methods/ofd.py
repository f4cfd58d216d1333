"""Heo, Kim, Yun, Park, Kwak & Choi, "A Comprehensive Overhaul of Feature Distillation" (ICCV 2019,
arXiv 1904.01866).

OFD distils features *before* the ReLU that ends each stage. The student's pre-ReLU feature goes through a
connector r (1×1 conv + BN) and is compared with the teacher's pre-ReLU feature T passed through a *margin ReLU*
σ_m(T) = max(T, m), m < 0 per channel the expected value of the teacher's negative responses. The distance is the
*partial L2*: a position contributes (σ_m(T) − r(S))² unless both the student is already below the target and the
target is non-positive (S ≤ σ_m(T) ≤ 0), since the ReLU after either erases such differences (Sec. 3 of the paper;
the margin is m_c = E[x | x < 0] for the teacher's pre-ReLU response x of channel c).

What this file holds: :func:`ofd_margin` (m from a BatchNorm's affine parameters), :func:`ofd_loss` (one layer's
partial L2 with the margin ReLU), :func:`ofd_stage_weights` (the per-layer factors), :class:`OFDConnector` (the
student-side conv + BN head), :func:`producing_batchnorm` (the teacher BN whose output a pre-ReLU layer is) and
:class:`OFD`, the method's module.

Choices — the authors' CIFAR code (clovaai/overhaul-distillation ``CIFAR-100/distiller.py`` and
``train_with_distillation.py``) as ported by mdistiller (``mdistiller/distillers/OFD.py``, ``engine/cfg.py``,
``configs/cifar100/ofd.yaml``), whose setting we follow:

- Margin from the teacher's BatchNorm: x_c is taken as Gaussian with mean β_c and standard deviation |γ_c| (the BN's
  bias and weight: the BN output before the ReLU), so m_c = β_c − |γ_c|·φ(β_c/|γ_c|)/Φ(−β_c/|γ_c|); when
  Φ(−β_c/|γ_c|) ≤ 0.001 (almost no negative mass) m_c = −3|γ_c|. For ResNets the BN is the last block's last BN of
  the stage (its pre-ReLU output is that BN's output *plus the shortcut*; the margin ignores the shortcut, as
  theirs). Computed in float64 (theirs: Python floats, then a float32 tensor); we return the BN weight's dtype.
- Loss per layer: Σ over (C, H, W) of the partial L2, averaged over the batch (mdistiller's
  ``abs(loss).mean(dim=0).sum()``; the original sums over everything and divides by the batch size: the same).
  mdistiller first adaptive-average-pools the teacher map to the student's spatial size (a no-op on the CIFAR
  pairs); so does :func:`ofd_loss`.
- Layer i of n (0 = shallowest) is weighted 1/2^(n−1−i): the deepest 1, the one before 1/2, … (both codes).
- Total: CE + 1e-3·Σ_i w_i·loss_i on CIFAR (original: ``loss_distill.sum() / batch_size / 1000``; mdistiller
  ``FEAT_WEIGHT 0.001``), 1e-4 on ImageNet. No KD term.
- Connector: conv k×k (k = 1) C_s → C_t without bias, then BN(C_t); conv weights ~ N(0, 2/(k·k·C_t)), BN weight 1,
  bias 0 (both codes). One per distilled layer, no ReLU after its BN.
- Teacher mode: both codes run the teacher in *training* mode during distillation (original:
  ``d_net.t_net.train()``; mdistiller's ``OFD.train`` overrides the base class that would put the teacher in eval),
  so the teacher's pre-ReLU features are computed with batch statistics (and its BN running statistics move,
  without use). The margins depend only on the teacher's BN affine parameters, which do not change. A module that
  keeps the teacher in eval mode (this library's rule) computes the teacher features with running statistics
  instead: state it where it is wired.

Layers (mdistiller's ``preact_feats[1:]`` for the teacher, the student's likewise, and
``get_bn_before_relu()`` for the margins; lists aligned on their *last* entries when their lengths differ):

- resnet8x4/32x4, resnet20/32/56/110 (post-activation ResNets): the output of each of the three stages before its
  final ReLU (last block's ``bn2`` output + shortcut), margins from ``layer{1,2,3}[-1].bn2``; channels:
  resnet32x4 (64, 128, 256) at 32/16/8 px ← resnet8x4 (64, 128, 256); resnet56/110 (16, 32, 64) ← resnet20/32
  (16, 32, 64).
- wrn_40_2 → wrn_16_2 / wrn_40_1 (pre-activation WRNs): the BN that opens the next stage applied to the stage
  output — ``block2.layer[0].bn1(f1)``, ``block3.layer[0].bn1(f2)`` and the final ``bn1(f3)`` — with the margins
  from those same BNs; channels wrn_40_2 (32, 64, 128) ← wrn_16_2 (32, 64, 128) / wrn_40_1 (16, 32, 64).
  (mdistiller calls these BNs a second time on the stage outputs, so in training mode their running statistics
  move twice per step.)
- vgg13 → vgg8: ``block1..4`` outputs (each block ends with a BN, its ReLU applied outside), margins from those
  BNs; channels (128, 256, 512, 512) at 16/8/4/4 px.
- resnet32x4 → ShuffleV2: the teacher's three stages (64, 128, 256) at 32/16/8 px, pooled to the student's
  pre-ReLU stage outputs (116, 232, 464) at 16/8/4 px (connectors 116→64, 232→128, 464→256).
- mdistiller's OFD does not run as shipped with a ResNet50 teacher (3 stage channels after ``[1:]`` but 4 BNs and
  4 pre-ReLU features: connectors, margins and features misalign), a MobileNetV2 student (no ``preact_feats``), a
  ShuffleV1 student (no ``get_stage_channels``) or a ShuffleNet teacher (``get_bn_before_relu`` raises); there,
  pick each distilled stage's pre-ReLU output and the BN that produces it the same way.

Hyper-parameters (mdistiller CIFAR-100): CE 1, feat 1e-3, connector kernel 1; SGD 0.9, wd 5e-4, batch 64, lr 0.05,
×0.1 at 150/180/210, 240 epochs (the original CIFAR code: WRN/PyramidNet pairs, batch 128, lr 0.1, Nesterov,
200 epochs, ×0.1 at 100 and 150).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lightning_kd.core import Step, check_range
from lightning_kd.methods.feature_distillation import FeatureDistillation
from lightning_kd.models import preact_names

#: Below this probability of a negative response the margin falls back to −3σ (the authors' threshold).
NEGATIVE_MASS_THRESHOLD = 0.001


def ofd_margin(bn_weight: torch.Tensor, bn_bias: torch.Tensor) -> torch.Tensor:
    """Per-channel margin m = E[x | x < 0] for x ~ N(β, γ²): β − |γ|·φ(β/|γ|)/Φ(−β/|γ|), or −3|γ| where
    Φ(−β/|γ|) ≤ 0.001 (Sec. 3; the authors' ``get_margin_from_BN``).

    Args:
        bn_weight: γ, the teacher BatchNorm's weight (C,).
        bn_bias: β, its bias (C,).

    Returns:
        (C,) margins, computed in float64, in ``bn_weight``'s dtype; all ≤ 0.
    """
    if bn_weight.dim() != 1 or bn_weight.shape != bn_bias.shape:
        raise ValueError(
            f"ofd_margin needs the BatchNorm weight and bias as two (C,) tensors, got {tuple(bn_weight.shape)} and "
            f"{tuple(bn_bias.shape)}"
        )
    s = bn_weight.detach().double().abs()
    m = bn_bias.detach().double()
    negative_mass = torch.special.ndtr(-m / s)
    conditional = -s * torch.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi) / negative_mass + m
    margin = torch.where(negative_mass > NEGATIVE_MASS_THRESHOLD, conditional, -3 * s)
    return margin.to(bn_weight.dtype)


def margin_from_batchnorm(bn: nn.BatchNorm2d) -> torch.Tensor:
    """:func:`ofd_margin` of a BatchNorm module's affine parameters."""
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.weight is None or bn.bias is None:
        raise ValueError(f"margin_from_batchnorm needs an affine BatchNorm module, got {type(bn).__name__}")
    return ofd_margin(bn.weight, bn.bias)


def ofd_loss(student: torch.Tensor, teacher: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """Partial L2 between the connector output S and the margin-ReLU'd teacher max(T, m), summed over (C, H, W)
    and averaged over the batch (Sec. 3):

        d = (S − m)²  where S > m and T ≤ m,
            (S − T)²  where S > T and m < T ≤ 0,
            (S − T)²  where T > 0,
            0         elsewhere (S ≤ max(T, m) ≤ 0).

    Args:
        student: r(S), the connector's output, (B, C, H, W).
        teacher: T, the teacher's pre-ReLU feature (B, C, H', W'); adaptive-average-pooled to (H, W) (no-op when
            equal). Not differentiated (detach it or not).
        margin: m, (C,) from :func:`ofd_margin`.
    """
    if student.dim() != 4 or teacher.dim() != 4 or student.shape[:2] != teacher.shape[:2]:
        raise ValueError(
            f"ofd_loss needs (B, C, H, W) student and teacher maps with the same B and C, got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    if margin.shape != (student.shape[1],):
        raise ValueError(
            f"ofd_loss needs one margin per channel, shape ({student.shape[1]},), got {tuple(margin.shape)}"
        )
    teacher = F.adaptive_avg_pool2d(teacher, student.shape[-2:]).detach()
    margin = margin.to(student).view(1, -1, 1, 1)
    loss = (
        (student - margin) ** 2 * ((student > margin) & (teacher <= margin)).to(student.dtype)
        + (student - teacher) ** 2 * ((student > teacher) & (teacher > margin) & (teacher <= 0)).to(student.dtype)
        + (student - teacher) ** 2 * (teacher > 0).to(student.dtype)
    )
    return loss.mean(dim=0).sum()


def ofd_stage_weights(num_layers: int) -> list[float]:
    """The per-layer factors 1/2^(n−1−i), shallowest first: [..., 1/4, 1/2, 1]."""
    check_range("num_layers", num_layers, 1)
    return [1.0 / 2 ** (num_layers - 1 - i) for i in range(num_layers)]


class OFDConnector(nn.Module):
    """Student-side transform r: conv k×k (C_s → C_t, no bias) then BatchNorm(C_t), initialised as the authors'.

    Args:
        student_channels: C_s.
        teacher_channels: C_t.
        kernel_size: k (1; odd, padded to keep H and W).
    """

    def __init__(self, student_channels: int, teacher_channels: int, kernel_size: int = 1) -> None:
        super().__init__()
        check_range("student_channels", student_channels, 1)
        check_range("teacher_channels", teacher_channels, 1)
        check_range("kernel_size", kernel_size, 1)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd so the map keeps its size, got {kernel_size}")
        self.conv = nn.Conv2d(student_channels, teacher_channels, kernel_size=kernel_size, stride=1,
                              padding=(kernel_size - 1) // 2, bias=False)
        self.bn = nn.BatchNorm2d(teacher_channels)
        fan = kernel_size * kernel_size * teacher_channels
        with torch.no_grad():
            self.conv.weight.normal_(0, math.sqrt(2.0 / fan))
            self.bn.weight.fill_(1)
            self.bn.bias.zero_()

    def forward(self, student_features: torch.Tensor) -> torch.Tensor:
        if student_features.dim() != 4 or student_features.shape[1] != self.conv.in_channels:
            raise ValueError(
                f"OFDConnector expects a (B, {self.conv.in_channels}, H, W) student feature, got "
                f"{tuple(student_features.shape)}"
            )
        return self.bn(self.conv(student_features))


def _is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def producing_batchnorm(network: nn.Module, layer: str) -> str:
    """Module path of the BatchNorm of ``network`` whose output the pre-ReLU layer ``layer`` is (the BN OFD's
    margin is computed from: mdistiller's ``get_bn_before_relu``).

    The rule, which gives mdistiller's BNs on every zoo family that has them:

    - ``layer`` is a BatchNorm: that BN (WRNs: ``block2.layer.0.bn1``, ``block3.layer.0.bn1``, ``bn1``; VGGs: the
      last BN of ``block1..4``).
    - ``layer`` holds BatchNorms (a container, e.g. MobileNetV2's ``blocks.K``): the last one registered in it
      (``blocks.K.<last>.conv.7``, the linear bottleneck's projection BN).
    - ``layer`` is a parameter-free hook point (the zoo's ``preact`` identity on a residual sum): the last
      BatchNorm among its parent block's direct children (CIFAR ResNets' BasicBlock ``bn2``; the Bottleneck's and
      ShuffleV1's ``bn3``), which produces the residual branch; the shortcut is ignored, as the authors do.

    Raises one ``ValueError`` where no BN is found (a ``:input`` layer, a layer at the top of the network, a block
    without direct BatchNorm children); the caller checks the BN's width against the layer's channels (ShuffleV2's
    ``preact`` concatenates a pass-through half with its BN's output: no single BN produces it).
    """
    modules = dict(network.named_modules())
    if layer not in modules:
        raise ValueError(
            f"OFD looks for the BatchNorm producing the teacher layer {layer!r}, but {type(network).__name__} has no "
            "such module; name the BN modules in model.teacher_bn_layers"
        )
    module = modules[layer]
    if _is_batchnorm(module):
        return layer
    inner = [name for name, m in module.named_modules() if _is_batchnorm(m)]
    if inner:
        return f"{layer}.{inner[-1]}"
    if next(module.parameters(), None) is None and "." in layer:
        parent_name = layer.rsplit(".", 1)[0]
        children = [name for name, m in modules[parent_name].named_children() if _is_batchnorm(m)]
        if children:
            return f"{parent_name}.{children[-1]}"
    raise ValueError(
        f"OFD cannot find the BatchNorm that produces the teacher layer {layer!r} of {type(network).__name__} (the "
        "layer is no BatchNorm, holds none, and is not a parameter-free hook point in a block with BatchNorm "
        "children); name one BN module path per teacher layer in model.teacher_bn_layers"
    )


class OFD(FeatureDistillation):
    """OFD: loss = CE (+ KD) + beta·Σ_i w_i·ofd_loss(r_i(S_i), T_i, m_i) over the pre-ReLU stage outputs.

    Heo et al., "A Comprehensive Overhaul of Feature Distillation" (ICCV 2019): every student pre-ReLU feature S_i
    goes through an owned connector r_i (:class:`OFDConnector`, 1×1 conv + BN, in :attr:`connectors`, an
    ``nn.ModuleList`` trained with the student, checkpointed, left out of export) and is compared with the teacher's
    pre-ReLU feature T_i by :func:`ofd_loss` (partial L2 against the margin ReLU max(T_i, m_i)); layer i of n is
    weighted w_i = 1/2^(n−1−i) (:func:`ofd_stage_weights`). See the module docstring for the authors' choices.

    Layers: by default :func:`lightning_kd.models.preact_names` of each network, which is mdistiller's
    ``preact_feats[1:]`` (its entry 0, the stem, is not among the zoo's ``preact_names``); where the two lists
    differ in length they are aligned on their last entries, as mdistiller's ``_align_list`` (e.g. a VGG teacher's
    four against a ShuffleNet's three: the teacher's last three). Named layers must output (C, H, W) maps
    pre-ReLU; a teacher map of another spatial size is adaptive-average-pooled to the student's.

    Margins: m_i = :func:`margin_from_batchnorm` of the teacher BN producing T_i, computed once in ``__init__``
    from the loaded teacher (its affine parameters are frozen, so they never change) and registered as buffers
    ``margin_0``, ``margin_1``, ... (checkpointed, moved with the module; :attr:`margins` lists them). The BN is
    found by :func:`producing_batchnorm` — CIFAR ResNets (resnet8..110, resnet8x4/32x4): the last block's ``bn2``;
    ResNet50-style Bottleneck and ShuffleV1: ``bn3``; WRNs and VGGs: the pre-activation layer is the BN itself;
    MobileNetV2: the last block's projection BN — or named by ``teacher_bn_layers``; a BN whose width is not the
    layer's channel count (ShuffleV2 teachers, ShuffleV1's concatenating units) is one clear error asking for
    ``teacher_bn_layers``.

    Teacher mode — a difference from the authors: their code (original and mdistiller) runs the teacher in
    *training* mode during distillation, so its pre-ReLU features use batch statistics (and its BN running
    statistics move, unused). This library keeps every teacher in eval mode (its BatchNorm statistics never move),
    so here the teacher's features use its running statistics. The margins are the same either way.

    Args:
        beta: weight of the summed OFD terms (mdistiller CIFAR-100: 1e-3; ImageNet 1e-4).
        connector_kernel_size: k of the connectors' k×k convolution (odd; the authors': 1).
        teacher_bn_layers: module paths of the teacher BatchNorms whose outputs the teacher layers are, one per
            teacher layer, in order; default: found by :func:`producing_batchnorm`.
        **kwargs (Any): ``student_layers``/``teacher_layers`` (equal counts), ``ce_weight``/``kd_weight``/``temperature``
            (mdistiller: CE 1, no KD), ``image_size`` and the base arguments.
    """

    def __init__(
        self,
        beta: float = 1e-3,
        connector_kernel_size: int = 1,
        teacher_bn_layers: Optional[list[str]] = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        check_range("beta", beta, 0.0, low_open=True)
        check_range("connector_kernel_size", connector_kernel_size, 1)
        if connector_kernel_size % 2 == 0:
            raise ValueError(
                f"connector_kernel_size must be odd so the map keeps its size, got {connector_kernel_size}"
            )
        self.beta = beta
        self.connector_kernel_size = connector_kernel_size
        student, teacher = self.feature_map_shapes(
            "distils (B, C, H, W) pre-ReLU feature maps", "convolutional pre-activation layers"
        )
        if teacher_bn_layers is None:
            teacher_bn_layers = [producing_batchnorm(self.teacher, name) for name in self.teacher_layers]
        teacher_bn_layers = list(teacher_bn_layers)
        if len(teacher_bn_layers) != len(self.teacher_layers):
            raise ValueError(
                f"OFD needs one teacher BatchNorm per teacher layer: got {len(teacher_bn_layers)} teacher_bn_layers "
                f"{teacher_bn_layers} for {len(self.teacher_layers)} teacher layers {self.teacher_layers}"
            )
        self.teacher_bn_layers = teacher_bn_layers
        modules = dict(self.teacher.named_modules())
        for i, (layer, bn_name, shape) in enumerate(zip(self.teacher_layers, teacher_bn_layers, teacher)):
            bn = modules.get(bn_name)
            if bn is None or not _is_batchnorm(bn) or bn.weight is None or bn.bias is None:
                raise ValueError(
                    f"OFD computes the margin of teacher layer {layer!r} from the BatchNorm {bn_name!r}, but "
                    f"{type(self.teacher).__name__} has no affine BatchNorm at that path: name one in "
                    "model.teacher_bn_layers"
                )
            if bn.num_features != shape[0]:
                raise ValueError(
                    f"OFD computes the margin of teacher layer {layer!r} ({shape[0]} channels) from the BatchNorm "
                    f"{bn_name!r}, which has {bn.num_features}: no single BN produces this layer. Name a teacher "
                    "layer that a BN outputs (with its BN in model.teacher_bn_layers)"
                )
            self.register_buffer(f"margin_{i}", margin_from_batchnorm(bn).detach().clone())
        self.connectors = nn.ModuleList(
            OFDConnector(s[0], t[0], kernel_size=connector_kernel_size) for s, t in zip(student, teacher)
        )

    def default_layers(self, network: nn.Module) -> list[str]:
        """:func:`lightning_kd.models.preact_names` of ``network``, aligned with the other network's on the last
        entries when their counts differ (mdistiller's ``_align_list``)."""
        names = preact_names(network)
        other = self.teacher if network is self.student else self.student
        try:
            count = len(preact_names(other))
        except ValueError:  # the other network names its layers in the config
            return names
        return names[-min(len(names), count):]

    @property
    def margins(self) -> list[torch.Tensor]:
        """The per-layer margins m_i, (C_i,) each, in pair order."""
        return [getattr(self, f"margin_{i}") for i in range(len(self.teacher_layers))]

    def loss_terms(self, step: Step) -> dict[str, torch.Tensor]:
        pairs = self.paired_features(step)
        weights = ofd_stage_weights(len(pairs))
        ofd = sum(
            w * ofd_loss(connector(s), t, m)
            for w, connector, (s, t), m in zip(weights, self.connectors, pairs, self.margins)
        )
        return {**self.task_terms(step), "ofd": self.beta * ofd}
