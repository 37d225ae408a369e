"""The regularizer protocol, the capabilities that pair regularizers with methods, and the
set that dispatches the hooks.

A regularizer states what it *needs* (`needs`: capability names below); a method states
what it *offers*. `RegularizerSet.attach` checks the pairing once, at start-up, so an
unsupported pair is one paragraph before any work, never a silent no-op or a crash mid-run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from posttrain.errors import PosttrainError

log = logging.getLogger("posttrain")

BatchTransform = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]

# What a method can offer a regularizer, and how the refusal names a missing one.
CAPABILITIES: dict[str, str] = {
    "weights": "trainable weights a penalty can act on",
    "backbone": "a backbone whose starting weights can serve as the reference",
    "classifier_heads": "classifier heads of its own (the L2-SP `beta` term acts on them)",
    "image_batches": "plain (images, targets) training batches that can be transformed",
    "soft_targets": "a training loss that accepts soft (mixed) label distributions",
    "embedding_dropout": "dropout on the embedding its predictions are made from",
    "cross_entropy": "a cross-entropy training loss whose targets can be smoothed",
    "validation_accuracy": "`val/acc` after every validation epoch",
    # Not a regularizer's need: what lets a method train on `data.targets` (runs.py checks).
    "task_targets": "a loss per task of `data.targets` (a dict of targets per batch)",
}


@dataclass
class ModelParts:
    """What a method lets regularizers act on: the network (with its dropout slot
    `head_dropout`), its backbone and the classifier heads it trains (none for ProtoNet,
    one per task for multi-task learning)."""

    model: nn.Module
    backbone: nn.Module
    heads: list[nn.Module] = field(default_factory=list)

    @classmethod
    def of_classifier(cls, model: nn.Module) -> ModelParts:
        """An `ImageClassifier` whose own linear head is trained."""
        return cls(model, model.features, [model.head])

    def weights(self) -> Iterator[nn.Parameter]:
        """Every trainable tensor of the backbone and the heads."""
        for module in (self.backbone, *self.heads):
            yield from (p for p in module.parameters() if p.requires_grad)


@runtime_checkable
class Regularizer(Protocol):
    """Every hook is optional; a regularizer defines the ones it acts through.

    - `key`: its option name in `conf/reg/` (`l2`), used in messages.
    - `needs`: the capabilities (see `CAPABILITIES`) it needs from the method.
    - `modify_model(parts)`: change the network (dropout) or remember it (L2-SP).
    - `batch_transform(num_classes)`: a training-only (images, targets) transform run on
      whole batches on the device (augmentation, mixup/cutmix); `stage` orders them.
    - `penalty(parts)`: a term added to the training loss (L1, L2, L2-SP).
    - `label_smoothing`: epsilon for the training cross-entropy.
    - `callbacks()`: Lightning callbacks (early stopping).
    - `describe()`: one line saying what it changes, logged at start.
    """

    key: str
    needs: frozenset[str]

    def describe(self) -> str: ...


def refusal(member: Any, missing: set[str], method: str) -> str:
    """One paragraph: which pair, what is missing, what to do instead."""
    reasons = "; ".join(CAPABILITIES[name] for name in sorted(missing))
    return (
        f"`reg={member.key}` cannot be used with `method={method}`: it needs {reasons}, "
        f"which `{method}` does not offer. Remove `{member.key}` from `reg=`"
        f"{getattr(member, 'refusal_hint', '')} (README 'Regularization' lists which "
        "regularizer serves which method)."
    )


class RegularizerSet:
    """The selected regularizers (`reg=[a,b]`), dispatching each hook to those that have it."""

    def __init__(self, regularizers: Iterable[Any] = ()) -> None:
        from posttrain.regularizers.mixing import merge_mixers

        self.members = merge_mixers(list(regularizers))

    def __bool__(self) -> bool:
        return bool(self.members)

    def having(self, hook: str) -> list[Any]:
        return [member for member in self.members if hasattr(member, hook)]

    def check_supported(self, offers: frozenset[str], method: str) -> None:
        """Refuse, in one paragraph, a regularizer the method cannot serve."""
        for member in self.members:
            missing = set(member.needs) - set(offers)
            if missing:
                raise PosttrainError(refusal(member, missing, method))

    def attach(self, method: Any, datamodule: Any) -> None:
        """Check the pairing, apply model changes, register batch transforms; log each."""
        self.check_supported(method.offers, method.method_name)
        parts = method.regularized_parts()
        for member in self.having("modify_model"):
            member.modify_model(parts)
        staged = sorted(self.having("batch_transform"), key=lambda m: getattr(m, "stage", 0))
        for member in staged:
            datamodule.train_transforms.append(member.batch_transform(datamodule.num_classes))
        for member in self.members:
            log.info("regularizer: %s", member.describe())

    def penalty(self, parts: ModelParts) -> Tensor | None:
        terms = [member.penalty(parts) for member in self.having("penalty")]
        return torch.stack(terms).sum() if terms else None

    @property
    def label_smoothing(self) -> float:
        return sum(float(member.label_smoothing) for member in self.having("label_smoothing"))

    def callbacks(self) -> list[Any]:
        return [cb for member in self.having("callbacks") for cb in member.callbacks()]
