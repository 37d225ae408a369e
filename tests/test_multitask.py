"""Multi-task learning: heads per task, loss weighting, masked targets, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from posttrain.data import ImageClassificationDataModule
from posttrain.errors import PosttrainError
from posttrain.methods.multitask import MultiTaskClassifier, masked_cross_entropy
from posttrain.models import build_classifier
from tests.conftest import PROBE, read_probes, run_cli

TASKS = {"digit": {"target": "label"}, "parity": {"target": "parity"}, "large": {"target": "large"}}
OPTIMIZER = {"name": "adamw", "lr": 0.01}


def method(weighting: str = "equal") -> MultiTaskClassifier:
    torch.manual_seed(0)
    model = build_classifier("small_cnn", num_classes=10, in_channels=1, width=8)
    return MultiTaskClassifier(model, OPTIMIZER, {"name": "none"}, tasks=TASKS, weighting=weighting)


def test_targets_are_derived_from_the_label() -> None:
    datamodule = ImageClassificationDataModule(targets=TASKS)
    datamodule.setup()
    targets = datamodule.task_targets["test"]
    labels = datamodule.splits["test"].labels
    assert torch.equal(targets["digit"], labels)
    assert torch.equal(targets["parity"], labels % 2)
    assert torch.equal(targets["large"], (labels >= 5).long())


def test_derived_targets_are_properties_of_the_digit_under_data_classes() -> None:
    """Observed: with `data.classes=[1,3,5,7,9]` the parity of the (all odd) digits was
    0,1,0,1,0 and `large` 0,0,0,1,1: both were computed on the relabelled index 0..4."""
    classes = [2, 3, 5, 8, 9]  # kept index -> digit
    datamodule = ImageClassificationDataModule(classes=classes, targets=TASKS)
    datamodule.setup()
    targets = datamodule.task_targets["test"]
    digits = torch.tensor(classes)[datamodule.splits["test"].labels]
    assert torch.equal(targets["digit"], datamodule.splits["test"].labels)
    assert torch.equal(targets["parity"], digits % 2)
    assert torch.equal(targets["large"], (digits >= 5).long())
    assert sorted(set(zip(digits.tolist(), targets["parity"].tolist(), strict=True))) == [
        (2, 0), (3, 1), (5, 1), (8, 0), (9, 1)
    ]  # fmt: skip


def test_a_target_with_one_value_over_the_kept_classes_is_refused() -> None:
    with pytest.raises(PosttrainError, match=r"data\.targets\.parity.*data\.classes"):
        ImageClassificationDataModule(classes=[1, 3, 5, 7, 9], targets=TASKS)


def test_one_head_per_task_with_the_right_sizes() -> None:
    learner = method()
    outputs = learner(torch.randn(4, 1, 16, 16))
    assert {k: tuple(v.shape) for k, v in outputs.items()} == {
        "digit": (4, 10),
        "parity": (4, 2),
        "large": (4, 2),
    }


def test_masked_targets_contribute_no_gradient() -> None:
    logits = torch.randn(4, 3, requires_grad=True)
    targets = torch.tensor([0, -1, 2, -1])
    masked_cross_entropy(logits, targets).backward()
    assert logits.grad[1].abs().sum() == 0 and logits.grad[3].abs().sum() == 0
    assert logits.grad[0].abs().sum() > 0
    empty = torch.randn(2, 3, requires_grad=True)
    loss = masked_cross_entropy(empty, torch.tensor([-1, -1]))
    loss.backward()
    assert float(loss) == 0.0 and empty.grad.abs().sum() == 0


def test_missing_fraction_marks_training_targets_absent() -> None:
    datamodule = ImageClassificationDataModule(
        targets={"digit": {"target": "label"}, "parity": {"target": "parity", "missing": 0.5}}
    )
    datamodule.setup()
    absent = (datamodule.task_targets["train"]["parity"] == -1).float().mean()
    assert 0.4 < absent < 0.6
    assert (datamodule.task_targets["test"]["parity"] != -1).all()  # evaluation is complete


def test_task_loss_epoch_mean_is_over_present_targets() -> None:
    """Observed: `+data.targets.parity.missing=0.9` with batch 8 logged `train/parity/loss`
    0.19 where the mean over the labelled images was 0.38: each batch's masked mean was
    weighted by the batch size, and a batch with no parity label added a 0 at full weight."""
    learner = method()
    images = torch.randn(8, 1, 16, 16)
    targets = {"digit": torch.arange(8), "parity": torch.arange(8) % 2, "large": torch.zeros(8)}
    targets["large"] = targets["large"].long()
    unlabelled = {**targets, "parity": torch.full((8,), -1)}
    half = {**targets, "parity": torch.tensor([0, 1, -1, -1, -1, -1, -1, -1])}
    learner.record(
        "train", learner.step((images[:4], {k: v[:4] for k, v in unlabelled.items()}), "train")
    )
    learner.record("train", learner.step((images, half), "train"))
    with torch.no_grad():
        logits = learner(images)["parity"][:2]
    expected = torch.nn.functional.cross_entropy(logits, half["parity"][:2])
    values = learner.means.compute_and_reset("train/")
    assert float(values["train/parity/loss"]) == pytest.approx(float(expected), rel=1e-5)
    # An epoch in which a task had no label at all has no mean for it (not 0, not NaN).
    learner.record("train", learner.step((images, unlabelled), "train"))
    values = learner.means.compute_and_reset("train/")
    assert "train/parity/loss" not in values and "train/digit/loss" in values


def test_a_task_without_labels_in_an_epoch_has_no_accuracy() -> None:
    """Observed: torchmetrics' accuracy over no labels is 0.0, so an epoch in which every
    `parity` target was absent (`missing=0.9`, one batch of 8) logged `train/parity/acc` 0."""
    learner = method()
    images = torch.randn(8, 1, 16, 16)
    targets = {"digit": torch.arange(8), "parity": torch.full((8,), -1), "large": torch.ones(8)}
    targets["large"] = targets["large"].long()
    learner.step((images, targets), "train")
    values = learner.metrics.compute_and_reset("train")
    assert "train/parity/acc" not in values
    assert {"train/digit/acc", "train/large/acc", "train/acc"} <= set(values)
    # The main task without labels: no `train/acc` either (nor a gap computed from it).
    learner.step((images, {**targets, "digit": torch.full((8,), -1)}), "train")
    values = learner.metrics.compute_and_reset("train")
    assert "train/acc" not in values and "train/digit/acc" not in values


def test_uncertainty_weights_are_learned() -> None:
    learner = method("uncertainty")
    before = learner.weighting.weights().clone()
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.1)
    images = torch.randn(8, 1, 16, 16)
    targets = {
        "digit": torch.arange(8),
        "parity": torch.arange(8) % 2,
        "large": (torch.arange(8) >= 4).long(),
    }
    for _ in range(3):
        optimizer.zero_grad()
        outputs = learner(images)
        losses = torch.stack(
            [masked_cross_entropy(outputs[n], targets[n]) for n in learner.task_names]
        )
        learner.weighting(losses).backward()
        optimizer.step()
    assert not torch.allclose(before, learner.weighting.weights())


def test_dwa_reweights_after_two_epochs() -> None:
    weighting = method("dwa").weighting
    for epoch_losses in ([1.0, 1.0, 1.0], [0.5, 1.0, 0.9]):
        weighting.end_epoch(list(torch.tensor(epoch_losses)))
    weights = weighting.weights()
    assert weights.sum() == pytest.approx(3.0)
    assert weights[1] > weights[2] > weights[0]  # the task that improved least weighs most
    # Liu et al. 2019: w_k = K exp(r_k / T) / sum_j exp(r_j / T), r_k = L_k(t-1) / L_k(t-2).
    ratios = torch.tensor([0.5, 1.0, 0.9])
    expected = 3 * torch.exp(ratios / 2.0) / torch.exp(ratios / 2.0).sum()
    torch.testing.assert_close(weights, expected)


def test_dwa_epoch_losses_are_the_logged_task_losses() -> None:
    """Observed: with `+data.targets.parity.missing=0.8` and batch 4, DWA took parity's epoch
    loss as 0.43 while `train/parity/loss` was 0.71: it averaged the per-step losses, a batch
    without a parity label counting as 0 (and, under DDP, each rank its own)."""
    learner = method("dwa")
    images = torch.randn(8, 1, 16, 16)
    targets = {"digit": torch.arange(8), "parity": torch.arange(8) % 2, "large": torch.zeros(8)}
    targets["large"] = targets["large"].long()
    unlabelled = {**targets, "parity": torch.full((8,), -1)}
    for _ in range(2):
        for batch in (targets, unlabelled):
            learner.record("train", learner.step((images, batch), "train"))
        values = learner.epoch_values("train")
        logged = torch.stack([values[f"train/{n}/loss"] for n in learner.task_names])
        torch.testing.assert_close(learner.weighting.epoch_losses[-1], logged)
        assert float(values["train/parity/weight"]) == 1.0  # equal for two epochs
    # An epoch in which a task had no label at all has no loss ratio: not recorded.
    learner.record("train", learner.step((images, unlabelled), "train"))
    learner.epoch_values("train")
    assert len(learner.weighting.epoch_losses) == 2


def test_targets_with_a_single_task_method_are_refused_before_training(tmp_path: Path) -> None:
    """Observed: `experiment=digits_multitask method=supervised` started training and
    failed at the first step with `TypeError: cross_entropy_loss(): argument 'target' ...
    must be Tensor, not dict`."""
    from posttrain.runs import build_components
    from tests.conftest import compose_config

    cfg = compose_config(tmp_path, ["experiment=digits_multitask", "method=supervised"])
    with pytest.raises(PosttrainError, match=r"`data\.targets`.*`method=multitask`"):
        build_components(cfg)


def test_multitask_without_targets_is_a_clear_error() -> None:
    model = build_classifier("small_cnn", 10, 1)
    with pytest.raises(PosttrainError, match=r"data\.targets"):
        MultiTaskClassifier(model, OPTIMIZER, {"name": "none"}, tasks=None)


@pytest.mark.slow
def test_cli_trains_and_writes_per_task_metrics(tmp_path: Path) -> None:
    result = run_cli(
        "train.py",
        "experiment=digits_multitask",
        "method.weighting=uncertainty",
        "debug=limit",
        "logger=tensorboard",
        PROBE,
        f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tasks = ("digit", "parity", "large")
    # Each task's test accuracy and loss weight is in metrics.json and TensorBoard, the same.
    for task in tasks:
        for key in (f"test/{task}/acc", f"train/{task}/weight"):
            assert events.Scalars(key)[-1].value == pytest.approx(metrics[key]), key
    assert metrics["test/acc"] == metrics["test/digit/acc"]  # the first task is the main one
    # Uncertainty weighting learned: its log-variances trained, so the weights left 1.0.
    (probe,) = read_probes(tmp_path)
    assert [v for n, v in probe["changed"].items() if "log_vars" in n] == [True]
    assert all(metrics[f"train/{task}/weight"] != 1.0 for task in tasks)


def test_task_accuracy_is_the_fraction_correct() -> None:
    """Observed: multi-task accuracies were class-averaged (torchmetrics' default `macro`),
    e.g. test/digit/acc 0.99452 on 360 images, while every other method reports the plain
    fraction correct; the README compared the two."""
    from posttrain.data.targets import parse_tasks
    from posttrain.methods.multitask import TaskMetrics

    metrics = TaskMetrics(parse_tasks({"digit": {"target": "label"}}), num_classes=3)
    predictions = torch.tensor([0, 0, 0, 0, 1])  # 4 of 5 right (micro 0.8); per class 1, 0.5
    targets = torch.tensor([0, 0, 0, 1, 1])
    metrics.update("test", {"digit": torch.nn.functional.one_hot(predictions, 3).float()},
                   {"digit": targets})  # fmt: skip
    values = metrics.compute_and_reset("test")
    assert float(values["test/acc"]) == pytest.approx(0.8)
    assert float(values["test/images"]) == 5  # what the test covered, as other methods say
