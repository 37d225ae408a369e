"""The regularizer protocol and the set that dispatches its hooks."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

log = logging.getLogger("posttrain")

BatchTransform = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


@runtime_checkable
class Regularizer(Protocol):
    """Every hook is optional; a regularizer defines the ones it acts through.

    - `modify_model(model)`: change the network (dropout).
    - `batch_transform(num_classes)`: a training-only (images, targets) transform run on
      whole batches on the device (augmentation, mixup/cutmix); `stage` orders them.
    - `penalty(model)`: a term added to the training loss (L1, L2, L2-SP).
    - `label_smoothing`: epsilon for the training cross-entropy.
    - `callbacks()`: Lightning callbacks (early stopping).
    - `describe()`: one line saying what it changes, logged at start.
    """

    def describe(self) -> str: ...


class RegularizerSet:
    """The selected regularizers (`reg=[a,b]`), dispatching each hook to those that have it."""

    def __init__(self, regularizers: Iterable[Any] = ()) -> None:
        self.members = list(regularizers)

    def __bool__(self) -> bool:
        return bool(self.members)

    def having(self, hook: str) -> list[Any]:
        return [member for member in self.members if hasattr(member, hook)]

    def attach(self, model: nn.Module, datamodule: Any) -> None:
        """Apply model changes and register batch transforms on the DataModule."""
        for member in self.having("modify_model"):
            member.modify_model(model)
        staged = sorted(self.having("batch_transform"), key=lambda m: getattr(m, "stage", 0))
        for member in staged:
            datamodule.train_transforms.append(member.batch_transform(datamodule.num_classes))
        for member in self.members:
            log.info("regularizer: %s", member.describe())

    def penalty(self, model: nn.Module) -> Tensor | None:
        terms = [member.penalty(model) for member in self.having("penalty")]
        return torch.stack(terms).sum() if terms else None

    @property
    def label_smoothing(self) -> float:
        return sum(float(member.label_smoothing) for member in self.having("label_smoothing"))

    def callbacks(self) -> list[Any]:
        return [cb for member in self.having("callbacks") for cb in member.callbacks()]
