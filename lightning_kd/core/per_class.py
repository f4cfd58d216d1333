"""``PerClassReport``: per-class accuracy of student and teacher, and their confusion matrices, at the end of test and
of a fit's last validation.

The counts come from the evaluation pass itself
(:meth:`~lightning_kd.core.module.DistillationModule.confusion_matrices`: torchmetrics'
``MulticlassConfusionMatrix``, no extra forward). Written as ``per_class_val.json`` (fit) and ``per_class_test.json``
(test) beside ``fit_summary.json``::

    {"stage": "test", "method": "KD", "global_step": 1564, "checkpoint": "runs/.../last.ckpt",
     "classes": [{"index": 0, "class": "airplane", "support": 1000, "student_acc1": 0.81, "teacher_acc1": 0.86,
                  "gap_points": -5.0}, ...],
     "confusion_matrix": {"student": [[...], ...], "teacher": [[...], ...] or null}}

(rows: true class, columns: predicted class; the teacher only where it was scored, never a black box). With a W&B
logger the table goes to W&B as ``<stage>/per_class`` (class, student acc, teacher acc, gap) and each confusion
matrix as W&B's confusion-matrix chart (``<stage>/confusion_matrix``, ``<stage>/teacher_confusion_matrix``).
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import pytorch_lightning as pl
import torch

from lightning_kd.core.checkpointing import write_atomically
from lightning_kd.core.predictions import data_class_names
from lightning_kd.core.summary import wandb_runs

__all__ = ["PerClassReport", "PER_CLASS_FILE", "per_class_table"]

PER_CLASS_FILE = "per_class_{stage}.json"


def _accuracies(matrix: Optional[torch.Tensor]) -> list[Optional[float]]:
    """Per true class: correct / seen (``None`` for a class without images, or without a matrix)."""
    if matrix is None:
        return []
    support = matrix.sum(dim=1)
    return [None if int(n) == 0 else float(c) / float(n) for c, n in zip(matrix.diagonal().tolist(), support.tolist())]


def per_class_table(student: torch.Tensor, teacher: Optional[torch.Tensor], names: list[str]) -> list[dict[str, Any]]:
    """One row per class of the confusion matrices ``student`` and ``teacher`` (rows true, columns predicted): its
    index, name, images (``support``), both top-1 accuracies and the gap in points (student − teacher)."""
    student_acc, teacher_acc = _accuracies(student), _accuracies(teacher) or [None] * len(names)
    rows = []
    supports = student.sum(1).tolist()
    for index, (name, support, ours, theirs) in enumerate(zip(names, supports, student_acc, teacher_acc)):
        gap = None if ours is None or theirs is None else round(100.0 * (ours - theirs), 2)
        rows.append({"index": index, "class": name, "support": int(support), "student_acc1": ours,
                     "teacher_acc1": theirs, "gap_points": gap})
    return rows


def _format_json(results: dict[str, Any]) -> str:
    """``results`` as JSON, one line per class row and per confusion-matrix row (readable, and short for 1000
    classes)."""

    def rows(items: list, indent: str) -> str:
        return "[\n" + ",\n".join(f"{indent} {json.dumps(item)}" for item in items) + f"\n{indent}]"

    lines = [f" {json.dumps(key)}: {json.dumps(value)}," for key, value in results.items()
             if key not in ("classes", "confusion_matrix")]
    lines.append(f' "classes": {rows(results["classes"], " ")},')
    matrices = [f'  {json.dumps(who)}: {"null" if m is None else rows(m, "  ")}'
                for who, m in results["confusion_matrix"].items()]
    lines.append(' "confusion_matrix": {\n' + ",\n".join(matrices) + "\n }")
    return "{\n" + "\n".join(lines) + "\n}\n"


def _log_to_wandb(experiment, stage: str, results: dict[str, Any]) -> None:
    """The table as ``<stage>/per_class`` and each confusion matrix as W&B's confusion-matrix chart (its nonzero
    cells: the same chart ``wandb.plot.confusion_matrix`` draws, from counts instead of every image's labels)."""
    import wandb

    rows = results["classes"]
    names = [row["class"] for row in rows]
    columns = ["class", "student_acc1", "teacher_acc1", "gap_points"]
    logged = {f"{stage}/per_class": wandb.Table(columns=columns, data=[[row[c] for c in columns] for row in rows])}
    for who, matrix in results["confusion_matrix"].items():
        if matrix is None:
            continue
        cells = [[names[i], names[j], count] for i, line in enumerate(matrix) for j, count in enumerate(line) if count]
        table = wandb.Table(columns=["Actual", "Predicted", "nPredictions"], data=cells)
        fields = {"Actual": "Actual", "Predicted": "Predicted", "nPredictions": "nPredictions"}
        key = f"{stage}/confusion_matrix" if who == "student" else f"{stage}/{who}_confusion_matrix"
        logged[key] = wandb.plot_table("wandb/confusion_matrix/v1", table, fields, {"title": f"{who} ({stage})"})
    experiment.log(logged)


class PerClassReport(pl.Callback):
    """Per-class results of the last validation of ``fit`` and of ``test``: a JSON file and, with a W&B logger, a
    table and confusion-matrix charts (see the module's documentation).

    The fit's file goes where ``fit_summary.json`` goes (the checkpoint directory, else the trainer's log dir); the
    test's beside the tested checkpoint (``ckpt_path``), else there too. A fit removes the file a previous fit left,
    so that a failed fit leaves none. Works with a :class:`~lightning_kd.core.module.DistillationModule`; other
    modules are left alone.

    Args:
        filename: the file's name, ``{stage}`` replaced by ``val`` or ``test``; ``None`` writes no file.
    """

    def __init__(self, filename: Optional[str] = PER_CLASS_FILE) -> None:
        self.filename = filename
        self._fit_results: Optional[dict[str, Any]] = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_results = None
        stale = self._path(trainer, "val")
        if trainer.is_global_zero and stale is not None and os.path.isfile(stale):
            os.remove(stale)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Gather the last validation's counts on every process (before the strategy tears down)."""
        self._fit_results = self._results(trainer, pl_module, "val")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._fit_results is not None and trainer.is_global_zero:
            self._report(trainer, "val", self._fit_results)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        results = self._results(trainer, pl_module, "test")
        if results is not None and trainer.is_global_zero:
            self._report(trainer, "test", results)

    @staticmethod
    def _results(trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> Optional[dict[str, Any]]:
        """The pass's figures, or ``None`` when the module keeps no confusion matrix or the pass saw no image."""
        if not hasattr(pl_module, "confusion_matrices"):
            return None
        matrices = pl_module.confusion_matrices(stage)
        student, teacher = matrices["student"], matrices["teacher"]
        if student is None:
            return None
        names = data_class_names(trainer, student.shape[0]) or [str(i) for i in range(student.shape[0])]
        return {
            "stage": stage,
            "method": type(pl_module).__name__,
            "global_step": int(trainer.global_step),
            "checkpoint": trainer.ckpt_path if stage == "test" else None,
            "classes": per_class_table(student, teacher, names),
            "confusion_matrix": {who: None if m is None else m.tolist() for who, m in matrices.items()},
        }

    def _path(self, trainer: pl.Trainer, stage: str) -> Optional[str]:
        """Beside the tested checkpoint (test), else in the checkpoint directory, else in the trainer's log dir."""
        if self.filename is None:
            return None
        tested = trainer.ckpt_path if stage == "test" and trainer.ckpt_path else None
        directory = os.path.dirname(os.path.abspath(tested)) if tested and os.path.isfile(tested) else (
            getattr(trainer.checkpoint_callback, "dirpath", None) or trainer.log_dir or trainer.default_root_dir
        )
        return os.path.join(directory, self.filename.format(stage=stage))

    def _report(self, trainer: pl.Trainer, stage: str, results: dict[str, Any]) -> None:
        path = self._path(trainer, stage)
        if path is not None:
            text = _format_json(results)

            def write(tmp: str) -> None:
                with open(tmp, "w") as handle:
                    handle.write(text)

            write_atomically(path, write)
            print(f"lightning-kd: per-class accuracy and confusion matrices ({stage}): {path}", flush=True)
        for experiment in wandb_runs(trainer):
            _log_to_wandb(experiment, stage, results)
