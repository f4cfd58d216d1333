"""Every config builds through the CLI on tiny data and fits (the CIFAR-100 pairs of most methods: one training step
without a Trainer, their configs/folder/ twins fit); the teacher never changes; --print_config works."""
from __future__ import annotations

import copy
import glob
import os
import types
import warnings

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
    if os.sep + "logger" + os.sep not in path and os.sep + "sweeps" + os.sep not in path
)
# Datasets whose method directories hold many teacher/student pairs of one method (RepDistiller's five, ...): their
# configs are built and take one training step; a full CLI fit there is kept for two small reference configs (the
# data module's own path). Every method is fitted end to end by its configs/folder/ config.
PAIR_DATASETS = ("cifar100",)
FITTED_PAIR_CONFIGS = (
    os.path.join("configs", "cifar100", "baseline", "resnet20.yaml"),
    os.path.join("configs", "cifar100", "kd", "resnet56-resnet20.yaml"),
)


def fitted_end_to_end(config_path: str) -> bool:
    """Whether ``config_path`` gets the full CLI fit: every config, except in a method directory of a dataset in
    PAIR_DATASETS (``configs/<dataset>/<method>/*.yaml``), where only FITTED_PAIR_CONFIGS do. The others differ in
    the pair and hyper-parameters, which the cheaper one-step check covers."""
    parts = config_path.split(os.sep)
    return len(parts) != 4 or parts[1] not in PAIR_DATASETS or config_path in FITTED_PAIR_CONFIGS


FIT_CONFIGS = [path for path in CONFIGS if fitted_end_to_end(path)]
STEP_CONFIGS = [path for path in CONFIGS if not fitted_end_to_end(path)]


def test_every_method_is_fitted_end_to_end_by_some_config():
    assert all(path in CONFIGS for path in FITTED_PAIR_CONFIGS)
    assert fitted_end_to_end(os.path.join("configs", "cifar10", "kd", "a.yaml"))
    assert not fitted_end_to_end(os.path.join("configs", "cifar100", "kd", "a.yaml"))
    method = lambda path: yaml.safe_load(open(os.path.join(REPO, path)))["model"]["class_path"]  # noqa: E731
    assert {method(path) for path in CONFIGS} == {method(path) for path in FIT_CONFIGS}  # no method only stepped


@pytest.fixture(scope="module")
def saved_teachers(tmp_path_factory) -> types.SimpleNamespace:
    """The teacher files written so far in this module, ``files[(architecture, classes)] = (path, teacher)``: the
    configs that name the same teacher share one random one instead of each building, warming up and saving its own."""
    return types.SimpleNamespace(directory=tmp_path_factory.mktemp("teachers"), files={})


def teacher_checkpoint(
    config: dict, num_classes: int, directory, monkeypatch, saved: types.SimpleNamespace | None = None
) -> tuple[list[str], torch.nn.Module | None]:
    """A randomly initialised teacher saved as a plain state_dict, and the override that loads it; when the config
    names torchvision weights, saved as those weights where torchvision finds them (nothing is downloaded).
    With ``saved`` (the saved_teachers fixture), a state_dict teacher is written once per architecture and class
    count and then reused (the caller gets its own copy of the network)."""
    init = config["model"]["init_args"]
    if not init.get("teacher"):
        return [], None
    weights = init.get("teacher_weights")
    shared = saved is not None and not weights and isinstance(init["teacher"], str)
    key = (init["teacher"], num_classes) if shared else None
    if key is not None and key in saved.files:
        path, teacher = saved.files[key]
        return [f"--model.init_args.teacher_ckpt={path}"], copy.deepcopy(teacher)
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
    if key is not None:
        path = os.path.join(saved.directory, f"teacher{len(saved.files)}.pth")
        torch.save(teacher.state_dict(), path)
        saved.files[key] = path, copy.deepcopy(teacher)
        return [f"--model.init_args.teacher_ckpt={path}"], teacher
    path = os.path.join(directory, "teacher.pth")
    torch.save(teacher.state_dict(), path)
    return [f"--model.init_args.teacher_ckpt={path}"], teacher


def tiny_data(config: dict, request) -> tuple[int, dict, list[str]]:
    """The config's data module (or the one it wraps) pointed at tiny data: its number of classes, its init args
    (the config's, with the tiny data's) and the CLI overrides."""
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
    overrides = [
        *data_args(root, batch_size=4, download=download, prefix=prefix),
        *[f"--{prefix}.{name}={value}" for name, value in data_init.items()],
    ]
    return num_classes, {**(data.get("init_args") or {}), **data_init}, overrides


def expected_teacher(model, teacher: torch.nn.Module) -> torch.nn.Module:
    """The teacher written to disk as the model should hold it: a teacher of more classes answers for the data's."""
    classes = model.hparams.get("teacher_classes")
    if classes is not None and classifier(teacher)[1].out_features != len(classes):
        teacher = restrict_classifier(teacher, classes)
    return teacher


def fit_and_check(config_path: str, data_overrides: list[str], teacher_args: list[str], teacher, tmp_path) -> None:
    """Fit ``config_path`` through the CLI for two steps and a validation; check the loss, the metrics, the last
    checkpoint and that the teacher is the one written, BatchNorm statistics included."""
    cli = cli_main(
        ["fit", f"--config={os.path.join(REPO, config_path)}", *data_overrides, *trainer_args(tmp_path), *teacher_args]
    )
    assert cli.trainer.global_step == 2
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert "val/acc1" in cli.trainer.callback_metrics
    assert os.path.isfile(tmp_path / "checkpoints" / "last.ckpt")
    if teacher is not None:
        teacher = expected_teacher(cli.model, teacher)
        black_box = isinstance(cli.model.teacher, BlackBoxTeacher)  # not scored: its queries are counted
        assert state_hash(cli.model.teacher.model if black_box else cli.model.teacher) == state_hash(teacher)
        assert black_box or "val/teacher_acc1" in cli.trainer.callback_metrics
        assert "teacher/images" in cli.trainer.callback_metrics  # every method with a teacher reports its cost


@pytest.mark.parametrize("config_path", FIT_CONFIGS)
def test_config_fits_two_steps_and_leaves_the_teacher_untouched(
    config_path, request, monkeypatch, tmp_path, saved_teachers
):
    config = yaml.safe_load(open(os.path.join(REPO, config_path)))
    num_classes, _, data_overrides = tiny_data(config, request)
    teacher_args, teacher = teacher_checkpoint(config, num_classes, tmp_path, monkeypatch, saved_teachers)
    fit_and_check(config_path, data_overrides, teacher_args, teacher, tmp_path)


def first_optimizer(configured):
    """The (first) optimizer of any of the forms ``configure_optimizers`` may return."""
    if isinstance(configured, torch.optim.Optimizer):
        return configured
    if isinstance(configured, dict):
        return first_optimizer(configured["optimizer"])
    if isinstance(configured, (list, tuple)) and configured:
        return first_optimizer(configured[0])
    raise AssertionError(f"configure_optimizers returned no optimizer: {configured!r}")


@pytest.mark.parametrize("config_path", STEP_CONFIGS)
def test_config_builds_and_takes_a_training_step_leaving_the_teacher_untouched(
    config_path, request, monkeypatch, tmp_path, saved_teachers
):
    """The configs not fitted end to end (see fitted_end_to_end): built through the CLI with the teacher file the
    fit writes, set up, and one training step on a random batch, without a Trainer. It catches what a pair can get
    wrong: a layer name its networks lack, paired layers that do not match, a teacher file that does not load,
    a wrong number of classes."""
    config = yaml.safe_load(open(os.path.join(REPO, config_path)))
    num_classes, data_init, data_overrides = tiny_data(config, request)
    teacher_args, teacher = teacher_checkpoint(config, num_classes, tmp_path, monkeypatch, saved_teachers)
    cli = cli_main(
        [f"--config={os.path.join(REPO, config_path)}", *data_overrides, *trainer_args(tmp_path), *teacher_args],
        run=False,
    )
    model = cli.model
    if teacher is not None:
        teacher = expected_teacher(model, teacher)
        network = model.teacher.model if isinstance(model.teacher, BlackBoxTeacher) else model.teacher
        assert state_hash(network) == state_hash(teacher)  # the teacher file loaded, as written
    try:
        model.setup("fit")
    except RuntimeError as error:
        if "not attached to a `Trainer`" not in str(error):
            raise
        # A method whose set-up reads the Trainer (CRD: the training labels of trainer.datamodule): fit it instead.
        return fit_and_check(config_path, data_overrides, teacher_args, teacher, tmp_path)
    model.train()
    optimizer = first_optimizer(model.configure_optimizers())
    size = int(data_init.get("image_size", 32))
    labels = torch.randint(0, num_classes, (4,))
    images = torch.randn(4, 3, size, size)
    if data_init.get("paired_batches"):  # CS-KD: B samples, then a partner of the same class for each
        labels, images = torch.cat([labels, labels]), torch.randn(8, 3, size, size)
    batch = (images, labels)
    fields = getattr(model, "sample_fields", ())  # per-sample fields a method asks the data for: (x, y, fields)
    if fields:
        makers = {"index": lambda: torch.arange(len(labels))}  # positions in the (tiny, >= 8 samples) training set
        unknown = [name for name in fields if name not in makers]
        assert not unknown, f"teach this test to make the per-sample field(s) {unknown} of a random batch"
        batch = (images, labels, {name: makers[name]() for name in fields})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You are trying to `self.log\\(\\)`")  # no Trainer here
        loss = model.training_step(batch, 0)
    if isinstance(loss, dict):
        loss = loss["loss"]
    assert loss.ndim == 0 and torch.isfinite(loss)
    optimizer.zero_grad()
    loss.backward()
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    assert grads and all(torch.isfinite(grad).all() for grad in grads)
    optimizer.step()
    if teacher is not None:
        assert all(p.grad is None for p in network.parameters())
        assert state_hash(network) == state_hash(teacher)


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
