"""An unlabeled pool of images and a training set of soft-labelled mixes of them that grows during training.

For data-efficient distillation from a black-box teacher (Active Mixup): a few unlabeled images are drawn
from another data module's training split, a method labels chosen mixes ``w·a + (1−w)·b`` of them with the
teacher's probabilities (:meth:`QueryPoolDataModule.add`), and the training loader serves what has been
labelled so far. The set grows through Lightning's normal data reloading: with
``trainer.reload_dataloaders_every_n_epochs=1`` every epoch trains on the set as it stands at its start.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Callable, Optional, Union

import torch
from torch.utils.data import DataLoader, Dataset

from lightning_kd.data.augment import KeyedTransform
from lightning_kd.data.base import ClassificationDataModule, TransformedSubset
from lightning_kd.data.tensor_resident import crop_flip, crop_flip_draws

__all__ = ["MixedPoolDataset", "QueryPoolDataModule", "mix_images"]


def mix_images(pool: torch.Tensor, first: torch.Tensor, second: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``w·pool[first] + (1−w)·pool[second]``, for one index pair and weight or for 1-D tensors of them.

    Mixing normalised images is the same as normalising the mixed pixels: normalisation is affine and the
    weights sum to one.
    """
    weight = weight.to(pool.dtype)
    weight = weight.reshape(weight.shape + (1,) * (pool.dim() - 1))
    return torch.lerp(pool[second], pool[first], weight)


class CropFlip(KeyedTransform):
    """``RandomCrop(size, padding) + RandomHorizontalFlip()`` of a ``(C, H, W)`` image tensor (zero padding), drawn
    from the sample's key (:func:`~lightning_kd.data.tensor_resident.crop_flip_draws`)."""

    def __init__(self, padding: int, seed: int) -> None:
        super().__init__(seed)
        self.padding = int(padding)

    def apply(self, image: torch.Tensor, epoch: int, index: int) -> torch.Tensor:
        draws = torch.tensor([crop_flip_draws(self.seed, epoch, index, self.padding)])
        return crop_flip(image[None], self.padding, draws)[0]


class MixedPoolDataset(Dataset):
    """Items ``(w·pool[first] + (1−w)·pool[second], target)``, with an optional keyed transform of the mixed image;
    read by index (as in epoch 0) or by the ``(epoch, index)`` key the training loader passes."""

    def __init__(
        self,
        pool: torch.Tensor,
        first: torch.Tensor,
        second: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        transform: Optional[KeyedTransform] = None,
    ) -> None:
        self.pool, self.first, self.second, self.weight, self.targets = pool, first, second, weight, targets
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, key: Union[int, tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        image = mix_images(self.pool, self.first[index], self.second[index], self.weight[index])
        if self.transform is not None:
            image = self.transform(image, epoch, index)
        return image, self.targets[index]


class QueryPoolDataModule(ClassificationDataModule):
    """A small unlabeled pool drawn from ``source``'s training split, and a growing soft-labelled training set.

    The pool holds ``pool_size`` training images (chosen by ``seed``) in ``source``'s evaluation transform;
    their labels are never read. A method adds labelled mixes with :meth:`add`; :meth:`train_dataloader`
    serves them (random crop and flip on top when ``augment``), batched like ``source``. Validation and test
    are ``source``'s. The labelled set is saved in checkpoints and restored on resume. As that set grows, its
    training batches carry no per-sample fields (:meth:`serve_fields`).

    Args:
        source: the data module the pool comes from; its batch size, workers and evaluation splits are used.
        pool_size: number of unlabeled training images; a split with fewer gives all of its images (with a
            warning).
        augment: random crop (padding of 1/8 of the side) and horizontal flip of the training images, drawn from each
            mix's ``(seed, epoch, index)``.
        seed: which training images make the pool, the training shuffle and the augmentation; ``None``: the run's
            (``seed_everything``'s), 0 when none is set.
    """

    def __init__(
        self, source: ClassificationDataModule, pool_size: int = 1000, augment: bool = True, seed: Optional[int] = None
    ) -> None:
        super().__init__(
            root=source.root,
            batch_size=source.batch_size,
            num_workers=source.num_workers,
            pin_memory=source.pin_memory,
            persistent_workers=source.persistent_workers,
            seed=seed,
        )
        if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 2:
            raise ValueError(f"pool_size must be an integer >= 2 (mixes need pairs), got {pool_size!r}")
        self.source = source
        self.pool_size = pool_size
        self.augment = bool(augment)
        self.pool: Optional[torch.Tensor] = None
        self.pool_indices: Optional[torch.Tensor] = None
        self.first = torch.zeros(0, dtype=torch.long)
        self.second = torch.zeros(0, dtype=torch.long)
        self.weight = torch.zeros(0)
        self.targets = torch.zeros(0, source.num_classes)
        self.additions = 0  # calls of add(): a method's labelling rounds

    @property
    def num_classes(self) -> int:
        return self.source.num_classes

    @property
    def num_train_samples(self) -> Optional[int]:  # type: ignore[override]
        """``None``: the training set, the labelled mixes, has no fixed size (it grows with every :meth:`add`);
        :attr:`labelled_count` is its size now."""
        return None

    def serve_fields(self, names: Sequence[str]) -> None:
        """Refuses every field (an empty request is accepted): a sample's position in the growing labelled set is
        no index into a set of fixed size, such as a memory bank needs."""
        if names:
            raise ValueError(
                f"QueryPoolDataModule serves no per-sample fields, asked for {names!r}: its training set, the "
                "labelled mixes, grows with every round of queries"
            )

    def prepare_data(self) -> None:
        self.source.prepare_data()

    def setup(self, stage: Optional[str] = None) -> None:
        """Set up ``source``, take its evaluation splits and load the pool (once)."""
        self.source.setup(stage)
        self.val_dataset, self.test_dataset = self.source.val_dataset, self.source.test_dataset
        self._class_names = self.source.class_names
        if self.pool is not None:
            return
        train = self.source.train_dataset
        if len(train) < self.pool_size:
            warnings.warn(
                f"pool_size={self.pool_size} but the training split has {len(train)} images: the pool holds them all"
            )
        generator = torch.Generator().manual_seed(self.seed)
        self.pool_indices = torch.randperm(len(train), generator=generator)[: self.pool_size].sort().values
        split_indices = range(len(train.dataset)) if train.indices is None else train.indices
        images = TransformedSubset(
            train.dataset, [split_indices[i] for i in self.pool_indices.tolist()], self.source.eval_transform()
        )
        self.pool = torch.stack([image for image, _label in images])

    def eval_transform(self) -> Callable[[Any], torch.Tensor]:
        return self.source.eval_transform()

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Training mixes are served finished; validation and test batches are ``source``'s, finished as it
        finishes them (normalised on the device when its splits are tensor-resident)."""
        if self.trainer is not None and self.trainer.training:
            return batch
        return self.source.transform_batch(batch, augment=False)

    def train_transform(self) -> Optional[KeyedTransform]:
        """Random crop and flip of the (already normalised) mixed images, or ``None`` without ``augment``."""
        if not self.augment:
            return None
        return CropFlip(padding=self.pool.shape[-1] // 8, seed=self.seed)

    # --- the labelled set -----------------------------------------------------------------------
    def add(self, first: torch.Tensor, second: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> None:
        """Add the mixes ``weight·pool[first] + (1−weight)·pool[second]`` with soft labels ``targets`` (N, K)."""
        if not len(first) == len(second) == len(weight) == len(targets):
            raise ValueError("first, second, weight and targets must have one entry per added image")
        self.first = torch.cat([self.first, first.cpu().long()])
        self.second = torch.cat([self.second, second.cpu().long()])
        self.weight = torch.cat([self.weight, weight.cpu().float()])
        self.targets = torch.cat([self.targets, targets.detach().cpu().float()])
        self.additions += 1

    @property
    def labelled_count(self) -> int:
        return len(self.targets)

    def labelled_pair_ids(self) -> torch.Tensor:
        """``min(i, j)·P + max(i, j)`` for every labelled pair ``(i, j)`` of pool indices (P = pool size)."""
        low, high = torch.minimum(self.first, self.second), torch.maximum(self.first, self.second)
        return low * len(self.pool) + high

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "pool_indices": self.pool_indices,
            "first": self.first,
            "second": self.second,
            "weight": self.weight,
            "targets": self.targets,
            "additions": self.additions,
        }

    def _forget_setup(self) -> None:
        super()._forget_setup()
        self.pool = self.pool_indices = None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.pool_indices is not None and not torch.equal(state["pool_indices"], self.pool_indices):
            raise ValueError(
                "The checkpoint's unlabeled pool is not this data module's: resume with the same source data, "
                "pool_size and seed"
            )
        self.first, self.second, self.weight = state["first"], state["second"], state["weight"]
        self.targets, self.additions = state["targets"], state["additions"]

    def train_dataloader(self) -> DataLoader:
        """A loader over the labelled set as it stands now (Lightning asks again on every reload)."""
        if self.pool is None:
            raise RuntimeError("QueryPoolDataModule: call setup() before train_dataloader()")
        if self.labelled_count == 0:
            raise RuntimeError(
                "QueryPoolDataModule has no labelled images yet: a method must add() some before training"
            )
        self.train_dataset = MixedPoolDataset(
            self.pool, self.first, self.second, self.weight, self.targets, self.train_transform()
        )
        return self._loader(self.train_dataset, train=True)
