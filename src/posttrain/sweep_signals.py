"""A signal to a sweep's own process reaches the jobs it runs in other processes.

With `hydra/launcher=joblib` the jobs train in loky worker processes. Observed: SIGTERM to the
sweep's process alone (`kill <pid>`, `docker stop`, a driver script's `terminate()`) ended it
at once with status 143, while its workers trained on as orphans: the jobs' records said
`running` (later `completed`), and no report was written. Ctrl-C reaches every process of the
terminal's group and was fine. Here the sweep's process passes the signal on to its workers
(each job records itself `interrupted`, see `posttrain.interrupts`), waits until every job
has recorded its end, writes the report and exits with 128+N.

Kept light (no Lightning import): Hydra builds its callbacks in every process it starts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("posttrain")

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def child_processes(parent: int) -> list[int]:
    """The processes whose parent is `parent` (Linux `/proc`; none where it is missing)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # `pid (comm) state ppid ...`: comm may hold spaces and parentheses.
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == parent:
                children.append(int(stat.parent.name))
    return children


def working_jobs(sweep: Path) -> set[tuple[int, Path]]:
    """(process, job folder) for each job of the sweep at work now: it holds its folder's
    lock (`runs.claim_folder`) from its start until its end is recorded. Read from
    `/proc/locks`, as testing a lock would take it from a job about to start."""
    from posttrain.runs import LOCK_NAME

    folders = {}
    for lock in sweep.glob(f"*/{LOCK_NAME}"):
        with contextlib.suppress(OSError):
            folders[lock.stat().st_ino] = lock.parent
    working = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/locks").read_text().splitlines():
            # `1: FLOCK  ADVISORY  WRITE 4242 fd:01:393287 0 EOF`; `->` marks a waiter.
            fields = line.split()
            if len(fields) >= 6 and fields[1] == "FLOCK" and "->" not in fields:
                with contextlib.suppress(ValueError):
                    inode = int(fields[5].rsplit(":", 1)[1])
                    if inode in folders:
                        working.add((int(fields[4]), folders[inode]))
    return working


def stop_jobs(sweep: Path, signum: int) -> None:
    """Pass the signal to every job at work until none is (a worker that finished its job
    may start the next one meanwhile: that one is stopped too), then end the workers."""
    import time

    children, signalled = set(child_processes(os.getpid())), set()
    while working := {job for job in working_jobs(sweep) if job[0] in children}:
        for pid, _ in working - signalled:
            with contextlib.suppress(OSError):
                os.kill(pid, signum)
        signalled |= working
        time.sleep(0.1)
    for pid in child_processes(os.getpid()):  # idle workers; a job not yet started
        with contextlib.suppress(OSError):
            if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)  # (a tracker ends with this process)


class StopJobsOnSignals(Callback):
    """Hydra callback: for `hydra/launcher=joblib`, SIGTERM/SIGINT to the sweep's process
    stop its jobs as they would stop a sequential sweep (see the module doc)."""

    def __init__(self) -> None:
        self.previous: dict[int, Any] = {}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        target = str(config.hydra.launcher.get("_target_", "")).lower()
        if "joblib" not in target or threading.current_thread() is not threading.main_thread():
            return  # the basic launcher runs its jobs here: `stop_on_signals` handles them
        sweep, received = Path(str(config.hydra.sweep.dir)), []

        def on_signal(signum: int, frame: Any) -> None:
            if received:  # a second signal: stop waiting for the jobs
                raise SystemExit(128 + signum)
            received.append(signum)
            stop_jobs(sweep, signum)
            write_report_after_signal(sweep)
            raise SystemExit(128 + signum)

        self.previous = {signum: signal.signal(signum, on_signal) for signum in SIGNALS}

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}


def write_report_after_signal(sweep: Path) -> None:
    """Every job has recorded its end: the report counts them all (a job writing it as it
    stopped may have seen another still `running`)."""
    from posttrain.report import write_report

    try:
        write_report(sweep)
    except (Exception, SystemExit) as error:  # no job folder yet: nothing to report
        log.warning("sweep report not written: %s", error)
