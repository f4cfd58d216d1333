"""Per-class results (issue 21): at the end of fit (its last validation) and of test, the per-class accuracy of
student and teacher and their confusion matrices, as ``per_class_<stage>.json`` beside ``fit_summary.json`` and as
W&B tables, counted in the evaluation pass itself."""
from __future__ import annotations

import glob
import json
import os

import pytest
import torch

from conftest import REPO, data_args, trainer_args
from lightning_kd.cli import cli_main
from lightning_kd.core.per_class import per_class_table
from lightning_kd.models import get_model

WANDB_CONFIG = os.path.join(REPO, "configs", "logger", "wandb.yaml")
CLASSES = ["class_00", "class_01", "class_02", "class_03"]


def fit(root, workdir, method, *extra):
    """One epoch of two training steps; validation sees all 64 images of ``tiny_folder``."""
    return cli_main([
        "fit", f"--model={method}", "--model.student=resnet8", "--data=ImageFolderDataModule", "--data.image_size=32",
        *data_args(root, download=None), *trainer_args(workdir), "--trainer.limit_val_batches=1.0", *extra
    ])


def read(path) -> dict:
    with open(path) as handle:
        return json.load(handle)


def check_consistent(results: dict, student_acc1: float, teacher_acc1) -> None:
    """Names, per-class rows and matrices agree with each other and with the logged overall top-1."""
    assert [row["class"] for row in results["classes"]] == CLASSES
    for who, overall in (("student", student_acc1), ("teacher", teacher_acc1)):
        matrix = torch.tensor(results["confusion_matrix"][who])
        assert matrix.diagonal().sum() / matrix.sum() == pytest.approx(overall)
        for row, line in zip(results["classes"], matrix.tolist()):
            assert row["support"] == sum(line) and row[f"{who}_acc1"] == pytest.approx(line[row["index"]] / sum(line))
    assert all(row["gap_points"] == pytest.approx(100 * (row["student_acc1"] - row["teacher_acc1"]), abs=0.01)
               for row in results["classes"])


def test_fit_and_test_write_per_class_results_and_log_them_to_wandb(tiny_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    torch.save(get_model("resnet8", 4).state_dict(), tmp_path / "teacher.pth")
    cli = fit(tiny_folder, tmp_path, "KD", "--model.teacher=resnet8", f"--model.teacher_ckpt={tmp_path}/teacher.pth",
              f"--config={WANDB_CONFIG}", f"--trainer.logger.init_args.save_dir={tmp_path}")
    metrics = dict(cli.trainer.callback_metrics)
    checkpoints = tmp_path / "checkpoints"
    fitted = read(checkpoints / "per_class_val.json")
    assert (fitted["stage"], fitted["method"], fitted["global_step"]) == ("val", "KD", 2)
    assert [row["support"] for row in fitted["classes"]] == [16] * 4  # the last validation's images, once
    check_consistent(fitted, float(metrics["val/acc1"]), float(metrics["val/teacher_acc1"]))

    cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="last")
    tested = read(checkpoints / "per_class_test.json")
    assert tested["checkpoint"] == str(checkpoints / "last.ckpt") and sum(r["support"] for r in tested["classes"]) == 64
    metrics = cli.trainer.callback_metrics
    check_consistent(tested, float(metrics["test/acc1"]), float(metrics["test/teacher_acc1"]))
    written = f"per-class accuracy and confusion matrices (test): {checkpoints / 'per_class_test.json'}"
    assert written in capsys.readouterr().out
    cli.trainer.logger.experiment.finish()

    (run,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    for stage, results in (("val", fitted), ("test", tested)):
        (table,) = glob.glob(f"{run}/files/media/table/{stage}/per_class_*.table.json")
        assert read(table) == {"columns": ["class", "student_acc1", "teacher_acc1", "gap_points"], "data": [
            [row["class"], row["student_acc1"], row["teacher_acc1"], row["gap_points"]] for row in results["classes"]]}
        (matrix,) = glob.glob(f"{run}/files/media/table/{stage}/confusion_matrix_table_*.table.json")
        counts = read(matrix)["data"]
        assert sum(count for _, _, count in counts) == sum(row["support"] for row in results["classes"])
        assert glob.glob(f"{run}/files/media/table/{stage}/teacher_confusion_matrix_table_*.table.json")


def test_without_a_teacher_the_teacher_columns_are_empty(tiny_folder, tmp_path):
    fit(tiny_folder, tmp_path, "Baseline")
    results = read(tmp_path / "checkpoints" / "per_class_val.json")
    assert results["confusion_matrix"]["teacher"] is None
    assert {(row["teacher_acc1"], row["gap_points"]) for row in results["classes"]} == {(None, None)}


def test_a_black_box_teacher_is_never_asked_for_per_class_results(tiny_folder, tmp_path):
    import pytorch_lightning as pl

    from lightning_kd.core import BlackBoxTeacher, PerClassReport
    from lightning_kd.data import ImageFolderDataModule
    from lightning_kd.methods import KD

    teacher = BlackBoxTeacher(get_model("resnet8", 4))
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, num_sanity_val_steps=0, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, callbacks=[PerClassReport()])
    data = ImageFolderDataModule(tiny_folder, image_size=32, batch_size=8, num_workers=0)
    trainer.fit(KD(student="resnet8", teacher=teacher, num_classes=4), datamodule=data)
    results = read(tmp_path / "per_class_val.json")  # no checkpoint directory: the trainer's root
    assert results["confusion_matrix"]["teacher"] is None and teacher.queries == 16  # the training images only
    assert [row["support"] for row in results["classes"]] == [16] * 4


def test_the_table_of_a_class_without_images_has_no_accuracy():
    student = torch.tensor([[3, 1, 0], [0, 0, 0], [1, 0, 1]])
    teacher = torch.tensor([[4, 0, 0], [0, 0, 0], [0, 1, 1]])
    rows = per_class_table(student, teacher, ["a", "b", "c"])
    assert rows == [
        {"index": 0, "class": "a", "support": 4, "student_acc1": 0.75, "teacher_acc1": 1.0, "gap_points": -25.0},
        {"index": 1, "class": "b", "support": 0, "student_acc1": None, "teacher_acc1": None, "gap_points": None},
        {"index": 2, "class": "c", "support": 2, "student_acc1": 0.5, "teacher_acc1": 0.5, "gap_points": 0.0},
    ]
    assert per_class_table(student, None, ["a", "b", "c"])[0]["teacher_acc1"] is None
