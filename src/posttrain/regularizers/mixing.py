"""Mixup and CutMix: blend pairs of training images and their labels (soft targets).

They change the loss target: the training cross-entropy is taken against the mixed label
distribution, and `train/acc` against its arg-max. Both facts are logged at start.
"""

from __future__ import annotations

from torch import Tensor

from posttrain.errors import require


def check_alpha(key: str, alpha: float) -> float:
    require(
        isinstance(alpha, int | float) and alpha > 0,
        f"Config key `{key}` (Beta distribution alpha) must be > 0, got {alpha!r}.",
    )
    return float(alpha)


class _Mixing:
    """Shared by Mixup and CutMix: wraps the torchvision v2 batch transform."""

    name = ""
    stage = 1  # after per-image augmentation

    def __init__(self, alpha: float) -> None:
        self.alpha = check_alpha(f"reg.{self.name}.alpha", alpha)

    def batch_transform(self, num_classes: int):
        from torchvision.transforms import v2

        mixer = (v2.MixUp if self.name == "mixup" else v2.CutMix)(
            alpha=self.alpha, num_classes=num_classes
        )

        def transform(images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
            if targets.is_floating_point():  # already soft (mixup then cutmix): keep the first
                return images, targets
            return mixer(images, targets)

        return transform

    def describe(self) -> str:
        return (
            f"{self.name} alpha={self.alpha:g}: training loss uses mixed soft targets, "
            "train/acc is measured against their arg-max"
        )


class Mixup(_Mixing):
    """Convex combinations of image pairs and their one-hot labels (Zhang et al. 2018)."""

    name = "mixup"

    def __init__(self, alpha: float = 0.2) -> None:
        super().__init__(alpha)


class CutMix(_Mixing):
    """Paste a box from one image into another, labels mixed by area (Yun et al. 2019)."""

    name = "cutmix"

    def __init__(self, alpha: float = 1.0) -> None:
        super().__init__(alpha)
