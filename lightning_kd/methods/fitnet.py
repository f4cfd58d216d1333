"""Romero, Ballas, Kahou, Chassang, Gatta & Bengio, "FitNets: Hints for Thin Deep Nets" (ICLR 2015,
arXiv 1412.6550).

A *hint* (a teacher layer's output) guides a student layer through a regressor r that maps the student's
feature to the teacher's shape; the hint loss is L_HT = ½‖u_h(x) − r(v_g(x))‖², u_h the hint and v_g the
guided student layer.

Choices (RepDistiller, HobbitLong/RepDistiller ``distiller_zoo/FitNet.py``, ``models/util.py`` ``ConvReg``,
``train_student.py``, ``helper/loops.py``, which produced the CIFAR-100 "FitNet" row of its table):

- :func:`fitnet_loss` is the mean squared difference over all entries (``nn.MSELoss``), not the paper's half
  sum of squares; the weight β absorbs the factor.
- Regressor :class:`ConvReg`: one convolution + BatchNorm + ReLU, chosen by the spatial sizes: a 3×3 stride-2
  convolution when the student map is twice the teacher's height, a 4×4 stride-2 transposed convolution when
  it is half, otherwise a valid convolution of kernel (1 + H_s − H_t, 1 + W_s − W_t) (1×1 for equal sizes).
  The paper's regressor is a convolution with the teacher's non-linearity (ReLU) and no BatchNorm.
- One stage: loss = CE + β·fitnet_loss(ConvReg(student hint layer), teacher hint layer), regressor and student
  trained together from the start (same SGD, lr, weight decay), with β = 100, no KD term (``-a 0``), CE
  weight 1. The paper's two stages (first the student up to the guided layer plus the regressor on the hint
  loss alone, then the whole student with KD) are not what RepDistiller ran; ``--init_epochs`` is not used
  for FitNet there. The paper's reading is :class:`FitNet` with ``hint_epochs`` > 0 (and ``kd_weight`` for
  its KD stage).
- Layer: ``--hint_layer 2``, the third entry of the ``is_feat`` list [stem, stage 1, stage 2, stage 3, pooled],
  i.e. the output of the second stage (post-activation) in both networks: ``layer2`` of the CIFAR ResNets,
  ShuffleNets and ResNet50, ``block2`` of the WRNs, ``relu(block2)`` of the VGGs (``block2`` here),
  ``blocks.2`` of MobileNetV2. The regressor is built from the two layers' output shapes (C, H, W).
- Differences from RepDistiller's code here: a size pair ConvReg cannot map (teacher map more than twice
  the student's, or a student narrower than the teacher in one dimension) is one ``ValueError`` at
  construction (RepDistiller raises a ``TypeError`` from ``raise NotImplemented(...)``, or fails later), and
  so is any pair whose regressed output would not have the teacher's (C, H, W) (RepDistiller checks only
  heights). Identical modules for every pair RepDistiller accepts with matching output.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lightning_kd.core import Stage, Step, check_range
from lightning_kd.methods.feature_distillation import FeatureDistillation
from lightning_kd.models import stage_names


def feature_shape(name: str, shape: Sequence[int]) -> tuple[int, int, int]:
    """``shape`` as a (C, H, W) tuple of positive ints (a layer's output shape without the batch), or one
    clear ``ValueError``."""
    values = tuple(shape)
    if len(values) != 3 or any(int(v) != v or v < 1 for v in values):
        raise ValueError(f"{name} must be a feature map shape (C, H, W) of positive ints, got {values}")
    return int(values[0]), int(values[1]), int(values[2])


def fitnet_loss(student_hint: torch.Tensor, teacher_hint: torch.Tensor) -> torch.Tensor:
    """mean((r(v_g) − u_h)²) over every entry: the paper's hint loss L_HT, averaged instead of ½-summed.

    ``student_hint`` is the regressed student feature r(v_g(x)) (:class:`ConvReg` output), ``teacher_hint``
    the teacher's hint layer u_h(x); both must have the same shape.
    """
    if student_hint.shape != teacher_hint.shape:
        raise ValueError(
            "fitnet_loss compares the regressed student hint with the teacher's hint entry by entry, so their "
            f"shapes must be equal, got {tuple(student_hint.shape)} and {tuple(teacher_hint.shape)}"
        )
    return F.mse_loss(student_hint, teacher_hint)


class ConvReg(nn.Module):
    """Convolutional regressor from a student feature map (C_s, H_s, W_s) to a teacher's (C_t, H_t, W_t).

    The convolution is picked by the heights, as RepDistiller's ``ConvReg``:

    - H_s = 2·H_t: 3×3 convolution, stride 2, padding 1 (halves the map);
    - 2·H_s = H_t: 4×4 transposed convolution, stride 2, padding 1 (doubles it);
    - otherwise, H_s ≥ H_t and W_s ≥ W_t: valid convolution of kernel (1 + H_s − H_t, 1 + W_s − W_t)
      (1×1 for equal sizes);

    then BatchNorm over C_t and, with ``use_relu``, a ReLU (FitNet's regressor; AB's connector has none).
    Parameter names (``conv``, ``bn``) are RepDistiller's, so its state dicts load.

    Args:
        student_shape: (C, H, W) of the guided student layer's output.
        teacher_shape: (C, H, W) of the teacher's hint layer's output.
        use_relu: end with a ReLU (RepDistiller's FitNet: yes).
    """

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int], use_relu: bool = True) -> None:
        super().__init__()
        s_c, s_h, s_w = feature_shape("student_shape", student_shape)
        t_c, t_h, t_w = feature_shape("teacher_shape", teacher_shape)
        if s_h == 2 * t_h:
            self.conv: nn.Module = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
            out = ((s_h - 1) // 2 + 1, (s_w - 1) // 2 + 1)
        elif 2 * s_h == t_h:
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
            out = (2 * s_h, 2 * s_w)
        elif s_h >= t_h and s_w >= t_w:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
            out = (t_h, t_w)
        else:
            raise ValueError(
                f"ConvReg maps a student map of {s_h}x{s_w} to a teacher map of {t_h}x{t_w} only when the student "
                "is twice, half or at least as large in both dimensions: pick layers of closer sizes"
            )
        if out != (t_h, t_w):
            raise ValueError(
                f"ConvReg from student shape {(s_c, s_h, s_w)} would output {(t_c, *out)}, not the teacher's "
                f"{(t_c, t_h, t_w)}: pick layers whose heights and widths scale alike"
            )
        self.bn = nn.BatchNorm2d(t_c)
        self.relu = nn.ReLU(inplace=True)
        self.use_relu = use_relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return self.relu(x) if self.use_relu else x


class FitNet(FeatureDistillation):
    """FitNets: loss = CE (+ KD) + β·fitnet_loss(ConvReg(student layer), teacher hint layer).

    The regressor (:class:`ConvReg`, owned: trained, checkpointed, left out of export) is sized in ``__init__``
    from the two layers' shapes. ``hint_epochs`` > 0 adds the paper's first stage: that many epochs of the hint
    term alone (the student up to its guided layer and the regressor learn; the layers after it get no
    gradient) at the optimizer's constant learning rate, then a fresh optimizer and the full schedule.

    Args:
        beta: weight β of the hint term (RepDistiller: 100).
        hint_epochs: epochs of the hint stage (RepDistiller: 0, one stage; the paper: a first stage).
        **kwargs (Any): one layer each in ``student_layers``/``teacher_layers`` (default: the middle stage, RepDistiller's
            ``hint_layer 2`` on the CIFAR ResNets, WRNs and VGGs), ``ce_weight``/``kd_weight``/``temperature``,
            ``image_size`` (:class:`~lightning_kd.methods.feature_distillation.FeatureDistillation`) and the base
            arguments.
    """

    def __init__(self, beta: float = 100.0, hint_epochs: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        check_range("beta", beta, 0.0)
        check_range("hint_epochs", hint_epochs, 0)
        if len(self.student_layers) != 1:
            raise ValueError(f"FitNet guides one student layer by one teacher layer, got {self.student_layers}")
        self.beta = beta
        self.hint_epochs = hint_epochs
        (student_shape,), (teacher_shape,) = self.feature_shapes()
        self.regressor = ConvReg(student_shape, teacher_shape)

    def default_layers(self, network: nn.Module) -> list[str]:
        names = stage_names(network)
        return [names[len(names) // 2]]

    def training_stages(self) -> list[Stage]:
        return [Stage("hint", epochs=self.hint_epochs, constant_lr=True), Stage("distill")]

    def loss_terms(self, step: Step) -> dict[str, torch.Tensor]:
        ((student, teacher),) = self.paired_features(step)
        hint = self.beta * fitnet_loss(self.regressor(student), teacher)
        return {"hint": hint} if self.stage.name == "hint" else {**self.task_terms(step), "hint": hint}
