"""CIFAR-10 / CIFAR-100 data modules on ``torchvision.datasets.CIFAR10/100``."""

from __future__ import annotations

import os
from typing import Any, Callable, ClassVar, Optional

import torch
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision.transforms import v2

from lightning_kd.data.base import ClassificationDataModule
from lightning_kd.data.tensor_resident import CropFlipNormalize

__all__ = ["CIFAR10DataModule", "CIFAR100DataModule", "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


_CIFAR_DOC = """{name} ({classes}, 50k train / 10k test images of 32x32).

    Train: RandomCrop(32, padding=4) + horizontal flip + normalisation, drawn from each sample's
    ``(seed, epoch, index)``; eval: normalisation. The test split doubles as validation split unless ``val_split > 0``.

    Args:
        root: directory containing (or receiving) the extracted ``{folder}``.
        download: download the archive in prepare_data if it is not already in root.
        tensor_resident: keep the decoded split as one uint8 tensor and crop, flip and normalise whole
            batches on the training device (the same batches as the per-sample path, faster); ``None``: on where it
            fits in memory (a quarter of the free memory).
        **kwargs: the loader arguments of ClassificationDataModule.
    """


class _CIFARDataModule(ClassificationDataModule):
    """Shared implementation of the CIFAR-10/100 modules: a subclass names its torchvision dataset and statistics
    (class attributes) and gets its docstring from ``_CIFAR_DOC``."""

    dataset_cls: ClassVar[type[datasets.CIFAR10]]
    dataset_name: ClassVar[str]
    NUM_CLASSES: ClassVar[int]
    MEAN: ClassVar[tuple[float, float, float]]
    STD: ClassVar[tuple[float, float, float]]

    def __init__(
        self, root: str = "data", download: bool = True, tensor_resident: Optional[bool] = None, **kwargs: Any
    ) -> None:
        super().__init__(root=os.path.expanduser(str(root)), tensor_resident=tensor_resident, **kwargs)
        self.download = bool(download)

    @property
    def num_classes(self) -> int:
        return self.NUM_CLASSES

    @property
    def base_folder(self) -> str:
        """Where torchvision expects the extracted data: ``<root>/cifar-10-batches-py`` etc."""
        return os.path.join(self.root, self.dataset_cls.base_folder)

    def prepare_data(self) -> None:
        """Download and extract the archive (once, on one process) when ``download`` is set.

        torchvision skips the download when the extracted files are already present and
        pass its integrity check.
        """
        if self.download:
            # Constructing the (small) test split downloads the whole archive if needed.
            self.dataset_cls(self.root, train=False, download=True)

    def _make_dataset(self, train: bool) -> datasets.CIFAR10:
        try:
            return self.dataset_cls(self.root, train=train, download=False)
        except RuntimeError:
            folder = self.dataset_cls.base_folder
            raise FileNotFoundError(
                f"{self.dataset_name} data not found (or corrupted) under root={self.root!r}: expected the "
                f"extracted '{folder}' directory at {self.base_folder!r}. Set download=true to download it, "
                f"or point root at the directory that contains an extracted '{folder}'."
            ) from None

    def _load_splits(self) -> tuple[Dataset, Dataset, list[str]]:
        train = self._make_dataset(train=True)
        test = self._make_dataset(train=False)
        return train, test, list(train.classes)

    def batch_transform(self) -> CropFlipNormalize:
        """RandomCrop(32, padding=4) + flip + normalisation, drawn per sample (also the per-sample path's)."""
        return CropFlipNormalize(padding=4, mean=self.MEAN, std=self.STD, seed=self.seed)

    def eval_transform(self) -> Callable[[Any], torch.Tensor]:
        return v2.Compose(
            [
                v2.ToImage(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean=list(self.MEAN), std=list(self.STD)),
            ]
        )


class CIFAR10DataModule(_CIFARDataModule):
    __doc__ = _CIFAR_DOC.format(name="CIFAR-10", classes="10 classes", folder="cifar-10-batches-py")

    dataset_cls, dataset_name, NUM_CLASSES = datasets.CIFAR10, "CIFAR-10", 10
    MEAN, STD = CIFAR10_MEAN, CIFAR10_STD


class CIFAR100DataModule(_CIFARDataModule):
    __doc__ = _CIFAR_DOC.format(name="CIFAR-100", classes="100 fine classes", folder="cifar-100-python")

    dataset_cls, dataset_name, NUM_CLASSES = datasets.CIFAR100, "CIFAR-100", 100
    MEAN, STD = CIFAR100_MEAN, CIFAR100_STD
