"""Every config fits through the CLI on tiny data; the teacher never changes; --print_config works."""
import glob
import os

import pytest
import torch
import yaml

from conftest import REPO, data_args, state_hash, trainer_args
from lightning_kd.cli import cli_main
from lightning_kd.models import get_model

CONFIGS = sorted(
    os.path.relpath(path, REPO)
    for path in glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True)
    if os.sep + "logger" + os.sep not in path
)


def teacher_checkpoint(config: dict, num_classes: int, directory) -> tuple[list[str], str | None]:
    """A randomly initialised teacher saved as a plain state_dict, and the override that loads it."""
    init = config["model"]["init_args"]
    if not init.get("teacher"):
        return [], None
    teacher = get_model(init["teacher"], num_classes)
    path = os.path.join(directory, "teacher.pth")
    torch.save(teacher.state_dict(), path)
    return [f"--model.init_args.teacher_ckpt={path}"], state_hash(teacher)


@pytest.mark.parametrize("config_path", CONFIGS)
def test_config_fits_two_steps_and_leaves_the_teacher_untouched(config_path, tiny_cifar10, tiny_cifar100, tiny_folder, tmp_path):
    config = yaml.safe_load(open(os.path.join(REPO, config_path)))
    data_class = config["data"]["class_path"].rsplit(".", 1)[-1]
    root, num_classes, download = {
        "CIFAR100DataModule": (tiny_cifar100, 100, False),
        "CIFAR10DataModule": (tiny_cifar10, 10, False),
        "ImageFolderDataModule": (tiny_folder, 4, None),
    }[data_class]
    teacher_args, teacher_hash = teacher_checkpoint(config, num_classes, tmp_path)
    cli = cli_main(
        ["fit", f"--config={os.path.join(REPO, config_path)}", *data_args(root, batch_size=4, download=download),
         *trainer_args(tmp_path), *teacher_args]
    )
    assert cli.trainer.global_step == 2
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert "val/acc1" in cli.trainer.callback_metrics
    assert os.path.isfile(tmp_path / "checkpoints" / "last.ckpt")
    if teacher_hash is not None:
        assert state_hash(cli.model.teacher) == teacher_hash
        assert "val/teacher_acc1" in cli.trainer.callback_metrics


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
