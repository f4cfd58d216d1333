"""The training progress bar the command line shows: Lightning's, redrawn by time rather than at every step.

Lightning's :class:`~pytorch_lightning.callbacks.TQDMProgressBar` redraws the bar and its metrics after every training
batch (``refresh_rate=1``): about 0.35 ms a step on a CPU, a cost that a few-millisecond GPU step feels (issue 22's
step-overhead benchmark). :class:`ThrottledProgressBar` redraws it at most every ``min_interval`` seconds, as tqdm
itself does for a plain loop (its ``mininterval``, 0.1 s), and always at an epoch's last batch; validation bars and
everything logged are unchanged.
"""
from __future__ import annotations

import math
import time
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import TQDMProgressBar

from lightning_kd.core.checks import check_range

__all__ = ["ThrottledProgressBar"]


class ThrottledProgressBar(TQDMProgressBar):
    """:class:`~pytorch_lightning.callbacks.TQDMProgressBar` whose training bar is redrawn at most every
    ``min_interval`` seconds (the run's first batch included, and always at the last batch of each epoch).

    Args:
        min_interval: the least time between two redraws of the training bar, in seconds.
        **kwargs (Any): :class:`~pytorch_lightning.callbacks.TQDMProgressBar`'s arguments (``refresh_rate`` still
            bounds how often it may redraw, ``leave``).
    """

    def __init__(self, min_interval: float = 0.1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_range("min_interval", min_interval, low=0.0)
        self.min_interval = float(min_interval)
        self._drawn_at = -math.inf

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.monotonic()
        bar = self.train_progress_bar
        last = bar is not None and batch_idx + 1 == bar.total
        if last or now - self._drawn_at >= self.min_interval:
            self._drawn_at = now
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
