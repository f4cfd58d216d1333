"""benchmarks/gpu_step.py: its CPU smoke mode end to end, its settings, its budget, a failing configuration, and one
clear line where CUDA is missing."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPT = os.path.join(REPO, "benchmarks", "gpu_step.py")
VARIANT_KEYS = {"ms_per_step", "window_ms_per_step", "warmup_s", "peak_memory_mib", "compiled_graphs"}
ROW_KEYS = {"name", "teacher", "student", "batch", "mode", "raw", "kd", "overhead_ms_per_step", "ratio", "wall_s"}
RECORD_KEYS = {"benchmark", "command", "device", "device_memory_mib", "date", "python", "torch", "pytorch_lightning",
               "cuda", "cudnn", "cudnn_benchmark", "cudnn_allow_tf32", "float32_matmul_precision", "torch_threads",
               "settings", "planned", "results", "failed", "skipped", "finished", "wall_s"}


def load_gpu_step():
    spec = importlib.util.spec_from_file_location("gpu_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_cpu_smoke_mode_measures_every_configuration_with_finite_numbers(tmp_path):
    output = tmp_path / "gpu_step.json"
    record = load_gpu_step().main(["--device", "cpu", "--tiny", "--output", str(output)])
    assert json.loads(output.read_text()) == json.loads(json.dumps(record))
    assert set(record) == RECORD_KEYS and record["benchmark"] == "gpu_step" and record["finished"]
    assert record["command"] == f"python benchmarks/gpu_step.py --device cpu --tiny --output {output}"
    settings = record["settings"]
    assert settings["pairs"] == ["tiny:tiny"] and settings["modes"] == ["fp32", "bf16-mixed", "channels_last"]
    planned = [f"tiny->tiny batch {batch} {mode}" for mode in settings["modes"] for batch in settings["batches"]]
    assert record["planned"] == planned and record["skipped"] == [] and record["failed"] == []
    assert [row["name"] for row in record["results"]] == planned
    for row in record["results"]:
        assert set(row) == ROW_KEYS
        for variant in ("raw", "kd"):
            measured = row[variant]
            assert set(measured) == VARIANT_KEYS
            assert len(measured["window_ms_per_step"]) == settings["rounds"]
            figures = [measured["ms_per_step"], *measured["window_ms_per_step"]]
            assert all(math.isfinite(ms) and ms > 0 for ms in figures)
            assert math.isfinite(measured["warmup_s"]) and measured["warmup_s"] >= 0
            assert measured["peak_memory_mib"] is None and measured["compiled_graphs"] == 0  # CPU, no compile
        assert row["overhead_ms_per_step"] == pytest.approx(row["kd"]["ms_per_step"] - row["raw"]["ms_per_step"],
                                                            abs=2e-3)
        assert row["ratio"] == pytest.approx(row["kd"]["ms_per_step"] / row["raw"]["ms_per_step"], abs=2e-3)


def test_presets_flags_and_modes():
    gpu_step = load_gpu_step()
    _, default = gpu_step.parse([])
    assert default["pairs"] == [("resnet56", "resnet20"), ("resnet32x4", "resnet8x4")]
    assert default["batches"] == [64, 256] and default["budget_s"] == 390.0
    assert [mode.name for mode in default["modes"]] == ["fp32", "bf16-mixed", "channels_last", "compile"]
    _, quick = gpu_step.parse(["--quick", "--steps", "7"])
    assert (quick["batches"], quick["warmup"], quick["steps"], quick["budget_s"]) == ([256], 10, 7, 75.0)
    _, mixed = gpu_step.parse(["--device", "cpu", "--modes", "bf16-mixed+channels_last+compile"])
    assert mixed["modes"] == [gpu_step.Mode("bf16-mixed+channels_last+compile", True, True, True)]
    assert mixed["modes"][0].precision == "bf16-mixed"
    wrong_flags = (["--modes", "fp32+bf16-mixed"], ["--modes", "fp16"], ["--pairs", "resnet56"], ["--steps", "0"],
                   ["--samples", "100", "--batches", "64", "256"])
    for wrong in wrong_flags:
        with pytest.raises(SystemExit) as stop:
            gpu_step.parse(wrong)
        assert stop.value.code == 2


def test_a_spent_budget_lists_every_configuration_as_skipped(tmp_path):
    output = tmp_path / "gpu_step.json"
    record = load_gpu_step().main(["--device", "cpu", "--tiny", "--budget_s", "0", "--output", str(output)])
    assert record["results"] == [] and record["skipped"] == record["planned"] and len(record["planned"]) == 6
    assert json.loads(output.read_text())["skipped"] == record["planned"]


def test_a_failing_configuration_is_recorded_and_the_others_go_on(tmp_path, monkeypatch):
    gpu_step = load_gpu_step()
    measured = gpu_step.library_run

    def fails_at_batch_8(pair, mode, data, marks):
        if data.batch == 8:
            raise RuntimeError("out of luck")
        return measured(pair, mode, data, marks)

    monkeypatch.setattr(gpu_step, "library_run", fails_at_batch_8)
    output = tmp_path / "gpu_step.json"
    record = gpu_step.main(["--device", "cpu", "--tiny", "--modes", "fp32", "--output", str(output)])
    assert record["failed"] == [{"name": "tiny->tiny batch 8 fp32", "error": "RuntimeError: out of luck"}]
    assert [row["name"] for row in record["results"]] == ["tiny->tiny batch 32 fp32"] and record["finished"]
    assert json.loads(output.read_text())["failed"] == record["failed"]


def test_without_cuda_the_default_run_stops_with_one_clear_line(tmp_path):
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no CUDA device, on any machine
    done = subprocess.run([sys.executable, SCRIPT, "--output", str(tmp_path / "never.json")], capture_output=True,
                          text=True, env=environment, cwd=tmp_path, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [done.stderr.strip()], done.stderr
    assert "no CUDA device" in done.stderr and "--device cpu --tiny" in done.stderr
    assert not (tmp_path / "never.json").exists()
