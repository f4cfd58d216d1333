"""No silent wrong result between fit and export (issue 17): last is the last state, runs never mix, resume
keeps its settings or says why not, the teacher a student learned from is recorded, nothing non-finite is saved,
files appear whole."""
from __future__ import annotations

import errno
import os
import shutil

import pytest
import torch
from torch import nn

from conftest import data_args, trainer_args
from lightning_kd.cli import cli_main
from lightning_kd.core import NonFiniteLossError, TeacherSource, file_sha256
from lightning_kd.export import export_student
from lightning_kd.methods import KD


class NoBatchNorm(nn.Module):
    """A student without BatchNorm: with lr 0 its validation accuracy never changes after the first epoch."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(3 * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(x).flatten(1))


def fit(root, workdir, *extra, method: str = "Baseline", epochs: int = 1, steps: int = 2):
    return cli_main(
        ["fit", f"--model=lightning_kd.methods.{method}", "--model.student=resnet8",
         "--data=lightning_kd.data.ImageFolderDataModule", "--data.image_size=32", *data_args(root, download=None),
         *trainer_args(workdir, steps), f"--trainer.max_epochs={epochs}", *extra]
    )


def checkpoint_of(workdir, name="last.ckpt") -> dict:
    return torch.load(os.path.join(workdir, "checkpoints", name), map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def teacher_run(tiny_folder, tmp_path_factory):
    """A Baseline resnet8 teacher trained for one epoch; its last.ckpt is the KD teacher."""
    workdir = tmp_path_factory.mktemp("teacher")
    fit(tiny_folder, workdir)
    return workdir


def kd(root, workdir, teacher_ckpt, *extra, epochs=1):
    return fit(root, workdir, "--model.teacher=resnet8", f"--model.teacher_ckpt={teacher_ckpt}", *extra,
               method="KD", epochs=epochs)


def test_last_checkpoint_is_the_last_epoch_even_when_the_metric_stops_improving(tiny_folder, tmp_path):
    settings = ['--model.student={"class_path": "test_trust.NoBatchNorm"}', "--model.optimizer=torch.optim.SGD",
                "--model.optimizer.lr=0"]
    fit(tiny_folder, tmp_path, *settings, epochs=3)
    last = checkpoint_of(tmp_path)
    assert (last["epoch"], last["global_step"]) == (2, 6)  # Lightning alone leaves it at epoch 0
    listed = sorted(os.listdir(tmp_path / "checkpoints"))
    assert listed == ["best-epoch000.ckpt", "fit_summary.json", "last.ckpt", "per_class_val.json"]
    # A student given as a module is not in the checkpoint's hyper-parameters: built as configured, it resumes.
    resumed = fit(tiny_folder, tmp_path, *settings, f"--ckpt_path={tmp_path}/checkpoints/last.ckpt", epochs=4)
    assert resumed.trainer.global_step == 8 and checkpoint_of(tmp_path)["epoch"] == 3


def test_a_new_run_never_mixes_with_an_old_one_in_its_directory(tiny_folder, tmp_path):
    fit(tiny_folder, tmp_path)
    first = file_sha256(tmp_path / "checkpoints" / "last.ckpt")
    with pytest.raises(RuntimeError, match=r"already holds another run's checkpoints .*--ckpt_path .*last.ckpt.*"
                                           r"--checkpoint.overwrite true"):
        fit(tiny_folder, tmp_path, "--seed_everything=1")
    assert file_sha256(tmp_path / "checkpoints" / "last.ckpt") == first  # untouched by the refused run
    fit(tiny_folder, tmp_path, "--seed_everything=1", "--checkpoint.overwrite=true")
    listed = sorted(os.listdir(tmp_path / "checkpoints"))
    assert listed == ["best-epoch000.ckpt", "fit_summary.json", "last.ckpt", "per_class_val.json"]  # never last-v1
    assert file_sha256(tmp_path / "checkpoints" / "last.ckpt") != first


def test_a_checkpoint_directory_that_cannot_be_written_stops_the_fit_before_training(tiny_folder, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match=r"Checkpoint directory .*a_file/checkpoints' is not writable"):
        fit(tiny_folder, tmp_path, f"--checkpoint.dirpath={blocker}/checkpoints")


def test_a_failed_write_leaves_the_previous_checkpoint_whole(tiny_folder, tmp_path, monkeypatch):
    fit(tiny_folder, tmp_path)
    before = file_sha256(tmp_path / "checkpoints" / "last.ckpt")
    real_save = torch.save

    def disk_full(obj, path, *args, **kwargs):
        with open(path, "wb") as handle:
            handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match=r"Could not write checkpoint .*No space left on device"):
        fit(tiny_folder, tmp_path, f"--ckpt_path={tmp_path}/checkpoints/last.ckpt", epochs=2)
    monkeypatch.setattr(torch, "save", real_save)
    # No temporary left; and no fit_summary.json or per_class_val.json: the failed fit removed the first fit's, they
    # describe no finished fit
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["best-epoch000.ckpt", "last.ckpt"]
    assert file_sha256(tmp_path / "checkpoints" / "last.ckpt") == before


def test_resume_refuses_every_setting_that_differs_from_the_checkpoint(tiny_folder, teacher_run, tmp_path):
    teacher = teacher_run / "checkpoints" / "last.ckpt"
    kd(tiny_folder, tmp_path, teacher)
    resume = f"--ckpt_path={tmp_path}/checkpoints/last.ckpt"
    with pytest.raises(ValueError, match=r"other model settings .*\n  model.init_args.kd_weight: checkpoint 0.9, given 0.1\n"):
        kd(tiny_folder, tmp_path, teacher, resume, "--model.kd_weight=0.1", epochs=2)
    with pytest.raises(ValueError, match=r"model.class_path: checkpoint 'lightning_kd.methods.KD', given "
                                         r"'lightning_kd.methods.Baseline'"):
        fit(tiny_folder, tmp_path, resume, epochs=2)
    resumed = kd(tiny_folder, tmp_path, teacher, resume, epochs=2)  # the same settings resume
    assert resumed.trainer.global_step == 4 and resumed.model.kd_weight == 0.9


def test_the_student_records_its_teacher_and_never_needs_the_teacher_file_again(tiny_folder, teacher_run, tmp_path):
    original = teacher_run / "checkpoints" / "last.ckpt"
    teacher = tmp_path / "teacher.ckpt"
    shutil.copy(original, teacher)
    kd(tiny_folder, tmp_path / "kd", teacher)
    written = checkpoint_of(tmp_path / "kd")
    teacher_checkpoint = torch.load(teacher, weights_only=False)
    assert TeacherSource(**written["teacher_source"]) == TeacherSource(
        str(teacher), file_sha256(teacher), teacher_checkpoint["epoch"], teacher_checkpoint["global_step"]
    )
    resume = f"--ckpt_path={tmp_path}/kd/checkpoints/last.ckpt"

    # Another teacher under the same name: a resume says so, and names both.
    other = tmp_path / "other"
    fit(tiny_folder, other, "--seed_everything=7")
    shutil.copy(other / "checkpoints" / "last.ckpt", teacher)
    with pytest.raises(ValueError, match=r"is not the teacher this checkpoint learned from: .*teacher.ckpt \(sha256 "
                                         + file_sha256(original)[:12]):
        kd(tiny_folder, tmp_path / "kd", teacher, resume, epochs=2)

    # The teacher file gone: resume, test and export run from the checkpoint alone, with the recorded teacher.
    os.remove(teacher)
    resumed = kd(tiny_folder, tmp_path / "kd", teacher, resume, epochs=2)
    assert resumed.trainer.global_step == 4
    assert resumed.model.teacher_source.sha256 == file_sha256(original)
    tested = cli_main(["test", "--model=lightning_kd.methods.KD", "--model.student=resnet8", "--model.teacher=resnet8",
                       f"--model.teacher_ckpt={teacher}", "--data=lightning_kd.data.ImageFolderDataModule",
                       "--data.image_size=32", *data_args(tiny_folder, download=None), *trainer_args(tmp_path / "kd"),
                       resume])
    assert "test/teacher_acc1" in tested.trainer.callback_metrics
    reloaded = KD.load_from_checkpoint(f"{tmp_path}/kd/checkpoints/last.ckpt")
    assert reloaded.teacher_source == resumed.model.teacher_source
    export_student(f"{tmp_path}/kd/checkpoints/last.ckpt", str(tmp_path / "student.pt2"))
    assert os.path.isfile(tmp_path / "student.pt2")


class NaNAtStep(KD):
    """KD whose loss turns NaN from training step ``bad_step`` on (a divergence at a known step)."""

    def __init__(self, bad_step: int = 3, **kwargs) -> None:
        super().__init__(**kwargs)
        self.bad_step = bad_step

    def loss_terms(self, step):
        terms = super().loss_terms(step)
        if self.global_step >= self.bad_step:
            terms["kd"] = terms["kd"] * float("nan")
        return terms


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_saves_nothing_non_finite(tiny_folder, teacher_run, tmp_path):
    teacher = teacher_run / "checkpoints" / "last.ckpt"
    with pytest.raises(NonFiniteLossError, match=r"Non-finite loss at training step 3 \(loss=nan, ce=[0-9.]+, kd=nan\)"):
        fit(tiny_folder, tmp_path, "--model=test_trust.NaNAtStep", "--model.teacher=resnet8",
            f"--model.teacher_ckpt={teacher}", "--trainer.log_every_n_steps=50", epochs=3, method="KD")
    last = checkpoint_of(tmp_path)
    assert (last["epoch"], last["global_step"]) == (0, 2)  # the last good epoch, intact
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["best-epoch000.ckpt", "last.ckpt"]
    for name in os.listdir(tmp_path / "checkpoints"):
        state = checkpoint_of(tmp_path, name)["state_dict"]
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point()), name


def test_divergence_is_never_saved_as_best_or_last(tiny_folder, tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"Non-finite (loss|weights) at training step \d+"):
        fit(tiny_folder, tmp_path, "--model.optimizer=torch.optim.SGD", "--model.optimizer.lr=1e4",
            "--trainer.limit_train_batches=4", epochs=5)
    for name in os.listdir(tmp_path / "checkpoints"):
        state = checkpoint_of(tmp_path, name)["state_dict"]
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point()), name


def test_truncated_checkpoints_are_named(tiny_folder, teacher_run, tmp_path):
    truncated = tmp_path / "truncated.ckpt"
    data = (teacher_run / "checkpoints" / "last.ckpt").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"Teacher checkpoint '{truncated}' could not be read"):
        KD(student="resnet8", teacher="resnet8", teacher_ckpt=str(truncated), num_classes=4)
    with pytest.raises(ValueError, match=f"Checkpoint '{truncated}' could not be read"):
        fit(tiny_folder, tmp_path, f"--ckpt_path={truncated}")


def test_validation_from_a_checkpoint_holds_out_the_samples_its_fit_held_out(tiny_folder, tmp_path):
    """The hold-out of ``val_split`` is drawn from the data seed (by default the run's ``seed_everything``, drawn
    anew at every start unless set): ``validate`` from a checkpoint uses the checkpoint's, never a new one."""
    fitted = fit(tiny_folder, tmp_path, "--data.val_split=0.25", "--seed_everything=5")
    validated = cli_main(
        ["validate", "--model=lightning_kd.methods.Baseline", "--model.student=resnet8",
         "--data=lightning_kd.data.ImageFolderDataModule", "--data.image_size=32", "--data.val_split=0.25",
         *data_args(tiny_folder, download=None), *trainer_args(tmp_path), "--seed_everything=6",
         f"--ckpt_path={tmp_path}/checkpoints/last.ckpt"]
    )
    assert validated.datamodule.seed == 5
    assert validated.datamodule.val_dataset.indices == fitted.datamodule.val_dataset.indices
