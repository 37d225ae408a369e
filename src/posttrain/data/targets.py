"""Derived targets for multi-task learning: functions of the class.

`data.targets` declares tasks, e.g. `{digit: {target: label}, parity: {target: parity}}`;
each becomes one entry of the batch's target dict. `missing` marks a seeded fraction of a
task's training targets absent (`ABSENT`), to train with partial annotations.

`label` is the model's class index (0..kept-1 under `data.classes`); `parity` and `large`
are properties of the source's class id (the digit), never of that relabelled index: with
`data.classes=[1,3,5,7,9]` the parity of the kept index 0..4 alternated over five odd digits.
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
class ClassIds:
    """What a split's labels stand for: `labels` are the model's class indices, `source_ids`
    the source's class ids they were kept from (equal without `data.classes`), `total` the
    source's number of classes."""

    labels: Tensor
    source_ids: Tensor
    total: int


@dataclass(frozen=True)
class TargetKind:
    """How to derive a task's target from the classes, and how many classes it has."""

    derive: Callable[[ClassIds], Tensor]
    classes: Callable[[int], int]


TARGET_KINDS: dict[str, TargetKind] = {
    "label": TargetKind(lambda ids: ids.labels, lambda n: n),
    "parity": TargetKind(lambda ids: ids.source_ids % 2, lambda n: 2),
    # Digits: >= 5; the upper half of the source's class ids in general.
    "large": TargetKind(lambda ids: (ids.source_ids >= ids.total / 2).long(), lambda n: 2),
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


def check_tasks_vary(tasks: list[TaskSpec], kept: ClassIds) -> None:
    """Every task has two values or more over the kept classes (`kept`: one entry per class).
    `data.classes=[1,3,5,7,9]` makes `parity` 1 for every image: a task with one answer
    teaches nothing and its accuracy of 1.0 would read as learned."""
    for task in tasks:
        values = TARGET_KINDS[task.target].derive(kept).unique().tolist()
        require(
            len(values) > 1,
            f"`data.targets.{task.name}` ({task.target}) is {values[0] if values else '-'} for "
            f"every class kept by `data.classes`={kept.source_ids.tolist()}: the task has one "
            "answer and nothing to learn. Keep classes on both sides (e.g. odd and even digits "
            "for `parity`, digits below and from 5 for `large`), or drop the task.",
        )


def derive_targets(
    ids: ClassIds,
    tasks: list[TaskSpec],
    generator: torch.Generator,
    apply_missing: bool,
) -> dict[str, Tensor]:
    """The target dict of a split; training splits get their seeded absent entries."""
    out = {}
    for task in tasks:
        values = TARGET_KINDS[task.target].derive(ids).long().clone()
        if apply_missing and task.missing > 0:
            values[torch.rand(len(values), generator=generator) < task.missing] = ABSENT
        out[task.name] = values
    return out
