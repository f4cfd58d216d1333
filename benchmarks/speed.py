"""How close lightning_kd runs to the floor on this machine; every figure a ratio measured inside one run.

    python benchmarks/speed.py --data /path/to/cifar10-jpeg [--readme README.md] [--teacher resnet56]
                               [--student resnet20] [--batch 64] [--workers 0] [--threads 1] ...
    python benchmarks/speed.py --figures 2 --methods CRD AB ... [--crd_samples 50000] [--crd_negatives 16384]

1. data pipeline: images/s of training batches delivered and finished (cropped, flipped, normalised) by an
   ImageFolderDataModule, tensor-resident (decoded once, augmented per batch) vs per-sample torchvision
   transforms, with the same DataLoader workers; the one-off decoding is reported apart.
2. step overhead: per method, ``training_step`` + backward + SGD step over the floor: the cross-entropy
   training step of the networks it trains (the student; DML: every peer) plus the no-grad forward of what
   it runs without gradients (the teacher, unless the timed stage runs none; CS-KD: the student on the
   partners), same networks and batch. Staged methods are timed in a named stage (``STAGES``); CRD gets its
   labels and ``index`` field without a Trainer (``crd_labels``). For the methods that train heads of their
   own (``REPORT_METHODS``: CRD, ReviewKD, OFD) the ratio is reported without a target, with where the time
   goes: the step's phases next to the floor's and torch.profiler's operators beyond the floor.
3. Lightning overhead: ``Trainer.fit`` of KD for N steps vs a plain PyTorch loop doing the same math
   (teacher under no_grad, (1-a)·CE + a·KD, SGD, the same scheduler) on the same batches.
4. peak memory: CPU bytes allocated at the peak of a KD step vs the student's own (Baseline) step, from
   torch.profiler's memory events (parameters and optimizer state excluded: they exist before the step).

The two sides of every ratio alternate repetition by repetition, so a busy machine slows both alike; the
medians are reported. ``--figures 2`` runs only the step overhead (no ``--data`` needed). Prints one JSON
record; ``--readme`` rewrites the table between the ``speed-benchmark`` markers of that file.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import warnings
from typing import Callable, Optional

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader, TensorDataset

from lightning_kd.core import DistillationModule, cifar_multistep, cifar_sgd
from lightning_kd.core.module import split_batch
from lightning_kd.data import ImageFolderDataModule
from lightning_kd.methods import (
    AB, AT, BYOT, CC, CRD, CSKD, DIST, DKD, DML, FSP, FT, KD, MSD, NST, OFD, PKT, RKD, SP, UNIXKD, VID,
    ActiveMixup, Baseline, ContrastSampler, FitNet, LabelSmoothing, LogitStandardization, ReviewKD, TfKDReg,
    TfKDSelf, kd_loss,
)
from lightning_kd.models import get_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from feature_overhead import calibrated_teacher  # noqa: E402  (a sibling script, not a package)

MARKERS = ("<!-- speed-benchmark:start -->", "<!-- speed-benchmark:end -->")
TARGETS = {"data_speedup_min": 5.0, "logit_step_max": 1.05, "feature_step_max": 1.15, "lightning_max": 1.05}
FEATURE_METHODS = {"AT", "SP", "FSP", "BYOT", "MSD", "FitNet", "NST", "PKT", "RKD", "CC", "VID", "AB stage 1",
                   "AB stage 2", "FT"}
# Methods that train heads of their own beyond the networks: their ratio is reported, without a target, with
# where the time goes (``where_time_goes``).
REPORT_METHODS = {"CRD", "ReviewKD", "OFD"}
# The stage each staged method is timed in. Outside a fit ``DistillationModule.stage`` is the stage of epoch 0
# (``current_epoch`` is 0 without a Trainer), so a case selects its stage by its arguments (a first stage of 0
# epochs, or the default lengths for stage 1), and ``build_method`` checks that ``module.stage`` is this one.
STAGES = {
    "FitNet": "distill",     # RepDistiller's FitNet: hint_epochs 0, the distill stage is the whole run
    "AB stage 1": "ab",      # 30 epochs: connectors + student on the AB loss alone, teacher runs
    "AB stage 2": "task",    # the other 210 of 240: CE alone, no teacher (Stage(teacher=False) as kd_weight 0)
    "FT": "distill",         # 210 of 240 epochs: translator + student on CE + β·FT, frozen paraphraser
}


def seconds(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


# --- 1. data pipeline ---------------------------------------------------------------------------
def data_pipeline(root: str, batch: int, batches: int, workers: int, repeats: int) -> dict:
    """Images/s of ``batches`` training batches, finished as Lightning would (``transform_batch``)."""
    modules = {
        mode: ImageFolderDataModule(root, batch_size=batch, num_workers=workers, pin_memory=False,
                                    tensor_resident=mode == "tensor_resident")
        for mode in ("tensor_resident", "per_sample")
    }
    decode_s = seconds(lambda: modules["tensor_resident"].setup("fit"))
    modules["per_sample"].setup("fit")
    decoded = len(modules["tensor_resident"].train_dataset) + len(modules["tensor_resident"].test_dataset)
    loaders = {mode: module.train_dataloader() for mode, module in modules.items()}

    def epoch_part(mode: str) -> float:
        images, start = 0, time.perf_counter()
        for index, delivered in enumerate(loaders[mode]):
            _finished, targets = modules[mode].transform_batch(delivered, augment=True)
            images += len(targets)
            if index + 1 == batches:
                break
        return images / (time.perf_counter() - start)

    rates = {mode: [] for mode in loaders}
    for repeat in range(repeats + 1):  # the first round warms up (worker start, caches) and is dropped
        for mode in loaders:
            rate = epoch_part(mode)
            if repeat:
                rates[mode].append(rate)
    median = {mode: statistics.median(values) for mode, values in rates.items()}
    return {
        "root": root,
        "train_images": len(modules["per_sample"].train_dataset),
        "batches": batches,
        "batch": batch,
        "workers": workers,
        "images_per_s": {mode: round(value) for mode, value in median.items()},
        "speedup": round(median["tensor_resident"] / median["per_sample"], 2),
        "decode_once_s": round(decode_s, 2),
        "decode_images_per_s": round(decoded / decode_s),
    }


# --- 2. step overhead ---------------------------------------------------------------------------
def method_cases(teacher: str, student: str, num_samples: int = 50000,
                 num_negatives: int = 16384) -> dict[str, tuple[type, dict]]:
    """Every method an ordinary (or class-paired, or soft-labelled, or indexed) batch drives, with its arguments
    (the defaults, RepDistiller's settings; CRD: ``num_samples`` training samples, CIFAR's 50000, and N =
    ``num_negatives`` negatives, RepDistiller's 16384; ReviewKD: the authors' λ 0.6 for resnet56 → resnet20)."""
    with_teacher = {"teacher": teacher}
    return {
        "Baseline": (Baseline, {}),
        "KD": (KD, with_teacher),
        "LabelSmoothing": (LabelSmoothing, {}),
        "TfKDSelf": (TfKDSelf, {"teacher": student}),
        "TfKDReg": (TfKDReg, {}),
        "CSKD": (CSKD, {}),
        "DML": (DML, {"peers": [student]}),
        "UNIXKD": (UNIXKD, with_teacher),
        "ActiveMixup": (ActiveMixup, with_teacher),
        "AT": (AT, with_teacher),
        "SP": (SP, with_teacher),
        "FSP": (FSP, {**with_teacher, "schedule": "joint"}),
        "BYOT": (BYOT, {}),
        "MSD": (MSD, {}),
        "FitNet": (FitNet, with_teacher),
        "NST": (NST, with_teacher),
        "PKT": (PKT, with_teacher),
        "RKD": (RKD, with_teacher),
        "CC": (CC, with_teacher),
        "VID": (VID, with_teacher),
        "CRD": (CRD, {**with_teacher, "num_samples": num_samples, "num_negatives": num_negatives}),
        "AB stage 1": (AB, with_teacher),
        "AB stage 2": (AB, {**with_teacher, "stage1_epochs": 0}),
        "FT": (FT, {**with_teacher, "paraphrase_epochs": 0}),
        "OFD": (OFD, with_teacher),
        "ReviewKD": (ReviewKD, {**with_teacher, "beta": 0.6}),
        "DKD": (DKD, with_teacher),
        "DIST": (DIST, with_teacher),
        "LogitStandardization": (LogitStandardization, with_teacher),
    }


def select_cases(cases: dict, names: Optional[list[str]]) -> list[str]:
    """The case names ``names`` asks for, in ``cases``' order; a staged method's name (``AB``) selects every stage
    row of it (``AB stage 1``, ``AB stage 2``)."""
    if not names:
        return list(cases)
    wanted = set()
    for name in names:
        rows = [case for case in cases if case == name or case.startswith(f"{name} stage ")]
        if not rows:
            raise ValueError(f"no step-overhead case {name!r}; known: {', '.join(cases)}")
        wanted.update(rows)
    return [case for case in cases if case in wanted]


def crd_labels(num_samples: int, num_classes: int) -> torch.Tensor:
    """Balanced training labels, sample i of class i mod K (CIFAR-100: 500 per class), for CRD's sampler."""
    return torch.arange(num_samples) % num_classes


def build_method(method: type, kwargs: dict, student: str, num_classes: int,
                 teachers: dict[str, nn.Module], name: Optional[str] = None) -> DistillationModule:
    """The method on the same (seeded) student and a copy of the calibrated teacher it names in ``kwargs``, in
    the stage ``STAGES`` names for case ``name``, ready for ``setup("fit")`` without a Trainer.

    CRD builds its sampler in ``setup("fit")`` from ``trainer.datamodule``'s training labels unless its ``sampler``
    is already set: here it is set beforehand, from :func:`crd_labels`, as ``CRD.setup`` would build it."""
    torch.manual_seed(0)
    kwargs = dict(kwargs)
    if "teacher" in kwargs:
        kwargs["teacher"] = copy.deepcopy(teachers[kwargs["teacher"]])
    module = method(student=get_model(student, num_classes), num_classes=num_classes, **kwargs)
    if isinstance(module, CRD):
        labels = crd_labels(module.num_samples, num_classes) if module.negatives == "other_classes" else None
        labels = torch.zeros(module.num_samples, dtype=torch.long) if labels is None else labels
        module.sampler = ContrastSampler(labels, module.num_negatives, negatives=module.negatives)
    if name in STAGES and module.stage.name != STAGES[name]:
        raise ValueError(f"{name} is timed in stage {STAGES[name]!r}, but its arguments give {module.stage.name!r}")
    return module


class Floor:
    """The floor of a method's step: CE training of the networks it trains, no-grad forward of the others."""

    def __init__(self, module: DistillationModule, name: str) -> None:
        trained = [module.student, *getattr(module, "peers", [])]
        self.trained = nn.ModuleList(copy.deepcopy(network) for network in trained).train()
        runs_teacher = module.teacher is not None and module.needs_teacher_forward()
        self.frozen = copy.deepcopy(module.teacher).eval() if runs_teacher else None
        if name == "CSKD":  # the partners' forward, without gradients, by the student itself
            self.frozen = self.trained[0]
        self.paired = name == "CSKD"
        self.optimizer = cifar_sgd(self.trained.parameters())

    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """One step; the seconds of its phases (forward: no-grad forward, trained forward and CE)."""
        clock = [time.perf_counter()]
        self.optimizer.zero_grad(set_to_none=True)
        frozen_x = x
        if self.paired:
            half = len(x) // 2
            x, y, frozen_x = x[:half], y[:half], x[half:]
        if self.frozen is not None:
            with torch.no_grad():
                self.frozen(frozen_x)
        loss = sum(F.cross_entropy(network(x), y) for network in self.trained)
        clock.append(time.perf_counter())
        loss.backward()
        clock.append(time.perf_counter())
        self.optimizer.step()
        clock.append(time.perf_counter())
        return dict(zip(("forward", "backward", "optimizer_step"), (b - a for a, b in zip(clock, clock[1:]))))


def method_step(module: DistillationModule, optimizer: torch.optim.Optimizer, batch, index: int) -> None:
    optimizer.zero_grad(set_to_none=True)
    module.training_step(batch, index).backward()
    optimizer.step()


def method_phases(module: DistillationModule, optimizer: torch.optim.Optimizer, batch) -> dict[str, float]:
    """One step as ``training_step`` runs it, without its logging, and the seconds of each phase (``loss_terms``:
    the method's heads and losses, e.g. CRD's sampling, embeddings and memory banks)."""
    x, y, fields = split_batch(batch)
    clock = [time.perf_counter()]
    optimizer.zero_grad(set_to_none=True)
    step = module.forward_step(x, y, fields)
    clock.append(time.perf_counter())
    loss = torch.stack(list(module.loss_terms(step.float()).values())).sum()
    clock.append(time.perf_counter())
    loss.backward()
    clock.append(time.perf_counter())
    optimizer.step()
    clock.append(time.perf_counter())
    names = ("forward_step", "loss_terms", "backward", "optimizer_step")
    return dict(zip(names, (b - a for a, b in zip(clock, clock[1:]))))


def method_optimizer(module: DistillationModule) -> torch.optim.Optimizer:
    """SGD over what ``configure_optimizers`` would optimise in the module's stage: everything but the teacher
    (and what the stage leaves out: AB's connectors after stage 1, FT's paraphraser after its own)."""
    return cifar_sgd(module.trainable_parameters(module.stage))


def method_batch(name: str, batch: int, num_classes: int, num_samples: Optional[int] = None) -> tuple:
    """An ordinary batch; CS-KD's is class-paired (same size), Active Mixup's has the teacher's soft labels, CRD's
    is ``(x, y, {"index": positions})``: distinct positions among ``num_samples``, labelled as :func:`crd_labels`."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 32, 32, generator=generator)
    y = torch.randint(0, num_classes, (batch,), generator=generator)
    if name == "CSKD":
        y = torch.cat([y[: batch // 2], y[: batch // 2]])
    if name == "ActiveMixup":
        y = torch.randn(batch, num_classes, generator=generator).softmax(dim=-1)
    if name == "CRD":
        index = torch.randperm(num_samples, generator=generator)[:batch]
        return x, crd_labels(num_samples, num_classes)[index], {"index": index}
    return x, y


def where_time_goes(module: DistillationModule, optimizer: torch.optim.Optimizer, floor: "Floor", batch,
                    steps: int, top: int = 6) -> dict:
    """Where a method's step spends the time beyond its floor, from ``steps`` more steps of each (interleaved):
    the median seconds of each phase (method: ``forward_step`` — the networks, hooks —, ``loss_terms`` — the
    method's heads and losses —, ``backward``, ``optimizer_step``; floor: ``forward``, ``backward``,
    ``optimizer_step``), then torch.profiler's self CPU time per step of every operator, the method's minus
    the floor's, the ``top`` largest (backward operators included: ``…Backward0``'s work shows as its kernels)."""
    x, y = batch[0], batch[1]
    phases = {"method": [], "floor": []}
    for _ in range(steps):
        phases["method"].append(method_phases(module, optimizer, batch))
        phases["floor"].append(floor.step(x, y))
    per_op = {}
    sides = {"method": lambda: method_phases(module, optimizer, batch), "floor": lambda: floor.step(x, y)}
    for side, step in sides.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
        per_op[side] = {e.key: e.self_cpu_time_total / 1000 / steps for e in prof.key_averages()}
    beyond = {op: ms - per_op["floor"].get(op, 0.0) for op, ms in per_op["method"].items()}
    median_ms = {
        side: {phase: round(1000 * statistics.median(run[phase] for run in runs), 1) for phase in runs[0]}
        for side, runs in phases.items()
    }
    student = {id(p) for p in module.student.parameters()}
    heads = sum(p.numel() for group in optimizer.param_groups for p in group["params"] if id(p) not in student)
    return {
        "head_parameters": heads,
        "student_parameters": sum(p.numel() for p in module.student.parameters()),
        "phases_ms": median_ms,
        "operators_beyond_floor_ms": {op: round(ms, 1) for op, ms in sorted(beyond.items(), key=lambda i: -i[1])[:top]
                                      if ms > 0},
        "profiled_steps": steps,
    }


def step_overhead(teacher: str, student: str, num_classes: int, batch: int, warmup: int, steps: int,
                  methods: Optional[list[str]] = None, num_samples: int = 50000, num_negatives: int = 16384,
                  profile_steps: int = 3) -> dict:
    teachers = {name: calibrated_teacher(name, num_classes, batch) for name in {teacher, student}}
    cases = method_cases(teacher, student, num_samples, num_negatives)
    runs = {}
    for name in select_cases(cases, methods):
        method, kwargs = cases[name]
        module = build_method(method, kwargs, student, num_classes, teachers, name)
        floor = Floor(module, name)
        module.setup("fit")
        module.train()
        runs[name] = (module, method_optimizer(module), floor, method_batch(name, batch, num_classes, num_samples))
    times = {name: {"method": [], "floor": []} for name in runs}
    for round_index in range(warmup + steps):
        for name, (module, optimizer, floor, data) in runs.items():
            method_s = seconds(lambda: method_step(module, optimizer, data, round_index))
            floor_s = seconds(lambda: floor.step(data[0], data[1]))
            if round_index >= warmup:
                times[name]["method"].append(method_s)
                times[name]["floor"].append(floor_s)
    ratios, step_ms = {}, {}
    for name, measured in times.items():
        method_s, floor_s = statistics.median(measured["method"]), statistics.median(measured["floor"])
        ratios[name] = round(method_s / floor_s, 3)
        step_ms[name] = {"method": round(1000 * method_s, 1), "floor": round(1000 * floor_s, 1)}
    record = {"teacher": teacher, "student": student, "batch": batch, "warmup": warmup, "steps": steps,
              "ratio": ratios, "median_step_ms": step_ms,
              "stages": {name: STAGES[name] for name in runs if name in STAGES}}
    if "CRD" in runs:
        record["crd"] = {"num_samples": num_samples, "num_negatives": num_negatives}
    profiled = [name for name in runs if name in REPORT_METHODS]
    if profiled and profile_steps > 0:
        record["where_time_goes"] = {}
        for name in profiled:
            module, optimizer, floor, data = runs[name]
            record["where_time_goes"][name] = where_time_goes(module, optimizer, floor, data, profile_steps)
    return record


# --- 3. Lightning overhead ----------------------------------------------------------------------
def lightning_overhead(teacher: str, student: str, num_classes: int, batch: int, steps: int, repeats: int) -> dict:
    generator = torch.Generator().manual_seed(2)
    data = TensorDataset(torch.randn(steps * batch, 3, 32, 32, generator=generator),
                         torch.randint(0, num_classes, (steps * batch,), generator=generator))
    teacher_net = calibrated_teacher(teacher, num_classes, batch)
    temperature, ce_weight, kd_weight = 4.0, 0.1, 0.9

    def lightning_fit() -> None:
        torch.manual_seed(0)
        module = KD(student=student, teacher=copy.deepcopy(teacher_net), num_classes=num_classes,
                    temperature=temperature, ce_weight=ce_weight, kd_weight=kd_weight)
        trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             limit_val_batches=0, num_sanity_val_steps=0,
                             default_root_dir=tempfile.mkdtemp(prefix="speed_"))
        trainer.fit(module, DataLoader(data, batch_size=batch))

    def plain_loop() -> None:
        torch.manual_seed(0)
        network, frozen = get_model(student, num_classes), copy.deepcopy(teacher_net).eval()
        optimizer = cifar_sgd(network.parameters())
        scheduler = cifar_multistep(optimizer)
        network.train()
        for x, y in DataLoader(data, batch_size=batch):
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                teacher_logits = frozen(x)
            logits = network(x)
            loss = ce_weight * F.cross_entropy(logits, y) + kd_weight * kd_loss(logits, teacher_logits, temperature)
            loss.backward()
            optimizer.step()
        scheduler.step()

    times = {"lightning": [], "plain": []}
    for _ in range(repeats):
        times["lightning"].append(seconds(lightning_fit))
        times["plain"].append(seconds(plain_loop))
    median = {side: statistics.median(values) for side, values in times.items()}
    return {"teacher": teacher, "student": student, "batch": batch, "steps": steps, "repeats": repeats,
            "median_s": {side: round(value, 3) for side, value in median.items()},
            "ratio": round(median["lightning"] / median["plain"], 3)}


# --- 4. peak memory -----------------------------------------------------------------------------
def peak_step_bytes(step: Callable[[], None]) -> int:
    """Bytes allocated on the CPU at the peak of one ``step`` beyond what existed before it (after a warm-up
    step, so gradients and optimizer state are counted as in training), from torch.profiler."""
    step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as trace:
            events = [e["args"] for e in json.load(trace)["traceEvents"] if e.get("name") == "[memory]"]
    before = events[0]["Total Allocated"] - events[0]["Bytes"]
    return max(e["Total Allocated"] for e in events) - before


def peak_memory(teacher: str, student: str, num_classes: int, batch: int) -> dict:
    teachers = {teacher: calibrated_teacher(teacher, num_classes, batch)}
    x, y = method_batch("KD", batch, num_classes)
    peaks = {}
    for name, (method, kwargs) in {"student": (Baseline, {}), "KD": (KD, {"teacher": teacher})}.items():
        module = build_method(method, kwargs, student, num_classes, teachers)
        module.setup("fit")
        module.train()
        optimizer = method_optimizer(module)
        peaks[name] = peak_step_bytes(lambda: method_step(module, optimizer, (x, y), 0))
    return {"teacher": teacher, "student": student, "batch": batch,
            "peak_mib": {name: round(value / 2**20, 1) for name, value in peaks.items()},
            "ratio": round(peaks["KD"] / peaks["student"], 3)}


# --- the README table ---------------------------------------------------------------------------
def verdict(ok: bool) -> str:
    return "met" if ok else "missed"


def step_rows(steps: dict) -> list[tuple[str, str, str, str]]:
    """Figure 2's rows: (figure, measured, target, verdict); the methods with heads of their own are "report"."""
    rows = []
    for name, ratio in steps["ratio"].items():
        if name in REPORT_METHODS:
            rows.append((f"step / floor: {name}", f"{ratio}", "report", "—"))
            continue
        limit = TARGETS["feature_step_max" if name in FEATURE_METHODS else "logit_step_max"]
        rows.append((f"step / floor: {name}", f"{ratio}", f"≤ {limit}", verdict(ratio <= limit)))
    return rows


def readme_table(record: dict) -> str:
    """The table of the figures ``record`` holds."""
    setting = record["setting"]
    rows = []
    if "data_pipeline" in record:
        data = record["data_pipeline"]
        rows.append(("data pipeline: tensor-resident / per-sample images/s",
                     f"{data['speedup']}× ({data['images_per_s']['tensor_resident']} vs "
                     f"{data['images_per_s']['per_sample']} img/s, {data['workers']} workers)",
                     f"≥ {TARGETS['data_speedup_min']}×", verdict(data["speedup"] >= TARGETS["data_speedup_min"])))
    if "step_overhead" in record:
        rows.extend(step_rows(record["step_overhead"]))
    if "lightning_overhead" in record:
        lightning = record["lightning_overhead"]
        rows.append((f"Lightning `Trainer.fit` / plain loop, KD, {lightning['steps']} steps", f"{lightning['ratio']}",
                     f"≤ {TARGETS['lightning_max']}", verdict(lightning["ratio"] <= TARGETS["lightning_max"])))
    if "peak_memory" in record:
        memory = record["peak_memory"]
        rows.append(("peak memory: KD step / student step", f"{memory['ratio']}× ({memory['peak_mib']['KD']} vs "
                     f"{memory['peak_mib']['student']} MiB)", "—", "—"))
    lines = [
        f"Measured {record['date']} on {record['machine']} (torch {record['torch']}, {record['threads']} thread(s)), "
        f"{setting['teacher']} → {setting['student']}, batch {setting['batch']}:",
        "",
        "```bash",
        record["command"],
        "```",
        "",
        "| figure | measured | target | |",
        "|---|---|---|---|",
        *[f"| {' | '.join(row)} |" for row in rows],
    ]
    return "\n".join(lines)


def update_readme(path: str, table: str) -> None:
    """Put ``table`` between the markers; without markers, add them in a "## Speed" section before "## Layout"."""
    with open(path) as file:
        text = file.read()
    block = f"{MARKERS[0]}\n{table}\n{MARKERS[1]}"
    if MARKERS[0] in text and MARKERS[1] in text:
        pattern = re.escape(MARKERS[0]) + ".*?" + re.escape(MARKERS[1])
        text = re.sub(pattern, lambda _: block, text, count=1, flags=re.DOTALL)
    else:
        section = f"## Speed\n\n{block}\n\n"
        text = text.replace("## Layout", section + "## Layout", 1) if "\n## Layout" in text else f"{text}\n{section}"
    with open(path, "w") as file:
        file.write(text)


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="ImageFolder root of small images (train/ and test/ or val/); figure 1 needs it")
    parser.add_argument("--figures", nargs="*", type=int, choices=[1, 2, 3, 4], default=[1, 2, 3, 4],
                        help="the figures to run (default: all four)")
    parser.add_argument("--teacher", default="resnet56")
    parser.add_argument("--student", default="resnet20")
    parser.add_argument("--num_classes", type=int, default=100)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--data_batch", type=int, default=128)
    parser.add_argument("--data_batches", type=int, default=100, help="training batches per data-pipeline repetition")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of both data pipelines")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions of each side of figures 1 and 3")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="timed rounds of figure 2")
    parser.add_argument("--methods", nargs="*",
                        help="methods of figure 2 (default: all it can drive; AB: both of its stage rows)")
    parser.add_argument("--crd_samples", type=int, default=50000,
                        help="figure 2, CRD: training samples of its memory banks (CIFAR: 50000)")
    parser.add_argument("--crd_negatives", type=int, default=16384,
                        help="figure 2, CRD: negatives per sample (RepDistiller: 16384)")
    parser.add_argument("--profile_steps", type=int, default=3,
                        help="figure 2: steps profiled for where the time goes of CRD, ReviewKD, OFD (0: none)")
    parser.add_argument("--lightning_steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable on a shared CPU)")
    parser.add_argument("--readme", help="README whose speed-benchmark table to rewrite")
    args = parser.parse_args(argv)
    if 1 in args.figures and not args.data:
        parser.error("figure 1 (the data pipeline) needs --data; run the others alone with --figures 2 3 4")
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # random teachers without checkpoints, self.log outside a Trainer: intended
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)

    record = {
        "benchmark": "speed",
        "command": "python benchmarks/speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
        "load_average_at_start": [round(load, 2) for load in os.getloadavg()],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "targets": TARGETS,
        "setting": {"teacher": args.teacher, "student": args.student, "num_classes": args.num_classes,
                    "batch": args.batch},
    }
    if 1 in args.figures:
        record["data_pipeline"] = data_pipeline(args.data, args.data_batch, args.data_batches, args.workers,
                                                args.repeats)
    if 2 in args.figures:
        record["step_overhead"] = step_overhead(args.teacher, args.student, args.num_classes, args.batch,
                                                args.warmup, args.steps, args.methods, args.crd_samples,
                                                args.crd_negatives, args.profile_steps)
    if 3 in args.figures:
        record["lightning_overhead"] = lightning_overhead(args.teacher, args.student, args.num_classes, args.batch,
                                                          args.lightning_steps, args.repeats)
    if 4 in args.figures:
        record["peak_memory"] = peak_memory(args.teacher, args.student, args.num_classes, args.batch)
    record["load_average_at_end"] = [round(load, 2) for load in os.getloadavg()]
    print(json.dumps(record, indent=1))
    if args.readme:
        update_readme(args.readme, readme_table(record))
    return record


if __name__ == "__main__":
    main()
