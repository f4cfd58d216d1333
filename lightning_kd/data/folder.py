"""Data module over ``torchvision.datasets.ImageFolder`` class-folder trees."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any, Callable, Optional, Union

import torch
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension
from torchvision.transforms import v2

from lightning_kd.data.augment import ResizedCropFlipNormalize
from lightning_kd.data.base import ClassificationDataModule, check_int, read_image
from lightning_kd.data.cache import cache_directory, file_fingerprint
from lightning_kd.data.cifar import CIFAR10_MEAN, CIFAR10_STD
from lightning_kd.data.tensor_resident import CropFlipNormalize

__all__ = ["ImageFolderDataModule"]

_SMALL_IMAGE_MAX = 64


def read_file_list(path: str) -> list[str]:
    """The file names listed in ``path``, one per line (blank lines and ``#`` comments skipped); an error names a
    missing list, an empty one, an absolute path and a name listed twice."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ImageFolderDataModule: train_subset file {path!r} does not exist")
    with open(path) as file:
        names = [line.strip() for line in file if line.strip() and not line.lstrip().startswith("#")]
    if not names:
        raise ValueError(f"ImageFolderDataModule: train_subset file {path!r} lists no image")
    absolute = [name for name in names if os.path.isabs(name)]
    if absolute:
        raise ValueError(f"ImageFolderDataModule: train_subset {path!r} must name images relative to train/, "
                         f"got {absolute[0]!r}")
    twice = sorted(name for name, count in Counter(names).items() if count > 1)
    if twice:
        raise ValueError(f"ImageFolderDataModule: train_subset {path!r} lists {twice[:5]} more than once")
    return names


def _find_classes(split_dir: str) -> list[str]:
    """Class folder names of ``split_dir``, sorted exactly like ``ImageFolder.find_classes``."""
    with os.scandir(split_dir) as it:
        return sorted(entry.name for entry in it if entry.is_dir())


def _has_image(class_dir: str) -> bool:
    """Whether ``class_dir`` holds (recursively, like ImageFolder) at least one image file."""
    for dirpath, _dirnames, filenames in os.walk(class_dir, followlinks=True):
        for name in filenames:
            if has_file_allowed_extension(name, IMG_EXTENSIONS):
                return True
    return False


class ImageFolderDataModule(ClassificationDataModule):
    """Image classification from class-folder trees (``torchvision.datasets.ImageFolder``).

    ``root`` holds ``train/<class>/<image>`` and ``val/<class>/<image>`` (or ``test/``
    when there is no ``val/``); that held-out split is the test split and, unless
    ``val_split > 0``, the validation split. Class indices follow the sorted class
    folder names of ``train/``, which both splits must share. The extracted CIFAR-10
    JPEG tree (``train/`` + ``test/``) works with the defaults.

    Train transform: for ``image_size <= 64`` Resize(image_size) + CenterCrop(image_size) +
    RandomCrop(image_size, padding=image_size // 8) + horizontal flip; for larger sizes
    RandomResizedCrop(image_size) + flip; the crop and the flip are drawn from each sample's
    ``(seed, epoch, index)``. Eval: Resize(image_size) + CenterCrop(image_size), resizing to
    ``int(image_size * 256 / 224)`` first for sizes above 64. Resizing/cropping are no-ops
    for square images that already have ``image_size``. An image that cannot be decoded
    (truncated, corrupt) stops the run with an error naming its file.

    Args:
        root: directory holding the ``train/`` and ``val/`` (or ``test/``) class folders.
        image_size: side of the square network input, in pixels.
        mean: per-channel normalisation mean (RGB, images scaled to [0, 1]).
        std: per-channel normalisation standard deviation (RGB).
        tensor_resident: for ``image_size <= 64``, decode every image once (Resize + CenterCrop to
            ``image_size``, in memory) into one uint8 tensor and crop, flip and normalise whole batches on the
            training device (the same batches as the per-sample path, faster); ``None``: on for such sizes where it
            fits in memory (a quarter of the free memory).
        decode_cache: where the tensor-resident splits are cached once decoded, so that the next process loads them
            in seconds (:mod:`lightning_kd.data.cache`; keyed by every file's path, size, modification time and
            class, and the decode transform: a changed file is decoded again): ``True`` for ``$LIGHTNING_KD_CACHE``
            or ``~/.cache/lightning_kd``, a directory, or ``False`` for no cache.
        train_subset: a text file naming the training images to train on, one path relative to ``train/`` per line
            (``cat/0042.jpg``; blank lines and ``#`` comments are skipped); the other images of ``train/`` are left
            out. Every named file must exist, each once. ``None``: every image of ``train/``.
        **kwargs: the loader arguments of ClassificationDataModule.
    """

    def __init__(
        self,
        root: str,
        image_size: int = 32,
        mean: tuple[float, float, float] = CIFAR10_MEAN,
        std: tuple[float, float, float] = CIFAR10_STD,
        tensor_resident: Optional[bool] = None,
        decode_cache: Union[bool, str] = True,
        train_subset: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(root=os.path.expanduser(str(root)), tensor_resident=tensor_resident, **kwargs)
        self.image_size = check_int("image_size", image_size, 1)
        self.train_subset = None if train_subset is None else os.path.expanduser(str(train_subset))
        self._train_files = None if self.train_subset is None else read_file_list(self.train_subset)
        self._decode_cache_dir = cache_directory(decode_cache)
        mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std must have 3 (RGB) values, got mean={mean}, std={std}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std values must be > 0, got {std}")
        self.mean: tuple[float, float, float] = mean  # type: ignore[assignment]
        self.std: tuple[float, float, float] = std  # type: ignore[assignment]

        self.train_dir, self.eval_dir = self._check_layout()
        self._class_names = self._check_classes()

    # ------------------------------------------------------------------ layout checks
    def _check_layout(self) -> tuple[str, str]:
        root = self.root
        if not os.path.isdir(root):
            raise FileNotFoundError(f"ImageFolderDataModule: root directory {root!r} does not exist")
        train_dir = os.path.join(root, "train")
        if not os.path.isdir(train_dir):
            raise FileNotFoundError(
                f"ImageFolderDataModule: no 'train/' directory in root {root!r} "
                f"(expected {train_dir!r} with one sub-folder per class)"
            )
        for name in ("val", "test"):
            eval_dir = os.path.join(root, name)
            if os.path.isdir(eval_dir):
                return train_dir, eval_dir
        raise FileNotFoundError(
            f"ImageFolderDataModule: neither a 'val/' nor a 'test/' directory in root {root!r} "
            "(one of them must hold the held-out class folders)"
        )

    @staticmethod
    def _split_classes(split_dir: str) -> list[str]:
        classes = _find_classes(split_dir)
        if not classes:
            raise FileNotFoundError(
                f"ImageFolderDataModule: no class folders in {split_dir!r} "
                "(expected one sub-folder per class holding its images)"
            )
        empty = [c for c in classes if not _has_image(os.path.join(split_dir, c))]
        if empty:
            shown = ", ".join(os.path.join(split_dir, c) for c in empty[:10])
            more = f" (and {len(empty) - 10} more)" if len(empty) > 10 else ""
            raise FileNotFoundError(
                f"ImageFolderDataModule: empty class folder(s), with no image of extension "
                f"{', '.join(IMG_EXTENSIONS)}: {shown}{more}"
            )
        return classes

    def _check_classes(self) -> list[str]:
        train_classes = self._split_classes(self.train_dir)
        eval_classes = self._split_classes(self.eval_dir)
        if eval_classes != train_classes:
            missing = sorted(set(train_classes) - set(eval_classes))
            extra = sorted(set(eval_classes) - set(train_classes))
            split = os.path.basename(self.eval_dir)
            parts = []
            if missing:
                parts.append(f"missing from {split}/: {missing}")
            if extra:
                parts.append(f"not in train/: {extra}")
            raise ValueError(
                f"ImageFolderDataModule: the class folders of {self.eval_dir!r} differ from those of "
                f"{self.train_dir!r}; " + "; ".join(parts)
            )
        return train_classes

    # ------------------------------------------------------------------ API
    @property
    def num_classes(self) -> int:
        return len(self._class_names or [])

    @property
    def class_names(self) -> list[str]:
        """Class names (sorted class folder names of ``train/``); known right after ``__init__``."""
        return list(self._class_names or [])

    def _load_splits(self) -> tuple[Dataset, Dataset, list[str]]:
        train = datasets.ImageFolder(self.train_dir, loader=read_image)
        test = datasets.ImageFolder(self.eval_dir, loader=read_image)
        if train.classes != self.class_names or test.classes != self.class_names:
            raise RuntimeError(
                f"ImageFolderDataModule: the class folders under {self.root!r} changed since __init__"
            )
        if self._train_files is not None:
            self._keep_only(train, self._train_files)
        return train, test, list(train.classes)

    def _keep_only(self, train: datasets.ImageFolder, files: list[str]) -> None:
        """Restrict ``train`` to ``files`` (paths relative to ``train/``), in the folder's order."""
        by_name = {os.path.relpath(path, self.train_dir).replace(os.sep, "/"): (path, target)
                   for path, target in train.samples}
        missing = [name for name in files if name not in by_name]
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise FileNotFoundError(
                f"ImageFolderDataModule: train_subset {self.train_subset!r} names {len(missing)} image(s) not in "
                f"{self.train_dir!r}: {', '.join(missing[:5])}{more}"
            )
        kept = set(files)
        train.samples = [sample for name, sample in by_name.items() if name in kept]
        train.imgs = train.samples
        train.targets = [target for _, target in train.samples]
        absent = sorted(set(self.class_names) - {train.classes[t] for t in train.targets})
        if absent:
            raise ValueError(f"ImageFolderDataModule: train_subset {self.train_subset!r} has no image of the "
                             f"class(es) {absent}; every class of train/ needs at least one")

    def train_transform(self) -> Callable[..., torch.Tensor]:
        if self.image_size <= _SMALL_IMAGE_MAX:
            return super().train_transform()  # decode (Resize + CenterCrop), then batch_transform's crop and flip
        return ResizedCropFlipNormalize(self.image_size, self.mean, self.std, self.seed)

    def batch_transform(self) -> Optional[CropFlipNormalize]:
        if self.image_size > _SMALL_IMAGE_MAX:
            return None
        return CropFlipNormalize(padding=self.image_size // 8, mean=self.mean, std=self.std, seed=self.seed)

    def decode_cache_key(self, split: Dataset) -> Optional[dict]:
        """The files of an ``ImageFolder`` split (:func:`~lightning_kd.data.cache.file_fingerprint`)."""
        if not isinstance(split, datasets.ImageFolder):
            return None
        return {"kind": "ImageFolder", "images": len(split.samples), "files": file_fingerprint(split.samples)}

    def decode_transform(self) -> Callable[[Any], torch.Tensor]:
        size = self.image_size
        return v2.Compose([v2.ToImage(), v2.Resize(size, antialias=True), v2.CenterCrop(size), v2.ToPureTensor()])

    def eval_transform(self) -> Callable[[Any], torch.Tensor]:
        size = self.image_size
        resize = size if size <= _SMALL_IMAGE_MAX else int(size * 256 / 224)
        return v2.Compose(
            [
                v2.ToImage(),
                v2.Resize(resize, antialias=True),
                v2.CenterCrop(size),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean=list(self.mean), std=list(self.std)),
            ]
        )
