"""``DistillationModule``: the LightningModule every method in this library subclasses.

One training step (see ARCHITECTURE.md)::

    student(x)                       # outputs of the declared student layers captured by hooks
    teacher(x) under torch.no_grad   # only when the method has a teacher; always in eval mode
    loss_terms(step) -> {name: weighted scalar}, computed in float32 even under mixed precision
    loss = sum(terms); log train/loss and train/loss_<name>; backward

A new method is a subclass that sets ``student_layers`` / ``teacher_layers`` (module paths) if it
needs features and implements :meth:`DistillationModule.loss_terms`.
"""
from __future__ import annotations

import dataclasses
import random
import warnings
from typing import Optional, Union

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from lightning_kd.core.features import FeatureHooks
from lightning_kd.core.teacher import freeze, load_weights
from lightning_kd.models import get_model


def cifar_sgd(params) -> torch.optim.Optimizer:
    """The CIFAR recipe of RepDistiller: SGD, lr 0.05, momentum 0.9, weight decay 5e-4."""
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


def cifar_multistep(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """The CIFAR recipe of RepDistiller: learning rate ×0.1 at epochs 150, 180 and 210 (of 240)."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[150, 180, 210], gamma=0.1)


def _collect_rng_states() -> dict:
    """Random states of torch, CUDA, numpy and Python, in types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)),
        "python": random.getstate(),
    }


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    random.setstate(states["python"])


def check_range(name: str, value: float, low: float, high: float = float("inf"), *, low_open: bool = False) -> None:
    """Raise one clear ``ValueError`` when a hyper-parameter lies outside its range."""
    below = value <= low if low_open else value < low
    if below or value > high:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must lie in {bracket}{low}, {high}], got {value}")


def build_network(spec: Union[str, nn.Module], num_classes: int) -> nn.Module:
    """A model from a name (CIFAR zoo or torchvision) built for ``num_classes``, or a given module as is."""
    return get_model(spec, num_classes=num_classes) if isinstance(spec, str) else spec


@dataclasses.dataclass
class Step:
    """Everything one forward step produced, handed to :meth:`DistillationModule.loss_terms`."""

    inputs: torch.Tensor
    targets: torch.Tensor
    student_logits: torch.Tensor
    teacher_logits: Optional[torch.Tensor] = None
    student_features: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    teacher_features: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    def float(self) -> "Step":
        """A copy with every floating tensor in float32 (losses are computed in full precision)."""

        def cast(value):
            if torch.is_tensor(value) and value.is_floating_point():
                return value.float()
            if isinstance(value, dict):
                return {k: cast(v) for k, v in value.items()}
            return value

        return dataclasses.replace(self, **{f.name: cast(getattr(self, f.name)) for f in dataclasses.fields(self)})


class DistillationModule(pl.LightningModule):
    """Base of every method: a student, an optional frozen teacher, metrics, logging and optimisation.

    Subclasses implement :meth:`loss_terms` and may set ``student_layers`` / ``teacher_layers`` (module
    paths whose outputs they need) in their ``__init__``. Set ``needs_teacher = True`` on the class when the
    method cannot run without a teacher, ``False`` when it must not have one.

    Args:
        student: the network being trained: a model name (CIFAR zoo, e.g. ``resnet8``, or torchvision,
            e.g. ``resnet18``) built for ``num_classes``, or any ``nn.Module`` (``class_path``/``init_args``).
        num_classes: number of classes; linked from ``data.num_classes`` by the CLI.
        teacher: the teacher's architecture, given like ``student``.
        teacher_ckpt: weights for the teacher: a lightning_kd checkpoint (its student), a community
            ``{'model': state_dict}`` checkpoint or a plain state_dict file.
        optimizer: builds the optimizer from the trainable parameters (default: SGD 0.05, momentum 0.9, wd 5e-4).
        lr_scheduler: builds the scheduler from the optimizer (default: ×0.1 at epochs 150/180/210).
    """

    needs_teacher: Optional[bool] = None

    def __init__(
        self,
        student: Union[str, nn.Module],
        num_classes: int,
        teacher: Optional[Union[str, nn.Module]] = None,
        teacher_ckpt: Optional[str] = None,
        optimizer: OptimizerCallable = cifar_sgd,
        lr_scheduler: LRSchedulerCallable = cifar_multistep,
    ) -> None:
        super().__init__()
        modules = {"student": student, "teacher": teacher}
        self.save_hyperparameters(ignore=[k for k, v in modules.items() if isinstance(v, nn.Module)])
        check_range("num_classes", num_classes, 2)
        self.num_classes = num_classes
        name = type(self).__name__
        if self.needs_teacher and teacher is None:
            raise ValueError(f"{name} needs a teacher: set model.teacher (an architecture) and model.teacher_ckpt")
        if self.needs_teacher is False and (teacher is not None or teacher_ckpt is not None):
            raise ValueError(f"{name} trains without a teacher: remove model.teacher / model.teacher_ckpt")
        if teacher_ckpt is not None and teacher is None:
            raise ValueError("model.teacher_ckpt is set but model.teacher (its architecture) is not")

        self.student = build_network(student, num_classes)
        self.teacher: Optional[nn.Module] = None
        if teacher is not None:
            network = build_network(teacher, num_classes)
            if teacher_ckpt is None:
                warnings.warn(f"{name}: no teacher_ckpt given, the teacher keeps its initial weights", stacklevel=2)
            else:
                load_weights(network, teacher_ckpt)
            self.teacher = freeze(network)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.student_layers: list[str] = []
        self.teacher_layers: list[str] = []
        self._student_hooks: Optional[FeatureHooks] = None
        self._teacher_hooks: Optional[FeatureHooks] = None

        def accuracy(prefix: str) -> MetricCollection:
            top5 = min(5, num_classes)
            return MetricCollection(
                {
                    "acc1": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
                    "acc5": MulticlassAccuracy(num_classes, top_k=top5, average="micro"),
                },
                prefix=prefix,
            )

        self.val_metrics = accuracy("val/")
        self.test_metrics = accuracy("test/")
        self.teacher_val_metrics = accuracy("val/teacher_")
        self.teacher_test_metrics = accuracy("test/teacher_")
        self._teacher_scored = False
        self.input_shape: Optional[tuple[int, ...]] = None  # one sample's shape, saved for export

    # --- what a method implements ---------------------------------------------------------------
    def loss_terms(self, step: Step) -> dict[str, torch.Tensor]:
        """Named, already weighted scalar loss terms of one training step; the base sums and logs them."""
        raise NotImplementedError

    # --- set-up ---------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self._student_hooks is None and self.student_layers:
            self._student_hooks = FeatureHooks(self.student, self.student_layers, "student")
        if self._teacher_hooks is None and self.teacher_layers:
            if self.teacher is None:
                raise ValueError(f"{type(self).__name__} declares teacher layers but has no teacher")
            self._teacher_hooks = FeatureHooks(self.teacher, self.teacher_layers, "teacher")

    def train(self, mode: bool = True) -> "DistillationModule":
        """Switch modes as usual, but the teacher stays in eval mode: its BatchNorm statistics never move."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def configure_optimizers(self):
        """Optimise everything but the teacher: the student and any module the method owns."""
        params = [p for name, p in self.named_parameters() if p.requires_grad and not name.startswith("teacher.")]
        optimizer = self.optimizer_factory(params)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.lr_scheduler_factory(optimizer)}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["input_shape"] = self.input_shape
        # Lightning does not save random states; with them a resumed run draws the same augmentations.
        checkpoint["rng_states"] = _collect_rng_states()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.input_shape = checkpoint.get("input_shape")
        if "rng_states" in checkpoint:
            _set_rng_states(checkpoint["rng_states"])

    def deployable(self) -> nn.Module:
        """The network a deployment needs (what ``lightning-kd export`` writes): the student."""
        return self.student

    # --- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)

    def _check_classes(self, logits: torch.Tensor, who: str) -> None:
        if logits.shape[-1] != self.num_classes:
            raise ValueError(
                f"The {who} outputs {logits.shape[-1]} classes but the data has {self.num_classes}: "
                "teacher, student and data must agree on the number of classes"
            )

    def teacher_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher logits under ``torch.no_grad`` (not ``inference_mode``: losses save them for backward)."""
        with torch.no_grad():
            logits = self.teacher(x)
        self._check_classes(logits, "teacher")
        return logits

    def forward_step(self, x: torch.Tensor, y: torch.Tensor) -> Step:
        """Run the student (and teacher, if any) once, collecting the declared layers' outputs."""
        student_logits = self.student(x)
        self._check_classes(student_logits, "student")
        step = Step(x, y, student_logits)
        if self._student_hooks is not None:
            step.student_features = self._student_hooks.pop()
        if self.teacher is not None:
            step.teacher_logits = self.teacher_forward(x)
            if self._teacher_hooks is not None:
                step.teacher_features = self._teacher_hooks.pop()
        return step

    # --- loops ----------------------------------------------------------------------------------
    def log_loss_terms(self, terms: dict[str, torch.Tensor], batch_size: int) -> torch.Tensor:
        """Sum the named terms and log ``train/loss`` and ``train/loss_<name>``."""
        loss = torch.stack(list(terms.values())).sum()
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch_size)
        for name, value in terms.items():
            self.log(f"train/loss_{name}", value, on_step=True, on_epoch=True, batch_size=batch_size)
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.input_shape = tuple(x.shape[1:])
        step = self.forward_step(x, y)
        with torch.autocast(device_type=self.device.type, enabled=False):
            terms = self.loss_terms(step.float())
        return self.log_loss_terms(terms, batch_size=x.shape[0])

    def on_train_epoch_start(self) -> None:
        if self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=False, on_epoch=True)

    def _evaluate(self, batch, metrics: MetricCollection, teacher_metrics: Optional[MetricCollection], prefix: str):
        x, y = batch
        logits = self.student(x)
        self._check_classes(logits, "student")
        metrics.update(logits, y)
        self.log(f"{prefix}/loss", F.cross_entropy(logits.float(), y), batch_size=x.shape[0], sync_dist=True)
        self.log_dict(metrics)
        if teacher_metrics is not None and self.teacher is not None:
            teacher_metrics.update(self.teacher_forward(x), y)
            self.log_dict(teacher_metrics)
        return logits

    def validation_step(self, batch, batch_idx: int):
        score_teacher = not self._teacher_scored and not self.trainer.sanity_checking
        return self._evaluate(batch, self.val_metrics, self.teacher_val_metrics if score_teacher else None, "val")

    def on_validation_epoch_end(self) -> None:
        # The teacher's accuracy is logged once per fit (it does not change): the student–teacher gap.
        if not self.trainer.sanity_checking and self.teacher is not None:
            self._teacher_scored = True

    def on_fit_start(self) -> None:
        self._teacher_scored = False

    def test_step(self, batch, batch_idx: int):
        return self._evaluate(batch, self.test_metrics, self.teacher_test_metrics, "test")

    def predict_step(self, batch, batch_idx: int):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.student(x)
