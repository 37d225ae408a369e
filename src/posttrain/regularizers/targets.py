"""Label smoothing and early stopping: regularizers that act on the target and the schedule."""

from __future__ import annotations

from typing import Any, ClassVar

from lightning.pytorch.callbacks import EarlyStopping as LightningEarlyStopping

from posttrain.errors import PosttrainError, require, require_count


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
        require_count("reg.early_stopping.patience", patience, 1)
        from posttrain.methods.metrics import check_monitor

        check_monitor("reg.early_stopping", monitor, mode)
        self.patience, self.monitor, self.mode = patience, monitor, mode

    def callbacks(self) -> list[Any]:
        return [StopWhenStalled(monitor=self.monitor, mode=self.mode, patience=self.patience)]

    def describe(self) -> str:
        return f"early stopping on {self.monitor} ({self.mode}), patience {self.patience}"


class StopWhenStalled(LightningEarlyStopping):
    """Lightning's early stopping; a monitored metric the method does not log (ProtoNet has
    no `val/f1_macro`) is one paragraph instead of Lightning's RuntimeError traceback."""

    def _validate_condition_metric(self, logs: dict[str, Any]) -> bool:
        if self.monitor not in logs:
            logged = ", ".join(f"`{k}`" for k in sorted(logs) if k.startswith(("train/", "val/")))
            raise PosttrainError(
                f"Config key `reg.early_stopping.monitor={self.monitor}`: this run's method "
                f"does not log it. It logs {logged}; monitor one of those."
            )
        return super()._validate_condition_metric(logs)
