"""The one training core every method builds on.

`MethodCore` owns what all methods share: metrics per split, epoch means of losses, the
divergence guard, `val/acc_best` and `val/acc_gap`, the regularizer hooks (penalty, label
smoothing, callbacks, the capability check) and optimization. A method subclasses it and
supplies only what is its own: `step(batch, split)`, turning a batch into a `StepOutput`
(its loss) while updating its metrics object, plus `offers` and `regularized_parts()`.

Why one base LightningModule rather than a component each method composes: Lightning calls
its hooks (`training_step`, `on_*_epoch_end`, `configure_optimizers`, ...) on the module
itself, so a component would still need every hook forwarded in every method — the very
copies this replaces. The base is one level deep and has no abstract hooks but `step`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import lightning as L
from torch import Tensor, nn

from posttrain.methods.metrics import (
    DivergenceGuard,
    EpochMeans,
    ValidationTracker,
    log_step_loss,
)
from posttrain.methods.optim import configure_optimization
from posttrain.regularizers import RegularizerSet
from posttrain.regularizers.base import ModelParts

SPLITS = ("train", "val", "test")


@dataclass
class StepOutput:
    """A method's answer for one batch.

    `loss`: the method's own loss (the core adds regularizer penalties to it for the
    gradient, and logs it without them, so `train/loss` compares across `reg=` choices);
    `size`: how many examples (images or episodes) the batch holds, the weight of epoch
    means; `parts`: further losses logged as `<split>/<name>` epoch means; `part_sizes`: how
    many examples a part averages over where that is not `size` (a multi-task target's
    present labels: a batch with none of them adds nothing to that task's epoch mean).
    """

    loss: Tensor
    size: int
    parts: dict[str, Tensor] = field(default_factory=dict)
    part_sizes: dict[str, int | Tensor] = field(default_factory=dict)


class SplitMetricSet(Protocol):
    """Per-split metrics a method updates in `step` (an `nn.Module`, so they follow the
    device); the core computes and logs them at each epoch end."""

    def compute_and_reset(self, split: str) -> dict[str, Tensor]: ...


class MethodCore(L.LightningModule):
    """Shared loop: step -> (penalty, divergence, means) -> epoch metrics -> logging."""

    # What the core itself guarantees: it adds penalties over `regularized_parts()` and
    # logs `val/acc`. A method adds what its `step` honours (e.g. `cross_entropy` only if
    # it passes `self.label_smoothing` to its loss).
    OFFERS: ClassVar[frozenset[str]] = frozenset({"weights", "backbone", "validation_accuracy"})

    def __init__(
        self,
        model: nn.Module,
        optimizer: dict[str, Any],
        scheduler: dict[str, Any],
        regularizers: RegularizerSet | None,
        metrics: nn.Module,  # a SplitMetricSet
        loss_parts: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        # The run's config is logged by `posttrain.runs` (readable hparams with real
        # metrics); Lightning's own logging of these would add a second, raw set.
        self.save_hyperparameters(
            ignore=["model", "regularizers", "metrics", "loss_parts"], logger=False
        )
        self.model = model
        self.regularizers = regularizers or RegularizerSet()
        self.metrics = metrics
        self.optimizer_config, self.scheduler_config = optimizer, scheduler
        self.tracker = ValidationTracker()
        names = [f"{split}/{name}" for split in SPLITS for name in ("loss", *loss_parts)]
        self.means = EpochMeans([*names, "train/penalty"])
        self.divergence = DivergenceGuard()

    # What the method supplies -------------------------------------------------------------
    @property
    def method_name(self) -> str:
        """How messages name it (`method=<name>`); methods set their config option's name."""
        return type(self).__name__

    @property
    def offers(self) -> frozenset[str]:
        """Capabilities regularizers may rely on (see `posttrain.regularizers.base`)."""
        return self.OFFERS

    def regularized_parts(self) -> ModelParts:
        return ModelParts.of_classifier(self.model)

    def step(self, batch: Any, split: str) -> StepOutput:
        raise NotImplementedError

    def gap_is_like_for_like(self) -> bool:
        """Whether train and validation accuracy measure the same task (else no gap)."""
        return True

    def extra_epoch_values(self, split: str) -> dict[str, Tensor]:
        """Method-specific epoch values (e.g. task weights), logged with the rest."""
        return {}

    def lr_scale(self, name: str) -> float:
        """Learning-rate multiplier of parameter `name` (discriminative learning rates)."""
        return 1.0

    def method_callbacks(self) -> list[Any]:
        return []

    # Shared by every method ---------------------------------------------------------------
    @property
    def label_smoothing(self) -> float:
        """The training loss's smoothing (from `reg=label_smoothing`); 0 in evaluation."""
        return self.regularizers.label_smoothing if self.training else 0.0

    def record(self, split: str, output: StepOutput) -> None:
        self.means.update(f"{split}/loss", output.loss, output.size)
        for name, value in output.parts.items():
            self.means.update(f"{split}/{name}", value, output.part_sizes.get(name, output.size))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        output = self.step(batch, "train")
        self.record("train", output)
        log_step_loss(self, output.loss)
        loss = output.loss
        penalty = self.regularizers.penalty(self.regularized_parts())
        if penalty is not None:
            self.means.update("train/penalty", penalty)
            loss = loss + penalty
        self.divergence.observe(output.loss, total=loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.record("val", self.step(batch, "val"))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.record("test", self.step(batch, "test"))

    def epoch_values(self, split: str) -> dict[str, Tensor]:
        return {
            **self.metrics.compute_and_reset(split),
            **self.means.compute_and_reset(f"{split}/"),
            **self.extra_epoch_values(split),
        }

    def on_train_epoch_end(self) -> None:
        values = self.epoch_values("train")
        self.divergence.check(self.current_epoch, values.get("train/loss"))
        # No `train/acc` when a multi-task run's main task had no label in the epoch.
        if self.gap_is_like_for_like() and "train/acc" in values:
            values.update(self.tracker.gap(values["train/acc"], self.current_epoch))
        self.log_dict(values)

    def on_validation_epoch_end(self) -> None:
        values = self.epoch_values("val")
        if self.trainer.sanity_checking:
            return
        values.update(self.tracker.after_validation(values["val/acc"], self.current_epoch))
        self.log_dict(values, prog_bar=True)

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.epoch_values("test"))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["posttrain_divergence"] = self.divergence.state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resume keeps the divergence reference; checkpoints from before `val/acc_best` was
        stored get the current (empty) tracker state instead of failing to load."""
        if "posttrain_divergence" in checkpoint:
            self.divergence.load_state(checkpoint["posttrain_divergence"])
        stored = checkpoint.get("state_dict", {})
        for name, value in self.state_dict().items():
            if name.startswith("tracker.") and name not in stored:
                stored[name] = value

    def configure_callbacks(self) -> list[Any]:
        return [*self.method_callbacks(), *self.regularizers.callbacks()]

    def configure_optimizers(self) -> Any:
        return configure_optimization(
            self, self.optimizer_config, self.scheduler_config, self.lr_scale
        )
