"""Tensor-resident small-image data: the decoded uint8 split kept as one tensor, augmented per batch.

With the per-sample path every image goes through PIL and torchvision's transforms in a DataLoader worker,
every epoch. Here a split is decoded once into one ``(N, C, H, W)`` uint8 tensor; loaders serve uint8 batches
and :class:`CropFlipNormalize`, run by the data module's ``on_after_batch_transfer`` on the training device,
draws a random crop (zero padding) and a horizontal flip for every image of the batch, then scales and
normalises it, with the same distribution as ``RandomCrop(size, padding) + RandomHorizontalFlip()``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as TF

__all__ = ["CropFlipNormalize", "TensorImageDataset", "random_crop_flip"]


class TensorImageDataset(Dataset):
    """Items ``(images[i], targets[i])`` of a uint8 ``(N, C, H, W)`` image tensor and its class indices."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or len(images) != len(targets):
            raise ValueError(
                f"expected uint8 images (N, C, H, W) and N targets, got {images.dtype} {tuple(images.shape)} "
                f"and {len(targets)} targets"
            )
        self.images = images
        self.targets = targets

    @classmethod
    def decode(cls, dataset: Dataset, num_workers: int = 0, batch_size: int = 512) -> "TensorImageDataset":
        """Decode every item of ``dataset`` (``(uint8 CHW tensor, target)`` pairs of one size), ``num_workers``
        DataLoader workers in parallel."""
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
        images, targets = zip(*loader)
        return cls(torch.cat(images), torch.cat(targets))

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.targets[index])


def random_crop_flip(images: torch.Tensor, padding: int) -> torch.Tensor:
    """Per image of a ``(B, C, H, W)`` batch: a random ``H × W`` crop of the zero-padded image (offsets uniform
    in ``[0, 2·padding]``) and a horizontal flip with probability 1/2, drawn on the batch's device."""
    batch, channels, height, width = images.shape
    padded = TF.pad(images, [padding])
    device = images.device
    top = torch.randint(0, 2 * padding + 1, (batch, 1), device=device)
    left = torch.randint(0, 2 * padding + 1, (batch, 1), device=device)
    flip = torch.rand(batch, 1, device=device) < 0.5
    rows = top + torch.arange(height, device=device)
    columns = torch.arange(width, device=device)
    columns = left + torch.where(flip, columns.flip(0), columns)
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
    """

    def __init__(self, padding: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.padding = int(padding)
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]

    def __call__(self, images: torch.Tensor, augment: bool) -> torch.Tensor:
        if augment:
            images = random_crop_flip(images, self.padding)
        return TF.normalize(TF.to_dtype(images, torch.float32, scale=True), self.mean, self.std)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(padding={self.padding}, mean={self.mean}, std={self.std})"
