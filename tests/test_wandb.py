"""W&B without a network: the offline fallback (log_model, the directory it names) and one config per run."""
from __future__ import annotations

import glob
import os

import pytest
import torch
import yaml

from conftest import REPO, data_args, trainer_args
from lightning_kd.cli import cli_main
from lightning_kd.models import get_model

KD_CONFIG = os.path.join(REPO, "configs", "folder", "kd", "resnet20-resnet8.yaml")
WANDB_CONFIG = os.path.join(REPO, "configs", "logger", "wandb.yaml")


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "resnet20.pth"
    torch.save(get_model("resnet20", 4).state_dict(), path)
    return str(path)


@pytest.fixture
def no_credentials(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc


def fit_with_wandb(root, teacher_ckpt, workdir, save_dir, *extra):
    cli = cli_main(
        ["fit", f"--config={KD_CONFIG}", f"--config={WANDB_CONFIG}", *data_args(root, download=None),
         *trainer_args(workdir, logger=True), f"--model.init_args.teacher_ckpt={teacher_ckpt}",
         f"--trainer.logger.init_args.save_dir={save_dir}", *extra]
    )
    cli.trainer.logger.experiment.finish()
    return cli


def test_offline_fallback_turns_log_model_off_and_names_the_directory_it_writes(
    tiny_folder, teacher_ckpt, tmp_path, monkeypatch, no_credentials, capsys
):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # no credentials, no mode: lightning-kd falls back to offline
    save_dir = tmp_path / "wandb_runs"
    log_model = "--trainer.logger.init_args.log_model=true"
    cli = fit_with_wandb(tiny_folder, teacher_ckpt, tmp_path / "run", save_dir, log_model)
    assert cli.trainer.global_step == 2
    message = capsys.readouterr().err
    assert f"logging offline to {save_dir / 'wandb'}." in message
    assert f"wandb sync {save_dir / 'wandb' / 'offline-run-*'}" in message
    assert "log_model is off offline" in message
    assert len(glob.glob(str(save_dir / "wandb" / "offline-run-*" / "run-*.wandb"))) == 1


def test_every_wandb_run_keeps_its_own_config(tiny_folder, teacher_ckpt, tmp_path, monkeypatch, no_credentials):
    monkeypatch.setenv("WANDB_MODE", "offline")
    save_dir = tmp_path / "wandb_runs"
    runs = {}
    for kd_weight in (0.5, 0.7):
        cli = fit_with_wandb(
            tiny_folder, teacher_ckpt, tmp_path / f"kd{kd_weight}", save_dir, f"--model.init_args.kd_weight={kd_weight}"
        )
        runs[cli.trainer.logger.version] = kd_weight
    assert not os.path.exists(save_dir / "config.yaml")  # the file every run used to overwrite
    for run_id, kd_weight in runs.items():
        config = yaml.safe_load(open(save_dir / "lightning-kd" / run_id / "config.yaml"))
        assert config["model"]["init_args"]["kd_weight"] == kd_weight
        assert glob.glob(str(save_dir / "wandb" / f"offline-run-*-{run_id}"))  # the W&B run of that id


def test_the_shipped_sweep_runs_the_cli_with_a_trials_settings(tiny_folder, teacher_ckpt, tmp_path, monkeypatch):
    """What `wandb agent` runs for a trial of configs/sweeps/*.yaml — its command, ${args} as `--name=value` — is a
    valid lightning-kd command whose model and data take the trial's values."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    sweep = yaml.safe_load(open(os.path.join(REPO, "configs", "sweeps", "kd_temperature_weight.yaml")))
    assert sweep["command"][:3] == ["${env}", "lightning-kd", "fit"] and sweep["command"][-1] == "${args}"
    trial = {name: spec["values"][-1] if "values" in spec else spec["value"]
             for name, spec in sweep["parameters"].items()}
    trial["data.init_args.root"] = str(tiny_folder)
    arguments = [*sweep["command"][3:-1], *[f"--{name}={value}" for name, value in trial.items()]]
    monkeypatch.chdir(REPO)  # the command names the configs from the repository's root
    cli = cli_main([*arguments, f"--model.init_args.teacher_ckpt={teacher_ckpt}", "--data.init_args.num_workers=0",
                    f"--trainer.logger.init_args.save_dir={tmp_path}", f"--checkpoint.dirpath={tmp_path}/ckpt"],
                   run=False)
    assert cli.model.temperature == trial["model.init_args.temperature"]
    assert cli.model.kd_weight == trial["model.init_args.kd_weight"] and cli.model.ce_weight == 0.1
    assert sweep["metric"] == {"name": "val/acc1", "goal": "maximize"}
