"""Optimizer parameter groups and learning-rate schedules."""

from __future__ import annotations

import itertools

import pytest
import torch

from posttrain.errors import PosttrainError
from posttrain.methods.optim import build_optimizer, build_scheduler, warmup_cosine_factor
from posttrain.models import build_classifier


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
    ],
)
def test_bad_optimizer_config_names_the_key(config: dict, key: str) -> None:
    with pytest.raises(PosttrainError, match=key.replace(".", r"\.")):
        build_optimizer(small_model().named_parameters(), config)


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


def learning_rates(tmp_path, *overrides: str) -> list[float]:
    """The learning rate at every training step of a tiny real run (5 batches an epoch)."""
    from lightning.pytorch.callbacks import Callback

    from posttrain.train import train
    from tests.conftest import add_callbacks, compose_config

    seen: list[float] = []

    class Probe(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    limits = ["trainer.limit_train_batches=5", "trainer.limit_val_batches=1"]
    quiet = ["logger=none", "callbacks=none", "model.width=4", "trainer.limit_test_batches=1"]
    with pytest.MonkeyPatch.context() as monkeypatch:
        add_callbacks(monkeypatch, Probe())
        train(compose_config(tmp_path, [*quiet, *limits, *overrides]))
    return seen


@pytest.mark.parametrize("epochs", [-1, 30])
def test_warmup_lasts_one_epoch_when_max_steps_ends_the_run(tmp_path, epochs: int) -> None:
    """Observed: steps per epoch were the total over `max_epochs`, so a run ended by
    `max_steps=20` warmed up for all 20 steps (max_epochs=-1) or for none (max_epochs=30)
    of a one-epoch (5-step) warm-up. Its schedule is now that of the same 4 epochs."""
    by_epochs = learning_rates(tmp_path / "epochs", "trainer.max_epochs=4")
    by_steps = learning_rates(
        tmp_path / "steps", f"trainer.max_epochs={epochs}", "trainer.max_steps=20"
    )
    assert len(by_steps) == 20 and by_steps == pytest.approx(by_epochs)
    assert max(range(20), key=by_steps.__getitem__) == 4  # the peak ends the 5-step warm-up


def test_cosine_without_a_run_length_is_refused(tmp_path) -> None:
    """Observed: `max_epochs=-1 max_steps=-1` failed with OverflowError (inf steps)."""
    from posttrain.runs import find_user_error

    with pytest.raises(Exception) as refused:
        learning_rates(tmp_path, "trainer.max_epochs=-1", "trainer.max_steps=-1")
    assert "scheduler=cosine" in str(find_user_error(refused.value))
