"""Sweep report: `python -m posttrain.report <multirun folder>`.

Reads every job folder of a Hydra multirun (its `.hydra/overrides.yaml` and `metrics.json`)
and writes `report.md`, `report.csv` and `report.png` beside them: one row per job with its
overrides, best validation and test metrics, train/val gap and status; the plot shows the
metric and the gap against the swept value, averaged over `seed` only (`sweep_series`).
Model soups made from the sweep (`python -m posttrain.soup`, in `soup_<recipe>/`) are rows
beside the jobs and lines on the plot; they are not jobs (never counted, never failed). It
also runs by itself at the end of every sweep (`SweepReportCallback`, registered in
`conf/hydra/default.yaml`).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from posttrain.errors import PosttrainError, is_number

log = logging.getLogger("posttrain")

COLUMNS = ("val/acc_best", "test/acc", "val/acc_gap", "train/acc", "test/f1_macro", "test/ece")


@dataclass
class JobRow:
    """One sweep job: where it ran, what it overrode, how it ended."""

    folder: str
    overrides: dict[str, str]
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    error: str = ""  # why it did not complete: the error's last line or the record's reason
    ingredients: list[str] = field(default_factory=list)  # a soup's jobs


def read_overrides(job_dir: Path) -> dict[str, str]:
    import yaml

    return normalized(yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text()) or [])


def numbers_of(record: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a metrics.json (flags such as `true` are not numbers)."""
    return {k: float(v) for k, v in record.items() if is_number(v)}


def why_not_completed(record: dict[str, Any]) -> str:
    """The last line of a failure's error (the message under its traceback), else the
    record's reason (`interrupted`: "stopped by SIGTERM"; `running`: when and which process)."""
    lines = str(record.get("error") or record.get("reason") or "").strip().splitlines()
    return lines[-1] if lines else ""


def read_record(file: Path) -> dict[str, Any] | str:
    """A metrics.json as a dict, or why it cannot be read: one torn or edited record must
    not stop the report of every other job (nor leave an earlier report.md standing)."""
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        return f"{file.name} cannot be read: {error}"
    return data if isinstance(data, dict) else f"{file.name} holds no record (not an object)"


def read_job(job_dir: Path, sweep_dir: Path) -> JobRow:
    """A job folder -> row; a job with no metrics.json stopped before it recorded anything."""
    overrides = read_overrides(job_dir)
    folder = str(job_dir.relative_to(sweep_dir))
    metrics_file = job_dir / "metrics.json"
    if not metrics_file.is_file():
        return JobRow(folder, overrides, "missing", error="no metrics.json")
    data = read_record(metrics_file)
    if isinstance(data, str):
        return JobRow(folder, overrides, "unreadable", error=data)
    status = str(data.get("status", "unknown"))
    why = why_not_completed(data) if status != "completed" else ""
    return JobRow(folder, overrides, status, numbers_of(data), why)


def normalized(overrides: list[str]) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in overrides if "=" in line)
    return {key.lstrip("+~"): value for key, value in pairs if not key.startswith("hydra.")}


def expected_jobs(sweep_dir: Path) -> list[list[str]] | None:
    """Every job a basic-sweeper sweep asked for, in Hydra's order (its job numbers), from
    `multirun.yaml`; None for other sweepers (Optuna decides its trials as it goes)."""

    file = sweep_dir / "multirun.yaml"
    if not file.is_file():
        return None
    return basic_sweep_jobs(OmegaConf.load(file))


def basic_sweep_jobs(config: DictConfig) -> list[list[str]] | None:
    """The jobs (their overrides, in job-number order) a basic-sweeper multirun config
    makes of its command line and `hydra.sweeper.params`; None for other sweepers."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not str(config.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None
    # As typed, not resolved: an override holding `${...}` was handed to the jobs as such (a
    # resolved copy matched no job, and the report counted it as a job never started).
    hydra = OmegaConf.to_container(config.hydra, resolve=False)
    assert isinstance(hydra, dict)
    params = hydra["sweeper"].get("params") or {}
    arguments = [f"{key}={value}" for key, value in params.items()]
    parsed = OverridesParser.create().parse_overrides([*arguments, *hydra["overrides"]["task"]])
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def never_started(sweep_dir: Path, rows: list[JobRow]) -> list[JobRow]:
    """Rows for the jobs of the sweep that left no folder (a killed sweep's remainder)."""
    seen = [row.overrides for row in rows]
    return [
        JobRow(f"{number}_(not started)", normalized(job), "missing", error="never started")
        for number, job in enumerate(expected_jobs(sweep_dir) or [])
        if normalized(job) not in seen
    ]


def recorded_launch(job_dir: Path) -> tuple[str, str] | None:
    """(Hydra's mode, the sweep folder) a job folder's `.hydra/hydra.yaml` records, the
    folder resolved against the job's working directory; None when there is no such file."""
    import os

    import yaml

    try:
        hydra = yaml.safe_load((job_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]
        where = os.path.join(hydra["runtime"]["cwd"], str(hydra["sweep"]["dir"]))
        return str(hydra["mode"]), os.path.normpath(where)
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
        return None


def refuse_other_than_one_sweep(sweep_dir: Path, jobs: list[Path]) -> None:
    """One paragraph for a folder that is not one multirun: a run's folder (or a folder of
    runs), or a folder above several sweeps, whose jobs the report would pool as one sweep
    (the seeds of different sweeps averaged into one point)."""
    launches = {job: recorded_launch(job) for job in jobs}
    runs = [job for job, launch in launches.items() if launch and launch[0] == "RUN"]
    if runs:
        shown = ", ".join(str(job) for job in runs[:3]) + (" ..." if len(runs) > 3 else "")
        raise PosttrainError(
            f"{sweep_dir} is not a multirun folder: it holds {len(runs)} "
            f"single run(s) (`.hydra/hydra.yaml` says `mode: RUN`): {shown}. A run's numbers "
            "are in its metrics.json; give the `hydra.sweep.dir` of a `python train.py -m ...` "
            "sweep (by default `outputs/train/multiruns/<time>_<id>`)."
        )
    sweeps = sorted({launch[1] for launch in launches.values() if launch})
    if len(sweeps) > 1:
        raise PosttrainError(
            f"{sweep_dir} holds the jobs of {len(sweeps)} sweeps "
            f"({', '.join(sweeps[:5])}{' ...' if len(sweeps) > 5 else ''}), and one report "
            "covers one sweep: give one of those folders."
        )


def collect(sweep_dir: Path) -> list[JobRow]:
    jobs = sorted({p.parent.parent for p in sweep_dir.glob("**/.hydra/overrides.yaml")})
    refuse_other_than_one_sweep(sweep_dir, jobs)
    rows = [read_job(job, sweep_dir) for job in jobs]
    rows += never_started(sweep_dir, rows)
    return sorted(rows, key=lambda row: job_number(row.folder))


def collect_soups(sweep_dir: Path) -> list[JobRow]:
    """The soups made from this sweep (`soup_<recipe>/metrics.json`). A soup has one set of
    weights, so its `val/acc_best` column shows its `val/acc`."""
    rows = []
    for record_file in sorted(sweep_dir.glob("soup_*/metrics.json")):
        data = read_record(record_file)
        if isinstance(data, str):
            rows.append(JobRow(record_file.parent.name, {}, "unreadable", error=data))
            continue
        numbers = numbers_of(data)
        if "val/acc" in numbers:
            numbers.setdefault("val/acc_best", numbers["val/acc"])
        folder = record_file.parent.name
        status = str(data.get("status", "unknown"))
        rows.append(JobRow(folder, {}, status, numbers, ingredients=data.get("ingredients", [])))
    return rows


def job_number(folder: str) -> tuple[int, str]:
    head = folder.split("_", 1)[0]
    return (int(head), folder) if head.isdigit() else (sys.maxsize, folder)


def swept_keys(rows: list[JobRow]) -> list[str]:
    """Override keys whose value differs between jobs, in the order they appear."""
    keys: dict[str, set[str]] = {}
    for row in rows:
        for key, value in row.overrides.items():
            keys.setdefault(key, set()).add(value)
    return [key for key, values in keys.items() if len(values) > 1]


def as_number(value: str) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def format_cell(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def status_counts(rows: list[JobRow]) -> str:
    """`3 completed, 1 diverged`: every status by name, so no bad job hides in a total."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.status] = counts.get(row.status, 0) + 1
    order = sorted(counts, key=lambda status: (status != "completed", status))
    return ", ".join(f"{counts[status]} {status}" for status in order)


def soup_lines(soups: Sequence[JobRow]) -> list[str]:
    """Under the table: which jobs each soup averaged."""
    if not soups:
        return []
    return [
        "",
        "Soups (python -m posttrain.soup; a soup's val/acc_best is its val/acc):",
        *(
            f"- {soup.folder}: {len(soup.ingredients)} jobs: {', '.join(soup.ingredients)}"
            for soup in soups
        ),
    ]


def write_tables(
    rows: list[JobRow], keys: list[str], sweep_dir: Path, soups: Sequence[JobRow] = ()
) -> None:
    header = ["job", *keys, "status", *COLUMNS, "overrides", "error", "ingredients"]
    records = [
        [
            row.folder,
            *(row.overrides.get(k, "") for k in keys),
            row.status,
            *(format_cell(row.metrics.get(c)) for c in COLUMNS),
            " ".join(f"{k}={v}" for k, v in row.overrides.items()),
            row.error,
            " ".join(row.ingredients),
        ]
        for row in [*rows, *soups]
    ]
    with (sweep_dir / "report.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(records)
    shown = len(header) - 3  # overrides, error and ingredients are listed below the table
    lines = [
        f"# Sweep report: {sweep_dir}",
        "",
        f"{len(rows)} jobs: {status_counts(rows)}."
        + (f" {len(soups)} soup(s) of their weights." if soups else ""),
        "",
        table_row(header[:shown]),
        "|" + "---|" * shown,
        *(table_row(record[:shown]) for record in records),
        *soup_lines(soups),
    ]
    unfinished = [row for row in rows if row.status != "completed"]
    if unfinished:
        lines += [
            "",
            "Jobs not completed:",
            *(
                f"- {row.folder}: {row.status}" + (f": {row.error}" if row.error else "")
                for row in unfinished
            ),
        ]
    (sweep_dir / "report.md").write_text("\n".join(lines) + "\n")


def table_row(cells: list[str]) -> str:
    """One markdown table row; a `|` inside a swept value (`+data.options.tag=a|b`) started
    a new column, moving every number after it under the wrong header."""
    return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"


REPEAT_KEY = "seed"  # the one swept key whose jobs are repeats of one setting


@dataclass(frozen=True)
class Point:
    """One plotted point: the mean of `n` jobs' metric and its sample std (ddof=1, as the
    README's tables; NaN when n=1, where no spread is known)."""

    x: float
    mean: float
    std: float
    n: int


@dataclass(frozen=True)
class Series:
    """One line of the plot: `metric` for the jobs whose other swept keys read `group`."""

    metric: str
    group: str
    points: list[Point]


@dataclass(frozen=True)
class SweepPlot:
    """What the plot shows. `x_key` is the swept value on the x-axis; without a numeric
    swept key (other than `seed`) the x positions are the jobs' settings, `x_labels`."""

    x_key: str | None
    x_labels: list[str] | None
    series: list[Series]


def summarize(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, sample std and n: the std of repeats estimates the spread of a new run, so it
    divides by n-1 (the population std understates it, by a third at n=3)."""
    if not values:
        return math.nan, math.nan, 0
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else math.nan, len(values)


def x_axis_key(rows: list[JobRow], keys: list[str]) -> str | None:
    """The first swept key, other than `seed`, whose value is a number in every job.
    `seed` is never the x-axis: runs differing only by seed are repeats of one setting."""
    numeric = (
        key
        for key in keys
        if key != REPEAT_KEY and all(as_number(r.overrides.get(key, "")) is not None for r in rows)
    )
    return next(numeric, None)


def setting(row: JobRow, keys: Sequence[str]) -> str:
    return ", ".join(f"{key}={row.overrides.get(key, '')}" for key in keys)


def sweep_series(rows: list[JobRow], keys: list[str], metric: str) -> SweepPlot:
    """The plotted data: `metric` and the train/val gap of the completed jobs, averaged over
    `seed` only; every other swept key gives its own line (or, with no numeric key to plot
    against, its own x position), so no point pools different settings."""
    x_key = x_axis_key(rows, keys)
    line_keys = [key for key in keys if key not in (x_key, REPEAT_KEY)]
    completed = [r for r in rows if r.status == "completed"]
    if x_key is None:  # categorical: each setting is a position, one line per metric
        labels = list(dict.fromkeys(setting(r, line_keys) for r in completed))
        position = {label: float(index) for index, label in enumerate(labels)}
        groups = {"": [(position[setting(r, line_keys)], r) for r in completed]}
    else:
        labels = None
        groups = {}
        for row in completed:
            group = groups.setdefault(setting(row, line_keys), [])
            group.append((as_number(row.overrides[x_key]) or 0.0, row))
    series = []
    for name in (metric, "val/acc_gap"):
        for group, members in groups.items():
            points = []
            for x in sorted({x for x, _ in members}):
                values = [r.metrics[name] for at, r in members if at == x and name in r.metrics]
                if values:
                    points.append(Point(x, *summarize(values)))
            series.append(Series(name, group, points))
    return SweepPlot(x_key, labels, series)


def counts_label(points: Sequence[Point]) -> str:
    """`n=3` (seeds per point) for a legend; a range when the points differ (a failed seed)."""
    counts = sorted({p.n for p in points})
    return f"n={counts[0]}" if len(counts) == 1 else f"n={counts[0]}-{counts[-1]}"


def draw_series(axes: Any, plot: SweepPlot) -> None:
    """Each series with sample-std error bars; n in its legend entry, and at each point
    where the points of one line rest on different numbers of jobs."""
    import matplotlib.pyplot as plt

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    groups = list(dict.fromkeys(s.group for s in plot.series))
    for item in plot.series:
        if not item.points:
            continue
        style = "o-" if item.metric != "val/acc_gap" else "s--"
        color = colors[groups.index(item.group) % len(colors)]
        label = (
            f"{item.metric}{' ' + item.group if item.group else ''} ({counts_label(item.points)})"
        )
        axes.errorbar(
            [p.x for p in item.points],
            [p.mean for p in item.points],
            yerr=[0.0 if math.isnan(p.std) else p.std for p in item.points],
            fmt=style,
            color=color,
            capsize=3,
            label=label,
        )
        if len({p.n for p in item.points}) > 1:
            for p in item.points:
                axes.annotate(f"n={p.n}", (p.x, p.mean), textcoords="offset points",
                              xytext=(4, 4), fontsize=7, color=color)  # fmt: skip


def scale_x(axes: Any, xs: Sequence[float]) -> None:
    """A log axis when the values span decades (symlog when 0 is among them)."""
    positive = [x for x in xs if x > 0]
    if len(positive) == len(xs) and positive and max(positive) / min(positive) >= 100:
        axes.set_xscale("log")
    elif positive and max(positive) / min(positive) >= 100:
        axes.set_xscale("symlog", linthresh=min(positive))


def plot(
    rows: list[JobRow], keys: list[str], sweep_dir: Path, metric: str, soups: Sequence[JobRow] = ()
) -> bool:
    """Metric and train/val gap against the swept value (`sweep_series`): mean ± sample std
    over seeds, n shown; False (no plot) when nothing was swept."""
    if not keys:
        return False
    data = sweep_series(rows, keys, metric)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    draw_series(axes, data)
    for soup, style in zip(soups, (":", "-.", "--"), strict=False):
        if metric in soup.metrics:
            axes.axhline(soup.metrics[metric], linestyle=style, color="k", label=soup.folder)
    if data.x_key is not None:
        scale_x(axes, sorted({p.x for s in data.series for p in s.points}))
        axes.set_xlabel(data.x_key)
    else:
        labels = data.x_labels or []
        axes.set_xticks(range(len(labels)), [label or "all jobs" for label in labels])
    repeats = " (mean ± sample std over seed)" if REPEAT_KEY in keys else ""
    axes.set_title(f"{sweep_dir.name}: {metric} and train/val gap{repeats}", fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(sweep_dir / "report.png", dpi=120)
    plt.close(figure)
    return True


def write_report(sweep_dir: str | Path, metric: str = "test/acc") -> list[JobRow]:
    """Write report.md/csv/png for the multirun in `sweep_dir`; returns the job rows."""
    sweep = Path(sweep_dir)
    rows = collect(sweep)
    if not rows:
        raise SystemExit(
            f"posttrain.report: no Hydra job folders (.hydra/overrides.yaml) under {sweep}"
        )
    keys = swept_keys(rows)
    soups = collect_soups(sweep)
    write_tables(rows, keys, sweep, soups)
    plot(rows, keys, sweep, metric, soups)
    return rows


class SweepReportCallback(Callback):
    """Hydra callback: write the report when a multirun ends; never fails the sweep."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = config.hydra.sweep.dir
        try:
            rows = write_report(sweep_dir)
        except Exception as error:  # a report problem must not hide the sweep's results
            log.warning("sweep report for %s failed: %s", sweep_dir, error)
            return
        log.info(
            "sweep report: %s/report.md (%d jobs: %s)", sweep_dir, len(rows), status_counts(rows)
        )


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m posttrain.report", description=__doc__)
    parser.add_argument("sweep_dir", help="a Hydra multirun folder")
    parser.add_argument("--metric", default="test/acc", help="metric to plot (default test/acc)")
    args = parser.parse_args(argv)
    try:
        rows = write_report(args.sweep_dir, args.metric)
    except PosttrainError as error:
        print(f"\n{error}\n", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"{len(rows)} jobs -> {Path(args.sweep_dir) / 'report.md'}")


if __name__ == "__main__":
    main()
