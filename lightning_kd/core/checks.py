"""Argument checks shared by the methods and the base: one style, one clear ``ValueError`` each."""
from __future__ import annotations

from collections.abc import Collection
from typing import Any


def check_range(name: str, value: float, low: float, high: float = float("inf"), *, low_open: bool = False) -> None:
    """Raise one clear ``ValueError`` when a hyper-parameter lies outside ``[low, high]`` (``(low, high]`` with
    ``low_open``).

    Example::

        check_range("temperature", temperature, 0.0, low_open=True)  # T > 0
    """
    below = value <= low if low_open else value < low
    if below or value > high:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must lie in {bracket}{low}, {high}], got {value}")


def check_choice(name: str, value: Any, choices: Collection[Any]) -> None:
    """Raise one clear ``ValueError`` when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def check_layer_pairs(method: str, student_layers: list[str], teacher_layers: list[str]) -> None:
    """Raise one clear ``ValueError`` unless the student's and the teacher's layers pair up (equal, non-zero
    counts): layer i of the student is matched with layer i of the teacher."""
    if not student_layers or len(student_layers) != len(teacher_layers):
        raise ValueError(
            f"{method} matches student and teacher layers in pairs, but got {len(student_layers)} student layers "
            f"{student_layers} and {len(teacher_layers)} teacher layers {teacher_layers}: set model.student_layers "
            "and model.teacher_layers to non-empty lists of equal length"
        )
