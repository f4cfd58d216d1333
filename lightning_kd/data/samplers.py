"""Samplers whose order is a pure function of ``(seed, epoch)``.

``torch.utils.data.RandomSampler`` draws its permutation from the global RNG (or from a
generator whose state advances every epoch), so a run that is interrupted and resumed
from a checkpoint sees a different data order than an uninterrupted run.
:class:`EpochSeededRandomSampler` instead derives each epoch's permutation from
``(seed, epoch)`` alone; Lightning calls :meth:`EpochSeededRandomSampler.set_epoch` at the
start of every training epoch (also after resuming), so the order is reproducible.

Under DDP, Lightning wraps any custom sampler in a
``lightning_fabric.utilities.distributed.DistributedSamplerWrapper`` that forwards
``set_epoch`` to this sampler and shards its (already shuffled) indices across ranks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Union

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = ["EpochSeededRandomSampler"]

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
