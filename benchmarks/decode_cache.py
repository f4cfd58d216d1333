"""Seconds from an ImageFolder data module's creation to its decoded splits, in a first process (decodes and writes
the cache) and in the next ones (load the cache), each a fresh Python process as a new run would be. The import of
lightning_kd (torch, Lightning) before it is reported apart: every process pays it, cache or not.

    python benchmarks/decode_cache.py --root /path/to/cifar10-jpeg [--runs 3] [--cache_dir DIR]

Prints one JSON record: the seconds of the first (cold) process and of each later (warm) one.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ONE_SETUP = """
import sys, time
start = time.perf_counter()
from lightning_kd.data import ImageFolderDataModule
imported = time.perf_counter()
data = ImageFolderDataModule(sys.argv[1], num_workers=0, tensor_resident=True, decode_cache=sys.argv[2])
data.setup("fit")
print(time.perf_counter() - imported, imported - start, len(data.train_dataset), len(data.test_dataset))
"""


def timed_setup(root: str, cache_dir: str) -> dict:
    """One fresh process: seconds from the data module's creation to its splits set up, seconds of the import before
    it, and the split sizes."""
    output = subprocess.run([sys.executable, "-c", ONE_SETUP, root, cache_dir], check=True, capture_output=True,
                            text=True).stdout.split()
    return {"seconds": round(float(output[0]), 2), "import_s": round(float(output[1]), 2), "train": int(output[2]),
            "test": int(output[3])}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--runs", type=int, default=3, help="warm processes after the first")
    parser.add_argument("--cache_dir", help="an empty directory (default: a new temporary one)")
    args = parser.parse_args(argv)
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="lkd_cache_")
    cold = timed_setup(args.root, cache_dir)
    warm = [timed_setup(args.root, cache_dir) for _ in range(args.runs)]
    record = {
        "command": " ".join(["python", "benchmarks/decode_cache.py", *(argv or sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpus": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 1),
        "images": cold["train"] + cold["test"],
        "first_process_s": cold["seconds"],
        "next_processes_s": [run["seconds"] for run in warm],
        "import_s": [run["import_s"] for run in [cold, *warm]],
    }
    print(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    main()
