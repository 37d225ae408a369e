"""Supervised classification: training from scratch, and the base of fine-tuning.

The loop reads top to bottom: a shared step computes logits and loss, metrics accumulate
per split, and epoch hooks log them together with `val/acc_best` (the default sweep
objective) and `val/acc_gap` (train minus val accuracy: the over-fitting signal).
"""

from __future__ import annotations

from typing import Any

import lightning as L
from torch import Tensor, nn
from torch.nn import functional as F

from posttrain.methods.finetune import (
    FinetuneSettings,
    FreezeSchedule,
    keep_frozen_norms_in_eval,
    reinit_top_layers,
)
from posttrain.methods.metrics import (
    DivergenceGuard,
    EpochMeans,
    SplitMetrics,
    ValidationTracker,
    confusion_figure,
    log_step_loss,
)
from posttrain.methods.optim import configure_optimization
from posttrain.regularizers import RegularizerSet


class SupervisedClassifier(L.LightningModule):
    """Cross-entropy classification of any `ImageClassifier` with configurable optimization."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: dict[str, Any],
        scheduler: dict[str, Any],
        regularizers: RegularizerSet | None = None,
        finetune: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model", "regularizers"])
        self.model = model
        self.regularizers = regularizers or RegularizerSet()
        self.finetune = FinetuneSettings(**(finetune or {}))
        reinit_top_layers(model.features, self.finetune.reinit_top_layers)
        self.metrics = SplitMetrics(num_classes=model.head.out_features)
        self.tracker = ValidationTracker()
        self.means = EpochMeans(["train/loss_epoch", "train/penalty", "val/loss", "test/loss"])
        self.divergence = DivergenceGuard()

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def train(self, mode: bool = True) -> SupervisedClassifier:
        """Train mode, except frozen BatchNorm layers (fine-tuning), which keep running stats."""
        super().train(mode)
        if mode:
            keep_frozen_norms_in_eval(self.model.features, self.finetune.freeze_bn_stats)
        return self

    def on_fit_start(self) -> None:
        # Lightning never calls `train()` during fit (it restores each module's own mode after
        # validation), so the BatchNorm modes above are applied here once.
        self.train(self.training)

    def shared_step(self, batch: tuple[Tensor, Tensor], split: str) -> Tensor:
        """Loss and metrics for one batch; targets may be soft (mixup/cutmix) in training."""
        images, targets = batch
        logits = self(images)
        training = split == "train"
        smoothing = self.regularizers.label_smoothing if training else 0.0
        loss = F.cross_entropy(logits, targets, label_smoothing=smoothing)
        hard_targets = targets.argmax(dim=-1) if targets.is_floating_point() else targets
        self.metrics.update(split, logits, hard_targets)
        self.means.update("train/loss_epoch" if training else f"{split}/loss", loss, len(images))
        if training:
            log_step_loss(self, loss)
            penalty = self.regularizers.penalty(self.model)
            if penalty is not None:
                self.means.update("train/penalty", penalty)
                loss = loss + penalty
            self.divergence.observe(loss)
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self.shared_step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.shared_step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.shared_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        values = {**self.metrics.compute_and_reset("val"), **self.means.compute_and_reset("val/")}
        if self.trainer.sanity_checking:
            return
        values.update(self.tracker.after_validation(values["val/acc"]))
        self.log_dict(values, prog_bar=True)

    def on_train_epoch_end(self) -> None:
        self.divergence.check(self.current_epoch)
        values = {
            **self.metrics.compute_and_reset("train"),
            **self.means.compute_and_reset("train/"),
        }
        values.update(self.tracker.gap(values["train/acc"]))
        self.log_dict(values)

    def on_test_epoch_end(self) -> None:
        self.log_dict(
            {**self.metrics.compute_and_reset("test"), **self.means.compute_and_reset("test/")}
        )
        matrix = self.metrics.confusion.compute()
        self.metrics.confusion.reset()
        self.log_confusion_matrix(matrix)

    def log_confusion_matrix(self, matrix: Tensor) -> None:
        """Add the test confusion matrix as an image to every TensorBoard logger."""
        from lightning.pytorch.loggers import TensorBoardLogger

        if self.trainer.is_global_zero:
            names = getattr(self.trainer.datamodule, "class_names", None)
            for logger in self.loggers:
                if isinstance(logger, TensorBoardLogger):
                    figure = confusion_figure(matrix, names)
                    logger.experiment.add_figure("test/confusion_matrix", figure, self.global_step)

    def configure_callbacks(self) -> list[Any]:
        schedule = [FreezeSchedule(self.finetune)] if self.finetune.starts_frozen else []
        return [*schedule, *self.regularizers.callbacks()]

    def backbone_lr_scale(self, name: str) -> float:
        """Discriminative learning rates: backbone parameters get `backbone_lr_factor`."""
        return self.finetune.backbone_lr_factor if name.startswith("model.features.") else 1.0

    def configure_optimizers(self) -> Any:
        return configure_optimization(
            self, self.hparams.optimizer, self.hparams.scheduler, self.backbone_lr_scale
        )
