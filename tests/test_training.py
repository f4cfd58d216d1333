"""Whole fits through the CLI: resume, export, W&B offline, bf16-mixed and 2-process DDP on the CPU."""
import glob
import json
import os
import struct
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, data_args, state_hash, trainer_args
from lightning_kd.cli import cli_main
from lightning_kd.export import export_student
from lightning_kd.models import get_model

KD_CONFIG = os.path.join(REPO, "configs", "folder", "kd", "resnet20-resnet8.yaml")


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "resnet20.pth"
    torch.save(get_model("resnet20", 4).state_dict(), path)
    return str(path)


def kd_args(root, workdir, teacher_ckpt, steps=2, logger=False):
    return [
        f"--config={KD_CONFIG}", *data_args(root, batch_size=8, download=None), *trainer_args(workdir, steps, logger),
        f"--model.init_args.teacher_ckpt={teacher_ckpt}",
    ]


def test_resume_continues_exactly(tiny_folder, teacher_ckpt, tmp_path):
    common = ["--trainer.deterministic=true", "--trainer.limit_train_batches=4", "--trainer.limit_val_batches=2"]
    straight = cli_main(["fit", *kd_args(tiny_folder, tmp_path / "a", teacher_ckpt), *common, "--trainer.max_epochs=2"])
    cli_main(["fit", *kd_args(tiny_folder, tmp_path / "b", teacher_ckpt), *common, "--trainer.max_epochs=1"])
    resumed = cli_main(
        ["fit", *kd_args(tiny_folder, tmp_path / "b", teacher_ckpt), *common, "--trainer.max_epochs=2",
         f"--ckpt_path={tmp_path / 'b' / 'checkpoints' / 'last.ckpt'}"]
    )
    assert resumed.trainer.global_step == straight.trainer.global_step == 8
    for key in ("val/acc1", "val/loss", "train/loss_epoch", "train/loss_kd_epoch"):
        assert resumed.trainer.callback_metrics[key].item() == straight.trainer.callback_metrics[key].item(), key
    assert state_hash(resumed.model.student) == state_hash(straight.model.student)


def test_python_api_resumes_and_reloads_with_the_default_recipe_under_safe_loading(tiny_folder, teacher_ckpt, tmp_path):
    """The default optimizer/scheduler recipes sit in the hyper-parameters by reference; torch.load's
    ``weights_only=True`` (Lightning's default) must still accept the checkpoint."""
    import pytorch_lightning as pl

    from lightning_kd.data import ImageFolderDataModule
    from lightning_kd.methods import KD

    def trainer(epochs):
        return pl.Trainer(max_epochs=epochs, limit_train_batches=2, limit_val_batches=1, accelerator="cpu",
                          logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)

    def model():
        return KD(student="resnet8", teacher="resnet20", teacher_ckpt=teacher_ckpt, num_classes=4)

    data = ImageFolderDataModule(tiny_folder, batch_size=8, num_workers=0)
    first = trainer(1)
    first.fit(model(), data)
    ckpt = str(tmp_path / "one_epoch.ckpt")
    first.save_checkpoint(ckpt)
    resumed = trainer(2)
    resumed.fit(model(), data, ckpt_path=ckpt)
    assert resumed.global_step == 4
    reloaded = KD.load_from_checkpoint(ckpt, weights_only=True)
    assert state_hash(reloaded.student) == state_hash(first.lightning_module.student)


def test_export_round_trip_gives_the_same_logits(tiny_folder, teacher_ckpt, tmp_path):
    cli = cli_main(["fit", *kd_args(tiny_folder, tmp_path, teacher_ckpt)])
    ckpt = str(tmp_path / "checkpoints" / "last.ckpt")
    student = cli.model.student.eval()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        expected = student(x)

    program = export_student(ckpt, str(tmp_path / "student.pt2"))
    loaded = torch.export.load(program).module()
    torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded(x[:1]), expected[:1], rtol=1e-5, atol=1e-5)  # batch size is dynamic

    record = torch.load(export_student(ckpt, str(tmp_path / "student.pth"), format="state_dict"))
    rebuilt = get_model(record["model"], record["num_classes"])
    rebuilt.load_state_dict(record["state_dict"])
    torch.testing.assert_close(rebuilt.eval()(x), expected, rtol=1e-5, atol=1e-5)


def test_export_errors_leave_nothing_behind(tmp_path):
    with pytest.raises(FileNotFoundError, match="Checkpoint not found"):
        export_student(str(tmp_path / "missing.ckpt"), str(tmp_path / "out.pt2"))
    assert os.listdir(tmp_path) == []


def test_export_command_line(tiny_folder, teacher_ckpt, tmp_path):
    cli_main(["fit", *kd_args(tiny_folder, tmp_path, teacher_ckpt)])
    out = tmp_path / "exported" / "student.pt2"
    result = subprocess.run(
        [sys.executable, "-m", "lightning_kd.cli", "export", f"--ckpt_path={tmp_path}/checkpoints/last.ckpt", f"--output={out}"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert torch.export.load(str(out)).module()(torch.randn(2, 3, 32, 32)).shape == (2, 4)


def wandb_history_keys(run_file: str) -> set[str]:
    """Keys of the history records in a ``run-*.wandb`` file."""
    keys = set()
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            keys.update(item.key or "/".join(item.nested_key) for item in record.history.item)
    return keys


def wandb_summary_and_tags(run_file: str) -> tuple[dict, list[str]]:
    """The summary values (JSON-decoded, by key) and the run's tags recorded in a ``run-*.wandb`` file."""
    summary, tags = {}, []
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "summary":
            summary.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.summary.update})
        elif kind == "run":
            tags = list(record.run.tags)
    return summary, tags


def wandb_records(run_file: str) -> list:
    """The complete protobuf Records of a ``run-*.wandb`` file (LevelDB log framing), which wandb may still be
    appending to: a record cut short at the end of the file is left out."""
    from wandb.proto import wandb_internal_pb2

    data = open(run_file, "rb").read()
    block, position, pending, records = 32 * 1024, 7, b"", []  # 7-byte file header
    while position + 7 <= len(data):
        if block - position % block < 7:  # block trailer too small for a header: skip to the next block
            position += block - position % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position:position + 7])
        chunk = data[position + 7:position + 7 + length]
        if len(chunk) < length:  # the writer is still appending this record: it is not one yet
            break
        position += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def test_wandb_offline_logs_metrics_and_config(tiny_folder, teacher_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc credentials
    cli = cli_main(
        ["fit", *kd_args(tiny_folder, tmp_path, teacher_ckpt, logger=True), f"--config={REPO}/configs/logger/wandb.yaml",
         f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.log_every_n_steps=1"]
    )
    experiment = cli.trainer.logger.experiment
    dataset = os.path.basename(str(tiny_folder))
    assert experiment.name == f"KD resnet20->resnet8 {dataset}" and experiment.group == f"{dataset} resnet20->resnet8"
    assert experiment.config["model"]["init_args"]["temperature"] == 4.0
    cli.trainer.logger.experiment.finish()
    run_files = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(run_files) == 1
    expected = {"val/acc1", "train/loss_kd_step", "train/loss_kd_epoch", "val/teacher_acc1"}
    deadline = time.monotonic() + 60  # wandb's service process may still be writing the file on a loaded machine
    keys, (summary, tags) = wandb_history_keys(run_files[0]), wandb_summary_and_tags(run_files[0])
    while not (expected <= keys and "best/gap_to_teacher_points" in summary) and time.monotonic() < deadline:
        time.sleep(1)
        keys, (summary, tags) = wandb_history_keys(run_files[0]), wandb_summary_and_tags(run_files[0])
    assert expected <= keys
    assert sorted(tags) == sorted(["method:KD", f"dataset:{dataset}", "teacher:resnet20", "student:resnet8"])
    best = json.loads((tmp_path / "checkpoints" / "fit_summary.json").read_text())
    assert summary["best/val/acc1"] == pytest.approx(best["best"]) and summary["best/epoch"] == best["best_epoch"]
    assert summary["best/gap_to_teacher_points"] == pytest.approx(best["gap_points"])


def test_bf16_mixed_fit_on_cpu(tiny_folder, teacher_ckpt, tmp_path):
    cli = cli_main(["fit", *kd_args(tiny_folder, tmp_path, teacher_ckpt), "--trainer.precision=bf16-mixed"])
    assert cli.trainer.precision == "bf16-mixed"
    assert cli.trainer.callback_metrics["train/loss"].dtype == torch.float32
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])


def test_two_process_ddp_fit_on_cpu(tiny_folder, teacher_ckpt, tmp_path):
    command = [
        sys.executable, "-m", "lightning_kd.cli", "fit", *kd_args(tiny_folder, tmp_path, teacher_ckpt, steps=3),
        "--trainer.strategy=ddp", "--trainer.devices=2",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "distributed_backend=gloo" in result.stderr + result.stdout
    assert "All distributed processes registered. Starting with 2 processes" in result.stderr + result.stdout
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 3


def test_demo_trains_teacher_student_and_kd_and_prints_the_comparison(tiny_folder, tmp_path, capsys):
    from lightning_kd.demo import run_demo

    results = run_demo(root=tiny_folder, epochs=1, batch_size=16, num_workers=0, workdir=str(tmp_path))
    assert list(results) == ["teacher resnet20", "resnet8 alone", "resnet8 + KD"]
    assert all(0.0 <= value <= 1.0 for value in results.values())
    printed = capsys.readouterr().out
    assert "resnet8 + KD" in printed and "resnet8 alone" in printed
    assert os.path.isfile(tmp_path / "teacher" / "checkpoints" / "last.ckpt")


def test_validate_test_and_predict_from_a_checkpoint(tiny_folder, teacher_ckpt, tmp_path):
    fitted = cli_main(["fit", *kd_args(tiny_folder, tmp_path, teacher_ckpt)])
    ckpt = f"--ckpt_path={tmp_path}/checkpoints/last.ckpt"
    tested = cli_main(["test", *kd_args(tiny_folder, tmp_path, teacher_ckpt), ckpt])
    assert {"test/acc1", "test/acc5", "test/loss", "test/teacher_acc1"} <= set(tested.trainer.callback_metrics)
    validated = cli_main(["validate", *kd_args(tiny_folder, tmp_path, teacher_ckpt), ckpt])
    assert "val/acc1" in validated.trainer.callback_metrics
    predictor = cli_main(["predict", *kd_args(tiny_folder, tmp_path, teacher_ckpt), ckpt])
    logits = torch.cat(predictor.trainer.predict_loop.predictions)
    assert logits.shape == (len(predictor.datamodule.test_dataset), 4)
    assert state_hash(predictor.model.student) == state_hash(fitted.model.student)
