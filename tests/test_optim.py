"""Optimizer parameter groups and learning-rate schedules."""

from __future__ import annotations

import itertools

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from posttrain.errors import PosttrainError
from posttrain.methods.optim import build_optimizer, build_scheduler, warmup_cosine_factor
from posttrain.models import build_classifier
from posttrain.train import train
from tests.conftest import add_callbacks

QUICK = ["logger=none", "callbacks=none", "trainer.accelerator=cpu",
         "trainer.num_sanity_val_steps=0", "+trainer.limit_train_batches=3",
         "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
         "optimizer.lr=0.3", "scheduler.warmup_epochs=1"]  # fmt: skip


def small_model() -> torch.nn.Module:
    return build_classifier("small_cnn", num_classes=3, in_channels=1, width=4)


def test_biases_and_norms_are_not_decayed_by_default() -> None:
    model = small_model()
    optimizer = build_optimizer(
        model.named_parameters(), {"name": "sgd", "lr": 0.1, "weight_decay": 0.01}
    )
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.01 and plain["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decayed["params"])
    assert all(p.ndim == 1 for p in plain["params"])
    total = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == total


@pytest.mark.parametrize(("name", "coupled"), [("adam", True), ("adamw", False), ("sgd", True)])
def test_weight_decay_is_the_l2_update_exactly_where_the_readme_says(
    name: str, coupled: bool
) -> None:
    """README: `optimizer.weight_decay` is decoupled with adamw; with adam (torch's coupled
    decay) and sgd it is the update of `reg=l2` with the same weight. It once called the
    decay "decoupled, AdamW-style" for every optimizer, and adam's equalled reg=l2's."""
    from posttrain.regularizers.base import ModelParts
    from posttrain.regularizers.penalties import L2Penalty

    def one_step(weight_decay: float, l2: float) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = small_model()
        images = torch.randn(4, 1, 8, 8)
        settings = {"name": name, "lr": 0.01, "weight_decay": weight_decay}
        optimizer = build_optimizer(model.named_parameters(), settings)
        loss = model(images).pow(2).mean()
        loss = loss + L2Penalty(weight=l2).penalty(ModelParts.of_classifier(model))
        loss.backward()
        optimizer.step()
        return [p.detach() for p in model.parameters()]

    decayed, penalized = one_step(0.5, 0.0), one_step(0.0, 0.5)
    same = all(torch.allclose(a, b) for a, b in zip(decayed, penalized, strict=True))
    assert same == coupled


def test_decay_1d_puts_everything_in_one_group_and_frozen_parameters_are_skipped() -> None:
    model = small_model()
    model.head.weight.requires_grad_(False)
    optimizer = build_optimizer(
        model.named_parameters(),
        {"name": "adamw", "lr": 1e-3, "weight_decay": 0.1, "decay_1d": True, "betas": [0.9, 0.99]},
    )
    assert len(optimizer.param_groups) == 1
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.99)
    assert all(p is not model.head.weight for p in optimizer.param_groups[0]["params"])


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"name": "lamb", "lr": 0.1}, "optimizer.name"),
        ({"name": "sgd", "lr": 0}, "optimizer.lr"),
        ({"name": "sgd", "lr": 0.1, "weight_decay": -1}, "optimizer.weight_decay"),
        ({"name": "sgd", "lr": 0.1, "weight_decay": "abc"}, "optimizer.weight_decay"),
        # Keys another optimizer reads were dropped without a word.
        ({"name": "adam", "lr": 0.1, "momentum": 0.5}, "optimizer.momentum"),
        ({"name": "adamw", "lr": 0.1, "nesterov": True}, "optimizer.nesterov"),
        ({"name": "sgd", "lr": 0.1, "betas": [0.5, 0.9]}, "optimizer.betas"),
        # `off`/`no` stay truthy strings: biases were decayed, Nesterov switched on.
        ({"name": "sgd", "lr": 0.1, "decay_1d": "off"}, "optimizer.decay_1d"),
        ({"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": "no"}, "optimizer.nesterov"),
    ],
)
def test_bad_optimizer_config_names_the_key(config: dict, key: str) -> None:
    with pytest.raises(PosttrainError, match=key.replace(".", r"\.")):
        build_optimizer(small_model().named_parameters(), config)


@pytest.mark.parametrize(
    ("config", "key"),
    [
        # Keys the chosen schedule does not read were ignored.
        ({"name": "step", "step_size": 2, "warmup_epochs": 2}, "scheduler.warmup_epochs"),
        ({"name": "cosine", "warmup_epochs": 1, "step_size": 3}, "scheduler.step_size"),
        ({"name": "none", "min_lr_ratio": 0.1}, "scheduler.min_lr_ratio"),
        # Values that reversed or froze the schedule without a word.
        ({"name": "cosine", "min_lr_ratio": -1.0}, "scheduler.min_lr_ratio"),
        ({"name": "cosine", "min_lr_ratio": 2.0}, "scheduler.min_lr_ratio"),
        ({"name": "cosine", "warmup_epochs": "abc"}, "scheduler.warmup_epochs"),
        ({"name": "step", "step_size": 2.5}, "scheduler.step_size"),
        ({"name": "step", "step_size": 2, "gamma": -0.5}, "scheduler.gamma"),
    ],
)
def test_bad_scheduler_config_names_the_key(config: dict, key: str) -> None:
    optimizer = build_optimizer(small_model().named_parameters(), {"name": "sgd", "lr": 1.0})
    with pytest.raises(PosttrainError, match=key.replace(".", r"\.")):
        build_scheduler(optimizer, config, total_steps=100, steps_per_epoch=10)


def test_a_key_the_optimizer_ignores_is_refused_in_a_run(make_config) -> None:
    """`optimizer=adam +optimizer.momentum=0.5` trained plain Adam, the config saying 0.5."""
    cfg = make_config(*QUICK, "optimizer=adam", "+optimizer.momentum=0.5")
    with pytest.raises(PosttrainError, match=r"optimizer\.momentum.*optimizer=sgd"):
        train(cfg)


def test_warmup_then_cosine_shape() -> None:
    factors = [
        warmup_cosine_factor(s, warmup_steps=10, total_steps=110, min_ratio=0.1) for s in range(110)
    ]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[10:]))
    assert factors[-1] == pytest.approx(0.1, abs=1e-3)


def test_schedulers_drive_the_learning_rate() -> None:
    def lr_after(config: dict, steps: int) -> float:
        optimizer = build_optimizer(small_model().named_parameters(), {"name": "sgd", "lr": 1.0})
        scheduler = build_scheduler(optimizer, config, total_steps=100, steps_per_epoch=10)
        for _ in range(steps):
            optimizer.step()
            scheduler["scheduler"].step()
        return optimizer.param_groups[0]["lr"]

    assert lr_after({"name": "step", "step_size": 2, "gamma": 0.5}, 2) == pytest.approx(0.5)
    assert lr_after({"name": "cosine", "warmup_epochs": 1}, 55) == pytest.approx(0.5, abs=0.03)
    optimizer = build_optimizer(small_model().named_parameters(), {"name": "sgd", "lr": 1.0})
    assert build_scheduler(optimizer, {"name": "none"}, 100, 10) is None
    with pytest.raises(PosttrainError, match=r"scheduler\.name"):
        build_scheduler(optimizer, {"name": "onecycle"}, 100, 10)


class LearningRates(Callback):
    """The first parameter group's learning rate at every optimizer step."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.lrs.append(optimizer.param_groups[0]["lr"])


@pytest.mark.parametrize("max_epochs", [30, -1])
def test_warmup_lasts_one_epoch_when_max_steps_ends_the_run(
    make_config, monkeypatch: pytest.MonkeyPatch, max_epochs: int
) -> None:
    """`warmup_epochs=1` of 3-step epochs is 3 steps, also when `max_steps` bounds the run:
    steps per epoch were total / max_epochs (6 // 30 -> 1 step of warm-up; -1 -> 6)."""
    probe = LearningRates()
    add_callbacks(monkeypatch, probe)
    train(make_config(*QUICK, f"trainer.max_epochs={max_epochs}", "trainer.max_steps=6"))
    assert probe.lrs[:4] == pytest.approx([0.1, 0.2, 0.3, 0.3])
    assert probe.lrs[4] < 0.3 and len(probe.lrs) == 6


def test_cosine_without_a_planned_length_is_refused(make_config) -> None:
    cfg = make_config(*QUICK, "trainer.max_epochs=-1", "+trainer.max_time=00:00:00:05")
    with pytest.raises(PosttrainError, match=r"scheduler=cosine.*trainer\.max_steps"):
        train(cfg)
