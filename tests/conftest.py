from __future__ import annotations

import hashlib
import os

import pytest
import torch

from tiny_data import disable_cifar_checksums, write_tiny_cifar, write_tiny_image_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
if os.environ.get("PYTEST_XDIST_WORKER"):  # the suite runs in one worker per core (setup.cfg): one thread each
    torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _decoded_image_cache(tmp_path_factory):
    """Decoded splits are cached in a folder of the session, never in the user's ~/.cache (subprocesses inherit it)."""
    os.environ["LIGHTNING_KD_CACHE"] = str(tmp_path_factory.mktemp("lightning_kd_cache"))


@pytest.fixture(autouse=True)
def _cifar_checksums(monkeypatch):
    """The tiny CIFAR files have other checksums than the real release (tests only)."""
    disable_cifar_checksums(monkeypatch)


@pytest.fixture(scope="session")
def tiny_cifar10(tmp_path_factory):
    return write_tiny_cifar(str(tmp_path_factory.mktemp("tiny_c10")), num_classes=10, train_per_class=8, test_per_class=4)


@pytest.fixture(scope="session")
def tiny_cifar100(tmp_path_factory):
    return write_tiny_cifar(str(tmp_path_factory.mktemp("tiny_c100")), num_classes=100, train_per_class=1, test_per_class=1)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    return write_tiny_image_folder(str(tmp_path_factory.mktemp("folder")), classes=4, per_class=16)


@pytest.fixture(scope="session")
def tiny_imagenet(tmp_path_factory):
    """train/ and val/ folders of all 1000 ImageNet classes, named by WordNet id, one 8x8 image each."""
    from lightning_kd.data.imagenet import imagenet_wnids

    root = str(tmp_path_factory.mktemp("imagenet"))
    return write_tiny_image_folder(root, classes=list(imagenet_wnids()), per_class=1, size=8)


@pytest.fixture(scope="session")
def tiny_imagenette(tmp_path_factory):
    """torchvision's Imagenette layout (``imagenette2-320/{train,val}/<wnid>/*.jpeg``), two 8x8 images a class."""
    from lightning_kd.data.imagenet import IMAGENETTE_WNIDS

    root = str(tmp_path_factory.mktemp("imagenette"))
    classes = list(IMAGENETTE_WNIDS)
    write_tiny_image_folder(os.path.join(root, "imagenette2-320"), classes, per_class=2, size=8, ext="jpeg")
    return root


def fake_pretrained_weights(monkeypatch, directory, network: torch.nn.Module, model_name: str, weights_name: str):
    """Make torchvision's ``weights_name`` of ``model_name`` load ``network``'s weights, without any download:
    TORCH_HOME points at ``directory``, whose hub cache holds them under the file name of the weights' URL."""
    import torchvision

    weights = torchvision.models.get_model_weights(model_name)[weights_name]
    cache = os.path.join(directory, "hub", "checkpoints")
    os.makedirs(cache, exist_ok=True)
    torch.save(network.state_dict(), os.path.join(cache, os.path.basename(weights.url)))
    monkeypatch.setenv("TORCH_HOME", str(directory))


def state_hash(module: torch.nn.Module) -> str:
    """Hash of every parameter and buffer (BatchNorm statistics included)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def trainer_args(workdir, steps: int = 2, logger: bool = False) -> list[str]:
    """CLI overrides: one epoch of ``steps`` training steps on the CPU, quietly, inside ``workdir``."""
    return [
        "--trainer.max_epochs=1",
        f"--trainer.limit_train_batches={steps}",
        "--trainer.limit_val_batches=2",  # not "=1": the CLI parses it as the float 1.0, i.e. every batch
        "--trainer.num_sanity_val_steps=0",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        *([] if logger else ["--trainer.logger=false"]),
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={workdir}",
        f"--checkpoint.dirpath={workdir}/checkpoints",
    ]


def data_args(root, batch_size: int = 8, download: bool | None = False, prefix: str = "data") -> list[str]:
    """Point a config's data module (``prefix="data.source"``: the one it wraps) at tiny local data, without workers."""
    args = [f"--{prefix}.root={root}", f"--{prefix}.batch_size={batch_size}", f"--{prefix}.num_workers=0"]
    if download is not None:
        args.append(f"--{prefix}.download={str(download).lower()}")
    return args
