"""Sweep report: `python -m posttrain.report <multirun folder>`.

Reads every job folder of a Hydra multirun (its `.hydra/overrides.yaml` and `metrics.json`)
and writes `report.md`, `report.csv` and `report.png` beside them: one row per job with its
overrides, best validation and test metrics, train/val gap and status; the plot shows the
metric and the gap against the swept value. Model soups made from the sweep
(`python -m posttrain.soup`, in `soup_<recipe>/`) are rows beside the jobs and lines on the
plot; they are not jobs (never counted, never failed). It also runs by itself at the end of
every sweep (`SweepReportCallback`, registered in `conf/hydra/default.yaml`).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

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
    return {
        k: float(v)
        for k, v in record.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def why_not_completed(record: dict[str, Any]) -> str:
    """The last line of a failure's error (the message under its traceback), else the
    record's reason (`interrupted`: "stopped by SIGTERM"; `running`: when and which process)."""
    lines = str(record.get("error") or record.get("reason") or "").strip().splitlines()
    return lines[-1] if lines else ""


def read_job(job_dir: Path, sweep_dir: Path) -> JobRow:
    """A job folder -> row; a job with no metrics.json stopped before it recorded anything."""
    overrides = read_overrides(job_dir)
    folder = str(job_dir.relative_to(sweep_dir))
    metrics_file = job_dir / "metrics.json"
    if not metrics_file.is_file():
        return JobRow(folder, overrides, "missing", error="no metrics.json")
    data = json.loads(metrics_file.read_text())
    status = str(data.get("status", "unknown"))
    why = why_not_completed(data) if status != "completed" else ""
    return JobRow(folder, overrides, status, numbers_of(data), why)


def normalized(overrides: list[str]) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in overrides if "=" in line)
    return {key.lstrip("+~"): value for key, value in pairs if not key.startswith("hydra.")}


def expected_jobs(sweep_dir: Path) -> list[list[str]] | None:
    """Every job a basic-sweeper sweep asked for, in Hydra's order (its job numbers), from
    `multirun.yaml`; None for other sweepers (Optuna decides its trials as it goes)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    file = sweep_dir / "multirun.yaml"
    if not file.is_file():
        return None
    config = OmegaConf.load(file)
    if not str(config.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None
    parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def never_started(sweep_dir: Path, rows: list[JobRow]) -> list[JobRow]:
    """Rows for the jobs of the sweep that left no folder (a killed sweep's remainder)."""
    seen = [row.overrides for row in rows]
    return [
        JobRow(f"{number}_(not started)", normalized(job), "missing", error="never started")
        for number, job in enumerate(expected_jobs(sweep_dir) or [])
        if normalized(job) not in seen
    ]


def collect(sweep_dir: Path) -> list[JobRow]:
    jobs = sorted({p.parent.parent for p in sweep_dir.glob("**/.hydra/overrides.yaml")})
    rows = [read_job(job, sweep_dir) for job in jobs]
    rows += never_started(sweep_dir, rows)
    return sorted(rows, key=lambda row: job_number(row.folder))


def collect_soups(sweep_dir: Path) -> list[JobRow]:
    """The soups made from this sweep (`soup_<recipe>/metrics.json`). A soup has one set of
    weights, so its `val/acc_best` column shows its `val/acc`."""
    rows = []
    for record_file in sorted(sweep_dir.glob("soup_*/metrics.json")):
        data = json.loads(record_file.read_text())
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
        "| " + " | ".join(header[:shown]) + " |",
        "|" + "---|" * shown,
        *("| " + " | ".join(record[:shown]) + " |" for record in records),
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


def plot(
    rows: list[JobRow], keys: list[str], sweep_dir: Path, metric: str, soups: Sequence[JobRow] = ()
) -> bool:
    """Metric and train/val gap against the first numeric swept key (mean ± std over repeats)."""
    numeric = [k for k in keys if all(as_number(r.overrides.get(k, "")) is not None for r in rows)]
    if not numeric:
        return False
    key = numeric[0]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    completed = [r for r in rows if r.status == "completed"]
    xs = sorted({as_number(r.overrides[key]) for r in completed})
    figure, axes = plt.subplots(figsize=(6, 4))
    for name, style in ((metric, "o-"), ("val/acc_gap", "s--")):
        means, stds = [], []
        for x in xs:
            values = [
                r.metrics[name]
                for r in completed
                if as_number(r.overrides[key]) == x and name in r.metrics
            ]
            means.append(np.mean(values) if values else np.nan)
            stds.append(np.std(values) if values else np.nan)
        axes.errorbar(xs, means, yerr=stds, fmt=style, capsize=3, label=name)
    for soup, style in zip(soups, (":", "-.", "--"), strict=False):
        if metric in soup.metrics:
            axes.axhline(soup.metrics[metric], linestyle=style, color="k", label=soup.folder)
    positive = [x for x in xs if x > 0]
    if len(positive) == len(xs) and positive and max(positive) / min(positive) >= 100:
        axes.set_xscale("log")
    elif positive and min(positive) > 0 and max(positive) / min(positive) >= 100:
        axes.set_xscale("symlog", linthresh=min(positive))
    axes.set_xlabel(key)
    axes.set_title(f"{sweep_dir.name}: {metric} and train/val gap")
    axes.grid(alpha=0.3)
    axes.legend()
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
    rows = write_report(args.sweep_dir, args.metric)
    print(f"{len(rows)} jobs -> {Path(args.sweep_dir) / 'report.md'}")


if __name__ == "__main__":
    main()
