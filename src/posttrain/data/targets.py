"""Derived targets for multi-task learning: functions of the class label.

`data.targets` declares tasks, e.g. `{digit: {target: label}, parity: {target: parity}}`;
each becomes one entry of the batch's target dict. `missing` marks a seeded fraction of a
task's training targets absent (`ABSENT`), to train with partial annotations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from posttrain.errors import require, require_choice

ABSENT = -1  # a target with this value is masked out of its task's loss and metrics


@dataclass(frozen=True)
class TargetKind:
    """How to derive a task's target from the label, and how many classes it has."""

    derive: Callable[[Tensor, int], Tensor]
    classes: Callable[[int], int]


TARGET_KINDS: dict[str, TargetKind] = {
    "label": TargetKind(lambda y, n: y, lambda n: n),
    "parity": TargetKind(lambda y, n: y % 2, lambda n: 2),
    "large": TargetKind(lambda y, n: (y >= n / 2).long(), lambda n: 2),  # digits: >= 5
}


@dataclass(frozen=True)
class TaskSpec:
    """One task of `data.targets`."""

    name: str
    target: str
    missing: float = 0.0

    def classes(self, num_classes: int) -> int:
        return TARGET_KINDS[self.target].classes(num_classes)


def parse_tasks(targets: dict[str, Any]) -> list[TaskSpec]:
    """`data.targets` -> validated task specs, in declaration order."""
    specs = []
    for name, entry in targets.items():
        entry = dict(entry or {})
        require_choice(f"data.targets.{name}.target", entry.get("target"), TARGET_KINDS)
        missing = float(entry.get("missing", 0.0))
        require(
            0 <= missing < 1, f"`data.targets.{name}.missing` must be in [0, 1), got {missing}."
        )
        specs.append(TaskSpec(name, entry["target"], missing))
    require(bool(specs), "`data.targets` declares no task.")
    return specs


def derive_targets(
    labels: Tensor,
    num_classes: int,
    tasks: list[TaskSpec],
    generator: torch.Generator,
    apply_missing: bool,
) -> dict[str, Tensor]:
    """The target dict of a split; training splits get their seeded absent entries."""
    out = {}
    for task in tasks:
        values = TARGET_KINDS[task.target].derive(labels, num_classes).long().clone()
        if apply_missing and task.missing > 0:
            values[torch.rand(len(values), generator=generator) < task.missing] = ABSENT
        out[task.name] = values
    return out
