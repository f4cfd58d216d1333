"""Loading, freezing and class-restricting a teacher network; a black-box teacher; counting what a teacher costs.

Accepted checkpoint formats (detected from the file):

* a checkpoint written by this library (a Lightning ``.ckpt``): the ``student.*`` weights of that run,
  e.g. the Baseline run that trained the teacher;
* the community CIFAR format of RepDistiller / mdistiller: ``{'model': state_dict, 'epoch', 'accuracy'}``;
* a plain ``state_dict`` (optionally saved from ``DataParallel``, with ``module.`` prefixes).
"""
from __future__ import annotations

import dataclasses
import os
import pickle
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Literal, Optional, Union

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_kd.core.features import evaluation_mode
from lightning_kd.core.hub import check_sha256, expected_sha256, file_sha256, locate_teacher_file
from lightning_kd.models import get_model


def load_checkpoint_file(path: str, what: str = "Checkpoint", **kwargs) -> Any:
    """``torch.load(path)`` on the CPU; a missing, truncated or corrupt file raises one error naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path!r}")
    try:
        return torch.load(path, map_location="cpu", **kwargs)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as error:
        raise ValueError(f"{what} {path!r} could not be read (truncated or not a torch file?): {error}") from None


@dataclasses.dataclass(frozen=True)
class TeacherSource:
    """Where a teacher's weights came from: the file, its sha256, the epoch/step it was written at (when the
    file records them) and the URL it was downloaded from (see :mod:`lightning_kd.core.hub`). A student's checkpoint
    stores it (``checkpoint["teacher_source"]``)."""

    path: str
    sha256: str
    epoch: Optional[int] = None
    global_step: Optional[int] = None
    url: Optional[str] = None

    def describe(self) -> str:
        when = ", ".join(f"{k} {v}" for k, v in (("epoch", self.epoch), ("step", self.global_step)) if v is not None)
        origin = f"{self.url} -> " if self.url else ""
        return f"{origin}{self.path} (sha256 {self.sha256[:12]}…{', ' + when if when else ''})"


def read_state_dict(path: str, prefix: str = "student.") -> dict[str, torch.Tensor]:
    """Read the network weights stored in ``path`` in any of the accepted formats."""
    return _read_teacher_file(path, prefix)[0]


def _read_teacher_file(
    path: str, prefix: str, weights_only: bool = False
) -> tuple[dict[str, torch.Tensor], TeacherSource]:
    # weights_only=False by default: Lightning checkpoints carry hyper-parameters (callables, class paths);
    # the file is one the user points at explicitly. Downloads are read with weights_only=True (no code).
    checkpoint = load_checkpoint_file(path, "Teacher checkpoint", weights_only=weights_only)
    recorded = checkpoint if isinstance(checkpoint, Mapping) else {}
    source = TeacherSource(
        os.path.abspath(path),
        file_sha256(path),
        int(recorded["epoch"]) if isinstance(recorded.get("epoch"), int) else None,
        int(recorded["global_step"]) if isinstance(recorded.get("global_step"), int) else None,
    )
    if isinstance(checkpoint, Mapping) and "state_dict" in checkpoint and "pytorch-lightning_version" in checkpoint:
        state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
        if not state:
            raise ValueError(f"Lightning checkpoint {path!r} holds no weights under {prefix!r}")
    elif isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("model"), Mapping):
        state = dict(checkpoint["model"])
    elif isinstance(checkpoint, Mapping) and checkpoint and all(torch.is_tensor(v) for v in checkpoint.values()):
        state = dict(checkpoint)
    else:
        raise ValueError(
            f"Unrecognised checkpoint format in {path!r}: expected a lightning_kd/Lightning checkpoint, "
            "a {'model': state_dict} community checkpoint or a plain state_dict"
        )
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state, source


def classifier(model: nn.Module) -> tuple[str, nn.Linear]:
    """The classifier of ``model``: its last ``nn.Linear`` in module order, with its module path."""
    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier whose classes could be selected")
    return linears[-1]


def _class_rows(classes: Sequence[int], available: int) -> torch.Tensor:
    rows = [int(c) for c in classes]
    if not rows or len(set(rows)) != len(rows) or not all(0 <= r < available for r in rows):
        raise ValueError(
            f"teacher classes must be distinct indices in [0, {available}) (the teacher's outputs), got {rows[:20]}"
            + (" ..." if len(rows) > 20 else "")
        )
    return torch.tensor(rows)


def restrict_classifier(model: nn.Module, classes: Sequence[int]) -> nn.Module:
    """Make ``model`` answer for ``classes`` only: output ``i`` becomes its former output ``classes[i]``.

    The classifier (:func:`classifier`) is replaced by an ``nn.Linear`` holding copies of those rows, in
    that order: a teacher trained on many classes (a 1000-class ImageNet network) answers for a subset in
    the subset's label order, without retraining. Returns ``model``, changed in place.
    """
    name, layer = classifier(model)
    rows = _class_rows(classes, layer.out_features).to(layer.weight.device)
    restricted = nn.Linear(
        layer.in_features, len(rows), bias=layer.bias is not None, device=layer.weight.device, dtype=layer.weight.dtype
    )
    with torch.no_grad():
        restricted.weight.copy_(layer.weight[rows])
        if layer.bias is not None:
            restricted.bias.copy_(layer.bias[rows])
    restricted.requires_grad_(layer.weight.requires_grad)
    model.set_submodule(name, restricted)
    return model


def load_weights(
    model: nn.Module,
    path: str,
    prefix: str = "student.",
    classes: Optional[Sequence[int]] = None,
    weights_only: bool = False,
) -> TeacherSource:
    """Load ``path`` into ``model``; any mismatch raises one ``ValueError`` naming the first offending key.
    Returns where the weights came from.

    ``weights_only``: read the file with ``torch.load(weights_only=True)`` (tensors and plain data, never code), as
    for a downloaded file.

    ``classes``: when the checkpoint's classifier has another number of outputs than ``model``'s (a
    teacher trained on all classes, used on a subset), only its rows ``classes`` are loaded, in that order
    (as :func:`restrict_classifier` does); a checkpoint that already fits is loaded as it is.
    """
    state, source = _read_teacher_file(path, prefix, weights_only)
    if classes is not None:
        name, layer = classifier(model)
        weight = state.get(f"{name}.weight")
        if weight is not None and weight.shape[0] != layer.out_features:
            rows = _class_rows(classes, weight.shape[0])
            for key in (f"{name}.weight", f"{name}.bias"):
                if key in state:
                    state[key] = state[key][rows]
    expected = model.state_dict()
    for key, value in expected.items():
        if key not in state:
            raise ValueError(
                f"Checkpoint {path!r} does not fit {type(model).__name__}: key {key!r} "
                f"(shape {tuple(value.shape)}) is missing from the checkpoint"
            )
        if state[key].shape != value.shape:
            raise ValueError(
                f"Checkpoint {path!r} does not fit {type(model).__name__}: key {key!r} has shape "
                f"{tuple(state[key].shape)} in the checkpoint but {tuple(value.shape)} in the model"
                " (a different architecture or number of classes?)"
            )
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise ValueError(
            f"Checkpoint {path!r} does not fit {type(model).__name__}: unexpected key {unexpected[0]!r} "
            f"(shape {tuple(state[unexpected[0]].shape)}) is not in the model"
        )
    model.load_state_dict(state)
    return source


def freeze(model: nn.Module) -> nn.Module:
    """Make ``model`` a frozen teacher: no gradients, eval mode (BatchNorm statistics never move).

    The owning module must also keep it in eval mode across ``train()`` calls, see
    :meth:`lightning_kd.core.module.DistillationModule.train`.
    """
    model.requires_grad_(False)
    return model.eval()


def check_teacher_arguments(
    method: str,
    needs_teacher: Optional[bool],
    teacher: Any,
    teacher_ckpt: Optional[str],
    teacher_weights: Optional[str],
    teacher_classes: Optional[Sequence[int]],
    num_classes: int,
) -> None:
    """Raise one clear ``ValueError`` for a teacher specification ``method`` cannot use."""
    if needs_teacher and teacher is None:
        raise ValueError(f"{method} needs a teacher: set model.teacher (an architecture) and model.teacher_ckpt")
    if needs_teacher is False and (teacher is not None or teacher_ckpt is not None):
        raise ValueError(f"{method} trains without a teacher: remove model.teacher / model.teacher_ckpt")
    if teacher_ckpt is not None and teacher is None:
        raise ValueError("model.teacher_ckpt is set but model.teacher (its architecture) is not")
    if teacher_weights is not None and not isinstance(teacher, str):
        raise ValueError("model.teacher_weights is set: model.teacher must name a torchvision model, e.g. resnet34")
    if teacher_weights is not None and teacher_ckpt is not None:
        raise ValueError("set model.teacher_weights (torchvision weights) or model.teacher_ckpt, not both")
    if teacher is not None and teacher_classes is not None and len(teacher_classes) != num_classes:
        raise ValueError(
            f"model.teacher_classes names {len(teacher_classes)} teacher outputs but the data has "
            f"{num_classes} classes"
        )


def build_teacher(
    teacher: Union[str, nn.Module],
    num_classes: int,
    teacher_ckpt: Optional[str] = None,
    teacher_weights: Optional[str] = None,
    teacher_classes: Optional[Sequence[int]] = None,
    teacher_sha256: Optional[str] = None,
) -> tuple[nn.Module, Optional[TeacherSource]]:
    """The frozen teacher and the file its weights came from (``None`` for torchvision weights or none).

    ``teacher`` is a model name (CIFAR zoo or torchvision) or a module; ``teacher_weights`` loads torchvision's
    pretrained weights (the weights' classes, restricted to ``teacher_classes`` when given); ``teacher_ckpt``
    any file :func:`load_weights` reads, given as a path, a URL or a published teacher's short name
    (:func:`~lightning_kd.core.hub.locate_teacher_file`; a download is read as weights only), whose sha256 must start
    with ``teacher_sha256`` when given.
    """
    source = None
    if teacher_weights is not None:
        network = get_model(teacher, weights=teacher_weights)  # the weights' classes: 1000 on ImageNet
        if teacher_classes is not None:
            restrict_classifier(network, teacher_classes)
    else:
        network = get_model(teacher, num_classes=num_classes) if isinstance(teacher, str) else teacher
        if teacher_ckpt is not None:
            expected = expected_sha256(teacher_sha256)
            path, url = locate_teacher_file(teacher_ckpt, teacher, expected, num_classes)
            loaded = load_weights(network, path, classes=teacher_classes, weights_only=url is not None)
            source = dataclasses.replace(loaded, url=url)
            hint = f" (the cached download of {url}: delete it to download again)" if url else ""
            check_sha256(f"Teacher checkpoint {path!r}{hint}", source.sha256, expected)
    return freeze(network), source


class QueryBudgetExceeded(RuntimeError):
    """A black-box teacher was asked about more images than its query budget allows."""


class BlackBoxTeacher(nn.Module):
    """A teacher seen only through its class probabilities, counting and capping the images it is asked about.

    Wraps a local network or any callable (e.g. a client of a remote prediction endpoint) mapping a batch of
    images to logits or probabilities. Like any teacher it answers logits: log p of its probabilities p
    (softmax(log p / T) = softmax(z / T) for its logits z, so every loss reads it as it reads a network's logits).
    Every call is counted on its :class:`TeacherCost` meter (:attr:`cost`, the one a
    :class:`~lightning_kd.core.module.DistillationModule` logs), which raises :class:`QueryBudgetExceeded` before
    the teacher is asked anything when a call would take the count past ``budget``. The meter is part of the
    ``state_dict`` (module extra state), so it survives a checkpoint and resume. Validation never scores it
    (``queries_are_counted``): every image it is asked about counts against its budget.

    Args:
        model: the teacher: an ``nn.Module`` or a callable taking a ``(B, ...)`` tensor.
        budget: the most images the teacher may ever be asked about; ``None`` for no limit.
        returns: whether ``model`` returns ``"logits"`` (softmax is applied) or ``"probabilities"``.
    """

    def __init__(
        self,
        model: Union[nn.Module, Callable[[torch.Tensor], torch.Tensor]],
        budget: Optional[int] = None,
        returns: Literal["logits", "probabilities"] = "logits",
    ) -> None:
        super().__init__()
        if returns not in ("logits", "probabilities"):
            raise ValueError(f"returns must be 'logits' or 'probabilities', got {returns!r}")
        self.model = model
        self.cost = TeacherCost(model, budget=budget)
        self.returns = returns

    queries_are_counted = True

    @property
    def queries(self) -> int:
        """Images asked about so far (by this process): the meter's count."""
        return self.cost.images

    @property
    def budget(self) -> Optional[int]:
        return self.cost.budget

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, K)``, log p in float32 (a probability 0 clamped to the smallest positive float), for the ``B``
        images of ``x``, counted against the budget before the teacher is asked."""
        self.cost.add(x)
        with torch.no_grad():
            outputs = torch.as_tensor(self.model(x), device=x.device).float()
        if self.returns == "logits":
            return outputs.log_softmax(dim=-1)
        return outputs.clamp_min(torch.finfo(outputs.dtype).tiny).log()

    def get_extra_state(self) -> dict:
        return self.cost.state_dict()

    def set_extra_state(self, state: dict) -> None:
        if "queries" in state:  # written before the meter: the query count alone
            self.cost.images = int(state["queries"])
        else:
            self.cost.load_state_dict(state)

    def extra_repr(self) -> str:
        return f"queries={self.queries}, budget={self.budget}, returns={self.returns!r}"


def forward_flops(model: nn.Module, sample: torch.Tensor) -> int:
    """FLOPs of one forward pass of ``model`` on ``sample`` (``torch.utils.flop_counter.FlopCounterMode``).

    Counts matrix multiplications and convolutions (a multiply-add is 2 FLOPs). The pass runs in eval mode
    under ``torch.no_grad``, so BatchNorm statistics do not move; the previous mode is restored.
    """
    with evaluation_mode(model), FlopCounterMode(display=False) as counter:
        model(sample)
    return counter.get_total_flops()


class FlopsPerImage:
    """Forward FLOPs per image of a network, counted once per image shape on a one-image probe.

    Returns ``None`` for what cannot be counted (:attr:`countable` is false): a callable that is no ``nn.Module``,
    e.g. a remote endpoint, or a :class:`BlackBoxTeacher` around one. A :class:`BlackBoxTeacher` around a network
    is probed on that network, costing no query.
    """

    def __init__(self, network: Union[nn.Module, Callable]) -> None:
        self.network = network.model if isinstance(network, BlackBoxTeacher) else network
        self._per_shape: dict[tuple[int, ...], int] = {}

    @property
    def countable(self) -> bool:
        return isinstance(self.network, nn.Module)

    def __call__(self, x: torch.Tensor) -> Optional[int]:
        if not self.countable:
            return None
        shape = tuple(x.shape[1:])
        if shape not in self._per_shape:
            self._per_shape[shape] = forward_flops(self.network, x[:1])
        return self._per_shape[shape]


class TeacherCost:
    """The meter of a teacher's cost: images sent through it, for any purpose, and their forward FLOPs.

    The one count of a teacher: a :class:`BlackBoxTeacher` meters every query with it (and a budget, checked before
    the teacher is asked); a :class:`~lightning_kd.core.module.DistillationModule` meters the images of its training
    steps with it (:func:`teacher_meter`) and logs it as ``teacher/*``. Plain Python integers derived from tensor
    shapes, so counting never waits for the accelerator. Under DDP each process meters what it sends (the logging
    sums them). ``flops`` is ``None`` when the teacher's FLOPs cannot be counted (see :class:`FlopsPerImage`).

    Args:
        teacher: the network (or callable) whose cost is metered.
        budget: the most images it may be sent in all; ``None`` for no limit.
    """

    def __init__(self, teacher: Union[nn.Module, Callable], budget: Optional[int] = None) -> None:
        if budget is not None and budget < 0:
            raise ValueError(f"budget must be >= 0 images (or None for no limit), got {budget}")
        self.flops_per_image = FlopsPerImage(teacher)
        self.budget = budget
        self.clear()

    def clear(self) -> None:
        """Zero every count (a process whose share of a restored count is none)."""
        self.images = 0
        self.flops: Optional[int] = 0 if self.flops_per_image.countable else None
        self.images_logged = 0  # the total at the last per-epoch report

    @torch.compiler.disable  # host-side bookkeeping: never traced into a compiled teacher's graph
    def add(self, x: torch.Tensor) -> None:
        """Count the images of the batch ``x`` about to go through the teacher; one that would take the count past
        the budget raises :class:`QueryBudgetExceeded` and counts nothing."""
        asked = x.shape[0]
        if self.budget is not None and self.images + asked > self.budget:
            raise QueryBudgetExceeded(
                f"Teacher query budget exceeded: {self.images} images already queried, {asked} more asked, "
                f"budget {self.budget}"
            )
        per_image = self.flops_per_image(x)
        self.images += asked
        self.flops = None if per_image is None or self.flops is None else self.flops + per_image * asked

    def since_last_report(self) -> int:
        """Images counted since the previous call (per-epoch figure), and mark them reported."""
        new, self.images_logged = self.images - self.images_logged, self.images
        return new

    def state_dict(self) -> dict:
        return {"images": self.images, "flops": self.flops, "images_logged": self.images_logged}

    def load_state_dict(self, state: dict) -> None:
        self.images, self.flops, self.images_logged = state["images"], state["flops"], state["images_logged"]


def teacher_meter(teacher: Union[nn.Module, Callable]) -> TeacherCost:
    """The meter of ``teacher``'s cost: a :class:`BlackBoxTeacher`'s own (it meters every query), else a new one."""
    return teacher.cost if isinstance(teacher, BlackBoxTeacher) else TeacherCost(teacher)
