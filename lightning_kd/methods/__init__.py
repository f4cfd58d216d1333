"""One file per paper: its loss as a pure function and its LightningModule."""
from lightning_kd.methods.baseline import Baseline
from lightning_kd.methods.kd import KD, kd_loss

__all__ = ["Baseline", "KD", "kd_loss"]
