"""Multirun sweeps over regularization strengths, the sweep report, the optuna sweeper."""

from __future__ import annotations

import csv
import itertools
import json
import math
import re
import statistics
from pathlib import Path

import pytest
import yaml
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import Callback

from posttrain.report import SweepPlot, collect, sweep_series, swept_keys, write_report
from tests.conftest import PROBE, read_metrics, read_probes, run_cli


def fake_job(sweep: Path, name: str, overrides: list[str], metrics: dict | None) -> None:
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps(metrics))


def test_report_tables_and_plot(tmp_path: Path) -> None:
    for index, weight in enumerate(["1e-5", "1e-4", "1e-3"]):
        metrics = {"status": "completed", "test/acc": 0.9 - index / 10, "val/acc_gap": 0.01 * index}
        fake_job(tmp_path, f"{index}_w={weight}", ["reg=l2", f"reg.l2.weight={weight}"], metrics)
    fake_job(
        tmp_path,
        "3_w=1",
        ["reg=l2", "reg.l2.weight=1"],
        {"status": "failed", "error": "Traceback...\nPosttrainError: diverged"},
    )
    fake_job(tmp_path, "4_w=2", ["reg=l2", "reg.l2.weight=2"], None)
    rows = write_report(tmp_path)
    assert [row.status for row in rows] == ["completed"] * 3 + ["failed", "missing"]
    with (tmp_path / "report.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [r["reg.l2.weight"] for r in table] == ["1e-5", "1e-4", "1e-3", "1", "2"]
    assert table[0]["test/acc"] == "0.9000" and table[3]["error"] == "PosttrainError: diverged"
    report = (tmp_path / "report.md").read_text()
    assert "5 jobs: 3 completed, 1 failed, 1 missing" in report
    assert (tmp_path / "report.png").stat().st_size > 1000


def test_a_pipe_in_a_swept_value_keeps_the_numbers_under_their_headers(tmp_path: Path) -> None:
    """A `|` in a value started a new markdown column, shifting the numbers after it."""
    for index, tag in enumerate(["a|b", "c"]):
        metrics = {"status": "completed", "test/acc": 0.5 + index / 10}
        fake_job(tmp_path, f"{index}_tag", ["reg=l2", f"+data.options.tag={tag}"], metrics)
    write_report(tmp_path)
    table = [line for line in (tmp_path / "report.md").read_text().splitlines() if "a\\|b" in line]
    cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", table[0])[1:-1]]
    header = next(line for line in (tmp_path / "report.md").read_text().splitlines()
                  if line.startswith("| "))  # fmt: skip
    names = [cell.strip() for cell in header.split("|")[1:-1]]
    assert len(cells) == len(names) and cells[names.index("test/acc")] == "0.5000"


def test_an_override_holding_an_interpolation_makes_no_phantom_job(tmp_path: Path) -> None:
    """Observed: `python train.py -m 'task_name=${data.dataset}_x' seed=0,1` ran its 2 jobs,
    and the report said "4 jobs: 2 completed, 2 missing": the sweep's overrides were read
    from multirun.yaml resolved (`digits_x`), while Hydra hands the jobs the override as
    typed (escaped in their overrides.yaml), so no job matched them. The files as Hydra wrote
    them:"""
    multirun = {
        "hydra": {
            "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"},
            "overrides": {"task": ["task_name=${data.dataset}_x", "seed=0,1"]},
        },
        "data": {"dataset": "digits"},
        "task_name": "${data.dataset}_x",
    }
    (tmp_path / "multirun.yaml").write_text(yaml.safe_dump(multirun))
    for seed in (0, 1):
        overrides = ["task_name=$\\{data.dataset\\}_x", f"seed={seed}"]
        fake_job(tmp_path, f"{seed}_seed={seed}", overrides, {"status": "completed"})
    rows = collect(tmp_path)
    assert [row.folder for row in rows] == ["0_seed=0", "1_seed=1"]
    assert [row.status for row in rows] == ["completed", "completed"]


def test_report_shows_why_each_job_did_not_complete(tmp_path: Path) -> None:
    """Observed: an interrupted job was listed under "Failed jobs" as "no metrics.json",
    though its metrics.json said `interrupted` and `stopped by SIGTERM`."""
    interrupted = {"status": "interrupted", "reason": "stopped by SIGTERM", "global_step": 8}
    running = {"status": "running", "reason": "started 2025-01-01T10:00:00+00:00 by process 7"}
    fake_job(tmp_path, "0_seed=0", ["seed=0"], {"status": "completed", "test/acc": 0.5})
    fake_job(tmp_path, "1_seed=1", ["seed=1"], interrupted)
    fake_job(tmp_path, "2_seed=2", ["seed=2"], running)
    fake_job(tmp_path, "3_seed=3", ["seed=3"], None)
    write_report(tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "4 jobs: 1 completed, 1 interrupted, 1 missing, 1 running" in report
    assert "- 1_seed=1: interrupted: stopped by SIGTERM" in report
    assert "- 2_seed=2: running: started 2025-01-01T10:00:00+00:00 by process 7" in report
    assert "- 3_seed=3: missing: no metrics.json" in report
    assert "0_seed=0:" not in report and "Failed jobs" not in report
    with (tmp_path / "report.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [row["error"] for row in table] == [
        "",
        "stopped by SIGTERM",
        running["reason"],
        "no metrics.json",
    ]


def test_report_lists_a_job_whose_metrics_json_is_torn_and_reports_the_rest(
    tmp_path: Path,
) -> None:
    """Observed: one torn or hand-edited metrics.json stopped `python -m posttrain.report`
    with a JSONDecodeError traceback, and at a sweep's end left the earlier report.md
    standing (the callback only warned)."""
    fake_job(tmp_path, "0_seed=0", ["seed=0"], {"status": "completed", "test/acc": 0.5})
    fake_job(tmp_path, "1_seed=1", ["seed=1"], None)
    (tmp_path / "1_seed=1" / "metrics.json").write_text('{"status": "compl')
    fake_job(tmp_path, "2_seed=2", ["seed=2"], None)
    (tmp_path / "2_seed=2" / "metrics.json").write_text("[0.5]")
    (tmp_path / "soup_greedy").mkdir()
    (tmp_path / "soup_greedy" / "metrics.json").write_bytes(b"\xff\xfe")
    rows = write_report(tmp_path)
    assert [row.status for row in rows] == ["completed", "unreadable", "unreadable"]
    report = (tmp_path / "report.md").read_text()
    assert "3 jobs: 1 completed, 2 unreadable" in report
    assert "- 1_seed=1: unreadable: metrics.json cannot be read: Unterminated string" in report
    assert "- 2_seed=2: unreadable: metrics.json holds no record" in report
    with (tmp_path / "report.csv").open() as handle:
        table = {row["job"]: row for row in csv.DictReader(handle)}
    assert table["0_seed=0"]["test/acc"] == "0.5000"
    assert table["soup_greedy"]["status"] == "unreadable"


def test_report_command_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from posttrain.report import main

    fake_job(tmp_path, "0_p=0.1", ["reg.dropout.p=0.1"], {"status": "completed", "test/acc": 0.5})
    main([str(tmp_path)])
    assert "1 jobs" in capsys.readouterr().out
    assert (tmp_path / "report.md").is_file()


def test_report_refuses_a_folder_without_jobs(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no Hydra job folders"):
        write_report(tmp_path)


def launched(job: Path, mode: str, sweep_dir: str, cwd: Path) -> None:
    """The part of `.hydra/hydra.yaml` that says how Hydra launched the job."""
    hydra = {"mode": mode, "sweep": {"dir": sweep_dir}, "runtime": {"cwd": str(cwd)}}
    (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": hydra}))


def test_report_refuses_a_run_folder_and_a_folder_of_several_sweeps(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Observed: `python -m posttrain.report <run>` wrote a "1 jobs" sweep report into a
    single run's folder, and over `outputs/train/multiruns` it pooled every sweep's jobs into
    one table and averaged seeds of different sweeps into one plotted point."""
    from posttrain.report import main

    done = {"status": "completed", "test/acc": 0.5}
    run = tmp_path / "runs" / "r"
    fake_job(run.parent, run.name, ["seed=0"], done)
    launched(run, "RUN", "multiruns/unused", tmp_path)
    with pytest.raises(SystemExit) as stopped:
        main([str(run)])
    assert stopped.value.code == 2 and "single run(s)" in capsys.readouterr().err
    assert not (run / "report.md").exists()

    multiruns = tmp_path / "multiruns"
    for sweep in ("a", "b"):
        for seed in (0, 1):
            fake_job(multiruns / sweep, f"{seed}_seed={seed}", [f"seed={seed}"], done)
            launched(multiruns / sweep / f"{seed}_seed={seed}", "MULTIRUN", f"multiruns/{sweep}",
                     tmp_path)  # fmt: skip
    with pytest.raises(SystemExit) as stopped:
        main([str(multiruns)])
    assert stopped.value.code == 2 and "holds the jobs of 2 sweeps" in capsys.readouterr().err
    moved = tmp_path / "moved"
    (multiruns / "a").rename(moved)  # a sweep folder moved elsewhere is still one sweep
    assert [row.status for row in write_report(moved)] == ["completed", "completed"]


def seed_sweep(sweep: Path, keys: dict[str, list[str]], accuracy) -> None:
    """Job folders of `-m seed=0,1,2 <keys>` in Hydra's order (seed outermost, as typed
    first); `accuracy(overrides)` gives each job's test/acc."""
    names = ["seed", *keys]
    for number, values in enumerate(itertools.product(["0", "1", "2"], *keys.values())):
        overrides = dict(zip(names, values, strict=True))
        metrics = {"status": "completed", "test/acc": accuracy(overrides), "val/acc_gap": 0.0}
        listed = [f"{k}={v}" for k, v in overrides.items()]
        fake_job(sweep, f"{number}_{','.join(listed)}", listed, metrics)


def plotted(sweep: Path, metric: str = "test/acc") -> SweepPlot:
    rows = collect(sweep)
    return sweep_series(rows, swept_keys(rows), metric)


def test_report_plot_averages_seeds_only_and_never_plots_against_them(tmp_path: Path) -> None:
    """Observed: `-m seed=0,1,2 reg=l2 reg.l2.weight=0,0.01` plotted test/acc against
    `seed` (the first numeric key typed), each error bar pooling the two weights."""

    def accuracy(job: dict[str, str]) -> float:
        return 0.5 + float(job["reg.l2.weight"]) * 10 + int(job["seed"]) / 100

    seed_sweep(tmp_path, {"reg": ["l2"], "reg.l2.weight": ["0", "0.01"]}, accuracy)
    plot = plotted(tmp_path)
    assert plot.x_key == "reg.l2.weight"
    (series,) = [s for s in plot.series if s.metric == "test/acc"]
    assert [p.x for p in series.points] == [0.0, 0.01]
    assert [p.n for p in series.points] == [3, 3]
    for point, weight in zip(series.points, (0.0, 0.01), strict=True):
        values = [0.5 + weight * 10 + seed / 100 for seed in range(3)]
        assert point.mean == pytest.approx(statistics.mean(values))
        assert point.std == pytest.approx(statistics.stdev(values))  # the sample std, as README
    write_report(tmp_path)
    assert (tmp_path / "report.png").stat().st_size > 1000


def test_report_plot_draws_one_line_per_other_swept_value(tmp_path: Path) -> None:
    """A second swept key, numeric or not, is one line per value, never pooled into a bar."""

    def accuracy(job: dict[str, str]) -> float:
        return (0.9 if job["reg"] == "l2" else 0.6) - float(job["reg.dropout.p"]) / 10

    seed_sweep(tmp_path, {"reg": ["l2", "dropout"], "reg.dropout.p": ["0.1", "0.5"]}, accuracy)
    plot = plotted(tmp_path)
    assert plot.x_key == "reg.dropout.p"
    lines = {s.group: s for s in plot.series if s.metric == "test/acc"}
    assert sorted(lines) == ["reg=dropout", "reg=l2"]
    assert [p.mean for p in lines["reg=l2"].points] == pytest.approx([0.89, 0.85])
    assert [p.mean for p in lines["reg=dropout"].points] == pytest.approx([0.59, 0.55])
    assert all(p.n == 3 and p.std == pytest.approx(0.0) for s in lines.values() for p in s.points)


def test_report_plot_without_a_numeric_key_puts_the_choices_side_by_side(tmp_path: Path) -> None:
    """`-m seed=0,1,2 reg=l2,dropout`: the choices are the x positions, seeds their repeats."""
    seed_sweep(tmp_path, {"reg": ["l2", "dropout"]}, lambda job: 0.1 * int(job["seed"]))
    plot = plotted(tmp_path)
    assert plot.x_key is None and plot.x_labels == ["reg=l2", "reg=dropout"]
    (series,) = [s for s in plot.series if s.metric == "test/acc"]
    assert [(p.x, p.n) for p in series.points] == [(0.0, 3), (1.0, 3)]
    assert series.points[0].std == pytest.approx(statistics.stdev([0.0, 0.1, 0.2]))
    write_report(tmp_path)
    assert (tmp_path / "report.png").stat().st_size > 1000


def test_report_plot_of_one_run_per_point_shows_no_spread(tmp_path: Path) -> None:
    """n=1: the sample std is undefined, so no error bar is drawn (not a zero-width one)."""
    for index, weight in enumerate(["0", "0.1"]):
        metrics = {"status": "completed", "test/acc": 0.5, "val/acc_gap": 0.0}
        fake_job(tmp_path, f"{index}_w={weight}", [f"reg.l2.weight={weight}"], metrics)
    (series, _gap) = plotted(tmp_path).series
    assert [p.n for p in series.points] == [1, 1]
    assert all(math.isnan(p.std) for p in series.points)


@pytest.mark.slow
def test_strength_sweep_with_a_failing_job_reports_three_rows(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = run_cli(
        "train.py",
        "-m",
        "reg=dropout",
        "reg.dropout.p=0.0,0.5,1.5",
        "debug=limit",
        f"hydra.sweep.dir={sweep}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if (p / ".hydra").is_dir())
    assert len(jobs) == 3
    statuses = [json.loads((job / "metrics.json").read_text())["status"] for job in jobs]
    assert statuses == ["completed", "completed", "failed"]
    assert all((job / "tensorboard").is_dir() for job in jobs[:2])
    with (sweep / "report.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [row["reg.dropout.p"] for row in table] == ["0.0", "0.5", "1.5"]
    assert table[2]["status"] == "failed" and "reg.dropout.p" in table[2]["error"]
    assert (sweep / "report.png").is_file() and (sweep / "report.md").is_file()


@pytest.mark.slow
def test_long_overrides_and_a_slash_make_one_job_folder_the_file_system_takes(
    tmp_path: Path,
) -> None:
    """Observed: a sweep over a few regularizer knobs stopped at its first job with
    `OSError: [Errno 36] File name too long` (a traceback, no job run), and
    `optimized_metric=val/loss` nested each job's folder under `<num>_optimized_metric=val/`."""
    sweep = tmp_path / "sweep"
    regs = ("dropout.p", "augment.translate", "label_smoothing.epsilon")
    knobs = [f"reg.{key}=0.123456789012345" for key in regs]
    knobs += [f"optimizer.{key}=0.000123456789012345" for key in ("lr", "weight_decay")]
    result = run_cli(
        "train.py", "-m", "debug=fast", "logger=none", "reg=[l2,dropout,augment,label_smoothing]",
        *knobs,
        "reg.l2.weight=0.00012345678901234567,0.00023456789012345678",
        "optimized_metric=val/loss", f"hydra.sweep.dir={sweep}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [job.name[:2] for job in jobs] == ["0_", "1_"]
    assert all(len(job.name.encode()) <= 255 and "val%2Floss" in job.name for job in jobs)
    assert [read_metrics(job)["status"] for job in jobs] == ["completed", "completed"]
    assert "2 jobs: 2 completed" in (sweep / "report.md").read_text()


@pytest.mark.slow
def test_optuna_sweeper_runs_three_trials_into_a_resumable_study(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    common = [
        "hparams_search=reg_optuna",
        "debug=limit",
        "logger=none",
        f"hydra.sweeper.storage={storage}",
    ]
    result = run_cli(
        "train.py", *common, "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={tmp_path / 'a'}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    best = yaml.safe_load((tmp_path / "a" / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"reg.dropout.p", "reg.l2.weight"}
    assert 0.0 < best["best_value"] <= 1.0
    import optuna

    study = optuna.load_study(study_name="reg_search", storage=storage)
    assert len(study.trials) == 3
    result = run_cli(
        "train.py", *common, "hydra.sweeper.n_trials=1", f"hydra.sweep.dir={tmp_path / 'b'}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(optuna.load_study(study_name="reg_search", storage=storage).trials) == 4


class FailInJob(Callback):
    """`+callbacks.fail._target_=tests.test_sweeps.FailInJob +callbacks.fail.num=<n>`: sweep
    job number `n` fails as it starts training, every other job trains as usual."""

    def __init__(self, num: int) -> None:
        self.num = num

    def on_train_start(self, trainer, pl_module) -> None:
        if HydraConfig.get().job.num == self.num:
            raise RuntimeError(f"job {self.num} was made to fail")


def test_optuna_tells_a_nan_job_as_failed_without_a_value_and_an_escaped_error_too() -> None:
    import optuna
    from hydra.core.utils import JobReturn, JobStatus

    from posttrain.optuna_sweeper import tell

    study = optuna.create_study(direction="maximize")
    escaped = JobReturn(_return_value=RuntimeError("a bug"), status=JobStatus.FAILED)
    for value in (0.5, float("nan")):
        tell(
            study, study.ask(), JobReturn(_return_value=value, status=JobStatus.COMPLETED), 1, False
        )
    with pytest.raises(RuntimeError, match="a bug"):  # stops the search, as `-m` does
        tell(study, study.ask(), escaped, 1, False)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "FAIL"]
    assert [t.value for t in study.trials] == [0.5, None, None]


@pytest.mark.slow
def test_a_failed_optuna_trial_is_marked_failed_and_the_search_goes_on(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    sweep = tmp_path / "sweep"
    result = run_cli(
        "train.py",
        "hparams_search=reg_optuna",
        "hydra.sweeper.n_trials=3",
        "debug=limit",
        "logger=none",
        "+callbacks.fail._target_=tests.test_sweeps.FailInJob",
        "+callbacks.fail.num=1",
        f"hydra.sweeper.storage={storage}",
        f"hydra.sweep.dir={sweep}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    import optuna

    trials = optuna.load_study(study_name="reg_search", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert trials[1].value is None  # no objective value stands for the failed job
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == max(trials[0].value, trials[2].value)
    with (sweep / "report.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [row["status"] for row in table] == ["completed", "failed", "completed"]
    assert "job 1 was made to fail" in table[1]["error"]


@pytest.mark.slow
def test_joblib_launcher_runs_jobs_in_parallel_processes(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = run_cli(
        "train.py",
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "reg=l2",
        "reg.l2.weight=0,1e-3",
        "debug=fast",
        "logger=none",
        f"hydra.sweep.dir={sweep}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Joblib.Parallel" in result.stdout + result.stderr
    with (sweep / "report.csv").open() as handle:
        assert [row["status"] for row in csv.DictReader(handle)] == ["completed", "completed"]


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_writes_one_run_folder(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli(
        "train.py",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "debug=limit",
        "logger=csv",
        PROBE,
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # Two processes of one 2-process group trained, and both reported into the one folder.
    ranks = read_probes(run_dir)
    assert [r["world_size"] for r in ranks] == [2, 2] and ranks[0]["pid"] != ranks[1]["pid"]
    assert [r["global_step"] for r in ranks] == [8, 8]  # debug=limit: 2 epochs x 4 batches
    assert ranks[0]["changed"] == ranks[1]["changed"] and all(ranks[0]["changed"].values())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["global_step"] == 8
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no stray folder of rank 1


@pytest.mark.slow
def test_ddp_multirun_leaves_one_sweep_folder_with_one_run_per_job(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = run_cli(
        "train.py",
        "-m",
        "seed=0,1",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "debug=limit",
        "logger=csv",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if (p / "metrics.json").is_file())
    assert len(jobs) == 2
    for job in jobs:
        assert json.loads((job / "metrics.json").read_text())["status"] == "completed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]


@pytest.mark.slow
def test_submitit_local_launcher_runs_a_two_job_sweep(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = run_cli(
        "train.py",
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=30",  # a hang guard, as run_cli's timeout
        "reg=l2",
        "reg.l2.weight=0,1e-3",
        "debug=fast",
        "logger=none",
        f"hydra.sweep.dir={sweep}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (sweep / ".submitit").is_dir()  # the jobs really went through submitit
    with (sweep / "report.csv").open() as handle:
        assert [row["status"] for row in csv.DictReader(handle)] == ["completed", "completed"]
