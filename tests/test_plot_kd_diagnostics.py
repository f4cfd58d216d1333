"""benchmarks/plot_kd_diagnostics.py on a real fit's CSV log: the series it plots is what the run logged."""
import json

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from test_benchmarks_cifar10 import load_script
from torch.utils.data import DataLoader, TensorDataset

from lightning_kd.methods import KD, Baseline
from lightning_kd.models import get_model


def fit_logged(module, run_dir, epochs: int = 2) -> pl.Trainer:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(32, 3, 32, 32), torch.randint(0, 4, (32,)))
    trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=CSVLogger(run_dir, name="csv"),
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         log_every_n_steps=1)
    trainer.fit(module, DataLoader(data, batch_size=16, shuffle=True), DataLoader(data, batch_size=16))
    return trainer


def test_the_plotted_series_is_what_the_run_logged(tmp_path):
    torch.save(get_model("resnet8", 4).state_dict(), tmp_path / "teacher.pth")
    run_dir = tmp_path / "run"
    trainer = fit_logged(KD(student="resnet8", teacher="resnet8", teacher_ckpt=str(tmp_path / "teacher.pth"),
                            num_classes=4), run_dir)
    script = load_script("plot_kd_diagnostics")
    assert script.main(["--run_dir", str(run_dir), "--plot", str(tmp_path / "d.png"),
                        "--series", str(tmp_path / "d.json")]) == 0

    series = json.loads((tmp_path / "d.json").read_text())["epochs"]
    assert [point["epoch"] for point in series] == [0, 1]
    last, logged = series[-1], trainer.callback_metrics
    assert series[0]["val/teacher_acc1"] == pytest.approx(logged["val/teacher_acc1"].item(), rel=1e-6)
    for key in ("val/acc1", "val/agreement", "val/kl_teacher_student", "val/ece",
                "val/teacher_ece"):
        assert last[key] == pytest.approx(logged[key].item(), rel=1e-6), key
    assert (tmp_path / "d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_without_diagnostics_is_one_clear_error(tmp_path):
    fit_logged(Baseline(student="resnet8", num_classes=4), tmp_path, epochs=1)
    with pytest.raises(SystemExit, match="no val/kl_teacher_student .*kd_diagnostics on"):
        load_script("plot_kd_diagnostics").main(["--run_dir", str(tmp_path), "--plot", str(tmp_path / "d.png")])
