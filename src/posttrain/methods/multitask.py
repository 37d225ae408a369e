"""Multi-task learning: one shared backbone, one head per task, weighted losses.

Tasks come from `data.targets` (see `posttrain.data.targets`); each gets a linear head on the
shared features. Targets equal to -1 are absent and masked out of their task's loss and
metrics. Loss weighting (`method.weighting`):
- `equal`: the plain sum of task losses;
- `uncertainty` (Kendall, Gal & Cipolla 2018): learned log-variances s_t,
  loss = sum_t exp(-s_t) L_t + s_t / 2;
- `dwa` (dynamic weight averaging, Liu et al. 2019): w_t = T softmax(r_t / temperature)
  with r_t the ratio of a task's last two epoch losses (equal weights for two epochs); the
  epoch losses are the logged `train/<task>/loss`: over present targets, all ranks.
The first task is the main one: its accuracy is also logged as `val/acc`/`test/acc`, so
checkpointing and sweeps work as for every other method.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics import SumMetric
from torchmetrics.classification import MulticlassAccuracy

from posttrain.data.targets import ABSENT, TaskSpec, parse_tasks
from posttrain.errors import require, require_choice, require_positive
from posttrain.methods.core import SPLITS, MethodCore, StepOutput
from posttrain.methods.metrics import ImageCounts
from posttrain.regularizers import RegularizerSet
from posttrain.regularizers.base import ModelParts


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

    def weights(self) -> Tensor:
        if self.strategy == "uncertainty":
            return torch.exp(-self.log_vars.detach())
        if self.strategy == "dwa" and len(self.epoch_losses) >= 2:
            ratios = self.epoch_losses[-1] / self.epoch_losses[-2].clamp_min(1e-12)
            return len(self.tasks) * torch.softmax(ratios / self.temperature, dim=0)
        return torch.ones(len(self.tasks))

    def forward(self, losses: Tensor) -> Tensor:
        if self.strategy == "uncertainty":
            return (torch.exp(-self.log_vars) * losses + 0.5 * self.log_vars).sum()
        return (self.weights().to(losses.device) * losses).sum()

    def get_extra_state(self) -> dict[str, Any]:
        """DWA's loss history travels with checkpoints, so a resumed run weighs the same."""
        return {"epoch_losses": [t.tolist() for t in self.epoch_losses]}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.epoch_losses = [torch.tensor(losses) for losses in state["epoch_losses"]]

    def end_epoch(self, losses: list[Tensor | None]) -> None:
        """Record a finished epoch's mean loss per task: the core's `train/<task>/loss`
        (each loss weighted by its present targets, reduced across ranks). A mean of the
        per-step losses counted a batch without any target of a task as a 0 (`missing=0.8`,
        batch 4: parity 0.43 where its loss was 0.71) and differed from rank to rank under
        DDP. An epoch in which a task had no target at all has no ratio: not recorded."""
        if all(loss is not None for loss in losses):
            self.epoch_losses.append(torch.stack([loss.detach().float().cpu() for loss in losses]))


class TaskMetrics(nn.Module):
    """`<split>/<task>/acc` for every task, plus `<split>/acc` of the main (first) task, so
    checkpointing and sweeps work as for every other method."""

    def __init__(self, specs: list[TaskSpec], num_classes: int) -> None:
        super().__init__()
        self.task_names = [spec.name for spec in specs]
        self.accuracy = nn.ModuleDict(
            {
                # micro: the fraction of correct predictions, as `{split}/acc` is for every
                # method (torchmetrics' default, macro, averaged per class instead)
                f"{split}_{spec.name}": MulticlassAccuracy(
                    spec.classes(num_classes), average="micro", ignore_index=ABSENT
                )
                for split in SPLITS
                for spec in specs
            }
        )
        # How many targets of each task were present: a task with none in an epoch has no
        # accuracy (torchmetrics' empty MulticlassAccuracy says 0.0, which read as a score).
        self.labelled = nn.ModuleDict(
            {f"{split}_{spec.name}": SumMetric() for split in SPLITS for spec in specs}
        )
        self.images = ImageCounts()

    def update(self, split: str, outputs: dict[str, Tensor], targets: dict[str, Tensor]) -> None:
        for name in self.task_names:
            self.accuracy[f"{split}_{name}"].update(outputs[name].detach(), targets[name])
            self.labelled[f"{split}_{name}"].update((targets[name] != ABSENT).sum())
        self.images.update(split, len(targets[self.task_names[0]]))

    def compute_and_reset(self, split: str) -> dict[str, Tensor]:
        values = {}
        for name in self.task_names:
            metric, labelled = self.accuracy[f"{split}_{name}"], self.labelled[f"{split}_{name}"]
            accuracy, count = metric.compute(), labelled.compute()  # every rank: both reduce
            metric.reset()
            labelled.reset()
            if count > 0:
                values[f"{split}/{name}/acc"] = accuracy
        main = f"{split}/{self.task_names[0]}/acc"
        if main in values:
            values[f"{split}/acc"] = values[main]
        return {**values, **self.images.compute_and_reset(split)}


class MultiTaskClassifier(MethodCore):
    """Shared `model.features`, one head per task of `data.targets`, weighted task losses."""

    OFFERS = MethodCore.OFFERS | {
        "classifier_heads",
        "embedding_dropout",
        "cross_entropy",
        "image_batches",
        "task_targets",
    }
    method_name = "multitask"

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
        require(
            bool(tasks),
            "`method=multitask` needs tasks: set `data.targets`, e.g. `experiment=digits_multitask`"
            " or data.targets='{digit: {target: label}, parity: {target: parity}}'.",
        )
        specs = parse_tasks(dict(tasks))
        num_classes = model.head.out_features
        names = [spec.name for spec in specs]
        metrics = TaskMetrics(specs, num_classes)
        loss_parts = tuple(f"{name}/loss" for name in names)
        super().__init__(model, optimizer, scheduler, regularizers, metrics, loss_parts)
        self.task_names = names
        self.model.head = nn.Identity()  # replaced by one head per task
        self.heads = nn.ModuleDict(
            {spec.name: nn.Linear(model.feature_dim, spec.classes(num_classes)) for spec in specs}
        )
        self.weighting = LossWeighting(self.task_names, weighting, dwa_temperature)

    def regularized_parts(self) -> ModelParts:
        """The shared backbone and every task head (penalties cover them all)."""
        return ModelParts(self.model, self.model.features, list(self.heads.values()))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        shared = self.model.embed(x)
        return {name: head(shared) for name, head in self.heads.items()}

    def step(self, batch: tuple[Tensor, dict[str, Tensor]], split: str) -> StepOutput:
        """Task losses (masked where a target is absent); training weights them, evaluation
        sums them."""
        images, targets = batch
        require(
            isinstance(targets, dict),
            "`method=multitask` needs per-task targets: set `data.targets`.",
        )
        outputs = self(images)
        losses = torch.stack(
            [
                masked_cross_entropy(outputs[name], targets[name], self.label_smoothing)
                for name in self.task_names
            ]
        )
        self.metrics.update(split, outputs, targets)
        total = self.weighting(losses) if split == "train" else losses.sum()
        parts = {f"{name}/loss": loss for name, loss in zip(self.task_names, losses, strict=True)}
        # Each task's loss is the mean over its present targets, so that is its weight in the
        # epoch mean (weighted by the batch size, batches with no target of a task pulled its
        # `train/<task>/loss` towards 0: 0.19 for a 0.38 loss with `missing=0.9`, batch 8).
        present = {f"{name}/loss": (targets[name] != ABSENT).sum() for name in self.task_names}
        return StepOutput(total, len(images), parts, present)

    def epoch_values(self, split: str) -> dict[str, Tensor]:
        """Adds `train/<task>/weight` (this epoch's), then the weighting moves to the next
        epoch with this epoch's `train/<task>/loss` (DWA)."""
        values = super().epoch_values(split)
        if split != "train":
            return values
        weights = self.weighting.weights()
        self.weighting.end_epoch([values.get(f"train/{n}/loss") for n in self.task_names])
        named = zip(self.task_names, weights, strict=True)
        return {**values, **{f"train/{n}/weight": w for n, w in named}}
