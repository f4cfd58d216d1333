"""What the library ships, wherever it is installed: its methods (class, paper) and the configs that run them.

Part of the command-line layer (``lightning-kd methods``, ``--config`` look-up): it imports the methods; the core
and the methods never import it.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

import lightning_kd
import lightning_kd.methods
from lightning_kd.core import DistillationModule

# How users and the README name a shipped config: "configs/<dataset>/<method>/<pair>.yaml".
CONFIGS_PREFIX = "configs"


def configs_directory() -> Optional[Path]:
    """The shipped configs: ``lightning_kd/configs`` in an installed wheel, ``configs/`` beside the package in a
    source checkout (an editable install); None when neither exists."""
    package = Path(lightning_kd.__file__).resolve().parent
    for candidate in (package / CONFIGS_PREFIX, package.parent / CONFIGS_PREFIX):
        if candidate.is_dir():
            return candidate
    return None


def shipped_configs() -> list[str]:
    """Every shipped config as users name it, ``configs/<dataset>/<method>/<pair>.yaml``, sorted."""
    directory = configs_directory()
    if directory is None:
        return []
    return sorted(
        "/".join((CONFIGS_PREFIX, *path.relative_to(directory).parts)) for path in directory.rglob("*.yaml")
    )


def shipped_config_path(name: str) -> Optional[Path]:
    """Where the shipped config ``name`` (``configs/a/b.yaml`` or ``a/b.yaml``) would be; None for a name that
    cannot be one (absolute, leaving the configs with ``..``) or when no configs are installed."""
    directory = configs_directory()
    parts = Path(os.path.normpath(name)).parts
    if directory is None or not parts or os.path.isabs(name) or parts[0] == os.pardir:
        return None
    if parts[0] == CONFIGS_PREFIX:
        parts = parts[1:]
    return directory.joinpath(*parts) if parts else None


def configured_method(config_path: Path) -> Optional[str]:
    """The class name of the model a config file configures (``model.class_path``), None when it names none."""
    with open(config_path) as handle:
        config = yaml.safe_load(handle)
    model = config.get("model") if isinstance(config, dict) else None
    class_path = model.get("class_path") if isinstance(model, dict) else model
    return class_path.rsplit(".", 1)[-1] if isinstance(class_path, str) else None


def config_writing(checkpoint: str) -> Optional[str]:
    """The shipped config whose run writes the checkpoint file ``checkpoint`` (its ``checkpoint.dirpath`` is that
    file's directory, relative to the working directory as the configs name it), e.g.
    ``configs/cifar100/baseline/resnet56.yaml`` for ``runs/cifar100/baseline/resnet56/checkpoints/last.ckpt``."""
    directory = os.path.abspath(os.path.dirname(checkpoint))
    for name in shipped_configs():
        with open(shipped_config_path(name)) as handle:
            config = yaml.safe_load(handle)
        written = (config.get("checkpoint") or {}).get("dirpath") if isinstance(config, dict) else None
        if isinstance(written, str) and os.path.abspath(written) == directory:
            return name
    return None


@dataclass(frozen=True)
class Method:
    """One method class of :mod:`lightning_kd.methods`, the paper it implements and the configs that run it."""

    name: str
    class_path: str
    paper: str
    configs: tuple[str, ...]


def paper_of(cls: type) -> str:
    """The first paragraph of the docstring of the module defining ``cls``, on one line: the paper's citation."""
    paragraph = (inspect.getdoc(inspect.getmodule(cls)) or "").split("\n\n")[0]
    return " ".join(paragraph.split())


def method_classes() -> dict[str, type]:
    """Every :class:`DistillationModule` subclass exported by :mod:`lightning_kd.methods`, by class name."""
    classes = (getattr(lightning_kd.methods, name) for name in lightning_kd.methods.__all__)
    return {
        cls.__name__: cls
        for cls in classes
        if inspect.isclass(cls) and issubclass(cls, DistillationModule) and cls is not DistillationModule
    }


def methods() -> list[Method]:
    """The catalog: every method, sorted by name (case-insensitive), with its paper and its shipped configs."""
    configs_of: dict[str, list[str]] = {}
    for name in shipped_configs():
        configs_of.setdefault(configured_method(shipped_config_path(name)), []).append(name)
    return [
        Method(name, f"lightning_kd.methods.{name}", paper_of(cls), tuple(configs_of.get(name, ())))
        for name, cls in sorted(method_classes().items(), key=lambda item: item[0].lower())
    ]


def find_method(catalog: list[Method], name: str) -> Method:
    """The method called ``name`` (case-insensitive); ``ValueError`` naming the known ones otherwise."""
    for method in catalog:
        if method.name.lower() == name.lower():
            return method
    known = ", ".join(method.name for method in catalog)
    raise ValueError(f"unknown method {name!r}; known: {known}")


def datasets_of(method: Method) -> list[str]:
    """The dataset directories (``configs/<dataset>/...``) of a method's configs, sorted."""
    return sorted({config.split("/")[1] for config in method.configs})


def format_table(catalog: list[Method]) -> str:
    """One line a method: name, its configs (count and datasets), its paper."""
    rows = [("METHOD", "CONFIGS", "PAPER")]
    for method in catalog:
        configs = f"{len(method.configs)}: {', '.join(datasets_of(method))}" if method.configs else "0"
        rows.append((method.name, configs, method.paper))
    widths = [max(len(row[column]) for row in rows) for column in range(2)]
    lines = [f"{name:<{widths[0]}}  {configs:<{widths[1]}}  {paper}" for name, configs, paper in rows]
    lines += ["", "lightning-kd methods --method NAME lists one method's configs; run one with "
              "lightning-kd fit --config <config>."]
    return "\n".join(lines)


def format_method(method: Method) -> str:
    """One method in full: class path, paper and every shipped config."""
    lines = [method.name, f"  class:   {method.class_path}", f"  paper:   {method.paper}"]
    if method.configs:
        lines.append(f"  configs ({len(method.configs)}):")
        lines += [f"    {config}" for config in method.configs]
    else:
        lines.append("  configs: none shipped (write one with model.class_path: " + method.class_path + ")")
    return "\n".join(lines)


def methods_cli(argv: list[str]) -> None:
    """List the distillation methods, their papers and their shipped configs."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="lightning-kd methods", description=methods_cli.__doc__)
    parser.add_argument("--method", type=Optional[str], default=None,
                        help="one method (its class name, any case): its class path, paper and every config")
    method_name = parser.parse_args(argv).method
    catalog = methods()
    if method_name is None:
        print(format_table(catalog))
        return
    try:
        print(format_method(find_method(catalog, method_name)))
    except ValueError as error:
        parser.error(str(error))
