"""LightningDataModules for image classification (CIFAR-10/100, ImageNet and its class subsets, Imagenette, class-folder trees, a query pool that grows), and their samplers."""

from lightning_kd.data.base import ClassificationDataModule
from lightning_kd.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from lightning_kd.data.folder import ImageFolderDataModule
from lightning_kd.data.imagenet import ImageNetDataModule, ImagenetteDataModule
from lightning_kd.data.pool import MixedPoolDataset, QueryPoolDataModule, mix_images
from lightning_kd.data.samplers import ClassPairBatchSampler, EpochSeededRandomSampler, ResumableLoader

__all__ = [
    "ClassificationDataModule",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "ImageFolderDataModule",
    "ImageNetDataModule",
    "ImagenetteDataModule",
    "MixedPoolDataset",
    "QueryPoolDataModule",
    "mix_images",
    "EpochSeededRandomSampler",
    "ClassPairBatchSampler",
    "ResumableLoader",
]
