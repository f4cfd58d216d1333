"""Tiny data sets in the real on-disk formats, for tests (no network needed).

Plain helper functions (not fixtures):

* :func:`write_tiny_cifar` writes ``cifar-10-batches-py/`` or ``cifar-100-python/`` exactly
  as the official archives lay them out (Python-2 pickles: loading them with
  ``encoding="latin1"``, as torchvision does, gives ``str`` keys; with
  ``encoding="bytes"``, as the CIFAR web page does, gives ``b"data"``, ``b"labels"`` ...).
* :func:`disable_cifar_checksums` makes torchvision accept those files (their MD5s of
  course differ from the official ones).
* :func:`write_tiny_image_folder` writes ``<root>/<split>/<class>/NNNN.png`` trees.

Every class gets its own well-separated colour (the same in every split and call) plus
Gaussian pixel noise, so a tiny model visibly learns within a few steps.
"""

from __future__ import annotations

import math
import os
import pickle
import struct
from collections.abc import Sequence
from typing import Any, Union

import numpy as np

__all__ = ["write_tiny_cifar", "disable_cifar_checksums", "write_tiny_image_folder", "class_colours"]

CIFAR10_LABEL_NAMES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip

CIFAR100_FINE_LABEL_NAMES = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
]  # fmt: skip

CIFAR100_COARSE_LABEL_NAMES = [
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
    "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes", "large_omnivores_and_herbivores",
    "medium_mammals", "non-insect_invertebrates", "people", "reptiles", "small_mammals", "trees",
    "vehicles_1", "vehicles_2",
]  # fmt: skip

assert len(CIFAR100_FINE_LABEL_NAMES) == 100 and len(CIFAR100_COARSE_LABEL_NAMES) == 20

_NOISE_STD = 16.0


# --------------------------------------------------------------------------- images
def class_colours(num_classes: int) -> np.ndarray:
    """``(num_classes, 3)`` uint8 RGB colours on a grid of the RGB cube, one per class.

    Depends only on ``num_classes`` (not on any seed), so every split and every call agrees.
    """
    k = max(2, math.ceil(num_classes ** (1.0 / 3.0) - 1e-9))
    levels = np.linspace(30, 225, k)
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), axis=-1).reshape(-1, 3)
    order = np.random.default_rng(12345).permutation(len(grid))[:num_classes]
    return np.round(grid[order]).astype(np.uint8)


def _class_images(rng: np.random.Generator, colour: np.ndarray, count: int, size: int) -> np.ndarray:
    """``(count, size, size, 3)`` uint8 images: the class colour plus Gaussian noise."""
    noise = rng.normal(0.0, _NOISE_STD, size=(count, size, size, 3))
    return np.clip(colour.astype(np.float64) + noise, 0, 255).astype(np.uint8)


def _make_split(
    rng: np.random.Generator, colours: np.ndarray, per_class: int, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled ``(images (N,H,W,3) uint8, labels (N,) int64)`` with ``per_class`` of each class."""
    images = [_class_images(rng, colours[c], per_class, size) for c in range(len(colours))]
    labels = np.repeat(np.arange(len(colours), dtype=np.int64), per_class)
    data = np.concatenate(images, axis=0) if images else np.zeros((0, size, size, 3), np.uint8)
    perm = rng.permutation(len(labels))
    return data[perm], labels[perm]


# --------------------------------------------------------------------------- python-2 pickles
class _Py2Str(str):
    """A ``str`` written as a Python-2 ``str`` (SHORT_BINSTRING/BINSTRING opcodes)."""


class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]  # pure-Python pickler: has `dispatch`
    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def save_py2_str(self, obj: _Py2Str) -> None:
        data = str(obj).encode("latin1")
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)

    dispatch[_Py2Str] = save_py2_str


def _py2(obj: Any) -> Any:
    """Mark the ``str`` keys/values of a (nested) dict/list as Python-2 strings."""
    if isinstance(obj, str):
        return _Py2Str(obj)
    if isinstance(obj, dict):
        return {_py2(k): _py2(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_py2(v) for v in obj]
    return obj


def _dump_py2(obj: dict, path: str) -> None:
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(_py2(obj))


def _cifar_rows(images: np.ndarray) -> np.ndarray:
    """(N,32,32,3) HWC -> (N,3072) rows: 1024 R, then 1024 G, then 1024 B values, row-major."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), 3 * 32 * 32))


# --------------------------------------------------------------------------- CIFAR
def write_tiny_cifar(
    root: Union[str, os.PathLike],
    num_classes: int,
    train_per_class: int,
    test_per_class: int,
    seed: int = 0,
) -> str:
    """Write a tiny CIFAR-10 (``num_classes=10``) or CIFAR-100 (``100``) under ``root``.

    Layout and pickle contents follow the official archives, so
    ``torchvision.datasets.CIFAR10/100(root, download=False)`` loads them (after
    :func:`disable_cifar_checksums`):

    * CIFAR-10: ``cifar-10-batches-py/data_batch_1..5`` (training images spread over the five
      batches), ``test_batch`` (keys ``batch_label``, ``labels``, ``data`` (N,3072) uint8,
      ``filenames``) and ``batches.meta`` (``label_names``, ``num_cases_per_batch``, ``num_vis``).
    * CIFAR-100: ``cifar-100-python/train``, ``test`` (keys ``batch_label``, ``fine_labels``,
      ``coarse_labels``, ``data``, ``filenames``) and ``meta`` (``fine_label_names``,
      ``coarse_label_names``). Coarse labels are ``fine // 5`` (not the real grouping).

    Returns ``root`` as a string.
    """
    if num_classes not in (10, 100):
        raise ValueError(f"num_classes must be 10 or 100, got {num_classes}")
    if train_per_class < 0 or test_per_class < 0:
        raise ValueError("train_per_class and test_per_class must be >= 0")
    root = str(root)
    rng = np.random.default_rng(seed)
    colours = class_colours(num_classes)
    train_x, train_y = _make_split(rng, colours, train_per_class, 32)
    test_x, test_y = _make_split(rng, colours, test_per_class, 32)

    if num_classes == 10:
        folder = os.path.join(root, "cifar-10-batches-py")
        os.makedirs(folder, exist_ok=True)
        chunks = np.array_split(np.arange(len(train_y)), 5)
        for b, idx in enumerate(chunks, start=1):
            _dump_py2(
                {
                    "batch_label": f"training batch {b} of 5",
                    "labels": [int(v) for v in train_y[idx]],
                    "data": _cifar_rows(train_x[idx]),
                    "filenames": [f"tiny_train_{b}_{i:05d}.png" for i in range(len(idx))],
                },
                os.path.join(folder, f"data_batch_{b}"),
            )
        _dump_py2(
            {
                "batch_label": "testing batch 1 of 1",
                "labels": [int(v) for v in test_y],
                "data": _cifar_rows(test_x),
                "filenames": [f"tiny_test_{i:05d}.png" for i in range(len(test_y))],
            },
            os.path.join(folder, "test_batch"),
        )
        _dump_py2(
            {
                "num_cases_per_batch": max((len(c) for c in chunks), default=0),
                "label_names": list(CIFAR10_LABEL_NAMES),
                "num_vis": 3072,
            },
            os.path.join(folder, "batches.meta"),
        )
    else:
        folder = os.path.join(root, "cifar-100-python")
        os.makedirs(folder, exist_ok=True)
        for name, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
            _dump_py2(
                {
                    "filenames": [f"tiny_{name}_{i:05d}.png" for i in range(len(y))],
                    "batch_label": f"{name}ing batch 1 of 1",
                    "fine_labels": [int(v) for v in y],
                    "coarse_labels": [int(v) // 5 for v in y],
                    "data": _cifar_rows(x),
                },
                os.path.join(folder, name),
            )
        _dump_py2(
            {
                "fine_label_names": list(CIFAR100_FINE_LABEL_NAMES),
                "coarse_label_names": list(CIFAR100_COARSE_LABEL_NAMES),
            },
            os.path.join(folder, "meta"),
        )
    return root


def disable_cifar_checksums(monkeypatch: Any) -> None:
    """Make torchvision's CIFAR integrity checks accept any existing file (tests only).

    Patches ``torchvision.datasets.cifar.check_integrity`` (used for the data files and the
    meta file) and ``CIFAR10._check_integrity`` (inherited by CIFAR100) with existence checks.
    """
    import torchvision.datasets.cifar as tv_cifar

    def exists(fpath: Union[str, os.PathLike], md5: Any = None) -> bool:
        return os.path.isfile(fpath)

    def check_files(self: Any) -> bool:
        return all(
            os.path.isfile(os.path.join(self.root, self.base_folder, filename))
            for filename, _md5 in self.train_list + self.test_list
        )

    monkeypatch.setattr(tv_cifar, "check_integrity", exists)
    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", check_files)


# --------------------------------------------------------------------------- image folders
def write_tiny_image_folder(
    root: Union[str, os.PathLike],
    classes: Union[Sequence[str], int],
    per_class: int,
    size: int = 32,
    splits: Sequence[str] = ("train", "val"),
    seed: int = 0,
    ext: str = "png",
) -> str:
    """Write ``<root>/<split>/<class>/NNNN.<ext>`` images (``size`` x ``size`` RGB).

    ``classes`` is a list of class names or a count (names ``class_00``, ``class_01``, ...).
    Each split gets ``per_class`` images of every class. ``ext`` is ``"png"`` (lossless,
    default) or ``"jpg"`` (like the CIFAR-10 JPEG trees). Returns ``root`` as a string.
    """
    from PIL import Image

    if isinstance(classes, int):
        width = max(2, len(str(classes - 1)))
        classes = [f"class_{i:0{width}d}" for i in range(classes)]
    classes = list(classes)
    if len(set(classes)) != len(classes):
        raise ValueError(f"duplicate class names: {classes}")
    ext = ext.lower().lstrip(".")
    if ext not in ("png", "jpg", "jpeg"):
        raise ValueError(f"ext must be 'png' or 'jpg', got {ext!r}")
    root = str(root)
    rng = np.random.default_rng(seed)
    colours = class_colours(len(classes))
    for split in splits:
        for c, name in enumerate(classes):
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for i, image in enumerate(_class_images(rng, colours[c], per_class, size)):
                path = os.path.join(folder, f"{i:04d}.{ext}")
                if ext == "png":
                    Image.fromarray(image).save(path)
                else:
                    Image.fromarray(image).save(path, quality=95)
    return root
