"""The ``lightning-kd`` command: LightningCLI in subclass mode, plus ``export``.

    lightning-kd fit --config configs/cifar100/kd/resnet32x4-resnet8x4.yaml
    lightning-kd fit --config <method>.yaml --config configs/logger/wandb.yaml
    lightning-kd export --ckpt_path runs/.../last.ckpt --output student.pt2
    lightning-kd demo [--root /path/to/imagefolder]
"""
from __future__ import annotations

import os
import sys
from typing import Optional

from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from lightning_kd.core import DistillationModule
from lightning_kd.data import ClassificationDataModule

WANDB_LOGGERS = ("pytorch_lightning.loggers.WandbLogger", "pytorch_lightning.loggers.wandb.WandbLogger")


def _wandb_credentials_available() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = os.path.join(os.path.expanduser("~"), ".netrc")
    return os.path.isfile(netrc) and "api.wandb.ai" in open(netrc).read()


def _short_name(spec) -> Optional[str]:
    """'resnet8' for a model name, the class name for a class_path spec, None for no model."""
    if spec is None or isinstance(spec, str):
        return spec
    class_path = spec.get("class_path") if hasattr(spec, "get") else None
    return class_path.rsplit(".", 1)[-1] if class_path else type(spec).__name__


class LoggerSaveConfigCallback(SaveConfigCallback):
    """Save ``config.yaml`` beside the logs and send the full resolved config to the logger as hyper-parameters."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        for logger in trainer.loggers:
            logger.log_hyperparams(self.config.as_dict())


class KDLightningCLI(LightningCLI):
    """LightningCLI with the library's conventions: class count linked from the data, checkpoints on val/acc1."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        # ImageNet subsets: a 1000-class teacher answers for the data's classes only. jsonargparse skips this
        # link for data modules without the attribute, whose models keep teacher_classes unset.
        parser.link_arguments("data.imagenet_class_indices", "model.init_args.teacher_classes", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc1",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-epoch{epoch:03d}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )

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

    def before_instantiate_classes(self) -> None:
        """Name/group W&B runs by method and pair; fall back to offline W&B when no credentials exist."""
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        loggers = config.trainer.logger
        loggers = loggers if isinstance(loggers, list) else [loggers]
        for logger in loggers:
            if not (hasattr(logger, "get") and logger.get("class_path") in WANDB_LOGGERS):
                continue
            init = logger.init_args
            model = config.model.init_args
            method = config.model.class_path.rsplit(".", 1)[-1]
            pair = "->".join(n for n in (_short_name(model.get("teacher")), _short_name(model.get("student"))) if n)
            if init.get("name") is None:
                init["name"] = f"{method} {pair}"
            if init.get("group") is None:
                init["group"] = pair
            if not init.get("offline") and not os.environ.get("WANDB_MODE") and not _wandb_credentials_available():
                init["offline"] = True
                print(
                    "lightning-kd: no W&B credentials found, logging offline to ./wandb. "
                    "Sync later with `wandb sync <save_dir>/wandb/offline-run-*`.",
                    file=sys.stderr,
                )


def cli_main(args=None, run: bool = True) -> KDLightningCLI:
    """Run the LightningCLI (``args`` as a list, e.g. ``["fit", "--config", "x.yaml"]``)."""
    return KDLightningCLI(
        DistillationModule,
        ClassificationDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=LoggerSaveConfigCallback,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        args=args,
        run=run,
    )


def main(argv=None) -> None:
    command = sys.argv[1:] if argv is None else list(argv)
    if command[:1] == ["export"]:
        from lightning_kd.export import export_cli

        export_cli(command[1:])
    elif command[:1] == ["demo"]:
        from lightning_kd.demo import demo_cli

        demo_cli(command[1:])
    else:
        cli_main(argv)  # None: LightningCLI reads sys.argv itself


if __name__ == "__main__":
    main()
