"""LightningDataModules for image classification (CIFAR-10/100, class-folder trees)."""

from lightning_kd.data.base import ClassificationDataModule
from lightning_kd.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from lightning_kd.data.folder import ImageFolderDataModule
from lightning_kd.data.samplers import EpochSeededRandomSampler

__all__ = [
    "ClassificationDataModule",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "ImageFolderDataModule",
    "EpochSeededRandomSampler",
]
