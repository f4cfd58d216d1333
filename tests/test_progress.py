"""The command line's progress bar: Lightning's bar redrawn by time, not at every step (issue 22), chosen by default
only where no other bar is asked for and the bar is on."""
import os

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import TQDMProgressBar
from torch.utils.data import DataLoader, TensorDataset

from conftest import REPO, data_args, trainer_args
from lightning_kd.cli import cli_main
from lightning_kd.core import ThrottledProgressBar

BASELINE = os.path.join(REPO, "configs", "cifar10", "baseline", "resnet20.yaml")


class Linear(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def redraws(bar: TQDMProgressBar, monkeypatch, epochs: int = 2, batches: int = 12) -> int:
    """How often the training bar was redrawn in ``epochs`` epochs of ``batches`` steps."""
    calls = []
    redraw = TQDMProgressBar.on_train_batch_end
    monkeypatch.setattr(TQDMProgressBar, "on_train_batch_end",
                        lambda self, *args: (calls.append(args[-1]), redraw(self, *args)))
    data = TensorDataset(torch.randn(batches * 2, 4), torch.randint(0, 2, (batches * 2,)))
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_model_summary=False, callbacks=[bar])
    trainer.fit(Linear(), DataLoader(data, batch_size=2))
    return calls


def test_the_bar_is_redrawn_at_most_every_interval_and_at_each_epochs_last_batch(monkeypatch):
    # the run's first batch, then only each epoch's last
    assert redraws(ThrottledProgressBar(min_interval=3600), monkeypatch) == [0, 11, 11]
    assert redraws(ThrottledProgressBar(min_interval=0), monkeypatch) == list(range(12)) * 2
    with pytest.raises(ValueError, match="min_interval"):
        ThrottledProgressBar(min_interval=-1)


def bars(cli) -> list[type]:
    return [type(callback) for callback in cli.trainer.callbacks if isinstance(callback, TQDMProgressBar)]


@pytest.mark.parametrize("options, expected", [
    ([], [ThrottledProgressBar]),  # the default: the library's bar
    (["--trainer.callbacks+=TQDMProgressBar", "--trainer.callbacks.refresh_rate=5"], [TQDMProgressBar]),  # as asked
    (["--trainer.enable_progress_bar=false"], []),  # no bar, and no clash with a default one
])
def test_the_command_line_shows_the_throttled_bar_unless_told_otherwise(options, expected, tiny_cifar10, tmp_path):
    arguments = [a for a in trainer_args(tmp_path) if a != "--trainer.enable_progress_bar=false"]
    cli = cli_main([f"--config={BASELINE}", *data_args(tiny_cifar10), *arguments, *options], run=False)
    assert bars(cli) == expected
