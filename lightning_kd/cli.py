"""The ``lightning-kd`` command: LightningCLI in subclass mode, plus ``export``, ``demo`` and ``methods``.

    lightning-kd --help
    lightning-kd methods [--method KD]
    lightning-kd fit --config configs/cifar100/kd/resnet32x4-resnet8x4.yaml
    lightning-kd fit --config <method>.yaml --config configs/logger/wandb.yaml
    lightning-kd export --ckpt_path runs/.../last.ckpt --output student.pt2
    lightning-kd demo [--root /path/to/imagefolder]
"""
from __future__ import annotations

import copy
import importlib
import importlib.metadata
import inspect
import os
import sys
import typing
import warnings
from typing import Optional

import torch.nn as nn
from jsonargparse import DefaultHelpFormatter, Namespace
from pytorch_lightning.callbacks.progress import ProgressBar
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

import lightning_kd
import lightning_kd.methods  # noqa: F401 - every method is known by its short name (--model KD) in any process
from lightning_kd.catalog import config_writing, configs_directory, shipped_config_path
from lightning_kd.core import (
    DistillationModule,
    FitSummary,
    PerClassReport,
    PredictionWriter,
    RunCheckpoint,
    TeacherNotFoundError,
    ThrottledProgressBar,
    file_sha256,
    load_checkpoint_file,
    teacher_url,
)
from lightning_kd.data import ClassificationDataModule

# pytorch_lightning's own pytree helper calls `isinstance(treespec, LeafSpec)`, which recent torch deprecates: a
# warning about Lightning's code on every fit, nothing a user wrote or can change (Lightning will update the call).
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")

# Model arguments the CLI links from the data module when it instantiates the classes: not part of a resume check.
LINKED_MODEL_ARGUMENTS = ("num_classes", "teacher_classes", "num_samples")
WANDB_LOGGERS = ("pytorch_lightning.loggers.WandbLogger", "pytorch_lightning.loggers.wandb.WandbLogger")


class WandbNotInstalledError(ModuleNotFoundError):
    """A W&B logger is configured but the ``wandb`` package, an optional extra of lightning-kd, is not installed."""

    def __init__(self) -> None:
        super().__init__(
            "trainer.logger is a W&B logger (WandbLogger, e.g. configs/logger/wandb.yaml) but wandb is not installed: "
            'pip install "lightning-kd[wandb]"',
            name="wandb",
        )


def _require_wandb() -> None:
    """Raise :class:`WandbNotInstalledError` unless ``wandb`` imports."""
    try:
        import wandb  # noqa: F401 - the import is the check
    except ImportError:
        raise WandbNotInstalledError() from None


def _wandb_credentials_available() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = os.path.join(os.path.expanduser("~"), ".netrc")
    if not os.path.isfile(netrc):
        return False
    with open(netrc) as handle:
        return "api.wandb.ai" in handle.read()


def _short_name(spec) -> Optional[str]:
    """'resnet8' for a model name, the class name for a class_path spec, None for no model."""
    if spec is None or isinstance(spec, str):
        return spec
    class_path = spec.get("class_path") if hasattr(spec, "get") else None
    return class_path.rsplit(".", 1)[-1] if class_path else type(spec).__name__


def _dataset_name(data) -> Optional[str]:
    """'cifar100' for CIFAR100DataModule, the root folder's name for an ImageFolder tree, the source's name for a
    data module built on another (QueryPoolDataModule); None when the config names no data."""
    if not hasattr(data, "get") or not data.get("class_path"):
        return None
    init = data.get("init_args") or Namespace()
    if init.get("source") is not None:
        return _dataset_name(init.get("source"))
    name = data.get("class_path").rsplit(".", 1)[-1]
    if name == "ImageFolderDataModule" and init.get("root"):
        return os.path.basename(os.path.normpath(str(init.get("root"))))
    return name.removesuffix("DataModule").lower()


def _comparable(value):
    """A setting as plain data; a dotted name of a function (how checkpoints store one) as that function."""
    if isinstance(value, Namespace):
        return {key: _comparable(item) for key, item in value.as_dict().items()}
    if isinstance(value, dict):
        return {key: _comparable(item) for key, item in value.items()}
    if isinstance(value, str) and "." in value and os.sep not in value:
        module, _, name = value.rpartition(".")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError):
            return value
    return value


def _resume_conflicts(configured: Namespace, recorded: Namespace, teacher_source: Optional[dict]) -> list[tuple]:
    """``(name, given, checkpoint's)`` for every model setting of ``configured`` that differs from ``recorded``."""
    if configured.get("class_path") != recorded.class_path:
        return [("model.class_path", configured.get("class_path"), recorded.class_path)]
    given = configured.get("init_args") or Namespace()
    conflicts = []
    # The names the checkpoint recorded (top-level, not dotted); networks given as modules are not recorded
    # (save_hyperparameters leaves them out): those are built as configured and receive the checkpoint's weights.
    for name in sorted(vars(recorded.init_args)):
        ours, theirs = _comparable(given.get(name)), _comparable(recorded.init_args.get(name))
        if name in LINKED_MODEL_ARGUMENTS or ours == theirs:
            continue
        if name == "teacher_ckpt" and teacher_source is not None:
            continue  # checked by content, not by path: see DistillationModule.on_load_checkpoint
        conflicts.append((f"model.init_args.{name}", ours, theirs))
    return conflicts


def _names_recorded_teacher(path: Optional[str], teacher_source: dict) -> bool:
    """Whether ``path`` is unset, names the URL the checkpoint's teacher was downloaded from (a URL or a published
    teacher's short name), or is a local file that is gone or holds the very file the checkpoint recorded."""
    if path is None:
        return True
    url = teacher_url(path)
    if url is not None:
        return url == teacher_source.get("url")
    return not os.path.isfile(path) or file_sha256(path) == teacher_source["sha256"]


def _accepts_any_module(typehint) -> bool:
    """Whether ``typehint`` is ``torch.nn.Module`` or holds it (``Union[str, nn.Module]``, ``Optional[...]``, ...)."""
    return typehint is nn.Module or any(_accepts_any_module(argument) for argument in typing.get_args(typehint))


class ModuleHelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help, except that an argument taking any ``torch.nn.Module`` (a method's ``student``,
    ``teacher``, ...) says so instead of listing every ``nn.Module`` subclass torch defines, some 1,500 lines of
    ``--model.help KD``. jsonargparse appends that list as the action's ``extra_help()``; its other lists (the
    methods, optimizers, schedulers, callbacks, loggers one may name) are kept."""

    MODULE_HELP = ", any torch.nn.Module: class_path and init_args"

    def _get_help_string(self, action) -> str:
        if _accepts_any_module(getattr(action, "_typehint", None)):
            action = copy.copy(action)
            action.extra_help = lambda: self.MODULE_HELP
        return super()._get_help_string(action)


class KDArgumentParser(LightningArgumentParser):
    """LightningCLI's parser with :class:`ModuleHelpFormatter` as its help formatter. jsonargparse builds the parser of
    ``--model.help CLASS`` as ``type(parser)(...)``, so that help is formatted the same way."""

    def __init__(self, *args, formatter_class=ModuleHelpFormatter, **kwargs) -> None:
        super().__init__(*args, formatter_class=formatter_class, **kwargs)


def _label_wandb_run(init: Namespace, config: Namespace) -> None:
    """Name a W&B run "<method> <teacher>-><student> <dataset>", group it by "<dataset> <teacher>-><student>" and tag
    it ``method:``, ``dataset:``, ``teacher:``, ``student:`` (filters on the project page), where ``init`` (the
    logger's ``init_args``) sets none of these."""
    model = config.model.init_args
    method = config.model.class_path.rsplit(".", 1)[-1]
    teacher, student = _short_name(model.get("teacher")), _short_name(model.get("student"))
    pair = "->".join(n for n in (teacher, student) if n)
    dataset = _dataset_name(config.get("data"))
    if init.get("name") is None:
        init["name"] = " ".join(part for part in (method, pair, dataset) if part)
    if init.get("group") is None:
        init["group"] = " ".join(part for part in (dataset, pair) if part)
    if init.get("tags") is None:
        labels = {"method": method, "dataset": dataset, "teacher": teacher, "student": student}
        init["tags"] = [f"{key}:{value}" for key, value in labels.items() if value]


def _run_wandb_offline_where_asked(logger: Namespace) -> None:
    """Log a W&B run offline when its config says ``offline: true``, or when no credentials exist (no
    ``WANDB_API_KEY``, no ``wandb login``) and no ``WANDB_MODE`` is set; then say where, once, on stderr.

    Offline is wandb's own ``mode="offline"`` (a ``dict_kwargs`` of the logger, passed to ``wandb.init``), not
    WandbLogger's ``offline`` flag, which refuses ``log_model``: an offline run records the checkpoints it is asked to
    log as artifacts (their files staged under wandb's data directory) and ``wandb sync`` uploads them with the run.
    """
    init = logger.init_args
    fallback = not init.get("offline") and not os.environ.get("WANDB_MODE") and not _wandb_credentials_available()
    if not (init.get("offline") or fallback):
        return
    init["offline"] = False
    logger["dict_kwargs"] = {**(logger.get("dict_kwargs") or {}), "mode": "offline"}
    if fallback:
        # Where WandbLogger writes: its save_dir (or dir), else wandb's WANDB_DIR or the working directory.
        root = init.get("save_dir") or init.get("dir") or os.environ.get("WANDB_DIR", ".")
        directory = os.path.join(root, "wandb")
        message = (
            f"lightning-kd: no W&B credentials found, logging offline to {directory}. "
            f"Sync later with `wandb sync {os.path.join(directory, 'offline-run-*')}`."
        )
        if init.get("log_model"):
            message += " The checkpoints (log_model) are logged as artifacts of the offline run; the sync uploads them."
        print(message, file=sys.stderr)


class LoggerSaveConfigCallback(SaveConfigCallback):
    """Save ``config.yaml`` in the run's own directory and send the full resolved config to the loggers.

    Lightning saves it in ``trainer.log_dir``: the version directory of a TensorBoard or CSV logger, but the
    ``save_dir`` of a W&B logger, one file that every run overwrote. A W&B run's config goes to
    ``<save_dir>/<project>/<run id>/config.yaml`` instead, the directory Lightning gives that run's
    checkpoints when ``checkpoint.dirpath`` is not set.
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        from pytorch_lightning.loggers import WandbLogger

        logger = trainer.loggers[0] if trainer.loggers else None
        if isinstance(logger, WandbLogger) and self.save_to_log_dir and not self.already_saved:
            if trainer.is_global_zero:
                run_dir = os.path.join(logger.save_dir or trainer.default_root_dir, logger.name, logger.experiment.id)
                os.makedirs(run_dir, exist_ok=True)
                self.parser.save(
                    self.config, os.path.join(run_dir, self.config_filename), skip_none=False,
                    overwrite=self.overwrite, multifile=self.multifile,
                )
            self.save_to_log_dir = False  # saved: Lightning's setup only sends it to the loggers now
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        for logger in trainer.loggers:
            logger.log_hyperparams(self.config.as_dict())


class KDLightningCLI(LightningCLI):
    """LightningCLI with the library's conventions: class count linked from the data, checkpoints on val/acc1,
    a summary at the end of fit (:class:`~lightning_kd.core.FitSummary`), per-class results at the end of fit and
    test (:class:`~lightning_kd.core.PerClassReport`), predictions written by ``predict``
    (:class:`~lightning_kd.core.PredictionWriter`, ``--predictions.path``)."""

    _model_counts_samples = False  # set before instantiation: the configured method declares sample_fields

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        # The training-set size, for methods that keep state per sample (CRD's memory bank); None for the others.
        parser.link_arguments(
            "data", "model.init_args.num_samples", compute_fn=self._training_set_size, apply_on="instantiate"
        )
        # ImageNet subsets: a 1000-class teacher answers for the data's classes only. jsonargparse skips this
        # link for data modules without the attribute, whose models keep teacher_classes unset.
        parser.link_arguments("data.imagenet_class_indices", "model.init_args.teacher_classes", apply_on="instantiate")
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc1",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-epoch{epoch:03d}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        # `predict --predictions.path out.csv` (or .pt) writes the predictions; without it predict writes nothing.
        parser.add_lightning_class_args(PredictionWriter, "predictions")

    def after_predict(self) -> None:
        """Say how to keep the predictions when none were written."""
        if self._get(self.config_init, "predictions").path is None:
            print("lightning-kd: no predictions file written; add --predictions.path predictions.csv (or .pt) to "
                  "write each image's predicted class and probabilities", flush=True)

    def _parse_ckpt_path(self) -> None:
        """With ``--ckpt_path``, the model is the one the checkpoint was written with (its class and arguments).

        Lightning's CLI lets the checkpoint's hyper-parameters silently replace the configured ones. Here every
        configured value that differs from the checkpoint's is named in one error instead; a config that names no
        model takes the checkpoint's. The teacher's weights are in the checkpoint, so ``teacher_ckpt`` may differ
        in path (or the file may be gone): it is not read again, unless it holds another teacher than the one
        the checkpoint recorded, which the model refuses when it loads the checkpoint.
        """
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not os.path.isfile(ckpt_path):
            return  # Lightning's own values ("last", "best") and its error for a missing file
        checkpoint = load_checkpoint_file(ckpt_path, weights_only=True)
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        if "_class_path" not in hparams:
            return
        configured = self.config[subcommand].get("model")
        recorded = Namespace(class_path=hparams.pop("_class_path"), init_args=Namespace(hparams))
        teacher_source = checkpoint.get("teacher_source")
        if configured is not None:
            conflicts = _resume_conflicts(configured, recorded, teacher_source)
            if conflicts:
                lines = "\n".join(f"  {name}: checkpoint {theirs!r}, given {ours!r}" for name, ours, theirs in conflicts)
                raise ValueError(
                    f"--ckpt_path {ckpt_path} was written with other model settings than the ones given:\n{lines}\n"
                    "A resumed run keeps its checkpoint's settings: drop these values (or give the checkpoint's), "
                    "or start a new run to change them."
                )
        teacher_ckpt = (configured or recorded).init_args.get("teacher_ckpt")
        if teacher_source is not None and _names_recorded_teacher(teacher_ckpt, teacher_source):
            teacher_ckpt = None  # the checkpoint holds this teacher's weights: its file is not read again
        hparams["teacher_ckpt"] = teacher_ckpt
        model = {"class_path": recorded.class_path, "dict_kwargs": hparams}
        self.config = self.parser.parse_object({subcommand: {"model": model}}, self.config)

    def instantiate_classes(self) -> None:
        """Instantiate as usual, but surface the error a class raised, not jsonargparse's wrapping of it."""
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as error:
            cause = error
            while cause.__cause__ is not None:
                cause = cause.__cause__
            if cause is error:
                raise
            raise cause from None

    def _training_set_size(self, data) -> Optional[int]:
        """``data.num_train_samples`` for a method that declares ``sample_fields``, else ``None``: the data is read
        (and first downloaded, as ``fit`` would) before the model is built only where the model needs its size."""
        if not self._model_counts_samples or not hasattr(data, "num_train_samples"):
            return None
        data.prepare_data()
        return data.num_train_samples

    def before_instantiate_classes(self) -> None:
        """Note whether the model keeps state per sample; name/group W&B runs by method and pair; fall back to
        offline W&B when no credentials exist."""
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        class_path = config.model.get("class_path") if config.get("model") else None
        model_class = _comparable(class_path) if class_path else None
        self._model_counts_samples = bool(getattr(model_class, "sample_fields", ()))
        self._configure_wandb(config)
        if config.get("trainer") is not None and self._wants_default_progress_bar(config.trainer):
            self.trainer_defaults["callbacks"] = [*self.trainer_defaults["callbacks"], ThrottledProgressBar()]

    @staticmethod
    def _wants_default_progress_bar(trainer: Namespace) -> bool:
        """The bar is on (``enable_progress_bar`` not false) and no progress-bar callback is given: the library's
        :class:`~lightning_kd.core.ThrottledProgressBar` replaces Lightning's every-step bar."""
        if trainer.get("enable_progress_bar") is False:
            return False
        callbacks = trainer.get("callbacks") or []
        for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
            class_path = callback.get("class_path") if hasattr(callback, "get") else None
            given = _comparable(class_path) if class_path else type(callback)
            if isinstance(given, type) and issubclass(given, ProgressBar):
                return False
        return True

    @staticmethod
    def _configure_wandb(config: Namespace) -> None:
        loggers = config.trainer.logger
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            if hasattr(logger, "get") and logger.get("class_path") in WANDB_LOGGERS:
                _require_wandb()
                _label_wandb_run(logger.init_args, config)
                _run_wandb_offline_where_asked(logger)


def cli_main(args=None, run: bool = True) -> KDLightningCLI:
    """Run the LightningCLI (``args`` as a list, e.g. ``["fit", "--config", "x.yaml"]``)."""
    return KDLightningCLI(
        DistillationModule,
        ClassificationDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_class=KDArgumentParser,
        save_config_callback=LoggerSaveConfigCallback,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        # added to the callbacks given, never replaced by them
        trainer_defaults={"callbacks": [FitSummary(), PerClassReport()]},
        args=args,
        run=run,
    )


# The library's own subcommands, run before (and instead of) LightningCLI: name -> (one-line purpose, runner).
LIBRARY_SUBCOMMANDS = {
    "export": ("Export a checkpoint's deployable network (torch.export program or state_dict).",
               "lightning_kd.export:export_cli"),
    "demo": ("Teacher, student alone and student with KD on one short schedule, then their accuracies.",
             "lightning_kd.demo:demo_cli"),
    "methods": ("List the distillation methods, their papers and their shipped configs.",
                "lightning_kd.catalog:methods_cli"),
}
HELP_FLAGS = ("-h", "--help")
# A --config value naming a file by one of these endings is looked up among the shipped configs when missing here;
# any other value (jsonargparse also takes a config given inline) goes to LightningCLI as given.
CONFIG_FILE_ENDINGS = (".yaml", ".yml", ".json", ".jsonnet")


def installed_version() -> str:
    """The installed distribution's version; ``lightning_kd.__version__`` (its source) when none is installed."""
    try:
        return importlib.metadata.version("lightning-kd")
    except importlib.metadata.PackageNotFoundError:
        return lightning_kd.__version__


def _first_sentence(text: Optional[str]) -> str:
    paragraph = " ".join((text or "").strip().split("\n\n")[0].split())
    return paragraph.split(". ")[0].rstrip(".") + "."


def subcommand_summaries() -> dict[str, str]:
    """Every subcommand with its one-line purpose: Lightning's (from the Trainer's docstrings), then the library's."""
    from pytorch_lightning import Trainer

    summaries = {name: _first_sentence(inspect.getdoc(getattr(Trainer, name))) for name in KDLightningCLI.subcommands()}
    summaries.update({name: summary for name, (summary, _) in LIBRARY_SUBCOMMANDS.items()})
    return summaries


def overview() -> str:
    """What ``lightning-kd``, ``-h`` and ``--help`` print: usage, the subcommands, where their options are."""
    summaries = subcommand_summaries()
    width = max(map(len, summaries))

    def lines(names) -> list[str]:
        return [f"  {name:<{width}}  {summaries[name]}" for name in names]

    return "\n".join([
        "usage: lightning-kd <subcommand> [options]",
        "       lightning-kd --version",
        "",
        "Knowledge distillation methods from the literature as PyTorch Lightning modules.",
        "",
        "Train and evaluate (Lightning's CLI, configured by YAML files):",
        *lines(name for name in summaries if name not in LIBRARY_SUBCOMMANDS),
        "",
        "The library's tools:",
        *lines(LIBRARY_SUBCOMMANDS),
        "",
        "Run `lightning-kd <subcommand> --help` for a subcommand's options. Example:",
        "  lightning-kd fit --config configs/cifar100/kd/resnet32x4-resnet8x4.yaml",
        f"A --config path missing from the working directory is read from the shipped configs ({configs_directory()}).",
    ])


def resolve_config_path(value: str) -> str:
    """``value`` of a ``--config``: as given when that file exists here (or when it names no file), else the
    shipped config of that name (``configs/a/b.yaml`` or ``a/b.yaml``); ``FileNotFoundError`` naming both places
    when neither holds it."""
    if os.path.exists(value) or not value.endswith(CONFIG_FILE_ENDINGS):
        return value
    shipped = shipped_config_path(value)
    if shipped is not None and shipped.is_file():
        return str(shipped)
    looked = [os.path.abspath(value)] + ([str(shipped)] if shipped is not None else [])
    raise FileNotFoundError(f"--config {value}: no such file; looked in:\n" + "\n".join(f"  {p}" for p in looked))


def resolve_config_arguments(command: list[str]) -> list[str]:
    """``command`` with every config file of ``--config X``, ``--config=X`` or ``-c X`` resolved by
    :func:`resolve_config_path`."""
    resolved = list(command)
    for index, argument in enumerate(command):
        flag, equals, value = argument.partition("=")
        if flag == "--config" and equals:
            resolved[index] = f"--config={resolve_config_path(value)}"
        elif argument in ("--config", "-c") and index + 1 < len(command):
            resolved[index + 1] = resolve_config_path(command[index + 1])
    return resolved


def missing_teacher_message(error: TeacherNotFoundError) -> str:
    """One line for a teacher checkpoint that is not there, naming the shipped config whose run writes it."""
    config = config_writing(error.path)
    message = f"lightning-kd: error: Teacher checkpoint not found: {error.path}"
    if config is not None:
        message += f"; train the teacher first: lightning-kd fit --config {config}"
    if error.published is not None:
        message += f" (or use a published one: --model.init_args.teacher_ckpt {error.published})"
    return message


def main(argv=None) -> None:
    """``lightning-kd``: the overview, the version, the library's subcommands, else LightningCLI."""
    command = sys.argv[1:] if argv is None else list(argv)
    if not command or command[0] in HELP_FLAGS:
        print(overview())
    elif command[0] == "--version":
        print(f"lightning-kd {installed_version()}")
    elif command[0] in LIBRARY_SUBCOMMANDS:
        module, function = LIBRARY_SUBCOMMANDS[command[0]][1].split(":")
        getattr(importlib.import_module(module), function)(command[1:])
    else:
        try:
            resolved = resolve_config_arguments(command)
        except FileNotFoundError as error:
            sys.exit(f"lightning-kd: error: {error}")
        if argv is None:
            sys.argv[1:] = resolved  # LightningCLI reads sys.argv itself (and warns when given args besides)
        try:
            cli_main(None if argv is None else resolved)
        except TeacherNotFoundError as error:
            sys.exit(missing_teacher_message(error))
        except WandbNotInstalledError as error:
            sys.exit(f"lightning-kd: error: {error}")


if __name__ == "__main__":
    main()
