"""What setup.cfg declares holds: the lowest torch it allows has every API the package calls, and every file
parses and imports on the lowest Python it allows."""
from __future__ import annotations

import ast
import configparser
import glob
import os
import re

from conftest import REPO

# The torch APIs the package calls that are younger than torch 2.0, with the release that brought them.
TORCH_APIS = {"add_safe_globals": (2, 4), "set_submodule": (2, 5)}


def declared() -> configparser.ConfigParser:
    config = configparser.ConfigParser()
    config.read(os.path.join(REPO, "setup.cfg"))
    return config


def lower_bound(requirement: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.search(r">=\s*([\d.]+)", requirement).group(1).split("."))


def python_files() -> list[str]:
    return [path for folder in ("lightning_kd", "tests", "benchmarks")
            for path in glob.glob(os.path.join(REPO, folder, "**", "*.py"), recursive=True)]


def test_the_lowest_torch_allowed_has_every_api_the_package_calls():
    requirements = {re.split(r"[<>=\[ ]", line)[0]: line for line in declared()["options"]["install_requires"].split()}
    torch, torchvision = lower_bound(requirements["torch"]), lower_bound(requirements["torchvision"])
    package = glob.glob(os.path.join(REPO, "lightning_kd", "**", "*.py"), recursive=True)
    source = "\n".join(open(path).read() for path in package)
    needed = max(version for api, version in TORCH_APIS.items() if re.search(rf"\.{api}\(", source))
    assert torch[:2] >= needed
    assert torchvision[:2] == (0, torch[1] + 15)  # torchvision 0.(N+15) is built for torch 2.N


def test_every_file_parses_and_imports_on_the_lowest_python_allowed():
    """Grammar of that Python, and no ``X | Y`` annotation evaluated at import (before 3.10) without
    ``from __future__ import annotations``."""
    lowest = lower_bound(declared()["options"]["python_requires"])
    for path in python_files():
        tree = ast.parse(open(path).read(), path, feature_version=lowest[:2])
        postponed = any(isinstance(node, ast.ImportFrom) and node.module == "__future__"
                        and any(alias.name == "annotations" for alias in node.names) for node in tree.body)
        if lowest[:2] >= (3, 10) or postponed:
            continue
        nodes = list(ast.walk(tree))
        annotations = [node.annotation for node in nodes if isinstance(node, (ast.arg, ast.AnnAssign))]
        annotations += [node.returns for node in nodes if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
        unions = [node.lineno for annotation in annotations if annotation is not None for node in ast.walk(annotation)
                  if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr)]
        assert not unions, f"{os.path.relpath(path, REPO)} line {unions[0]}: X | Y annotation needs Python 3.10"
