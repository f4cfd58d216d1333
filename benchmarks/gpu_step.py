"""The KD training step on a GPU: the library under ``Trainer.fit`` against a raw CUDA loop doing the same math.

    python benchmarks/gpu_step.py --output gpu_step.json            # planned for 8 minutes on one H100
    python benchmarks/gpu_step.py --quick --output gpu_step.json    # about 2 minutes: batch 256, fewer steps
    python benchmarks/gpu_step.py --device cpu --tiny               # smoke test without a GPU (seconds)

For each pair (``--pairs``, default resnet56 -> resnet20 and resnet32x4 -> resnet8x4, CIFAR-100's 100 classes),
batch size (``--batches``, default 64 and 256) and mode (``--modes``: ``fp32``; ``bf16-mixed``: Lightning's
``precision="bf16-mixed"``, ``torch.autocast(bfloat16)`` in the raw loop; ``channels_last``: every weight in
``torch.channels_last``; ``compile``: ``torch.compile`` of student and teacher; options join with ``+``, e.g.
``bf16-mixed+channels_last+compile``), two variants train on the same data:

* ``raw``: a plain loop: teacher forward under ``no_grad`` (eval mode), student forward, 0.1·CE + 0.9·T²·KL at
  T = 4 computed in float32 (as the library does under mixed precision), backward, SGD (lr 0.05, momentum 0.9,
  weight decay 5e-4, the library's default) step, the learning-rate schedule stepped every epoch;
* ``kd``: the library's ``KD`` (the same weights, recipe and options: ``channels_last``, ``compile``) under
  ``Trainer.fit`` on one device, with the CSV logger, the progress bar and the logging interval a user's run has.

Both read the same synthetic CIFAR-sized training set held on the device (``--samples`` uint8 images, 50000 as
CIFAR's): every step gathers a batch of a per-epoch shuffle and crops (padding 4), flips and normalises it on the
device with the library's ``CropFlipNormalize`` (draws from a seeded device generator), so the data path is the
same, and cheap, on both sides: the difference is the step's own overhead (Lightning's loop and the library's
``training_step``: loss logging, non-finite watch, teacher meter), not data loading.

Timing: the device is synchronised (``torch.cuda.synchronize``) and the clock read at the start of step 0, of step
``--warmup`` and then every ``--steps`` steps, ``--rounds`` times (in the library, by a callback's
``on_train_batch_start``). Each window of ``--steps`` whole steps (data, step, loop bookkeeping) gives one ms/step;
a variant's ms/step is the median of its windows (each window of 50 steps holds one logging step of Lightning's
default interval, with its copy to the host; a window holding an epoch's end counts like any other, and the median
keeps one odd window from moving the figure). The variants run one after the other, raw first. The warm-up steps
(cuDNN's and the allocator's first calls; under ``compile`` the compilation, reported with the number of graphs
compiled) are timed apart as ``warmup_s``. Each variant starts from a fresh ``torch._dynamo`` state, so ``kd``
compiles anew (from the on-disk caches ``raw`` filled). Peak GPU memory is ``torch.cuda.max_memory_allocated`` over
the variant's run.

Per configuration the record holds raw and kd ms/step, their windows, ``overhead_ms_per_step`` (kd - raw) and
``ratio`` (kd / raw), warm-up seconds, peak memory and graphs compiled; with the GPU's name, torch / Lightning / CUDA /
cuDNN versions, the TF32 settings and the exact command. The JSON (``--output``) is rewritten after every
configuration, so a run cut short keeps what it measured. Cheap modes run first; a configuration that fails is
recorded with its error (``failed``) and the others go on; one starts only within ``--budget_s`` seconds of the start
(the others are listed as ``skipped``). ``--tiny`` replaces the networks by one-convolution-per-stage ones on 8x8
images (a few steps, one torch thread) to test the script on a CPU; without CUDA the default (GPU) run stops with
one line saying so.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from typing import Callable, NamedTuple, Optional

import pytorch_lightning as pl
import torch
from torch import nn
from torch._dynamo.utils import counters
from torch.utils.data import DataLoader

from lightning_kd.core import cifar_multistep, cifar_sgd
from lightning_kd.data.cifar import CIFAR100_MEAN, CIFAR100_STD
from lightning_kd.data.tensor_resident import CropFlipNormalize
from lightning_kd.methods import KD
from lightning_kd.models import ZOO, get_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_overhead import KD_OPTIONS, TinyStaged, kd_objective, quietly, trainer  # noqa: E402  (a sibling script)

CLASSES, PADDING = 100, 4
MODE_OPTIONS = ("fp32", "bf16-mixed", "channels_last", "compile")
# The settings of a run; --quick, then --tiny, change some; a flag given on the command line wins.
PRESETS: dict[str, dict] = {
    "default": {"pairs": [("resnet56", "resnet20"), ("resnet32x4", "resnet8x4")], "batches": [64, 256],
                "warmup": 20, "steps": 50, "rounds": 5, "samples": 50000, "size": 32, "budget_s": 390.0},
    "quick": {"batches": [256], "warmup": 10, "steps": 20, "rounds": 3, "budget_s": 75.0},
    "tiny": {"pairs": [("tiny", "tiny")], "batches": [8, 32], "warmup": 2, "steps": 3, "rounds": 2, "samples": 512,
             "size": 8, "budget_s": None},
}


class Mode(NamedTuple):
    """How both variants run: bfloat16 autocast, weights in channels_last, torch.compile of student and teacher."""

    name: str
    bf16: bool = False
    channels_last: bool = False
    compile: bool = False

    @classmethod
    def parse(cls, text: str) -> "Mode":
        """``fp32``, or options of ``MODE_OPTIONS`` joined with ``+`` (``bf16-mixed+channels_last``)."""
        options = text.split("+")
        unknown = [option for option in options if option not in MODE_OPTIONS]
        if unknown or ("fp32" in options and "bf16-mixed" in options):
            raise argparse.ArgumentTypeError(f"mode {text!r}: join options of {', '.join(MODE_OPTIONS)} with '+' "
                                             "(fp32 and bf16-mixed exclude each other)")
        return cls(text, "bf16-mixed" in options, "channels_last" in options, "compile" in options)

    @property
    def precision(self) -> str:
        return "bf16-mixed" if self.bf16 else "32-true"


def parse_pair(text: str) -> tuple[str, str]:
    """``teacher:student``, each a CIFAR zoo name or ``tiny`` (step_overhead's ``TinyStaged``)."""
    names = tuple(text.split(":"))
    if len(names) != 2 or any(name != "tiny" and name not in ZOO for name in names):
        raise argparse.ArgumentTypeError(f"pair {text!r}: teacher:student, each 'tiny' or one of {', '.join(ZOO)}")
    return names


def network(name: str) -> nn.Module:
    return TinyStaged(CLASSES) if name == "tiny" else get_model(name, CLASSES)


def clock(device: torch.device) -> float:
    """``time.perf_counter()`` once everything queued on ``device`` has run."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class ResidentData(torch.utils.data.Dataset):
    """``samples`` random uint8 ``size``x``size`` images and labels held on ``device``; item ``i`` is the finished
    batch ``i`` of the epoch's shuffle (drawn anew at item 0): gathered, cropped, flipped and normalised on the
    device by the library's ``CropFlipNormalize``, the crops and flips drawn from a seeded device generator."""

    def __init__(self, samples: int, size: int, batch: int, device: torch.device) -> None:
        self.generator = torch.Generator(device=device).manual_seed(0)
        self.images = torch.randint(0, 256, (samples, 3, size, size), dtype=torch.uint8, device=device,
                                    generator=self.generator)
        self.labels = torch.randint(0, CLASSES, (samples,), device=device, generator=self.generator)
        self.finish = CropFlipNormalize(PADDING, CIFAR100_MEAN, CIFAR100_STD)
        self.batch, self.order = batch, None

    def __len__(self) -> int:
        return len(self.labels) // self.batch  # whole batches only: one shape for compiled graphs

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.images.device
        if index == 0:
            self.order = torch.randperm(len(self.labels), device=device, generator=self.generator)
        chosen = self.order[index * self.batch:(index + 1) * self.batch]
        offsets = torch.randint(0, 2 * PADDING + 1, (self.batch, 2), device=device, generator=self.generator)
        flips = torch.randint(0, 2, (self.batch, 1), device=device, generator=self.generator)
        draws = torch.cat([offsets, flips], dim=1)
        return self.finish(self.images[chosen], True, draws), self.labels[chosen]


def raw_networks(pair: tuple[str, str], mode: Mode, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """Student (training mode) and frozen teacher (eval mode) as ``KD`` builds them, on ``device``, in ``mode``."""
    student, teacher = network(pair[1]), network(pair[0])  # KD(student=..., teacher=...) builds them in this order
    teacher.eval().requires_grad_(False)
    for net in (student, teacher):
        net.to(device)
        if mode.channels_last:
            net.to(memory_format=torch.channels_last)
        if mode.compile:
            net.compile()
    return student.train(), teacher


def raw_run(pair: tuple[str, str], mode: Mode, data: ResidentData, marks: list[int]) -> list[float]:
    """The raw loop until step ``marks[-1]``; the clock (:func:`clock`) at the start of every step in ``marks``."""
    device = data.images.device
    student, teacher = raw_networks(pair, mode, device)
    optimizer = cifar_sgd(student.parameters())
    scheduler = cifar_multistep(optimizer)
    times, step = [], 0
    while True:
        for index in range(len(data)):
            if step in marks:
                times.append(clock(device))
            if step == marks[-1]:
                return times
            x, y = data[index]
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode.bf16):
                with torch.no_grad():
                    teacher_logits = teacher(x)
                logits = student(x)
            kd_objective(logits.float(), teacher_logits.float(), y).backward()
            optimizer.step()
            step += 1
        scheduler.step()


class StepClock(pl.Callback):
    """The clock (:func:`clock`) at the start of every training step in ``marks``."""

    def __init__(self, marks: list[int]) -> None:
        self.marks, self.times = set(marks), []

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step in self.marks:
            self.times.append(clock(module.device))


def library_run(pair: tuple[str, str], mode: Mode, data: ResidentData, marks: list[int]) -> list[float]:
    """The library's KD under ``Trainer.fit`` until step ``marks[-1]``; the clock at the start of every step in
    ``marks``."""
    module = KD(student=network(pair[1]), teacher=network(pair[0]), num_classes=CLASSES,
                channels_last=mode.channels_last, compile=mode.compile, **KD_OPTIONS)
    step_clock = StepClock(marks)
    accelerator = "gpu" if data.images.device.type == "cuda" else "cpu"
    fitting = trainer(marks[-1] + 1, library=True, accelerator=accelerator, precision=mode.precision,
                      callbacks=[step_clock])
    quietly(lambda: fitting.fit(module, DataLoader(data, batch_size=None)))
    return step_clock.times


def measure(run: Callable[[list[int]], list[float]], settings: dict, device: torch.device) -> dict:
    """One variant from a fresh compiler state: the median ms/step of its ``rounds`` windows of ``steps`` steps after
    ``warmup`` steps, the windows, the warm-up's seconds, peak GPU memory (MiB; ``None`` on a CPU) and the number of
    graphs torch.compile made."""
    gc.collect()
    torch._dynamo.reset()
    counters.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    warmup, steps = settings["warmup"], settings["steps"]
    times = run([0, *range(warmup, warmup + settings["rounds"] * steps + 1, steps)])
    windows = [1000 * (end - start) / steps for start, end in zip(times[1:], times[2:])]
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"ms_per_step": round(statistics.median(windows), 3), "window_ms_per_step": [round(w, 3) for w in windows],
            "warmup_s": round(times[1] - times[0], 2), "peak_memory_mib": None if peak is None else round(peak, 1),
            "compiled_graphs": counters["stats"]["unique_graphs"]}


def configuration(pair: tuple[str, str], batch: int, mode: Mode, settings: dict, device: torch.device) -> dict:
    """Both variants of one configuration, raw first, each on its own copy of the same data."""
    start = time.perf_counter()
    row = {"name": config_name(pair, batch, mode), "teacher": pair[0], "student": pair[1], "batch": batch,
           "mode": mode.name}
    for variant, run in (("raw", raw_run), ("kd", library_run)):
        torch.manual_seed(0)  # the same initial weights in both variants

        def seeded(marks: list[int], run=run) -> list[float]:
            return run(pair, mode, ResidentData(settings["samples"], settings["size"], batch, device), marks)

        row[variant] = measure(seeded, settings, device)
    raw_ms, kd_ms = row["raw"]["ms_per_step"], row["kd"]["ms_per_step"]
    row.update(overhead_ms_per_step=round(kd_ms - raw_ms, 3), ratio=round(kd_ms / raw_ms, 3),
               wall_s=round(time.perf_counter() - start, 1))
    return row


def config_name(pair: tuple[str, str], batch: int, mode: Mode) -> str:
    return f"{pair[0]}->{pair[1]} batch {batch} {mode.name}"


def environment(device: torch.device) -> dict:
    """The machine and software the figures come from."""
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        machine = {"device": properties.name, "device_memory_mib": round(properties.total_memory / 2**20)}
    else:
        machine = {"device": f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores",
                   "device_memory_mib": None}
    return {**machine, "date": datetime.date.today().isoformat(), "python": platform.python_version(),
            "torch": torch.__version__, "pytorch_lightning": pl.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
            "cudnn_benchmark": torch.backends.cudnn.benchmark, "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision(), "torch_threads": torch.get_num_threads()}


def parse(argv: Optional[list[str]]) -> tuple[argparse.Namespace, dict]:
    """The arguments, and the run's settings: the presets (--quick, --tiny) under the flags given."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--quick", action="store_true", help="batch 256 only, fewer steps, budget 75 s: ~2 minutes")
    parser.add_argument("--tiny", action="store_true", help="tiny networks, 8x8 images, a few steps (a smoke test)")
    parser.add_argument("--pairs", nargs="+", type=parse_pair, help="teacher:student pairs (default: resnet56:resnet20 "
                        "resnet32x4:resnet8x4)")
    parser.add_argument("--batches", nargs="+", type=int, help="batch sizes (default: 64 256)")
    parser.add_argument("--modes", nargs="+", type=Mode.parse, help="default: fp32 bf16-mixed channels_last compile "
                        "(on a CPU: no compile)")
    parser.add_argument("--warmup", type=int, help="untimed steps before the first window (default 20)")
    parser.add_argument("--steps", type=int, help="steps per timed window (default 50)")
    parser.add_argument("--rounds", type=int, help="timed windows per variant (default 5)")
    parser.add_argument("--samples", type=int, help="training images held on the device (default 50000)")
    parser.add_argument("--budget_s", type=float, help="start no configuration after this many seconds (default 390)")
    parser.add_argument("--output", default="gpu_step.json", help="the JSON record, rewritten after each configuration")
    args = parser.parse_args(argv)
    settings = dict(PRESETS["default"])
    for preset in ("quick", "tiny"):
        if getattr(args, preset):
            settings.update(PRESETS[preset])
    compiled = () if args.device == "cpu" else ("compile",)
    settings["modes"] = [Mode.parse(name) for name in ("fp32", "bf16-mixed", "channels_last", *compiled)]
    settings.update({key: value for key, value in vars(args).items() if key in settings and value is not None})
    if min(settings["warmup"], settings["steps"], settings["rounds"]) < 1:
        parser.error("--warmup, --steps and --rounds must be at least 1")
    if min(settings["batches"]) < 1 or settings["samples"] < max(settings["batches"]):
        parser.error(f"every batch size must be at least 1 and at most --samples ({settings['samples']})")
    return args, settings


def write(record: dict, path: str) -> None:
    """Replace ``path`` with the record at once (a run killed while writing leaves the previous one)."""
    with open(path + ".tmp", "w") as file:
        file.write(json.dumps(record, indent=1) + "\n")
    os.replace(path + ".tmp", path)


def summary(row: dict) -> str:
    """One configuration's figures on one line."""
    raw, kd = row["raw"], row["kd"]
    return (f"{row['name']}: raw {raw['ms_per_step']} ms, kd {kd['ms_per_step']} ms/step "
            f"({row['overhead_ms_per_step']:+} ms, x{row['ratio']}), warm-up {raw['warmup_s']}/{kd['warmup_s']} s, "
            f"peak {raw['peak_memory_mib']}/{kd['peak_memory_mib']} MiB, graphs {raw['compiled_graphs']}/"
            f"{kd['compiled_graphs']}")


def run_all(configs: list[tuple], settings: dict, device: torch.device, record: dict, path: str,
            started: float) -> None:
    """Measure every configuration that starts within the budget, the record written after each; one that fails is
    recorded with its error and the others go on (a one-shot run on a lent GPU keeps what it can)."""
    for index, config in enumerate(configs):
        if settings["budget_s"] is not None and time.perf_counter() - started > settings["budget_s"]:
            record["skipped"] = record["planned"][index:]
            break
        try:
            row = configuration(*config, settings, device)
        except Exception as error:  # noqa: BLE001  (any failure of one configuration)
            message = f"{type(error).__name__}: {error}"
            record["failed"].append({"name": config_name(*config), "error": message})
            print(f"{config_name(*config)}: failed, {message.splitlines()[0][:300]}", flush=True)
        else:
            record["results"].append(row)
            print(summary(row), flush=True)
        record["wall_s"] = round(time.perf_counter() - started, 1)
        write(record, path)


def main(argv: Optional[list[str]] = None) -> dict:
    started = time.perf_counter()
    args, settings = parse(argv)
    device = torch.device(args.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a CUDA build without a driver warns as it looks
        if device.type == "cuda" and not torch.cuda.is_available():
            sys.exit(f"gpu_step: no CUDA device (torch {torch.__version__}: torch.cuda.is_available() is False); run "
                     "it on a CUDA machine, or smoke-test it here with --device cpu --tiny")
    if device.type == "cpu":
        torch.set_num_threads(1)  # steady on a shared CPU, as step_overhead.py
    warnings.simplefilter("ignore")  # Lightning's advice on loader workers and log intervals, random teachers
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    # Cheap modes first: a run cut short loses the compiled configurations, not the rest.
    configs = [(p, b, m) for m in settings["modes"] for p in settings["pairs"] for b in settings["batches"]]
    shown = {**settings, "pairs": [":".join(names) for names in settings["pairs"]],
             "modes": [mode.name for mode in settings["modes"]]}
    record = {"benchmark": "gpu_step",
              "command": "python benchmarks/gpu_step.py " + " ".join(sys.argv[1:] if argv is None else argv),
              **environment(device), "settings": shown, "planned": [config_name(*config) for config in configs],
              "results": [], "failed": [], "skipped": [], "finished": False}
    run_all(configs, settings, device, record, args.output, started)
    record.update(finished=True, wall_s=round(time.perf_counter() - started, 1))
    write(record, args.output)
    print(f"wrote {args.output}: {len(record['results'])} configurations measured, {len(record['failed'])} failed, "
          f"{len(record['skipped'])} skipped, {record['wall_s']} s")
    return record


if __name__ == "__main__":
    main()
