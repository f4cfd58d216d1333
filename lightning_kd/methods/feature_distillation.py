"""The base of the feature methods (AT, SP, FSP, FitNet, ...): paired student/teacher layers, their shapes known
in ``__init__``, and a task loss into which Hinton's KD term can be mixed from the config alone."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lightning_kd.core import DistillationModule, Step, check_layer_pairs, check_range, check_weights, layer_shapes
from lightning_kd.methods.kd import kd_loss
from lightning_kd.models import stage_names


class FeatureDistillation(DistillationModule):
    """Base of the feature methods: paired student/teacher layers, and a task loss into which Hinton's KD term
    can be mixed from the config alone ("AT+KD" is AT with ``kd_weight: 0.9``).

    Task loss: ce_weight·CE(s, y) + kd_weight·T²·KL(softmax(t/T) ‖ softmax(s/T)); a zero weight leaves
    its term out. Layer i of ``student_layers`` is matched with layer i of ``teacher_layers``. A subclass that
    owns heads sized by the layers (a regressor, an embedding) builds them in its ``__init__`` from
    :meth:`feature_shapes`.

    Args:
        student_layers: module paths of the student's features; default: the stages the method picks
            (:meth:`default_layers`) among :func:`lightning_kd.models.stage_names`.
        teacher_layers: the same for the teacher.
        ce_weight: weight of the cross-entropy with the labels.
        kd_weight: weight of the KD term (RepDistiller's "+KD": ``ce_weight: 1, kd_weight: 1``).
        temperature: temperature T > 0 of the KD term.
        image_size: side of the square training images, for :meth:`feature_shapes` (CIFAR 32, ImageNet 224).
    """

    needs_teacher = True

    def __init__(
        self,
        student_layers: Optional[list[str]] = None,
        teacher_layers: Optional[list[str]] = None,
        ce_weight: float = 1.0,
        kd_weight: float = 0.0,
        temperature: float = 4.0,
        image_size: int = 32,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        check_weights(ce_weight=ce_weight, kd_weight=kd_weight)
        check_range("temperature", temperature, 0.0, low_open=True)
        check_range("image_size", image_size, 1)
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight
        self.temperature = temperature
        self.image_size = image_size
        self.student_layers = list(student_layers) if student_layers is not None else self.default_layers(self.student)
        self.teacher_layers = list(teacher_layers) if teacher_layers is not None else self.default_layers(self.teacher)
        check_layer_pairs(type(self).__name__, self.student_layers, self.teacher_layers)
        self._shapes: Optional[tuple[list[tuple[int, ...]], list[tuple[int, ...]]]] = None

    def default_layers(self, network: nn.Module) -> list[str]:
        """The layers used when the config names none: every stage of ``network``."""
        return stage_names(network)

    def feature_shapes(self) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
        """Output shapes (without the batch) of the student's and the teacher's layers, in pair order, probed
        once on ``image_size``² inputs (:func:`~lightning_kd.core.features.layer_shapes`); e.g.
        ``([(16, 32, 32)], [(32, 32, 32)])``. Callable in ``__init__``."""
        if self._shapes is None:
            student = layer_shapes(self.student, self.student_layers, self.image_size, "student")
            teacher = layer_shapes(self.teacher, self.teacher_layers, self.image_size, "teacher")
            self._shapes = [student[n] for n in self.student_layers], [teacher[n] for n in self.teacher_layers]
        return self._shapes

    def feature_map_shapes(self, uses: str, layers: str = "convolutional layers"):
        """:meth:`feature_shapes`, after checking that every layer outputs a (B, C, H, W) map; else one clear
        ``ValueError``: "<Method> <uses>, but the <student|teacher> layer <name> outputs <shape>: name <layers>"."""
        student, teacher = self.feature_shapes()
        pairs = [("student", self.student_layers, student), ("teacher", self.teacher_layers, teacher)]
        for who, names, shapes in pairs:
            for name, shape in zip(names, shapes):
                if len(shape) != 3:
                    raise ValueError(
                        f"{type(self).__name__} {uses}, but the {who} layer {name!r} outputs {shape}: name {layers}"
                    )
        return student, teacher

    def paired_features(self, step: Step) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(student feature, teacher feature)`` of every layer pair of the step."""
        return [
            (step.student_features[s], step.teacher_features[t]) for s, t in zip(self.student_layers, self.teacher_layers)
        ]

    def task_terms(self, step: Step) -> dict[str, torch.Tensor]:
        """The weighted cross-entropy and KD terms (those with a non-zero weight)."""
        terms = {}
        if self.ce_weight > 0:
            terms["ce"] = self.ce_weight * F.cross_entropy(step.student_logits, step.targets)
        if self.kd_weight > 0:
            terms["kd"] = self.kd_weight * kd_loss(step.student_logits, step.teacher_logits, self.temperature)
        return terms
