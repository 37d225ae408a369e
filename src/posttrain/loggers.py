"""Loggers whose files survive a resume in the run's own folder.

Lightning's CSVLogger deletes an existing `metrics.csv` ("Previous log files in this
directory will be deleted"), so `python train.py ckpt_path=last hydra.run.dir=<run>` left
a file that started at the resumed step. Here the earlier rows are kept, and when training
starts the rows at or after the restored step go (the abandoned part of an interrupted
epoch, which the resumed run logs again), so the file reads as the uninterrupted run's.
TensorBoard keeps every event file, and a resumed run writes a new one beside the old ones;
TensorBoard drops old points only where a tag's step goes backwards, so the steps of the
abandoned part showed twice. A session-start event at the restored step (what
`SummaryWriter(purge_step=...)` writes) makes it drop every older point from that step on.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class HistoryKeepingWriter(ExperimentWriter):
    """Lightning's CSV writer that appends to an existing `metrics.csv` instead of deleting it."""

    def _check_log_dir_exists(self) -> None:
        """Keep the file and its columns (new columns rewrite the header, old rows stay)."""
        if self._fs.isfile(self.metrics_file_path):
            self.metrics_keys = sorted(self.read_rows()[0])

    def read_rows(self) -> tuple[list[str], list[dict[str, str]]]:
        """(columns, rows) of the existing file."""
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            rows = list(reader)
            return list(reader.fieldnames or []), rows

    def drop_from_step(self, step: int) -> None:
        """Remove the rows logged at `step` or later: this run logs those steps again."""
        if not self._fs.isfile(self.metrics_file_path):
            return
        columns, rows = self.read_rows()
        kept = [row for row in rows if row.get("step") and int(row["step"]) < step]
        if len(kept) == len(rows):
            return
        from posttrain.checkpoints import write_atomically

        # Whole or not at all: rewritten in place, a kill (or an error) mid-write truncated
        # the run's log to what had been written so far.
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=columns)
        writer.writeheader()
        writer.writerows(kept)
        write_atomically(text.getvalue().encode(), Path(self.metrics_file_path))


class ResumableCSVLogger(CSVLogger):
    """`CSVLogger` that keeps the history of the run folder it writes in (see module doc)."""

    @property
    def experiment(self) -> HistoryKeepingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = HistoryKeepingWriter(log_dir=self.log_dir)
        return self._experiment  # type: ignore[return-value]


class TrimLogsToRestoredStep(Callback):
    """At the start of training, the logged history ends where the restored loop begins:
    step 0 for a fresh run in a reused folder, the checkpoint's step for a resume."""

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, ResumableCSVLogger):
                logger.experiment.drop_from_step(trainer.global_step)
            elif isinstance(logger, TensorBoardLogger):
                purge_tensorboard_from(logger, trainer.global_step)


def purge_tensorboard_from(logger: TensorBoardLogger, step: int) -> None:
    """TensorBoard discards the points of earlier event files at `step` or later."""
    from tensorboard.compat.proto.event_pb2 import Event, SessionLog

    start = Event(step=step, session_log=SessionLog(status=SessionLog.START))
    logger.experiment._get_file_writer().add_event(start)
