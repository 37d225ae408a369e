"""Temperature scaling after training: ECE, NLL and accuracy before and after, and its cost.

Runs `python train.py calibration=temperature seed=S` for each seed on two runs: the default
one (digits, small CNN) and `experiment=digits_resnet18`, both with `trainer.max_epochs`
shortened so ten runs fit a ~35 min budget on a busy 2-core machine (the table states the
epochs next to the recipe's). Every number comes from the run's `metrics.json`: "before" is
the logged `test/ece` / `test/nll`, "after" `test/ece_calibrated` / `test/nll_calibrated`,
accuracy `test/acc` / `test/acc_calibrated`. The cost is `test/calibration_seconds` (the
validation and test logits plus the LBFGS fit), also as a fraction of the whole process's
wall time. Writes benchmarks/results/calibration.json; the README table is rendered from it.

    python -m benchmarks.calibration [--seeds 0,1,2,3,4] [--default-epochs 3]
        [--resnet18-epochs 1] [--scratch outputs/bench/calibration_<time>]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks.common import (
    OUT,
    QUIET,
    ROOT,
    bench_command,
    mean_std,
    run_command,
    write_result,
)

# What each run is: its overrides (besides seed, epochs and the calibration) and its recipe.
RUNS: dict[str, dict] = {
    "default": {"label": "default run (small CNN)", "overrides": [], "recipe_epochs": 30},
    "resnet18": {
        "label": "`experiment=digits_resnet18`",
        "overrides": ["experiment=digits_resnet18"],
        "recipe_epochs": 15,
    },
}
# metrics.json key -> result field, for every number the table shows.
FIELDS = {
    "test/acc": "acc",
    "test/acc_calibrated": "acc_calibrated",
    "test/ece": "ece",
    "test/ece_calibrated": "ece_calibrated",
    "test/nll": "nll",
    "test/nll_calibrated": "nll_calibrated",
    "test/temperature": "temperature",
    "test/calibration_seconds": "calibration_seconds",
}


def run_args(name: str, epochs: int, seed: int) -> list[str]:
    """The train.py arguments of one run (all but its folder)."""
    return [*RUNS[name]["overrides"], f"trainer.max_epochs={epochs}", "calibration=temperature",
            f"seed={seed}", *QUIET]  # fmt: skip


def run_seed(name: str, epochs: int, seed: int, folder: Path) -> dict:
    """One train.py process (kept if `folder` already holds its completed metrics.json)."""
    record = folder / "metrics.json"
    started = time.perf_counter()
    if not record.is_file():
        args = [*run_args(name, epochs, seed), f"hydra.run.dir={folder}"]
        print(f"[{name} seed {seed}] python train.py {' '.join(args)}", flush=True)
        run_command([sys.executable, str(ROOT / "train.py"), *args], f"{name} seed {seed}")
        (folder / "wall_seconds.txt").write_text(f"{time.perf_counter() - started:.2f}\n")
    metrics = json.loads(record.read_text())
    if metrics.get("status") != "completed":
        raise SystemExit(f"[{name} seed {seed}] run did not complete: {metrics}")
    wall = float((folder / "wall_seconds.txt").read_text())
    numbers = {f: metrics[k] for k, f in FIELDS.items()}
    # The validation the temperature was fitted on: it tells why a T = 1 was kept.
    return {"seed": seed, "wall_seconds": wall, "val_acc": metrics["val/acc_best"], **numbers}


def summarize(name: str, epochs: int, runs: list[dict]) -> dict:
    """Mean and std of every field over the seeds, the cost ratio, and the issue's target."""
    row: dict = {"run": name, "label": RUNS[name]["label"], "epochs": epochs,
                 "recipe_epochs": RUNS[name]["recipe_epochs"], "seeds": len(runs),
                 "command": "python train.py " + " ".join(run_args(name, epochs, 0)).replace(
                     "seed=0", "seed=S")}  # fmt: skip
    for field in [*FIELDS.values(), "wall_seconds"]:
        row[f"{field}_mean"], row[f"{field}_std"] = mean_std([r[field] for r in runs])
    ratios = [r["calibration_seconds"] / r["wall_seconds"] for r in runs]
    row["cost_ratio_mean"], _ = mean_std(ratios)
    row["predictions_unchanged"] = all(r["acc"] == r["acc_calibrated"] for r in runs)
    row["ece_halved"] = row["ece_calibrated_mean"] <= row["ece_mean"] / 2
    row["per_seed"] = runs
    return row


def pm(row: dict, field: str, scale: float = 1.0, digits: int = 2) -> str:
    mean, std = scale * row[f"{field}_mean"], scale * row[f"{field}_std"]
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(result: dict) -> str:
    """The README table: one row per run, mean ± std over the seeds, before → after."""
    lines = [
        "| run (epochs run / recipe) | seeds | test acc % before = after | ECE % before | "
        "ECE % after | NLL before | NLL after | T | calibration cost |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        same = "=" if row["predictions_unchanged"] else "≠"
        cost = (
            f"{row['calibration_seconds_mean']:.1f} s "
            f"({100 * row['cost_ratio_mean']:.1f}% of the run)"
        )
        lines.append(
            f"| {row['label']} ({row['epochs']} / {row['recipe_epochs']}) | {row['seeds']} | "
            f"{pm(row, 'acc', 100, 1)} {same} {pm(row, 'acc_calibrated', 100, 1)} | "
            f"{pm(row, 'ece', 100)} | {pm(row, 'ece_calibrated', 100)} | {pm(row, 'nll', 1, 3)}"
            f" | {pm(row, 'nll_calibrated', 1, 3)} | {pm(row, 'temperature')} | {cost} |"
        )
    commands = "; ".join(f"`{row['command']}`" for row in result["rows"])
    lines += ["", f"Per seed S: {commands}."]
    for note in kept_t1_notes(result["rows"]):
        lines += ["", note]
    return "\n".join(lines)


KEPT_T1_REASONS = (
    (True, "every validation image was already right"),
    (False, "its validation predictions were no better than chance"),
)


def kept_t1_notes(rows: list[dict]) -> list[str]:
    """Which seeds fitted no temperature (T = 1 exactly), and why: no validation mistake to
    fit on, or validation predictions no better than chance (`why_no_temperature_fits`).
    Results written before `val_acc` was kept only had the first case: the second fitted an
    arbitrary huge T then."""
    notes = []
    for row in rows:
        kept = [r for r in row["per_seed"] if r["temperature"] == 1.0]
        for right, why in KEPT_T1_REASONS:
            seeds = [str(r["seed"]) for r in kept if (r.get("val_acc", 1.0) == 1.0) == right]
            if seeds:
                notes.append(
                    f"{row['label']}: T = 1 kept for seed(s) {', '.join(seeds)}: {why}, so no "
                    "temperature minimizes the NLL."
                )
    return notes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--default-epochs", type=int, default=3)
    parser.add_argument("--resnet18-epochs", type=int, default=1)
    parser.add_argument("--runs", default="default,resnet18")
    parser.add_argument("--scratch", default=None, help="run folders; completed runs are kept")
    parser.add_argument("--results-dir", default=None)
    args = parser.parse_args(argv)
    scratch = Path(args.scratch or OUT / f"calibration_{time.strftime('%Y%m%d_%H%M%S')}")
    epochs = {"default": args.default_epochs, "resnet18": args.resnet18_epochs}
    started = time.time()
    rows = []
    for name in args.runs.split(","):
        seeds = [int(s) for s in args.seeds.split(",")]
        runs = [run_seed(name, epochs[name], s, scratch / name / f"seed{s}") for s in seeds]
        rows.append(summarize(name, epochs[name], runs))
    payload = {"seeds": args.seeds, "scratch": str(scratch), "rows": rows,
               "wall_seconds": round(time.time() - started, 1)}  # fmt: skip
    print("\n" + markdown_table(payload))
    command = bench_command("calibration", argv)
    path = write_result("calibration", command, payload, args.results_dir)
    print(f"\nwrote {path} (runs in {scratch})")


if __name__ == "__main__":
    main()
