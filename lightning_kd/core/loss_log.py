"""The training loss terms kept on the device between logging steps.

``self.log`` costs about half a millisecond per call and value on a CPU, and a value shown in the progress bar is
copied to the host at every step (a host–device synchronisation on a GPU). :class:`LossLog` instead adds each step's
terms to on-device sums; the module logs the latest values every ``log_every_n_steps`` steps and the epoch's
batch-weighted means at its end: the same metrics (``train/loss_step``, ``train/loss_epoch``, one pair per term), a
step that never waits for the device in between.
"""
from __future__ import annotations

import torch


class LossLog:
    """The latest value and the epoch's batch-weighted sum and sample count of every named loss term, on the device.

    A term missing from some steps (a method's phase) is averaged over the steps that had it, as Lightning's epoch
    aggregation does. Its state travels in checkpoints, so a run resumed mid-epoch logs the whole epoch's means.
    """

    def __init__(self) -> None:
        self.latest: dict[str, torch.Tensor] = {}
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, terms: dict[str, torch.Tensor], batch_size: int) -> None:
        """Record one step's terms (detached, float32) for a batch of ``batch_size`` samples; :attr:`latest` holds
        this step's terms only (a term of an earlier stage is not logged again)."""
        self.latest = {name: value.detach().float() for name, value in terms.items()}
        for name, value in self.latest.items():
            self.sums[name] = self.sums[name] + value * batch_size if name in self.sums else value * batch_size
            self.counts[name] = self.counts.get(name, 0) + batch_size

    def epoch_means(self) -> dict[str, torch.Tensor]:
        """Each term's batch-weighted mean over the steps of the epoch so far."""
        return {name: total / self.counts[name] for name, total in self.sums.items()}

    def reset(self) -> None:
        """Start a new epoch (the latest values are kept for the progress bar)."""
        self.sums, self.counts = {}, {}

    def state_dict(self) -> dict:
        return {"sums": dict(self.sums), "counts": dict(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        self.sums, self.counts = dict(state["sums"]), dict(state["counts"])
