"""SIGTERM and SIGINT, as a scheduler or a person sends them to the real CLI: the run stops
at once, says `interrupted` (never `completed`), exits 143/130, and resumes to the same
result as a run that was never interrupted."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Callback

from tests.conftest import ROOT

TINY = [
    "debug=limit",
    "trainer.max_epochs=3",
    "model.width=8",
    "logger=none",
    "trainer.accelerator=cpu",
]


class StallAtEpoch(Callback):
    """Marks `marker` and sleeps in the first step of epoch `epoch`: a long step to stop."""

    def __init__(self, marker: str, epoch: int = 1, seconds: float = 600.0) -> None:
        self.marker, self.epoch, self.seconds = Path(marker), epoch, seconds

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == 0:
            self.marker.write_text("stalled")
            time.sleep(self.seconds)


class KillDuringSave(Callback):
    """SIGKILLs its own process while the checkpoint of epoch `epoch` is being saved."""

    def __init__(self, epoch: int = 1) -> None:
        self.epoch = epoch

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)


class TerminateThirdJob(Callback):
    """In a sweep, SIGTERMs the process in epoch 1 of the third job it sees, once."""

    def __init__(self) -> None:
        self.counter = Path(os.environ["TEST_JOB_COUNTER"])  # a path would nest job folders
        self.jobs_seen = int(self.counter.read_text()) + 1 if self.counter.exists() else 1
        self.counter.write_text(str(self.jobs_seen))

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        done = self.counter.with_suffix(".done")
        if self.jobs_seen == 3 and trainer.current_epoch == 1 and not done.exists():
            done.write_text("sent")
            os.kill(os.getpid(), signal.SIGTERM)


def start(run_dir: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "train.py"), *TINY, *overrides]
    return subprocess.Popen(
        [*command, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(path: Path, process: subprocess.Popen, limit: float = 1800) -> None:
    """Until `path` exists (a hang guard only: `limit` is never reached on a working run)."""
    deadline = time.monotonic() + limit
    while not path.exists():
        assert process.poll() is None, (process.communicate()[1] or "")[-3000:]
        assert time.monotonic() < deadline, "the run never reached the point to interrupt"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """metrics.json of the run every interrupted-then-resumed run must end equal to."""
    folder = tmp_path_factory.mktemp("uninterrupted") / "whole"
    whole = start(folder)
    assert whole.wait(timeout=1800) == 0, whole.communicate()[1][-3000:]
    return json.loads((folder / "metrics.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_stops_at_once_records_interrupted_and_resumes_exactly(
    tmp_path: Path, signum: int, status: int, uninterrupted: dict
) -> None:
    marker = tmp_path / "stalled"
    stall = [
        "+callbacks.stall._target_=tests.test_signals.StallAtEpoch",
        f"+callbacks.stall.marker={marker}",
    ]
    run_dir = tmp_path / "run"
    process = start(run_dir, *stall)
    wait_for(marker, process)  # asleep in a step that would last 10 minutes
    sent = time.monotonic()
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=1800)
    assert time.monotonic() - sent < 120, "the step was not abandoned"  # Lightning: 600 s
    assert process.returncode == status, stderr[-3000:]
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "interrupted" and record["epochs_completed"] == 1
    assert signal.Signals(signum).name in record["reason"]
    assert "ckpt_path=last" in stderr and "Traceback" not in stderr
    # The advice is the run's own command, continued: it said `<same overrides>` before.
    advice = ["python", "train.py", *TINY, *stall, "ckpt_path=last", f"hydra.run.dir={run_dir}"]
    assert shlex.split(record["resume"]) == advice

    resumed = start(run_dir, "ckpt_path=last")  # in place: same folder, no stall callback
    assert resumed.wait(timeout=1800) == 0, resumed.communicate()[1][-3000:]
    final = json.loads((run_dir / "metrics.json").read_text())
    assert final == uninterrupted
    assert final["status"] == "completed"


@pytest.mark.slow
def test_two_runs_started_together_get_two_folders(tmp_path: Path) -> None:
    """Observed: two default runs in the same second shared one folder (and one metrics.json)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, str(ROOT / "train.py"), *TINY, f"paths.log_dir={tmp_path}"]
    runs = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
    for run in runs:
        assert run.wait(timeout=1800) == 0, run.communicate()[1][-3000:]
    folders = sorted((tmp_path / "train" / "runs").iterdir())
    assert len(folders) == 2, folders
    for folder in folders:
        assert json.loads((folder / "metrics.json").read_text())["status"] == "completed"
        assert (folder / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_a_resume_while_the_run_still_goes_is_refused(tmp_path: Path) -> None:
    """Observed: `ckpt_path=last hydra.run.dir=<run>` while that run was still training was
    accepted: two processes wrote the folder's checkpoints and metrics.json."""
    marker, run_dir = tmp_path / "stalled", tmp_path / "run"
    stall = [
        "+callbacks.stall._target_=tests.test_signals.StallAtEpoch",
        f"+callbacks.stall.marker={marker}",
    ]
    process = start(run_dir, *stall)
    try:
        wait_for(marker, process)  # epoch 0 done (last.ckpt written), asleep in epoch 1
        kept = {p: p.read_bytes() for p in (run_dir / "checkpoints").iterdir()}
        record = (run_dir / "metrics.json").read_text()
        second = start(run_dir, "ckpt_path=last")
        _, stderr = second.communicate(timeout=1800)
        assert second.returncode == 2, stderr[-3000:]
        assert f"is in use by a posttrain run that is still going (process {process.pid}" in stderr
        assert (run_dir / "metrics.json").read_text() == record
        assert {p: p.read_bytes() for p in (run_dir / "checkpoints").iterdir()} == kept
        assert process.poll() is None  # the first run goes on
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=1800)
    assert process.returncode == 143


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["mid_epoch", "during_save"])
def test_kill_9_then_resume_matches_the_uninterrupted_run(
    tmp_path: Path, moment: str, uninterrupted: dict
) -> None:
    marker = tmp_path / "stalled"
    if moment == "mid_epoch":
        crash = [
            "+callbacks.stall._target_=tests.test_signals.StallAtEpoch",
            f"+callbacks.stall.marker={marker}",
        ]
    else:
        crash = ["+callbacks.crash._target_=tests.test_signals.KillDuringSave"]
    run_dir = tmp_path / "run"
    process = start(run_dir, *crash)
    if moment == "mid_epoch":
        wait_for(marker, process)
        process.send_signal(signal.SIGKILL)
    process.communicate(timeout=1800)
    assert process.returncode == -signal.SIGKILL
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.ckpt", "last.ckpt"]
    from posttrain.checkpoints import load_checkpoint

    assert load_checkpoint(checkpoints / "last.ckpt", key="ckpt_path")["epoch"] == 0

    resumed = start(run_dir, "ckpt_path=last")
    assert resumed.wait(timeout=1800) == 0, resumed.communicate()[1][-3000:]
    final = json.loads((run_dir / "metrics.json").read_text())
    assert final == uninterrupted


@pytest.mark.slow
def test_a_killed_sweep_is_reported_and_finished_by_running_it_again(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    command = [
        sys.executable, str(ROOT / "train.py"), "-m", *TINY, "seed=0,1,2,3",
        "+callbacks.stop._target_=tests.test_signals.TerminateThirdJob",
        f"hydra.sweep.dir={sweep}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TEST_JOB_COUNTER": str(tmp_path / "jobs")}
    first = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert first.returncode == 143, first.stderr[-3000:]
    report = (sweep / "report.md").read_text()
    assert "4 jobs: 2 completed, 1 interrupted, 1 missing" in report, report
    kept = {job: (job / "metrics.json").read_text() for job in sorted(sweep.glob("[01]_*"))}

    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "4 jobs: 4 completed" in (sweep / "report.md").read_text()
    jobs = sorted(p.name.split("_", 1)[0] for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0", "1", "2", "3"]  # original numbers, no new folders
    assert {job: (job / "metrics.json").read_text() for job in kept} == kept  # not redone
    assert "resuming it from" in again.stdout  # the interrupted job continued from last.ckpt


class TerminateDuringTest(Callback):
    """SIGTERMs its own process when the test of the best checkpoint starts."""

    def on_test_start(self, trainer, pl_module) -> None:
        os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.slow
def test_a_signal_after_training_stops_the_sweep_and_is_recorded(tmp_path: Path) -> None:
    """Outside `fit` Lightning's own SIGTERM handler only sets a flag: a sweep signalled during
    a job's test ran on, and every job read `completed`."""
    sweep = tmp_path / "sweep"
    command = [
        sys.executable, str(ROOT / "train.py"), "-m", *TINY, "seed=0,1",
        "+callbacks.stop._target_=tests.test_signals.TerminateDuringTest",
        f"hydra.sweep.dir={sweep}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800
    )
    assert result.returncode == 143, result.stderr[-3000:]
    (job,) = [path for path in sweep.iterdir() if path.is_dir()]  # the second never started
    record = json.loads((job / "metrics.json").read_text())
    assert record["status"] == "interrupted" and record["epochs_completed"] == 3, record


@pytest.mark.parametrize("has_last", [False, True])
def test_the_resume_advice_matches_what_the_run_left(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    has_last: bool,
) -> None:
    """Stopped before its first checkpoint, a run must start again (`ckpt_path=last` would be
    refused: there is no last.ckpt); with one, it continues exactly from it."""
    from types import SimpleNamespace

    from posttrain.runs import record_interruption

    monkeypatch.setattr("posttrain.runs.run_overrides", lambda: None)  # not a Hydra run

    if has_last:
        (tmp_path / "checkpoints").mkdir()
        (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    stop = SimpleNamespace(signal_name="SIGTERM", epochs_completed=int(has_last), global_step=4)
    record_interruption(tmp_path, stop, "train")
    record = json.loads((tmp_path / "metrics.json").read_text())
    said = capsys.readouterr().err
    assert record["status"] == "interrupted" and record["reason"] == "stopped by SIGTERM"
    if has_last:
        assert record["resume"].endswith(f"ckpt_path=last hydra.run.dir={tmp_path}")
        assert "holds the last completed epoch" in said
    else:
        assert record["resume"] == "python train.py <same overrides>"
        assert "before the first checkpoint was written; start it again" in said


def hydra_receives(shell_words: str) -> dict[str, str]:
    """What Hydra parses from `shell_words` pasted into a shell (the shell strips quotes)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = OverridesParser.create().parse_overrides(shlex.split(shell_words))
    return {override.key_or_group: override.value() for override in overrides}


@pytest.mark.parametrize(
    "folder", ["runs/2026-11-26_12-00-00_ab12cd", "0_seed=1,lr=0.1", "it's a b"]
)
def test_the_resume_advice_can_be_pasted_for_any_job_folder(
    tmp_path: Path, folder: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Observed: a sweep job's folder (`0_seed=1,lr=0.1`) printed unquoted in the advice made
    Hydra fail (`mismatched input '='`); the advice said `<same overrides>`, which a shell reads
    as a redirect; and a sweep job continues by running its sweep again in the same folder,
    which the advice must name. Pasted, the advice gives Hydra the run's own overrides."""
    from types import SimpleNamespace

    from posttrain.runs import record_interruption

    run = tmp_path / folder
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    stop = SimpleNamespace(signal_name="SIGTERM", epochs_completed=1, global_step=4)
    typed = ["seed=1", "model.pretrained='/w/0_seed=1,lr=0.1/best.ckpt'", "ckpt_path=old"]
    monkeypatch.setattr("posttrain.runs.run_overrides", lambda: [*typed, "hydra.run.dir=/x"])
    record_interruption(run, stop, "train")
    single = json.loads((run / "metrics.json").read_text())["resume"]
    assert single.startswith("python train.py ")
    assert hydra_receives(single.removeprefix("python train.py ")) == {
        "seed": 1,
        "model.pretrained": "/w/0_seed=1,lr=0.1/best.ckpt",
        "ckpt_path": "last",
        "hydra.run.dir": str(run),
    }
    monkeypatch.setattr("posttrain.runs.sweep_folder", lambda: run.parent)  # a sweep job
    monkeypatch.setattr("posttrain.runs.sweep_overrides", lambda sweep: ["seed=1"])
    record_interruption(run, stop, "train")
    sweep = json.loads((run / "metrics.json").read_text())["resume"]
    assert sweep.startswith("python train.py -m ")
    assert hydra_receives(sweep.removeprefix("python train.py -m ")) == {
        "seed": 1,
        "hydra.sweep.dir": str(run.parent),
    }


@pytest.mark.slow
def test_a_sweep_whose_terminal_pipe_closed_still_stops_on_a_signal(tmp_path: Path) -> None:
    """Observed: `train.py -m ... 2>&1 | tee log`, then Ctrl-C (tee dies with it), or a
    driver killed beside its sweep: printing the interruption message raised BrokenPipeError,
    which Hydra counted as a failed job, and the sweep went on to its next job unseen."""
    marker, sweep = tmp_path / "stalled", tmp_path / "sweep"
    command = [
        sys.executable, str(ROOT / "train.py"), "-m", *TINY, "seed=0,1",
        "+callbacks.stall._target_=tests.test_signals.StallAtEpoch",
        f"+callbacks.stall.marker={marker}", f"hydra.sweep.dir={sweep}",
        "hydra.sweep.subdir=${hydra.job.num}",  # the marker's path would nest job folders
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    wait_for(marker, process)
    process.stdout.close()  # the reader is gone: every later write to the pipes fails
    process.stderr.close()
    process.send_signal(signal.SIGINT)
    while process.poll() is None:  # a second job starting is the defect: stop there
        if (sweep / "1").exists():
            process.kill()
        time.sleep(0.2)
    assert not (sweep / "1").exists(), "the sweep went on to its next job"
    assert process.returncode == 130
    assert json.loads((sweep / "0" / "metrics.json").read_text())["status"] == "interrupted"
    assert "1 interrupted" in (sweep / "report.md").read_text()


class StallInItsFolder(Callback):
    """Where `TEST_STALL` is set: marks `<run folder>/stalled` and sleeps in the first step
    of epoch 1 (a re-run without it has the same config, and runs through)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if os.environ.get("TEST_STALL") and trainer.current_epoch == 1 and batch_idx == 0:
            (Path(trainer.default_root_dir) / "stalled").write_text("stalled")
            time.sleep(600)


def lock_is_free(lock: Path) -> bool:
    import fcntl

    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


@pytest.mark.slow
def test_a_signal_to_a_joblib_sweep_stops_its_jobs_and_the_advice_finishes_it(
    tmp_path: Path,
) -> None:
    """Observed: SIGTERM to the process of a `hydra/launcher=joblib` sweep alone (`kill`,
    `docker stop`, a driver's `terminate()`) ended it at once with 143 while its workers
    trained on as orphans: the jobs said `running`, later `completed`, and no report was
    written. The jobs at work are stopped and recorded, the rest never start."""
    sweep = tmp_path / "sweep"
    command = [
        sys.executable, str(ROOT / "train.py"), "-m", *TINY, "seed=0,1,2",
        "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
        "+callbacks.stall._target_=tests.test_signals.StallInItsFolder",
        f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra.job.num}",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    log = tmp_path / "stderr"  # a file: orphaned workers would hold a pipe open
    with log.open("w") as stderr:
        process = subprocess.Popen(
            command, cwd=ROOT, env={**env, "TEST_STALL": "1"}, stdout=subprocess.DEVNULL,
            stderr=stderr,
        )  # fmt: skip
        for job in ("0", "1"):  # both workers asleep in epoch 1; job 2 waits for a worker
            wait_for(sweep / job / "stalled", process)
        process.send_signal(signal.SIGTERM)  # to the sweep's own process only
        process.wait(timeout=1800)
    assert process.returncode == 143, log.read_text()[-3000:]
    for job in ("0", "1"):
        record = json.loads((sweep / job / "metrics.json").read_text())
        assert record["status"] == "interrupted" and record["epochs_completed"] == 1, record
    # Job 2 never started, or started in a freed worker and was stopped with the others.
    third = sweep / "2" / "metrics.json"
    assert not third.exists() or json.loads(third.read_text())["status"] == "interrupted"
    for lock in sweep.glob("*/.posttrain.lock"):
        assert lock_is_free(lock), "a worker is still at work"
    counts = (sweep / "report.md").read_text().split("\n")[2]
    assert counts in ("3 jobs: 2 interrupted, 1 missing.", "3 jobs: 3 interrupted."), counts

    advice = shlex.split(json.loads((sweep / "0" / "metrics.json").read_text())["resume"])
    assert advice[:3] == ["python", "train.py", "-m"]
    again = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *advice[2:]],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert "3 jobs: 3 completed" in (sweep / "report.md").read_text()
    assert again.stdout.count("resuming it from") == 2  # jobs 0 and 1 went on from last.ckpt


def test_the_sweep_advice_keeps_the_sweeps_folders_and_values_as_typed(tmp_path: Path) -> None:
    """Observed: the advice for a sweep with `hydra.sweep.subdir=${hydra.job.num}` left it out,
    so the advised command put every job in a new folder and trained it from the start; and
    a `${...}` value was resolved to one job's value (another job's config on the re-run)."""
    from omegaconf import OmegaConf

    from posttrain.runs import sweep_overrides

    typed = {
        "hydra": ["hydra/launcher=joblib", f"hydra.sweep.dir={tmp_path}",
                  "hydra.sweep.subdir=${hydra.job.num}", "hydra.mode=MULTIRUN"],
        "task": ["seed=0,1", "+callbacks.x.marker=${paths.output_dir}/m"],
    }  # fmt: skip
    OmegaConf.save({"paths": {"output_dir": "/job/0"}, "hydra": {"overrides": typed}},
                   tmp_path / "multirun.yaml")  # fmt: skip
    assert sweep_overrides(tmp_path) == [*typed["hydra"], *typed["task"]]
