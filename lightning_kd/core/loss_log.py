"""The training loss terms kept on the device between logging steps.

``self.log`` costs about half a millisecond per call and value on a CPU, and a value shown in the progress bar is
copied to the host at every step (a host–device synchronisation on a GPU). :class:`LossLog` instead adds each step's
terms to on-device sums; the module logs the latest values every ``log_every_n_steps`` steps and the epoch's
batch-weighted means at its end: the same metrics (``train/loss_step``, ``train/loss_epoch``, one pair per term), a
step that never waits for the device in between.
"""
from __future__ import annotations

from typing import Optional

import torch


class LossLog:
    """The latest values and the epoch's batch-weighted sums and sample counts of the named loss terms, on the device.

    A step's terms are kept as one stacked vector (one stack, one multiply-add per step, whatever the number of
    terms). A term missing from some steps (a method's phase) is averaged over the steps that had it, as Lightning's
    epoch aggregation does. Its state travels in checkpoints, so a run resumed mid-epoch logs the whole epoch's means.
    """

    def __init__(self) -> None:
        self.names: tuple[str, ...] = ()
        self.values: Optional[torch.Tensor] = None  # this step's terms (detached, float32), in the order of names
        self.sums: dict[tuple[str, ...], torch.Tensor] = {}  # per set of names: the sum of value · batch size
        self.counts: dict[tuple[str, ...], int] = {}

    def add(self, terms: dict[str, torch.Tensor], batch_size: int) -> None:
        """Record one step's terms for a batch of ``batch_size`` samples; :attr:`latest` holds this step's terms
        only (a term of an earlier stage is not logged again)."""
        self.names = tuple(terms)
        self.values = torch.stack(list(terms.values())).detach().float()
        weighted = self.values * batch_size
        self.sums[self.names] = self.sums[self.names] + weighted if self.names in self.sums else weighted
        self.counts[self.names] = self.counts.get(self.names, 0) + batch_size

    @property
    def latest(self) -> dict[str, torch.Tensor]:
        """This step's terms by name."""
        return dict(zip(self.names, self.values)) if self.values is not None else {}

    def _totals(self) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """Each term's weighted sum and sample count over the epoch so far, whatever the sets it came in."""
        totals: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        for names, vector in self.sums.items():
            for name, value in zip(names, vector):
                totals[name] = totals[name] + value if name in totals else value
                counts[name] = counts.get(name, 0) + self.counts[names]
        return totals, counts

    def epoch_means(self) -> dict[str, torch.Tensor]:
        """Each term's batch-weighted mean over the steps of the epoch so far."""
        totals, counts = self._totals()
        return {name: total / counts[name] for name, total in totals.items()}

    def reset(self) -> None:
        """Start a new epoch (the latest values are kept for the progress bar)."""
        self.sums, self.counts = {}, {}

    def state_dict(self) -> dict:
        """The epoch's sums and counts as kept (per set of names), so a resumed run adds to the very same sums."""
        return {"segments": [{"names": list(names), "sums": vector, "count": self.counts[names]}
                             for names, vector in self.sums.items()]}

    def load_state_dict(self, state: dict) -> None:
        if "segments" not in state:  # the format of the first release candidate: one sum and count per name
            state = {"segments": [{"names": [name], "sums": total.reshape(1), "count": state["counts"][name]}
                                  for name, total in state["sums"].items()]}
        self.sums = {tuple(segment["names"]): segment["sums"] for segment in state["segments"]}
        self.counts = {tuple(segment["names"]): segment["count"] for segment in state["segments"]}
