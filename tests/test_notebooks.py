"""The notebooks re-executed on tiny generated data, so they never rot."""
import os
import re

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO

NOTEBOOKS = ["01_quickstart.ipynb", "02_custom_method.ipynb"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_on_tiny_data(name, tiny_folder, tmp_path, monkeypatch):
    for key, value in {"LKD_DATA_ROOT": tiny_folder, "LKD_EPOCHS": "1", "LKD_BATCH_SIZE": "16", "LKD_NUM_WORKERS": "0",
                       "LKD_WORKDIR": str(tmp_path / "runs")}.items():
        monkeypatch.setenv(key, value)
    if name == "02_custom_method.ipynb":  # four runs, one of two stages: half the tiny set's batches an epoch
        monkeypatch.setenv("LKD_TRAIN_FRACTION", "0.5")
    notebook = nbformat.read(os.path.join(REPO, "notebooks", name), as_version=4)
    NotebookClient(notebook, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))
    assert "Traceback" not in outputs
    if name == "01_quickstart.ipynb":
        assert "resnet8 + KD" in outputs
        assert any("image/png" in o.get("data", {}) for cell in notebook.cells for o in cell.get("outputs", []))
    else:
        assert outputs.count("same logits as the student: True") == 3  # DKD, FitNets-style, CRD-style: exported
        # the FitNets-style run, interrupted in its second stage, resumes in that stage from that step
        resumed = r"last\.ckpt: step (\d+), stage 'distill'; resumed:\s+epoch \d+ from step \1: stage 'distill'"
        assert re.search(resumed, outputs)
        assert os.path.isfile(tmp_path / "runs" / "hint" / "last.ckpt")
