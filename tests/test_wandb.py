"""W&B without a network: the offline fallback (the directory it names, checkpoints logged as artifacts), one config
per run, and lightning-kd without wandb installed (an optional extra)."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time

import pytest
import torch
import yaml

from conftest import REPO, data_args, trainer_args
from lightning_kd.cli import cli_main
from lightning_kd.models import get_model
from test_training import wandb_records

KD_CONFIG = os.path.join(REPO, "configs", "folder", "kd", "resnet20-resnet8.yaml")
WANDB_CONFIG = os.path.join(REPO, "configs", "logger", "wandb.yaml")


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "resnet20.pth"
    torch.save(get_model("resnet20", 4).state_dict(), path)
    return str(path)


@pytest.fixture(autouse=True)
def wandb_reads_this_tests_environment():
    """wandb reads its settings from the environment (WANDB_MODE, ...) once a process, at its first run: each test
    here sets its own, so wandb is torn down before and after each (and later tests in this process read theirs)."""
    import wandb

    wandb.teardown()
    yield
    wandb.teardown()


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


def logged_models(run_file: str, count: int) -> dict:
    """The checkpoint artifacts (type ``model``) of an offline run file by the checkpoint's file name, once ``count``
    are there (wandb's service process may still be writing the file on a loaded machine)."""
    deadline = time.monotonic() + 60
    while True:
        models = {json.loads(record.artifact.metadata)["original_filename"]: record.artifact
                  for record in wandb_records(run_file)
                  if record.WhichOneof("record_type") == "artifact" and record.artifact.type == "model"}
        if len(models) >= count or time.monotonic() > deadline:
            return models
        time.sleep(1)


def assert_checkpoints_logged(run_dir, checkpoint_dir) -> None:
    """The offline run in ``run_dir`` logged the best and the last checkpoint of ``checkpoint_dir`` as versions of its
    ``model-<run id>`` artifact (Lightning's WandbLogger, log_model=True; the best one aliased ``best``), which
    ``wandb sync`` uploads."""
    (run_file,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    run_id = run_file.rsplit("run-", 1)[1].removesuffix(".wandb")
    (best,) = glob.glob(str(checkpoint_dir / "best-epoch*.ckpt"))
    models = logged_models(run_file, 2)
    assert sorted(models) == sorted([os.path.basename(best), "last.ckpt"])
    assert "best" in models[os.path.basename(best)].aliases
    for name, artifact in models.items():
        assert artifact.name == f"model-{run_id}"
        (entry,) = artifact.manifest.contents
        assert entry.path == "model.ckpt" and entry.size == os.path.getsize(checkpoint_dir / name)


def test_offline_fallback_names_its_directory_and_logs_the_checkpoints_as_artifacts(
    tiny_folder, teacher_ckpt, tmp_path, monkeypatch, no_credentials, capsys
):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # no credentials, no mode: lightning-kd falls back to offline
    save_dir = tmp_path / "wandb_runs"
    log_model = "--trainer.logger.init_args.log_model=true"
    cli = fit_with_wandb(tiny_folder, teacher_ckpt, tmp_path / "run", save_dir, log_model)
    assert cli.trainer.global_step == 2
    assert os.environ.get("WANDB_MODE") is None  # wandb's mode="offline" for this run, not the process's environment
    message = capsys.readouterr().err
    assert f"logging offline to {save_dir / 'wandb'}." in message
    assert f"wandb sync {save_dir / 'wandb' / 'offline-run-*'}" in message
    assert "The checkpoints (log_model) are logged as artifacts of the offline run" in message
    assert_checkpoints_logged(save_dir, tmp_path / "run" / "checkpoints")


def test_an_offline_logger_asked_for_its_checkpoints_logs_them(tiny_folder, teacher_ckpt, tmp_path, no_credentials):
    """``offline: true`` with ``log_model``, which Lightning's WandbLogger alone refuses."""
    save_dir = tmp_path / "wandb_runs"
    fit_with_wandb(tiny_folder, teacher_ckpt, tmp_path / "run", save_dir, "--trainer.logger.init_args.offline=true",
                   "--trainer.logger.init_args.log_model=true")
    assert_checkpoints_logged(save_dir, tmp_path / "run" / "checkpoints")


WITHOUT_WANDB = """
import sys
sys.modules["wandb"] = None  # as if wandb were not installed: `import wandb` raises ImportError
from lightning_kd.cli import main
main()  # reads sys.argv, as the console script does
assert "wandb" not in [name.split(".")[0] for name, module in sys.modules.items() if module is not None]
"""


def run_without_wandb(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_WANDB, *arguments], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": REPO})


def test_without_wandb_the_library_fits_and_the_wandb_logger_is_one_error_naming_the_extra(
    tiny_folder, teacher_ckpt, tmp_path
):
    fit = ["fit", f"--config={KD_CONFIG}", *data_args(tiny_folder, download=None), *trainer_args(tmp_path / "run"),
           f"--model.init_args.teacher_ckpt={teacher_ckpt}"]
    fitted = run_without_wandb(*fit)
    assert fitted.returncode == 0, fitted.stderr[-3000:]
    assert glob.glob(str(tmp_path / "run" / "checkpoints" / "last.ckpt"))
    asked = run_without_wandb(*fit, f"--config={WANDB_CONFIG}", f"--trainer.logger.init_args.save_dir={tmp_path}")
    assert asked.returncode == 1 and "Traceback" not in asked.stderr
    assert asked.stderr.strip().splitlines()[-1] == (
        "lightning-kd: error: trainer.logger is a W&B logger (WandbLogger, e.g. configs/logger/wandb.yaml) but wandb "
        'is not installed: pip install "lightning-kd[wandb]"'
    )


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
