"""The teacher-output cache (issue 22): a sweep over one teacher runs the teacher once.

A fill run and a read run train bit-identically and the read run never calls the teacher; against a run without the
cache the teacher's logits differ by their float16 rounding only; any change of teacher, data seed, augmentation or
training subset is another cache entry; a partial epoch or a tampered file is never read; every path the cache cannot
serve stops with one error; the top-k storage decodes as the hand computation says; and a three-temperature sweep
through the CLI runs the teacher in its first run only.
"""
from __future__ import annotations

import glob
import math
import os

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from conftest import REPO, data_args, state_hash, trainer_args
from lightning_kd.cli import cli_main
from lightning_kd.core import BlackBoxTeacher, DistillationModule, LogitCodec
from lightning_kd.data import ImageFolderDataModule
from lightning_kd.methods import AT, KD, UNIXKD, Baseline
from lightning_kd.models import get_model

CLASSES, BATCH = 4, 16  # tiny_folder: 4 classes x 16 training images, so 4 steps an epoch (read at 8x8: cheap)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, str]:
    """Two randomly initialised resnet8 teachers for 4 classes, saved as state_dicts."""
    directory = tmp_path_factory.mktemp("teachers")
    paths = {}
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        paths[name] = str(directory / f"teacher_{name}.pt")
        torch.save(get_model("resnet8", num_classes=CLASSES).state_dict(), paths[name])
    return paths


def folder_data(root: str, **overrides) -> ImageFolderDataModule:
    options = dict(image_size=8, batch_size=BATCH, num_workers=0, pin_memory=False, tensor_resident=True,
                   decode_cache=False, seed=0)
    return ImageFolderDataModule(root, **{**options, **overrides})


class Record(pl.Callback):
    """Every training step's loss, and the teacher's forward calls (a forward hook, the FLOP probe included)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.teacher_calls = 0

    def setup(self, trainer, pl_module, stage):
        pl_module.teacher.register_forward_hook(lambda *args: setattr(self, "teacher_calls", self.teacher_calls + 1))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def fit(model: DistillationModule, data: ImageFolderDataModule, workdir, epochs: int = 2, **trainer_options):
    """Fit ``model`` on ``data`` on the CPU, without validation; returns the :class:`Record` of the fit."""
    record = Record()
    pl.seed_everything(0)
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        default_root_dir=str(workdir), callbacks=[record], **trainer_options,
    )
    trainer.fit(model, datamodule=data)
    return record


def kd(teacher_ckpt: str, cache=None, method=KD, **options) -> DistillationModule:
    torch.manual_seed(0)
    return method(student="resnet8", teacher="resnet8", teacher_ckpt=teacher_ckpt, num_classes=CLASSES,
                  teacher_cache=None if cache is None else str(cache), kd_diagnostics=False, **options)


def entries(cache) -> list[str]:
    return sorted(glob.glob(os.path.join(str(cache), "*", "key.json")))


def test_a_filled_and_a_read_run_train_bit_identically_and_the_read_run_never_calls_the_teacher(
    tiny_folder, teachers, tmp_path
):
    cache = tmp_path / "cache"
    filling = kd(teachers["a"], cache)
    filled = fit(filling, folder_data(tiny_folder), tmp_path)
    assert filled.teacher_calls == 2 * 4 + 1  # 2 epochs of 4 steps, and the FLOP probe
    [entry] = entries(cache)
    assert sorted(os.listdir(os.path.dirname(entry))) == ["epoch_00000.pt", "epoch_00001.pt", "key.json"]

    reading = kd(teachers["a"], cache)
    read = fit(reading, folder_data(tiny_folder), tmp_path)
    assert read.teacher_calls == 0
    assert read.losses == filled.losses
    assert state_hash(reading.student) == state_hash(filling.student)
    assert reading.teacher_cost.images == 0  # the meter counts the teacher's forwards: none
    assert reading.teacher_cache.images_from_cache == filling.teacher_cost.images == 2 * 64


class KeepTeacherLogits(KD):
    """KD that keeps the teacher logits of every step."""

    def loss_terms(self, step):
        self.seen = [*getattr(self, "seen", []), step.teacher_logits]
        return super().loss_terms(step)


def test_with_and_without_the_cache_the_teacher_logits_differ_by_their_float16_rounding(
    tiny_folder, teachers, tmp_path
):
    plain = kd(teachers["a"], method=KeepTeacherLogits)
    without = fit(plain, folder_data(tiny_folder), tmp_path)
    cached = kd(teachers["a"], tmp_path / "cache", method=KeepTeacherLogits)
    filled = fit(cached, folder_data(tiny_folder), tmp_path)
    reread = kd(teachers["a"], tmp_path / "cache", method=KeepTeacherLogits)
    fit(reread, folder_data(tiny_folder), tmp_path)
    for exact, stored, read in zip(plain.seen, cached.seen, reread.seen):
        assert torch.equal(stored, exact.half().float())  # the same images, the logits rounded to float16
        assert torch.equal(read, stored)
    # The students drift apart by the rounding only: the same losses to within a few float16 roundings of the logits.
    assert without.losses[0] == pytest.approx(filled.losses[0], abs=1e-3)
    assert without.losses == pytest.approx(filled.losses, rel=1e-2)


@pytest.mark.parametrize(
    "change",
    [
        {"teacher": "b"},
        {"data": {"seed": 1}},
        {"data": {"mean": (0.5, 0.5, 0.5)}},
        {"data": {"std": (0.25, 0.25, 0.25)}},
        {"data": {"train_subset": "half"}},
    ],
    ids=["teacher_checkpoint", "data_seed", "augmentation_mean", "augmentation_std", "train_subset"],
)
def test_a_changed_teacher_data_seed_augmentation_or_subset_is_another_entry_never_a_stale_read(
    tiny_folder, teachers, tmp_path, change
):
    cache = tmp_path / "cache"
    fit(kd(teachers["a"], cache), folder_data(tiny_folder), tmp_path, epochs=1)
    options = dict(change.get("data", {}))
    if options.get("train_subset") == "half":
        subset = tmp_path / "subset.txt"
        names = sorted(os.path.relpath(path, os.path.join(tiny_folder, "train"))
                       for path in glob.glob(os.path.join(tiny_folder, "train", "*", "*.png")))
        subset.write_text("\n".join(names[::2]))
        options["train_subset"] = str(subset)
    record = fit(kd(teachers[change.get("teacher", "a")], cache), folder_data(tiny_folder, **options), tmp_path, 1)
    assert record.teacher_calls > 0
    assert len(entries(cache)) == 2


def test_an_epoch_the_teacher_did_not_see_whole_is_not_stored(tiny_folder, teachers, tmp_path):
    cache = tmp_path / "cache"
    with pytest.warns(UserWarning, match="epoch 0 did not go whole through the teacher"):
        fit(kd(teachers["a"], cache), folder_data(tiny_folder), tmp_path, epochs=1, limit_train_batches=2)
    [entry] = entries(cache)
    assert os.listdir(os.path.dirname(entry)) == ["key.json"]


def test_a_cache_file_of_another_key_is_not_read(tiny_folder, teachers, tmp_path):
    cache = tmp_path / "cache"
    fit(kd(teachers["a"], cache), folder_data(tiny_folder), tmp_path, epochs=1)
    path = os.path.join(os.path.dirname(entries(cache)[0]), "epoch_00000.pt")
    saved = torch.load(path, weights_only=True)
    torch.save({**saved, "key": saved["key"].replace('"seed": 0', '"seed": 7')}, path)
    with pytest.warns(UserWarning, match="holds another key"):
        record = fit(kd(teachers["a"], cache), folder_data(tiny_folder), tmp_path, epochs=1)
    assert record.teacher_calls > 0
    assert torch.load(path, weights_only=True)["key"] == saved["key"]  # filled again and replaced


class DropsCallbacks(KD):
    def configure_callbacks(self):
        return []


@pytest.mark.parametrize(
    "case, match",
    [
        ("per_sample_data", "must be tensor-resident"),
        ("feature_method", "reads the teacher's features"),
        ("black_box_teacher", "black box whose queries are counted"),
        ("mixed_inputs", "sends the teacher other inputs"),
        ("ddp", "one process only"),
        ("dropped_callback", "configure_callbacks must return"),
    ],
)
def test_what_the_cache_cannot_serve_stops_with_one_error(tiny_folder, teachers, tmp_path, monkeypatch, case, match):
    cache, data = str(tmp_path / "cache"), folder_data(tiny_folder)
    common = dict(student="resnet8", num_classes=CLASSES, teacher_cache=cache, kd_diagnostics=False)
    if case == "per_sample_data":
        data, model = folder_data(tiny_folder, tensor_resident=False), kd(teachers["a"], cache)
    elif case == "feature_method":
        model = AT(teacher="resnet8", teacher_ckpt=teachers["a"], **common)
    elif case == "black_box_teacher":
        model = KD(teacher=BlackBoxTeacher(get_model("resnet8", num_classes=CLASSES)), **common)
    elif case == "mixed_inputs":
        model = UNIXKD(teacher="resnet8", teacher_ckpt=teachers["a"], keep=8, **common)
    elif case == "ddp":
        monkeypatch.setattr(pl.Trainer, "world_size", property(lambda self: 2))
        model = kd(teachers["a"], cache)
    else:
        model = kd(teachers["a"], cache, method=DropsCallbacks)
    with pytest.raises(ValueError, match=match) as error:
        fit(model, data, tmp_path, epochs=1)
    assert str(error.value).startswith("model.teacher_cache")


def test_a_cache_without_a_teacher_or_a_topk_without_a_cache_is_refused(teachers, tmp_path):
    with pytest.raises(ValueError, match="Baseline has no teacher to cache"):
        Baseline(student="resnet8", num_classes=CLASSES, teacher_cache=str(tmp_path))
    with pytest.raises(ValueError, match="teacher_cache_topk is set but model.teacher_cache"):
        KD(student="resnet8", teacher="resnet8", num_classes=CLASSES, teacher_cache_topk=3)
    with pytest.raises(ValueError, match="teacher_cache_topk"):
        KD(student="resnet8", teacher="resnet8", num_classes=CLASSES, teacher_cache=str(tmp_path), teacher_cache_topk=0)


def test_top_k_storage_decodes_as_the_hand_computation():
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0, 2.0], [0.5, float("-inf"), 4.0, 1.5, -2.0]])
    codec = LogitCodec.choose(5, topk=2)
    stored = codec.encode(logits)
    assert stored["values"].dtype == torch.float16 and stored["indices"].tolist() == [[0, 4], [2, 3]]
    # The tail: the log of the mean of exp over the other three classes (exp(-inf) = 0 counts as a class).
    tail = [math.log((math.exp(1) + math.exp(0) + math.exp(-1)) / 3), math.log((math.exp(0.5) + math.exp(-2)) / 3)]
    expected = torch.tensor([[3.0, tail[0], tail[0], tail[0], 2.0], [tail[1], tail[1], 4.0, 1.5, tail[1]]])
    decoded = codec.decode(stored)
    assert torch.equal(decoded, expected.half().float())
    # At temperature 1 the top-k classes keep their probabilities (up to float16 rounding of the stored values).
    kept = F.softmax(decoded, -1).gather(1, stored["indices"].long())
    assert torch.allclose(kept, F.softmax(logits, -1).gather(1, stored["indices"].long()), atol=2e-3)
    assert LogitCodec.choose(100, None).topk is None and LogitCodec.choose(1000, None).topk == 10
    assert LogitCodec.choose(5, 5).topk is None  # k >= K: every class


def test_a_temperature_sweep_through_the_cli_runs_the_teacher_in_its_first_run_only(
    tiny_folder, teachers, tmp_path, monkeypatch
):
    calls = []
    forward = DistillationModule.teacher_forward

    def counted(self, x):
        if self.trainer.training:
            calls[-1] += 1
        return forward(self, x)

    monkeypatch.setattr(DistillationModule, "teacher_forward", counted)
    torch.save(get_model("resnet20", num_classes=CLASSES).state_dict(), tmp_path / "resnet20.pt")
    images = []
    for temperature in (2.0, 4.0, 8.0):
        calls.append(0)
        workdir = tmp_path / f"t{temperature:g}"
        cli = cli_main([
            "fit", f"--config={REPO}/configs/folder/kd/resnet20-resnet8.yaml", *trainer_args(workdir, steps=4),
            *data_args(tiny_folder, batch_size=BATCH, download=None), "--data.tensor_resident=true",
            "--data.image_size=8", f"--model.init_args.teacher_ckpt={tmp_path / 'resnet20.pt'}",
            f"--model.init_args.temperature={temperature}",
            f"--model.init_args.teacher_cache={tmp_path / 'cache'}", "--model.init_args.kd_diagnostics=false",
        ])
        metrics = cli.trainer.callback_metrics
        images.append((int(metrics["teacher/images"]), int(metrics["teacher/images_from_cache"])))
    assert calls == [4, 0, 0]
    assert images == [(64, 0), (0, 64), (0, 64)]
