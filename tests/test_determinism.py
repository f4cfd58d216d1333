"""A run means one thing (issue 17, items 5 and 6): every training sample's augmentation is a pure function of
``(seed, epoch, sample index)``, so the data path (``tensor_resident``), the free memory that picks it, the number
of workers and the number of DDP ranks do not change what a run draws, while ``seed_everything`` does."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.apply_func import move_data_to_device
from lightning_fabric.utilities.data import _replace_dunder_methods
from pytorch_lightning.trainer.connectors.data_connector import _get_distributed_sampler
from pytorch_lightning.trainer.states import RunningStage
from pytorch_lightning.utilities.data import _update_dataloader
from torch.utils.data import BatchSampler, DataLoader
from torchvision.transforms import v2

import lightning_kd.data.base
from lightning_kd.data import CIFAR10DataModule, ImageFolderDataModule, ImageNetDataModule, QueryPoolDataModule
from lightning_kd.data.augment import SampleRandom, resized_crop_box
from lightning_kd.data.tensor_resident import TensorImageDataset
from tiny_data import write_tiny_image_folder


def test_the_generator_is_splitmix64():
    """The numbers are SplitMix64's (Vigna's splitmix64.c, seed 0), exact integers."""
    random = SampleRandom(0, 0, 0)
    random.key = 0
    assert [random.bits64() for _ in range(3)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    keys = {SampleRandom(seed, epoch, index).key for seed in (0, 1) for epoch in (0, 1) for index in (0, 1)}
    assert len(keys) == 8  # (0, 1, 0) and (1, 0, 0) are different streams, and so on


class Recorder(pl.LightningModule):
    """Records every training batch as the model receives it."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.batches = []

    def training_step(self, batch, batch_idx):
        self.batches.append([tensor.clone() for tensor in batch])
        return self.weight * 0.0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def trained_batches(data: pl.LightningDataModule, tmp_path) -> list[list[torch.Tensor]]:
    """The finished training batches of two epochs (three batches each) of a fit."""
    module = Recorder()
    trainer = pl.Trainer(
        max_epochs=2, limit_train_batches=3, limit_val_batches=0, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    return module.batches


@pytest.fixture
def non_square_folder(tmp_path):
    """A folder of 40x32 images, which the small-image path resizes and center-crops before the random crop."""
    root = write_tiny_image_folder(tmp_path / "non_square", classes=3, per_class=8, size=32)
    from PIL import Image

    for path in (tmp_path / "non_square").rglob("*.png"):
        Image.open(path).resize((40, 32)).save(path)
    return root


@pytest.mark.parametrize("dataset", ["cifar", "non_square_folder"])
def test_the_same_config_gives_the_same_batches_whatever_the_path_and_the_free_memory(
    dataset, tiny_cifar10, non_square_folder, tmp_path, monkeypatch
):
    def data(**options):
        if dataset == "cifar":
            return CIFAR10DataModule(tiny_cifar10, download=False, batch_size=8, seed=3, **options)
        return ImageFolderDataModule(non_square_folder, batch_size=8, seed=3, **options)

    reference = trained_batches(data(tensor_resident=False, num_workers=0), tmp_path)
    variants = {"tensor-resident": dict(tensor_resident=True, num_workers=0),
                "per-sample, two workers": dict(tensor_resident=False, num_workers=2)}  # fmt: skip
    for free, resident in ((0, False), (1 << 50, True)):  # tensor_resident=None picks the path from the free memory
        monkeypatch.setattr(lightning_kd.data.base, "_free_memory_bytes", lambda: free)
        module = data(tensor_resident=None, num_workers=0)
        module.setup("fit")
        assert isinstance(module.train_dataset.dataset, TensorImageDataset) == resident
        variants[f"tensor_resident=None, {free} bytes free"] = module
    for name, variant in variants.items():
        batches = trained_batches(variant if isinstance(variant, pl.LightningDataModule) else data(**variant), tmp_path)
        assert len(batches) == len(reference) == 6
        for step, (ours, theirs) in enumerate(zip(batches, reference)):
            assert all(torch.equal(a, b) for a, b in zip(ours, theirs)), f"{name}: batch {step} differs"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_device_finishes_the_batches_of_the_per_sample_path(tiny_cifar10):
    """Crop, flip, scaling and normalisation on the device give the per-sample path's floats, bit for bit."""
    resident, per_sample = (CIFAR10DataModule(tiny_cifar10, download=False, batch_size=8, num_workers=0, seed=3,
                                              tensor_resident=on) for on in (True, False))  # fmt: skip
    resident.setup("fit")
    per_sample.setup("fit")
    loader = resident.train_dataloader()
    loader.batch_sampler.sampler.set_epoch(1)
    for indices, batch in zip(list(loader.batch_sampler), loader):
        batch = move_data_to_device(resident.on_before_batch_transfer(batch, 0), "cuda")
        images, _ = resident.transform_batch(batch, augment=True)
        assert images.is_cuda
        assert torch.equal(images.cpu(), torch.stack([per_sample.train_dataset[(1, i)][0] for i in indices]))


def first_batch(seed=None, tiny_cifar10=None) -> torch.Tensor:
    data = CIFAR10DataModule(tiny_cifar10, download=False, batch_size=8, num_workers=0, seed=seed)
    data.setup("fit")
    return data.transform_batch(next(iter(data.train_dataloader())), augment=True)[0]


def test_seed_everything_sets_the_shuffle_and_the_augmentation(tiny_cifar10, monkeypatch):
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    assert CIFAR10DataModule(download=False).seed == 0
    pl.seed_everything(1)
    one = first_batch(tiny_cifar10=tiny_cifar10)
    assert torch.equal(first_batch(tiny_cifar10=tiny_cifar10), one)
    assert torch.equal(first_batch(seed=1, tiny_cifar10=tiny_cifar10), one)
    pl.seed_everything(2)
    assert not torch.equal(first_batch(tiny_cifar10=tiny_cifar10), one)
    assert torch.equal(first_batch(seed=1, tiny_cifar10=tiny_cifar10), one)  # an explicit data seed wins


def rank_loader(data: pl.LightningDataModule, rank: int, epoch: int):
    """The training loader of ``rank`` (of 2) as Lightning's DDP makes it (a distributed sampler injected into a
    re-instantiated loader), without a process group, set to ``epoch``."""
    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):  # as Lightning asks
        loader = data.train_dataloader()
    sampler = _get_distributed_sampler(loader, shuffle=True, overfit_batches=0, num_replicas=2, rank=rank)
    loader = _update_dataloader(loader, sampler, mode=RunningStage.TRAINING)
    loader.batch_sampler.sampler.set_epoch(epoch)
    return loader


@pytest.mark.parametrize("paired", [False, True], ids=["plain", "paired"])
@pytest.mark.parametrize("resident", [True, False], ids=["tensor-resident", "per-sample"])
def test_two_ranks_draw_independent_augmentations_keyed_by_the_sample(tiny_cifar10, resident, paired):
    data = CIFAR10DataModule(tiny_cifar10, download=False, batch_size=4, num_workers=0, seed=3,
                             tensor_resident=resident, paired_batches=paired)  # fmt: skip
    data.setup("fit")
    single = CIFAR10DataModule(tiny_cifar10, download=False, num_workers=0, seed=3, tensor_resident=False)
    single.setup("fit")
    seen, first_images = [], []
    for rank in range(2):
        loader = rank_loader(data, rank, epoch=1)
        indices = list(loader.batch_sampler)
        assert len(indices) == len(loader)
        for batch_indices, batch in zip(indices, loader):
            images, _ = data.transform_batch(data.on_before_batch_transfer(batch, 0), augment=True)
            # what a sample draws does not depend on the rank that serves it: the single-process per-sample item
            assert torch.equal(images, torch.stack([single.train_dataset[(1, index)][0] for index in batch_indices]))
        seen.append({index for batch in indices for index in batch[: len(batch) // 2 if paired else None]})
        first_images.append(data.transform_batch(next(iter(loader)), augment=True)[0])
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(len(data.train_dataset)))
    assert not torch.equal(first_images[0], first_images[1])


def test_the_resized_crop_draws_like_torchvisions():
    """The keyed port of ``RandomResizedCrop.get_params`` has torchvision's distribution and fallback."""
    height, width, draws = 48, 64, 4000
    ours = torch.tensor([resized_crop_box(SampleRandom(0, 0, index), height, width) for index in range(draws)])
    transform = v2.RandomResizedCrop(32)
    image = torch.zeros(3, height, width)
    torch.manual_seed(0)
    theirs = []
    for _ in range(draws):
        box = transform.make_params([image])
        theirs.append([box["top"], box["left"], box["height"], box["width"]])
    theirs = torch.tensor(theirs)

    def binned(boxes):
        area = (boxes[:, 2] * boxes[:, 3]).double() / (height * width)
        aspect = (boxes[:, 3] / boxes[:, 2]).double().log()
        centre = (boxes[:, 1] + boxes[:, 3] / 2).double() / width
        return [torch.histc(value, bins=8, min=float(low), max=float(high))
                for value, low, high in ((area, 0, 1), (aspect, -0.35, 0.35), (centre, 0, 1))]  # fmt: skip

    for a, b in zip(binned(ours), binned(theirs)):
        statistic = float(((a - b) ** 2 / (a + b).clamp_min(1)).sum())
        p = float(torch.special.gammaincc(torch.tensor(3.5, dtype=torch.float64), torch.tensor(statistic / 2)))
        assert p > 1e-3
    # a 10x200 image admits no crop of the scale range: the central fallback of torchvision
    fallback = v2.RandomResizedCrop(32).make_params([torch.zeros(3, 10, 200)])
    expected = (fallback["top"], fallback["left"], fallback["height"], fallback["width"])
    assert resized_crop_box(SampleRandom(0, 0, 0), 10, 200) == expected


def test_a_samples_augmentation_is_a_function_of_its_key(tiny_imagenet, tiny_cifar10):
    """Small images (crop and flip), large ones (resized crop and flip), Active Mixup's mixes (crop and flip)."""
    cifar = CIFAR10DataModule(tiny_cifar10, download=False, num_workers=0, seed=3, tensor_resident=False)
    cifar.setup("fit")
    imagenet = ImageNetDataModule(tiny_imagenet, subset=2, image_size=8, num_workers=0, seed=3)
    imagenet.setup("fit")
    pool = QueryPoolDataModule(CIFAR10DataModule(tiny_cifar10, download=False, num_workers=0), pool_size=4, seed=3)
    pool.setup("fit")
    pool.add(torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([0.5, 0.5]), torch.eye(10)[:2])
    pool.train_dataloader()
    for dataset in (cifar.train_dataset, imagenet.train_dataset, pool.train_dataset):
        first, again, later = ([dataset[(epoch, index)][0] for index in range(2)] for epoch in (1, 1, 2))
        assert all(torch.equal(a, b) for a, b in zip(first, again))
        assert not all(torch.equal(a, b) for a, b in zip(first, later))
