"""Teachers by URL and by short name (issue 21): a URL is downloaded once into the torch hub cache and checked
against ``teacher_sha256``; ``repdistiller:<arch>`` names RepDistiller's published CIFAR-100 teachers; a missing
local teacher is one line naming the config that trains it. Nothing is downloaded from a network here."""
from __future__ import annotations

import os

import pytest
import torch

from conftest import state_hash
from lightning_kd.cli import _names_recorded_teacher, main
from lightning_kd.core import REPDISTILLER_TEACHERS, TeacherSource, file_sha256, teacher_url
from lightning_kd.core.hub import cache_path
from lightning_kd.methods import KD
from lightning_kd.models import ZOO, get_model


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub cache under ``tmp_path``; ``hub.downloads`` lists every URL fetched."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    real = torch.hub.download_url_to_file
    downloads = []

    def counted(url, dst, *args, **kwargs):
        downloads.append(url)
        return real(url, dst, *args, **kwargs)

    monkeypatch.setattr(torch.hub, "download_url_to_file", counted)
    return downloads


def community_checkpoint(path, arch: str, num_classes: int, seed: int = 0) -> torch.nn.Module:
    """Write ``arch``'s weights at ``path`` as RepDistiller saves a teacher; return the network."""
    torch.manual_seed(seed)
    network = get_model(arch, num_classes)
    torch.save({"epoch": 240, "model": network.state_dict(), "accuracy": 72.34, "optimizer": {"state": {}}}, path)
    return network


def kd(teacher_ckpt, teacher="resnet8", num_classes=4, **kwargs) -> KD:
    return KD(student="resnet8", teacher=teacher, teacher_ckpt=teacher_ckpt, num_classes=num_classes, **kwargs)


def test_a_url_is_downloaded_once_into_the_hub_cache_and_recorded(tmp_path, hub):
    reference = community_checkpoint(tmp_path / "teacher.pth", "resnet8", 4)
    url, sha256 = (tmp_path / "teacher.pth").as_uri(), file_sha256(tmp_path / "teacher.pth")
    first = kd(url, teacher_sha256=sha256[:12].upper())
    cached = cache_path(url)
    assert cached.startswith(str(tmp_path / "torch" / "hub" / "checkpoints")) and cached.endswith("_teacher.pth")
    assert first.teacher_source == TeacherSource(cached, sha256, 240, None, url)
    assert state_hash(first.teacher) == state_hash(reference) and url in first.teacher_source.describe()
    second = kd(url, teacher_sha256=sha256)  # a later run reads the cached file
    assert hub == [url] and second.teacher_source == first.teacher_source
    checkpoint = {}
    second.on_save_checkpoint(checkpoint)
    assert TeacherSource(**checkpoint["teacher_source"]) == first.teacher_source


def test_a_sha256_mismatch_is_one_error_and_never_cached(tmp_path, hub):
    community_checkpoint(tmp_path / "teacher.pth", "resnet8", 4)
    url, sha256 = (tmp_path / "teacher.pth").as_uri(), file_sha256(tmp_path / "teacher.pth")
    with pytest.raises(ValueError, match=f"The download of {url} has sha256 {sha256}, expected 00000000…"):
        kd(url, teacher_sha256="0" * 8)
    assert os.listdir(tmp_path / "torch" / "hub" / "checkpoints") == []  # nothing partial or wrong left
    kd(url)  # cached without a check; a later expectation is checked on the cached file
    with pytest.raises(ValueError, match=r"cached download of .*: delete it to download again\) has sha256"):
        kd(url, teacher_sha256="f" * 64)
    with pytest.raises(ValueError, match=f"Teacher checkpoint '{tmp_path / 'teacher.pth'}' has sha256 {sha256}"):
        kd(str(tmp_path / "teacher.pth"), teacher_sha256="abcdef12")  # a local file is checked too
    with pytest.raises(ValueError, match="teacher_sha256 must be a sha256 hex digest"):
        kd(url, teacher_sha256="not-hex")
    with pytest.raises(OSError, match=f"Could not download the teacher checkpoint {url}x"):
        kd(url + "x")


def test_repdistiller_short_names_map_to_its_published_teachers(tmp_path, hub, monkeypatch):
    assert set(REPDISTILLER_TEACHERS) == {"wrn_40_2", "resnet56", "resnet110", "resnet32x4", "vgg13", "ResNet50"}
    for arch, url in REPDISTILLER_TEACHERS.items():
        assert arch in ZOO and teacher_url(f"repdistiller:{arch}") == url
        assert url == f"http://shape2prog.csail.mit.edu/repo/{arch}_vanilla/ckpt_epoch_240.pth"
    with pytest.raises(ValueError, match=r"holds a resnet56 but model.teacher is 'resnet20': set model.teacher"):
        kd("repdistiller:resnet56", teacher="resnet20", num_classes=100)
    with pytest.raises(ValueError, match=r"repdistiller publishes no teacher 'resnet20'; it has repdistiller:wrn_40_2"):
        kd("repdistiller:resnet20", teacher="resnet20", num_classes=100)
    assert hub == []  # refused before any download

    served = community_checkpoint(tmp_path / "served.pth", "resnet56", 100)
    monkeypatch.setattr(torch.hub, "download_url_to_file",  # the release, served from a local file
                        lambda url, dst, **kwargs: hub.append(url) or os.link(tmp_path / "served.pth", dst))
    model = kd("repdistiller:resnet56", teacher="resnet56", num_classes=100)
    assert hub == [REPDISTILLER_TEACHERS["resnet56"]] and model.teacher_source.url == hub[0]
    assert state_hash(model.teacher) == state_hash(served)
    recorded = {"url": hub[0], "sha256": model.teacher_source.sha256}  # a resume never downloads it again
    assert _names_recorded_teacher("repdistiller:resnet56", recorded) and _names_recorded_teacher(hub[0], recorded)
    assert not _names_recorded_teacher("repdistiller:resnet110", recorded)


def test_a_missing_teacher_is_one_line_naming_the_config_that_trains_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no runs/ here; the config is read from the shipped ones
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/cifar100/kd/resnet56-resnet20.yaml", "--trainer.accelerator=cpu"])
    assert str(exit_info.value.code) == (
        "lightning-kd: error: Teacher checkpoint not found: runs/cifar100/baseline/resnet56/checkpoints/last.ckpt; "
        "train the teacher first: lightning-kd fit --config configs/cifar100/baseline/resnet56.yaml "
        "(or use a published one: --model.init_args.teacher_ckpt repdistiller:resnet56)"
    )
    assert "Traceback" not in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/cifar10/kd/resnet56-resnet20.yaml", "--trainer.accelerator=cpu",
              "--model.init_args.teacher_ckpt=elsewhere/teacher.pth"])  # no config writes it, no 10-class release
    assert str(exit_info.value.code) == "lightning-kd: error: Teacher checkpoint not found: elsewhere/teacher.pth"
