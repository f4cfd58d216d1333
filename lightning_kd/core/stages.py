"""Training stages: consecutive runs of epochs, each with its own terms, optimizer and learning-rate schedule.

FitNets trains its regressor on the hint alone before the KD stage; RepDistiller pre-trains the connectors of
AB, FT and FSP the same way (``helper/pretrain.py``: a fresh SGD at constant learning rate, then the main
optimizer and schedule start from scratch). A method declares its stages with
:meth:`~lightning_kd.core.DistillationModule.training_stages`; the base builds a new optimizer and scheduler at every
boundary and records the stage in checkpoints, so a run resumed in any stage goes on with that stage's
optimizer state.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Optional

from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of training.

    Args:
        name: what the method tests in its hooks (``if self.stage.name == "hint": ...``).
        epochs: its length in epochs; ``None`` (the last stage only): until the end of training.
        optimizer: builds the stage's optimizer from the trainable parameters; ``None``: the module's ``optimizer``.
        lr_scheduler: builds the stage's scheduler from its optimizer, counting epochs from the stage's start;
            ``None``: the module's ``lr_scheduler``.
        constant_lr: no scheduler in this stage (the learning rate stays the optimizer's).
        teacher: whether the stage runs the teacher in training (a teacher-free stage skips its forward).
    """

    name: str
    epochs: Optional[int] = None
    optimizer: Optional[OptimizerCallable] = None
    lr_scheduler: Optional[LRSchedulerCallable] = None
    constant_lr: bool = False
    teacher: bool = True


def check_stages(stages: Sequence[Stage]) -> None:
    """Raise one clear ``ValueError`` unless ``stages`` is non-empty, uniquely named, and only the last has no
    length."""
    if not stages:
        raise ValueError("a method needs at least one stage")
    names = [stage.name for stage in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"stage names must be unique, got {names}")
    for stage in stages[:-1]:
        if stage.epochs is None or stage.epochs < 0:
            raise ValueError(f"stage {stage.name!r} needs a length of epochs >= 0 (only the last may run to the end)")
    if stages[-1].epochs is not None and stages[-1].epochs < 0:
        raise ValueError(f"stage {stages[-1].name!r} has a negative length {stages[-1].epochs}")


def stage_index(stages: Sequence[Stage], epoch: int) -> int:
    """Index of the stage that trains epoch ``epoch`` (0-based); past the last stage's end, the last."""
    start = 0
    for index, stage in enumerate(stages[:-1]):
        start += stage.epochs  # type: ignore[operator]
        if epoch < start:
            return index
    return len(stages) - 1


def stage_start(stages: Sequence[Stage], index: int) -> int:
    """The first epoch of stage ``index``."""
    return sum(stage.epochs for stage in stages[:index])  # type: ignore[misc]
