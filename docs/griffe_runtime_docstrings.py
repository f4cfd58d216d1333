"""A griffe extension for the API reference (mkdocs.yml): docstrings a class receives when its module is imported.

Griffe reads the source without importing it, so a class whose body assigns ``__doc__`` from a template
(``lightning_kd.data.CIFAR10DataModule`` and ``CIFAR100DataModule`` share one) would be shown without a docstring.
"""
from __future__ import annotations

import inspect
from typing import Any

import griffe


class RuntimeDocstrings(griffe.Extension):
    """Give a class whose body assigns ``__doc__`` the docstring it has once imported."""

    def on_class_members(self, *, cls: griffe.Class, **kwargs: Any) -> None:
        """Called by griffe after it has visited a class's members (static analysis)."""
        if cls.docstring is None and "__doc__" in cls.members:
            text = inspect.getdoc(griffe.dynamic_import(cls.path))
            cls.docstring = griffe.Docstring(text, parent=cls)
