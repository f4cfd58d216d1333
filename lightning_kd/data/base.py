"""Base class of the image-classification LightningDataModules."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, Callable, Optional, Union

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets
from torchvision.transforms import v2

from lightning_kd.data.augment import KeyedTransform
from lightning_kd.data.cache import cached_decode
from lightning_kd.data.samplers import ClassPairBatchSampler, EpochSeededRandomSampler, ResumableLoader
from lightning_kd.data.tensor_resident import CropFlipNormalize, DrawRecord, PerSampleCropFlip, TensorImageDataset

__all__ = ["ClassificationDataModule", "TransformedSubset", "check_int", "read_image", "run_seed"]


#: Splits of at least this many images are decoded by every core (worker start-up costs more than small ones take).
_PARALLEL_DECODE_MIN = 4096


def _accelerator_available() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def _free_memory_bytes() -> int:
    """Memory free now where the OS reports it, else physical memory; 0 where neither is known."""
    if not hasattr(os, "sysconf"):
        return 0
    pages = "SC_AVPHYS_PAGES" if "SC_AVPHYS_PAGES" in os.sysconf_names else "SC_PHYS_PAGES"
    return os.sysconf(pages) * os.sysconf("SC_PAGE_SIZE")


def run_seed() -> int:
    """The run's seed: ``seed_everything``'s (which Lightning keeps in ``PL_GLOBAL_SEED``), 0 when none was set."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def check_int(name: str, value: Any, minimum: int) -> int:
    """``value``, which must be an integer (not a bool) of at least ``minimum``; else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def read_image(path: str) -> Any:
    """torchvision's image loader (an RGB PIL image), failing with the path of a file it cannot decode (truncated,
    corrupt, not an image): PIL's own message often does not name it."""
    try:
        return datasets.folder.default_loader(path)
    except (OSError, SyntaxError, ValueError) as error:
        raise OSError(f"cannot read the image {path}: {error}") from None


def _carried_fields(dataset: Dataset) -> tuple[str, ...]:
    """The names in the dict of per-sample values that the items of ``dataset`` carry after their target (read from
    its first item); none for ``(image, target)`` items."""
    _image, _target, *carried = dataset[0]
    return tuple(carried[0]) if carried else ()


class TransformedSubset(Dataset):
    """A (sub)set of a dataset of ``(image, target)`` pairs with a transform on the image.

    Lets the training and the held-out validation part of one loaded split use
    different transforms without loading the split twice. Items are read by position (as in epoch 0) or by the key
    ``(epoch, position)`` the training loaders pass (:class:`~lightning_kd.data.samplers.ResumableLoader`).

    Args:
        dataset: dataset returning ``(image, target)`` with an untransformed image, or ``(image, target, values)``
            with a dict of per-sample values (numbers or tensors) after the target.
        indices: the indices of ``dataset`` to expose; ``None`` for all of them.
        transform: applied to the image; a :class:`~lightning_kd.data.augment.KeyedTransform` is also given the
            epoch and the sample's index in ``dataset``, from which it draws its augmentation.
        fields: the per-sample fields of every item, as a dict after the target: ``"index"``, the item's position in
            this (sub)set, or the name of a value the items of ``dataset`` carry; none (the default): items are
            ``(image, target)``.
    """

    def __init__(
        self,
        dataset: Dataset,
        indices: Optional[Sequence[int]] = None,
        transform: Optional[Callable[[Any], Any]] = None,
        fields: Sequence[str] = (),
    ) -> None:
        self.dataset = dataset
        self.indices = None if indices is None else [int(i) for i in indices]
        self.transform = transform
        self.fields = tuple(fields)

    def __len__(self) -> int:
        return len(self.dataset) if self.indices is None else len(self.indices)  # type: ignore[arg-type]

    def __getitem__(self, key: Union[int, tuple[int, int]]) -> tuple[Any, ...]:
        epoch, position = key if isinstance(key, tuple) else (0, key)
        index = position if self.indices is None else self.indices[position]
        image, target, *carried = self.dataset[index]
        if isinstance(self.transform, KeyedTransform):
            image = self.transform(image, epoch, index)
        elif self.transform is not None:
            image = self.transform(image)
        if not self.fields:
            return image, target
        values = carried[0] if carried else {}
        return image, target, {name: position if name == "index" else values[name] for name in self.fields}

    @property
    def targets(self) -> list[int]:
        """Class index of every item (when the wrapped dataset exposes ``targets``)."""
        targets = getattr(self.dataset, "targets", None)
        if targets is None:
            raise AttributeError(f"{type(self.dataset).__name__} has no `targets`")
        if self.indices is None:
            return [int(t) for t in targets]
        return [int(targets[i]) for i in self.indices]


class ClassificationDataModule(pl.LightningDataModule):
    """Base class of the image-classification data modules.

    A subclass provides :attr:`num_classes` (valid right after ``__init__``), loads its
    untransformed splits in :meth:`_load_splits` and defines :meth:`train_transform` (or :meth:`batch_transform`)
    and :meth:`eval_transform`. This class handles the validation hold-out, the
    reproducible training shuffle and the dataloaders. The training batches may carry per-sample fields, such as
    each sample's index, for the methods that ask (:meth:`serve_fields`).

    A run means one thing: the shuffle of epoch ``e`` is a function of ``(seed, e)`` and a training sample's
    augmentation a function of ``(seed, e, sample index)`` (:mod:`lightning_kd.data.augment`), whatever the number of
    workers or DDP ranks and whichever data path (``tensor_resident``) is taken; the training loader's position in
    its epoch is saved in every checkpoint (:class:`~lightning_kd.data.samplers.ResumableLoader`), so a run resumed
    from any checkpoint, mid-epoch too, goes on exactly as if it had not stopped.

    The arguments after ``root`` are the loader arguments of every data module: a subclass takes its own arguments
    and passes these on with ``**kwargs`` (which the CLI follows, so it lists them for the subclass too).

    Args:
        root: directory of the dataset.
        batch_size: samples per batch (per device under DDP).
        num_workers: dataloader worker processes (0 loads in the main process).
        pin_memory: pin host memory of the batches (only when an accelerator is present).
        persistent_workers: keep the workers alive between epochs (only when num_workers > 0).
        val_split: fraction of the training split held out for validation; 0 validates on
            the test split, as most of the literature reports.
        seed: seed of the validation hold-out, of the per-epoch training shuffle and of the augmentation. ``None``:
            the run's seed, ``seed_everything``'s (which the CLI sets before it creates the module), 0 when none is set.
        paired_batches: follow every training batch with a partner of the same class for each sample
            (:class:`~lightning_kd.data.samplers.ClassPairBatchSampler`, for CS-KD): batches then hold
            ``2 * batch_size`` samples.
        tensor_resident: keep each split decoded as one uint8 tensor and augment and normalise whole batches
            on the training device (``on_after_batch_transfer``) instead of per image in the workers; the
            loaders then serve draw records (training) and uint8 images, which ``on_after_batch_transfer`` finishes.
            Both paths give bit-identical batches. ``None``: on where the module supports it and the decoded splits
            take under a quarter of the free memory (a choice of speed only).
    """

    def __init__(
        self,
        root: str,
        batch_size: int = 64,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        val_split: float = 0.0,
        seed: Optional[int] = None,
        paired_batches: bool = False,
        tensor_resident: Optional[bool] = False,
    ) -> None:
        super().__init__()
        check_int("batch_size", batch_size, 1)
        check_int("num_workers", num_workers, 0)
        if (
            isinstance(val_split, bool)
            or not isinstance(val_split, (int, float))
            or not math.isfinite(val_split)
            or not 0.0 <= val_split < 1.0
        ):
            raise ValueError(
                f"val_split must be in [0, 1) (0 validates on the test split), got {val_split!r}"
            )
        self.root = str(root)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = bool(persistent_workers)
        self.val_split = float(val_split)
        self._seed_given = seed is not None
        self.seed = run_seed() if seed is None else int(seed)
        self.paired_batches = bool(paired_batches)
        self.tensor_resident = None if tensor_resident is None else bool(tensor_resident)
        self._batch_transform: Optional[CropFlipNormalize] = None  # set by setup() for tensor-resident splits
        self._served_fields: tuple[str, ...] = ()  # the training batches' per-sample fields (serve_fields)
        self._decode_cache_dir: Optional[str] = None  # where decoded splits are cached (a subclass that keys them)

        self._class_names: Optional[list[str]] = None
        self.train_dataset: Optional[Dataset] = None
        self.val_dataset: Optional[Dataset] = None
        self.test_dataset: Optional[Dataset] = None

    # ------------------------------------------------------------------ subclass API
    @property
    def num_classes(self) -> int:
        """Number of classes; valid right after ``__init__``."""
        raise NotImplementedError(f"{type(self).__name__} must define `num_classes`")

    def _load_splits(self) -> tuple[Dataset, Dataset, list[str]]:
        """Load ``(train, test, class_names)``; the datasets return untransformed images."""
        raise NotImplementedError

    def train_transform(self) -> Callable[..., torch.Tensor]:
        """Transform of the training images, augmentation included; a
        :class:`~lightning_kd.data.augment.KeyedTransform` draws it from each sample's key (any other transform makes
        the augmentation depend on the worker processes' random state). Default, for a module with a
        :meth:`batch_transform`: :class:`~lightning_kd.data.tensor_resident.PerSampleCropFlip`, i.e. decode, then that
        batch transform on a batch of one, so that the per-sample and the tensor-resident path give the same batches."""
        batch = self.batch_transform()
        if batch is None:
            raise NotImplementedError(f"{type(self).__name__} must define `train_transform`")
        return PerSampleCropFlip(self.decode_transform(), batch)

    def eval_transform(self) -> Callable[[Any], torch.Tensor]:
        """Transform of the validation/test images."""
        raise NotImplementedError

    def batch_transform(self) -> Optional[CropFlipNormalize]:
        """The per-batch counterpart of :meth:`train_transform` / :meth:`eval_transform` for tensor-resident
        splits, seeded with :attr:`seed`; ``None`` (the default): this module has no tensor-resident path."""
        return None

    def decode_transform(self) -> Callable[[Any], torch.Tensor]:
        """A raw image to the uint8 ``(C, H, W)`` tensor kept for the tensor-resident path (all of one size)."""
        return v2.Compose([v2.ToImage(), v2.ToPureTensor()])

    # ------------------------------------------------------------------ datasets
    @property
    def class_names(self) -> list[str]:
        """Class names, in class-index order; available after :meth:`setup`."""
        if self._class_names is None:
            raise RuntimeError(f"{type(self).__name__}.class_names is only available after setup()")
        return list(self._class_names)

    @property
    def is_setup(self) -> bool:
        return self.train_dataset is not None

    def setup(self, stage: Optional[str] = None) -> None:
        """Build the train/val/test datasets (once; later calls are no-ops)."""
        if self.is_setup:
            return
        train, test, class_names = self._load_splits()
        if len(class_names) != self.num_classes:
            raise RuntimeError(
                f"{type(self).__name__}: the data has {len(class_names)} classes but num_classes is "
                f"{self.num_classes}"
            )
        if self._decodes_to_tensors(train, test):
            train, test = self._decode_split(train, "training"), self._decode_split(test, "evaluation")
            self._batch_transform = self.batch_transform()
            train_tf, eval_tf = DrawRecord(self._batch_transform), None
        else:
            train_tf, eval_tf = self.train_transform(), self.eval_transform()
        if self.val_split > 0.0:
            n = len(train)  # type: ignore[arg-type]
            n_val = max(1, int(round(self.val_split * n)))
            if n_val >= n:
                raise ValueError(
                    f"val_split={self.val_split} of {n} training samples leaves no training data"
                )
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).tolist()
            val_idx, train_idx = sorted(perm[:n_val]), sorted(perm[n_val:])
            self.train_dataset = TransformedSubset(train, train_idx, train_tf, self._served_fields)
            self.val_dataset = TransformedSubset(train, val_idx, eval_tf)
        else:
            self.train_dataset = TransformedSubset(train, None, train_tf, self._served_fields)
            self.val_dataset = TransformedSubset(test, None, eval_tf)
        self.test_dataset = TransformedSubset(test, None, eval_tf)
        self._class_names = list(class_names)

    @property
    def training_batch_transform(self) -> Optional[CropFlipNormalize]:
        """The transform that finishes the tensor-resident training batches from their draw records (crop, flip and
        normalisation, drawn from each sample's ``(seed, epoch, index)``); ``None`` on the per-sample path or before
        :meth:`setup`."""
        return self._batch_transform

    @property
    def num_train_samples(self) -> int:
        """Number of training samples, after the ``val_split`` hold-out (the range of the ``"index"`` field); valid
        right after ``__init__``: it sets the module up if it is not yet. The CLI links it to the model's
        ``num_samples``."""
        self.setup("fit")
        return len(self.train_dataset)  # type: ignore[arg-type]

    def serve_fields(self, names: Sequence[str]) -> None:
        """Have every training batch carry these per-sample fields: ``(x, y, {name: tensor (B, ...)})`` instead of
        ``(x, y)``, on either data path, for class-paired batches (all ``2B`` samples) and resumed epochs too.
        Validation, test and predict batches stay ``(x, y)``.

        A LightningModule asks in its ``setup`` (after the data module's, before ``train_dataloader``). Requests add
        up, hold for the training loaders made after them and survive the module being set up again.

        Args:
            names: ``"index"``, the sample's position in :attr:`train_dataset` (``0 <= index <``
                :attr:`num_train_samples`, int64), e.g. for a memory bank of the training set; or the name of a value
                the loaded training split's items carry in a dict after their target (``(image, target, {name:
                value})``, a number or a tensor of one shape), which sets the module up if it is not yet.

        Raises:
            ValueError: a name this module cannot serve; the message lists those it can.

        Example::

            data = CIFAR100DataModule(batch_size=64, tensor_resident=False)
            data.setup("fit")
            data.serve_fields(["index"])
            x, y, fields = next(iter(data.train_dataloader()))
            fields["index"]  # int64, shape (64,): positions in data.train_dataset
        """
        names = [names] if isinstance(names, str) else list(names)
        if any(name != "index" for name in names):
            servable = self._servable_fields()
            unknown = [name for name in names if name not in servable]
            if unknown:
                raise ValueError(f"{type(self).__name__} cannot serve the field(s) {unknown}: it serves {servable}")
        self._served_fields = tuple(dict.fromkeys((*self._served_fields, *names)))
        if self.train_dataset is not None:
            self.train_dataset.fields = self._served_fields  # type: ignore[attr-defined]

    def _servable_fields(self) -> list[str]:
        """``"index"`` and the values the loaded training split's items carry (setting the module up)."""
        self.setup("fit")
        return ["index", *_carried_fields(self.train_dataset.dataset)]  # type: ignore[union-attr]

    def decode_cache_key(self, split: Dataset) -> Optional[dict]:
        """What the decoded pixels of ``split`` depend on (JSON-serialisable), for the cache of decoded splits
        (:mod:`lightning_kd.data.cache`), the decode transform excepted (added by the caller); ``None``, the
        default: the split is decoded in every process."""
        return None

    def _decode_split(self, split: Dataset, kind: str) -> TensorImageDataset:
        """``split`` decoded into one uint8 tensor (:meth:`decode_transform`), from the cache when its key is there;
        in parallel (every core, at most 8 workers) when large."""
        decode, fields = self.decode_transform(), _carried_fields(split)
        workers = self.num_workers
        if len(split) >= _PARALLEL_DECODE_MIN:  # type: ignore[arg-type]
            workers = max(workers, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1, 8))

        def run() -> TensorImageDataset:
            progress = f"Decoding {len(split)} {kind} images"  # type: ignore[arg-type]
            return TensorImageDataset.decode(TransformedSubset(split, None, decode, fields), workers, progress=progress)

        key = None if fields or self._decode_cache_dir is None else self.decode_cache_key(split)
        if key is None:
            return run()
        key = {**key, "decode": repr(decode)}
        return cached_decode(key, self._decode_cache_dir, run, f"{kind} images of {self.root}")

    def _decodes_to_tensors(self, train: Dataset, test: Dataset) -> bool:
        """Whether :meth:`setup` keeps the splits as uint8 tensors (resolving ``tensor_resident=None``)."""
        if self.tensor_resident is False:
            return False
        if self.batch_transform() is None:
            if self.tensor_resident:
                raise ValueError(f"{type(self).__name__} has no tensor-resident path: set tensor_resident=false")
            return False
        if self.tensor_resident:
            return True
        image, _ = TransformedSubset(train, [0], self.decode_transform())[0]
        return image.numel() * (len(train) + len(test)) < _free_memory_bytes() / 4  # type: ignore[arg-type]

    def state_dict(self) -> dict[str, Any]:
        """The data seed, saved in every checkpoint."""
        return {"seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A run from a checkpoint keeps its data seed: a resumed fit, or its shuffle and augmentation would change
        from there on; validate/test, or a ``val_split`` hold-out would be drawn from other (training) samples. A seed
        taken from the run's (``seed_everything``, which the CLI draws anew at every start unless set) gives way to
        the checkpoint's, and the module is set up again; a ``seed`` given that differs is refused."""
        saved = state_dict.get("seed")
        if saved is None or saved == self.seed:
            return
        if self._seed_given:
            raise ValueError(
                f"{type(self).__name__}: the checkpoint was trained with the data seed {saved}, this run has "
                f"{self.seed}: run it with --data.init_args.seed {saved} (or without data.seed), or start a new run"
            )
        self.seed = int(saved)
        self._forget_setup()
        self.setup("fit")

    def _forget_setup(self) -> None:
        """Drop what :meth:`setup` made, so that it sets the module up again."""
        self.train_dataset = self.val_dataset = self.test_dataset = None
        self._batch_transform = None

    def _look_up(self, batch: Any) -> Any:
        """A tensor-resident training batch, draw records ``(index, top, left, flip)``, targets (and the served
        fields), as ``((images, draws), targets, ...)`` with the images read from the training split (on the host);
        any other batch as it is."""
        records, targets, *fields = batch
        if self._batch_transform is None or not (torch.is_tensor(records) and records.dtype == torch.int64):
            return batch
        images = self.train_dataset.dataset.images[records[:, 0].cpu()].to(records.device)  # type: ignore[union-attr]
        return ((images, records[:, 1:]), targets, *fields)

    def transform_batch(self, batch: Any, augment: bool) -> Any:
        """Finish a batch on its device: a tensor-resident batch is augmented (if ``augment``, with the draws its
        records carry) and normalised, its targets and fields kept; any other is returned as it is."""
        if self._batch_transform is None:
            return batch
        x, targets, *fields = self._look_up(batch)
        images, draws = x if isinstance(x, tuple) else (x, None)
        return (self._batch_transform(images, augment, draws), targets, *fields)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return self._look_up(batch)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        training = self.trainer is not None and self.trainer.training
        return self.transform_batch(batch, augment=training)

    # ------------------------------------------------------------------ dataloaders
    def _require(self, dataset: Optional[Dataset], name: str) -> Dataset:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before {name}_dataloader()")
        return dataset

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        """An evaluation loader, or the :class:`~lightning_kd.data.samplers.ResumableLoader` of the ``(seed,
        epoch)`` training shuffle (class-paired with ``paired_batches``). Neither draws from the global RNG."""
        options = {
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory and _accelerator_available(),
            "persistent_workers": self.persistent_workers and self.num_workers > 0,
            "generator": torch.Generator().manual_seed(self.seed),
        }
        if not train:
            return DataLoader(dataset, batch_size=self.batch_size, **options)
        sampler = EpochSeededRandomSampler(len(dataset), seed=self.seed)  # type: ignore[arg-type]
        if self.paired_batches:
            targets = dataset.targets  # type: ignore[attr-defined]
            pairs = ClassPairBatchSampler(sampler, self.batch_size, False, targets)
            return ResumableLoader(dataset, batch_sampler=pairs, **options)
        return ResumableLoader(dataset, batch_size=self.batch_size, sampler=sampler, **options)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._require(self.train_dataset, "train"), train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._require(self.val_dataset, "val"), train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._require(self.test_dataset, "test"), train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self._require(self.test_dataset, "predict"), train=False)
