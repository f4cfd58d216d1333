"""``FitSummary``: at the end of ``fit``, one block that says how the run went and where its checkpoints are.

::

    lightning-kd: fit finished (KD, resnet20 -> resnet8, 4 epochs, 1563 steps)
      student top-1: best 75.46% (epoch 3), last 75.46%
      teacher top-1: 83.70%   gap (best): -8.24 points
      checkpoints: best runs/.../best-epoch003.ckpt, last runs/.../last.ckpt

The same figures go to ``fit_summary.json`` (accuracies as logged, fractions in [0, 1]) and, with a W&B logger, to
the W&B run's summary (``best/val/acc1``, ``best/epoch``, ...; W&B's own summary of ``val/acc1`` is its maximum).
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import pytorch_lightning as pl
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.trainer.states import TrainerFn

from lightning_kd.core.checkpointing import write_atomically

__all__ = ["FitSummary", "SUMMARY_FILE"]

SUMMARY_FILE = "fit_summary.json"


def _network_name(spec: Any, network: Any) -> Optional[str]:
    """'resnet8' for a network given by name, the class name of one given as a spec or a module, None for none."""
    if isinstance(spec, str):
        return spec
    class_path = spec.get("class_path") if hasattr(spec, "get") else None
    if isinstance(class_path, str):
        return class_path.rsplit(".", 1)[-1]
    return None if network is None else type(network).__name__


def wandb_runs(trainer: pl.Trainer) -> list:
    """The W&B runs of the trainer's W&B loggers (on the first process; none elsewhere)."""
    if not trainer.is_global_zero:
        return []
    return [logger.experiment for logger in trainer.loggers if isinstance(logger, WandbLogger)]


class FitSummary(pl.Callback):
    """Print a summary block at the end of ``fit`` (rank 0) and write it as ``fit_summary.json``.

    Follows ``monitor`` (``val/acc1``) in ``trainer.callback_metrics`` at the end of every validation: its best
    value and the epoch of that best, its last value, and ``teacher_monitor`` (``val/teacher_acc1``, scored once a
    fit) when logged; then, at the end of fit, the paths of ``trainer.checkpoint_callback``'s best and last
    checkpoints. The JSON is written beside the last checkpoint (else the best one), else in ``trainer.log_dir``.
    The figures are saved in every checkpoint, so a resumed fit reports the best over the whole run.

    Args:
        monitor: the student's top-1 accuracy metric.
        teacher_monitor: the teacher's top-1 accuracy metric.
        filename: name of the JSON file; ``None`` writes none.
    """

    def __init__(self, monitor: str = "val/acc1", teacher_monitor: str = "val/teacher_acc1",
                 filename: Optional[str] = SUMMARY_FILE) -> None:
        self.monitor = monitor
        self.teacher_monitor = teacher_monitor
        self.filename = filename
        self.best: Optional[float] = None
        self.best_epoch: Optional[int] = None
        self.last: Optional[float] = None
        self.teacher: Optional[float] = None

    # ------------------------------------------------------------------ tracking
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Remove a summary a previous fit left in the checkpoint directory: while this fit runs (or if it fails),
        no file there describes another run."""
        directory = getattr(trainer.checkpoint_callback, "dirpath", None)
        if trainer.is_global_zero and self.filename is not None and directory:
            stale = os.path.join(directory, self.filename)
            if os.path.isfile(stale):
                os.remove(stale)
        for experiment in wandb_runs(trainer):  # W&B's summary of the accuracies: their best, not their last
            experiment.define_metric(self.monitor, summary="max")
            experiment.define_metric(self.teacher_monitor, summary="max")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        metrics = trainer.callback_metrics
        if self.monitor in metrics:
            value = float(metrics[self.monitor])
            self.last = value
            if self.best is None or value > self.best:
                self.best, self.best_epoch = value, int(trainer.current_epoch)
        if self.teacher_monitor in metrics:
            self.teacher = float(metrics[self.teacher_monitor])

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "last": self.last, "teacher": self.teacher}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for name in ("best", "best_epoch", "last", "teacher"):
            setattr(self, name, state_dict.get(name))

    # ------------------------------------------------------------------ reporting
    def summary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """The run's figures: method, networks, epochs and steps, accuracies, the gap, the checkpoints."""
        checkpoint = trainer.checkpoint_callback
        gap = None
        if self.best is not None and self.teacher is not None:
            gap = round(100.0 * (self.best - self.teacher), 2)
        return {
            "method": type(pl_module).__name__,
            "teacher": _network_name(pl_module.hparams.get("teacher"), getattr(pl_module, "teacher", None)),
            "student": _network_name(pl_module.hparams.get("student"), getattr(pl_module, "student", None)),
            "epochs": int(trainer.current_epoch),
            "steps": int(trainer.global_step),
            "validated": self.last is not None,
            "monitor": self.monitor,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "last": self.last,
            "teacher_monitor": self.teacher_monitor,
            "teacher_acc1": self.teacher,
            "gap_points": gap,
            "checkpoints": {
                "best": (getattr(checkpoint, "best_model_path", "") or None) if checkpoint else None,
                "last": (getattr(checkpoint, "last_model_path", "") or None) if checkpoint else None,
            },
        }

    @staticmethod
    def format(summary: dict[str, Any]) -> str:
        """The summary block, as printed."""
        pair = " -> ".join(name for name in (summary["teacher"], summary["student"]) if name)
        header = ", ".join(part for part in (summary["method"], pair) if part)
        epochs, steps = summary["epochs"], summary["steps"]
        counts = f"{epochs} epoch{'s' * (epochs != 1)}, {steps} step{'s' * (steps != 1)}"
        lines = [f"lightning-kd: fit finished ({header}, {counts})"]
        if not summary["validated"]:
            lines.append(f"  no validation ran: no {summary['monitor']} to report")
        else:
            lines.append(f"  student top-1: best {summary['best']:.2%} (epoch {summary['best_epoch']}), "
                         f"last {summary['last']:.2%}")
            if summary["teacher_acc1"] is not None:
                lines.append(f"  teacher top-1: {summary['teacher_acc1']:.2%}   "
                             f"gap (best): {summary['gap_points']:+.2f} points")
        paths = summary["checkpoints"]
        saved = [f"{kind} {path}" for kind, path in paths.items() if path]
        lines.append(f"  checkpoints: {', '.join(saved)}" if saved else "  checkpoints: none saved")
        return "\n".join(lines)

    def summary_path(self, trainer: pl.Trainer, summary: dict[str, Any]) -> Optional[str]:
        """Where ``fit_summary.json`` goes: beside the last (else best) checkpoint, else in the trainer's log dir."""
        if self.filename is None:
            return None
        checkpoint = summary["checkpoints"]["last"] or summary["checkpoints"]["best"]
        directory = os.path.dirname(checkpoint) if checkpoint else (trainer.log_dir or trainer.default_root_dir)
        return os.path.join(directory, self.filename)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After every callback's ``on_train_end`` (the last checkpoint is saved): report on rank 0."""
        if trainer.is_global_zero:
            self._report(trainer, self.summary(trainer, pl_module))

    def _report(self, trainer: pl.Trainer, summary: dict[str, Any]) -> None:
        path = self.summary_path(trainer, summary)
        if path is not None:
            text = json.dumps(summary, indent=2) + "\n"

            def write(tmp: str) -> None:
                with open(tmp, "w") as handle:
                    handle.write(text)

            write_atomically(path, write)
        for experiment in wandb_runs(trainer):
            experiment.summary.update({
                f"best/{self.monitor}": summary["best"], "best/epoch": summary["best_epoch"],
                f"last/{self.monitor}": summary["last"], "best/gap_to_teacher_points": summary["gap_points"],
            })
        # print, not logging: the summary is the run's result and shows whatever the logging configuration.
        print(self.format(summary) + (f"\n  summary: {path}" if path else ""), flush=True)
