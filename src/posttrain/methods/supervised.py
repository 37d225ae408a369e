"""Supervised classification: training from scratch, and fine-tuning.

Everything shared with other methods (metrics, losses, logging, regularizers, optimization)
lives in `posttrain.methods.core`; this file holds only what is supervised: a batch becomes
logits and a cross-entropy (soft targets allowed, for mixup/cutmix), the fine-tuning
policies of `method.finetune`, and the test confusion matrix.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.nn import functional as F

from posttrain.methods.core import MethodCore, StepOutput
from posttrain.methods.finetune import (
    FinetuneSettings,
    FreezeSchedule,
    check_unfreeze_groups,
    keep_frozen_norms_in_eval,
    reinit_top_layers,
)
from posttrain.methods.metrics import SplitMetrics, confusion_figure
from posttrain.regularizers import RegularizerSet


class SupervisedClassifier(MethodCore):
    """Cross-entropy classification of any `ImageClassifier` with configurable optimization."""

    OFFERS = MethodCore.OFFERS | {
        "classifier_heads",
        "embedding_dropout",
        "cross_entropy",
        "image_batches",
        "soft_targets",
    }

    def __init__(
        self,
        model: nn.Module,
        optimizer: dict[str, Any],
        scheduler: dict[str, Any],
        regularizers: RegularizerSet | None = None,
        finetune: dict[str, Any] | None = None,
    ) -> None:
        metrics = SplitMetrics(num_classes=model.head.out_features)
        super().__init__(model, optimizer, scheduler, regularizers, metrics)
        self.finetune = FinetuneSettings.for_method(finetune)
        check_unfreeze_groups(model.features, self.finetune.unfreeze_groups)
        reinit_top_layers(model.features, self.finetune.reinit_top_layers)
        starts_frozen = self.finetune.starts_frozen
        self.schedule = FreezeSchedule(self.finetune) if starts_frozen else None

    @property
    def method_name(self) -> str:
        return "finetune" if self.hparams.get("finetune") else "supervised"

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

    def step(self, batch: tuple[Tensor, Tensor], split: str) -> StepOutput:
        return self.cross_entropy_step(batch, split)[0]

    def cross_entropy_step(
        self, batch: tuple[Tensor, Tensor], split: str
    ) -> tuple[StepOutput, Tensor]:
        """Cross-entropy and metrics of a batch, and its logits (methods that add a loss term
        to the labels' one, like distillation, reuse it); targets may be soft (mixup/cutmix)."""
        images, targets = batch
        logits = self(images)
        loss = F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
        hard_targets = targets.argmax(dim=-1) if targets.is_floating_point() else targets
        self.metrics.update(split, logits, hard_targets)
        return StepOutput(loss, len(images)), logits

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
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

    def method_callbacks(self) -> list[Any]:
        return [self.schedule] if self.schedule else []

    def trainable_at_start(self, trainer: Any) -> int:
        """Parameters that train when the first epoch starts, for the run statement: it
        counts before the freeze schedule's `on_fit_start` has frozen the backbone."""
        if self.schedule:
            return self.schedule.trainable_count(self, trainer)
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def lr_scale(self, name: str) -> float:
        """Discriminative learning rates: backbone parameters get `backbone_lr_factor`."""
        return self.finetune.backbone_lr_factor if name.startswith("model.features.") else 1.0
