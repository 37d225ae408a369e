"""Mixup and CutMix: blend pairs of training images and their labels (soft targets).

They change the loss target: the training cross-entropy is taken against the mixed label
distribution, and `train/acc` against its arg-max. Both facts are logged at start.
Selected together (`reg=[mixup,cutmix]`), each batch gets one of them: CutMix with
probability `reg.cutmix.switch_prob`, else Mixup (timm's `switch_prob` semantics).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from posttrain.errors import require

MIXING_NEEDS = frozenset({"image_batches", "soft_targets"})


def check_alpha(key: str, alpha: float) -> float:
    require(
        isinstance(alpha, int | float) and alpha > 0,
        f"Config key `{key}` (Beta distribution alpha) must be > 0, got {alpha!r}.",
    )
    return float(alpha)


class _Mixing:
    """Shared by Mixup and CutMix: wraps the torchvision v2 batch transform."""

    key = ""
    needs: ClassVar[frozenset[str]] = MIXING_NEEDS
    stage = 1  # after per-image augmentation

    def __init__(self, alpha: float) -> None:
        self.alpha = check_alpha(f"reg.{self.key}.alpha", alpha)

    def mixer(self, num_classes: int) -> Any:
        from torchvision.transforms import v2

        transform = v2.MixUp if self.key == "mixup" else v2.CutMix
        return transform(alpha=self.alpha, num_classes=num_classes)

    def batch_transform(self, num_classes: int):
        return self.mixer(num_classes)

    def describe(self) -> str:
        return (
            f"{self.key} alpha={self.alpha:g}: training loss uses mixed soft targets, "
            "train/acc is measured against their arg-max"
        )


class Mixup(_Mixing):
    """Convex combinations of image pairs and their one-hot labels (Zhang et al. 2018)."""

    key = "mixup"

    def __init__(self, alpha: float = 0.2) -> None:
        super().__init__(alpha)


class CutMix(_Mixing):
    """Paste a box from one image into another, labels mixed by area (Yun et al. 2019).

    `switch_prob`: with `reg=[mixup,cutmix]`, the probability that a batch gets CutMix
    rather than Mixup. Without mixup it has nothing to switch, so a changed value is refused.
    """

    key = "cutmix"
    DEFAULT_SWITCH_PROB = 0.5

    def __init__(self, alpha: float = 1.0, switch_prob: float = DEFAULT_SWITCH_PROB) -> None:
        super().__init__(alpha)
        require(
            isinstance(switch_prob, int | float) and 0 <= switch_prob <= 1,
            f"Config key `reg.cutmix.switch_prob` must be in [0, 1], got {switch_prob!r}.",
        )
        self.switch_prob = float(switch_prob)


class MixupOrCutMix:
    """Mixup and CutMix selected together: one of them per training batch."""

    key = "mixup,cutmix"
    needs: ClassVar[frozenset[str]] = MIXING_NEEDS
    stage = 1

    def __init__(self, mixup: Mixup, cutmix: CutMix) -> None:
        self.mixup, self.cutmix = mixup, cutmix

    def batch_transform(self, num_classes: int):
        mixup, cutmix = self.mixup.mixer(num_classes), self.cutmix.mixer(num_classes)
        switch_prob = self.cutmix.switch_prob

        def transform(images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
            use_cutmix = bool(torch.rand(()) < switch_prob)  # the seeded global generator
            return (cutmix if use_cutmix else mixup)(images, targets)

        return transform

    def describe(self) -> str:
        return (
            f"mixup alpha={self.mixup.alpha:g} or cutmix alpha={self.cutmix.alpha:g}, one per "
            f"batch (cutmix with probability {self.cutmix.switch_prob:g}): training loss uses "
            "mixed soft targets, train/acc is measured against their arg-max"
        )


def merge_mixers(members: list[Any]) -> list[Any]:
    """Mixup and CutMix together become one per-batch switch (two in a row would mix twice);
    a changed `switch_prob` without mixup is refused instead of ignored."""
    mixups = [m for m in members if isinstance(m, Mixup)]
    cutmixes = [m for m in members if isinstance(m, CutMix)]
    if not cutmixes:
        return members
    require(
        bool(mixups) or cutmixes[0].switch_prob == CutMix.DEFAULT_SWITCH_PROB,
        "Config key `reg.cutmix.switch_prob` chooses between CutMix and Mixup per batch, so it "
        "takes effect only with both selected: use `reg=[mixup,cutmix]` or leave it unset.",
    )
    if not mixups:
        return members
    rest = [m for m in members if not isinstance(m, Mixup | CutMix)]
    return [*rest, MixupOrCutMix(mixups[0], cutmixes[0])]
