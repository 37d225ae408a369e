"""Label smoothing and early stopping: regularizers that act on the target and the schedule."""

from __future__ import annotations

from typing import Any, ClassVar

from posttrain.errors import require, require_positive


class LabelSmoothing:
    """Cross-entropy against (1 - epsilon) one-hot + epsilon uniform, training loss only."""

    key = "label_smoothing"
    needs: ClassVar[frozenset[str]] = frozenset({"cross_entropy"})

    def __init__(self, epsilon: float = 0.1) -> None:
        require(
            isinstance(epsilon, int | float) and 0 <= epsilon < 1,
            f"Config key `reg.label_smoothing.epsilon` must be in [0, 1), got {epsilon!r}.",
        )
        self.label_smoothing = float(epsilon)

    def describe(self) -> str:
        return f"label smoothing epsilon={self.label_smoothing:g} (training loss only)"


class EarlyStopping:
    """Stop when `monitor` has not improved for `patience` validation epochs."""

    key = "early_stopping"
    needs: ClassVar[frozenset[str]] = frozenset({"validation_accuracy"})

    def __init__(self, patience: int = 10, monitor: str = "val/acc", mode: str = "max") -> None:
        require_positive("reg.early_stopping.patience", patience)
        self.patience, self.monitor, self.mode = patience, monitor, mode

    def callbacks(self) -> list[Any]:
        from lightning.pytorch.callbacks import EarlyStopping as LightningEarlyStopping

        return [
            LightningEarlyStopping(monitor=self.monitor, mode=self.mode, patience=self.patience)
        ]

    def describe(self) -> str:
        return f"early stopping on {self.monitor} ({self.mode}), patience {self.patience}"
