"""ImageNet (ILSVRC2012), its class subsets (ImageNet-100, first / random N, any list of ids) and Imagenette.

Classes are WordNet ids ("wnids", e.g. ``n01440764``). Labels are 0..N-1 in the ImageNet-1k class-index
order (sorted wnids) of the selected classes, which is also the order of ``torchvision.datasets.ImageFolder``
on a root holding only those folders. :attr:`imagenet_class_indices` gives each label's index among the
1000 classes, i.e. the output of a torchvision ImageNet-pretrained network that answers for it; the CLI
links it to the model's ``teacher_classes`` so that a 1000-class teacher answers for the subset only
(:func:`lightning_kd.core.teacher.restrict_classifier`).
"""

from __future__ import annotations

import collections
import functools
import os
import re
from collections.abc import Sequence
from importlib import resources
from typing import Any, Callable, Literal, Optional, Union

import torch
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision.transforms import v2

from lightning_kd.data.augment import ResizedCropFlipNormalize
from lightning_kd.data.base import ClassificationDataModule, check_int, read_image

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGENETTE_WNIDS",
    "ImageNetDataModule",
    "ImagenetteDataModule",
    "imagenet_wnids",
    "read_wnids",
    "select_wnids",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: The ten classes of Imagenette (fast.ai), sorted.
IMAGENETTE_WNIDS = (
    "n01440764", "n02102040", "n02979186", "n03000684", "n03028079",
    "n03394916", "n03417042", "n03425413", "n03445777", "n03888257",
)  # fmt: skip
#: Class lists shipped with the package, by the name ``ImageNetDataModule(subset=...)`` accepts.
NAMED_SUBSETS = {"imagenet100": "imagenet100_wnids.txt"}
#: The archive of the ILSVRC2012 development kit, next to which torchvision's ImageNet finds the image archives.
DEVKIT_ARCHIVE = "ILSVRC2012_devkit_t12.tar.gz"

_WNID = re.compile(r"n\d{8}")
_SHOWN = 20  # ids named in an error message before "and N more"


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    return shown + (f" (and {len(items) - _SHOWN} more)" if len(items) > _SHOWN else "")


def _well_formed(wnids: list[str], source: str) -> list[str]:
    malformed = [w for w in wnids if not _WNID.fullmatch(w)]
    if malformed:
        raise ValueError(f"{source}: not WordNet ids (n + 8 digits): {_listing(malformed)}")
    return wnids


def _parse_wnids(text: str, source: str) -> list[str]:
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return _well_formed([line.split()[0] for line in lines], source)


def read_wnids(path: str) -> list[str]:
    """The WordNet ids listed in a text file, in file order.

    The first word of every line is the id, so ``LOC_synset_mapping.txt`` lines (``n01440764 tench, ...``)
    work as well as bare ids; blank lines and ``#`` comments are skipped.
    """
    with open(os.path.expanduser(path)) as file:
        return _parse_wnids(file.read(), path)


def _resource_wnids(name: str) -> list[str]:
    text = resources.files("lightning_kd.data").joinpath("resources", name).read_text()
    return _parse_wnids(text, name)


@functools.lru_cache(maxsize=None)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k WordNet ids in class-index order: id ``i`` is output ``i`` of torchvision's weights."""
    return tuple(_resource_wnids("imagenet1k_wnids.txt"))


def select_wnids(subset: Optional[Union[int, str, Sequence[str]]] = None, seed: Optional[int] = None) -> list[str]:
    """The ImageNet-1k classes a subset specification selects, in class-index (label) order.

    Args:
        subset: ``None`` for all 1000 classes; a number ``N`` for the first ``N`` classes, or ``N`` classes
            drawn at random when ``seed`` is set; the name of a shipped list (``"imagenet100"``); the path
            of a text file of WordNet ids (see :func:`read_wnids`); or a list of WordNet ids.
        seed: seed of the random draw of ``N`` classes (only with a number).
    """
    everything = imagenet_wnids()
    if seed is not None and (isinstance(subset, bool) or not isinstance(subset, int)):
        raise ValueError(f"subset_seed draws a number of classes at random: set subset to a number, got {subset!r}")
    if subset is None:
        return list(everything)
    if isinstance(subset, bool):
        raise ValueError(f"subset must be a number of classes, a list name, a file or a list of ids, got {subset!r}")
    if isinstance(subset, int):
        if not 2 <= subset <= len(everything):
            raise ValueError(f"subset: the number of classes must lie in [2, {len(everything)}], got {subset}")
        if seed is None:
            return list(everything[:subset])
        drawn = torch.randperm(len(everything), generator=torch.Generator().manual_seed(seed))[:subset]
        return [everything[i] for i in sorted(drawn.tolist())]
    if isinstance(subset, str):
        if subset in NAMED_SUBSETS:
            wnids = _resource_wnids(NAMED_SUBSETS[subset])
        elif os.path.isfile(os.path.expanduser(subset)):
            wnids = read_wnids(subset)
        else:
            raise ValueError(
                f"subset {subset!r} is neither a shipped list ({', '.join(NAMED_SUBSETS)}) nor an existing file of "
                "WordNet ids"
            )
    else:
        wnids = _well_formed([str(w) for w in subset], "subset")
    duplicated = sorted(w for w, count in collections.Counter(wnids).items() if count > 1)
    if duplicated:
        raise ValueError(f"subset lists these WordNet ids more than once: {_listing(duplicated)}")
    known = set(everything)
    unknown = [w for w in wnids if w not in known]
    if unknown:
        raise ValueError(f"subset: not ImageNet-1k classes: {_listing(unknown)}")
    if len(wnids) < 2:
        raise ValueError(f"subset must select at least 2 classes, got {wnids}")
    return sorted(wnids)


class _ClassFolders(datasets.ImageFolder):
    """``ImageFolder`` over the given class folders only, labelled in the given order, keeping at most
    ``per_class`` images of each class (the first in sorted file order). Missing folders yield no image."""

    def __init__(self, root: str, classes: Sequence[str], per_class: Optional[int] = None) -> None:
        self._selected = list(classes)
        super().__init__(root, loader=read_image, allow_empty=True)
        if per_class is not None:
            taken: collections.Counter = collections.Counter()
            kept = []
            for path, target in self.samples:
                if taken[target] < per_class:
                    kept.append((path, target))
                    taken[target] += 1
            self.samples = self.imgs = kept
            self.targets = [target for _, target in kept]

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return list(self._selected), {name: index for index, name in enumerate(self._selected)}


class _WordNetDataModule(ClassificationDataModule):
    """Shared part of the ImageNet-style modules: classes named by WordNet id, ImageNet transforms.

    Train: RandomResizedCrop(image_size) + horizontal flip, drawn from each sample's ``(seed, epoch, index)``; eval:
    Resize(image_size·256/224) + CenterCrop(image_size); both normalised with the ImageNet mean and std. An image that
    cannot be decoded (truncated, corrupt) stops the run with an error naming its file.
    """

    def __init__(self, root: str, wnids: Sequence[str], image_size: int, **kwargs: Any) -> None:
        # No tensor-resident path (no batch_transform): given here, the CLI does not offer tensor_resident either.
        super().__init__(root=os.path.expanduser(str(root)), tensor_resident=False, **kwargs)
        self.image_size = check_int("image_size", image_size, 1)
        self.wnids = list(wnids)

    @property
    def num_classes(self) -> int:
        return len(self.wnids)

    @property
    def class_names(self) -> list[str]:
        """The WordNet id of every label (label ``i`` is ``class_names[i]``); known right after ``__init__``."""
        return list(self.wnids)

    @property
    def imagenet_class_indices(self) -> list[int]:
        """Index among the 1000 ImageNet-1k classes (torchvision's output order) of every label."""
        index = {wnid: i for i, wnid in enumerate(imagenet_wnids())}
        return [index[wnid] for wnid in self.wnids]

    def setup(self, stage: Optional[str] = None) -> None:
        """Load the splits, and record the label -> WordNet id mapping as a hyper-parameter the loggers receive."""
        super().setup(stage)
        self.save_hyperparameters({"class_wnids": self.class_names})

    def state_dict(self) -> dict[str, Any]:
        """The data seed and the label -> WordNet id mapping, saved in every checkpoint."""
        return {**super().state_dict(), "class_wnids": self.class_names}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        saved = state_dict.get("class_wnids")
        if saved is not None and list(saved) != self.class_names:
            changed = sorted(set(saved) ^ set(self.class_names))
            raise ValueError(
                f"{type(self).__name__}: the checkpoint was trained on other classes than the data selects now; "
                f"ids in one but not the other: {_listing(changed)}"
            )

    def train_transform(self) -> Callable[..., torch.Tensor]:
        return ResizedCropFlipNormalize(self.image_size, IMAGENET_MEAN, IMAGENET_STD, self.seed)

    def eval_transform(self) -> Callable[[Any], torch.Tensor]:
        return v2.Compose(
            [
                v2.ToImage(),
                v2.Resize(round(self.image_size * 256 / 224), antialias=True),
                v2.CenterCrop(self.image_size),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD)),
            ]
        )


class ImageNetDataModule(_WordNetDataModule):
    """ImageNet-1k or a subset of its classes, from ``root/train/<wnid>/`` and ``root/val/<wnid>/`` folders.

    That is the usual ImageFolder layout, and what torchvision's ``ImageNet`` makes of the ILSVRC2012
    archives: a root holding ``ILSVRC2012_img_train.tar``, ``ILSVRC2012_img_val.tar`` and
    ``ILSVRC2012_devkit_t12.tar.gz`` instead is extracted into it by :meth:`prepare_data` (needs scipy).
    The root may hold more classes than selected (only the selected folders are read) but must hold
    every selected one, with at least one image in each split. ``val/`` is the test split and, unless
    ``val_split > 0``, the validation split.

    Args:
        root: directory with the ``train/`` and ``val/`` class folders (or the archives).
        subset: the classes (labels follow the ImageNet-1k order of the selected ids): ``None`` for all
            1000; ``"imagenet100"`` for the ImageNet-100 list of CMC (Tian et al. 2019); a number ``N``
            for the first ``N`` classes, or ``N`` random ones with ``subset_seed``; the path of a text file
            of ids (one per line, first word); or a list of ids.
        subset_seed: seed of the random draw of ``N`` classes.
        images_per_class: at most this many images of each class in each split (the first in sorted file
            order), for quick runs; ``None`` keeps all.
        image_size: side of the square network input, in pixels (224; e.g. 64 for a cheap low-resolution run).
        **kwargs: the loader arguments of ClassificationDataModule, all but ``tensor_resident`` (these modules
            have no tensor-resident path).
    """

    def __init__(
        self,
        root: str,
        subset: Optional[Union[int, str, list[str]]] = None,
        subset_seed: Optional[int] = None,
        images_per_class: Optional[int] = None,
        image_size: int = 224,
        **kwargs: Any,
    ) -> None:
        super().__init__(root, select_wnids(subset, subset_seed), image_size, **kwargs)
        if images_per_class is not None and (
            isinstance(images_per_class, bool) or not isinstance(images_per_class, int) or images_per_class < 1
        ):
            raise ValueError(f"images_per_class must be an integer >= 1 or None, got {images_per_class!r}")
        self.images_per_class = images_per_class

    def prepare_data(self) -> None:
        """Extract the ILSVRC2012 archives into ``train/`` and ``val/`` (torchvision's ``ImageNet``) when the
        root holds them with the devkit instead of the class folders."""
        if not os.path.isfile(os.path.join(self.root, DEVKIT_ARCHIVE)):
            return
        for split in ("train", "val"):
            if not os.path.isdir(os.path.join(self.root, split)):
                datasets.ImageNet(self.root, split=split)

    def _load_split(self, split: str) -> Dataset:
        directory = os.path.join(self.root, split)
        if not os.path.isdir(directory):
            raise FileNotFoundError(
                f"ImageNetDataModule: no '{split}/' directory in root {self.root!r} (expected one sub-folder per "
                f"WordNet id, or the ILSVRC2012 archives with {DEVKIT_ARCHIVE} to extract)"
            )
        missing = [w for w in self.wnids if not os.path.isdir(os.path.join(directory, w))]
        if missing:
            raise FileNotFoundError(
                f"ImageNetDataModule: {len(missing)} of the {self.num_classes} selected classes have no folder in "
                f"{directory!r}: {_listing(missing)}"
            )
        dataset = _ClassFolders(directory, self.wnids, self.images_per_class)
        counts = collections.Counter(dataset.targets)
        empty = [os.path.join(directory, w) for label, w in enumerate(self.wnids) if counts[label] == 0]
        if empty:
            raise FileNotFoundError(f"ImageNetDataModule: class folder(s) without any image: {_listing(empty)}")
        return dataset

    def _load_splits(self) -> tuple[Dataset, Dataset, list[str]]:
        return self._load_split("train"), self._load_split("val"), self.class_names


class ImagenetteDataModule(_WordNetDataModule):
    """Imagenette (fast.ai): ten easy ImageNet classes, ~9.5k train / 3.9k val images, via ``torchvision.datasets``.

    Labels follow the ImageNet-1k order of its ten ids (:data:`IMAGENETTE_WNIDS`), so an ImageNet teacher
    restricted to :attr:`imagenet_class_indices` answers for them. ``val`` is the test split and, unless
    ``val_split > 0``, the validation split.

    Args:
        root: directory containing (or receiving) the extracted ``imagenette2*`` folder.
        size: which release: ``"full"``, ``"320px"`` or ``"160px"`` (shorter side resized, much smaller download).
        download: download and extract the archive in prepare_data if it is not already in root.
        image_size: side of the square network input, in pixels.
        **kwargs: the loader arguments of ClassificationDataModule, all but ``paired_batches`` (Imagenette's
            dataset does not list its targets) and ``tensor_resident`` (no tensor-resident path).
    """

    def __init__(
        self,
        root: str = "data",
        size: Literal["full", "320px", "160px"] = "320px",
        download: bool = True,
        image_size: int = 224,
        **kwargs: Any,
    ) -> None:
        super().__init__(root, IMAGENETTE_WNIDS, image_size, paired_batches=False, **kwargs)
        if size not in ("full", "320px", "160px"):
            raise ValueError(f"size must be 'full', '320px' or '160px', got {size!r}")
        self.size = size
        self.download = bool(download)

    def prepare_data(self) -> None:
        """Download and extract the archive (once, on one process) when ``download`` is set and it is not there."""
        if self.download:
            datasets.Imagenette(self.root, size=self.size, download=True)

    def _load_split(self, split: str) -> Dataset:
        try:
            dataset = datasets.Imagenette(self.root, split=split, size=self.size, loader=read_image)
        except RuntimeError:
            raise FileNotFoundError(
                f"Imagenette ({self.size}) not found under root={self.root!r}. Set download=true to download it, "
                "or point root at the directory that contains the extracted imagenette2 folder."
            ) from None
        missing = [w for w in self.wnids if w not in dataset.wnids]
        if missing:
            raise FileNotFoundError(
                f"ImagenetteDataModule: Imagenette classes without a {split} folder under {self.root!r}: "
                f"{_listing(missing)}"
            )
        return dataset

    def _load_splits(self) -> tuple[Dataset, Dataset, list[str]]:
        return self._load_split("train"), self._load_split("val"), self.class_names
