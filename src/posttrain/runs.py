"""The run folder and the pieces every entry point shares.

Building callbacks/loggers/trainer from their config dicts, recording the config in every
checkpoint, writing `metrics.json`, logging hparams with real metrics, printing the
summary, and turning user errors into one paragraph instead of a traceback.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from posttrain.checkpoints import CONFIG_KEY
from posttrain.errors import PosttrainError

log = logging.getLogger("posttrain")


def find_user_error(error: BaseException) -> PosttrainError | None:
    """The PosttrainError behind `error`, unwrapping Hydra's InstantiationException chain."""
    current: BaseException | None = error
    while current is not None:
        if isinstance(current, PosttrainError):
            return current
        current = current.__cause__ or current.__context__
    return None


def is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def guarded(task: Callable[[DictConfig], dict[str, float]], cfg: DictConfig) -> float | None:
    """Run `task`, returning the optimized metric; user errors print one paragraph.

    In a multirun every failure is recorded in the job's `metrics.json` and the sweep goes
    on (the sweeper gets NaN); in a single run a user error exits with status 2 and no
    traceback, while a bug keeps its traceback.
    """
    output_dir = Path(cfg.paths.output_dir)
    try:
        metrics = task(cfg)
    except Exception as error:
        user_error = find_user_error(error)
        detail = str(user_error) if user_error else "".join(traceback.format_exception(error))
        write_json(output_dir / "metrics.json", {"status": "failed", "error": detail})
        if is_multirun():
            log.error("job failed (the sweep continues): %s", detail)
            return float("nan")
        if user_error is None:
            raise
        print(f"\nposttrain: error: {user_error}\n", file=sys.stderr)
        raise SystemExit(2) from None
    return metrics.get(cfg.get("optimized_metric") or "", None)


def instantiate_named(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry with a `_target_` in a name-keyed config dict (skips nulls)."""
    if not group:
        return []
    return [
        instantiate(entry)
        for entry in group.values()
        if isinstance(entry, DictConfig) and "_target_" in entry
    ]


class ConfigInCheckpoint(Callback):
    """Stores the resolved run config in every checkpoint.

    Evaluation and fine-tuning rebuild the exact model and data from a checkpoint alone.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[CONFIG_KEY] = self.config


def build_components(cfg: DictConfig) -> tuple[L.LightningDataModule, L.LightningModule]:
    """DataModule and method from `cfg.data`, `cfg.model`, `cfg.reg`, `cfg.method`.

    The model is sized to the data (classes, input channels) here, so no config repeats
    those numbers; the selected regularizers are checked against what the method offers
    and attached to its model parts and the data, before any work is done.
    """
    from posttrain.regularizers import RegularizerSet

    datamodule = instantiate(cfg.data)
    model = instantiate(
        cfg.model, num_classes=datamodule.num_classes, in_channels=datamodule.in_channels
    )
    regularizers = RegularizerSet(instantiate_named(cfg.get("reg")))
    method = instantiate(cfg.method, model=model, regularizers=regularizers, _convert_="all")
    regularizers.attach(method, datamodule)
    return datamodule, method


def build_trainer(cfg: DictConfig, extra_callbacks: list[Callback]) -> L.Trainer:
    """The Trainer from `cfg.trainer` with `cfg.callbacks` and `cfg.logger` attached.

    The console shows only what `cfg.callbacks` configures (no tips, no duplicate lines).
    """
    from posttrain.console import console_flags, quiet_console

    quiet_console()
    loggers = instantiate_named(cfg.get("logger"))
    callbacks = instantiate_named(cfg.get("callbacks")) + extra_callbacks
    if not loggers:
        # The LR monitor writes only to loggers; with `logger=none` it has nowhere to write.
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    callbacks, flags = console_flags(cfg.trainer, callbacks)
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **flags)


def flat_hparams(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten a nested config into `a.b.c: scalar` pairs for TensorBoard's HPARAMS tab."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_hparams(value, f"{name}."))
        elif isinstance(value, bool | int | float | str) or value is None:
            flat[name] = "null" if value is None else value
        else:
            flat[name] = str(value)
    return flat


def log_hparams(trainer: L.Trainer, config: dict[str, Any], metrics: dict[str, float]) -> None:
    """Log the run's config with its final metrics, so HPARAMS compares runs on real numbers.

    Only the hparams summaries are written: the metric curves are already in the run under
    the same tags, and Lightning's `log_hyperparams(metrics=...)` would add a stray point to
    each of them.
    """
    from torch.utils.tensorboard.summary import hparams

    params = flat_hparams({k: v for k, v in config.items() if k not in ("paths", "hydra")})
    tracked = {k: v for k, v in metrics.items() if k.startswith(("train/", "val/", "test/"))}
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(params)  # hparams.yaml beside the events
            writer = logger.experiment._get_file_writer()
            for summary in hparams(params, tracked):
                writer.add_summary(summary)
            logger.finalize("success")


def print_summary(output_dir: Path, metrics: dict[str, float], log_root: str) -> None:
    """A few lines a person reads at the end of a run: where, how well, what next."""
    from posttrain.console import tensorboard_logdir

    shown = {k: v for k, v in sorted(metrics.items()) if k.startswith(("test/", "val/acc"))}
    logdir = tensorboard_logdir(output_dir, log_root)
    lines = [
        "",
        f"posttrain: run folder   {output_dir}",
        *(f"  {name:<18} {value:.4f}" for name, value in shown.items()),
        f"  metrics.json       {output_dir / 'metrics.json'}",
        *([f"  TensorBoard        tensorboard --logdir {logdir}"] if logdir else []),
        "",
    ]
    print("\n".join(lines), flush=True)


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def epoch_metrics(values: dict[str, Any]) -> dict[str, float]:
    """Scalar metrics as floats, without Lightning's per-step duplicates (`*_step`)."""
    from posttrain.methods.metrics import to_floats

    return {k: v for k, v in to_floats(values).items() if not k.endswith("_step")}


def record_run(
    trainer: L.Trainer, cfg: DictConfig, config: dict[str, Any], metrics: dict[str, float]
) -> None:
    """metrics.json, TensorBoard hparams with the final metrics, and the printed summary."""
    if not trainer.is_global_zero:
        return
    output_dir = Path(cfg.paths.output_dir)
    write_json(output_dir / "metrics.json", {"status": "completed", **metrics})
    log_hparams(trainer, config, metrics)
    print_summary(output_dir, metrics, cfg.paths.log_dir)
