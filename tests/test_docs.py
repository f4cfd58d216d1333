"""The API reference (mkdocs.yml, docs/) builds from the docstrings with ``mkdocs build --strict``: a docstring griffe
cannot parse, a parameter documented but not in the signature, or a broken link fails here; and the README's test
install brings what the build needs."""
from __future__ import annotations

import configparser
import os
import subprocess
import sys

from conftest import REPO

# Per API page, objects it must document (their anchors, as mkdocstrings writes them).
DOCUMENTED = {
    "core": ["lightning_kd.core.DistillationModule", "lightning_kd.core.FitSummary", "lightning_kd.core.freeze"],
    "methods": ["lightning_kd.methods.KD", "lightning_kd.methods.kd_loss", "lightning_kd.methods.ActiveMixupRounds"],
    "data": ["lightning_kd.data.CIFAR100DataModule", "lightning_kd.data.ImageFolderDataModule"],
    "models": ["lightning_kd.models.get_model"],
    "cli": ["lightning_kd.cli.KDLightningCLI", "lightning_kd.cli.main"],
}


def extra(name: str) -> set[str]:
    config = configparser.ConfigParser()
    config.read(os.path.join(REPO, "setup.cfg"))
    return set(config["options.extras_require"][name].split())


def test_the_api_reference_builds_strictly_and_documents_every_package(tmp_path):
    site = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", os.path.join(REPO, "mkdocs.yml"),
         "--site-dir", str(site)],
        cwd=tmp_path, capture_output=True, text=True, timeout=240,
    )
    assert build.returncode == 0, build.stderr
    for page, objects in DOCUMENTED.items():
        html = (site / "api" / page / "index.html").read_text()
        missing = [name for name in objects if f'id="{name}"' not in html]
        assert not missing, f"docs/api/{page}.md does not document {missing}"
    methods = (site / "api" / "methods" / "index.html").read_text()
    assert "softening temperature" in methods  # a parameter's description, from KD's docstring
    data = (site / "api" / "data" / "index.html").read_text()
    assert "50k train / 10k test images" in data  # the CIFAR modules' docstring, assigned at import


def test_the_test_install_brings_the_docs_and_wandb_extras():
    """README: ``pip install -e ".[test]"`` is all the suite needs (the docs build and the W&B tests included)."""
    assert extra("docs") | extra("wandb") <= extra("test")
