"""Samplers whose order is a pure function of ``(seed, epoch)``, class-pair batches (CS-KD), and the training loader
that keys samples by ``(epoch, index)`` and resumes mid-epoch.

``torch.utils.data.RandomSampler`` draws its permutation from the global RNG (or from a
generator whose state advances every epoch), so a run that is interrupted and resumed
from a checkpoint sees a different data order than an uninterrupted run.
:class:`EpochSeededRandomSampler` instead derives each epoch's permutation from
``(seed, epoch)`` alone; Lightning calls :meth:`EpochSeededRandomSampler.set_epoch` at the
start of every training epoch (also after resuming), so the order is reproducible.

Under DDP, Lightning wraps any custom sampler in a
``lightning_fabric.utilities.distributed.DistributedSamplerWrapper`` that forwards
``set_epoch`` to this sampler and shards its (already shuffled) indices across ranks.

:class:`ClassPairBatchSampler` follows each batch with a partner of the same class for every
sample, as class-wise self-distillation (CS-KD) needs.

:class:`ResumableLoader` serves the training batches: its dataset receives ``(epoch, index)`` keys, from which the
augmentation is drawn (:mod:`lightning_kd.data.augment`), and its position in the epoch is part of every checkpoint.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence, Sized
from typing import Any, Optional, Union

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Sampler

__all__ = ["ClassPairBatchSampler", "EpochSeededRandomSampler", "ResumableLoader"]

_UINT64_MASK = (1 << 64) - 1


class EpochSeededRandomSampler(Sampler[int]):
    """Random permutation of ``range(n)`` that depends only on ``(seed, epoch)``.

    Args:
        data_source: the dataset (anything with ``len()``) or directly its length.
        seed: base seed; two samplers with the same seed and epoch yield the same order.
    """

    def __init__(self, data_source: Union[Sized, int], seed: int = 0) -> None:
        if isinstance(data_source, bool):
            raise TypeError("data_source must be a sized dataset or an int length, got a bool")
        if isinstance(data_source, (int, np.integer)):
            num_samples = int(data_source)
        else:
            num_samples = len(data_source)
        if num_samples < 0:
            raise ValueError(f"data_source length must be >= 0, got {num_samples}")
        self.num_samples = num_samples
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch`` for the next iteration."""
        epoch = int(epoch)
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = epoch

    def _generator_seed(self) -> int:
        # SeedSequence mixes (seed, epoch) so that e.g. (0, 1) and (1, 0) do not collide,
        # and is stable across processes, platforms and Python versions.
        state = np.random.SeedSequence([self.seed & _UINT64_MASK, self.epoch]).generate_state(1, dtype=np.uint64)
        return int(state[0])

    def permutation(self) -> torch.Tensor:
        """The permutation (a 1-D int64 tensor) for the current ``(seed, epoch)``."""
        generator = torch.Generator()
        generator.manual_seed(self._generator_seed())
        return torch.randperm(self.num_samples, generator=generator)

    def __iter__(self) -> Iterator[int]:
        return iter(self.permutation().tolist())

    def __len__(self) -> int:
        return self.num_samples

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_samples={self.num_samples}, seed={self.seed}, epoch={self.epoch})"


def same_class_partners(anchors: Sequence[int], targets: Sequence[int]) -> list[int]:
    """For each anchor, the next anchor of its class in ``anchors`` (cyclically; itself if alone in its class).

    In a shuffled order this is a random other sample of the same class, and every anchor is also
    exactly one anchor's partner.
    """
    positions = defaultdict(list)
    for position, index in enumerate(anchors):
        positions[int(targets[index])].append(position)
    partners = list(anchors)
    for same_class in positions.values():
        for here, there in zip(same_class, same_class[1:] + same_class[:1]):
            partners[here] = anchors[there]
    return partners


class ClassPairBatchSampler(BatchSampler):
    """Batches of ``batch_size`` indices drawn from ``sampler``, followed by as many partners of the same classes.

    A batch reads ``[a_1 … a_B, p_1 … p_B]`` with ``targets[p_i] == targets[a_i]`` (Yun et al. 2020, CS-KD):
    the model splits it in halves. Partners come from the epoch's own anchors (:func:`same_class_partners`),
    so the pairing depends only on the anchor order and reshuffles with it (the authors' sampler instead
    draws each partner from the whole class, with repeats; here every sample is a partner once an epoch).

    Under DDP, Lightning re-creates this batch sampler around a ``DistributedSampler`` (it passes it as
    ``sampler``, which is why that argument keeps its name), so each rank pairs within its own shard, and
    calls ``set_epoch`` on that sampler every epoch. With ``use_distributed_sampler=False`` nothing is
    sharded (every rank sees all the data), as for any other sampler.

    Args:
        sampler: the anchor order, e.g. an :class:`EpochSeededRandomSampler` or a ``DistributedSampler``.
        batch_size: anchors per batch (a batch holds twice as many samples).
        drop_last: drop the last batch when it has fewer than ``batch_size`` anchors.
        targets: the class of every dataset index.
    """

    def __init__(self, sampler: Sampler[int], batch_size: int, drop_last: bool, targets: Sequence[int]) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.targets = targets

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle: select the anchor order (and so the pairs) of ``epoch``."""
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        anchors = [int(index) for index in self.sampler]
        partners = same_class_partners(anchors, self.targets)
        for start in range(0, len(anchors), self.batch_size):
            batch = anchors[start : start + self.batch_size]
            if self.drop_last and len(batch) < self.batch_size:
                return
            yield batch + partners[start : start + self.batch_size]


class ResumableLoader(DataLoader):
    """The training ``DataLoader``: it indexes its dataset with ``(epoch, index)`` keys and resumes mid-epoch.

    * **Keys.** Every index of the (batch) sampler reaches the dataset as ``(epoch, index)``, ``epoch`` being the
      sampler's (``set_epoch``), so a :class:`~lightning_kd.data.augment.KeyedTransform` draws the sample's
      augmentation from it, in any worker process. The (batch) samplers themselves still yield plain indices.
    * **Late start.** The epoch is read when the first batch is asked for, not when the iterator is made: on resume
      Lightning makes the epoch's iterator before it calls ``set_epoch``, and worker processes take indices as soon
      as their iterator exists (a plain ``DataLoader`` with workers then shuffles the resumed epoch like epoch 0).
    * **State.** :meth:`state_dict` is the epoch and the number of batches served in it; after :meth:`load_state_dict`
      the next iteration over that epoch skips those batches (their indices are never loaded), any other epoch
      starts from its beginning. Lightning saves the state of a training loader with ``state_dict`` and
      ``load_state_dict`` in every checkpoint (``loops.fit_loop.state_dict.combined_loader``) and restores it before
      it iterates, so a run resumed mid-epoch sees the rest of the epoch instead of its beginning again. Under DDP
      every rank serves as many batches, so rank 0's count, the one saved, is every rank's.

    Give it a ``generator``: the seed of its worker processes is then not drawn from the global random state, which a
    resumed run restores and the model may draw from (dropout).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._served = {"epoch": 0, "batches": 0}
        self._resume: Optional[dict[str, int]] = None

    @property
    def _index_sampler(self) -> "_KeyedBatches":  # what DataLoader iterators draw the indices of each batch from
        return _KeyedBatches(self.batch_sampler, self._served)

    def __iter__(self) -> Iterator[Any]:  # a generator: runs from the first request for a batch on
        epoch = int(getattr(self.batch_sampler.sampler, "epoch", 0))
        resume, self._resume = self._resume, None
        start = resume["batches"] if resume is not None and resume["epoch"] == epoch else 0
        self._served.update(epoch=epoch, batches=start)
        for batch in super().__iter__():
            self._served["batches"] += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batches"}``: the epoch being served and how many of its batches were served."""
        return dict(self._served)

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Skip ``state["batches"]`` batches when epoch ``state["epoch"]`` is served next."""
        self._resume = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}


class _KeyedBatches:
    """The batches of ``batch_sampler`` as ``(epoch, index)`` keys, from batch ``served["batches"]`` of epoch
    ``served["epoch"]`` on (a :class:`ResumableLoader`'s position, read when the iteration starts)."""

    def __init__(self, batch_sampler: Iterable[list[int]], served: dict[str, int]) -> None:
        self.batch_sampler = batch_sampler
        self.served = served

    def __len__(self) -> int:
        return len(self.batch_sampler)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, start = self.served["epoch"], self.served["batches"]
        for batch in itertools.islice(self.batch_sampler, start, None):
            yield [(epoch, int(index)) for index in batch]
