"""The method-author API: stages, per-sample fields, layer shapes at construction, outputs added to a step."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from conftest import state_hash, trainer_args
from lightning_kd.cli import cli_main
from lightning_kd.core import DistillationModule, Stage, Step, evaluation_mode, layer_shapes, split_batch
from lightning_kd.models import get_model


def plain_sgd(params):
    return torch.optim.SGD(params, lr=0.05)


def step_lr(optimizer):
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)


def fast_sgd(params):
    return torch.optim.SGD(params, lr=0.2)


torch.serialization.add_safe_globals([plain_sgd, step_lr, fast_sgd])  # saved in the hyper-parameters by reference


class TwoStages(DistillationModule):
    """A hint-style stage (its own optimizer at a constant rate, no teacher) then CE with the module's schedule."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.head = nn.Linear(10, 10)  # owned: trained in both stages, saved with the module
        self.seen: list[tuple[int, str, bool, type]] = []

    def training_stages(self) -> list[Stage]:
        return [Stage("warm", epochs=1, optimizer=fast_sgd, constant_lr=True, teacher=False), Stage("main")]

    def loss_terms(self, step: Step) -> dict[str, torch.Tensor]:
        optimizer = self.trainer.optimizers[0]
        self.seen.append((self.current_epoch, self.stage.name, step.teacher_logits is not None, type(optimizer)))
        if self.stage.name == "warm":
            return {"hint": self.head(step.student_logits).pow(2).mean()}
        return {"ce": F.cross_entropy(self.head(step.student_logits), step.targets)}


def tiny_loader(samples: int = 16) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(samples, 3, 8, 8, generator=generator), torch.randint(0, 10, (samples,), generator=generator))
    return DataLoader(data, batch_size=8)


def two_stage_module() -> TwoStages:
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(10))
    student(torch.zeros(1, 3, 8, 8))
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(192, 10))
    return TwoStages(
        student=student, teacher=teacher, num_classes=10, optimizer=plain_sgd, lr_scheduler=step_lr
    )


def fit(module: DistillationModule, root, epochs: int, ckpt_path=None) -> pl.Trainer:
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=root,
    )
    with pytest.warns(UserWarning, match="no teacher_ckpt given") if ckpt_path is None else _no_warning():
        trainer.fit(module, tiny_loader(), ckpt_path=ckpt_path)
    return trainer


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_each_stage_trains_with_its_own_optimizer_and_schedule(tmp_path):
    module = two_stage_module()
    trainer = fit(module, tmp_path, epochs=3)
    stages = {epoch: (name, teacher, optimizer) for epoch, name, teacher, optimizer in module.seen}
    assert stages[0] == ("warm", False, torch.optim.SGD) and stages[1][:2] == ("main", True)
    # the main stage's optimizer is a new one: the module's (lr 0.05), its schedule counted from the stage's start
    # (two epoch ends: 0.05 → 0.025 → 0.0125), the warm stage's lr 0.2 never scheduled
    assert trainer.optimizers[0].defaults["lr"] == 0.05
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 2
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0125)


def test_a_run_resumed_in_either_stage_ends_as_the_uninterrupted_one(tmp_path):
    whole = two_stage_module()
    fit(whole, tmp_path / "whole", epochs=3)
    for stop in (1, 2):  # at the stage boundary (saved with the warm stage's optimizer), and inside the main stage
        first = two_stage_module()
        trainer = fit(first, tmp_path / f"first{stop}", epochs=stop)
        path = tmp_path / f"stop{stop}.ckpt"
        trainer.save_checkpoint(path)
        resumed = two_stage_module()
        fit(resumed, tmp_path / f"resumed{stop}", epochs=3, ckpt_path=path)
        assert state_hash(resumed) == state_hash(whole), f"resumed after epoch {stop}"


def test_stages_are_checked():
    module = two_stage_module()
    module.training_stages = lambda: [Stage("a"), Stage("b")]
    with pytest.raises(ValueError, match="stage 'a' needs a length"):
        module.stage
    module._stages = None
    module.training_stages = lambda: [Stage("a", epochs=1), Stage("a")]
    with pytest.raises(ValueError, match="stage names must be unique"):
        module.stage


class IndexedData(Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int):
        return torch.full((3, 8, 8), float(index)), index % 2, {"index": index}


class NeedsIndices(DistillationModule):
    sample_fields = ("index",)
    needs_teacher = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.indices: list[int] = []

    def loss_terms(self, step: Step) -> dict[str, torch.Tensor]:
        self.indices += step.fields["index"].tolist()
        assert torch.equal(step.inputs[:, 0, 0, 0], step.fields["index"].float())  # each index is its sample's
        return {"ce": F.cross_entropy(step.student_logits, step.targets)}


def small_student() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(192, 2))


def test_per_sample_fields_reach_the_method(tmp_path):
    module = NeedsIndices(student=small_student(), num_classes=2, num_samples=8, optimizer=plain_sgd)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(IndexedData(), batch_size=4, shuffle=True))
    assert sorted(module.indices) == list(range(8))


def test_a_method_without_its_fields_stops_with_one_clear_message(tmp_path):
    module = NeedsIndices(student=small_student(), num_classes=2, optimizer=plain_sgd)
    data = TensorDataset(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 0, 1]))
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, limit_val_batches=0, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=r"NeedsIndices needs the per-sample field\(s\) \['index'\]"):
        trainer.fit(module, DataLoader(data, batch_size=4))


def test_split_batch():
    x, y = torch.zeros(2, 3), torch.zeros(2)
    assert split_batch((x, y))[2] == {}
    assert split_batch([x, y, {"index": y}])[2]["index"] is y
    with pytest.raises(ValueError, match="A batch must be"):
        split_batch((x,))


def test_layer_shapes_at_construction_leave_the_network_as_it_was():
    network = get_model("resnet8", 10)
    before = state_hash(network)
    shapes = layer_shapes(network, ["conv1", "layer2", "layer3", "fc"], image_size=32)
    assert shapes == {"conv1": (16, 32, 32), "layer2": (32, 16, 16), "layer3": (64, 8, 8), "fc": (10,)}
    assert state_hash(network) == before and network.training
    assert layer_shapes(network, ["layer3"], image_size=64) == {"layer3": (64, 16, 16)}
    with pytest.raises(ValueError, match="Unknown student layer 'layer9'"):
        layer_shapes(network, ["layer9"], owner="student")


def test_layer_shapes_name_a_layer_that_never_runs():
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.unused = nn.Conv2d(3, 4, 3), nn.ReLU()

        def forward(self, x):
            return self.conv(x)

    network = Unused()
    with pytest.raises(ValueError, match="layer 'unused' of Unused does not run in its forward pass"):
        layer_shapes(network, ["unused"])


def test_evaluation_mode_restores_each_mode_even_after_an_error():
    first, second = nn.BatchNorm1d(2).train(), nn.BatchNorm1d(2).eval()
    with pytest.raises(RuntimeError):
        with evaluation_mode(first, second, None):
            assert not first.training and not torch.is_grad_enabled()
            raise RuntimeError
    assert first.training and not second.training and torch.is_grad_enabled()


def test_a_method_adds_outputs_to_the_step_and_keeps_the_teacher_logits():
    class WithExtra(DistillationModule):
        def forward_step(self, x, y, fields=None):
            step = super().forward_step(x, y, fields)
            step.outputs["double"] = 2 * step.student_logits
            return step

    module = WithExtra(student="resnet8", teacher="resnet8", num_classes=10)
    step = module.forward_step(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]), {"index": torch.tensor([3, 4])})
    assert step.teacher_logits is not None and torch.equal(step.outputs["double"], 2 * step.student_logits)
    assert step.fields["index"].tolist() == [3, 4]
    assert step.float().outputs["double"].dtype == torch.float32


class CountsSamples(DistillationModule):
    """A method keeping one number per training sample, indexed by the batches' ``index`` field."""

    sample_fields = ("index",)
    needs_teacher = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.register_buffer("visits", torch.zeros(self.num_samples, dtype=torch.long))

    def loss_terms(self, step: Step) -> dict[str, torch.Tensor]:
        self.visits.index_add_(0, step.fields["index"], torch.ones_like(step.fields["index"]))
        return {"ce": F.cross_entropy(step.student_logits, step.targets)}


def test_the_cli_links_the_training_set_size_and_every_sample_is_visited_once_per_epoch(tiny_folder, tmp_path):
    args = [
        "--model=test_method_api.CountsSamples", "--model.student=resnet8", "--data=lightning_kd.data.ImageFolderDataModule",
        f"--data.root={tiny_folder}", "--data.batch_size=4", "--data.num_workers=0", "--data.image_size=32",
        "--data.val_split=0.25", *trainer_args(tmp_path, steps=1000),
    ]
    cli = cli_main(["fit", *args])
    train_size = len(cli.datamodule.train_dataset)
    assert cli.model.num_samples == train_size == cli.model.hparams.num_samples
    assert cli.model.visits.tolist() == [1] * train_size
    with pytest.raises(ValueError, match=f"the checkpoint was trained on {train_size} samples, this run's data has"):
        cli_main(["test", *args[:-len(trainer_args(tmp_path, steps=1000))], "--data.val_split=0.5",
                  "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}",
                  f"--ckpt_path={tmp_path}/checkpoints/last.ckpt"])


def test_a_layer_name_ending_in_input_reads_what_the_module_receives():
    network = get_model("resnet8", 10)
    assert layer_shapes(network, ["fc:input"]) == {"fc:input": (64,)}
    with pytest.raises(ValueError, match="Unknown model layer 'fcc:input'"):
        layer_shapes(network, ["fcc:input"])
