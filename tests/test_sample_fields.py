"""Per-sample fields of the training batches (``ClassificationDataModule.serve_fields``), the sample's index in the
training set first, and the training-set size (``num_train_samples``)."""

from __future__ import annotations

import itertools

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import Dataset

from lightning_kd.data import CIFAR10DataModule, ImageFolderDataModule, QueryPoolDataModule


def cifar(root, **options) -> CIFAR10DataModule:
    return CIFAR10DataModule(root, download=False, **{"batch_size": 8, "num_workers": 0, "seed": 3, **options})


def folder(root, **options) -> ImageFolderDataModule:
    return ImageFolderDataModule(root, **{"batch_size": 8, "num_workers": 0, "seed": 3, **options})


def finished(data, loader) -> list[tuple]:
    """The training batches of ``loader`` as the model receives them (tensor-resident ones looked up and augmented)."""
    return [tuple(data.transform_batch(data.on_before_batch_transfer(batch, 0), augment=True)) for batch in loader]


def epoch_loader(data, epoch: int):
    loader = data.train_dataloader()
    loader.batch_sampler.sampler.set_epoch(epoch)
    return loader


def assert_same_batches(ours: list[tuple], theirs: list[tuple]) -> None:
    assert len(ours) == len(theirs)
    for step, ((x, y, fields), (x2, y2, fields2)) in enumerate(zip(ours, theirs)):
        assert torch.equal(x, x2) and torch.equal(y, y2), f"batch {step}: the images or targets differ"
        assert fields.keys() == fields2.keys(), f"batch {step}: other fields"
        for name in fields:
            assert fields[name].dtype == fields2[name].dtype, f"batch {step}: {name} has another dtype"
            assert torch.equal(fields[name], fields2[name]), f"batch {step}: {name} differs"


@pytest.mark.parametrize("resident", [False, True], ids=["per-sample", "tensor-resident"])
def test_without_a_request_batches_stay_pairs(tiny_cifar10, resident):
    data = cifar(tiny_cifar10, tensor_resident=resident)
    data.setup("fit")
    data.serve_fields([])
    assert all(len(batch) == 2 for batch in finished(data, data.train_dataloader()))
    data.serve_fields(["index"])
    assert len(next(iter(data.val_dataloader()))) == 2  # only training batches carry fields
    assert len(next(iter(data.test_dataloader()))) == 2
    assert len(next(iter(data.predict_dataloader()))) == 2


@pytest.mark.parametrize("val_split", [0.0, 0.25], ids=["whole split", "val_split"])
@pytest.mark.parametrize("resident", [False, True], ids=["per-sample", "tensor-resident"])
@pytest.mark.parametrize("dataset", ["cifar", "folder"])
def test_an_epochs_indices_are_a_permutation_of_the_training_set_and_match_its_samples(
    dataset, resident, val_split, tiny_cifar10, tiny_folder
):
    make, root = (cifar, tiny_cifar10) if dataset == "cifar" else (folder, tiny_folder)
    data = make(root, tensor_resident=resident, val_split=val_split)
    data.setup("fit")
    data.serve_fields(["index"])
    reference = make(root, tensor_resident=False, val_split=val_split)  # the per-sample items, key by key
    reference.setup("fit")
    targets = data.train_dataset.targets
    loader = epoch_loader(data, 1)
    served = []
    for positions, (x, y, fields) in zip(list(loader.batch_sampler), finished(data, loader)):
        index = fields["index"]
        assert list(fields) == ["index"] and index.dtype == torch.int64 and index.tolist() == positions
        assert y.tolist() == [targets[i] for i in positions]
        assert torch.equal(x, torch.stack([reference.train_dataset[(1, i)][0] for i in positions]))
        served += positions
    assert sorted(served) == list(range(len(data.train_dataset))) == list(range(data.num_train_samples))
    if val_split:  # positions in the training subset, none of the held-out samples
        assert len(data.train_dataset) < len(data.train_dataset.dataset)
        assert not {data.train_dataset.indices[i] for i in served} & set(data.val_dataset.indices)


@pytest.mark.parametrize("paired", [False, True], ids=["plain", "paired"])
def test_both_paths_give_the_same_images_targets_and_fields(tiny_cifar10, paired):
    """The per-sample path in two worker processes, which receive the request with the dataset."""
    batches = {}
    for resident in (False, True):
        data = cifar(tiny_cifar10, tensor_resident=resident, paired_batches=paired, num_workers=0 if resident else 2)
        data.serve_fields(["index"])  # before setup: setup applies it
        data.setup("fit")
        batches[resident] = finished(data, epoch_loader(data, 2))
    assert_same_batches(batches[True], batches[False])


@pytest.mark.parametrize("resident", [False, True], ids=["per-sample", "tensor-resident"])
def test_class_paired_batches_carry_the_partners_indices(tiny_folder, resident):
    data = folder(tiny_folder, tensor_resident=resident, paired_batches=True, batch_size=4)
    data.setup("fit")
    data.serve_fields(["index"])
    targets = data.train_dataset.targets
    loader = epoch_loader(data, 1)
    anchors = []
    for positions, (x, y, fields) in zip(list(loader.batch_sampler), finished(data, loader)):
        index = fields["index"].tolist()
        half = len(index) // 2
        assert index == positions and len(x) == 2 * half and y.tolist() == [targets[i] for i in index]
        assert [targets[i] for i in index[:half]] == [targets[i] for i in index[half:]]  # partners of the same class
        anchors += index[:half]
    assert sorted(anchors) == list(range(len(targets)))


@pytest.mark.parametrize(
    "resident, paired", [(True, False), (False, True)], ids=["tensor-resident", "per-sample, paired"]
)
def test_a_resumed_epoch_serves_the_indices_of_the_uninterrupted_one(tiny_cifar10, resident, paired):
    data = cifar(tiny_cifar10, tensor_resident=resident, paired_batches=paired, batch_size=4)
    data.setup("fit")
    data.serve_fields(["index"])
    whole = finished(data, epoch_loader(data, 1))
    stopped = epoch_loader(data, 1)
    for _ in itertools.islice(stopped, 3):
        pass
    resumed = epoch_loader(data, 0)
    resumed.load_state_dict(stopped.state_dict())
    batches = iter(resumed)  # made before the epoch is set, as Lightning does on resume
    resumed.batch_sampler.sampler.set_epoch(1)
    assert_same_batches(finished(data, batches), whole[3:])


def test_the_request_survives_setting_the_module_up_again(tiny_cifar10, monkeypatch):
    """A checkpoint's data seed is adopted by setting the module up anew (load_state_dict)."""
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    data = CIFAR10DataModule(tiny_cifar10, download=False, batch_size=8, num_workers=0, tensor_resident=True)
    data.setup("fit")
    data.serve_fields(["index"])
    first = data.train_dataset
    data.load_state_dict({"seed": 5})
    assert data.seed == 5 and data.train_dataset is not first
    x, y, fields = finished(data, data.train_dataloader())[0]
    assert list(fields) == ["index"] and len(fields["index"]) == len(x) == 8


@pytest.mark.parametrize("resident", [False, True], ids=["per-sample", "tensor-resident"])
def test_an_unknown_field_is_one_error_naming_the_servable_ones(tiny_cifar10, resident):
    data = cifar(tiny_cifar10, tensor_resident=resident)
    with pytest.raises(ValueError, match=r"CIFAR10DataModule cannot serve the field\(s\) \['weight'\]: it serves "
                                         r"\['index'\]"):  # fmt: skip
        data.serve_fields(["index", "weight"])
    assert all(len(batch) == 2 for batch in finished(data, data.train_dataloader()))  # nothing of it was kept


class CarryingValues(Dataset):
    """A split whose items carry per-sample values in a dict after the target."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.targets = dataset.targets

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, target = self.dataset[index]
        return image, target, {"weight": index / 10, "code": torch.tensor([index, -index])}


class CarryingCIFAR10(CIFAR10DataModule):
    def _load_splits(self):
        train, test, class_names = super()._load_splits()
        return CarryingValues(train), CarryingValues(test), class_names


def test_the_values_a_datasets_items_carry_are_served_by_name(tiny_cifar10):
    batches = {}
    for resident in (False, True):
        data = CarryingCIFAR10(tiny_cifar10, download=False, batch_size=8, num_workers=0, seed=3, val_split=0.25,
                               tensor_resident=resident)  # fmt: skip
        data.serve_fields(["weight"])  # before setup: sets the module up to learn what its items carry
        data.serve_fields(["index", "code", "weight"])  # requests add up
        with pytest.raises(ValueError, match=r"\['size'\]: it serves \['index', 'weight', 'code'\]"):
            data.serve_fields(["size"])
        batches[resident] = finished(data, epoch_loader(data, 1))
        for _x, _y, fields in batches[resident]:
            assert list(fields) == ["weight", "index", "code"]
            raw = torch.tensor([data.train_dataset.indices[i] for i in fields["index"].tolist()])
            assert torch.equal(fields["weight"], raw.double() / 10) and fields["weight"].dtype == torch.float64
            assert torch.equal(fields["code"], torch.stack([raw, -raw], 1))
        assert len(next(iter(data.val_dataloader()))) == 2
    assert_same_batches(batches[True], batches[False])


def test_num_train_samples_is_known_right_after_init(tiny_cifar10, tiny_folder):
    for data, expected in ((cifar(tiny_cifar10), 80), (cifar(tiny_cifar10, val_split=0.25), 60),
                           (folder(tiny_folder), 64), (folder(tiny_folder, val_split=0.25), 48)):  # fmt: skip
        assert not data.is_setup
        assert data.num_train_samples == expected == len(data.train_dataset)
    assert QueryPoolDataModule(cifar(tiny_cifar10), pool_size=4).num_train_samples is None  # its set grows


def test_the_query_pool_refuses_fields(tiny_cifar10):
    pool = QueryPoolDataModule(cifar(tiny_cifar10), pool_size=4, seed=3)
    pool.setup("fit")
    pool.serve_fields([])
    with pytest.raises(ValueError, match=r"QueryPoolDataModule serves no per-sample fields, asked for \['index'\]"):
        pool.serve_fields(["index"])


class AsksForTheIndex(pl.LightningModule):
    """Asks for the index in its setup, records the training batches and checks the validation ones."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.batches = []

    def setup(self, stage: str) -> None:
        self.trainer.datamodule.serve_fields(["index"])

    def training_step(self, batch, batch_idx):
        self.batches.append(tuple(batch))
        return self.weight * 0.0

    def validation_step(self, batch, batch_idx):
        assert len(batch) == 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_a_module_asking_in_its_setup_trains_on_batches_with_fields(tiny_cifar10, tmp_path):
    batches = {}
    for resident in (False, True):
        module = AsksForTheIndex()
        trainer = pl.Trainer(
            max_epochs=1, limit_train_batches=3, limit_val_batches=1, num_sanity_val_steps=0, accelerator="cpu",
            devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            default_root_dir=tmp_path,
        )  # fmt: skip
        trainer.fit(module, datamodule=cifar(tiny_cifar10, tensor_resident=resident))
        batches[resident] = module.batches
    assert len(batches[True]) == 3
    assert_same_batches(batches[True], batches[False])
