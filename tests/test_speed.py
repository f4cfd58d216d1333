"""The tensor-resident data path (same augmentation as torchvision's, same evaluation batches, samplers kept)
and the speed switches of DistillationModule (channels_last, bf16-mixed, torch.compile: same results)."""
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from tiny_data import disable_cifar_checksums

from lightning_kd.data import CIFAR10DataModule, ClassPairBatchSampler, EpochSeededRandomSampler, ImageFolderDataModule
from lightning_kd.data.tensor_resident import TensorImageDataset
from lightning_kd.methods import AT

DRAWS = 3000
PADDING = 4


def all_crops(image: torch.Tensor, normalize) -> torch.Tensor:
    """(9·9·2, C·H·W): every crop offset (top, left) of the padded image, unflipped and flipped, normalised."""
    padded = TF.pad(image, [PADDING])
    size = image.shape[-1]
    crops = [
        TF.horizontal_flip(crop) if flip else crop
        for top in range(2 * PADDING + 1)
        for left in range(2 * PADDING + 1)
        for crop in [TF.crop(padded, top, left, size, size)]
        for flip in (False, True)
    ]
    return normalize(torch.stack(crops)).flatten(1)


def cell_counts(outputs: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """How often each candidate crop occurs among ``outputs``; every output must be one of them."""
    nearest = torch.cdist(outputs.flatten(1), candidates).min(dim=1)
    # distinct crops of a noise image lie tens apart; the matrix-product distance is exact to ~0.1
    assert float(nearest.values.max()) < 1.0, "an augmented image is no crop of the padded image"
    return torch.bincount(nearest.indices, minlength=len(candidates))


def chi_square_p(statistic: float, dof: int) -> float:
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(statistic / 2)))


def test_batched_crop_and_flip_draw_like_torchvision():
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    data = CIFAR10DataModule(download=False)
    batched = data.batch_transform()
    candidates = all_crops(image, lambda batch: batched(batch, augment=False))

    ours = cell_counts(batched(image.expand(DRAWS, -1, -1, -1).contiguous(), augment=True), candidates)
    per_sample = data.train_transform()
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    theirs = cell_counts(torch.stack([per_sample(pil) for _ in range(DRAWS)]), candidates)

    cells = len(candidates)
    assert bool((ours > 0).all()) and bool((theirs > 0).all())  # every offset in [0, 8]² and both flips occur
    expected = DRAWS / cells
    uniform = float(((ours - expected) ** 2 / expected).sum())
    same = float(((ours - theirs) ** 2 / (ours + theirs)).sum())  # two equal-sized samples, one distribution
    assert chi_square_p(uniform, cells - 1) > 1e-3
    assert chi_square_p(same, cells - 1) > 1e-3
    flip_rate = float(ours.view(-1, 2)[:, 1].sum()) / DRAWS
    assert abs(flip_rate - 0.5) < 4 * (0.25 / DRAWS) ** 0.5


def test_a_crop_range_one_too_narrow_is_caught():
    """The statistics above notice an offset range of [0, 7] instead of [0, 8]."""
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    batched = CIFAR10DataModule(download=False).batch_transform()
    candidates = all_crops(image, lambda batch: batched(batch, augment=False))
    narrow = torch.stack([
        TF.crop(TF.pad(image, [PADDING]), int(top), int(left), 32, 32)
        for top, left in torch.randint(0, 2 * PADDING, (DRAWS // 10, 2))
    ])
    counts = cell_counts(batched(narrow, augment=False), candidates)
    assert not bool((counts > 0).all())


def test_tensor_resident_splits_keep_order_pairs_and_evaluation_batches(tiny_cifar10, tiny_folder):
    for make in (
        lambda **kw: CIFAR10DataModule(root=tiny_cifar10, download=False, **kw),
        lambda **kw: ImageFolderDataModule(root=tiny_folder, **kw),
    ):
        fast, per_sample = make(batch_size=8, num_workers=0, tensor_resident=True), make(
            batch_size=8, num_workers=0, tensor_resident=False
        )
        fast.setup("fit")
        per_sample.setup("fit")
        assert isinstance(fast.train_dataset.dataset, TensorImageDataset)
        loader = fast.train_dataloader()
        assert isinstance(loader.sampler, EpochSeededRandomSampler)
        # the same epoch-seeded order: the same labels batch by batch
        assert [y.tolist() for _, y in loader] == [y.tolist() for _, y in per_sample.train_dataloader()]
        # evaluation: normalised on the device, exactly the per-sample evaluation transform
        for (x, y), (expected, expected_y) in zip(fast.val_dataloader(), per_sample.val_dataloader()):
            assert x.dtype == torch.uint8
            assert torch.equal(fast.transform_batch((x, y), augment=False)[0], expected)
            assert torch.equal(y, expected_y)
        x, _ = fast.transform_batch(next(iter(loader)), augment=True)
        assert x.dtype == torch.float32 and x.shape == (8, 3, 32, 32)

    paired = CIFAR10DataModule(root=tiny_cifar10, download=False, batch_size=4, num_workers=0, paired_batches=True)
    paired.setup("fit")
    assert isinstance(paired.train_dataloader().batch_sampler, ClassPairBatchSampler)
    for _, y in paired.train_dataloader():
        assert torch.equal(y[: len(y) // 2], y[len(y) // 2 :])


def test_tensor_resident_default_and_limits(tiny_cifar10, tiny_folder):
    cifar = CIFAR10DataModule(root=tiny_cifar10, download=False, num_workers=0)
    cifar.setup("fit")
    assert isinstance(cifar.train_dataset.dataset, TensorImageDataset)  # default: on where it fits
    large = ImageFolderDataModule(root=tiny_folder, image_size=96, num_workers=0)
    large.setup("fit")
    assert not isinstance(large.train_dataset.dataset, TensorImageDataset)  # only small images
    with pytest.raises(ValueError, match="no tensor-resident path"):
        ImageFolderDataModule(root=tiny_folder, image_size=96, num_workers=0, tensor_resident=True).setup("fit")


class StepLosses(pl.Callback):
    """The training loss of every step, and the first training batch as the model received it."""

    def __init__(self):
        self.losses, self.first_batch = [], None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if self.first_batch is None:
            self.first_batch = batch[0].clone()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def fit_at_plus_kd(root, tmp_path, precision="32-true", **switches):
    """One step of AT+KD (features from hooks, KD term) on tensor-resident CIFAR: its loss, the student after it."""
    pl.seed_everything(0)
    module = AT(student="resnet8", teacher="resnet8", num_classes=10, ce_weight=0.1, kd_weight=0.9, **switches)
    data = CIFAR10DataModule(root=root, download=False, batch_size=16, num_workers=0)
    losses = StepLosses()
    trainer = pl.Trainer(
        max_steps=1, accelerator="cpu", devices=1, precision=precision, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[losses],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=data)
    return module, losses


@pytest.fixture(scope="module")
def reference_fit(tiny_cifar10, tmp_path_factory):
    with pytest.MonkeyPatch.context() as monkeypatch:  # set up before the function-scoped autouse fixture
        disable_cifar_checksums(monkeypatch)
        return fit_at_plus_kd(tiny_cifar10, tmp_path_factory.mktemp("reference"))


@pytest.mark.parametrize(
    "switches, loss_tolerance, weight_tolerance",
    [
        ({"channels_last": True}, 1e-5, 1e-3),  # other convolution kernels: other rounding
        # aot_eager: dynamo's capture (hooks, no_grad teacher) and AOT autograd, without inductor's minutes-long
        # C++ compilation on a CPU
        ({"compile": {"backend": "aot_eager"}}, 1e-5, 1e-5),
        ({"precision": "bf16-mixed"}, 2e-3, 2e-2),
    ],
    ids=["channels_last", "compile", "bf16-mixed"],
)
def test_speed_switches_give_the_same_training(reference_fit, tiny_cifar10, tmp_path, switches, loss_tolerance,
                                               weight_tolerance):
    reference, reference_losses = reference_fit
    module, losses = fit_at_plus_kd(tiny_cifar10, tmp_path, **switches)
    assert torch.equal(losses.first_batch, reference_losses.first_batch)  # the same augmented batch
    torch.testing.assert_close(losses.losses, reference_losses.losses, rtol=loss_tolerance, atol=loss_tolerance)
    for (name, weight), expected in zip(module.student.state_dict().items(), reference.student.state_dict().values()):
        torch.testing.assert_close(weight.float(), expected.float(), rtol=0, atol=weight_tolerance, msg=name)
    if switches.get("channels_last"):
        assert module.student.conv1.weight.is_contiguous(memory_format=torch.channels_last)
