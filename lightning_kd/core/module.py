"""``DistillationModule``: the LightningModule every method in this library subclasses.

One training step (see ARCHITECTURE.md)::

    batch = (x, y) or (x, y, fields)   # fields: per-sample tensors the method asked for (sample_fields)
    student(x)                         # outputs of the declared student layers captured by hooks
    teacher(x) under torch.no_grad     # when the method has a teacher and the stage runs it; always in eval mode
    forward_step -> Step               # a method adds its own outputs to step.outputs
    loss_terms(step) -> {name: weighted scalar}, computed in float32 even under mixed precision
    loss = sum(terms); log train/loss and train/loss_<name>; backward

A new method is a subclass that implements :meth:`DistillationModule.loss_terms`; it may set
``student_layers`` / ``teacher_layers`` (module paths) in ``__init__``, build heads it owns there (sized with
:func:`~lightning_kd.core.features.layer_shapes`), declare ``sample_fields`` (e.g. ``("index",)``) and
:meth:`~DistillationModule.training_stages`.
"""
from __future__ import annotations

import dataclasses
import os
import random
import warnings
from collections.abc import Sequence
from typing import Optional, Union

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_lightning.trainer.states import TrainerFn
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError, MulticlassConfusionMatrix

from lightning_kd.core.checks import check_range
from lightning_kd.core.features import FeatureHooks
from lightning_kd.core.loss_log import LossLog
from lightning_kd.core.stages import Stage, check_stages, stage_index
from lightning_kd.core.teacher_cache import TeacherCache
from lightning_kd.core.teacher import (
    BlackBoxTeacher,
    TeacherCost,
    TeacherSource,
    build_teacher,
    check_teacher_arguments,
    teacher_meter,
)
from lightning_kd.models import get_model

# The frozen teacher is in eval mode by design; Lightning's notice about it would only confuse users.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")

def cifar_sgd(params) -> torch.optim.Optimizer:
    """The CIFAR recipe of RepDistiller: SGD, lr 0.05, momentum 0.9, weight decay 5e-4."""
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


def cifar_multistep(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """The CIFAR recipe of RepDistiller: learning rate ×0.1 at epochs 150, 180 and 210 (of 240)."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[150, 180, 210], gamma=0.1)


# The default recipes are saved by reference in every checkpoint's hyper-parameters; allowing them lets
# ``Trainer.fit(ckpt_path=...)`` and ``load_from_checkpoint`` keep torch.load's safe ``weights_only=True``.
torch.serialization.add_safe_globals([cifar_sgd, cifar_multistep])


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


def accuracy_metrics(num_classes: int, prefix: str, postfix: str = "") -> MetricCollection:
    """Top-1 and top-5 accuracy (top-K with fewer classes), logged as ``<prefix>acc1<postfix>`` and ``…acc5…``."""
    return MetricCollection(
        {
            "acc1": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
            "acc5": MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro"),
        },
        prefix=prefix,
        postfix=postfix,
    )


def distillation_diagnostics(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per sample: ``agreement`` (1 where student and teacher predict the same class, else 0) and
    ``kl_teacher_student``, KL(softmax(t) ‖ softmax(s)) at temperature 1 (0·log 0 = 0), in float32."""
    log_student = F.log_softmax(student_logits.float(), dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float(), dim=-1)
    terms = log_teacher.exp() * (log_teacher - log_student)
    kl = torch.where(log_teacher == float("-inf"), 0.0, terms).sum(-1)
    agreement = (student_logits.argmax(-1) == teacher_logits.argmax(-1)).float()
    return {"agreement": agreement, "kl_teacher_student": kl}


def build_network(spec: Union[str, nn.Module], num_classes: int) -> nn.Module:
    """A model from a name (CIFAR zoo or torchvision) built for ``num_classes``, or a given module as is."""
    return get_model(spec, num_classes=num_classes) if isinstance(spec, str) else spec


class NonFiniteLossError(FloatingPointError):
    """Training produced a non-finite loss or weight; the run stops and nothing non-finite is saved."""


class NonFiniteWatch:
    """Remembers the first training step whose loss was not finite, and its loss terms, on the device.

    :meth:`observe` costs no host–device synchronisation, so it runs every step; :meth:`problem` (a small copy to
    the host) describes that step and its terms, and runs every few steps and before anything is saved.
    """

    def __init__(self) -> None:
        # One [term names, first bad step (-1: none), [loss, *terms] there] per run of steps with the same terms.
        self.segments: list[list] = []

    def observe(self, step: int, names: list[str], values: torch.Tensor) -> None:
        """Note ``step``'s loss and terms: ``values``, detached, in the order of ``names`` (the loss first)."""
        if not self.segments or self.segments[-1][0] != names:  # a method's phase changed its terms (rare)
            self.segments.append([names, torch.full((), -1, device=values.device), torch.zeros_like(values)])
        segment = self.segments[-1]
        record = ~torch.isfinite(values[0]) & (segment[1] < 0)
        segment[1] = torch.where(record, step, segment[1])
        segment[2] = torch.where(record, values, segment[2])

    def problem(self) -> Optional[str]:
        """What went wrong at the first non-finite step, or ``None`` while every loss was finite."""
        for names, step, values in self.segments:
            if int(step) >= 0:
                terms = ", ".join(f"{name}={value:g}" for name, value in zip(names, values.tolist()))
                return f"Non-finite loss at training step {int(step)} ({terms})"
        return None


def check_finite_weights(module: nn.Module, step: int) -> None:
    """Raise :class:`NonFiniteLossError` when a floating parameter or buffer of ``module`` is not finite."""
    for name, tensor in module.state_dict().items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise NonFiniteLossError(
                f"Non-finite weights at training step {step} ({name!r}): not saved; the checkpoints saved before "
                "are intact. Lower the learning rate or check the data and the teacher."
            )


def split_batch(batch) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """A batch ``(x, y)`` or ``(x, y, fields)`` as ``(x, y, fields)``; anything else is one clear error."""
    if isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
        fields = batch[2] if len(batch) == 3 else {}
        if isinstance(fields, dict):
            return batch[0], batch[1], fields
    raise ValueError(
        "A batch must be (inputs, targets) or (inputs, targets, {field name: per-sample tensor}), got "
        f"{type(batch).__name__} of {len(batch) if isinstance(batch, (tuple, list)) else 1} item(s)"
    )


@dataclasses.dataclass
class Step:
    """Everything one training step produced, handed to :meth:`DistillationModule.loss_terms`.

    Attributes:
        inputs: the images as the student saw them, float ``(B, C, H, W)``.
        targets: class indices, int64 ``(B,)``.
        student_logits: float ``(B, K)``.
        teacher_logits: float ``(B, K)``; ``None`` where the step ran no teacher (no teacher, or a stage or
            phase without it, see :meth:`DistillationModule.needs_teacher_forward`).
        student_features: outputs of the layers in ``student_layers``, by module path (e.g. ``(B, C, H, W)``).
        teacher_features: the same for ``teacher_layers``.
        fields: the per-sample fields the method asked for in ``sample_fields``, by name; ``index`` is the
            sample's position in the training set, int64 ``(B,)`` (``0 <= index < num_samples``).
        outputs: further named outputs a method's :meth:`DistillationModule.forward_step` adds to the step
            (BYOT's exits, DML's peers, CS-KD's partners), e.g. ``step.outputs["peer_logits"]``.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    student_logits: torch.Tensor
    teacher_logits: Optional[torch.Tensor] = None
    student_features: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    teacher_features: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    fields: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    outputs: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

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
    paths whose outputs they need) in their ``__init__``. Class attributes: ``needs_teacher = True`` when the
    method cannot run without a teacher, ``False`` when it must not have one; ``sample_fields``, the per-sample
    fields every training batch must carry (``("index",)`` for a memory bank indexed by sample: the library's
    data modules serve it, see :attr:`Step.fields`).

    Args:
        student: the network being trained: a model name (CIFAR zoo, e.g. ``resnet8``, or torchvision,
            e.g. ``resnet18``) built for ``num_classes``, or any ``nn.Module`` (``class_path``/``init_args``).
        num_classes: number of classes; linked from ``data.num_classes`` by the CLI.
        teacher: the teacher's architecture, given like ``student``.
        teacher_ckpt: weights for the teacher: a lightning_kd checkpoint (its student), a community
            ``{'model': state_dict}`` checkpoint or a plain state_dict file; a local path, an ``http(s)://`` or
            ``file://`` URL (downloaded once into the torch hub cache) or a published teacher's short name such as
            ``repdistiller:resnet56`` (RepDistiller's CIFAR-100 teachers; ``teacher`` must be that architecture),
            see :mod:`lightning_kd.core.hub`.
        teacher_sha256: the sha256 the teacher file must have (hex digest, or its first 8+ digits), checked when
            ``teacher_ckpt`` is read; a download that does not match is not kept.
        teacher_weights: torchvision pretrained weights of the teacher by name (e.g. ``IMAGENET1K_V1``),
            instead of ``teacher_ckpt``; the teacher then answers for the weights' classes (1000 on ImageNet).
        teacher_classes: the teacher outputs to keep, one per data class in label order, when the teacher
            was trained on more classes (a 1000-class ImageNet teacher on a subset); the CLI links it from
            ``data.imagenet_class_indices``. The teacher's classifier is restricted to those rows
            (:func:`~lightning_kd.core.teacher.restrict_classifier`), not retrained; a ``teacher_ckpt``
            that already has ``num_classes`` outputs is used as it is.
        num_samples: number of training samples; linked from ``data.num_train_samples`` by the CLI (``None``
            where the data module does not tell). Methods that keep something per sample (CRD's memory bank)
            size it with this.
        optimizer: builds the optimizer from the trainable parameters (default: SGD 0.05, momentum 0.9, wd 5e-4).
        lr_scheduler: builds the scheduler from the optimizer (default: ×0.1 at epochs 150/180/210).
        channels_last: keep every 4-D weight (and so the activations) in ``torch.channels_last`` memory
            format, faster for convolutions under mixed precision on recent GPUs.
        compile: ``torch.compile`` the student and the teacher (in place, so checkpoints keep their keys); a
            dict gives ``torch.compile``'s options, e.g. ``{mode: max-autotune}``.
        kd_diagnostics: at every validation (and test), also run the teacher and log how the student relates to it:
            ``val/agreement`` (share of images where both predict the same class), ``val/kl_teacher_student``
            (mean KL(teacher ‖ student) at T = 1) and the expected calibration error of both (``val/ece``,
            ``val/teacher_ece``; 15 bins). Costs one teacher forward of the validation set per epoch; a black-box
            teacher is never asked (its queries are counted).
        teacher_cache: a directory where the teacher's training logits are cached per (epoch, sample), so that the
            runs of a sweep over one teacher (temperatures, weights, students) run it once: the first run fills each
            epoch, the next ones read it (:mod:`lightning_kd.core.teacher_cache`: its key, float16 storage and what
            it refuses). Tensor-resident data and logit-only methods; ``None``: no cache.
        teacher_cache_topk: logits cached per sample: ``None`` for all classes up to 100, else the 10 largest
            (with a tail value, see :class:`~lightning_kd.core.teacher_cache.LogitCodec`); a number for that many.
    """

    needs_teacher: Optional[bool] = None
    sample_fields: tuple[str, ...] = ()

    def __init__(
        self,
        student: Union[str, nn.Module],
        num_classes: int,
        teacher: Optional[Union[str, nn.Module]] = None,
        teacher_ckpt: Optional[str] = None,
        teacher_sha256: Optional[str] = None,
        teacher_weights: Optional[str] = None,
        teacher_classes: Optional[list[int]] = None,
        num_samples: Optional[int] = None,
        optimizer: OptimizerCallable = cifar_sgd,
        lr_scheduler: LRSchedulerCallable = cifar_multistep,
        channels_last: bool = False,
        compile: Union[bool, dict] = False,
        kd_diagnostics: bool = True,
        teacher_cache: Optional[str] = None,
        teacher_cache_topk: Optional[int] = None,
    ) -> None:
        super().__init__()
        modules = {"student": student, "teacher": teacher}
        self.save_hyperparameters(ignore=[k for k, v in modules.items() if isinstance(v, nn.Module)])
        check_range("num_classes", num_classes, 2)
        if num_samples is not None:
            check_range("num_samples", num_samples, 1)
        check_teacher_arguments(
            type(self).__name__, self.needs_teacher, teacher, teacher_ckpt, teacher_weights, teacher_classes, num_classes
        )
        self.num_classes = num_classes
        self.num_samples = num_samples
        self.student = build_network(student, num_classes)
        self.teacher: Optional[nn.Module] = None
        # The file the teacher's weights came from; a checkpoint of this module records it and holds the weights.
        self.teacher_source: Optional[TeacherSource] = None
        if teacher is not None:
            self.teacher, self.teacher_source = build_teacher(
                teacher, num_classes, teacher_ckpt, teacher_weights, teacher_classes, teacher_sha256
            )
        # The teacher's meter; a black box's is its own (see teacher_cost).
        self._teacher_meter: Optional[TeacherCost] = teacher_meter(self.teacher) if self.teacher is not None else None
        self.teacher_cache = self._build_teacher_cache(teacher_cache, teacher_cache_topk)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.student_layers: list[str] = []
        self.teacher_layers: list[str] = []
        self._student_hooks: Optional[FeatureHooks] = None
        self._teacher_hooks: Optional[FeatureHooks] = None
        self.kd_diagnostics = bool(kd_diagnostics)
        self._add_metrics(num_classes)
        self._init_run_state(channels_last, compile)

    def _build_teacher_cache(self, directory: Optional[str], topk: Optional[int]) -> Optional[TeacherCache]:
        """The :class:`~lightning_kd.core.teacher_cache.TeacherCache` of ``teacher_cache``, or ``None``."""
        if directory is None:
            if topk is not None:
                raise ValueError("model.teacher_cache_topk is set but model.teacher_cache (the directory) is not")
            return None
        if self.teacher is None:
            raise ValueError(f"model.teacher_cache is set but {type(self).__name__} has no teacher to cache")
        return TeacherCache(directory, self.num_classes, topk)

    def _init_run_state(self, channels_last: bool, compile: Union[bool, dict]) -> None:
        """The execution options (``channels_last``, ``compile``) and what a run fills in as it goes."""
        self.input_shape: Optional[tuple[int, ...]] = None  # one sample's shape, saved for export
        self.channels_last = bool(channels_last)
        self.compile_options: Optional[dict] = (compile if isinstance(compile, dict) else {}) if compile else None
        self._compiled = False
        self.non_finite = NonFiniteWatch()
        self.loss_log = LossLog()
        self._stages: Optional[list[Stage]] = None
        self._optimizer_stage: Optional[int] = None  # the stage whose optimizer and scheduler are in use

    def _add_metrics(self, num_classes: int) -> None:
        """Accuracy of the student and the teacher in validation and test, and room for named outputs'."""
        self.val_metrics = accuracy_metrics(num_classes, "val/")
        self.test_metrics = accuracy_metrics(num_classes, "test/")
        self.teacher_val_metrics = accuracy_metrics(num_classes, "val/teacher_")
        self.teacher_test_metrics = accuracy_metrics(num_classes, "test/teacher_")
        # How the student relates to its teacher (kd_diagnostics), by stage; the student's calibration always.
        self.diagnostics = nn.ModuleDict({
            stage: nn.ModuleDict({
                "ece": MulticlassCalibrationError(num_classes, n_bins=15),
                "teacher_ece": MulticlassCalibrationError(num_classes, n_bins=15),
                "agreement": MeanMetric(),
                "kl_teacher_student": MeanMetric(),
            })
            for stage in ("val", "test")
        })
        # Per-class results (confusion_matrices): the student's of every evaluation pass, the teacher's where scored.
        self.confusion = nn.ModuleDict({
            stage: nn.ModuleDict({who: MulticlassConfusionMatrix(num_classes) for who in ("student", "teacher")})
            for stage in ("val", "test")
        })
        # Metrics of the other named outputs a method scores (see score_outputs), by stage and name.
        self.named_metrics = nn.ModuleDict({"val": nn.ModuleDict(), "test": nn.ModuleDict()})
        self._teacher_scored = False

    @property
    def teacher_cost(self) -> Optional[TeacherCost]:
        """The one meter of the teacher's cost (images sent through it and their FLOPs), logged every epoch
        (``teacher/*``) and saved in checkpoints: a :class:`~lightning_kd.core.teacher.BlackBoxTeacher`'s own, which
        counts every query against its budget, else the images of the training steps (:meth:`teacher_forward`).
        ``None`` without a teacher."""
        if isinstance(self.teacher, BlackBoxTeacher):
            return self.teacher.cost  # the teacher now in place, also when a method wrapped it after __init__
        return self._teacher_meter

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args, **kwargs):
        """Lightning's ``load_from_checkpoint``; the teacher's weights come from the checkpoint, so its original
        file (``teacher_ckpt``) is not read unless given again."""
        kwargs.setdefault("teacher_ckpt", None)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    # --- what a method implements ---------------------------------------------------------------
    def loss_terms(self, step: Step) -> dict[str, torch.Tensor]:
        """The method's objective for one training step, as named, already weighted scalar terms.

        The base sums them into ``train/loss``, logs each as ``train/loss_<name>`` and checks them for non-finite
        values. Runs in float32 (``step`` is cast) with autocast off.

        Args:
            step: what the step produced (:class:`Step`): logits, the declared layers' features, the per-sample
                ``fields`` and any ``outputs`` :meth:`forward_step` added.

        Returns:
            ``{name: scalar tensor}``; names may change between stages.

        Example::

            def loss_terms(self, step):
                return {
                    "ce": self.ce_weight * F.cross_entropy(step.student_logits, step.targets),
                    "kd": self.kd_weight * kd_loss(step.student_logits, step.teacher_logits, self.temperature),
                }
        """
        raise NotImplementedError

    def training_stages(self) -> list[Stage]:
        """The method's training stages in order; the base builds a fresh optimizer and scheduler at each boundary.

        Returns:
            a list of :class:`~lightning_kd.core.stages.Stage`; default: one stage ``main`` for the whole run.

        Example (FitNets: the regressor and the student's body learn the hint alone for 30 epochs at the
        optimizer's constant learning rate, then KD with the full schedule from its start)::

            def training_stages(self):
                return [Stage("hint", epochs=30, constant_lr=True), Stage("distill")]
        """
        return [Stage("main")]

    @property
    def stage(self) -> Stage:
        """The stage that trains the current epoch (the first one outside a fit)."""
        stages = self._stage_list()
        return stages[stage_index(stages, self.current_epoch)]

    def trainable_parameters(self, stage: Stage) -> list[nn.Parameter]:
        """The parameters the optimizer of ``stage`` trains.

        Args:
            stage: the stage whose optimizer is being built (see :meth:`training_stages`).

        Returns:
            default: every parameter that requires a gradient, but the teacher's: the student's and those of any
            head the method owns.

        Example (FT: the paraphraser alone learns in its pre-training stage, and is fixed afterwards)::

            def trainable_parameters(self, stage):
                if stage.name == "paraphrase":
                    return list(self.paraphraser.parameters())
                return [p for n, p in self.named_parameters() if not n.startswith(("teacher.", "paraphraser."))]
        """
        return [p for name, p in self.named_parameters() if p.requires_grad and not name.startswith("teacher.")]

    def _stage_list(self) -> list[Stage]:
        """:meth:`training_stages`, checked once."""
        if self._stages is None:
            stages = list(self.training_stages())
            check_stages(stages)
            self._stages = stages
        return self._stages

    def score_outputs(self, names: Sequence[str]) -> None:
        """Declare outputs besides the main one (BYOT's exits, DML's peers) that :meth:`evaluation_logits`
        returns by name: each is scored as ``val/acc1/<name>``, ``val/acc5/<name>`` (and ``test/…``), while
        ``val/acc1`` stays the main output's. Call it from ``__init__``.

        Args:
            names: the outputs' names, as :meth:`evaluation_logits` keys them.

        Example::

            self.score_outputs(["peer_0", "peer_1"])
        """
        for stage, metrics in self.named_metrics.items():
            for name in names:
                metrics[name] = accuracy_metrics(self.num_classes, f"{stage}/", f"/{name}")

    def evaluation_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits scored in validation and test.

        Args:
            x: a validation or test batch's inputs.

        Returns:
            ``(main logits (B, K), {name: logits (B, K)})`` for the outputs named in :meth:`score_outputs`; default:
            the student's, and no others.

        Example (DML: every peer)::

            def evaluation_logits(self, x):
                logits = self.student(x)
                return logits, {"peer_0": logits, "peer_1": self.peers[0](x)}
        """
        return self.student(x), {}

    # --- set-up ---------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Register the feature hooks, ask the data module for the ``sample_fields``, apply ``channels_last`` and
        ``compile``. Overrides must call ``super()``."""
        self._optimizer_stage = None
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        if self.sample_fields and stage == "fit" and hasattr(datamodule, "serve_fields"):
            datamodule.serve_fields(self.sample_fields)
        if self.teacher_cache is not None and stage == "fit":
            self.teacher_cache.attach(self)  # refuses what it cannot serve; has every sample's position served
        if self._student_hooks is None and self.student_layers:
            self._student_hooks = FeatureHooks(self.student, self.student_layers, "student")
        if self._teacher_hooks is None and self.teacher_layers:
            if self.teacher is None:
                raise ValueError(f"{type(self).__name__} declares teacher layers but has no teacher")
            self._teacher_hooks = FeatureHooks(self.teacher, self.teacher_layers, "teacher")
        if self.channels_last:
            self.to(memory_format=torch.channels_last)  # every network, the method's own modules included
        if self.compile_options is not None and not self._compiled:
            for network in (self.student, self.teacher):
                if network is not None:
                    network.compile(**self.compile_options)
            self._compiled = True

    def configure_callbacks(self) -> list[pl.Callback]:
        """The callbacks the module brings to its Trainer: its ``teacher_cache``, when set. An override returns
        ``super().configure_callbacks()`` with its own."""
        return [self.teacher_cache] if self.teacher_cache is not None else []

    def train(self, mode: bool = True) -> "DistillationModule":
        """Switch modes as usual, but the teacher stays in eval mode: its BatchNorm statistics never move."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def configure_optimizers(self):
        """Optimise everything but the teacher (the student and any module the method owns) with the optimizer and
        scheduler of the current stage (:meth:`training_stages`)."""
        if self._optimizer_stage is None:
            self._optimizer_stage = stage_index(self._stage_list(), self.current_epoch)
        stage = self._stage_list()[self._optimizer_stage]
        optimizer = (stage.optimizer or self.optimizer_factory)(self.trainable_parameters(stage))
        if stage.constant_lr:
            return optimizer
        scheduler = (stage.lr_scheduler or self.lr_scheduler_factory)(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING:
            self.stop_if_non_finite()  # never save a model trained on a non-finite loss ...
            check_finite_weights(self, self.global_step)  # ... or holding non-finite weights
        checkpoint["input_shape"] = self.input_shape
        checkpoint["stage_index"] = self._optimizer_stage
        if self.teacher_source is not None:
            checkpoint["teacher_source"] = dataclasses.asdict(self.teacher_source)
        # Lightning does not save the global random states; with them a resumed run's random draws (dropout, a
        # method's sampling) go on as in the uninterrupted run. (Augmentation is drawn from each sample's key.)
        checkpoint["rng_states"] = _collect_rng_states()
        if self.teacher_cost is not None:
            checkpoint["teacher_cost"] = self.teacher_cost.state_dict()
        checkpoint["loss_log"] = self.loss_log.state_dict()  # a mid-epoch checkpoint: the epoch's sums so far

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.input_shape = checkpoint.get("input_shape")
        self._optimizer_stage = checkpoint.get("stage_index") or 0  # its optimizer state is the one saved
        recorded = checkpoint.get("hyper_parameters", {}).get("num_samples")
        if self.sample_fields and None not in (recorded, self.num_samples) and recorded != self.num_samples:
            raise ValueError(
                f"{type(self).__name__} keeps state per training sample: the checkpoint was trained on {recorded} "
                f"samples, this run's data has {self.num_samples}. Use the checkpoint's data, or start a new run."
            )
        self._adopt_teacher_source(checkpoint.get("teacher_source"))
        if "rng_states" in checkpoint:
            _set_rng_states(checkpoint["rng_states"])
        if self.teacher_cost is not None and "teacher_cost" in checkpoint:
            self.teacher_cost.load_state_dict(checkpoint["teacher_cost"])
        if "loss_log" in checkpoint:
            self.loss_log.load_state_dict(checkpoint["loss_log"])

    def _adopt_teacher_source(self, recorded: Optional[dict]) -> None:
        """Keep the teacher a checkpoint learned from (its weights are in the checkpoint); refuse a configured
        teacher file that is another teacher than that one."""
        if recorded is None:
            return
        recorded_source = TeacherSource(**recorded)
        given = self.teacher_source
        if given is not None and given.sha256 != recorded_source.sha256:
            raise ValueError(
                f"model.teacher_ckpt {given.describe()} is not the teacher this checkpoint learned from: "
                f"{recorded_source.describe()}. The checkpoint holds that teacher's weights: set "
                "model.teacher_ckpt to null to go on with it, or start a new run to distil from the new teacher."
            )
        self.teacher_source = recorded_source

    def deployable(self, name: Optional[str] = None) -> nn.Module:
        """The network a deployment needs (what ``lightning-kd export`` writes).

        Args:
            name: which network, for methods that train several usable ones (DML's peers, BYOT's exits: the
                export's ``--network``); ``None`` is always the main one.

        Returns:
            an ``nn.Module`` mapping inputs to logits; default: the student (heads a method owns for training,
            like FitNet's regressor, are left out).

        Example (DML)::

            def deployable(self, name=None):
                return self.student if name in (None, "peer_0") else self.peers[int(name.split("_")[1]) - 1]
        """
        if name is not None:
            raise ValueError(f"{type(self).__name__} deploys one network, the student: give no name, got {name!r}")
        return self.student

    def step_generator(self) -> torch.Generator:
        """A random generator on the module's device seeded from (the run's seed, this training step, this
        process's rank): draws a resumed run repeats exactly, under DDP too, whatever drew from the global
        random state before. The run's seed is ``seed_everything``'s (``PL_GLOBAL_SEED``), 0 when none was set.

        Example (CRD's negatives)::

            negatives = self.sampler(step.fields["index"], generator=self.step_generator())
        """
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        key = (seed * 1_000_003 + self.global_step) * 65_537 + self.global_rank
        return torch.Generator(device=self.device).manual_seed(key % 2**63)

    # --- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)

    def _check_classes(self, logits: torch.Tensor, who: str) -> None:
        if logits.shape[-1] != self.num_classes:
            raise ValueError(
                f"The {who} outputs {logits.shape[-1]} classes but the data has {self.num_classes}: "
                "teacher, student and data must agree on the number of classes"
            )

    def needs_teacher_forward(self) -> bool:
        """Whether this training step runs the teacher.

        Returns:
            default: the current stage's ``teacher`` flag (``True`` unless a :class:`Stage` says otherwise). A
            method with teacher-free phases inside a stage returns ``False`` there; ``step.teacher_logits`` and
            ``step.teacher_features`` are then empty.

        Example (UNIX-style: the teacher runs on every other step)::

            def needs_teacher_forward(self):
                return self.global_step % 2 == 0
        """
        return self.stage.teacher

    def teacher_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher logits under ``torch.no_grad`` (not ``inference_mode``: losses save them for backward).

        Images sent in training are counted in :attr:`teacher_cost` (a :class:`BlackBoxTeacher` counts every query
        itself). A teacher is anything that answers logits (a :class:`BlackBoxTeacher` answers log-probabilities,
        which serve as logits).
        """
        metered_here = self.teacher_cost is not None and not isinstance(self.teacher, BlackBoxTeacher)
        if metered_here and (self._trainer is None or self.trainer.training):
            self.teacher_cost.add(x)  # before the forward: its FLOP probe must not be the last one hooks record
        with torch.no_grad():
            logits = self.teacher(x)
        self._check_classes(logits, "teacher")
        return logits

    def forward_step(
        self, x: torch.Tensor, y: torch.Tensor, fields: Optional[dict[str, torch.Tensor]] = None
    ) -> Step:
        """Run the student (and the teacher, when :meth:`needs_teacher_forward`) once, collecting the declared
        layers' outputs.

        Args:
            x: the batch's inputs; y: its targets; fields: its per-sample fields (see :attr:`Step.fields`).

        Returns:
            the :class:`Step` handed to :meth:`loss_terms`. An override calls ``super()`` and adds its own
            outputs to the step it returns, keeping what the base put there.

        Example (DML: the other peers' logits)::

            def forward_step(self, x, y, fields=None):
                step = super().forward_step(x, y, fields)
                step.outputs["peer_logits"] = torch.stack([peer(x) for peer in self.peers])
                return step
        """
        student_logits = self.student(x)
        self._check_classes(student_logits, "student")
        step = Step(x, y, student_logits, fields=dict(fields or {}))
        if self._student_hooks is not None:
            step.student_features = self._student_hooks.pop()
        if self.teacher is not None and self.needs_teacher_forward():
            cache = self.teacher_cache
            step.teacher_logits = self.teacher_forward(x) if cache is None else cache.teacher_logits(self, x)
            if self._teacher_hooks is not None:
                step.teacher_features = self._teacher_hooks.pop()
        return step

    # --- loops ----------------------------------------------------------------------------------
    def log_loss_terms(self, terms: dict[str, torch.Tensor], batch_size: int) -> torch.Tensor:
        """Sum the named terms; log ``train/loss`` and ``train/loss_<name>`` (``_step`` values every
        ``log_every_n_steps`` steps, ``_epoch`` means at the epoch's end: :class:`~lightning_kd.core.LossLog`, no
        ``self.log`` call and no host–device synchronisation on the steps between)."""
        loss = torch.stack(list(terms.values())).sum()
        self.loss_log.add({"loss": loss, **{f"loss_{name}": value for name, value in terms.items()}}, batch_size)
        # Lightning's own test of whether this step's logged values reach the loggers.
        if self._trainer is not None and self.trainer._logger_connector.should_update_logs:
            self._log_losses(self.loss_log.latest, "_step", on_step=True)
            # The bar shows the loss as a number set here: a value logged with prog_bar=True would be copied to the
            # host at every later step of the epoch.
            self.trainer.progress_bar_metrics["train/loss_step"] = loss.item()
        return loss

    def _log_losses(self, values: dict[str, torch.Tensor], suffix: str, on_step: bool) -> None:
        """``train/<name><suffix>`` to the loggers (and, at the epoch's end, the total loss to the progress bar) and
        ``train/<name>`` to the callbacks, as Lightning names a value logged with ``on_step`` and ``on_epoch``."""
        for name, value in values.items():
            options = dict(on_step=on_step, on_epoch=not on_step, sync_dist=not on_step, batch_size=1)
            self.log(f"train/{name}{suffix}", value, prog_bar=name == "loss" and not on_step, **options)
            self.log(f"train/{name}", value, logger=False, **options)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y, fields = split_batch(batch)
        missing = [name for name in self.sample_fields if name not in fields]
        if missing:
            raise ValueError(
                f"{type(self).__name__} needs the per-sample field(s) {missing} in every training batch, (x, y, "
                "{name: tensor}): lightning_kd's data modules serve them (serve_fields); other data must return them"
            )
        self.input_shape = tuple(x.shape[1:])
        step = self.forward_step(x, y, fields)
        with torch.autocast(device_type=self.device.type, enabled=False):
            terms = self.loss_terms(step.float())
        previous = self.loss_log.values
        loss = self.log_loss_terms(terms, batch_size=x.shape[0])
        values = self.loss_log.values  # this step's terms, stacked once by the loss log
        if values is previous:  # an override of log_loss_terms that did not record them: never watch a stale step
            values = torch.stack([loss, *terms.values()]).detach().float()
        self.non_finite.observe(self.global_step, ["loss", *terms], values)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        """Stop on a non-finite loss (checked every ``log_every_n_steps`` steps; the error names the first one).
        Overrides must call ``super()``."""
        if (batch_idx + 1) % max(1, self.trainer.log_every_n_steps) == 0:
            self.stop_if_non_finite()

    def stop_if_non_finite(self) -> None:
        """Raise :class:`NonFiniteLossError` on every process when any process saw a non-finite loss."""
        problem = self.non_finite.problem()
        if self.trainer.strategy.reduce_boolean_decision(problem is not None, all=False):
            raise NonFiniteLossError(
                f"{problem or 'Non-finite loss on another process'}; the run stopped and the checkpoints saved "
                "before that step are intact. Lower the learning rate or check the data and the teacher."
            )

    def on_train_epoch_start(self) -> None:
        """At a stage boundary, build the new stage's optimizer and scheduler; log ``train/lr``. Overrides must
        call ``super()``."""
        wanted = stage_index(self._stage_list(), self.current_epoch)
        if self._optimizer_stage is not None and wanted != self._optimizer_stage:
            self._optimizer_stage = wanted
            self.trainer.strategy.setup_optimizers(self.trainer)
        if self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=False, on_epoch=True)

    def on_train_epoch_end(self) -> None:
        """Stop on a non-finite loss; log the teacher's cost, summed over devices: ``teacher/images`` (so far),
        ``teacher/images_epoch`` and ``teacher/flops`` (forward FLOPs so far, where countable). Overrides must
        call ``super()``."""
        self.stop_if_non_finite()
        self._log_losses(self.loss_log.epoch_means(), "_epoch", on_step=False)
        self.loss_log.reset()
        if self.teacher_cost is None:
            return
        cost = {
            "teacher/images_epoch": self.teacher_cost.since_last_report(),
            "teacher/images": self.teacher_cost.images,
        }
        if self.teacher_cost.flops is not None:
            cost["teacher/flops"] = self.teacher_cost.flops
        for name, value in cost.items():
            self.log(name, float(value), on_step=False, on_epoch=True, reduce_fx="sum", sync_dist=True)

    def _evaluate(self, batch, metrics: MetricCollection, teacher_metrics: Optional[MetricCollection], prefix: str):
        x, y, _ = split_batch(batch)
        logits, named_logits = self.evaluation_logits(x)
        self._check_classes(logits, "student")
        metrics.update(logits, y)
        if not self.trainer.sanity_checking:
            self.confusion[prefix]["student"].update(logits, y)
        for name, values in named_logits.items():
            self.named_metrics[prefix][name].update(values, y)
            self.log_dict(self.named_metrics[prefix][name])
        self.log(f"{prefix}/loss", F.cross_entropy(logits.float(), y), batch_size=x.shape[0], sync_dist=True)
        self._log_accuracy(metrics)
        diagnostics = self.diagnostics[prefix]
        diagnostics["ece"].update(logits.float(), y)
        self.log(f"{prefix}/ece", diagnostics["ece"])
        # A teacher whose queries are counted (a black box) is not scored: each image would count against its budget.
        scored = self.teacher is not None and not getattr(self.teacher, "queries_are_counted", False)
        if scored and (teacher_metrics is not None or self.kd_diagnostics):
            teacher_logits = self.teacher_forward(x)
            if teacher_metrics is not None:
                teacher_metrics.update(teacher_logits, y)
                self.confusion[prefix]["teacher"].update(teacher_logits, y)
                self._log_accuracy(teacher_metrics)
            if self.kd_diagnostics:
                diagnostics["teacher_ece"].update(teacher_logits.float(), y)
                self.log(f"{prefix}/teacher_ece", diagnostics["teacher_ece"])
                for name, values in distillation_diagnostics(logits, teacher_logits).items():
                    diagnostics[name].update(values)
                    self.log(f"{prefix}/{name}", diagnostics[name])
        return logits

    def _log_accuracy(self, metrics: MetricCollection) -> None:
        """Log a collection of :func:`accuracy_metrics`; the top-1 ones (``val/acc1``, ``val/teacher_acc1``) also
        in the progress bar, the others (top-5) only to the loggers, to keep the bar short."""
        for name, metric in metrics.items():
            self.log(name, metric, prog_bar=name.endswith("acc1"))

    def confusion_matrices(self, stage: str) -> dict[str, Optional[torch.Tensor]]:
        """``{"student": ..., "teacher": ...}``: the confusion matrices (rows: true class, columns: predicted; int64,
        on the CPU, summed over processes) of the last ``stage`` pass (``"val"``, ``"test"``), or ``None`` for a
        network that pass did not score (the teacher is scored in a fit's first validation and in every test, never
        when its queries are counted). Every process must call it. Read by :class:`~lightning_kd.core.PerClassReport`.
        """
        return {who: metric.compute().cpu() if metric.update_called else None
                for who, metric in self.confusion[stage].items()}

    def on_validation_epoch_start(self) -> None:
        """Start the student's per-class counts anew (the teacher's are kept: it is scored once a fit). Overrides
        must call ``super()``."""
        self.confusion["val"]["student"].reset()

    def on_test_epoch_start(self) -> None:
        """Start the per-class counts of student and teacher anew. Overrides must call ``super()``."""
        for metric in self.confusion["test"].values():
            metric.reset()

    def validation_step(self, batch, batch_idx: int):
        score_teacher = not self._teacher_scored and not self.trainer.sanity_checking
        return self._evaluate(batch, self.val_metrics, self.teacher_val_metrics if score_teacher else None, "val")

    def on_validation_epoch_end(self) -> None:
        # The teacher's accuracy is logged once per fit (it does not change): the student–teacher gap.
        if not self.trainer.sanity_checking and self.teacher is not None:
            self._teacher_scored = True

    def on_fit_start(self) -> None:
        self._teacher_scored = False
        self.confusion["val"]["teacher"].reset()
        restored = self.trainer.ckpt_path is not None
        if self.teacher is not None and self.teacher_source is None and not self.hparams.get("teacher_weights") and not restored:
            warnings.warn(f"{type(self).__name__}: no teacher_ckpt given, the teacher keeps its initial weights")

    def test_step(self, batch, batch_idx: int):
        return self._evaluate(batch, self.test_metrics, self.teacher_test_metrics, "test")

    def predict_step(self, batch, batch_idx: int):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.student(x)
