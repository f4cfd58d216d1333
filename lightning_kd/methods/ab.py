"""Heo, Lee, Yun & Choi, "Knowledge Transfer via Distillation of Activation Boundaries Formed by Hidden
Neurons" (AAAI 2019, arXiv 1811.03233).

A neuron's activation boundary is where its pre-activation crosses 0. The student, through a connector r,
learns on which side of it every teacher neuron lies, with the paper's piecewise-differentiable alternative
loss (margin μ): ‖ρ(T) ⊙ σ(μ1 − r(S)) + (1 − ρ(T)) ⊙ σ(μ1 + r(S))‖²₂, ρ the step function (1 where the
teacher's pre-activation is > 0), σ the ReLU, S and T the student's and teacher's pre-activation maps.

Choices (RepDistiller, HobbitLong/RepDistiller ``distiller_zoo/AB.py``, ``models/util.py`` ``Connector``,
``helper/pretrain.py``, ``train_student.py``, which produced the CIFAR-100 "AB" row of its table; its loss is
the authors' bhheo/AB_distillation code):

- Several layers, layer i of n weighted 2^(i − n + 1) (the deepest 1, each shallower one half the next), each
  layer's sum divided by the batch size and multiplied by 3/1000 (:func:`ab_loss`); margin μ = 1.
- Layers: the pre-activation outputs of every stage (``is_feat=True, preact=True``, entries 1 to −2 of the
  feature list: not the stem, not the pooled vector), in student and teacher alike: the stage's last block
  before its final ReLU (the residual sum for the CIFAR ResNets, ResNet50 and ShuffleV1; for ShuffleV2 the
  concatenation of the pass-through half and the branch's pre-ReLU BN output, before the channel shuffle);
  for the WRNs the next pre-activation BN applied to the stage's output (``block2.layer.0.bn1``,
  ``block3.layer.0.bn1``, ``bn1`` here); for the VGGs ``block1``..``block4`` before their ReLU (four layers;
  here the last BN of each block, index −2 of its ``nn.Sequential``); for MobileNetV2 the outputs of
  ``blocks.1``, ``blocks.2``, ``blocks.4``, ``blocks.6`` (linear bottlenecks: nothing to remove). Here these
  are the module paths of :func:`lightning_kd.models.preact_names` (the zoo's parameter-free ``preact``
  modules give the residual sums and ShuffleV2's concatenation; hooks on them equal RepDistiller's features
  exactly, which is :class:`AB`'s default in student and teacher alike).
- Connector :class:`ABConnectors`: per layer the identity where student and teacher maps have the same shape,
  else :class:`~lightning_kd.methods.fitnet.ConvReg` without ReLU (convolution with bias, kernel by the
  spatial sizes, PyTorch's default init, + BN); the authors' connector is a 1×1 convolution without bias
  (He-normal init) + BN, for maps of equal sizes. RepDistiller takes the identity when channels and heights
  agree (widths are not compared); for square maps the two agree.
- Two stages. Stage 1 (``--init_epochs 30``): the AB loss alone trains the connectors and the student's
  feature layers (every module but the classifier, BatchNorm in training mode), SGD at the run's base lr
  (0.05; 0.01 for MobileNetV2/ShuffleV1/ShuffleV2 students), momentum 0.9, weight decay 5e-4, no lr decay.
  Stage 2: the full 240-epoch schedule restarted, loss = CE alone (RepDistiller's AB term is 0 there, so its
  ``-b 1`` has no effect; ``-a 0``: no KD); the connectors are not used any more.

:class:`AB` runs these two stages (``ab`` then ``task``) with the module's optimizer: stage 1 at its constant
learning rate, stage 2 with a fresh optimizer and scheduler counted from its start. Where it differs from
RepDistiller's code:

- Stage 1 trains every student parameter and the connectors, the whole student in training mode; the
  parameters after the deepest AB layer (classifier, MobileNetV2's and ShuffleV2's 1x1 head) get no gradient
  and are left alone by the optimizer. RepDistiller trains only ``get_feat_modules()`` and keeps the rest of
  the student in eval mode (``model_s.eval()``, then ``train()`` on those modules): for the WRNs that list
  leaves out the final ``bn1``, whose output is the third AB layer, so there that BN stays at its
  initialisation (an identity, its statistics frozen) for the 30 epochs, and AB pushes the raw ``block3``
  output instead; here it learns. The 1x1 heads of MobileNetV2/ShuffleV2 also keep their initial BatchNorm
  statistics through RepDistiller's stage 1 (here they follow the batches; stage 2 trains them either way).
- RepDistiller's WRNs compute their pre-activations by calling ``block2.layer[0].bn1``, ``block3.layer[0].bn1``
  and ``bn1`` a second time on the stage outputs, so in training mode (stage 1 and, as ``preact=True`` stays on
  for AB, all of stage 2) those BNs' running statistics move twice per step (momentum 0.19 instead of 0.1);
  hooks here read the one forward pass (the same values, statistics moved once).
- Stage 2 builds its optimizer without the connectors (RepDistiller's does not hold them either) and runs the
  teacher only when ``kd_weight`` > 0.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lightning_kd.core import Stage, Step, check_range
from lightning_kd.methods.feature_distillation import FeatureDistillation
from lightning_kd.methods.fitnet import ConvReg, feature_shape
from lightning_kd.models import preact_names


def ab_layer_loss(student: torch.Tensor, teacher: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Σ over every entry of ρ(t)·σ(μ − s)² + (1 − ρ(t))·σ(μ + s)²: the alternative loss of one layer, summed
    over the batch too.

    ``student`` is the connector's output r(S) and ``teacher`` the teacher's pre-activation T, of one shape;
    ρ(t) = 1 where t > 0, σ the ReLU, μ the margin.
    """
    check_range("margin", margin, 0.0)
    if student.shape != teacher.shape:
        raise ValueError(
            "ab_layer_loss compares student (after its connector) and teacher neuron by neuron, so their shapes "
            f"must be equal, got {tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    return torch.where(teacher > 0, F.relu(margin - student), F.relu(margin + student)).pow(2).sum()


def ab_loss(
    student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor], margin: float = 1.0
) -> torch.Tensor:
    """Σ_i 2^(i − n + 1)·ab_layer_loss(layer i)/B·3/1000 over the n paired layers, shallowest first.

    The layer weights and the 3/1000 scale are those of the authors' code and RepDistiller; B is the batch
    size of the first layer.
    """
    n = len(student_features)
    if n == 0 or n != len(teacher_features):
        raise ValueError(
            f"ab_loss needs one teacher layer per student layer, at least one, got {n} and {len(teacher_features)}"
        )
    batch = student_features[0].shape[0]
    return sum(
        2.0 ** (i - n + 1) * ab_layer_loss(s, t, margin) / batch / 1000 * 3
        for i, (s, t) in enumerate(zip(student_features, teacher_features))
    )


class ABConnectors(nn.Module):
    """One connector per paired layer, from the student's (C, H, W) to the teacher's.

    Layer i maps with the identity where the shapes are equal, else with ``ConvReg(s, t, use_relu=False)``
    (convolution + BN, see :class:`~lightning_kd.methods.fitnet.ConvReg`). ``connectors.<i>`` are named as in
    RepDistiller's ``Connector``, so its state dicts load.

    Args:
        student_shapes: (C, H, W) of each student layer's pre-activation output.
        teacher_shapes: (C, H, W) of each teacher layer's, in the same order.
    """

    def __init__(self, student_shapes: Sequence[Sequence[int]], teacher_shapes: Sequence[Sequence[int]]) -> None:
        super().__init__()
        if len(student_shapes) == 0 or len(student_shapes) != len(teacher_shapes):
            raise ValueError(
                "ABConnectors needs one teacher shape per student shape, at least one, got "
                f"{len(student_shapes)} and {len(teacher_shapes)}"
            )
        connectors: list[nn.Module] = []
        for s, t in zip(student_shapes, teacher_shapes):
            s, t = feature_shape("student shape", s), feature_shape("teacher shape", t)
            connectors.append(nn.Identity() if s == t else ConvReg(s, t, use_relu=False))
        self.connectors = nn.ModuleList(connectors)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(features) != len(self.connectors):
            raise ValueError(f"ABConnectors holds {len(self.connectors)} connectors, got {len(features)} features")
        return [connector(feature) for connector, feature in zip(self.connectors, features)]


class AB(FeatureDistillation):
    """AB: the student's pre-activations, through connectors, learn on which side of zero the teacher's lie; then
    the task loss trains the student.

    Two stages, as RepDistiller runs it: ``ab`` (``stage1_epochs`` epochs, the optimizer's constant learning rate,
    the teacher runs) minimises beta·:func:`ab_loss` of the connected student layers against the teacher's,
    training the connectors (:class:`ABConnectors`, owned: sized in ``__init__`` from the layers' shapes,
    checkpointed, left out of export) and the student; ``task`` minimises the task loss alone (CE, optionally
    + KD: :class:`~lightning_kd.methods.feature_distillation.FeatureDistillation`) with a fresh optimizer (the
    student's parameters only) and the full schedule counted from its start, running the teacher only when KD
    needs it. Layers default to :func:`lightning_kd.models.preact_names` of each network (RepDistiller's
    ``feat[1:-1]`` with ``preact=True``); layers named in the config should be pre-activation outputs too, as
    the teacher's sign marks the activation boundary.

    Args:
        margin: the margin μ ≥ 0 of the alternative loss (RepDistiller: 1).
        beta: weight of the AB term in stage 1 (RepDistiller: 1).
        stage1_epochs: epochs of the ``ab`` stage (RepDistiller's ``--init_epochs``: 30).
        **kwargs (Any): ``student_layers``/``teacher_layers`` (equal counts; a student map is connected to its
            teacher map by the identity or a convolution + BN, see :class:`ABConnectors`),
            ``ce_weight``/``kd_weight``/``temperature`` of stage 2, ``image_size`` and the base arguments.
    """

    def __init__(self, margin: float = 1.0, beta: float = 1.0, stage1_epochs: int = 30, **kwargs) -> None:
        super().__init__(**kwargs)
        check_range("margin", margin, 0.0)
        check_range("beta", beta, 0.0, low_open=True)
        check_range("stage1_epochs", stage1_epochs, 0)
        if self.ce_weight == 0 and self.kd_weight == 0:
            raise ValueError("AB needs a task loss after its first stage: ce_weight or kd_weight must be > 0")
        self.margin = margin
        self.beta = beta
        self.stage1_epochs = stage1_epochs
        student, teacher = self.feature_shapes()
        try:
            self.connectors = ABConnectors(student, teacher)
        except ValueError:  # name the pair that cannot be connected
            for s_name, t_name, s_shape, t_shape in zip(self.student_layers, self.teacher_layers, student, teacher):
                try:
                    ABConnectors([s_shape], [t_shape])
                except ValueError as error:
                    raise ValueError(
                        f"AB cannot connect student layer {s_name!r} {s_shape} to teacher layer {t_name!r} "
                        f"{t_shape}: {error}. Name (C, H, W) pre-activation layers of compatible sizes in "
                        "model.student_layers / model.teacher_layers"
                    ) from None
            raise

    def default_layers(self, network: nn.Module) -> list[str]:
        """The pre-activation output of every stage (:func:`lightning_kd.models.preact_names`)."""
        return preact_names(network)

    def training_stages(self) -> list[Stage]:
        return [Stage("ab", epochs=self.stage1_epochs, constant_lr=True), Stage("task", teacher=self.kd_weight > 0)]

    def trainable_parameters(self, stage: Stage) -> list[nn.Parameter]:
        """Stage ``ab``: the student's and the connectors' parameters; ``task``: the student's alone."""
        if stage.name == "ab":
            return super().trainable_parameters(stage)
        return [
            p for n, p in self.named_parameters() if p.requires_grad and not n.startswith(("teacher.", "connectors."))
        ]

    def loss_terms(self, step: Step) -> dict[str, torch.Tensor]:
        if self.stage.name == "task":
            return self.task_terms(step)
        student, teacher = zip(*self.paired_features(step))
        return {"ab": self.beta * ab_loss(self.connectors(student), teacher, self.margin)}
