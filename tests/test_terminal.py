"""A quiet informative terminal (issue 21): accuracy in the progress bar, one summary block at the end of fit."""
from __future__ import annotations

import csv
import json
import os

import pytest
import torch

from conftest import data_args, trainer_args
from lightning_kd.cli import cli_main
from lightning_kd.core import FitSummary, build_network


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """A resnet8 teacher for the 4 classes of ``tiny_folder``, as a plain state_dict."""
    path = tmp_path_factory.mktemp("teacher") / "teacher.pth"
    torch.manual_seed(0)
    torch.save(build_network("resnet8", 4).state_dict(), path)
    return str(path)


def kd_fit(root, workdir, teacher, *extra, epochs: int = 1, logger: bool = False):
    return cli_main(
        ["fit", "--model=KD", "--model.student=resnet8", "--model.teacher=resnet8", f"--model.teacher_ckpt={teacher}",
         "--data=ImageFolderDataModule", "--data.image_size=32", *data_args(root, download=None),
         *trainer_args(workdir, steps=2, logger=logger), f"--trainer.max_epochs={epochs}", *extra]
    )


def logged_top1(workdir) -> list[float]:
    """``val/acc1`` of every epoch, from the CSV logger's metrics.csv."""
    (version,) = os.listdir(workdir / "lightning_logs")
    with open(workdir / "lightning_logs" / version / "metrics.csv") as handle:
        return [float(row["val/acc1"]) for row in csv.DictReader(handle) if row.get("val/acc1")]


def test_the_progress_bar_shows_the_student_and_teacher_top1_only(tiny_folder, teacher_file, tmp_path):
    trainer = kd_fit(tiny_folder, tmp_path, teacher_file).trainer
    shown = trainer.progress_bar_metrics
    assert {"val/acc1", "val/teacher_acc1", "train/loss_epoch"} <= set(shown)
    assert "val/acc5" not in shown and "val/teacher_acc5" not in shown  # a short bar: top-5 goes to the loggers
    assert "val/acc5" in trainer.callback_metrics


def test_fit_ends_with_one_summary_block_and_its_json(tiny_folder, teacher_file, tmp_path, capsys):
    monitor = "--trainer.callbacks+=pytorch_lightning.callbacks.LearningRateMonitor"
    cli = kd_fit(tiny_folder, tmp_path, teacher_file, monitor, epochs=3, logger=True)
    output = capsys.readouterr().out
    kept = [type(callback).__name__ for callback in cli.trainer.callbacks]
    assert "LearningRateMonitor" in kept and "FitSummary" in kept  # the user's callbacks and the summary
    accuracies = logged_top1(tmp_path)
    best_epoch = accuracies.index(max(accuracies))
    teacher = float(cli.trainer.callback_metrics["val/teacher_acc1"])
    checkpoints = tmp_path / "checkpoints"
    best_path, last_path = checkpoints / f"best-epoch{best_epoch:03d}.ckpt", checkpoints / "last.ckpt"
    expected = "\n".join([
        "lightning-kd: fit finished (KD, resnet8 -> resnet8, 3 epochs, 6 steps)",
        f"  student top-1: best {max(accuracies):.2%} (epoch {best_epoch}), last {accuracies[-1]:.2%}",
        f"  teacher top-1: {teacher:.2%}   gap (best): {100 * (max(accuracies) - teacher):+.2f} points",
        f"  checkpoints: best {best_path}, last {last_path}",
        f"  summary: {checkpoints / 'fit_summary.json'}",
    ])
    assert output.count("lightning-kd: fit finished") == 1 and expected in output
    summary = json.loads((checkpoints / "fit_summary.json").read_text())
    assert summary["validated"] and (summary["epochs"], summary["steps"]) == (3, 6)
    assert (summary["method"], summary["teacher"], summary["student"]) == ("KD", "resnet8", "resnet8")
    assert summary["best"] == pytest.approx(max(accuracies)) and summary["best_epoch"] == best_epoch
    assert summary["last"] == pytest.approx(accuracies[-1]) and summary["teacher_acc1"] == pytest.approx(teacher)
    assert summary["gap_points"] == pytest.approx(100 * (max(accuracies) - teacher), abs=0.01)
    assert summary["checkpoints"] == {"best": str(best_path), "last": str(last_path)}
    assert os.path.isfile(best_path) and os.path.isfile(last_path)


class FrozenStudent(torch.nn.Module):
    """A student without BatchNorm: trained with lr 0, its validation accuracy is the same every epoch."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.pool = torch.nn.AdaptiveAvgPool2d(4)
        self.fc = torch.nn.Linear(3 * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(x).flatten(1))


def test_a_resumed_fit_reports_the_best_of_the_whole_run(tiny_folder, teacher_file, tmp_path, capsys):
    frozen = ['--model.student={"class_path": "test_terminal.FrozenStudent"}', "--model.optimizer=torch.optim.SGD",
              "--model.optimizer.lr=0"]
    kd_fit(tiny_folder, tmp_path, teacher_file, *frozen, epochs=2)
    first = json.loads((tmp_path / "checkpoints" / "fit_summary.json").read_text())
    assert first["best_epoch"] == 0 and first["best"] == first["last"]
    kd_fit(tiny_folder, tmp_path, teacher_file, *frozen, f"--ckpt_path={tmp_path}/checkpoints/last.ckpt", epochs=3)
    resumed = json.loads((tmp_path / "checkpoints" / "fit_summary.json").read_text())
    # The best is epoch 0, before the resume (a summary of the resumed part alone would say epoch 2).
    assert (resumed["epochs"], resumed["best_epoch"], resumed["student"]) == (3, 0, "FrozenStudent")
    assert resumed["best"] == first["best"] and resumed["teacher_acc1"] == pytest.approx(first["teacher_acc1"])
    assert resumed["checkpoints"]["best"] == str(tmp_path / "checkpoints" / "best-epoch000.ckpt")


def test_a_fit_without_validation_says_so(tiny_folder, teacher_file, tmp_path, capsys):
    kd_fit(tiny_folder, tmp_path, teacher_file, "--trainer.limit_val_batches=0")
    output = capsys.readouterr().out
    assert "lightning-kd: fit finished (KD, resnet8 -> resnet8, 1 epoch, 2 steps)" in output
    assert "  no validation ran: no val/acc1 to report" in output and "student top-1" not in output
    assert f"last {tmp_path / 'checkpoints' / 'last.ckpt'}" in output
    summary = json.loads((tmp_path / "checkpoints" / "fit_summary.json").read_text())
    assert not summary["validated"] and summary["best"] is None and summary["teacher_acc1"] is None


def test_the_summary_names_what_is_missing():
    summary = {"method": "Baseline", "teacher": None, "student": "resnet8", "epochs": 2, "steps": 10,
               "validated": True, "monitor": "val/acc1", "best": 0.5, "best_epoch": 1, "last": 0.25,
               "teacher_acc1": None, "gap_points": None, "checkpoints": {"best": None, "last": None}}
    assert FitSummary.format(summary).splitlines() == [
        "lightning-kd: fit finished (Baseline, resnet8, 2 epochs, 10 steps)",
        "  student top-1: best 50.00% (epoch 1), last 25.00%",
        "  checkpoints: none saved",
    ]


def test_without_a_checkpoint_the_summary_goes_to_the_log_dir(tiny_folder, tmp_path, capsys):
    import pytorch_lightning as pl

    from lightning_kd.data import ImageFolderDataModule
    from lightning_kd.methods import Baseline

    trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=2, num_sanity_val_steps=0,
                         accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, callbacks=[FitSummary()])
    data = ImageFolderDataModule(tiny_folder, image_size=32, batch_size=8, num_workers=0)
    trainer.fit(Baseline(student="resnet8", num_classes=4), datamodule=data)
    output = capsys.readouterr().out
    assert "lightning-kd: fit finished (Baseline, resnet8, 1 epoch, 2 steps)" in output
    assert "  checkpoints: none saved" in output
    summary = json.loads((tmp_path / "fit_summary.json").read_text())
    assert summary["checkpoints"] == {"best": None, "last": None} and summary["best_epoch"] == 0


def test_a_failed_fit_leaves_no_summary_of_an_earlier_run(tiny_folder, teacher_file, tmp_path, monkeypatch):
    kd_fit(tiny_folder, tmp_path, teacher_file)
    assert (tmp_path / "checkpoints" / "fit_summary.json").is_file()

    def crash(*args, **kwargs):
        raise RuntimeError("the machine went away")

    monkeypatch.setattr(FitSummary, "on_validation_end", crash)  # the new fit dies in its first validation
    with pytest.raises(RuntimeError, match="the machine went away"):
        kd_fit(tiny_folder, tmp_path, teacher_file, "--checkpoint.overwrite=true")
    assert not (tmp_path / "checkpoints" / "fit_summary.json").exists()  # not the first run's figures
