"""benchmarks/speed.py keeps working: every figure at tiny sizes, its JSON record and the README table."""
import importlib.util
import json
import math
import os

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
            "--steps", "1", "--lightning_steps", "2", "--readme", str(readme)]
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
