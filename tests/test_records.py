"""A run folder's record tells the truth about the run in it: `running` from the first moment
(a run killed without a chance to record never reads as the folder's earlier result), and a
re-run sweep keeps a finished job only when it is the same job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from omegaconf import DictConfig, OmegaConf

from posttrain.errors import SweepJobChanged
from posttrain.sweep_jobs import completed_sweep_job, unfinished_sweep_job
from posttrain.train import train
from tests.conftest import compose_config, read_metrics, run_cli
from tests.fixtures import write_image_folder
from tests.test_resume import Interrupted

TINY = ["debug=limit", "model.width=4", "logger=none", "trainer.accelerator=cpu"]


def test_a_run_killed_after_continuing_a_completed_run_reads_running(tmp_path: Path) -> None:
    """Observed: `ckpt_path=last hydra.run.dir=<completed run> trainer.max_epochs=...`, then
    kill -9: metrics.json still said `completed` (the earlier run's), while last.ckpt and the
    folder's config had moved on."""
    run_dir = tmp_path / "run"
    train(compose_config(run_dir, [*TINY, "trainer.max_epochs=1"]))
    assert read_metrics(run_dir)["status"] == "completed"
    kill = [
        "+callbacks.kill._target_=tests.test_resume.InterruptAtEpoch",
        "+callbacks.kill.epoch=1",  # the first epoch of the continuation
    ]
    with pytest.raises(Interrupted):  # a kill: nothing after this point runs
        train(compose_config(run_dir, [*TINY, "trainer.max_epochs=3", "ckpt_path=last", *kill]))
    record = read_metrics(run_dir)
    assert record["status"] == "running", record
    assert "started" in record and "ckpt_path=last" in record["resume"]
    assert not any(key.startswith(("test/", "val/")) for key in record)  # no stale numbers


def test_a_run_refused_before_it_starts_keeps_the_folders_record(tmp_path: Path) -> None:
    """Observed: a resume in place refused for a changed `optimizer.lr`, and an `eval.py`
    pointed at the run's folder, replaced the completed run's metrics.json (its test numbers)
    with `failed`, though neither had changed anything in the folder."""
    from posttrain.evaluate import evaluate
    from posttrain.runs import guarded

    run_dir = tmp_path / "run"
    train(compose_config(run_dir, [*TINY, "trainer.max_epochs=1"]))
    completed = (run_dir / "metrics.json").read_text()
    resume = [*TINY, "trainer.max_epochs=2", "ckpt_path=last", "optimizer.lr=0.9"]
    with pytest.raises(SystemExit):
        guarded(train, compose_config(run_dir, resume))
    best = run_dir / "checkpoints" / "best.ckpt"
    evaluation = compose_config(run_dir, ["logger=none", f"ckpt_path={best}"], "eval")
    with pytest.raises(SystemExit):
        guarded(evaluate, evaluation)
    assert (run_dir / "metrics.json").read_text() == completed


def test_a_new_run_in_a_folder_holding_a_run_is_refused(tmp_path: Path) -> None:
    """Observed: a second `train.py hydra.run.dir=<run>` replaced the first run's best.ckpt,
    last.ckpt and metrics.json without a word. It is refused, and the first run stays as it
    was; a folder holding only a config mistake's failure may be used again."""
    from posttrain.errors import PosttrainError
    from posttrain.evaluate import evaluate

    run_dir = tmp_path / "run"
    train(compose_config(run_dir, [*TINY, "trainer.max_epochs=1"]))
    kept = {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}
    with pytest.raises(PosttrainError, match="holds a completed run") as refused:
        train(compose_config(run_dir, [*TINY, "trainer.max_epochs=1", "seed=5"]))
    assert "ckpt_path=last" in str(refused.value)
    assert {p: p.read_bytes() for p in kept} == kept

    evaluated = tmp_path / "eval"  # an evaluation's folder is kept the same way
    best = f"ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}"
    evaluate(compose_config(evaluated, ["logger=none", best], "eval"))
    with pytest.raises(PosttrainError, match="holds a completed run") as refused:
        evaluate(compose_config(evaluated, ["logger=none", best], "eval"))
    assert "ckpt_path=last" not in str(refused.value)

    mistaken = tmp_path / "mistaken"
    mistaken.mkdir()
    (mistaken / "metrics.json").write_text(json.dumps({"status": "failed", "error": "typo"}))
    train(compose_config(mistaken, [*TINY, "trainer.max_epochs=1"]))
    assert read_metrics(mistaken)["status"] == "completed"


def test_a_resume_from_another_runs_checkpoint_keeps_the_folders_run(tmp_path: Path) -> None:
    """Observed: `ckpt_path=<run A>/checkpoints/last.ckpt hydra.run.dir=<run B>` replaced run
    B's best.ckpt, last.ckpt and metrics.json without a word. Only the folder's own run may
    be continued there (`ckpt_path=last`, or its checkpoint named by path)."""
    from posttrain.errors import PosttrainError

    first, second = tmp_path / "a", tmp_path / "b"
    for folder in (first, second):
        train(compose_config(folder, [*TINY, "trainer.max_epochs=1"]))
    kept = {p: p.read_bytes() for p in sorted(second.rglob("*")) if p.is_file()}
    other = f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}"
    with pytest.raises(PosttrainError, match="holds a completed run") as refused:
        train(compose_config(second, [*TINY, "trainer.max_epochs=2", other]))
    assert f"continuing {first / 'checkpoints' / 'last.ckpt'} there" in str(refused.value)
    assert {p: p.read_bytes() for p in kept} == kept
    own = f"ckpt_path={second / 'checkpoints' / '..' / 'checkpoints' / 'last.ckpt'}"
    train(compose_config(second, [*TINY, "trainer.max_epochs=2", own]))
    assert read_metrics(second)["epoch"] == 2


@pytest.mark.parametrize(
    ("record", "checkpoint", "refused"),
    [
        ({"status": "interrupted"}, False, None),  # stopped before its first checkpoint
        ({"status": "interrupted"}, True, "ckpt_path=last"),
        ({"status": "running", "pid": 0x3FFFFFFF}, False, None),  # kill -9'd: process gone
        ({"status": "running", "pid": "own"}, False, "may be writing it"),  # alive: this one
        ({"status": "running", "pid": "own"}, True, "may be writing it"),
        ({"status": "running"}, False, "a process may be writing it"),  # an older record
        ({"status": "diverged"}, False, "holds a diverged run"),
        ({"status": "failed"}, True, "holds a run's checkpoints"),
    ],
)
def test_a_folder_is_reused_only_when_nothing_in_it_would_be_lost(
    tmp_path: Path, record: dict, checkpoint: bool, refused: str | None
) -> None:
    """What a new run may start over: nothing trained, or a dead process's first epoch; a
    live run, results or checkpoints are refused (continue with ckpt_path=last where any)."""
    import os
    import socket

    from posttrain.errors import PosttrainError
    from posttrain.runs import check_folder_is_free

    if record.get("pid") == "own":
        record = {**record, "pid": os.getpid()}
    if "pid" in record:
        record = {**record, "host": socket.gethostname()}
    (tmp_path / "metrics.json").write_text(json.dumps(record))
    if checkpoint:
        (tmp_path / "checkpoints").mkdir()
        (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    if refused is None:
        check_folder_is_free(tmp_path, "a new run")
        return
    with pytest.raises(PosttrainError) as error:
        check_folder_is_free(tmp_path, "a new run")
    message = str(error.value)
    assert refused in message
    assert ("ckpt_path=last" in message) == (checkpoint and record["status"] != "running")


def hold_lock_as_another_process(folder: Path) -> int:
    """What a live run holds on its folder: the lock, taken through its own open file (the
    kernel refuses a second holder even within one process)."""
    import fcntl
    import os

    from posttrain.runs import LOCK_NAME

    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, b"process 4242 on elsewhere\n")
    return fd


@pytest.mark.parametrize("earlier", ["none yet", "running", "interrupted"])
def test_a_folder_a_live_run_works_in_is_refused_and_left_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], earlier: str
) -> None:
    """Observed: two runs started at once with one `hydra.run.dir` both passed the folder
    check (the other had not recorded `running` yet: it was still building data and model)
    and trained into the same files; `ckpt_path=last` while the run still went was accepted,
    and both processes wrote last.ckpt, best.ckpt and metrics.json. The live run holds a lock
    on its folder; a second process is refused and writes nothing there."""
    import os

    from posttrain.runs import guarded

    run_dir = tmp_path / "run"
    overrides = [*TINY, "trainer.max_epochs=1"]
    if earlier != "none yet":  # a live run in its first epoch, or continuing from one
        train(compose_config(run_dir, overrides))
        (run_dir / "metrics.json").write_text(json.dumps({"status": earlier}))
        overrides = [*overrides, "ckpt_path=last", "trainer.max_epochs=2"]
    kept = {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}
    fd = hold_lock_as_another_process(run_dir)
    try:
        with pytest.raises(SystemExit) as stopped:
            guarded(train, compose_config(run_dir, overrides))
    finally:
        os.close(fd)
    assert stopped.value.code == 2
    said = capsys.readouterr().err
    assert "is in use by a posttrain run that is still going (process 4242 on elsewhere" in said
    assert {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()} == {
        **kept,
        run_dir / ".posttrain.lock": b"process 4242 on elsewhere\n",
    }
    guarded(train, compose_config(run_dir, overrides))  # that run ended: the folder is free
    assert read_metrics(run_dir)["status"] == "completed"


def test_a_file_system_without_locks_still_runs_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Some NFS and Lustre mounts refuse flock (ENOLCK, EOPNOTSUPP): every run there was
    refused as 'in use by a posttrain run that is still going'."""
    import errno
    import fcntl

    from posttrain.runs import guarded

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    guarded(train, compose_config(tmp_path / "run", [*TINY, "trainer.max_epochs=1"]))
    assert read_metrics(tmp_path / "run")["status"] == "completed"
    assert "cannot lock" in caplog.text and "No locks available" in caplog.text


@pytest.mark.slow
def test_a_refused_command_leaves_the_runs_hydra_config_as_it_was(tmp_path: Path) -> None:
    """Observed: `train.py model.width=8 hydra.run.dir=<a completed run of width 4>` was
    refused, but Hydra had already written its config into the run's `.hydra/`, which then
    said the run trained width 8."""
    run = [*TINY, "trainer.max_epochs=1", f"hydra.run.dir={tmp_path}"]
    assert run_cli("train.py", *run).returncode == 0
    hydra = {p.name: p.read_bytes() for p in (tmp_path / ".hydra").iterdir()}
    refused = run_cli("train.py", *run, "model.width=16")
    assert refused.returncode == 2 and "holds a completed run" in refused.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / ".hydra").iterdir()} == hydra
    assert read_metrics(tmp_path)["status"] == "completed"


def sweep_job(sweep: Path, *overrides: str) -> DictConfig:
    """The config of job 0 of a sweep into `sweep`, as the job itself sees it."""
    multirun = ["hydra.mode=MULTIRUN", f"hydra.sweep.dir={sweep}"]
    return compose_config(sweep / "0_seed=0", [*multirun, *overrides])


@pytest.mark.parametrize("status", ["running", "interrupted"])
def test_a_killed_sweep_job_is_continued_not_kept(tmp_path: Path, status: str) -> None:
    cfg = sweep_job(tmp_path, *TINY)
    job = Path(cfg.paths.output_dir)
    (job / "checkpoints").mkdir(parents=True)
    (job / "checkpoints" / "last.ckpt").write_bytes(b"")
    (job / "metrics.json").write_text(json.dumps({"status": status}))
    assert completed_sweep_job(cfg) is None
    assert unfinished_sweep_job(cfg) == "last"


def write_hydra_files(job: Path, cfg: DictConfig, overrides: list[str]) -> None:
    """What Hydra writes into a job folder before the job's code runs."""
    (job / ".hydra").mkdir(parents=True, exist_ok=True)
    (job / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))


def test_a_completed_sweep_job_with_another_data_root_is_refused(tmp_path: Path) -> None:
    """Observed: a sweep re-run with `data.root=B` into the folder of one run with
    `data.root=A` kept the A job ("already completed, kept") while its config now said B."""
    roots = {name: write_image_folder(tmp_path / name, per_class=10) for name in "AB"}
    sweep = tmp_path / "sweep"
    common = ["data=imagefolder", "seed=0", *TINY, "trainer.max_epochs=1"]
    first = sweep_job(sweep, *common, f"data.root={roots['A']}")
    job = Path(first.paths.output_dir)
    write_hydra_files(job, first, [*common, f"data.root={roots['A']}"])
    (sweep / "multirun.yaml").write_text(f"data_root: {roots['A']}\n")
    train(first)
    kept = {path: path.read_text() for path in [job / "metrics.json", *job.glob(".hydra/*")]}
    assert read_metrics(job)["status"] == "completed"

    again = sweep_job(sweep, *common, f"data.root={roots['B']}")
    write_hydra_files(job, again, [*common, f"data.root={roots['B']}"])  # Hydra rewrites them
    (sweep / "multirun.yaml").write_text(f"data_root: {roots['B']}\n")
    with pytest.raises(SweepJobChanged) as refused:
        train(again)
    message = str(refused.value)
    assert "data.root" in message and str(roots["A"]) in message and str(roots["B"]) in message
    assert "hydra.sweep.dir" in message
    assert {path: path.read_text() for path in kept} == kept  # the A job's files, as they were
    assert str(roots["A"]) in (sweep / "multirun.yaml").read_text()


def test_a_completed_sweep_job_trained_before_its_images_changed_is_refused(
    tmp_path: Path,
) -> None:
    """Observed: a sweep re-run after one image was added to its folder kept the completed
    job ("already completed, kept"), whose validation and test splits were drawn from the
    images then, beside new jobs scored on the splits drawn now (a resume of an unfinished
    job refused the same change). Restored files keep it again."""
    import shutil

    data = write_image_folder(tmp_path / "images", classes=2, per_class=15, size=8)
    sweep = tmp_path / "sweep"
    common = ["data=imagefolder", f"data.root={data}", "data.options.cache_dir=null", "seed=0",
              *TINY, "trainer.max_epochs=1"]  # fmt: skip
    first = sweep_job(sweep, *common)
    job = Path(first.paths.output_dir)
    write_hydra_files(job, first, common)
    (sweep / "multirun.yaml").write_text("first: true\n")
    train(first)
    kept = {path: path.read_text() for path in [job / "metrics.json", *job.glob(".hydra/*")]}
    kept[sweep / "multirun.yaml"] = (sweep / "multirun.yaml").read_text()
    shutil.copy(data / "class_0" / "0.png", data / "class_0" / "added.png")

    again = sweep_job(sweep, *common)
    (sweep / "multirun.yaml").write_text("second: true\n")  # Hydra rewrites it
    with pytest.raises(SweepJobChanged) as refused:
        train(again)
    message = str(refused.value)
    assert "trained before the data changed" in message and "31 images now, 30 then" in message
    assert "hydra.sweep.dir" in message and "\n" not in message
    assert {path: path.read_text() for path in kept} == kept  # the job's files, as they were
    (data / "class_0" / "added.png").unlink()
    assert completed_sweep_job(sweep_job(sweep, *common)) is not None


def test_a_completed_sweep_job_with_the_same_config_is_kept(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    common = ["seed=0", *TINY, "trainer.max_epochs=1"]
    first = sweep_job(sweep, *common)
    train(first)
    recorded = read_metrics(Path(first.paths.output_dir))
    kept = completed_sweep_job(sweep_job(sweep, *common, "paths.cache_dir=/elsewhere"))
    assert kept == {k: v for k, v in recorded.items() if k not in ("status", "tested")}


@pytest.mark.slow
def test_a_sweep_rerun_with_another_data_root_leaves_the_completed_job_true(
    tmp_path: Path,
) -> None:
    """Through Hydra itself: it rewrites the job's `.hydra/` files and the sweep's
    `multirun.yaml` before any posttrain code runs; the refusal puts them back."""
    roots = {name: write_image_folder(tmp_path / name, per_class=10) for name in "AB"}
    sweep = tmp_path / "sweep"
    command = ["-m", "data=imagefolder", "seed=0", *TINY, "trainer.max_epochs=1"]
    first = run_cli("train.py", *command, f"hydra.sweep.dir={sweep}", f"data.root={roots['A']}")
    assert first.returncode == 0, first.stderr[-3000:]
    (job,) = [path for path in sweep.iterdir() if (path / ".hydra").is_dir()]
    kept = {p: p.read_text() for p in [job / "metrics.json", *job.glob(".hydra/*.yaml")]}
    kept[sweep / "multirun.yaml"] = (sweep / "multirun.yaml").read_text()

    again = run_cli("train.py", *command, f"hydra.sweep.dir={sweep}", f"data.root={roots['B']}")
    assert again.returncode == 2, again.stderr[-3000:]
    assert "data.root" in again.stderr and "hydra.sweep.dir" in again.stderr
    assert "Traceback" not in again.stderr
    assert {path: path.read_text() for path in kept} == kept


def test_a_run_without_a_test_does_not_say_best_ckpt_was_tested(tmp_path: Path) -> None:
    """Observed: `trainer.limit_test_batches=0` runs no test batch and records no `test/*`,
    yet metrics.json and the summary said `tested: best.ckpt: the epoch with the best val/acc`."""
    run_dir = tmp_path / "run"
    train(compose_config(run_dir, [*TINY, "trainer.max_epochs=1", "trainer.limit_test_batches=0"]))
    record = read_metrics(run_dir)
    assert record["status"] == "completed" and not any(k.startswith("test/") for k in record)
    assert record["tested"].startswith("nothing: no test batch ran"), record["tested"]
    assert "limit_test_batches=0" in record["tested"] and "best.ckpt" not in record["tested"]


@pytest.mark.parametrize(
    "no_validation", ["trainer.limit_val_batches=0", "trainer.check_val_every_n_epoch=2"]
)
def test_a_run_that_never_validated_says_why_no_best_ckpt_was_kept(
    tmp_path: Path, no_validation: str
) -> None:
    """Observed: with `trainer.limit_val_batches=0` the checkpoint callback (on, ranking by
    val/acc) never saved, and `tested` said "callbacks.model_checkpoint is off"."""
    run_dir = tmp_path / "run"
    train(compose_config(run_dir, [*TINY, "trainer.max_epochs=1", no_validation]))
    record = read_metrics(run_dir)
    assert record["status"] == "completed" and "test/acc" in record
    assert not (run_dir / "checkpoints" / "best.ckpt").exists()
    tested = record["tested"]
    assert tested.startswith("the final weights, after epoch 1"), tested
    assert "is off" not in tested and "no validation ran" in tested, tested


def test_metrics_json_is_strict_json_with_non_finite_numbers_named(tmp_path: Path) -> None:
    """Python wrote a NaN as a bare `NaN` (`test/acc_ci95` of one episode), and jq and
    JSON.parse refused the whole record."""
    from posttrain.runs import write_json

    record = tmp_path / "metrics.json"
    nan, inf = float("nan"), float("inf")
    write_json(record, {"a": nan, "b": [inf, 1.5], "c": {"d": -inf}, "e": 2})

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    read = json.loads(record.read_text(), parse_constant=refuse)
    assert read == {"a": "NaN", "b": ["Infinity", 1.5], "c": {"d": "-Infinity"}, "e": 2}
