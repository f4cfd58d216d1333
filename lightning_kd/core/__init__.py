"""The base every method stands on."""
from lightning_kd.core.features import FeatureHooks, resolve_modules
from lightning_kd.core.module import DistillationModule, Step, build_network, check_range, cifar_multistep, cifar_sgd
from lightning_kd.core.teacher import (
    BlackBoxTeacher,
    FlopsPerImage,
    QueryBudgetExceeded,
    TeacherCost,
    classifier,
    forward_flops,
    freeze,
    load_weights,
    read_state_dict,
    restrict_classifier,
)

__all__ = [
    "BlackBoxTeacher",
    "DistillationModule",
    "FeatureHooks",
    "FlopsPerImage",
    "QueryBudgetExceeded",
    "Step",
    "TeacherCost",
    "build_network",
    "check_range",
    "classifier",
    "cifar_multistep",
    "cifar_sgd",
    "forward_flops",
    "freeze",
    "load_weights",
    "read_state_dict",
    "resolve_modules",
    "restrict_classifier",
]
