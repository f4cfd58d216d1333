"""``lightning-kd predict --predictions.path FILE`` writes each image's predicted class and probabilities (issue 21)."""
from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import torch

from conftest import data_args, trainer_args
from lightning_kd.cli import cli_main
from lightning_kd.core import PredictionWriter, read_predictions

CLASSES = ["class_00", "class_01", "class_02", "class_03"]  # tiny_folder's
IMAGES = 4 * 16  # its val/ split, which predict reads (the data modules predict on the test split)


def model_args(root) -> list[str]:
    return ["--model=Baseline", "--model.student=resnet8", "--data=ImageFolderDataModule", "--data.image_size=32",
            *data_args(root, download=None)]


@pytest.fixture(scope="module")
def trained(tiny_folder, tmp_path_factory):
    """A Baseline resnet8 fitted for one short epoch; its working directory (checkpoints/last.ckpt)."""
    workdir = tmp_path_factory.mktemp("trained")
    cli_main(["fit", *model_args(tiny_folder), *trainer_args(workdir)])
    return workdir


def predict(root, workdir, *extra):
    return cli_main(["predict", *model_args(root), *trainer_args(workdir),
                     f"--ckpt_path={workdir}/checkpoints/last.ckpt", *extra])


def expected_probabilities(cli) -> torch.Tensor:
    """The student's softmax over the test split, computed here batch by batch."""
    datamodule, student = cli.datamodule, cli.model.student.eval()
    with torch.no_grad():
        batches = (datamodule.transform_batch(batch, augment=False) for batch in datamodule.predict_dataloader())
        return torch.cat([student(x).softmax(dim=1) for x, _ in batches])


def test_predict_writes_one_csv_row_per_image(tiny_folder, trained, tmp_path, capsys):
    path = tmp_path / "predictions.csv"
    cli = predict(tiny_folder, trained, f"--predictions.path={path}")
    assert f"wrote the predictions of {IMAGES} images to {path}" in capsys.readouterr().out
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["index", "predicted", "predicted_class", *CLASSES]
    assert [int(row["index"]) for row in rows] == list(range(IMAGES))
    probabilities = torch.tensor([[float(row[name]) for name in CLASSES] for row in rows])
    assert torch.allclose(probabilities.sum(dim=1), torch.ones(IMAGES), atol=1e-5)
    assert torch.allclose(probabilities, expected_probabilities(cli), atol=1e-6)
    for row, best in zip(rows, probabilities.argmax(dim=1).tolist()):
        assert int(row["predicted"]) == best and row["predicted_class"] == CLASSES[best]


def test_predict_writes_a_pt_file_with_the_same_content(tiny_folder, trained, tmp_path):
    predict(tiny_folder, trained, f"--predictions.path={tmp_path / 'predictions.csv'}")
    predict(tiny_folder, trained, f"--predictions.path={tmp_path / 'predictions.pt'}")
    saved = torch.load(tmp_path / "predictions.pt", weights_only=True)
    assert sorted(saved) == ["classes", "indices", "predicted", "probabilities"]
    assert saved["classes"] == CLASSES and saved["probabilities"].shape == (IMAGES, len(CLASSES))
    assert saved["indices"].tolist() == list(range(IMAGES)) and saved["probabilities"].dtype == torch.float32
    from_csv = read_predictions(str(tmp_path / "predictions.csv"))
    assert from_csv["classes"] == saved["classes"]
    assert torch.equal(from_csv["indices"], saved["indices"]) and torch.equal(from_csv["predicted"], saved["predicted"])
    assert torch.allclose(from_csv["probabilities"], saved["probabilities"], atol=1e-6)


def test_predict_without_a_path_writes_nothing_and_says_how(tiny_folder, trained, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    predict(tiny_folder, trained)
    assert "add --predictions.path predictions.csv (or .pt)" in capsys.readouterr().out
    assert os.listdir(tmp_path) == []


def test_a_predictions_path_of_another_kind_is_one_clear_error(tiny_folder, trained, tmp_path):
    with pytest.raises(ValueError, match=r"predictions path '.*out\.txt': the file must end in \.csv or \.pt"):
        predict(tiny_folder, trained, f"--predictions.path={tmp_path / 'out.txt'}")
    assert not os.path.exists(tmp_path / "out.txt")
    with pytest.raises(ValueError, match="must end in .csv or .pt"):
        PredictionWriter("predictions.json")


def test_two_process_ddp_writes_one_file_with_every_image_once(tiny_folder, trained, tmp_path):
    single, ddp = tmp_path / "single.pt", tmp_path / "ddp.pt"
    predict(tiny_folder, trained, f"--predictions.path={single}")
    command = [sys.executable, "-m", "lightning_kd.cli", "predict", *model_args(tiny_folder), *trainer_args(trained),
               f"--ckpt_path={trained}/checkpoints/last.ckpt", f"--predictions.path={ddp}",
               "--trainer.strategy=ddp", "--trainer.devices=2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote the predictions") == 1  # rank 0 only
    assert sorted(os.listdir(tmp_path)) == ["ddp.pt", "single.pt"]  # one file, no per-rank parts left
    alone, shared = torch.load(single, weights_only=True), torch.load(ddp, weights_only=True)
    assert shared["indices"].tolist() == list(range(IMAGES))  # each image once, in order
    assert torch.equal(shared["predicted"], alone["predicted"]) and shared["classes"] == CLASSES
    assert torch.allclose(shared["probabilities"], alone["probabilities"], atol=1e-5)
