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

from posttrain.errors import (
    PosttrainError,
    is_number,
    require,
    require_bool,
    require_choice,
    require_count,
    require_positive,
)

OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
# Keys that only some optimizers read, and which: given to another one they were dropped.
OPTIMIZER_OWN_KEYS = {"momentum": ("sgd",), "nesterov": ("sgd",), "betas": ("adam", "adamw")}
# The keys each schedule reads (besides `name`).
SCHEDULERS: dict[str, tuple[str, ...]] = {
    "cosine": ("warmup_epochs", "min_lr_ratio"),
    "step": ("step_size", "gamma"),
    "none": (),
}


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
    weight_decay = settings.pop("weight_decay", 0.0)
    require(
        is_number(weight_decay) and weight_decay >= 0,
        f"Config key `optimizer.weight_decay` must be a number >= 0, got {weight_decay!r}.",
    )
    decay_1d = settings.pop("decay_1d", False)
    # Real booleans: `no`/`off` stay truthy strings, which decayed biases or ran Nesterov.
    require_bool("optimizer.decay_1d", decay_1d)
    if "nesterov" in settings:
        require_bool("optimizer.nesterov", settings["nesterov"])
    groups = param_groups(named_parameters, settings["lr"], weight_decay, decay_1d, lr_scale)
    require(bool(groups), "Every parameter is frozen: there is nothing for the optimizer to train.")
    check_own_keys(name, settings)
    if "betas" in settings:
        settings["betas"] = tuple(settings["betas"])
    try:
        return OPTIMIZERS[name](groups, **settings)
    except (TypeError, ValueError) as error:
        raise PosttrainError(f"Config group `optimizer` ({name}) is invalid: {error}.") from error


def check_own_keys(name: str, settings: dict[str, Any]) -> None:
    """`optimizer=adam +optimizer.momentum=0.5` (or `optimizer.name=adam` over the sgd group)
    trained without momentum while the run's config said 0.5: refused, naming the key."""
    for key, owners in OPTIMIZER_OWN_KEYS.items():
        require(
            key not in settings or name in owners,
            f"Config key `optimizer.{key}` is read only by "
            f"{' and '.join(f'`optimizer={owner}`' for owner in owners)}, and this run's "
            f"optimizer is `{name}`, which would ignore it. Remove it (`~optimizer.{key}`), or "
            "choose the optimizer with the group (`optimizer=sgd`, `optimizer=adam`, "
            "`optimizer=adamw`), which brings that optimizer's own keys.",
        )


def check_schedule_keys(name: str, config: dict[str, Any]) -> None:
    """A key the chosen schedule does not read (`scheduler=step +scheduler.warmup_epochs=2`,
    or `scheduler.name=cosine` over the step group) was ignored without a word."""
    unread = sorted(set(config) - {"name", *SCHEDULERS[name]})
    reads = ", ".join(f"`{key}`" for key in SCHEDULERS[name]) or "no keys"
    options = "; ".join(
        f"`scheduler={n}`: {', '.join(keys)}" for n, keys in SCHEDULERS.items() if keys
    )
    require(
        not unread,
        f"Config key {', '.join(f'`scheduler.{key}`' for key in unread)} is not read by "
        f"`scheduler={name}` (it reads {reads}), so it would be ignored. Remove it, or choose "
        f"the schedule that reads it with the group ({options}).",
    )


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up from ~0 to 1, then cosine decay to `min_ratio`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    config: dict[str, Any],
    total_steps: float,
    steps_per_epoch: int,
) -> dict[str, Any] | None:
    """A Lightning `lr_scheduler` dict from `{name, warmup_epochs, min_lr_ratio, step_size, gamma}`.

    Cosine steps every optimizer step (smooth with few epochs); `step` decays per epoch.
    """
    name = config.get("name", "none")
    require_choice("scheduler.name", name, SCHEDULERS)
    check_schedule_keys(name, config)
    if name == "none":
        return None
    if name == "step":
        require_count("scheduler.step_size", config.get("step_size"), 1)
        gamma = config.get("gamma", 0.1)
        require_positive("scheduler.gamma", gamma)
        scheduler = torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=config["step_size"], gamma=gamma
        )
        return {"scheduler": scheduler, "interval": "epoch"}
    warmup_epochs = config.get("warmup_epochs", 0)
    require(
        is_number(warmup_epochs) and warmup_epochs >= 0,
        f"Config key `scheduler.warmup_epochs` must be a number >= 0, got {warmup_epochs!r}.",
    )
    min_ratio = config.get("min_lr_ratio", 0.0)
    require(
        is_number(min_ratio) and 0 <= min_ratio <= 1,
        f"Config key `scheduler.min_lr_ratio` must be in [0, 1] (the final learning rate as a "
        f"fraction of `optimizer.lr`), got {min_ratio!r}.",
    )
    require(
        math.isfinite(total_steps),
        "`scheduler=cosine` decays the learning rate over the run's planned optimizer steps, but "
        "this run has no planned length (`trainer.max_epochs=-1` and `trainer.max_steps=-1`; "
        "`trainer.max_time` stops it at a step nobody knows in advance). Set "
        "`trainer.max_epochs` or `trainer.max_steps`, or use `scheduler=step` or "
        "`scheduler=none`.",
    )
    factor = partial(
        warmup_cosine_factor,
        warmup_steps=round(warmup_epochs * steps_per_epoch),
        total_steps=max(1, int(total_steps)),
        min_ratio=min_ratio,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"scheduler": scheduler, "interval": "step"}


def schedule_lengths(trainer: Any) -> tuple[float, int]:
    """(total optimizer steps, optimizer steps per epoch) of a Lightning trainer's planned run.

    Steps per epoch come from the training loader (its batches over the accumulation), not
    from the total over `max_epochs`: a run bounded by `trainer.max_steps` takes fewer steps
    than its epochs would, so `scheduler.warmup_epochs=1` warmed up over one step
    (`max_steps=10` of 5-step epochs) or over the whole run (`max_epochs=-1`). The total is
    infinite when neither `max_epochs` nor `max_steps` bounds the run.
    """
    total = trainer.estimated_stepping_batches  # loads the training data if epochs bound it
    if trainer.train_dataloader is None:  # `max_epochs=-1`: Lightning returned before loading
        trainer.fit_loop.setup_data()
    batches = trainer.num_training_batches
    per_epoch = (
        math.ceil(batches / trainer.accumulate_grad_batches) if math.isfinite(batches) else 1
    )
    return float(total), max(1, per_epoch)


def configure_optimization(
    module: Any,
    optimizer_config: dict[str, Any],
    scheduler_config: dict[str, Any],
    lr_scale: Callable[[str], float] | None = None,
) -> Any:
    """What a LightningModule's `configure_optimizers` returns, for every method."""
    optimizer = build_optimizer(module.named_parameters(), optimizer_config, lr_scale)
    total_steps, steps_per_epoch = schedule_lengths(module.trainer)
    scheduler = build_scheduler(optimizer, scheduler_config, total_steps, steps_per_epoch)
    if scheduler is None:
        return optimizer
    return {"optimizer": optimizer, "lr_scheduler": scheduler}
