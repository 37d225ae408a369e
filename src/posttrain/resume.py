"""What a resumed run may change, and the refusal of what it cannot honour.

A resume restores the optimizer (its param groups carry the learning rate), the scheduler,
the weights, the loops and every random state from the checkpoint. A changed
`optimizer.lr` was therefore silently ignored while the run's config recorded it, another
optimizer failed at the first step (`KeyError: 'momentum'`) and `optimizer.decay_1d` with a
"different number of parameter groups" traceback. The new config is compared with the one
the checkpoint stores, and every change outside `RESUMABLE` is refused in one paragraph
before any work.
"""

from __future__ import annotations

from typing import Any

from posttrain.errors import require

# Keys a resume honours: how long to train, where files go, what is shown or logged, the
# hardware of one device, the copy of the data on disk and what runs only after training.
RESUMABLE = (
    "ckpt_path",
    "task_name",
    "optimized_metric",
    "paths.",
    "logger.",
    "callbacks.",
    "calibration.",
    "trainer.max_epochs",
    "trainer.max_steps",
    "trainer.max_time",
    "trainer.min_epochs",
    "trainer.min_steps",
    "trainer.accelerator",
    "trainer.default_root_dir",
    "trainer.plugins",
    "trainer.deterministic",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
    "trainer.num_sanity_val_steps",
    "trainer.check_val_every_n_epoch",
    "trainer.val_check_interval",
    "trainer.limit_test_batches",
    "trainer.profiler",
    "data.root",
    "data.download",
    "data.num_workers",
    "data.eval_batch_size",
    "data.test_episodes",
)
# Inside the keys above, what the restored state depends on: the best checkpoint so far was
# chosen by this metric and mode (leaving the callback out is fine).
FIXED_WITHIN = ("callbacks.model_checkpoint.monitor", "callbacks.model_checkpoint.mode")
# `method.optimizer`/`method.scheduler`/`method.tasks` repeat `optimizer`, `scheduler` and
# `data.targets` (`${...}` in conf/method): their changes are named there, once.
MIRRORS = ("method.optimizer.", "method.scheduler.", "method.tasks")
ABSENT = "(absent)"
SHOWN = 8  # changes named in the paragraph; the rest are counted


def flat_leaves(config: Any, prefix: str = "", keep_empty: bool = False) -> dict[str, Any]:
    """`{"optimizer.lr": 0.003, ...}`: every leaf of a nested config dict by its dotted key.

    With `keep_empty` an empty dict is a leaf of its own (`reg: {}`), so a key that goes from
    empty to absent shows (a re-run sweep job compares it); without, it has no leaves.
    """
    if isinstance(config, dict) and (config or not keep_empty):
        leaves: dict[str, Any] = {}
        for key, value in config.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            leaves.update(flat_leaves(value, name, keep_empty))
        return leaves
    return {} if keep_empty and not prefix else {prefix: config}


def resumable_change(key: str, old: Any, new: Any) -> bool:
    """True when a resume applies this change of `key` (see `RESUMABLE`); dropping the best
    checkpoint altogether is allowed, choosing it by another metric is not."""
    if key.startswith(FIXED_WITHIN):
        return ABSENT in (old, new)
    return any(key == name or (name.endswith(".") and key.startswith(name)) for name in RESUMABLE)


def unresumable_changes(stored: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`key old → new` for every changed, added or removed key a resume cannot honour."""
    before, after = flat_leaves(stored), flat_leaves(new)
    changes = []
    for key in sorted(set(before) | set(after)):
        old, value = before.get(key, ABSENT), after.get(key, ABSENT)
        if old != value and not key.startswith(MIRRORS) and not resumable_change(key, old, value):
            changes.append(f"`{key}` {old!r} → {value!r}".replace(repr(ABSENT), ABSENT))
    return changes


def refuse_unresumable_changes(stored: dict[str, Any], new: dict[str, Any], path: Any) -> None:
    """One paragraph naming each key whose change a resume from `path` would not apply."""
    changes = unresumable_changes(stored, new)
    more = f"; and {len(changes) - SHOWN} more" if len(changes) > SHOWN else ""
    require(
        not changes,
        f"Config key `ckpt_path`: resuming {path} cannot apply these changes to the run's "
        f"config: {'; '.join(changes[:SHOWN])}{more}. A resume continues the checkpoint's "
        "training: its optimizer and scheduler state (learning rates included), weights, "
        "random states and data splits come from the file, so `optimizer.*`, "
        "`scheduler.*`, `model.*`, `method.*`, `reg.*`, `seed`, the `data.*` that choose and "
        "sample the data and the `trainer.*` that change the steps stay as they were. "
        "Resume with the run's own values (its `.hydra/config.yaml`); a resume may change "
        "`trainer.max_epochs`/`max_steps`/`max_time`, the validation cadence, paths, "
        "loggers, console callbacks and `data.root`/`num_workers`. To train on from these "
        "weights with other settings, start a new run with `model.pretrained=<this file>`.",
    )
