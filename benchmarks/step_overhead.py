"""The fixed cost of a training step: what Lightning and lightning_kd add per step over a plain PyTorch loop.

    python benchmarks/step_overhead.py [--short 40] [--long 200] [--rounds 5] [--output result.json]

With networks too small to compute anything (one 3x3 convolution per stage, 8x8 images, batch 8, one thread), a
step costs only its fixed overhead. Each variant trains ``--short`` and then ``--long`` steps; its cost per step is
the slope ``(t_long - t_short) / (long - short)`` (set-up and tear-down cancel out). The variants run interleaved,
round after round, so a busy machine slows them alike; the median over ``--rounds`` of each variant's slope minus
the raw loop's slope of the same round is its fixed overhead in ms/step:

* ``raw``: a plain loop, teacher under ``no_grad``, CE + KD, backward, SGD;
* ``lightning``: the same loop as a bare LightningModule under ``Trainer.fit`` (no logger, no progress bar);
* ``kd``: the library's KD under ``Trainer.fit`` with a CSV logger and the progress bar ``lightning-kd`` shows
  (:class:`~lightning_kd.core.ThrottledProgressBar`, redrawn every 0.1 s at most);
* ``at``: the library's AT (feature hooks on three stages), same trainer.

Prints one JSON record (and writes it to ``--output``).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import redirect_stderr, redirect_stdout
from typing import Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_kd.core import ThrottledProgressBar
from lightning_kd.methods import AT, KD, kd_loss

BATCH, SIZE, CLASSES = 8, 8, 4
CE_WEIGHT, KD_WEIGHT, TEMPERATURE = 0.1, 0.9, 4.0  # the CIFAR recipe of KD
KD_OPTIONS = {"ce_weight": CE_WEIGHT, "kd_weight": KD_WEIGHT, "temperature": TEMPERATURE}


class TinyStaged(nn.Module):
    """Three one-convolution stages and a linear head: a network that costs (almost) nothing to run."""

    stage_names = ("layer1", "layer2", "layer3")

    def __init__(self, num_classes: int = CLASSES) -> None:
        super().__init__()
        self.layer1, self.layer2, self.layer3 = (nn.Conv2d(c, 4, 3, padding=1) for c in (3, 4, 4))
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(F.relu(self.layer2(F.relu(self.layer1(x)))))
        return self.fc(x.mean(dim=(2, 3)))


def kd_objective(logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """KD's loss as the library computes it: ``CE_WEIGHT``·CE + ``KD_WEIGHT``·T²·KL at ``TEMPERATURE``."""
    return CE_WEIGHT * F.cross_entropy(logits, targets) + KD_WEIGHT * kd_loss(logits, teacher_logits, TEMPERATURE)


def batches(steps: int) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(steps * BATCH, 3, SIZE, SIZE, generator=generator),
                         torch.randint(0, CLASSES, (steps * BATCH,), generator=generator))
    return DataLoader(data, batch_size=BATCH)


def raw(steps: int) -> None:
    student, teacher = TinyStaged(), TinyStaged().eval()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    for x, y in batches(steps):
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            teacher_logits = teacher(x)
        logits = student(x)
        kd_objective(logits, teacher_logits, y).backward()
        optimizer.step()


class BareKD(pl.LightningModule):
    """The raw loop's step as a LightningModule, logging nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.student, self.teacher = TinyStaged(), TinyStaged().eval().requires_grad_(False)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        logits = self.student(x)
        return kd_objective(logits, teacher_logits, y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.student.parameters(), lr=0.01, momentum=0.9)


def trainer(steps: int, library: bool, **options) -> pl.Trainer:
    """A Trainer of ``steps`` training steps, without validation, checkpoints or model summary; ``library``: with a
    CSV logger and the progress bar lightning-kd shows (:class:`~lightning_kd.core.ThrottledProgressBar`), else
    neither; ``options``: further Trainer arguments
    (``accelerator``, ``precision``, ``callbacks``)."""
    folder = tempfile.mkdtemp(prefix="step_overhead_")
    if library:  # the bar lightning-kd's command line shows
        options["callbacks"] = [*options.get("callbacks", []), ThrottledProgressBar()]
    return pl.Trainer(max_steps=steps, devices=1, limit_val_batches=0, num_sanity_val_steps=0,
                      enable_checkpointing=False, enable_model_summary=False, default_root_dir=folder,
                      logger=CSVLogger(folder) if library else False, enable_progress_bar=library, **options)


def quietly(run: Callable[[], object]) -> None:
    """``run()`` with its output swallowed: the bar and banners are drawn, not read."""
    with redirect_stderr(io.StringIO()), redirect_stdout(io.StringIO()):
        run()


def fit(module: pl.LightningModule, steps: int, library: bool) -> None:
    fitting = trainer(steps, library, accelerator="cpu")
    quietly(lambda: fitting.fit(module, batches(steps)))


def library_module(method: type) -> Callable[[], pl.LightningModule]:
    options = KD_OPTIONS if method is KD else {}
    return lambda: method(student=TinyStaged(), teacher=TinyStaged(), num_classes=CLASSES,
                          kd_diagnostics=False, **options)


VARIANTS: dict[str, Callable[[int], None]] = {
    "raw": raw,
    "lightning": lambda steps: fit(BareKD(), steps, library=False),
    "kd": lambda steps: fit(library_module(KD)(), steps, library=True),
    "at": lambda steps: fit(library_module(AT)(), steps, library=True),
}


def seconds(run: Callable[[int], None], steps: int) -> float:
    torch.manual_seed(0)
    start = time.perf_counter()
    run(steps)
    return time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", type=int, default=40)
    parser.add_argument("--long", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output", help="also write the JSON record here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore")  # Lightning's advice about workers and logging intervals, once per fit
    for run in VARIANTS.values():
        seconds(run, args.short)  # warm-up: imports, first-call costs
    slopes: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name, run in VARIANTS.items():
            long_s, short_s = seconds(run, args.long), seconds(run, args.short)
            slopes[name].append(1000 * (long_s - short_s) / (args.long - args.short))
    overhead = {name: round(statistics.median(a - r for a, r in zip(slopes[name], slopes["raw"])), 3)
                for name in VARIANTS if name != "raw"}
    record = {
        "benchmark": "step_overhead", "command": "python benchmarks/step_overhead.py " + " ".join(argv or sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1 torch thread",
        "torch": torch.__version__, "pytorch_lightning": pl.__version__,
        "steps": [args.short, args.long], "rounds": args.rounds,
        "ms_per_step": {name: round(statistics.median(values), 3) for name, values in slopes.items()},
        "overhead_ms_per_step_vs_raw": overhead,
    }
    text = json.dumps(record, indent=1)
    print(text)
    if args.output:
        with open(args.output, "w") as file:
            file.write(text + "\n")
    return record


if __name__ == "__main__":
    main()
