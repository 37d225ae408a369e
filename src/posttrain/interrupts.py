"""SIGTERM and SIGINT end a run honestly: at once, recorded as interrupted, exit status 128+N.

Lightning turns SIGTERM into a clean exit (status 0) at the next step boundary, which can be
a minute away on a large model, and Ctrl-C into `sys.exit(1)`: both leave no record, and a
pre-empted job reads as a success. Here the first signal abandons the current step at once
(the checkpoints of completed epochs stay: `last.ckpt` is the resume point, so a resumed run
matches an uninterrupted one exactly), and the entry point records `"status": "interrupted"`.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lightning.pytorch.callbacks import Callback

HANDLED = (signal.SIGTERM, signal.SIGINT)


class RunInterrupted(Exception):
    """The run was stopped by a signal; carries what the record and the message need."""

    def __init__(self, signum: int, epochs_completed: int = 0, global_step: int = 0) -> None:
        self.signum, self.epochs_completed, self.global_step = signum, epochs_completed, global_step
        super().__init__(f"interrupted by {self.signal_name}")

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_status(self) -> int:
        """What a shell reports for a process killed by the signal: 143 SIGTERM, 130 SIGINT."""
        return 128 + self.signum


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM/SIGINT raise `KeyboardInterrupt` immediately (Lightning
    shuts its loop down on it) and the block re-raises it as `RunInterrupted`."""
    received: dict[str, Any] = {}
    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach the main thread only
        return

    def on_signal(signum: int, frame: Any) -> None:
        if "signum" in received:
            return  # a second signal during shutdown: the first one is being handled
        received["signum"] = signum
        raise KeyboardInterrupt

    previous = {signum: signal.signal(signum, on_signal) for signum in HANDLED}
    try:
        yield
    except BaseException as stop:  # after a signal, whatever ended the block: it was stopped
        if "signum" not in received:
            raise
        # Usually Lightning's KeyboardInterrupt/SystemExit, but shutting down can raise
        # anything, e.g. BrokenPipeError when the terminal's `| tee` died with the same Ctrl-C.
        raise RunInterrupted(received["signum"]) from stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class ValidateWhenStoppingMidEpoch(Callback):
    """`trainer.max_steps` reached inside an epoch: validate (and so checkpoint) first.

    Lightning validates at epoch ends only, so a `max_steps` run ending mid-epoch had no
    `best.ckpt` and no `val/acc_best`. Asking the loop to stop at that step makes it run
    validation there (as it does for early stopping) before it stops.
    """

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True


# Where a checkpoint keeps the epoch-end metrics of the run so far (see `CompletedEpochs`).
METRICS_KEY = "posttrain_epoch_metrics"


class CompletedEpochs(Callback):
    """Counts the epochs that ran all their batches: a run stopped mid-epoch (`max_steps`,
    `max_time`) must not report the partial epoch as done, and Lightning's own epoch
    counter counts it. Kept in checkpoints, so a resumed run counts on.

    Checkpoints also keep the epoch-end metrics so far (`restored`): a resume records what
    its own epochs did not compute again. Observed: a run stopped while testing after its
    last epoch, resumed with `ckpt_path=last`, trained nothing and recorded `completed`
    without `train/*`, `val/*` or `val/acc_best` (the sweep objective)."""

    def __init__(self) -> None:
        self.completed = 0
        self.batches = 0
        self.fitting = False
        self.restored: dict[str, float] = {}

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.fitting = stage == "fit"

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.batches = 0

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        self.batches += 1

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.batches >= trainer.num_training_batches:
            self.completed += 1

    def state_dict(self) -> dict[str, int]:
        return {"completed": self.completed}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Resuming counts on; testing `best.ckpt` after training keeps the run's count (it
        would otherwise go back to the best epoch's)."""
        if self.fitting:
            self.completed = state_dict["completed"]

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        from posttrain.runs import epoch_metrics

        checkpoint[METRICS_KEY] = epoch_metrics(trainer.callback_metrics)

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        if not self.fitting:
            return
        self.restored = dict(checkpoint.get(METRICS_KEY) or {})
        if trainer.max_steps != -1:
            resume_at_next_epoch(checkpoint)


def resume_at_next_epoch(checkpoint: dict[str, Any]) -> None:
    """Loop counters of a checkpoint written at the end of a complete epoch (`last.ckpt`),
    as Lightning's epoch-based resume makes them: that epoch completed, the next one starts
    with fresh per-epoch counters.

    Under `trainer.max_steps` Lightning resumes every checkpoint as if written mid-epoch
    (`_FitLoop.restarting` is forced on for iteration-based training): it replayed the
    finished epoch's end on no batches, which failed with `ValueError: No samples to
    concatenate` (Lightning issue #19617). Checkpoints written mid-epoch (a `max_steps` stop)
    are left alone. Runs in `on_load_checkpoint`, before Lightning restores the loops.
    """
    loop = (checkpoint.get("loops") or {}).get("fit_loop") or {}
    epochs, batches = loop.get("epoch_progress"), loop.get("epoch_loop.batch_progress")
    if not epochs or not batches or not batches.get("is_last_batch"):
        return
    counters = (epochs["total"], epochs["current"])
    ended = all(c["started"] == c["processed"] == c["completed"] + 1 for c in counters)
    if not ended:
        return  # not written between an epoch's last batch and its completion
    for counter in counters:
        counter["completed"] = counter["processed"]
    for key, progress in loop.items():
        if key.startswith("epoch_loop."):
            zero_counts(progress, "current")
    batches["is_last_batch"] = False
    zero_counts(loop.get("epoch_loop.val_loop.batch_progress") or {}, "total")  # per epoch


def zero_counts(progress: dict[str, Any], which: str) -> None:
    """Sets every `which` ("current"/"total") counter in a Lightning progress state to 0."""
    for key, value in progress.items():
        if key == which and isinstance(value, dict):
            progress[key] = dict.fromkeys(value, 0)
        elif isinstance(value, dict):
            zero_counts(value, which)
