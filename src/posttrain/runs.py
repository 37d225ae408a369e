"""The run folder and the pieces every entry point shares.

Building callbacks/loggers/trainer from their config dicts, recording the config in every
checkpoint, writing `metrics.json`, logging hparams with real metrics, printing the
summary, and turning user errors into one paragraph instead of a traceback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from posttrain.checkpoints import CONFIG_KEY
from posttrain.errors import FolderInUse, PosttrainError, SweepJobChanged, require_known_options
from posttrain.run_names import shell_override

log = logging.getLogger("posttrain")


def find_in_chain(error: BaseException, kinds: type | tuple[type, ...]) -> BaseException | None:
    """The first exception of `kinds` in `error`'s cause chain (Hydra wraps what a `_target_`
    raised in an InstantiationException), or None."""
    current: BaseException | None = error
    while current is not None and not isinstance(current, kinds):
        current = current.__cause__ or current.__context__
    return current


def find_user_error(error: BaseException) -> PosttrainError | None:
    """The PosttrainError behind `error`, unwrapping Hydra's InstantiationException chain."""
    found = find_in_chain(error, PosttrainError)
    return found if isinstance(found, PosttrainError) else None


def is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def sweep_folder() -> Path | None:
    """The running sweep's `hydra.sweep.dir`, or None outside a multirun."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().sweep.dir) if is_multirun() else None


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Written atomically: a reader (or a kill) never sees half a file. Strict JSON: Python
    writes a NaN as a bare `NaN`, which jq and JSON.parse refuse (the whole record with it)."""
    from posttrain.checkpoints import write_atomically

    text = json.dumps(with_named_non_finite(payload), indent=2, sort_keys=True, allow_nan=False)
    write_atomically((text + "\n").encode(), path)


def with_named_non_finite(value: Any) -> Any:
    """`value` with every NaN/infinite float as the string "NaN", "Infinity" or "-Infinity":
    still said, but no reader takes it for a number (`errors.is_number` is False)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {key: with_named_non_finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [with_named_non_finite(item) for item in value]
    return value


def is_rank_zero() -> bool:
    """True except in the extra processes of a DDP group (they share the run folder)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


# Run folders whose `running` record this process wrote: from then on the folder's record is
# this run's, and its failure or interruption replaces it.
STARTED_HERE: set[Path] = set()


def may_replace_record(output_dir: Path) -> bool:
    """Whether a failure or interruption may be written over the folder's metrics.json.

    A run refused before it started (a resume in place with a changed `optimizer.lr`, a
    checkpoint that does not fit) changed nothing in its folder: the record of the run that
    is there (completed, interrupted, running) stays true and is kept; a failure replaces
    only an earlier failure.
    """
    if output_dir in STARTED_HERE:
        return True
    return earlier_status(output_dir) not in HOLDS_A_RUN


# Records of a run that trained: its numbers, checkpoints and logs are in the folder.
HOLDS_A_RUN = ("completed", "interrupted", "running", "diverged")
# Records whose run produced results that stand without a checkpoint.
FINISHED = ("completed", "diverged")


def earlier_record(output_dir: Path) -> dict[str, Any]:
    """The folder's metrics.json; empty when there is nothing readable."""
    try:
        record = json.loads((output_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def earlier_status(output_dir: Path) -> str | None:
    return earlier_record(output_dir).get("status")


def alive_here(record: dict[str, Any]) -> bool:
    """Whether the process a `running` record names is alive on this machine: another
    machine's run, or an older record without a pid, counts as alive (it cannot be told)."""
    import os
    import socket

    pid, host = record.get("pid"), record.get("host")
    if not isinstance(pid, int) or host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_folder_is_free(output_dir: Path, what: str, resumable: bool = True) -> None:
    """No run overwrites another: `hydra.run.dir` naming a folder that holds a run's results
    or checkpoints is refused unless the run is continued there (`ckpt_path=last`).
    Observed: a second `train.py hydra.run.dir=<run>` replaced the first run's best.ckpt,
    last.ckpt and metrics.json without a word. A folder may be used again when nothing in
    it would be lost: a failure or an interruption before the first checkpoint (the
    interruption's advice is to start again there), or a kill -9'd run's `running` record
    whose process is gone and that wrote no checkpoint."""
    if not is_rank_zero():  # DDP's other processes join the run rank 0 started here
        return
    record = earlier_record(output_dir)
    status = record.get("status")
    checkpoints = sorted(p.name for p in (output_dir / "checkpoints").glob("*.ckpt"))
    live = status == "running" and alive_here(record)
    if status not in FINISHED and not live and not checkpoints:
        return
    held = f"a {status} run" if status in HOLDS_A_RUN else "a run's checkpoints"
    files = f" ({', '.join(checkpoints)})" if checkpoints else ""
    writer = f"process {record['pid']} on {record.get('host')}" if "pid" in record else "a process"
    writing = f" ({writer} may be writing it)" if live else ""
    continue_it = "Continue that run with `ckpt_path=last` (same folder), leave"
    advice = continue_it if resumable and "last.ckpt" in checkpoints and not live else "Leave"
    raise PosttrainError(
        f"Config key `hydra.run.dir`: {output_dir} holds {held}{files}{writing}, and {what} "
        f"would overwrite its record. {advice} `hydra.run.dir` out (every run gets its own "
        "folder) or name a new folder, or delete this one first."
    )


LOCK_NAME = ".posttrain.lock"
# Run folders this process holds the lock of (file descriptors), until its task ends.
HELD: dict[Path, int] = {}


def claim_folder(output_dir: Path) -> None:
    """Hold an exclusive lock on the run folder for as long as this process works in it.

    The folder checks read the record and the checkpoints, then the run records `running`
    seconds later (after building data and model): two runs started at once with one
    `hydra.run.dir` both passed and trained into the same files, and a resume started while
    the run still went was accepted. The kernel drops the lock when its process ends, also
    on kill -9, so a dead run never holds its folder.
    """
    import fcntl
    import os
    import socket

    if not is_rank_zero() or output_dir in HELD:  # DDP's other ranks join rank 0's run
        return
    lock = output_dir / LOCK_NAME
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return  # an unwritable folder is refused by what writes there
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        key = "hydra.sweep.dir" if is_multirun() else "hydra.run.dir"
        raise FolderInUse(
            f"Config key `{key}`: {output_dir} is in use by a posttrain run that is still "
            f"going ({holder}, which holds {lock}); two processes in one folder would "
            "overwrite each other's checkpoints and metrics.json. Nothing was done here. Wait "
            "for that run to end, or stop it (SIGTERM records it as interrupted) and then "
            "continue it with `ckpt_path=last`; or name another folder."
        ) from None
    except OSError as error:  # a file system without flock (some NFS and Lustre mounts)
        os.close(fd)
        log.warning(
            "posttrain: cannot lock %s (%s), so a second run started in this folder while "
            "this one goes would not be refused; give each run its own folder.",
            lock,
            error.strerror or error,
        )
        return
    os.ftruncate(fd, 0)
    os.write(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode())
    HELD[output_dir] = fd


def release_folder(output_dir: Path) -> None:
    """The run in `output_dir` is over (the next job of a sweep runs in this process)."""
    import os

    fd = HELD.pop(output_dir, None)
    if fd is not None:
        os.close(fd)


def record_start(cfg: DictConfig) -> None:
    """metrics.json says `running` from the run's start, replacing what the folder held.

    A run ended by kill -9, the out-of-memory killer or a lost node records nothing at its
    end, so a run continued in a completed run's folder read `completed` with the earlier
    run's numbers while its checkpoints and config had moved on.
    """
    import os
    import socket
    from datetime import datetime

    if not is_rank_zero():
        return
    output_dir = Path(cfg.paths.output_dir)
    STARTED_HERE.add(output_dir)
    started = datetime.now().astimezone().isoformat(timespec="seconds")
    process = f"process {os.getpid()} on {socket.gethostname()}"
    write_json(
        output_dir / "metrics.json",
        {
            "status": "running",
            "started": started,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "reason": f"started {started} by {process}; if that process is gone, it was "
            "killed before it could record its end (kill -9, out of memory, a lost node)",
            # What a kill leaves to continue from: last.ckpt, once the first epoch is done.
            "resume": resume_command(output_dir, str(cfg.get("task_name", "train")), True),
        },
    )
    from posttrain.sweep_jobs import copy_files, job_copies

    copy_files(job_copies(cfg))  # what `put_back_hydra_files` restores after a refusal


def put_back_hydra_files(cfg: DictConfig) -> None:
    """A command refused in a folder holding a run: Hydra had already written that command's
    `.hydra/config.yaml` and `overrides.yaml` there, so the completed run's folder described
    the refused command (`model.width=8` for a run that trained 4). The run's own files,
    copied at its start (`record_start`), go back."""
    from posttrain.sweep_jobs import job_copies, restore_files

    restore_files(job_copies(cfg))


def write_sweep_report_now() -> None:
    """A sweep stopped by a signal never reaches Hydra's end-of-sweep callback."""
    from hydra.core.hydra_config import HydraConfig

    from posttrain.report import write_report

    try:
        write_report(HydraConfig.get().sweep.dir)
    except Exception as error:  # the interruption record matters more than the report
        log.warning("sweep report not written: %s", error)


def resume_command(output_dir: Path, task_name: str, has_last: bool) -> str:
    """How to continue a stopped run, as a command that can be pasted into a shell: the
    run's own overrides (`typed_overrides`), quoted, and where to continue.

    A sweep job continues by running its sweep again in the same folder (completed jobs are
    kept, interrupted ones continue from their `last.ckpt`); an evaluation, or a run stopped
    before its first checkpoint, has nothing to resume from (`ckpt_path=last` would be
    refused): it starts again.
    """
    sweep_dir = sweep_folder()
    if sweep_dir is not None:
        folder = shell_override("hydra.sweep.dir", sweep_dir)
        drop = ("hydra.sweep.dir", "hydra.mode")  # `-m` is the mode
        words = typed_overrides(sweep_overrides(sweep_dir), drop=drop)
        return f"python {task_name}.py -m {words}{folder}"
    if task_name == "eval" or not has_last:
        return f"python {task_name}.py {typed_overrides(run_overrides(), drop=())}".rstrip()
    folder = shell_override("hydra.run.dir", output_dir)
    words = typed_overrides(run_overrides(), drop=("ckpt_path", "hydra.run.dir"))
    return f"python train.py {words}ckpt_path=last {folder}"


def run_overrides() -> list[str] | None:
    """The overrides this process was started with; None outside a Hydra run (tests)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return list(HydraConfig.get().overrides.task)


def sweep_overrides(sweep_dir: Path) -> list[str] | None:
    """The sweep's own command-line overrides (with their comma lists), from the
    `multirun.yaml` Hydra writes in the sweep folder; None when it cannot be read.

    As typed (`${...}` unresolved: resolved, it was one job's value, another job's config),
    and with the sweep's `hydra.*` overrides: without `hydra.sweep.subdir=...` the advised
    command put every job in a new folder and trained it from the start.
    """
    try:
        typed = OmegaConf.load(sweep_dir / "multirun.yaml").hydra.overrides
        words = [*OmegaConf.to_container(typed.hydra), *OmegaConf.to_container(typed.task)]
        return [str(word) for word in words]
    except Exception:  # advice only: a missing or odd file must not hide the interruption
        return None


def typed_overrides(overrides: list[str] | None, drop: tuple[str, ...]) -> str:
    """`overrides` as shell words with a trailing space, keys in `drop` left out (the
    command adds its own); `<same overrides> ` when they are not known."""
    import shlex

    if overrides is None:
        return "<same overrides> "
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in drop]
    return "".join(f"{shlex.quote(o)} " for o in kept)


def record_interruption(output_dir: Path, stop: Any, task_name: str) -> None:
    """metrics.json says `interrupted` (never `completed`), and how to continue."""
    last_exists = (output_dir / "checkpoints" / "last.ckpt").is_file()
    resume = resume_command(output_dir, task_name, last_exists)
    write_json(
        output_dir / "metrics.json",
        {
            "status": "interrupted",
            "reason": f"stopped by {stop.signal_name}",
            "epochs_completed": stop.epochs_completed,
            "global_step": stop.global_step,
            "resume": resume,
        },
    )
    progress = (
        "the evaluation was abandoned; run it again"
        if task_name == "eval"
        else "before the first checkpoint was written; start it again"
        if not last_exists
        else f"after {stop.epochs_completed} completed epoch(s); the current one was abandoned. "
        f"{output_dir / 'checkpoints' / 'last.ckpt'} holds the last completed epoch; continue "
        "exactly"
    )
    say(f"interrupted by {stop.signal_name}: {progress} with: {resume}")


def say(message: str) -> None:
    """A stopping run's last word on stderr; the terminal may be gone (`| tee` died with
    the same Ctrl-C), and that must not stop the run from ending."""
    with contextlib.suppress(OSError):
        print(f"\nposttrain: {message}\n", file=sys.stderr, flush=True)


def guarded(task: Callable[[DictConfig], dict[str, float]], cfg: DictConfig) -> float | None:
    """Run `task`, returning the optimized metric; user errors print one paragraph.

    In a multirun every failure is recorded in the job's `metrics.json` and the sweep goes
    on (the sweeper gets NaN); in a single run a user error exits with status 2 and no
    traceback, while a bug keeps its traceback. A sweep job refused because its folder holds
    another finished job (`SweepJobChanged`) or is in use by a live process (`FolderInUse`)
    records nothing, so the folder's record stays that job's, and stops the sweep: every
    later job of the command would meet the same.
    """
    from posttrain.interrupts import RunInterrupted, stop_on_signals

    output_dir = Path(cfg.paths.output_dir)
    try:
        claim_folder(output_dir)
        # The whole task, not only `fit`: elsewhere (building, testing, calibrating) Lightning's
        # SIGTERM handler only sets a flag, and a signalled sweep went on to its next job.
        with stop_on_signals():
            metrics = task(cfg)
    except RunInterrupted as stop:  # also in a sweep: the scheduler is stopping everything
        try:
            if may_replace_record(output_dir):
                record_interruption(output_dir, stop, str(cfg.get("task_name", "train")))
            else:
                put_back_hydra_files(cfg)
                say(f"interrupted by {stop.signal_name} before the run started; "
                    f"{output_dir / 'metrics.json'} keeps the earlier run's record")  # fmt: skip
            if is_multirun():
                write_sweep_report_now()
        finally:  # whatever the record met (a closed pipe, a full disk), the sweep stops here
            raise SystemExit(stop.exit_status) from None
    except Exception as error:
        user_error = find_user_error(error) or refused_during_the_run(error)
        if isinstance(user_error, SweepJobChanged | FolderInUse):  # another job's record
            put_back_hydra_files(cfg)
            print(f"\nposttrain: error: {user_error}\n", file=sys.stderr)
            raise SystemExit(2) from None
        detail = str(user_error) if user_error else "".join(traceback.format_exception(error))
        status = user_error.status if user_error else "failed"
        if may_replace_record(output_dir):
            write_json(output_dir / "metrics.json", {"status": status, "error": detail})
        else:
            put_back_hydra_files(cfg)
            log.info("kept %s: this run stopped before it started", output_dir / "metrics.json")
        if is_multirun():
            log.error("job %s (the sweep continues): %s", status, detail)
            return float("nan")
        if user_error is None:
            raise
        print(f"\nposttrain: error: {user_error}\n", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        release_folder(output_dir)
    return metrics.get(cfg.get("optimized_metric") or "", None)


def instantiate_checked(
    node: DictConfig, key: str, supplied: tuple[str, ...] | None = None, **given: Any
) -> Any:
    """`instantiate(node, **given)` once the node's keys are known to its `_target_`.

    `train.py +data.foo=1`, `+reg.l2.foo=1` and `eval.py data.shot=5` (eval adds the `+`
    itself) ended in Hydra's "Error executing job ... TypeError: unexpected keyword argument",
    exit status 1 and a traceback in metrics.json; now one paragraph names the key and the
    valid ones. `supplied` (default: every `given` name) are the arguments posttrain passes
    itself: a config key naming one (`+method.model=...`) would be overwritten, so it is
    refused too. A target that cannot be imported is left to `instantiate`'s own error.
    """
    from hydra.utils import get_object

    try:
        target = get_object(str(node._target_))
    except Exception:  # `instantiate` reports it in its own words
        target = None
    if target is not None:
        options = {name: None for name in node if not str(name).startswith("_")}  # `_target_`
        owned = tuple(given) if supplied is None else supplied
        require_known_options(target, options, key, supplied=owned)
    return instantiate(node, **given)


def instantiate_named(group: DictConfig | None, key: str) -> list[Any]:
    """Instantiate every entry with a `_target_` in a name-keyed config dict (skips nulls);
    `key` is the group's (`reg`), naming an entry's unknown keys as `reg.<name>`."""
    if not group:
        return []
    return [
        instantiate_checked(entry, f"{key}.{name}")
        for name, entry in group.items()
        if isinstance(entry, DictConfig) and "_target_" in entry
    ]


class ConfigInCheckpoint(Callback):
    """Stores the resolved run config in every checkpoint.

    Evaluation and fine-tuning rebuild the exact model and data from a checkpoint alone.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[CONFIG_KEY] = self.config


def build_components(cfg: DictConfig) -> tuple[L.LightningDataModule, L.LightningModule]:
    """DataModule and method from `cfg.data`, `cfg.model`, `cfg.reg`, `cfg.method`.

    The model is sized to the data (classes, input channels) here, so no config repeats
    those numbers; the selected regularizers are checked against what the method offers
    and attached to its model parts and the data, before any work is done.
    """
    from posttrain.regularizers import RegularizerSet

    datamodule = instantiate_checked(cfg.data, "data")
    sized = {"num_classes": datamodule.num_classes, "in_channels": datamodule.in_channels}
    check_model_not_sized(cfg.model, sized)
    model = instantiate(cfg.model, **sized)
    regularizers = RegularizerSet(instantiate_named(cfg.get("reg"), "reg"))
    method = instantiate_checked(
        cfg.method, "method", model=model, regularizers=regularizers, _convert_="all"
    )
    check_targets_fit_method(datamodule, method)
    regularizers.attach(method, datamodule)
    return datamodule, method


def check_model_not_sized(model: DictConfig, sized: dict[str, int]) -> None:
    """`+model.num_classes=5` was accepted and overridden by the data's sizes: the run trained
    a 10-way head. The data decides both; say which keys of the data change them."""
    given = [key for key in sized if key in model]
    if not given:
        return
    raise PosttrainError(
        f"Config key {', '.join(f'`model.{key}`' for key in given)} cannot be set: the model "
        f"is sized to the data ({sized['num_classes']} classes, {sized['in_channels']} input "
        "channel(s)), and nothing would read it. To train on fewer classes keep some with "
        "`data.classes=[0,1,2]`; the channels are the data's (`data.options.channels` for "
        "data=fake and data=imagefolder). Drop the key, e.g. `~model.num_classes`."
    )


def check_targets_fit_method(datamodule: L.LightningDataModule, method: L.LightningModule) -> None:
    """`data.targets` makes every batch carry a dict of per-task targets, which only a method
    offering `task_targets` trains on. Observed: `method=supervised` took them and failed at
    the first training step with a raw `TypeError` from cross_entropy (target is a dict)."""
    tasks = getattr(datamodule, "tasks", None)
    if not tasks or "task_targets" in getattr(method, "offers", ()):
        return
    name = getattr(method, "method_name", type(method).__name__)
    raise PosttrainError(
        f"Config key `data.targets` declares per-task targets "
        f"({', '.join(task.name for task in tasks)}), which only `method=multitask` trains on "
        f"(one head per task); `method={name}` trains one classifier on the class label and "
        "cannot use them. Use `method=multitask` (e.g. `experiment=digits_multitask`), or "
        "drop the tasks with `~data.targets`."
    )


def build_trainer(cfg: DictConfig, extra_callbacks: list[Callback]) -> L.Trainer:
    """The Trainer from `cfg.trainer` with `cfg.callbacks` and `cfg.logger` attached.

    The console shows only what `cfg.callbacks` configures (no tips, no duplicate lines), and
    checkpoints are only those it configures: without one, Lightning wrote its own
    `epoch=N-step=M.ckpt` of the last epoch, which `callbacks=console` says it does not.
    """
    from posttrain.console import console_flags, quiet_console

    quiet_console()
    loggers = instantiate_named(cfg.get("logger"), "logger")
    callbacks = instantiate_named(cfg.get("callbacks"), "callbacks") + extra_callbacks
    if not loggers:
        # The LR monitor writes only to loggers; with `logger=none` it has nowhere to write.
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    callbacks, flags = console_flags(cfg.trainer, callbacks)
    if "enable_checkpointing" not in cfg.trainer and not any(
        isinstance(callback, ModelCheckpoint) for callback in callbacks
    ):  # `callbacks=console`/`none` mean no checkpoints, not Lightning's own epoch=N file
        flags["enable_checkpointing"] = False
    try:
        return instantiate_checked(  # the console flags are read from `cfg.trainer` above
            cfg.trainer,
            "trainer",
            supplied=("callbacks", "logger"),
            callbacks=callbacks,
            logger=loggers or False,
            **flags,
        )
    except Exception as error:
        refusal = lightning_refusal(error)
        if refusal is None:
            raise
        raise PosttrainError(
            f"The `trainer` settings were refused by Lightning: {refusal} Change the "
            "setting it names: a `trainer.*` key, or the `callbacks.*` entry it conflicts "
            "with (`python train.py --help` lists the trainer options: cpu, gpu, ddp, ...). "
            "Nothing was trained."
        ) from None


def refused_during_the_run(error: BaseException) -> PosttrainError | None:
    """Lightning's refusal of a setting it can only check while running (a checkpoint
    `monitor` the method does not log: ProtoNet has no `val/f1_macro`), as posttrain's
    paragraph instead of a traceback; only MisconfigurationException, Lightning's type for
    a user's setting, so a bug stays a traceback."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    current = find_in_chain(error, MisconfigurationException)
    if current is None:
        return None
    return PosttrainError(
        f"Lightning refused a setting while the run was going: {str(current).strip()} Change "
        "the config key it names (a `callbacks.*` entry's `monitor`: README 'Metrics' says "
        "which method logs which metric); the checkpoints and logs written so far are kept."
    )


def lightning_refusal(error: BaseException) -> str | None:
    """Lightning's own message when it refuses a setting (`trainer.devices=0`,
    `trainer.accelerator=tpu` without torch_xla, `+trainer.enable_checkpointing=false` with
    a checkpoint callback), found under Hydra's InstantiationException; None for anything
    else, which stays a traceback (a bug must not read as a config mistake)."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    found = find_in_chain(error, (MisconfigurationException, ModuleNotFoundError))
    if found is None:
        return None
    message = str(found).strip()
    return message if message.endswith(".") else message + "."


# What a person compares between runs, in TensorBoard's HPARAMS tab and the run's hparams.yaml.
# Config groups whose chosen option is itself a hyper-parameter (`reg=l2`, `model=resnet18`).
CHOICE_GROUPS = ("experiment", "data", "model", "method", "optimizer", "scheduler", "reg")
# Knobs shown for every run (where the chosen option has them); the rest appear when overridden.
SUMMARY_KNOBS = (
    "seed",
    "data.dataset",
    "data.batch_size",
    "data.samples_per_class",
    "data.image_size",
    "data.ways",
    "data.shots",
    "model.arch",
    "model.width",
    "model.hidden",
    "model.pretrained",
    "optimizer.name",
    "optimizer.lr",
    "optimizer.weight_decay",
    "scheduler.name",
    "trainer.max_epochs",
    "trainer.precision",
)
# Method keys that repeat other groups (`${optimizer}`, `${data.targets}`): not method knobs.
METHOD_MIRRORS = frozenset({"optimizer", "scheduler", "tasks"})
# Trainer keys that change the result; devices, batch limits and logging cadence do not.
TRAINER_KNOBS = frozenset(
    {"max_epochs", "max_steps", "precision", "gradient_clip_val", "accumulate_grad_batches"}
)
# Where files go and how the run is wired: never a column, even when overridden.
PLUMBING_PREFIXES = ("callbacks.", "logger.", "paths.", "hydra.")
PLUMBING_KEYS = frozenset({"ckpt_path", "task_name", "optimized_metric", "data.root"})


def readable(value: Any) -> bool | int | float | str:
    """A value as TensorBoard can show it: numbers stay numbers, the rest is command-line text.

    TensorBoard would turn booleans into 0/1 and drop None; `reg=[dropout,l2]` reads as
    "dropout,l2", the way it was typed.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int | float | str):
        return value
    if isinstance(value, list | tuple):
        return ",".join(str(readable(item)) for item in value)
    return str(value)


def is_plumbing(key: str) -> bool:
    """True for keys that say how a run is wired rather than what was trained."""
    if "_target_" in key or key in PLUMBING_KEYS or key.startswith(PLUMBING_PREFIXES):
        return True
    return key.startswith("trainer.") and key.split(".")[1] not in TRAINER_KNOBS


def flat_knobs(value: Any, name: str) -> dict[str, Any]:
    """`name: value`, or `name.sub: leaf` for every leaf of a config dict (no `_target_`)."""
    if not isinstance(value, dict):
        return {name: readable(value)}
    flat: dict[str, Any] = {}
    for key, item in value.items():
        if key != "_target_":
            flat.update(flat_knobs(item, f"{name}.{key}"))
    return flat


def lookup(config: dict[str, Any], dotted: str) -> tuple[bool, Any]:
    """(found, value) of a dotted key in a nested config dict."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def group_choices(config: dict[str, Any], choices: dict[str, Any]) -> dict[str, Any]:
    """The option chosen in each compared group, e.g. `{"model": "small_cnn", "reg": "l2"}`.

    Hydra records no choice for a list (`reg=[dropout,l2]`) and none exists outside Hydra
    (eval rebuilds the run from its checkpoint), so `reg` falls back to the selected
    regularizers' names: each `conf/reg` option is one key named after itself.
    """
    chosen = {group: choices[group] for group in CHOICE_GROUPS if choices.get(group) is not None}
    if "reg" not in chosen and isinstance(config.get("reg"), dict):
        chosen["reg"] = list(config["reg"]) or "none"
    return {group: readable(choice) for group, choice in chosen.items()}


def run_knobs(config: dict[str, Any]) -> dict[str, Any]:
    """Every knob of each chosen regularizer, the method's own knobs, then the summary knobs."""
    knobs: dict[str, Any] = {}
    for name, regularizer in (config.get("reg") or {}).items():
        knobs.update(flat_knobs(regularizer, f"reg.{name}"))
    for key, value in (config.get("method") or {}).items():
        if key not in METHOD_MIRRORS:
            knobs.update(flat_knobs(value, f"method.{key}"))
    for key in SUMMARY_KNOBS:
        found, value = lookup(config, key)
        if found:
            knobs[key] = readable(value)
    return knobs


def override_keys(overrides: list[str], choices: dict[str, Any]) -> list[str]:
    """The config keys the command line set, in its order (`+key`, `++key` as `key`).

    Deletions (`~key`), groups other than the compared ones (`trainer=cpu`, `debug=fast`) and
    nested group paths (`hydra/launcher=joblib`) name no single value and are skipped.
    """
    keys = []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+")
        if key.startswith("~") or "/" in key or (key in choices and key not in CHOICE_GROUPS):
            continue
        keys.append(key)
    return keys


def flat_hparams(
    config: dict[str, Any],
    choices: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
    swept: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """The hyper-parameters a person compares, the ones the command line set first.

    A full config flattened is ~80 columns led by `callbacks.*._target_`, which buries the
    knob a sweep varies. Logged instead: the group choices, the knobs that define the run
    (data size, model, optimizer, scheduler, method, every knob of each chosen regularizer)
    and anything else overridden, never wiring (`_target_`, callbacks, loggers, paths) unless
    the sweep varies it (`swept`, see `sweep_varied_keys`): jobs that differ only there
    (`trainer.limit_train_batches=1,4`) showed the same columns beside different metrics.
    An eval run's config holds the trained run under `trained`: that run is described.
    """
    choices = choices or {}
    described = config.get("trained", config)
    selected = {**group_choices(described, choices), **run_knobs(described)}
    first: dict[str, Any] = {}
    for key in override_keys(overrides or [], choices):
        if key in CHOICE_GROUPS:
            first.update({key: selected[key]} if key in selected else {})
            continue
        found, value = lookup(config, key)  # the config the override was applied to
        first.update(flat_knobs(value, key) if found else {})
    ordered = {**first, **{k: v for k, v in selected.items() if k not in first}}
    return {k: v for k, v in ordered.items() if not is_plumbing(k) or within(k, swept)}


def within(key: str, names: Iterable[str]) -> bool:
    """True when `key` is one of `names` or a leaf under one (`a.b` under `a`)."""
    return any(key == name or key.startswith(f"{name}.") for name in names)


def sweep_varied_keys() -> frozenset[str]:
    """The keys the running sweep gives its jobs different values: a basic sweep's
    `key=a,b` (its jobs, from the sweep's `multirun.yaml`) and an Optuna search's
    `hydra.sweeper.params`; empty outside a multirun."""
    from hydra.core.hydra_config import HydraConfig

    from posttrain.report import expected_jobs, normalized

    if not is_multirun():
        return frozenset()
    hydra_cfg = HydraConfig.get()
    keys = {str(key).lstrip("+~") for key in (hydra_cfg.sweeper.get("params") or {})}
    try:
        jobs = [normalized(job) for job in expected_jobs(Path(hydra_cfg.sweep.dir)) or []]
    except Exception as error:  # an unreadable multirun.yaml costs columns, not the run
        log.warning("the sweep's multirun.yaml could not be read (%s): HPARAMS may lack "
                    "a swept key", error)  # fmt: skip
        jobs = []
    keys.update(key for job in jobs for key in job if len({j.get(key) for j in jobs}) > 1)
    return frozenset(keys)


def hydra_choices_and_overrides() -> tuple[dict[str, Any], list[str]]:
    """Group choices and command-line overrides of the current Hydra run; empty outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}, []
    hydra_cfg = HydraConfig.get()
    choices = OmegaConf.to_container(hydra_cfg.runtime.choices)
    return choices, list(hydra_cfg.overrides.task)  # type: ignore[return-value]


def write_hparams_yaml(logger: TensorBoardLogger, params: dict[str, Any]) -> None:
    """hparams.yaml beside the events, holding exactly the logged columns.

    Lightning writes the file once, early in fit, from the method's init arguments; it is
    replaced so the file and the HPARAMS tab agree.
    """
    from lightning.pytorch.core.saving import save_hparams_to_yaml

    logger.hparams = dict(params)
    save_hparams_to_yaml(Path(logger.log_dir) / logger.NAME_HPARAMS_FILE, logger.hparams)


def log_hparams(trainer: L.Trainer, config: dict[str, Any], metrics: dict[str, float]) -> None:
    """Log the compared hyper-parameters of the run (see `flat_hparams`) for HPARAMS.

    Only the session summaries are written, no experiment summary: TensorBoard takes every
    column from the first experiment summary it meets under `--logdir`, so one per run hid
    the keys other runs lacked (an L2 sweep beside a `reg=none` run had no `reg.*` column).
    Without it TensorBoard unites the keys of all runs and puts those whose values differ
    first. The metric columns (`val/acc_best`, `test/acc`, ...) are the last points of the
    scalars already in the run under those tags, so `metrics` is not written a second time
    (Lightning's `log_hyperparams(metrics=...)` would add a stray point to each curve).
    """
    from torch.utils.tensorboard.summary import hparams

    choices, overrides = hydra_choices_and_overrides()
    params = flat_hparams(config, choices, overrides, sweep_varied_keys())
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            write_hparams_yaml(logger, params)
            writer = logger.experiment._get_file_writer()
            _, session_start, session_end = hparams(params, {})
            writer.add_summary(session_start)
            writer.add_summary(session_end)
            logger.finalize("success")


def print_summary(
    output_dir: Path, metrics: dict[str, float], log_root: str, tested: str | None = None
) -> None:
    """A few lines a person reads at the end of a run: where, how well, what next."""
    from posttrain.console import tensorboard_logdir

    counts = ("val/images", "val/episodes")  # what `val/acc_best` was scored on
    shown = {
        k: v for k, v in sorted(metrics.items()) if k.startswith(("test/", "val/acc", *counts))
    }
    logdir = tensorboard_logdir(output_dir, log_root)
    lines = [
        "",
        f"posttrain: run folder   {output_dir}",
        *(f"  {name:<26} {summary_number(name, value)}" for name, value in shown.items()),
        *([f"  {'tested':<26} {tested}"] if tested else []),
        f"  metrics.json               {output_dir / 'metrics.json'}",
        *([f"  TensorBoard                tensorboard --logdir {logdir}"] if logdir else []),
        "",
    ]
    print("\n".join(lines), flush=True)


def summary_number(name: str, value: float) -> str:
    """Counts (`test/images`, `val/episodes`) as whole numbers, scores to four places."""
    return f"{value:.0f}" if name.endswith(("/images", "/episodes")) else f"{value:.4f}"


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def epoch_metrics(values: dict[str, Any]) -> dict[str, float]:
    """Scalar metrics as floats, without Lightning's per-step duplicates (`*_step`)."""
    from posttrain.methods.metrics import to_floats

    return {k: v for k, v in to_floats(values).items() if not k.endswith("_step")}


def record_run(
    trainer: L.Trainer,
    cfg: DictConfig,
    config: dict[str, Any],
    metrics: dict[str, float],
    tested: str | None = None,
) -> None:
    """metrics.json, TensorBoard hparams with the final metrics, and the printed summary;
    `tested` says which weights `test/*` measured (training runs)."""
    if not trainer.is_global_zero:
        return
    output_dir = Path(cfg.paths.output_dir)
    said = {"tested": tested} if tested else {}
    write_json(output_dir / "metrics.json", {"status": "completed", **said, **metrics})
    STARTED_HERE.discard(output_dir)  # the record is the finished run's from now on
    log_hparams(trainer, config, metrics)
    print_summary(output_dir, metrics, cfg.paths.log_dir, tested)
