"""Argument checks shared by the methods and the base: one style, one clear ``ValueError`` each."""
from __future__ import annotations

import warnings
from collections.abc import Collection
from typing import Any, Optional


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


def check_weights(**weights: float) -> None:
    """:func:`check_range` ``(name, value, 0.0)`` for every ``name=value``: loss weights must be ≥ 0.

    Example::

        check_weights(ce_weight=ce_weight, kd_weight=kd_weight)
    """
    for name, value in weights.items():
        check_range(name, value, 0.0)


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


def renamed_argument(owner: str, old: str, old_value: Any, new: str, new_value: Any, new_default: Any) -> Any:
    """The value of argument ``new`` of ``owner``, given its deprecated name ``old`` (kept for one release).

    ``old_value`` is ``None`` when the old name was not given. Giving both names (``new`` off its default) stops
    with one clear ``ValueError``; the old name alone warns (``FutureWarning``) and is used.

    Example::

        self.beta = renamed_argument("SP", "gamma", gamma, "beta", beta, 3000.0)
    """
    if old_value is None:
        return new_value
    if new_value != new_default:
        raise ValueError(f"{owner}: {old} is the deprecated name of {new}; give {new} only")
    warnings.warn(f"{owner}: {old} is deprecated and will be removed in the next release; use {new}", FutureWarning,
                  stacklevel=3)
    return old_value


def renamed_mix(owner: str, alpha: Optional[float], ce_weight: float, kd_weight: float,
                defaults: tuple[float, float]) -> tuple[float, float]:
    """``(ce_weight, kd_weight)`` of ``owner``, given the deprecated convex mix ``alpha`` (kept for one release):
    ``(1 − alpha)·CE + alpha·KD`` is ``ce_weight = 1 − alpha, kd_weight = alpha``.

    ``alpha`` is ``None`` when not given. Giving ``alpha`` with either weight off its default (``defaults``) stops
    with one clear ``ValueError``; ``alpha`` alone warns (``FutureWarning``).
    """
    if alpha is None:
        return ce_weight, kd_weight
    if (ce_weight, kd_weight) != tuple(defaults):
        raise ValueError(f"{owner}: alpha is the deprecated form of ce_weight = 1 - alpha, kd_weight = alpha; "
                         "give ce_weight and kd_weight only")
    check_range("alpha", alpha, 0.0, 1.0)
    warnings.warn(f"{owner}: alpha is deprecated and will be removed in the next release; use "
                  f"ce_weight={1 - alpha:g}, kd_weight={alpha:g}", FutureWarning, stacklevel=3)
    return 1 - alpha, alpha
