"""Tests of lightning_kd.data on tiny data written in the real on-disk formats."""

from __future__ import annotations

import os
import re
import shutil

import pytest
import pytorch_lightning as pl
import torch
import torchvision.datasets.cifar as tv_cifar
from torch.utils.data import DataLoader

from lightning_kd.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    ClassificationDataModule,
    EpochSeededRandomSampler,
    ImageFolderDataModule,
)
from lightning_kd.data.augment import ResizedCropFlipNormalize
from lightning_kd.data.cifar import CIFAR10_MEAN, CIFAR10_STD
from lightning_kd.data.tensor_resident import PerSampleCropFlip

try:
    from tests.tiny_data import (
        CIFAR10_LABEL_NAMES,
        CIFAR100_FINE_LABEL_NAMES,
        disable_cifar_checksums,
        write_tiny_cifar,
        write_tiny_image_folder,
    )
except ImportError:  # tests/ is on sys.path (rootdir-relative import mode, no tests/__init__.py)
    from tiny_data import (  # type: ignore[no-redef]
        CIFAR10_LABEL_NAMES,
        CIFAR100_FINE_LABEL_NAMES,
        disable_cifar_checksums,
        write_tiny_cifar,
        write_tiny_image_folder,
    )

CIFAR_CASES = [
    pytest.param(CIFAR10DataModule, 10, CIFAR10_LABEL_NAMES, "cifar-10-batches-py", id="cifar10"),
    pytest.param(CIFAR100DataModule, 100, CIFAR100_FINE_LABEL_NAMES, "cifar-100-python", id="cifar100"),
]

FAST = dict(num_workers=0, pin_memory=False, tensor_resident=False)  # the per-sample path: loaders serve finished batches


@pytest.fixture
def no_network(monkeypatch):
    """Fail loudly if torchvision tries to download anything."""
    calls = []

    def fake_download(*args, **kwargs):
        calls.append((args, kwargs))
        raise AssertionError("torchvision tried to download")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", fake_download)
    return calls


# --------------------------------------------------------------------------- CIFAR
@pytest.mark.parametrize("cls, n_classes, names, folder", CIFAR_CASES)
def test_cifar_loads_tiny_data(tmp_path, monkeypatch, no_network, cls, n_classes, names, folder):
    disable_cifar_checksums(monkeypatch)
    root = write_tiny_cifar(tmp_path, n_classes, train_per_class=2, test_per_class=1)
    assert os.path.isdir(os.path.join(root, folder))

    dm = cls(root=root, download=False, batch_size=16, **FAST)
    assert isinstance(dm, ClassificationDataModule)
    assert dm.num_classes == n_classes  # before prepare_data/setup (LightningCLI links it at init)
    with pytest.raises(RuntimeError, match="setup"):
        dm.class_names
    with pytest.raises(RuntimeError, match="setup"):
        dm.train_dataloader()

    dm.prepare_data()
    dm.setup("fit")
    assert dm.class_names == list(names)
    assert len(dm.train_dataset) == 2 * n_classes
    assert len(dm.val_dataset) == n_classes  # val_split=0 -> the test split
    assert len(dm.test_dataset) == n_classes

    train_loader = dm.train_dataloader()
    assert isinstance(train_loader.sampler, EpochSeededRandomSampler)
    assert train_loader.drop_last is False
    seen = 0
    for x, y in train_loader:
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32)
        assert y.dtype == torch.int64 and 0 <= int(y.min()) and int(y.max()) < n_classes
        seen += len(y)
    assert seen == 2 * n_classes  # drop_last=False

    for loader in (dm.val_dataloader(), dm.test_dataloader(), dm.predict_dataloader()):
        x, y = next(iter(loader))
        assert x.shape == (min(16, n_classes), 3, 32, 32) and x.dtype == torch.float32
        assert bool(((y >= 0) & (y < n_classes)).all())
    # eval is deterministic and normalised: a class colour lies within a few std of 0
    x1, _ = dm.test_dataset[0]
    x2, _ = dm.test_dataset[0]
    assert torch.equal(x1, x2)
    assert x1.abs().max() < 4.0


def test_cifar_normalisation_constants():
    assert CIFAR10DataModule.MEAN == (0.4914, 0.4822, 0.4465)
    assert CIFAR10DataModule.STD == (0.2470, 0.2435, 0.2616)
    assert CIFAR100DataModule.MEAN == (0.5071, 0.4865, 0.4409)
    assert CIFAR100DataModule.STD == (0.2673, 0.2564, 0.2762)
    train = CIFAR10DataModule(download=False, seed=5).train_transform()  # RandomCrop(32, 4) + flip, drawn per sample
    assert isinstance(train, PerSampleCropFlip) and train.seed == 5
    assert (train.batch.padding, train.batch.mean, train.batch.std) == (4, list(CIFAR10_MEAN), list(CIFAR10_STD))
    names = [type(t).__name__ for t in CIFAR100DataModule(download=False).eval_transform().transforms]
    assert names == ["ToImage", "ToDtype", "Normalize"]


def test_cifar_val_split(tmp_path, monkeypatch):
    disable_cifar_checksums(monkeypatch)
    root = write_tiny_cifar(tmp_path, 10, train_per_class=4, test_per_class=1)

    def split(seed):
        dm = CIFAR10DataModule(root=root, download=False, val_split=0.25, seed=seed, **FAST)
        dm.setup("fit")
        return dm

    dm = split(0)
    assert len(dm.train_dataset) == 30 and len(dm.val_dataset) == 10 and len(dm.test_dataset) == 10
    train_idx, val_idx = set(dm.train_dataset.indices), set(dm.val_dataset.indices)
    assert not train_idx & val_idx and train_idx | val_idx == set(range(40))
    assert split(0).val_dataset.indices == dm.val_dataset.indices  # seeded
    assert split(1).val_dataset.indices != dm.val_dataset.indices
    # the held-out part uses the eval transform (deterministic), the rest the train one
    assert torch.equal(dm.val_dataset[0][0], dm.val_dataset[0][0])
    assert dm.train_dataset.transform is not dm.val_dataset.transform
    assert len(dm.train_dataset.targets) == 30


def test_cifar_missing_data_message(tmp_path, no_network):
    root = str(tmp_path / "nowhere")
    dm = CIFAR10DataModule(root=root, download=False, **FAST)
    dm.prepare_data()  # download=False: nothing to do, no network
    with pytest.raises(FileNotFoundError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert root in message and "download=true" in message and "cifar-10-batches-py" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no torchvision traceback
    assert not no_network

    dm = CIFAR100DataModule(root=root, download=False, **FAST)
    with pytest.raises(FileNotFoundError, match=re.escape("cifar-100-python")):
        dm.setup("test")


def test_cifar_prepare_data_skips_download_when_present(tmp_path, monkeypatch, no_network):
    disable_cifar_checksums(monkeypatch)
    root = write_tiny_cifar(tmp_path, 100, train_per_class=1, test_per_class=1)
    dm = CIFAR100DataModule(root=root, download=True, **FAST)
    dm.prepare_data()
    assert not no_network
    dm.setup("fit")
    assert len(dm.train_dataset) == 100

    # ...whereas an empty root with download=True does go to the network
    empty = CIFAR10DataModule(root=str(tmp_path / "empty"), download=True, **FAST)
    with pytest.raises(AssertionError, match="tried to download"):
        empty.prepare_data()
    assert len(no_network) == 1


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(batch_size=0), "batch_size"),
        (dict(num_workers=-1), "num_workers"),
        (dict(val_split=1.0), "val_split"),
        (dict(val_split=-0.1), "val_split"),
    ],
)
def test_argument_validation(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        CIFAR10DataModule(download=False, **kwargs)


def test_dataloader_options(tmp_path, monkeypatch):
    disable_cifar_checksums(monkeypatch)
    root = write_tiny_cifar(tmp_path, 10, train_per_class=1, test_per_class=1)
    dm = CIFAR10DataModule(root=root, download=False, num_workers=0, persistent_workers=True)
    dm.setup("fit")
    assert dm.train_dataloader().persistent_workers is False  # only applied when num_workers > 0
    dm = CIFAR10DataModule(root=root, download=False, num_workers=2, batch_size=3, pin_memory=False)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.persistent_workers is True and loader.num_workers == 2 and loader.batch_size == 3
    assert dm.val_dataloader().sampler.__class__.__name__ == "SequentialSampler"


def test_jsonargparse_subclass_mode(tmp_path, monkeypatch):
    """LightningCLI's subclass mode: typed, documented args; num_classes readable at init."""
    from jsonargparse import ArgumentParser

    disable_cifar_checksums(monkeypatch)
    root = write_tiny_cifar(tmp_path, 10, train_per_class=1, test_per_class=1)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(ClassificationDataModule, "data")
    cfg = parser.parse_args(
        ["--data=lightning_kd.data.CIFAR10DataModule", f"--data.root={root}", "--data.download=false",
         "--data.val_split=0.1", "--data.num_workers=0"]
    )  # fmt: skip
    dm = parser.instantiate_classes(cfg).data
    assert isinstance(dm, CIFAR10DataModule) and dm.num_classes == 10 and dm.val_split == 0.1

    help_parser = ArgumentParser(exit_on_error=False)
    help_parser.add_class_arguments(ImageFolderDataModule, "data")
    help_text = help_parser.format_help()
    for arg in ("root", "image_size", "mean", "std", "batch_size", "num_workers", "pin_memory",
                "persistent_workers", "val_split", "seed"):  # fmt: skip
        assert f"--data.{arg}" in help_text
    assert "fraction of the training split held out" in help_text  # docstrings are read


# --------------------------------------------------------------------------- ImageFolder
def test_image_folder_loads(tmp_path):
    root = write_tiny_image_folder(tmp_path / "ds", ["cat", "ant", "bee"], per_class=3, size=32)
    dm = ImageFolderDataModule(root=root, batch_size=4, **FAST)
    assert dm.num_classes == 3  # right after __init__
    assert dm.class_names == ["ant", "bee", "cat"]  # sorted, like ImageFolder
    dm.setup("fit")
    assert len(dm.train_dataset) == 9 and len(dm.val_dataset) == 9
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    assert bool(((y >= 0) & (y < 3)).all())
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (4, 3, 32, 32)
    # class indices follow the folder names of train/ in both splits
    assert dm.test_dataset.dataset.class_to_idx == {"ant": 0, "bee": 1, "cat": 2}


def test_image_folder_cifar_jpeg_tree_with_defaults(tmp_path):
    """`<root>/train/<class>/NNNN.jpg` + `<root>/test/<class>/...`, as the CIFAR-10 PNG/JPEG dumps."""
    root = write_tiny_image_folder(
        tmp_path, CIFAR10_LABEL_NAMES, per_class=2, splits=("train", "test"), ext="jpg"
    )
    dm = ImageFolderDataModule(root=root, **FAST)
    assert dm.num_classes == 10 and dm.eval_dir.endswith("test")
    dm.setup("test")
    assert dm.class_names == sorted(CIFAR10_LABEL_NAMES)
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (20, 3, 32, 32)
    train = dm.train_transform()  # decode (Resize + CenterCrop), then RandomCrop + flip drawn per sample
    assert [type(t).__name__ for t in train.decode.transforms] == ["ToImage", "Resize", "CenterCrop", "ToPureTensor"]
    assert train.batch.padding == 4  # image_size // 8


def test_image_folder_large_images(tmp_path):
    root = write_tiny_image_folder(tmp_path, 2, per_class=2, size=90, splits=("train", "val", "test"))
    dm = ImageFolderDataModule(root=root, image_size=72, batch_size=4, **FAST)
    assert dm.eval_dir.endswith("val")  # val/ wins over test/
    train = dm.train_transform()
    assert isinstance(train, ResizedCropFlipNormalize) and train.size == 72
    resize = dm.eval_transform().transforms[1]
    assert type(resize).__name__ == "Resize" and list(resize.size) == [int(72 * 256 / 224)]
    dm.setup("fit")
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        x, _ = next(iter(loader))
        assert x.shape == (4, 3, 72, 72)


def test_image_folder_val_split(tmp_path):
    root = write_tiny_image_folder(tmp_path, 2, per_class=5)
    dm = ImageFolderDataModule(root=root, val_split=0.2, **FAST)
    dm.setup("fit")
    assert len(dm.train_dataset) == 8 and len(dm.val_dataset) == 2 and len(dm.test_dataset) == 10


def test_image_folder_errors(tmp_path):
    missing = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=rf"root directory .*{re.escape(missing)}.* does not exist"):
        ImageFolderDataModule(root=missing)

    (tmp_path / "no_train" / "val" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no 'train/' directory"):
        ImageFolderDataModule(root=str(tmp_path / "no_train"))

    root = write_tiny_image_folder(tmp_path / "no_eval", 2, per_class=1, splits=("train",))
    with pytest.raises(FileNotFoundError, match="neither a 'val/' nor a 'test/'"):
        ImageFolderDataModule(root=root)

    root = write_tiny_image_folder(tmp_path / "empty_class", 2, per_class=1)
    os.makedirs(os.path.join(root, "train", "class_02"))
    with pytest.raises(FileNotFoundError, match=r"empty class folder.*" + re.escape(os.path.join("train", "class_02"))):
        ImageFolderDataModule(root=root)

    root = write_tiny_image_folder(tmp_path / "no_classes", 2, per_class=1)
    shutil.rmtree(os.path.join(root, "val"))
    os.makedirs(os.path.join(root, "val"))
    with pytest.raises(FileNotFoundError, match=r"no class folders in .*val"):
        ImageFolderDataModule(root=root)

    root = write_tiny_image_folder(tmp_path / "mismatch", ["a", "b", "c"], per_class=1)
    shutil.rmtree(os.path.join(root, "val", "b"))
    write_tiny_image_folder(root, ["z"], per_class=1, splits=("val",))
    with pytest.raises(ValueError) as info:
        ImageFolderDataModule(root=root)
    message = str(info.value)
    assert "differ" in message and "missing from val/: ['b']" in message and "not in train/: ['z']" in message


def test_image_folder_train_subset_keeps_the_listed_images_only(tmp_path):
    """``train_subset`` trains on the listed files of train/ (both data paths, the decode cache keyed by them); the
    held-out split stays whole; a bad list is one error naming what is wrong."""
    root = write_tiny_image_folder(tmp_path / "ds", ["ant", "bee"], per_class=4, size=32, ext="jpg")
    listing = tmp_path / "subset.txt"
    listing.write_text("# two of each\nant/0001.jpg\nbee/0003.jpg\n\nant/0000.jpg\nbee/0002.jpg\n")
    for resident in (False, True):
        dm = ImageFolderDataModule(root=root, batch_size=8, num_workers=0, pin_memory=False, tensor_resident=resident,
                                   train_subset=str(listing), decode_cache=str(tmp_path / "cache"))
        dm.setup("fit")
        assert len(dm.train_dataset) == 4 and len(dm.val_dataset) == 8
        assert sorted(dm.train_dataset.targets) == [0, 0, 1, 1]
        x, y = next(iter(dm.train_dataloader()))
        assert x.shape[0] == 4 and sorted(y.tolist()) == [0, 0, 1, 1]
    whole = ImageFolderDataModule(root=root, num_workers=0, tensor_resident=True, decode_cache=str(tmp_path / "cache"))
    whole.setup("fit")
    assert len(whole.train_dataset) == 8  # not the subset's cached pixels

    def error(text: str):
        listing.write_text(text)
        dm = ImageFolderDataModule(root=root, train_subset=str(listing), **FAST)
        dm.setup("fit")

    with pytest.raises(FileNotFoundError, match=r"names 1 image\(s\) not in .*: ant/0009.jpg"):
        error("ant/0000.jpg\nant/0009.jpg\nbee/0000.jpg\n")
    with pytest.raises(ValueError, match=r"lists \['ant/0000.jpg'\] more than once"):
        error("ant/0000.jpg\nant/0000.jpg\nbee/0000.jpg\n")
    with pytest.raises(ValueError, match=r"no image of the class\(es\) \['bee'\]"):
        error("ant/0000.jpg\n")
    with pytest.raises(ValueError, match="lists no image"):
        error("# nothing\n")
    with pytest.raises(FileNotFoundError, match="train_subset file .* does not exist"):
        ImageFolderDataModule(root=root, train_subset=str(tmp_path / "nowhere.txt"))


def test_an_unreadable_image_is_one_error_naming_its_file(tmp_path):
    root = write_tiny_image_folder(tmp_path, 2, per_class=2, ext="jpg")
    bad = os.path.join(root, "train", "class_01", "0001.jpg")
    with open(bad, "rb") as file:
        data = file.read()
    with open(bad, "wb") as file:
        file.write(data[: len(data) // 2])  # a truncated JPEG: PIL's error does not name it
    for resident in (False, True):  # (a worker re-raises the error with its message; torch then takes seconds to stop)
        dm = ImageFolderDataModule(root=root, batch_size=4, num_workers=0, tensor_resident=resident)
        with pytest.raises(OSError, match=f"cannot read the image {re.escape(bad)}: image file is truncated") as info:
            dm.setup("fit")  # the tensor-resident path decodes here
            list(dm.train_dataloader())
        assert info.value.__suppress_context__  # one error, not PIL's traceback and then ours


# --------------------------------------------------------------------------- sampler
def test_epoch_seeded_sampler():
    sampler = EpochSeededRandomSampler(50, seed=3)
    assert len(sampler) == 50
    first = list(sampler)
    assert sorted(first) == list(range(50)) and first != list(range(50))
    assert list(sampler) == first  # iterating again without set_epoch: same order

    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(second) == list(range(50)) and second != first

    fresh = EpochSeededRandomSampler(list(range(50)), seed=3)  # a sized dataset works too
    fresh.set_epoch(1)
    assert list(fresh) == second  # only (seed, epoch) matter: a resumed run sees the same order
    fresh.set_epoch(0)
    assert list(fresh) == first

    other = EpochSeededRandomSampler(50, seed=4)
    assert list(other) != first
    # (seed, epoch) = (0, 1) and (1, 0) are different streams
    a, b = EpochSeededRandomSampler(50, seed=0), EpochSeededRandomSampler(50, seed=1)
    a.set_epoch(1)
    assert list(a) != list(b)
    assert list(EpochSeededRandomSampler(0)) == []
    with pytest.raises(ValueError):
        sampler.set_epoch(-1)


class _RecordOrder(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3 * 32 * 32, 10)
        self.orders: dict[int, list[int]] = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.orders.setdefault(self.current_epoch, []).extend(y.tolist())
        return torch.nn.functional.cross_entropy(self.layer(x.flatten(1)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader` but have no `validation_step`")
def test_trainer_sets_sampler_epoch(tmp_path, monkeypatch):
    """Lightning calls set_epoch each epoch: epoch e sees exactly the (seed, e) permutation."""
    disable_cifar_checksums(monkeypatch)
    root = write_tiny_cifar(tmp_path, 10, train_per_class=3, test_per_class=1)
    dm = CIFAR10DataModule(root=root, download=False, batch_size=8, seed=7, **FAST)
    model = _RecordOrder()
    trainer = pl.Trainer(
        max_epochs=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        default_root_dir=str(tmp_path),
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    targets = dm.train_dataset.targets
    for epoch in range(3):
        sampler = EpochSeededRandomSampler(len(targets), seed=7)
        sampler.set_epoch(epoch)
        assert model.orders[epoch] == [targets[i] for i in sampler]
    assert model.orders[0] != model.orders[1]


def test_dataloader_is_plain_torch_loader(tmp_path):
    root = write_tiny_image_folder(tmp_path, 2, per_class=1)
    dm = ImageFolderDataModule(root=root, **FAST)
    dm.setup()
    assert isinstance(dm.train_dataloader(), DataLoader)


# --------------------------------------------------------------------------- CLI arguments
#: ClassificationDataModule's loader arguments and their defaults, which the subclasses pass on with **kwargs.
LOADER_DEFAULTS = {"batch_size": 64, "num_workers": 4, "pin_memory": True, "persistent_workers": True,
                   "val_split": 0.0, "seed": None, "paired_batches": False, "tensor_resident": False}  # fmt: skip
#: A value other than the default for each loader argument.
LOADER_VALUES = {"batch_size": 7, "num_workers": 0, "pin_memory": False, "persistent_workers": False,
                 "val_split": 0.25, "seed": 5, "paired_batches": True, "tensor_resident": True}  # fmt: skip


@pytest.mark.parametrize(
    "class_path, own, left_out",
    [
        ("CIFAR10DataModule", {"root": "data", "download": True, "tensor_resident": None}, ()),
        ("CIFAR100DataModule", {"root": "data", "download": True, "tensor_resident": None}, ()),
        ("ImageFolderDataModule",
         {"root": None, "image_size": 32, "mean": CIFAR10_MEAN, "std": CIFAR10_STD, "tensor_resident": None,
          "decode_cache": True, "train_subset": None}, ()),
        ("ImageNetDataModule",
         {"root": None, "subset": None, "subset_seed": None, "images_per_class": None, "image_size": 224},
         ("tensor_resident",)),
        ("ImagenetteDataModule", {"root": "data", "size": "320px", "download": True, "image_size": 224},
         ("paired_batches", "tensor_resident")),
    ],
)  # fmt: skip
def test_the_cli_offers_every_loader_argument_of_every_data_module(class_path, own, left_out):
    """The CLI's parser (jsonargparse's subclass mode, as LightningCLI's ``--data``) lists every argument of each data
    module with its default, the loader arguments the subclasses pass on with ``**kwargs`` included, and accepts each
    of them; those a module leaves out (``tensor_resident`` where it has no tensor-resident path, ``paired_batches``
    where its dataset lists no targets) it refuses."""
    from jsonargparse import ArgumentError, ArgumentParser

    def parser() -> ArgumentParser:
        result = ArgumentParser(exit_on_error=False)
        result.add_subclass_arguments(ClassificationDataModule, "data")
        return result

    data = [f"--data=lightning_kd.data.{class_path}", "--data.root=somewhere"]
    init_args = parser().parse_args(data).data.init_args.as_dict()
    loader = {name: value for name, value in LOADER_DEFAULTS.items() if name not in left_out}
    expected = {**loader, **own, "root": "somewhere"}
    assert init_args == expected  # nothing dropped, nothing added, same defaults
    assert own["root"] is None or parser().parse_args(data[:1]).data.init_args.root == own["root"]
    given = {name: LOADER_VALUES[name] for name in loader}
    options = [f"--data.{name}={str(value).lower()}" for name, value in given.items()]
    init_args = parser().parse_args([*data, *options]).data.init_args.as_dict()
    assert {name: init_args[name] for name in given} == given
    for name in left_out:
        with pytest.raises(ArgumentError, match=name):
            parser().parse_args([*data, f"--data.{name}={str(LOADER_VALUES[name]).lower()}"])
