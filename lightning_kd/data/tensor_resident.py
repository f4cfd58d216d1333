"""Tensor-resident small-image data: the decoded uint8 split kept as one tensor, augmented per batch.

With the per-sample path every image goes through PIL and torchvision's transforms in a DataLoader worker,
every epoch. Here a split is decoded once into one ``(N, C, H, W)`` uint8 tensor. A training loader serves no pixels,
only a *draw record* ``(index, top, left, flip)`` per sample (:class:`DrawRecord`): the data module looks the images
up on the host before the transfer, and :class:`CropFlipNormalize`, run by its ``on_after_batch_transfer`` on the
training device, crops (zero padding), flips, scales and normalises the whole batch. Evaluation loaders serve uint8
images, normalised the same way.

Both paths draw a sample's crop and flip from its key ``(seed, epoch, index)`` (:mod:`lightning_kd.data.augment`)
with the same distribution as ``RandomCrop(size, padding) + RandomHorizontalFlip()``, and apply them with the same
tensor operations (:class:`PerSampleCropFlip`), so they give bit-identical batches: the path changes speed only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable, Optional

import torch
from pytorch_lightning.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from torchvision.transforms.v2 import functional as TF

from lightning_kd.data.augment import KeyedTransform, SampleRandom

__all__ = ["CropFlipNormalize", "DrawRecord", "PerSampleCropFlip", "TensorImageDataset", "crop_flip", "crop_flip_draws"]


class TensorImageDataset(Dataset):
    """Items ``(images[i], targets[i])`` of a uint8 ``(N, C, H, W)`` image tensor and its class indices, followed by
    ``{name: fields[name][i]}`` when per-sample ``fields`` (tensors of N rows) are given."""

    def __init__(
        self, images: torch.Tensor, targets: torch.Tensor, fields: Optional[dict[str, torch.Tensor]] = None
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or len(images) != len(targets):
            raise ValueError(
                f"expected uint8 images (N, C, H, W) and N targets, got {images.dtype} {tuple(images.shape)} "
                f"and {len(targets)} targets"
            )
        uneven = [name for name, values in (fields or {}).items() if len(values) != len(images)]
        if uneven:
            raise ValueError(f"expected {len(images)} rows in every field, the fields {uneven} have other counts")
        self.images = images
        self.targets = targets
        self.fields = fields

    @classmethod
    def decode(
        cls, dataset: Dataset, num_workers: int = 0, batch_size: int = 512, progress: Optional[str] = None
    ) -> "TensorImageDataset":
        """Decode every item of ``dataset`` (``(uint8 CHW tensor, target)`` pairs of one size, or triples whose third
        element, a dict of numbers or tensors, is kept as :attr:`fields`), ``num_workers`` DataLoader workers in
        parallel; ``progress``: the description of a progress bar (shown on a terminal, by the first process)."""
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
        if progress is not None:
            shown = None if rank_zero_only.rank == 0 else True  # None: a bar where the output is a terminal
            loader = tqdm(loader, desc=progress, unit="batch", leave=False, disable=shown)
        images, targets, *fields = zip(*loader)
        carried = {name: torch.cat([batch[name] for batch in fields[0]]) for name in fields[0][0]} if fields else None
        return cls(torch.cat(images), torch.cat(targets), carried)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        if self.fields is None:
            return self.images[index], int(self.targets[index])
        fields = {name: values[index] for name, values in self.fields.items()}
        return self.images[index], int(self.targets[index]), fields


def crop_flip_draws(seed: int, epoch: int, index: int, padding: int) -> tuple[int, int, int]:
    """``(top, left, flip)`` of sample ``index`` in ``epoch``, drawn from its key: offsets uniform in
    ``[0, 2·padding]`` (top first, as torchvision's ``RandomCrop``), flip 1 with probability 1/2."""
    random = SampleRandom(seed, epoch, index)
    offsets = 2 * padding + 1
    return random.below(offsets), random.below(offsets), random.below(2)


def crop_flip(images: torch.Tensor, padding: int, draws: torch.Tensor) -> torch.Tensor:
    """Per image of a ``(B, C, H, W)`` batch: the ``H × W`` crop at offset ``(top, left)`` of the zero-padded image,
    flipped horizontally where ``flip`` is 1; ``draws`` holds one ``(top, left, flip)`` row per image."""
    batch, channels, height, width = images.shape
    padded = TF.pad(images, [padding])
    device = images.device
    top, left, flip = draws.to(device).unsqueeze(-1).unbind(1)
    rows = top + torch.arange(height, device=device)
    columns = torch.arange(width, device=device)
    columns = left + torch.where(flip.bool(), columns.flip(0), columns)
    padded_width = padded.shape[-1]
    rows = padded.gather(2, rows[:, None, :, None].expand(batch, channels, height, padded_width))
    return rows.gather(3, columns[:, None, None, :].expand(batch, channels, height, width))


class CropFlipNormalize:
    """The batched counterpart of ``[RandomCrop(size, padding), RandomHorizontalFlip()]`` (when augmenting)
    followed by ``[ToDtype(float32, scale=True), Normalize(mean, std)]``, for uint8 ``(B, C, H, W)`` batches.

    Args:
        padding: zero padding on every side before cropping back to the input size.
        mean: per-channel normalisation mean (images scaled to [0, 1]).
        std: per-channel normalisation standard deviation.
        seed: the run's seed, from which every sample's crop and flip are drawn (:meth:`draws`).
    """

    def __init__(self, padding: int, mean: Sequence[float], std: Sequence[float], seed: int = 0) -> None:
        self.padding = int(padding)
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]
        self.seed = int(seed)

    def draws(self, epoch: int, index: int) -> tuple[int, int, int]:
        """``(top, left, flip)`` of sample ``index`` in ``epoch`` (:func:`crop_flip_draws`)."""
        return crop_flip_draws(self.seed, epoch, index, self.padding)

    def __call__(self, images: torch.Tensor, augment: bool, draws: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Finish a uint8 batch; ``augment``: crop and flip first, image ``i`` with row ``i`` of ``draws`` (default:
        the draws of samples ``0 … B−1`` in epoch 0)."""
        if augment:
            if draws is None:
                draws = torch.tensor([self.draws(0, index) for index in range(len(images))])
            images = crop_flip(images, self.padding, draws)
        return TF.normalize(TF.to_dtype(images, torch.float32, scale=True), self.mean, self.std)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(padding={self.padding}, mean={self.mean}, std={self.std}, seed={self.seed})"


class DrawRecord(KeyedTransform):
    """The training item of a tensor-resident split: no pixels, the record ``(index, top, left, flip)`` (int64)
    of the sample and its draws, from which the data module finishes the batch on its device."""

    def __init__(self, batch: CropFlipNormalize) -> None:
        super().__init__(batch.seed)
        self.batch = batch

    def apply(self, image: Any, epoch: int, index: int) -> torch.Tensor:
        return torch.tensor([index, *self.batch.draws(epoch, index)])


class PerSampleCropFlip(KeyedTransform):
    """The per-sample path of a tensor-resident module: ``decode`` the image, then ``batch`` on a batch of one
    with the sample's draws, so both paths compute the very same tensor."""

    def __init__(self, decode: Callable[[Any], torch.Tensor], batch: CropFlipNormalize) -> None:
        super().__init__(batch.seed)
        self.decode = decode
        self.batch = batch

    def apply(self, image: Any, epoch: int, index: int) -> torch.Tensor:
        draws = torch.tensor([self.batch.draws(epoch, index)])
        return self.batch(self.decode(image)[None], True, draws)[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(decode={self.decode}, batch={self.batch})"
