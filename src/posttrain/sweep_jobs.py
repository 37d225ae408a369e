"""Re-running a sweep finishes it: which job found in a sweep folder is kept, continued or run
again, and the refusal when the folder holds another job.

Hydra names a job's folder by its overrides minus `exclude_keys` (`conf/hydra/default.yaml`:
`data.root`, `model.pretrained`, `ckpt_path`, `paths.*`), and an edited config file changes no
name at all, so one folder can be asked to hold a different job. Each job keeps its resolved
config in `<job>/.posttrain/config.json` when it starts; a finished job is kept (or
continued) only when the new job's config matches it. Hydra rewrites the job's
`.hydra/*.yaml` and the sweep's `multirun.yaml` before any posttrain code runs, so copies
taken at the job's start put back the files that describe the results the folder holds.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from posttrain.errors import PosttrainError, SweepJobChanged
from posttrain.report import numbers_of
from posttrain.resume import flat_leaves
from posttrain.runs import (
    instantiate_checked,
    is_multirun,
    resolved_config,
    within,
    write_json,
)

log = logging.getLogger("posttrain")

RECORD_DIR = ".posttrain"  # posttrain's copies; never named `.hydra` (the report globs those)
HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")
# Records whose run may have stopped mid-training: continued from `last.ckpt` when it exists.
UNFINISHED = ("interrupted", "running")
# Keys that cannot change a job's numbers: where files go (`paths.*`: their effect on the data
# shows in `data.root`, which is compared resolved), loggers and console callbacks, logging
# cadence, and what the sweeper is handed (`optimized_metric`, read from the kept record).
UNCOMPARED = (
    "paths",
    "logger",
    "callbacks.progress_bar",
    "callbacks.run_statement",
    "callbacks.lr_monitor",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
    "optimized_metric",
)
# Leaf names that cannot change a result: the decoded-image cache (a changed file re-decodes).
UNCOMPARED_LEAVES = ("cache_dir",)
SHOWN_CHANGES = 8


def previous_record(cfg: DictConfig) -> dict[str, Any]:
    """What an earlier run of this sweep job recorded (a sweep re-run with the same command
    and `hydra.sweep.dir` finds its jobs in the same folders); empty outside sweeps."""
    record = Path(cfg.paths.output_dir) / "metrics.json"
    if not is_multirun() or not record.is_file():
        return {}
    try:
        return json.loads(record.read_text())
    except json.JSONDecodeError:
        return {}


def completed_sweep_job(cfg: DictConfig) -> dict[str, float] | None:
    """The recorded metrics of a sweep job that already completed, when it is this job: a
    re-run sweep finishes the sweep instead of redoing it."""
    previous = previous_record(cfg)
    if previous.get("status") != "completed":
        return None
    check_same_job(cfg, "completed")
    check_same_images(cfg)
    restore_files(job_copies(cfg))  # Hydra rewrote them for this (identical) job
    log.info("job already completed in %s: kept, not re-run", cfg.paths.output_dir)
    return numbers_of(previous)


def unfinished_sweep_job(cfg: DictConfig) -> str | None:
    """`last` for a sweep job that was interrupted, or killed while its record said
    `running` (kill -9, out of memory, a lost node): it continues from its last epoch."""
    status = previous_record(cfg).get("status")
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    if status not in UNFINISHED or not last.is_file():
        return None
    check_same_job(cfg, status)
    log.info("job was %s when it stopped: resuming it from %s", status, last)
    return "last"


def job_copies(cfg: DictConfig) -> list[tuple[Path, Path]]:
    """(Hydra's file, posttrain's copy) for the job's `.hydra/*.yaml`."""
    from hydra.core.hydra_config import HydraConfig

    subdir = HydraConfig.get().output_subdir if HydraConfig.initialized() else None
    if subdir is None:
        return []
    job = Path(cfg.paths.output_dir)
    return [(job / subdir / name, job / RECORD_DIR / "hydra" / name) for name in HYDRA_FILES]


def sweep_copies(cfg: DictConfig) -> list[tuple[Path, Path]]:
    """(Hydra's file, posttrain's copy) for the sweep's `multirun.yaml`, as the sweep that
    last started this job wrote it. Kept in the job's folder: the sweep folder holds only
    job folders and the report."""
    from hydra.core.hydra_config import HydraConfig

    sweep = Path(HydraConfig.get().sweep.dir)
    copy = Path(cfg.paths.output_dir) / RECORD_DIR / "multirun.yaml"
    return [(sweep / "multirun.yaml", copy)]


def copy_files(pairs: list[tuple[Path, Path]], *, back: bool = False) -> None:
    """Copy each existing source to its destination atomically (copies -> live if `back`)."""
    from posttrain.checkpoints import write_atomically

    for live, copy in pairs:
        source, target = (copy, live) if back else (live, copy)
        if source.is_file():
            write_atomically(source.read_bytes(), target)


def restore_files(pairs: list[tuple[Path, Path]]) -> None:
    copy_files(pairs, back=True)


def keep_job_record(cfg: DictConfig, config: dict[str, Any]) -> None:
    """At a sweep job's start: its resolved config and a copy of the sweep's multirun.yaml,
    so a later re-run can tell whether it asks for the same job and put them back."""
    if not is_multirun():
        return
    write_json(Path(cfg.paths.output_dir) / RECORD_DIR / "config.json", plain(config))
    copy_files(sweep_copies(cfg))  # the job's `.hydra` files: `runs.record_start` copies them


def plain(config: dict[str, Any]) -> dict[str, Any]:
    """The config as JSON reads it back, so a stored and a fresh config compare equal."""
    return json.loads(json.dumps(config, default=str))


def compared(key: str) -> bool:
    """False for keys that cannot change a job's numbers (`UNCOMPARED`, `UNCOMPARED_LEAVES`)."""
    return not within(key, UNCOMPARED) and key.rsplit(".", 1)[-1] not in UNCOMPARED_LEAVES


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`data.root was '/a', now '/b'` for every compared key whose value differs."""
    before, after = flat_leaves(old, keep_empty=True), flat_leaves(new, keep_empty=True)
    absent = "(absent)"
    return [
        f"`{key}` was {before.get(key, absent)!r}, now {after.get(key, absent)!r}"
        for key in sorted(set(before) | set(after))
        if compared(key) and before.get(key, absent) != after.get(key, absent)
    ]


def check_same_job(cfg: DictConfig, status: str) -> None:
    """Refuse (see `refuse_changed_job`) when the job recorded in this folder had another
    config; a folder from before configs were kept cannot be checked, and says so."""
    stored = Path(cfg.paths.output_dir) / RECORD_DIR / "config.json"
    if not stored.is_file():
        log.warning(
            "%s keeps no config of its %s job (%s is missing): whether this job is the same "
            "cannot be checked",
            cfg.paths.output_dir,
            status,
            stored,
        )
        return
    changes = config_changes(json.loads(stored.read_text()), plain(resolved_config(cfg)))
    if changes:
        refuse_changed_job(cfg, status, changes)


def check_same_images(cfg: DictConfig) -> None:
    """Refuse to keep a completed job trained before its image folder changed: the same
    config now draws other validation and test splits, so its numbers would stand beside
    jobs scored on other images (an unfinished job's resume refuses the same,
    `check_checkpoint_data`). Its checkpoint says what it trained on; one kept without a
    checkpoint, or written before listings were stored, cannot be checked."""
    from posttrain.checkpoints import load_checkpoint
    from posttrain.data.splits import listing_change, stored_listing

    folder = Path(cfg.paths.output_dir) / "checkpoints"
    kept = [folder / name for name in ("best.ckpt", "last.ckpt") if (folder / name).is_file()]
    if not kept:
        return
    try:
        stored = stored_listing(load_checkpoint(kept[0], key="ckpt_path"))
    except PosttrainError as error:
        log.warning("whether the data changed since %s cannot be checked: %s", kept[0], error)
        return
    change = listing_change(stored, instantiate_checked(cfg.data, "data").read_listing()[1])
    if change is None:
        return
    put_back_sweep_files(cfg)
    raise SweepJobChanged(
        f"The job folder {cfg.paths.output_dir} holds a completed job trained before the "
        f"data changed: {change}. The same config now draws other validation and test "
        "splits, so its numbers would stand beside jobs scored on other images, and the "
        "sweep's report and soup would compare them as one. Nothing was run and that job's "
        "metrics.json, checkpoints and .hydra/ config are kept as they were. Restore the "
        "files as they were to finish this sweep, or run the sweep on the data as it is "
        "with another `hydra.sweep.dir=...`."
    )


def put_back_sweep_files(cfg: DictConfig) -> None:
    """The job's `.hydra` files and the sweep's multirun.yaml, which Hydra rewrote for a job
    that is refused, as they were."""
    restore_files(job_copies(cfg))
    restore_files(sweep_copies(cfg))


def refuse_changed_job(cfg: DictConfig, status: str, changes: list[str]) -> None:
    """Put back the files Hydra rewrote for the new job, then stop with one paragraph."""
    put_back_sweep_files(cfg)
    shown = "; ".join(changes[:SHOWN_CHANGES])
    more = f" (and {len(changes) - SHOWN_CHANGES} more)" if len(changes) > SHOWN_CHANGES else ""
    raise SweepJobChanged(
        f"The job folder {cfg.paths.output_dir} holds a {status} job whose config differs "
        f"from what this sweep asks of it: {shown}{more}. Folder names leave out "
        "`data.root`, `model.pretrained`, `ckpt_path` and `paths.*`, and an edited config "
        "file changes no name, so a different job lands in the same folder. Nothing was run "
        "and that job's metrics.json, checkpoints and .hydra/ config are kept as they were. "
        "Run this sweep with another `hydra.sweep.dir=...`, or re-run the original command "
        "to finish the old sweep."
    )
