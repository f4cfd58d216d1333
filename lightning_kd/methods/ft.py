"""Kim, Park & Kwak, "Paraphrasing Complex Network: Network Compression via Factor Transfer" (NeurIPS 2018,
arXiv 1802.04977).

A *paraphraser* (a convolutional auto-encoder, trained unsupervised to reconstruct a teacher feature map,
L_rec = ‖x − P(x)‖²) compresses the map into a *teacher factor* F_T with k·C channels (paraphrase rate k);
a *translator* on the student turns the student's map into a *student factor* F_S; the factor-transfer loss
is L_FT = ‖F_T/‖F_T‖₂ − F_S/‖F_S‖₂‖_p with p = 1, the factors vectorised.

Choices (RepDistiller, HobbitLong/RepDistiller ``distiller_zoo/FT.py``, ``models/util.py`` ``Paraphraser``
and ``Translator``, ``helper/pretrain.py``, ``train_student.py``, ``helper/loops.py``, which produced the
CIFAR-100 "FT" row of its table):

- The factor is not vectorised whole: :func:`ft_factor` takes the mean over channels of the squared factor,
  flattens the H·W positions and L2-normalises them (an attention map of the factor, as in AT);
  :func:`ft_loss` is the mean of |difference|^p over batch and positions (p = 1) instead of a norm. When
  the factors' spatial sizes differ, the larger is adaptive-average-pooled to the smaller first (per
  dimension here; RepDistiller compares heights only and pools to a square: the same for square maps).
- :class:`Paraphraser`: three 3×3 convolutions (C → C → kC → kC) then three 3×3 transposed convolutions
  (kC → kC → C → C), each followed by LeakyReLU(0.1), no BatchNorm; k = 0.5. :class:`Translator`: three 3×3
  convolutions (C_s → C_s → kC_t → kC_t), each + BatchNorm + LeakyReLU(0.1). All keep the spatial size.
  :func:`paraphraser_loss` is the mean squared reconstruction error (``nn.MSELoss``), not a sum.
- Layer: the last feature map before global pooling (entry −2 of the ``is_feat`` list) in both networks:
  ``layer3`` of the CIFAR ResNets and ShuffleNets, ``layer4`` of ResNet50, ``block4`` of the VGGs,
  ``block3`` of the WRNs (its raw output, before the final BN-ReLU: not this library's last stage
  ``relu``), ``blocks.6`` of MobileNetV2 (before ``conv2``). Paraphraser from the teacher's channels,
  translator from the student's and the teacher's.
- Two stages. Stage 1 (``--init_epochs 30``): the paraphraser alone learns to reconstruct the teacher's map
  (MSE); SGD lr 0.01 when the student is a CIFAR ResNet or WRN (RepDistiller keys this on the student's
  name), else the run's base lr (0.05; 0.01 for MobileNetV2/ShuffleNets), momentum 0.9, weight decay 5e-4,
  no lr decay; student and teacher untouched. Stage 2: the full 240-epoch schedule restarted with
  loss = CE + β·ft_loss(translator(student map), paraphraser encoder(teacher map)), β = 200, no KD (``-a 0``);
  the paraphraser is frozen (eval mode, not optimised), the translator trains with the student.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lightning_kd.core import Stage, Step, check_range, evaluation_mode
from lightning_kd.core.features import pool_to_smallest
from lightning_kd.methods.feature_distillation import FeatureDistillation
from lightning_kd.models import stage_names


def ft_factor(factor: torch.Tensor) -> torch.Tensor:
    """L2-normalised (over positions) channel mean of factor², flattened: (B, C, H, W) → (B, H·W)."""
    return F.normalize(factor.pow(2).mean(1).flatten(1), dim=1)


def ft_loss(factor_s: torch.Tensor, factor_t: torch.Tensor, p: float = 1.0) -> torch.Tensor:
    """mean(|ft_factor(F_S) − ft_factor(F_T)|^p) over batch and positions: RepDistiller's form of L_FT.

    ``factor_s`` is the translator's output, ``factor_t`` the paraphraser encoder's on the teacher's map, both
    (B, C, H, W); channel counts may differ, and unequal spatial sizes are pooled to the smaller. RepDistiller
    writes |·| only for p = 1 (``pow(p)`` otherwise): the same for p = 1 and every even p.
    """
    check_range("p", p, 0.0, low_open=True)
    if factor_s.dim() != 4 or factor_t.dim() != 4 or factor_s.shape[0] != factor_t.shape[0]:
        raise ValueError(
            "ft_loss needs (B, C, H, W) student and teacher factors of one batch, got shapes "
            f"{tuple(factor_s.shape)} and {tuple(factor_t.shape)}"
        )
    factor_s, factor_t = pool_to_smallest(factor_s, factor_t)
    return (ft_factor(factor_s) - ft_factor(factor_t)).abs().pow(p).mean()


def paraphraser_loss(reconstruction: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """mean((P(x) − x)²): the paraphraser's reconstruction loss L_rec of stage 1, averaged instead of summed."""
    if reconstruction.shape != features.shape:
        raise ValueError(
            "paraphraser_loss compares the reconstruction with the teacher's map entry by entry, so their shapes "
            f"must be equal, got {tuple(reconstruction.shape)} and {tuple(features.shape)}"
        )
    return F.mse_loss(reconstruction, features)


def _factor_channels(name: str, channels: int, rate: float) -> int:
    """int(rate·channels), the factor's channel count, or one clear ``ValueError``."""
    check_range("rate", rate, 0.0, low_open=True)
    if int(channels) != channels or channels < 1:
        raise ValueError(f"{name} must be a positive int, got {channels}")
    factor_channels = int(channels * rate)
    if factor_channels < 1:
        raise ValueError(f"a factor of rate {rate} of {channels} channels has int({channels}·{rate}) = 0 channels")
    return factor_channels


def _conv_stage(
    conv: type[nn.Module], in_channels: int, out_channels: int, use_bn: bool
) -> list[nn.Module]:
    """3×3 (transposed) convolution, stride 1, padding 1 - BatchNorm (or nothing) - LeakyReLU(0.1)."""
    return [
        conv(in_channels, out_channels, 3, 1, 1),
        nn.BatchNorm2d(out_channels) if use_bn else nn.Identity(),
        nn.LeakyReLU(0.1),
    ]


class Paraphraser(nn.Module):
    """Auto-encoder of a teacher map: ``encoder`` (C → C → kC → kC) gives the teacher factor, ``decoder``
    (kC → kC → C → C) the reconstruction; 3×3 kernels, spatial size kept. Module indices are RepDistiller's,
    so its state dicts load.

    Args:
        channels: C, the teacher map's channels.
        rate: paraphrase rate k (factor channels int(k·C); paper and RepDistiller: 0.5).
        use_bn: BatchNorm after each convolution (RepDistiller: no).
    """

    def __init__(self, channels: int, rate: float = 0.5, use_bn: bool = False) -> None:
        super().__init__()
        factor = _factor_channels("channels", channels, rate)
        self.encoder = nn.Sequential(
            *_conv_stage(nn.Conv2d, channels, channels, use_bn),
            *_conv_stage(nn.Conv2d, channels, factor, use_bn),
            *_conv_stage(nn.Conv2d, factor, factor, use_bn),
        )
        self.decoder = nn.Sequential(
            *_conv_stage(nn.ConvTranspose2d, factor, factor, use_bn),
            *_conv_stage(nn.ConvTranspose2d, factor, channels, use_bn),
            *_conv_stage(nn.ConvTranspose2d, channels, channels, use_bn),
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher factor of a (B, C, H, W) map, (B, kC, H, W)."""
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(factor, reconstruction) of a (B, C, H, W) map."""
        factor = self.encoder(x)
        return factor, self.decoder(factor)


class Translator(nn.Module):
    """The student's factor from its map: three 3×3 convolutions C_s → C_s → kC_t → kC_t, each + BN +
    LeakyReLU(0.1), spatial size kept. Module indices are RepDistiller's, so its state dicts load.

    Args:
        student_channels: C_s, the student map's channels.
        teacher_channels: C_t, the teacher map's channels (the factor has int(k·C_t), as the paraphraser's).
        rate: paraphrase rate k (RepDistiller: 0.5).
        use_bn: BatchNorm after each convolution (RepDistiller: yes).
    """

    def __init__(self, student_channels: int, teacher_channels: int, rate: float = 0.5, use_bn: bool = True) -> None:
        super().__init__()
        factor = _factor_channels("teacher_channels", teacher_channels, rate)
        if int(student_channels) != student_channels or student_channels < 1:
            raise ValueError(f"student_channels must be a positive int, got {student_channels}")
        self.encoder = nn.Sequential(
            *_conv_stage(nn.Conv2d, student_channels, student_channels, use_bn),
            *_conv_stage(nn.Conv2d, student_channels, factor, use_bn),
            *_conv_stage(nn.Conv2d, factor, factor, use_bn),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


class FT(FeatureDistillation):
    """Factor transfer in two stages, as RepDistiller runs it.

    - Stage ``paraphrase`` (``paraphrase_epochs``, RepDistiller's ``--init_epochs 30``): the
      :class:`Paraphraser` alone learns to reconstruct the teacher's map, loss = paraphraser_loss(P(t), t)
      (the paper's L_rec, as a mean; logged ``train/loss_reconstruction``), with a fresh optimizer at a
      constant learning rate. Only the paraphraser is optimised (:meth:`trainable_parameters`); the teacher
      runs; the student is not trained: it runs in eval mode without gradient (its BatchNorm statistics do
      not move), as RepDistiller's ``init`` runs it, and the translator does not run.
    - Stage ``distill`` (to the end): a fresh optimizer and the full schedule counted from the stage's start,
      loss = CE (+ KD) + β·ft_loss(translator(student map), paraphraser encoder(teacher map), p) (the paper's
      L_student = L_cls + β·L_FT, in RepDistiller's form :func:`ft_loss`; logged ``train/loss_ft``). The
      paraphraser is frozen: left out of the optimizer, kept in eval mode, its factor computed without
      gradient; the :class:`Translator` trains with the student.

    Paraphraser (from the teacher layer's channels C_t, rate k, no BatchNorm) and translator (from the
    student's channels to int(k·C_t), with BatchNorm) are owned modules built in ``__init__`` from the layers'
    shapes; RepDistiller's paraphraser has no BatchNorm, so its eval mode changes nothing but is kept for
    clarity (RepDistiller leaves it in train mode).

    Stage 1's optimizer is the module's ``optimizer`` built on the paraphraser's parameters, with every
    parameter group's learning rate set to ``paraphraser_lr`` (RepDistiller's ``init``: SGD with the run's
    momentum and weight decay at lr 0.01 when the student is a CIFAR ResNet or WRN, else the run's base lr);
    ``paraphraser_lr: null`` keeps the optimizer's own rate.

    Layers: one each, default the last stage of each network (:func:`lightning_kd.models.stage_names`), the
    last map before pooling: RepDistiller's ``feat[-2]`` on the CIFAR ResNets and VGGs; on the WRNs it is
    ``block3`` (before the final BN-ReLU), to be named explicitly (the configs do). Both must output
    (C, H, W) maps (checked at construction); the paraphraser and the translator keep the spatial size, and
    :func:`ft_loss` pools the larger factor to the smaller when the maps' sizes differ.

    Args:
        beta: weight β of the factor-transfer term (RepDistiller: 200).
        p: exponent p of :func:`ft_loss` (paper and RepDistiller: 1).
        rate: paraphrase rate k, factor channels int(k·C_t) (paper and RepDistiller: 0.5).
        paraphrase_epochs: epochs of the paraphraser's stage (RepDistiller: 30); 0 skips it (the paraphraser
            then keeps its random initial weights).
        paraphraser_lr: learning rate of stage 1's optimizer (RepDistiller: 0.01 for CIFAR ResNet and WRN
            students, the base lr 0.05 for VGG); ``None``: the optimizer's own.
        **kwargs (Any): layers, ``ce_weight``/``kd_weight``/``temperature``, ``image_size``
            (:class:`~lightning_kd.methods.feature_distillation.FeatureDistillation`) and the base arguments.
    """

    def __init__(
        self,
        beta: float = 200.0,
        p: float = 1.0,
        rate: float = 0.5,
        paraphrase_epochs: int = 30,
        paraphraser_lr: Optional[float] = 0.01,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        check_range("beta", beta, 0.0)
        check_range("p", p, 0.0, low_open=True)
        check_range("rate", rate, 0.0, low_open=True)
        check_range("paraphrase_epochs", paraphrase_epochs, 0)
        if int(paraphrase_epochs) != paraphrase_epochs:
            raise ValueError(f"paraphrase_epochs must be a whole number, got {paraphrase_epochs}")
        if paraphraser_lr is not None:
            check_range("paraphraser_lr", paraphraser_lr, 0.0, low_open=True)
        if len(self.student_layers) != 1:
            raise ValueError(
                f"FT transfers the factor of one student layer and one teacher layer, got {self.student_layers} "
                f"and {self.teacher_layers}"
            )
        self.beta = beta
        self.p = p
        self.rate = rate
        self.paraphrase_epochs = int(paraphrase_epochs)
        self.paraphraser_lr = paraphraser_lr
        (student_shape,), (teacher_shape,) = self.feature_shapes()
        for who, name, shape in (
            ("student", self.student_layers[0], student_shape),
            ("teacher", self.teacher_layers[0], teacher_shape),
        ):
            if len(shape) != 3:
                raise ValueError(
                    f"FT paraphrases and translates (B, C, H, W) feature maps, but the {who} layer {name!r} "
                    f"outputs {shape}: name a convolutional layer"
                )
        self.paraphraser = Paraphraser(teacher_shape[0], rate)
        self.translator = Translator(student_shape[0], teacher_shape[0], rate)

    def default_layers(self, network: nn.Module) -> list[str]:
        return stage_names(network)[-1:]

    def paraphraser_optimizer(self, params) -> torch.optim.Optimizer:
        """Stage 1's optimizer: the module's ``optimizer`` with every group's learning rate ``paraphraser_lr``."""
        optimizer = self.optimizer_factory(params)
        if self.paraphraser_lr is not None:
            optimizer.defaults["lr"] = self.paraphraser_lr
            for group in optimizer.param_groups:
                group["lr"] = self.paraphraser_lr
        return optimizer

    def training_stages(self) -> list[Stage]:
        return [
            Stage("paraphrase", epochs=self.paraphrase_epochs, optimizer=self.paraphraser_optimizer, constant_lr=True),
            Stage("distill"),
        ]

    def trainable_parameters(self, stage: Stage) -> list[nn.Parameter]:
        """The paraphraser's parameters in stage ``paraphrase``; afterwards the base's (the student's and the
        translator's), the paraphraser's left out."""
        if stage.name == "paraphrase":
            return list(self.paraphraser.parameters())
        frozen = {id(parameter) for parameter in self.paraphraser.parameters()}
        return [parameter for parameter in super().trainable_parameters(stage) if id(parameter) not in frozen]

    def _set_paraphraser_mode(self, training: bool) -> None:
        if getattr(self, "paraphraser", None) is not None:
            self.paraphraser.train(training and self.stage.name == "paraphrase")

    def train(self, mode: bool = True) -> "FT":
        """Switch modes as usual, but the paraphraser trains only in its own stage (eval mode afterwards)."""
        super().train(mode)
        self._set_paraphraser_mode(mode)
        return self

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self._set_paraphraser_mode(self.training)

    def forward_step(self, x: torch.Tensor, y: torch.Tensor, fields: Optional[dict[str, torch.Tensor]] = None) -> Step:
        """In stage ``paraphrase`` the student runs in eval mode without gradient (it is not trained there)."""
        if self.stage.name != "paraphrase":
            return super().forward_step(x, y, fields)
        with evaluation_mode(self.student):
            return super().forward_step(x, y, fields)

    def loss_terms(self, step: Step) -> dict[str, torch.Tensor]:
        teacher = step.teacher_features[self.teacher_layers[0]]
        if self.stage.name == "paraphrase":
            _, reconstruction = self.paraphraser(teacher)
            return {"reconstruction": paraphraser_loss(reconstruction, teacher)}
        with torch.no_grad():
            factor_t = self.paraphraser.encode(teacher)
        factor_s = self.translator(step.student_features[self.student_layers[0]])
        return {**self.task_terms(step), "ft": self.beta * ft_loss(factor_s, factor_t, self.p)}
