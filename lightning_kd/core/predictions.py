"""``PredictionWriter``: the student's predictions of ``predict`` as one CSV or ``.pt`` file.

One row per image of the predict dataloader: its index in that dataset, the predicted class index, the predicted
class name (when the data module has ``class_names``) and the softmax probability of every class.

* ``.csv``: columns ``index``, ``predicted``, ``predicted_class`` (with class names), then one probability
  column per class, named by the class name (its index without class names; ``prob_<name>`` for a class named
  like one of the first three columns).
* ``.pt``: ``{"indices": int64 (N,), "predicted": int64 (N,), "probabilities": float32 (N, C),
  "classes": list of names or None}``.

Under DDP every process predicts its share of the images (Lightning's predict sampler gives each image to one
process only); rank 0 gathers them (``torch.distributed.gather_object``) and writes the one file, rows sorted by
index. The file appears whole (:func:`~lightning_kd.core.checkpointing.write_atomically`).
"""
from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from typing import Any, Optional

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.callbacks import BasePredictionWriter

from lightning_kd.core.checkpointing import write_atomically

__all__ = ["PREDICTION_FORMATS", "PredictionWriter", "read_predictions"]

PREDICTION_FORMATS = (".csv", ".pt")
FIXED_COLUMNS = ("index", "predicted", "predicted_class")


def _format(path: str) -> str:
    return os.path.splitext(path)[1].lower()


class PredictionWriter(BasePredictionWriter):
    """Write the predictions (the student's logits from ``predict_step``) to ``path`` at the end of ``predict``.

    Args:
        path: a ``.csv`` or ``.pt`` file; ``None`` writes nothing.
    """

    def __init__(self, path: Optional[str] = None) -> None:
        super().__init__(write_interval="epoch")
        if path is not None and _format(str(path)) not in PREDICTION_FORMATS:
            raise ValueError(
                f"predictions path {str(path)!r}: the file must end in .csv or .pt (one row per image, or a dict of "
                "tensors)"
            )
        self.path = None if path is None else str(path)

    def write_on_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, predictions: Sequence[Any],
                           batch_indices: Sequence[Any]) -> None:
        if self.path is None:
            return
        if len(batch_indices) > 1:
            raise RuntimeError(
                f"{type(self).__name__} writes the predictions of one dataloader, got {len(batch_indices)}"
            )
        logits = [batch.float() for batch in predictions]
        indices = [index for batch in (batch_indices[0] if batch_indices else []) for index in batch]
        probabilities = torch.cat(logits).softmax(dim=1) if logits else torch.empty(0, 0)
        if not indices and len(probabilities) and trainer.world_size > 1:
            raise RuntimeError(f"{type(self).__name__}: the dataloader's sample indices are unknown, which DDP needs")
        share = (torch.as_tensor(indices, dtype=torch.int64) if indices else torch.arange(len(probabilities)),
                 probabilities)
        shares = [share]
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            shares = [None] * trainer.world_size if trainer.is_global_zero else None
            dist.gather_object(share, shares, dst=0)
        if trainer.is_global_zero:
            self._write(trainer, shares)

    def _write(self, trainer: pl.Trainer, shares: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        shares = [(index, probability) for index, probability in shares if len(index)]
        if shares:
            indices = torch.cat([index for index, _ in shares])
            probabilities = torch.cat([probability for _, probability in shares])
        else:
            indices, probabilities = torch.empty(0, dtype=torch.int64), torch.empty(0, 0)
        order = torch.argsort(indices, stable=True)
        indices, probabilities = indices[order], probabilities[order]
        keep = torch.ones_like(indices, dtype=torch.bool)  # a sampler that pads repeats an image: keep it once
        keep[1:] = indices[1:] != indices[:-1]
        indices, probabilities = indices[keep], probabilities[keep]
        predicted = probabilities.argmax(dim=1) if len(probabilities) else torch.empty(0, dtype=torch.int64)
        classes = data_class_names(trainer, probabilities.shape[1])
        if _format(self.path) == ".pt":
            content = {"indices": indices, "predicted": predicted, "probabilities": probabilities, "classes": classes}
            write_atomically(self.path, lambda tmp: torch.save(content, tmp))
        else:
            write_atomically(self.path, lambda tmp: _write_csv(tmp, indices, predicted, probabilities, classes))
        print(f"lightning-kd: wrote the predictions of {len(indices)} images to {self.path}", flush=True)

def data_class_names(trainer: pl.Trainer, num_classes: int) -> Optional[list[str]]:
    """The data module's ``class_names`` when it has one name per output class, else ``None``."""
    try:
        names = getattr(trainer.datamodule, "class_names", None)
    except RuntimeError:  # a data module not set up
        names = None
    return [str(name) for name in names] if names is not None and len(names) == num_classes else None


def _probability_columns(classes: Optional[list[str]], num_classes: int) -> list[str]:
    if classes is None:
        return [str(index) for index in range(num_classes)]
    return [f"prob_{name}" if name in FIXED_COLUMNS else name for name in classes]


def _write_csv(path: str, indices: torch.Tensor, predicted: torch.Tensor, probabilities: torch.Tensor,
               classes: Optional[list[str]]) -> None:
    header = ["index", "predicted"] + (["predicted_class"] if classes else [])
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header + _probability_columns(classes, probabilities.shape[1]))
        for index, label, row in zip(indices.tolist(), predicted.tolist(), probabilities.tolist()):
            writer.writerow([index, label] + ([classes[label]] if classes else []) + [f"{p:.7g}" for p in row])


def read_predictions(path: str) -> dict[str, Any]:
    """A predictions file (``.csv`` or ``.pt``) as the ``.pt`` dict: ``indices``, ``predicted``, ``probabilities``,
    ``classes``."""
    if _format(path) == ".pt":
        return torch.load(path, map_location="cpu", weights_only=True)
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    header, body = rows[0], rows[1:]
    named = "predicted_class" in header
    first = 3 if named else 2
    columns = header[first:]
    prefix = "prob_"
    classes = [name[len(prefix):] if name.startswith(prefix) and name[len(prefix):] in FIXED_COLUMNS else name
               for name in columns]
    return {
        "indices": torch.tensor([int(row[0]) for row in body], dtype=torch.int64),
        "predicted": torch.tensor([int(row[1]) for row in body], dtype=torch.int64),
        "probabilities": torch.tensor([[float(p) for p in row[first:]] for row in body]).reshape(
            len(body), len(columns)
        ),
        "classes": classes if named else None,
    }
