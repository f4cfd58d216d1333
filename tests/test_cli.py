"""Every config fits through the CLI on tiny data; the teacher never changes; --print_config works."""
from __future__ import annotations

import glob
import os

import pytest
import torch
import torchvision
import yaml

from conftest import REPO, data_args, fake_pretrained_weights, state_hash, trainer_args
from lightning_kd.cli import cli_main
from lightning_kd.core import BlackBoxTeacher, classifier, restrict_classifier
from lightning_kd.models import get_model

CONFIGS = sorted(
    os.path.relpath(path, REPO)
    for path in glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True)
    if os.sep + "logger" + os.sep not in path
)


def teacher_checkpoint(
    config: dict, num_classes: int, directory, monkeypatch
) -> tuple[list[str], torch.nn.Module | None]:
    """A randomly initialised teacher saved as a plain state_dict, and the override that loads it; when the config
    names torchvision weights, saved as those weights where torchvision finds them (nothing is downloaded)."""
    init = config["model"]["init_args"]
    if not init.get("teacher"):
        return [], None
    weights = init.get("teacher_weights")
    if weights:
        num_classes = len(torchvision.models.get_model_weights(init["teacher"])[weights].meta["categories"])
    teacher = get_model(init["teacher"], num_classes)
    # BatchNorm statistics from one batch of noise, as a trained teacher has its own: with the initial
    # ones (mean 0, variance 1) a deep random network's activations explode in eval mode.
    for module in teacher.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
    with torch.no_grad():
        teacher.train()(torch.randn(16, 3, 32, 32))
    if weights:
        fake_pretrained_weights(monkeypatch, directory, teacher, init["teacher"], weights)
        return [], teacher
    path = os.path.join(directory, "teacher.pth")
    torch.save(teacher.state_dict(), path)
    return [f"--model.init_args.teacher_ckpt={path}"], teacher


@pytest.mark.parametrize("config_path", CONFIGS)
def test_config_fits_two_steps_and_leaves_the_teacher_untouched(config_path, request, monkeypatch, tmp_path):
    config = yaml.safe_load(open(os.path.join(REPO, config_path)))
    data, prefix = config["data"], "data"
    if "source" in data.get("init_args", {}):  # a data module built on another (QueryPoolDataModule): feed that one
        data, prefix = data["init_args"]["source"], "data.source"
    data_class = data["class_path"].rsplit(".", 1)[-1]
    # data class -> fixture writing its tiny data, its number of classes, data.download, other data init args
    fixture, num_classes, download, data_init = {
        "CIFAR100DataModule": ("tiny_cifar100", 100, False, {}),
        "CIFAR10DataModule": ("tiny_cifar10", 10, False, {}),
        "ImageFolderDataModule": ("tiny_folder", 4, None, {}),
        "ImageNetDataModule": ("tiny_imagenet", 1000, None, {"image_size": 32}),
        "ImagenetteDataModule": ("tiny_imagenette", 10, False, {"image_size": 32}),
    }[data_class]
    root = request.getfixturevalue(fixture)
    teacher_args, teacher = teacher_checkpoint(config, num_classes, tmp_path, monkeypatch)
    cli = cli_main(
        ["fit", f"--config={os.path.join(REPO, config_path)}", *data_args(root, batch_size=4, download=download, prefix=prefix),
         *[f"--{prefix}.{name}={value}" for name, value in data_init.items()], *trainer_args(tmp_path), *teacher_args]
    )
    assert cli.trainer.global_step == 2
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert "val/acc1" in cli.trainer.callback_metrics
    assert os.path.isfile(tmp_path / "checkpoints" / "last.ckpt")
    if teacher is not None:
        classes = cli.model.hparams.get("teacher_classes")  # a teacher of more classes answers for the data's
        if classes is not None and classifier(teacher)[1].out_features != len(classes):
            teacher = restrict_classifier(teacher, classes)
        black_box = isinstance(cli.model.teacher, BlackBoxTeacher)  # not scored: its queries are counted
        assert state_hash(cli.model.teacher.model if black_box else cli.model.teacher) == state_hash(teacher)
        assert black_box or "val/teacher_acc1" in cli.trainer.callback_metrics
        assert "teacher/images" in cli.trainer.callback_metrics  # every method with a teacher reports its cost


def test_print_config_shows_the_resolved_method(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", f"--config={REPO}/configs/cifar100/kd/resnet56-resnet20.yaml", "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == "lightning_kd.methods.KD"
    assert printed["model"]["init_args"]["temperature"] == 4.0
    assert printed["checkpoint"]["monitor"] == "val/acc1"


def test_missing_teacher_checkpoint_is_one_clear_error(tiny_cifar10, tmp_path):
    with pytest.raises(FileNotFoundError, match="Teacher checkpoint not found: 'nowhere/teacher.pth'"):
        cli_main(
            ["fit", f"--config={REPO}/configs/cifar10/kd/resnet56-resnet20.yaml", *data_args(tiny_cifar10),
             *trainer_args(tmp_path), "--model.init_args.teacher_ckpt=nowhere/teacher.pth"]
        )
    assert not os.path.exists(tmp_path / "checkpoints")
