"""The base every method stands on."""
from lightning_kd.core.features import FeatureHooks, resolve_modules
from lightning_kd.core.module import DistillationModule, Step, build_network, check_range, cifar_multistep, cifar_sgd
from lightning_kd.core.teacher import freeze, load_weights, read_state_dict

__all__ = [
    "DistillationModule",
    "FeatureHooks",
    "Step",
    "build_network",
    "check_range",
    "cifar_multistep",
    "cifar_sgd",
    "freeze",
    "load_weights",
    "read_state_dict",
    "resolve_modules",
]
