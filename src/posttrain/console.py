"""What a person reads while a run goes: a start statement, one line per epoch, the run's ETA.

Lightning's defaults are written for a terminal (bars redrawn with carriage returns, a model
table, tips); in a log file they are noise. Here a TTY keeps its bar (with the run's ETA) and
anything else gets one plain line per epoch. `quiet_console()` routes Lightning's log lines
through the one handler Hydra configured, without the tips.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelSummary, ProgressBar, TQDMProgressBar

# Lightning INFO lines the start statement replaces, and advertisements.
NOISE = (
    "💡 Tip:",
    "GPU available:",
    "TPU available:",
    "HPU available:",
    "Loading `train_dataloader` to estimate number of stepping batches",
    "`Trainer.fit` stopped: `max_",  # max_epochs/max_steps: the last epoch line says it
    "Loaded model weights from the checkpoint at",  # follows "Restoring states from ..."
    # The method's callbacks (reg=ema/swa/early_stopping, freeze schedules) are made afresh
    # for the test after fit: expected, nothing is lost.
    "The following callbacks returned in `LightningModule.configure_callbacks` will override",
)
# Shown in the epoch line, when logged (training metrics and the last validation).
EPOCH_METRICS = ("train/loss", "val/loss", "val/acc")

log = logging.getLogger("posttrain")


def say(text: str) -> None:
    """To Hydra's console and the run's `<job>.log` when logging is configured, else stdout."""
    if log.hasHandlers():
        log.info(text)
    else:
        print(text, flush=True)


class DropNoise(logging.Filter):
    """Drops Lightning's tips and the accelerator lines the start statement already states."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(NOISE)


def quiet_console() -> None:
    """One copy of every log line: Lightning's own handler goes when Hydra's root one exists.

    `import lightning` adds a stderr handler to its logger while the records also propagate
    to Hydra's root handler (console and `<job>.log`), so each line printed twice.
    """
    if logging.getLogger().hasHandlers():
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                if type(handler) is logging.StreamHandler:
                    logger.removeHandler(handler)
            logger.propagate = True
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, DropNoise) for f in rank_zero.filters):
        rank_zero.addFilter(DropNoise())
    # Lightning 2.6 calls a torch API torch deprecated; nothing a user can act on.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # Run folders are unique per run, so a non-empty checkpoint folder is a resume in place
    # (`ckpt_path=last`) or a re-run sweep job: expected, and said in its own log line.
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")


def duration(seconds: float) -> str:
    """`42s`, `3m05s`, `2h07m`: short enough for a bar postfix."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def count(number: int) -> str:
    """Parameter counts as people say them: 140 K, 11.2 M."""
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if number >= size:
            return f"{number / size:.3g} {unit}"
    return str(number)


def run_fraction(trainer: L.Trainer, within_epoch: float = 0.0) -> float | None:
    """How much of the fit is done, by whichever limit (epochs or steps) ends it first."""
    parts = []
    if trainer.max_epochs is not None and trainer.max_epochs > 0:
        parts.append((trainer.current_epoch + within_epoch) / trainer.max_epochs)
    if trainer.max_steps > 0:
        parts.append(trainer.global_step / trainer.max_steps)
    return min(max(parts), 1.0) if parts else None


class RunClock:
    """Elapsed time and the run's ETA, measured from where this process started (resume too)."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.start_fraction = 0.0

    def start(self, trainer: L.Trainer) -> None:
        self.started = time.monotonic()
        self.start_fraction = run_fraction(trainer) or 0.0

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def eta(self, trainer: L.Trainer, within_epoch: float) -> float | None:
        fraction = run_fraction(trainer, within_epoch)
        if fraction is None or fraction <= self.start_fraction:
            return None
        return self.elapsed() * (1.0 - fraction) / (fraction - self.start_fraction)


def epoch_label(trainer: L.Trainer, epoch: int) -> str:
    """`epoch 3/30`, or with a step limit `epoch 3 (step 120/500)`."""
    label = f"epoch {epoch + 1}"
    if trainer.max_epochs is not None and trainer.max_epochs > 0:
        label += f"/{trainer.max_epochs}"
    if trainer.max_steps > 0:
        label += f" (step {trainer.global_step}/{trainer.max_steps})"
    return label


class EpochReport:
    """The one-line epoch summary both progress callbacks print.

    Lightning updates the epoch metrics after every `on_train_epoch_end` hook, so the line
    for an epoch is printed when the next epoch starts or training ends.
    """

    def __init__(self) -> None:
        self.clock = RunClock()
        self.pending: tuple[int, float, float | None] | None = None
        self.validated = False

    def end_epoch(self, trainer: L.Trainer) -> None:
        eta = self.clock.eta(trainer, within_epoch=1.0)
        self.pending = (trainer.current_epoch, self.clock.elapsed(), eta)

    def take_line(self, trainer: L.Trainer) -> str | None:
        """The pending epoch's line (once), or None."""
        if self.pending is None:
            return None
        epoch, elapsed, eta = self.pending
        self.pending = None
        metrics = trainer.callback_metrics
        shown = [
            f"{name} {float(metrics[name]):.4f}"
            for name in EPOCH_METRICS
            if name in metrics and (self.validated or not name.startswith("val/"))
        ]
        self.validated = False
        times = [f"elapsed {duration(elapsed)}"]
        if eta is not None:
            times.append(f"ETA {duration(eta)}")
        return "  ".join([epoch_label(trainer, epoch), *shown, *times])


class EpochLines(ProgressBar):
    """No bars: one line per epoch, for logs and pipes (carriage returns flood them)."""

    def __init__(self) -> None:
        super().__init__()
        self.enabled = True
        self.report = EpochReport()

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def flush(self, trainer: L.Trainer) -> None:
        line = self.report.take_line(trainer)
        if line and self.enabled:
            say(line)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.report.clock.start(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.report.validated = not trainer.sanity_checking

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.report.end_epoch(trainer)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.flush(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.flush(trainer)


class BarWithEta(TQDMProgressBar):
    """Lightning's terminal bar: 1-based epochs, the run's ETA, a line kept per epoch."""

    def __init__(self, refresh_rate: int = 1) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self.report = EpochReport()
        self.within_epoch = 0.0

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = {
            k: v for k, v in super().get_metrics(trainer, pl_module).items() if k in EPOCH_METRICS
        }
        eta = self.report.clock.eta(trainer, self.within_epoch)
        if eta is not None and trainer.training:
            items["ETA"] = duration(eta)
        return items

    def flush(self, trainer: L.Trainer) -> None:
        line = self.report.take_line(trainer)
        if line and self.is_enabled:
            self.print(line)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.report.clock.start(trainer)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        total = self.total_train_batches
        self.within_epoch = (batch_idx + 1) / total if 0 < total < float("inf") else 0.0
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self.report.validated = not trainer.sanity_checking

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.within_epoch = 1.0
        super().on_train_epoch_end(trainer, pl_module)
        self.report.end_epoch(trainer)

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self.flush(trainer)
        self.within_epoch = 0.0
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(epoch_label(trainer, trainer.current_epoch))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.flush(trainer)
        super().on_train_end(trainer, pl_module)


def progress_bar(refresh_rate: int = 10) -> ProgressBar:
    """A bar on a terminal, one line per epoch anywhere else (files, pipes, SLURM logs)."""
    return BarWithEta(refresh_rate) if sys.stdout.isatty() else EpochLines()


def hydra_choices() -> dict[str, Any]:
    """The config options this run was composed from (`data: digits`), if Hydra runs it."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    return dict(HydraConfig.get().runtime.choices)


def data_line(datamodule: Any, choices: dict[str, Any]) -> str:
    """`digits: 1257 train / 180 val / 360 test examples, 10 classes` (sizes when known)."""
    name = choices.get("data") or type(datamodule).__name__
    splits = getattr(datamodule, "splits", None) or {}
    pools = getattr(datamodule, "pools", None) or {}
    parts, unit = (splits, "examples") if splits else (pools, "classes")
    sizes = " / ".join(f"{len(part)} {split}" for split, part in parts.items())
    details = [f"{sizes} {unit}"] if sizes else []
    if getattr(datamodule, "num_classes", None):
        details.append(f"{datamodule.num_classes} classes")
    return f"{name}: {', '.join(details)}" if details else str(name)


def model_line(
    pl_module: L.LightningModule, choices: dict[str, Any], trainer: L.Trainer | None = None
) -> str:
    """The model's name and parameter counts (the compact model summary).

    Training (`trainer` given), a method that freezes on a schedule says what trains at the
    start (`trainable_at_start`): its freeze is applied in a callback that runs after this
    statement, so counting `requires_grad` here printed the unfrozen count.
    """
    model = getattr(pl_module, "model", pl_module)
    name = choices.get("model") or type(model).__name__
    total = sum(p.numel() for p in pl_module.parameters())
    planned = getattr(pl_module, "trainable_at_start", None)
    if trainer is not None and callable(planned):
        trainable = planned(trainer)
    else:
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
    return f"{name}: {count(total)} parameters ({count(trainable)} trainable)"


def plural(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def length_line(trainer: L.Trainer) -> str:
    limits = []
    if trainer.max_epochs is not None and trainer.max_epochs > 0:
        limits.append(plural(trainer.max_epochs, "epoch"))
    if trainer.max_steps > 0:
        limits.append(plural(trainer.max_steps, "step"))
    length = " or ".join(limits) or "until stopped"
    if trainer.ckpt_path:
        length += f", resuming {trainer.ckpt_path}"
    return length


def device_line(trainer: L.Trainer) -> str:
    import torch

    device = trainer.strategy.root_device.type
    line = f"{device} x{trainer.num_devices * trainer.num_nodes}, precision {trainer.precision}"
    if device == "cpu" and torch.cuda.is_available():
        line += " (a GPU is available: trainer=gpu)"
    seed = os.environ.get("PL_GLOBAL_SEED")
    return f"{line}, seed {seed}" if seed is not None else line


def run_statement(trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> str:
    """The few lines that say what this run will do, before it does it."""
    choices = hydra_choices()
    members = getattr(getattr(pl_module, "regularizers", None), "members", [])
    rows = [
        ("data", data_line(trainer.datamodule, choices)),
        ("model", model_line(pl_module, choices, trainer if stage == "train" else None)),
        ("method", getattr(pl_module, "method_name", None) or choices.get("method", "?")),
        ("regularizers", ", ".join(getattr(m, "key", type(m).__name__) for m in members) or "none"),
        *([("length", length_line(trainer))] if stage == "train" else []),
        *([("checkpoint", str(trainer.ckpt_path))] if stage == "test" else []),
        ("device", device_line(trainer)),
        ("run folder", str(trainer.default_root_dir)),
    ]
    return "\n".join([f"posttrain: {stage}", *(f"  {key:<13}{value}" for key, value in rows)])


class RunStatement(ModelSummary):
    """States what the run will do at its start; replaces Lightning's model table.

    A ModelSummary subclass so Lightning adds no table of its own (with `Total FLOPs: 0`
    for every model); the parameter counts are in the `model` line.
    """

    def __init__(self) -> None:
        super().__init__(max_depth=0)
        self.stated = False

    def state(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.stated and trainer.is_global_zero:
            say(run_statement(trainer, pl_module, stage))
        self.stated = True

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.state(trainer, pl_module, "train")

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.state(trainer, pl_module, "test")


def console_flags(
    trainer_cfg: Any, callbacks: list[L.Callback]
) -> tuple[list[L.Callback], dict[str, bool]]:
    """Lightning's bar and model summary come only from `cfg.callbacks`.

    Lightning adds its own (a carriage-return bar, a table with `Total FLOPs: 0`) when none
    is configured, so `callbacks.progress_bar=null` would not mean "no bar"; and a trainer
    flag set to false drops the configured one instead of Lightning refusing the pair.
    """
    for flag, kind in (
        ("enable_progress_bar", ProgressBar),
        ("enable_model_summary", ModelSummary),
    ):
        if not trainer_cfg.get(flag, True):
            callbacks = [c for c in callbacks if not isinstance(c, kind)]
    bar = any(isinstance(c, ProgressBar) for c in callbacks)
    # False even with a configured summary: True only adds Lightning's default or a notice.
    return callbacks, {"enable_progress_bar": bar, "enable_model_summary": False}


def tensorboard_logdir(output_dir: Path, log_root: str) -> Path | None:
    """A logdir holding this run's events: all runs under `log_root` if it is there, else the run.

    None when the run wrote no TensorBoard events (`logger=none`, `logger=csv`).
    """
    if next(output_dir.rglob("events.out.tfevents.*"), None) is None:
        return None
    root = Path(log_root)
    return root if output_dir.resolve().is_relative_to(root.resolve()) else output_dir
