"""The training step's fixed cost: no host–device synchronisation between logging steps, every metric still logged."""
import csv
import glob
import importlib.util
import json
import math
import os

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning import Callback
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data.dataloader import _BaseDataLoaderIter

from conftest import REPO
from lightning_kd.data import ImageFolderDataModule
from lightning_kd.methods import AT, KD
from lightning_kd.models import get_model

SYNCS = ("item", "cpu", "tolist", "__bool__", "__float__", "__int__")  # each copies a device tensor to the host


class SyncCounter(Callback):
    """Counts host synchronisations (``Tensor.item``, ``.cpu``, ``.tolist``, ``bool``/``float``/``int`` of a tensor)
    from the start of every training batch to the start of the next one (the end of training for the last): the
    forward, the losses, backward, the optimizer step, the batch-end hooks, the logging, and the epoch end."""

    def __init__(self, monkeypatch) -> None:
        self.per_step, self.counting, self.count = [], False, 0
        for name in SYNCS:
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _original=original, **kwargs):
                self.count += self.counting
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)

    def pause_while(self, function):
        """``function`` with counting paused: the data side (fetching, the host-side batch look-up) runs on the host
        before the batch is sent to the device (in loader workers on a real run)."""

        def paused(*args, **kwargs):
            counting, self.counting = self.counting, False
            try:
                return function(*args, **kwargs)
            finally:
                self.counting = counting

        return paused

    def on_train_batch_start(self, *args) -> None:
        self.on_train_end()
        self.count, self.counting = 0, True

    def on_train_end(self, *args) -> None:
        if self.counting:
            self.per_step.append(self.count)
        self.counting = False


@pytest.mark.parametrize("method", ["kd", "at"])
def test_twenty_steps_sync_with_the_host_only_at_the_two_logging_steps(method, tiny_folder, tmp_path, monkeypatch):
    torch.manual_seed(0)
    module = {"kd": KD, "at": AT}[method](student="resnet8", teacher=get_model("resnet20", 4), num_classes=4)
    data = ImageFolderDataModule(tiny_folder, batch_size=4, num_workers=0, pin_memory=False)
    counter = SyncCounter(monkeypatch)
    for owner, name in ((_BaseDataLoaderIter, "__next__"), (ImageFolderDataModule, "on_before_batch_transfer")):
        monkeypatch.setattr(owner, name, counter.pause_while(getattr(owner, name)))
    trainer = pl.Trainer(max_steps=20, limit_val_batches=0, log_every_n_steps=10, accelerator="cpu", devices=1,
                         callbacks=[counter], logger=CSVLogger(tmp_path, name="csv"), enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    assert len(counter.per_step) == 20
    loud = {9, 15, 19}  # the logging steps, and the last step of the first epoch (its end is in that step's count)
    assert [count for step, count in enumerate(counter.per_step) if step not in loud] == [0] * 17, counter.per_step

    # Every metric is still logged: the steps' values at the logging steps, the epoch means over all the steps.
    rows = list(csv.DictReader(open(glob.glob(str(tmp_path / "csv" / "*" / "metrics.csv"))[0])))
    assert [int(row["step"]) for row in rows if row.get("train/loss_step")] == [9, 19]
    epochs = [row for row in rows if row.get("train/loss_epoch")]
    assert len(epochs) == 2  # 16 batches of 4 a epoch: epoch 0 and the 4 steps of epoch 1
    for row in epochs:
        assert float(row[f"train/loss_{method}_epoch"]) > 0 and float(row["train/loss_ce_epoch"]) > 0
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_the_step_overhead_benchmark_reports_every_variant_against_the_raw_loop(tmp_path):
    spec = importlib.util.spec_from_file_location("step_overhead", os.path.join(REPO, "benchmarks", "step_overhead.py"))
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    output = tmp_path / "overhead.json"
    record = benchmark.main(["--short", "2", "--long", "4", "--rounds", "1", "--output", str(output)])
    assert json.loads(output.read_text()) == record
    assert set(record["ms_per_step"]) == {"raw", "lightning", "kd", "at"}
    assert set(record["overhead_ms_per_step_vs_raw"]) == {"lightning", "kd", "at"}
    assert all(math.isfinite(value) for value in record["ms_per_step"].values())  # 2 steps against 4: noise


def test_loss_log_means_over_phases_and_its_state_by_hand():
    """LossLog by hand: batch-weighted epoch means, a term absent from a phase averaged over the steps that had it,
    the latest values this step's only, and a state that resumes into the same sums (also from the per-name format
    of earlier checkpoints)."""
    from lightning_kd.core import LossLog

    log = LossLog()
    log.add({"loss": torch.tensor(2.0), "loss_a": torch.tensor(1.0)}, batch_size=4)
    log.add({"loss": torch.tensor(5.0), "loss_a": torch.tensor(3.0)}, batch_size=2)
    log.add({"loss": torch.tensor(8.0), "loss_b": torch.tensor(6.0)}, batch_size=2)  # a new phase: b, not a
    assert {name: float(value) for name, value in log.latest.items()} == {"loss": 8.0, "loss_b": 6.0}
    means = {name: float(value) for name, value in log.epoch_means().items()}
    assert means == pytest.approx({"loss": (8 + 10 + 16) / 8, "loss_a": (4 + 6) / 6, "loss_b": 6.0})

    resumed = LossLog()
    resumed.load_state_dict(log.state_dict())
    for other in (log, resumed):
        other.add({"loss": torch.tensor(1.0), "loss_b": torch.tensor(1.0)}, batch_size=2)
    assert all(torch.equal(log.epoch_means()[name], resumed.epoch_means()[name]) for name in log.epoch_means())

    earlier = LossLog()  # a checkpoint of the per-name format
    earlier.load_state_dict({"sums": {"loss": torch.tensor(34.0), "loss_a": torch.tensor(10.0)},
                             "counts": {"loss": 8, "loss_a": 6}})
    assert {name: float(value) for name, value in earlier.epoch_means().items()} == pytest.approx(
        {"loss": 34 / 8, "loss_a": 10 / 6})
    log.reset()
    assert log.epoch_means() == {} and set(log.latest) == {"loss", "loss_b"}


def test_the_non_finite_watch_sees_this_steps_loss_even_when_log_loss_terms_is_overridden(tiny_cifar10, tmp_path):
    """A method whose log_loss_terms does not record into the loss log still has each step's own loss watched:
    a NaN at the third step stops the run naming that step (not the last finite step recorded)."""
    from lightning_kd.core import NonFiniteLossError
    from lightning_kd.data import CIFAR10DataModule

    class Quiet(KD):
        def log_loss_terms(self, terms, batch_size):
            return torch.stack(list(terms.values())).sum()

        def loss_terms(self, step):
            terms = super().loss_terms(step)
            return {**terms, "ce": terms["ce"] * float("nan")} if self.global_step == 2 else terms

    module = Quiet(student=get_model("resnet8", num_classes=10), teacher=get_model("resnet8", num_classes=10),
                   num_classes=10, kd_diagnostics=False)
    trainer = pl.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                         log_every_n_steps=1)
    with pytest.raises(NonFiniteLossError, match="training step 2"):
        trainer.fit(module, datamodule=CIFAR10DataModule(root=tiny_cifar10, batch_size=4, num_workers=0))
