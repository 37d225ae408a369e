"""Optimizer and learning-rate schedule construction shared by every method.

Configs are plain data (`conf/optimizer/`, `conf/scheduler/`) so every knob has a stable,
sweepable name (`optimizer.lr=...`) and bad values are reported by key.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
from torch import nn

from posttrain.errors import PosttrainError, require, require_choice, require_positive

OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
SCHEDULERS = ("cosine", "step", "none")


def param_groups(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    lr: float,
    weight_decay: float,
    decay_1d: bool,
    lr_scale: Callable[[str], float] | None = None,
) -> list[dict[str, Any]]:
    """Trainable parameters grouped by (decayed?, learning-rate scale).

    Biases and norm weights (1-D tensors) are not decayed unless `decay_1d`: decaying them
    hurts accuracy and buys no regularization (timm's default). `lr_scale(name)` gives
    discriminative learning rates, e.g. backbone = 0.1 x head.
    """
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, parameter in named_parameters:
        if not parameter.requires_grad:
            continue
        decayed = decay_1d or parameter.ndim > 1
        scale = lr_scale(name) if lr_scale else 1.0
        groups.setdefault((decayed, scale), []).append(parameter)
    return [
        {"params": params, "weight_decay": weight_decay if decayed else 0.0, "lr": lr * scale}
        for (decayed, scale), params in groups.items()
    ]


def build_optimizer(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    config: dict[str, Any],
    lr_scale: Callable[[str], float] | None = None,
) -> torch.optim.Optimizer:
    """Optimizer from `{name, lr, weight_decay, decay_1d, momentum, nesterov, betas}`."""
    settings = dict(config)
    name = settings.pop("name", "adamw")
    require_choice("optimizer.name", name, OPTIMIZERS)
    require_positive("optimizer.lr", settings.get("lr"))
    weight_decay = float(settings.pop("weight_decay", 0.0))
    require(weight_decay >= 0, f"`optimizer.weight_decay` must be >= 0, got {weight_decay}.")
    decay_1d = settings.pop("decay_1d", False)
    groups = param_groups(named_parameters, settings["lr"], weight_decay, decay_1d, lr_scale)
    require(bool(groups), "Every parameter is frozen: there is nothing for the optimizer to train.")
    if name != "sgd":
        settings.pop("momentum", None)
        settings.pop("nesterov", None)
    else:
        settings.pop("betas", None)
    if "betas" in settings:
        settings["betas"] = tuple(settings["betas"])
    try:
        return OPTIMIZERS[name](groups, **settings)
    except (TypeError, ValueError) as error:
        raise PosttrainError(f"Config group `optimizer` ({name}) is invalid: {error}.") from error


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up from ~0 to 1, then cosine decay to `min_ratio`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    config: dict[str, Any],
    total_steps: int,
    steps_per_epoch: int,
) -> dict[str, Any] | None:
    """A Lightning `lr_scheduler` dict from `{name, warmup_epochs, min_lr_ratio, step_size, gamma}`.

    Cosine steps every optimizer step (smooth with few epochs); `step` decays per epoch.
    """
    name = config.get("name", "none")
    require_choice("scheduler.name", name, SCHEDULERS)
    if name == "none":
        return None
    if name == "step":
        require_positive("scheduler.step_size", config.get("step_size"))
        scheduler = torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=config["step_size"], gamma=config.get("gamma", 0.1)
        )
        return {"scheduler": scheduler, "interval": "epoch"}
    warmup_epochs = config.get("warmup_epochs", 0)
    require(warmup_epochs >= 0, f"`scheduler.warmup_epochs` must be >= 0, got {warmup_epochs}.")
    factor = partial(
        warmup_cosine_factor,
        warmup_steps=round(warmup_epochs * steps_per_epoch),
        total_steps=max(1, total_steps),
        min_ratio=config.get("min_lr_ratio", 0.0),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"scheduler": scheduler, "interval": "step"}


def schedule_lengths(trainer: Any) -> tuple[int, int]:
    """(total optimizer steps, steps per epoch) of a Lightning trainer's planned run.

    An epoch's steps are its batches over `accumulate_grad_batches`, as Lightning counts
    them; dividing the total by `max_epochs` was wrong whenever `trainer.max_steps` ended the
    run first (`max_epochs=-1 max_steps=60`: a one-epoch warm-up lasted all 60 steps).
    """
    estimate = trainer.estimated_stepping_batches  # inf: max_epochs=-1 and max_steps=-1
    total = int(estimate) if math.isfinite(estimate) else 0
    if trainer.train_dataloader is None:  # not loaded by the estimate when max_epochs=-1
        trainer.fit_loop.setup_data()
    batches = trainer.num_training_batches
    if math.isfinite(batches):
        return total, max(1, math.ceil(batches / trainer.accumulate_grad_batches))
    epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1
    return total, max(1, total // epochs)


def configure_optimization(
    module: Any,
    optimizer_config: dict[str, Any],
    scheduler_config: dict[str, Any],
    lr_scale: Callable[[str], float] | None = None,
) -> Any:
    """What a LightningModule's `configure_optimizers` returns, for every method."""
    optimizer = build_optimizer(module.named_parameters(), optimizer_config, lr_scale)
    total_steps, steps_per_epoch = schedule_lengths(module.trainer)
    name = scheduler_config.get("name", "none")
    require(
        total_steps > 0 or name != "cosine",
        "`scheduler=cosine` anneals over the run's length, and this run has none: "
        "`trainer.max_epochs=-1` with `trainer.max_steps=-1` trains until stopped (it failed "
        "with a traceback). Set `trainer.max_epochs` or `trainer.max_steps`, or use "
        "`scheduler=step` or `scheduler=none`.",
    )
    scheduler = build_scheduler(optimizer, scheduler_config, total_steps, steps_per_epoch)
    if scheduler is None:
        return optimizer
    return {"optimizer": optimizer, "lr_scheduler": scheduler}
