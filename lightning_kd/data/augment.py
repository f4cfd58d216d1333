"""Augmentation drawn from a counter-based generator: a training sample's random crop and flip are a pure function
of ``(seed, epoch, sample index)``.

Drawn from a stateful generator (torch's global one, in DataLoader workers or on the training device), the
augmentation of a sample would depend on the number of workers and DDP ranks, on the data path a module takes (per
sample or per batch) and on where a resumed run starts. Here the ``k``-th number of sample ``index`` in ``epoch`` is
SplitMix64 (Steele, Lea & Flood 2014, "Fast splittable pseudorandom number generators"; Vigna's ``splitmix64.c``)
at counter ``k`` from a key hashed from ``(seed, epoch, index)``. SplitMix64 is counter-based (its ``k``-th output
is a fixed mixing function of ``key + k·γ``), so every number is computed directly, exactly, in Python integers: the
same on every machine, in every worker process and on every rank.

A :class:`KeyedTransform` receives the sample's key with its image; :class:`~lightning_kd.data.base.TransformedSubset`
passes it, and the training loaders (:class:`~lightning_kd.data.samplers.ResumableLoader`) index their datasets with
``(epoch, index)`` keys.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torchvision.transforms.v2 import functional as TF

__all__ = ["KeyedTransform", "ResizedCropFlipNormalize", "SampleRandom", "resized_crop_box"]

_MASK = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's increment: 2^64 / golden ratio, odd


def _mix(z: int) -> int:
    """SplitMix64's output function (Stafford's "Mix13"), a bijection of 64-bit integers."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


class SampleRandom:
    """The random numbers of one sample in one epoch, numbered: the ``k``-th (``k = 1, 2, …``) is SplitMix64's
    output at counter ``k`` from the key of ``(seed, epoch, index)``.

    The key chains the words through SplitMix64's mixing (``key ← mix(key ⊕ word + γ)``), so with ``epoch`` and
    ``index`` dropped it is SplitMix64 seeded with ``seed``; any integers work (taken modulo 2^64).
    """

    def __init__(self, seed: int, epoch: int, index: int) -> None:
        key = 0
        for word in (seed, epoch, index):
            key = _mix(((key ^ (int(word) & _MASK)) + _GAMMA) & _MASK)
        self.key = key
        self.count = 0

    def bits64(self) -> int:
        """The next 64-bit number."""
        self.count += 1
        return _mix((self.key + self.count * _GAMMA) & _MASK)

    def below(self, n: int) -> int:
        """An integer uniform in ``[0, n)`` (Lemire's multiply-shift: bias below n / 2^64)."""
        return (self.bits64() * n) >> 64

    def uniform(self, low: float, high: float) -> float:
        """A float uniform in ``[low, high)`` (53 random bits)."""
        return low + (high - low) * ((self.bits64() >> 11) * 2.0**-53)


def resized_crop_box(
    random: SampleRandom,
    height: int,
    width: int,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` of a random area-and-aspect crop, with the draws from ``random``: the algorithm
    of torchvision's ``RandomResizedCrop.get_params`` (Szegedy et al. 2015's "Inception" crop), line for line."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * random.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(random.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            return random.below(height - h + 1), random.below(width - w + 1), h, w
    in_ratio = width / height  # fall back to a central crop
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class KeyedTransform:
    """A training transform whose randomness comes from the sample's key: ``transform(image, epoch, index)``.
    Subclasses implement :meth:`apply`.

    Args:
        seed: the run's seed, the first word of every key.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def random(self, epoch: int, index: int) -> SampleRandom:
        """The random numbers of sample ``index`` in ``epoch``."""
        return SampleRandom(self.seed, epoch, index)

    def __call__(self, image: Any, epoch: Optional[int] = None, index: Optional[int] = None) -> Any:
        """The augmentation of sample ``index`` in ``epoch``. Without a key (outside the training loaders) the key is
        drawn from torch's global generator: a fresh augmentation at every call, as a torchvision transform gives."""
        if epoch is None or index is None:
            epoch, index = (int(word) for word in torch.randint(1 << 62, (2,)))
        return self.apply(image, epoch, index)

    def apply(self, image: Any, epoch: int, index: int) -> Any:
        raise NotImplementedError


class ResizedCropFlipNormalize(KeyedTransform):
    """Keyed ``[RandomResizedCrop(size), RandomHorizontalFlip(), ToDtype(float32, scale=True), Normalize(mean, std)]``
    of a PIL image or an image tensor: the crop box of :func:`resized_crop_box`, then a flip with probability 1/2.

    Args:
        size: side of the square output, in pixels.
        mean: per-channel normalisation mean (images scaled to [0, 1]).
        std: per-channel normalisation standard deviation.
        seed: the run's seed.
    """

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], seed: int) -> None:
        super().__init__(seed)
        self.size = int(size)
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]

    def apply(self, image: Any, epoch: int, index: int) -> torch.Tensor:
        image = TF.to_image(image)
        random = self.random(epoch, index)
        top, left, height, width = resized_crop_box(random, *image.shape[-2:])
        image = TF.resized_crop(image, top, left, height, width, [self.size, self.size], antialias=True)
        if random.below(2):
            image = TF.horizontal_flip(image)
        return TF.normalize(TF.to_dtype(image, torch.float32, scale=True), self.mean, self.std)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, mean={self.mean}, std={self.std}, seed={self.seed})"
