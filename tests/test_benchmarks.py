"""benchmarks/speed.py keeps working: every figure at tiny sizes, its JSON record and the README table."""
import importlib.util
import json
import math
import os

import pytest
import torch

from conftest import REPO

README = "# lightning_kd\n\nintro\n\n## Layout\n\nlayers\n"


def load_speed():
    spec = importlib.util.spec_from_file_location("speed", os.path.join(REPO, "benchmarks", "speed.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_speed_benchmark_runs_every_figure_and_updates_the_readme_table(tiny_folder, tmp_path, capsys):
    speed = load_speed()
    readme = tmp_path / "README.md"
    readme.write_text(README)
    args = ["--data", tiny_folder, "--teacher", "resnet8", "--student", "resnet8", "--num_classes", "4",
            "--batch", "4", "--data_batch", "8", "--data_batches", "2", "--repeats", "1", "--warmup", "0",
            "--steps", "1", "--lightning_steps", "2", "--crd_samples", "64", "--crd_negatives", "16",
            "--profile_steps", "0", "--readme", str(readme)]
    record = speed.main(args)
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(record))

    ratios = [record["data_pipeline"]["speedup"], record["lightning_overhead"]["ratio"],
              record["peak_memory"]["ratio"], *record["step_overhead"]["ratio"].values()]
    assert all(math.isfinite(ratio) and ratio > 0 for ratio in ratios)
    assert set(record["step_overhead"]["ratio"]) == set(speed.method_cases("resnet8", "resnet8"))
    assert record["peak_memory"]["peak_mib"]["KD"] > 0
    assert record["data_pipeline"]["train_images"] == 64

    text = readme.read_text()
    start, end = text.index(speed.MARKERS[0]), text.index(speed.MARKERS[1])
    assert text.index("## Speed") < start < end < text.index("## Layout")
    assert "step / floor: KD" in text[start:end] and "Lightning `Trainer.fit`" in text[start:end]
    speed.update_readme(str(readme), "the second run's table")  # replaces the table in place, touches nothing else
    table = f"{speed.MARKERS[0]}\nthe second run's table\n{speed.MARKERS[1]}"
    assert readme.read_text() == text[:start] + table + text[end + len(speed.MARKERS[1]):]


NEW_METHODS = ["FitNet", "NST", "PKT", "RKD", "CC", "VID", "CRD", "AB", "FT", "OFD", "ReviewKD", "DKD", "DIST",
               "LogitStandardization"]


def test_speed_figure_two_alone_builds_every_later_method_in_its_stage(capsys):
    """``--figures 2``: no data needed; the 14 later methods build and take a timed step (AB in both stages, the
    staged ones in the stage named in STAGES, CRD on its indexed batch without a Trainer); CRD, ReviewKD and OFD
    are reported with where the time goes, without a verdict."""
    speed = load_speed()
    args = ["--figures", "2", "--teacher", "resnet8", "--student", "resnet8", "--num_classes", "10", "--batch", "8",
            "--warmup", "0", "--steps", "1", "--crd_samples", "100", "--crd_negatives", "16", "--profile_steps", "1",
            "--methods", *NEW_METHODS]
    record = speed.main(args)
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(record))
    assert not {"data_pipeline", "lightning_overhead", "peak_memory"} & set(record)

    steps = record["step_overhead"]
    rows = [name for name in speed.method_cases("resnet8", "resnet8") if name.split(" stage ")[0] in NEW_METHODS]
    assert list(steps["ratio"]) == rows and "AB stage 1" in rows and "AB stage 2" in rows
    assert all(math.isfinite(ratio) and ratio > 0 for ratio in steps["ratio"].values())
    assert steps["stages"] == speed.STAGES
    assert steps["crd"] == {"num_samples": 100, "num_negatives": 16}
    assert set(steps["where_time_goes"]) == speed.REPORT_METHODS
    for name, found in steps["where_time_goes"].items():
        assert found["head_parameters"] > 0 and found["operators_beyond_floor_ms"], name
        assert set(found["phases_ms"]["method"]) == {"forward_step", "loss_terms", "backward", "optimizer_step"}

    table = {row[0]: row for row in speed.step_rows(steps)}
    assert table["step / floor: CRD"][2:] == ("report", "—")
    assert table["step / floor: AB stage 1"][2] == f"≤ {speed.TARGETS['feature_step_max']}"
    assert table["step / floor: DKD"][2] == f"≤ {speed.TARGETS['logit_step_max']}"
    assert "step / floor: ReviewKD" in speed.readme_table(record)


def test_speed_stage_floor_and_crd_batch():
    """The floor of a stage without the teacher runs none; CRD's batch carries distinct positions whose labels are
    the sampler's; a stage the arguments do not give is refused."""
    speed = load_speed()
    cases = speed.method_cases("resnet8", "resnet8", num_samples=40, num_negatives=8)
    teachers = {"resnet8": speed.calibrated_teacher("resnet8", 4, 4)}
    stage_two = speed.build_method(*cases["AB stage 2"], "resnet8", 4, teachers, "AB stage 2")
    assert speed.Floor(stage_two, "AB stage 2").frozen is None
    assert speed.Floor(speed.build_method(*cases["AB stage 1"], "resnet8", 4, teachers, "AB stage 1"),
                       "AB stage 1").frozen is not None
    crd = speed.build_method(*cases["CRD"], "resnet8", 4, teachers, "CRD")
    x, y, fields = speed.method_batch("CRD", 4, 4, 40)
    assert len(set(fields["index"].tolist())) == 4 and torch.equal(crd.sampler.labels[fields["index"]], y)
    with pytest.raises(ValueError, match="timed in stage 'task'"):
        speed.build_method(*cases["AB stage 1"], "resnet8", 4, teachers, "AB stage 2")
    assert speed.select_cases(cases, ["AB", "KD"]) == ["KD", "AB stage 1", "AB stage 2"]


def test_teacher_cache_benchmark_runs_the_teacher_in_the_first_cached_run_only(tmp_path):
    """benchmarks/teacher_cache.py on generated data: of the three cached KD runs only the first (T = 2) runs the
    teacher, the next two read every image from the cache; the uncached runs each run it; the record is written."""
    spec = importlib.util.spec_from_file_location("teacher_cache", os.path.join(REPO, "benchmarks", "teacher_cache.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    output = tmp_path / "teacher_cache.json"
    record = script.main(["--per_class", "8", "--epochs", "1", "--batch_size", "16", "--teacher", "resnet8",
                          "--rounds", "1", "--output", str(output)])
    runs, images = record["runs"], 10 * 8
    assert [runs[f"kd_T{t}_uncached"]["teacher_images"] for t in (2, 4, 8)] == [images] * 3
    assert [runs[f"kd_T{t}_cached"]["teacher_images"] for t in (2, 4, 8)] == [images, 0, 0]
    assert [runs[f"kd_T{t}_cached"]["images_from_cache"] for t in (2, 4, 8)] == [0, images, images]
    assert record["summary"]["teacher_images_cached"] * 3 == record["summary"]["teacher_images_uncached"]
    assert json.loads(output.read_text())["summary"] == record["summary"]
