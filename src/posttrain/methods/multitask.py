"""Multi-task learning: one shared backbone, one head per task, weighted losses.

Tasks come from `data.targets` (see `posttrain.data.targets`); each gets a linear head on the
shared features. Targets equal to -1 are absent and masked out of their task's loss and
metrics. Loss weighting (`method.weighting`):
- `equal`: the plain sum of task losses;
- `uncertainty` (Kendall, Gal & Cipolla 2018): learned log-variances s_t,
  loss = sum_t exp(-s_t) L_t + s_t / 2;
- `dwa` (dynamic weight averaging, Liu et al. 2019): w_t = T softmax(r_t / temperature)
  with r_t the ratio of a task's last two epoch losses (equal weights for two epochs).
The first task is the main one: its accuracy is also logged as `val/acc`/`test/acc`, so
checkpointing and sweeps work as for every other method.
"""

from __future__ import annotations

from typing import Any, ClassVar

import lightning as L
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics.classification import MulticlassAccuracy

from posttrain.data.targets import ABSENT, parse_tasks
from posttrain.errors import require, require_choice, require_positive
from posttrain.methods.metrics import DivergenceGuard, EpochMeans, ValidationTracker, log_step_loss
from posttrain.methods.optim import configure_optimization
from posttrain.regularizers import RegularizerSet

SPLITS = ("train", "val", "test")


def masked_cross_entropy(logits: Tensor, targets: Tensor, smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy over present targets; exactly 0 (no gradient) when none is present."""
    present = targets != ABSENT
    if not bool(present.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[present], targets[present], label_smoothing=smoothing)


class LossWeighting(nn.Module):
    """Combines task losses into one; exposes the current weight of each task."""

    STRATEGIES: ClassVar[tuple[str, ...]] = ("equal", "uncertainty", "dwa")

    def __init__(self, tasks: list[str], strategy: str, temperature: float) -> None:
        super().__init__()
        require_choice("method.weighting", strategy, self.STRATEGIES)
        require_positive("method.dwa_temperature", temperature)
        self.tasks, self.strategy, self.temperature = tasks, strategy, temperature
        self.log_vars = nn.Parameter(
            torch.zeros(len(tasks)), requires_grad=strategy == "uncertainty"
        )
        self.epoch_losses: list[Tensor] = []  # per finished epoch: mean loss per task
        self.running = torch.zeros(len(tasks))
        self.steps = 0

    def weights(self) -> Tensor:
        if self.strategy == "uncertainty":
            return torch.exp(-self.log_vars.detach())
        if self.strategy == "dwa" and len(self.epoch_losses) >= 2:
            ratios = self.epoch_losses[-1] / self.epoch_losses[-2].clamp_min(1e-12)
            return len(self.tasks) * torch.softmax(ratios / self.temperature, dim=0)
        return torch.ones(len(self.tasks))

    def forward(self, losses: Tensor) -> Tensor:
        self.running += losses.detach().cpu()
        self.steps += 1
        if self.strategy == "uncertainty":
            return (torch.exp(-self.log_vars) * losses + 0.5 * self.log_vars).sum()
        return (self.weights().to(losses.device) * losses).sum()

    def end_epoch(self) -> None:
        if self.steps:
            self.epoch_losses.append(self.running / self.steps)
        self.running, self.steps = torch.zeros(len(self.tasks)), 0


class MultiTaskClassifier(L.LightningModule):
    """Shared `model.features`, one head per task of `data.targets`, weighted task losses."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: dict[str, Any],
        scheduler: dict[str, Any],
        tasks: dict[str, Any] | None = None,
        weighting: str = "equal",
        dwa_temperature: float = 2.0,
        regularizers: RegularizerSet | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model", "regularizers"])
        require(
            bool(tasks),
            "`method=multitask` needs tasks: set `data.targets`, e.g. `experiment=digits_multitask`"
            " or data.targets='{digit: {target: label}, parity: {target: parity}}'.",
        )
        specs = parse_tasks(dict(tasks))
        num_classes = model.head.out_features
        self.task_names = [spec.name for spec in specs]
        self.model = model
        self.model.head = nn.Identity()  # replaced by one head per task
        self.heads = nn.ModuleDict(
            {spec.name: nn.Linear(model.feature_dim, spec.classes(num_classes)) for spec in specs}
        )
        self.accuracy = nn.ModuleDict(
            {
                f"{split}_{spec.name}": MulticlassAccuracy(
                    spec.classes(num_classes), ignore_index=ABSENT
                )
                for split in SPLITS
                for spec in specs
            }
        )
        self.weighting = LossWeighting(self.task_names, weighting, dwa_temperature)
        self.regularizers = regularizers or RegularizerSet()
        self.tracker = ValidationTracker()
        self.means = EpochMeans(
            [f"{split}/{name}/loss" for split in SPLITS for name in self.task_names]
            + [f"{split}/loss" for split in SPLITS]
            + ["train/penalty"]
        )
        self.divergence = DivergenceGuard()

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        shared = self.model.head_dropout(self.model.features(x))
        return {name: head(shared) for name, head in self.heads.items()}

    def shared_step(self, batch: tuple[Tensor, dict[str, Tensor]], split: str) -> Tensor:
        images, targets = batch
        require(
            isinstance(targets, dict),
            "`method=multitask` needs per-task targets: set `data.targets`.",
        )
        training = split == "train"
        smoothing = self.regularizers.label_smoothing if training else 0.0
        outputs = self(images)
        losses = torch.stack(
            [
                masked_cross_entropy(outputs[name], targets[name], smoothing)
                for name in self.task_names
            ]
        )
        for name, loss in zip(self.task_names, losses, strict=True):
            self.accuracy[f"{split}_{name}"].update(outputs[name].detach(), targets[name])
            self.means.update(f"{split}/{name}/loss", loss, len(images))
        if not training:
            total = losses.sum()
            self.means.update(f"{split}/loss", total, len(images))
            return total
        total = self.weighting(losses)
        penalty = self.regularizers.penalty(self.model)
        if penalty is not None:
            self.means.update("train/penalty", penalty)
            total = total + penalty
        self.means.update("train/loss", total, len(images))
        log_step_loss(self, total)
        self.divergence.observe(total)
        return total

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.shared_step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.shared_step(batch, "test")

    def task_accuracies(self, split: str) -> dict[str, Tensor]:
        """`<split>/<task>/acc` for every task, plus `<split>/acc` of the main (first) task."""
        values = {}
        for name in self.task_names:
            metric = self.accuracy[f"{split}_{name}"]
            values[f"{split}/{name}/acc"] = metric.compute()
            metric.reset()
        values[f"{split}/acc"] = values[f"{split}/{self.task_names[0]}/acc"]
        return {**values, **self.means.compute_and_reset(f"{split}/")}

    def on_train_epoch_end(self) -> None:
        self.divergence.check(self.current_epoch)
        values = self.task_accuracies("train")
        values.update(self.tracker.gap(values["train/acc"]))
        weights = self.weighting.weights()
        values.update(
            {f"train/{n}/weight": w for n, w in zip(self.task_names, weights, strict=True)}
        )
        self.weighting.end_epoch()
        self.log_dict(values)

    def on_validation_epoch_end(self) -> None:
        values = self.task_accuracies("val")
        if self.trainer.sanity_checking:
            return
        values.update(self.tracker.after_validation(values["val/acc"]))
        self.log_dict(values, prog_bar=True)

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.task_accuracies("test"))

    def configure_callbacks(self) -> list[Any]:
        return self.regularizers.callbacks()

    def configure_optimizers(self) -> Any:
        return configure_optimization(self, self.hparams.optimizer, self.hparams.scheduler)
