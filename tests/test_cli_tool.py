"""The ``lightning-kd`` command as a tool: its version, an overview of every subcommand, the method catalog, and
the shipped configs, which travel in the wheel and are found from any working directory."""
from __future__ import annotations

import configparser
import glob
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
import yaml
from setuptools import find_packages

import lightning_kd
from conftest import REPO
from lightning_kd.catalog import configured_method, method_classes, methods, shipped_config_path, shipped_configs
from lightning_kd.cli import main, resolve_config_arguments, resolve_config_path

SUBCOMMANDS = ("fit", "validate", "test", "predict", "export", "demo", "methods")
FOLDER_KD = "configs/folder/kd/resnet20-resnet8.yaml"
# The methods that implement no single paper: the student alone, and the base class of the feature methods.
NOT_PAPERS = {"Baseline", "FeatureDistillation"}


def repository_configs() -> list[str]:
    return sorted(os.path.relpath(path, REPO).replace(os.sep, "/")
                  for path in glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True))


# --- --version -------------------------------------------------------------------------------------------------

def test_version_prints_the_installed_distributions_version(capsys):
    main(["--version"])
    assert capsys.readouterr().out == f"lightning-kd {importlib.metadata.version('lightning-kd')}\n"


def test_the_version_has_one_source_the_package_attribute():
    config = configparser.ConfigParser()
    config.read(os.path.join(REPO, "setup.cfg"))
    assert config["metadata"]["version"] == "attr: lightning_kd.__version__"
    assert importlib.metadata.version("lightning-kd") == lightning_kd.__version__


def test_the_console_script_prints_its_version_and_exits_0():
    script = shutil.which("lightning-kd", path=os.path.dirname(sys.executable)) or shutil.which("lightning-kd")
    assert script, "the lightning-kd console script is not installed"
    done = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"lightning-kd {lightning_kd.__version__}\n"


# --- the overview ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [[], ["-h"], ["--help"]], ids=["bare", "-h", "--help"])
def test_the_overview_lists_every_subcommand_with_its_purpose(argv, capsys):
    main(argv)
    out = capsys.readouterr().out
    assert out.startswith("usage: lightning-kd <subcommand>")
    for name in SUBCOMMANDS:
        assert re.search(rf"^  {name} +\S.*\.$", out, re.MULTILINE), f"{name} is not listed with a purpose:\n{out}"
    assert "lightning-kd <subcommand> --help" in out


def test_a_subcommands_help_is_still_lightnings_own(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["lightning-kd", "fit", "--help"])  # as the console script runs it
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--trainer.max_epochs" in out and "--ckpt_path" in out
    assert "The library's tools" not in out


@pytest.mark.parametrize("method", ["KD", "lightning_kd.methods.KD"])
def test_a_methods_help_shows_its_own_arguments_without_every_torch_module(method, monkeypatch, capsys):
    """``--model.help`` used to list every torch.nn.Module subclass (~1,500 lines) as the types ``student`` and
    ``teacher`` accept."""
    monkeypatch.setattr(sys, "argv", ["lightning-kd", "fit", "--model.help", method])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) < 200, out
    assert "--model.temperature" in out and "softening temperature" in out  # KD's own argument, with its docstring
    for network in ("student", "teacher"):  # each argument's entry: from its line to the next argument's
        described = out.split(f"\n  --model.{network} {network.upper()}\n", 1)[1].split("\n  --", 1)[0]
        assert "any torch.nn.Module: class_path and init_args" in " ".join(described.split())
    assert "torch.nn.Linear" not in out
    assert "torch.optim.AdamW" in out  # the lists jsonargparse gives for other arguments stay


# --- methods ---------------------------------------------------------------------------------------------------

def table_rows(out: str) -> dict[str, str]:
    return {line.split()[0]: line for line in out.splitlines()[1:] if line and not line.startswith("lightning-kd ")}


def test_methods_lists_every_method_class_with_its_paper_and_configs(capsys):
    main(["methods"])
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["METHOD", "CONFIGS", "PAPER"]
    rows = table_rows(out)
    assert set(rows) == set(method_classes()) and len(rows) >= 28
    assert 'Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (arXiv 1503.02531).' in rows["KD"]
    assert re.search(r"^KD +\d+: cifar10, cifar100, folder", rows["KD"])
    assert re.search(r"^FeatureDistillation +0 ", rows["FeatureDistillation"])  # no config, still listed


def test_every_method_but_the_baselines_cites_its_paper():
    for method in methods():
        if method.name not in NOT_PAPERS:
            citation = r'"[^"]+" \(.*(\b(19|20)\d\d\b|arXiv \d{4}\.\d{4,5})'  # "Title" (venue year / arXiv id)
            assert re.search(citation, method.paper), f"{method.name}: {method.paper!r}"


def test_every_shipped_config_that_names_a_model_is_listed_under_that_method():
    listed = [config for method in methods() for config in method.configs]
    assert len(listed) == len(set(listed))
    naming_a_model = [config for config in shipped_configs() if configured_method(shipped_config_path(config))]
    assert sorted(listed) == naming_a_model


def test_method_lists_one_methods_configs_in_full(capsys):
    main(["methods", "--method", "kd"])
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "KD"
    listed = re.findall(r"^    (configs/\S+)$", out, re.MULTILINE)
    expected = [path for path in repository_configs()
                if yaml.safe_load(open(os.path.join(REPO, path))).get("model", {}).get("class_path")
                == "lightning_kd.methods.KD"]
    assert listed == expected and FOLDER_KD in listed


def test_an_unknown_method_is_one_error_naming_the_known_ones(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["methods", "--method", "Nope"])
    assert exit_info.value.code == 2
    assert "unknown method 'Nope'; known: AB, ActiveMixup, AT, Baseline," in capsys.readouterr().err


# --- configs: in the wheel, found from anywhere ----------------------------------------------------------------

def test_setup_cfg_lists_every_package_and_maps_the_configs():
    config = configparser.ConfigParser()
    config.read(os.path.join(REPO, "setup.cfg"))
    declared = config["options"]["packages"].split()
    assert sorted(declared) == sorted(find_packages(REPO, include=["lightning_kd*"]) + ["lightning_kd.configs"])
    assert config["options"]["package_dir"].split() == ["lightning_kd.configs", "=", "configs"]
    assert config["metadata"]["license_files"].strip() == "LICENSE"


def test_license_is_the_apache_2_text():
    text = open(os.path.join(REPO, "LICENSE")).read()
    assert "Apache License\n                           Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and len(text.splitlines()) == 202


def build_wheel(tmp_path) -> str:
    """A wheel built offline from a copy of the project's sources (the repository is left as it is)."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "MANIFEST.in", "README.md", "LICENSE", "CHANGELOG.md"):
        shutil.copy(os.path.join(REPO, name), source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("lightning_kd", "configs"):
        shutil.copytree(os.path.join(REPO, folder), source / folder, ignore=ignore)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", str(tmp_path / "wheels"), str(source)],
        capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = glob.glob(str(tmp_path / "wheels" / "*.whl"))
    return wheel


def test_the_wheel_ships_every_config_and_they_resolve_from_anywhere(tmp_path):
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(name for name in names if name.startswith("lightning_kd/configs/"))
    assert shipped == ["lightning_kd/" + path for path in repository_configs()]
    assert f"lightning_kd/{FOLDER_KD}" in names
    assert f"lightning_kd-{lightning_kd.__version__}.dist-info/licenses/LICENSE" in names
    assert not [name for name in names if name.startswith("configs/")]  # no top-level configs package

    # The wheel installed on its own (its files ahead of the editable install), run from an unrelated directory.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = ("import lightning_kd; from lightning_kd.cli import resolve_config_path; "
             f"print(lightning_kd.__file__); print(resolve_config_path({FOLDER_KD!r}))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(site)}, timeout=240)
    assert done.returncode == 0, done.stderr
    package_file, resolved = done.stdout.split()
    assert package_file == str(site / "lightning_kd" / "__init__.py")
    assert resolved == str(site / "lightning_kd" / FOLDER_KD)


def test_a_config_missing_here_is_read_from_the_shipped_configs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-kd", "fit", "--config", FOLDER_KD, "--print_config"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 0
    assert sys.argv[3] == str(shipped_config_path(FOLDER_KD))
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == "lightning_kd.methods.KD"
    assert printed["model"]["init_args"]["teacher"] == "resnet20"
    assert printed["data"]["class_path"] == "lightning_kd.data.ImageFolderDataModule"


def test_every_form_of_the_config_option_is_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = str(shipped_config_path(FOLDER_KD))
    assert resolve_config_arguments(["fit", f"--config={FOLDER_KD}", "-c", "folder/kd/resnet20-resnet8.yaml",
                                     "--config", "trainer: {max_epochs: 1}", "--trainer.max_epochs", "2"]) == [
        "fit", f"--config={shipped}", "-c", shipped, "--config", "trainer: {max_epochs: 1}", "--trainer.max_epochs",
        "2"]


def test_a_config_in_the_working_directory_wins_over_the_shipped_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs" / "folder" / "kd").mkdir(parents=True)
    (tmp_path / FOLDER_KD).write_text("seed_everything: 1\n")
    assert resolve_config_path(FOLDER_KD) == FOLDER_KD


def test_a_config_found_nowhere_is_one_error_naming_where_it_looked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/folder/kd/nope.yaml"])
    message = str(exit_info.value.code)
    assert message.startswith("lightning-kd: error: --config configs/folder/kd/nope.yaml: no such file; looked in:")
    assert str(tmp_path / "configs/folder/kd/nope.yaml") in message
    assert str(shipped_config_path("configs/folder/kd/nope.yaml")) in message
