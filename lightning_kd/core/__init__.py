"""The base every method stands on."""
from lightning_kd.core.checkpointing import AtomicCheckpointIO, RunCheckpoint, write_atomically
from lightning_kd.core.checks import (
    check_choice,
    check_layer_pairs,
    check_range,
    check_weights,
    renamed_argument,
    renamed_mix,
)
from lightning_kd.core.features import FeatureHooks, evaluation_mode, layer_shapes, resolve_modules
from lightning_kd.core.loss_log import LossLog
from lightning_kd.core.hub import REPDISTILLER_TEACHERS, TeacherNotFoundError, file_sha256, teacher_url
from lightning_kd.core.module import (
    DistillationModule,
    NonFiniteLossError,
    Step,
    build_network,
    cifar_multistep,
    cifar_sgd,
    split_batch,
)
from lightning_kd.core.per_class import PerClassReport
from lightning_kd.core.predictions import PredictionWriter, read_predictions
from lightning_kd.core.progress import ThrottledProgressBar
from lightning_kd.core.stages import Stage
from lightning_kd.core.summary import FitSummary
from lightning_kd.core.teacher_cache import LogitCodec, TeacherCache
from lightning_kd.core.teacher import (
    BlackBoxTeacher,
    FlopsPerImage,
    QueryBudgetExceeded,
    TeacherCost,
    TeacherSource,
    classifier,
    forward_flops,
    freeze,
    load_checkpoint_file,
    build_teacher,
    load_weights,
    read_state_dict,
    restrict_classifier,
)

__all__ = [
    "AtomicCheckpointIO",
    "BlackBoxTeacher",
    "DistillationModule",
    "FeatureHooks",
    "FitSummary",
    "FlopsPerImage",
    "LogitCodec",
    "LossLog",
    "NonFiniteLossError",
    "PerClassReport",
    "PredictionWriter",
    "QueryBudgetExceeded",
    "REPDISTILLER_TEACHERS",
    "RunCheckpoint",
    "Stage",
    "Step",
    "TeacherCache",
    "ThrottledProgressBar",
    "TeacherCost",
    "TeacherNotFoundError",
    "TeacherSource",
    "build_network",
    "build_teacher",
    "check_choice",
    "check_layer_pairs",
    "check_range",
    "check_weights",
    "renamed_argument",
    "renamed_mix",
    "classifier",
    "cifar_multistep",
    "cifar_sgd",
    "evaluation_mode",
    "file_sha256",
    "forward_flops",
    "freeze",
    "layer_shapes",
    "load_checkpoint_file",
    "load_weights",
    "read_predictions",
    "read_state_dict",
    "resolve_modules",
    "restrict_classifier",
    "split_batch",
    "teacher_url",
    "write_atomically",
]
