"""Weight averaging during training: does EMA or SWA of the weights help in the low-data regime,
alone and on top of augmentation, and what does it cost?

Runs `experiment=digits_lowdata` (10 digits per class) with `reg=none`, `augment`, `ema`,
`swa`, `[augment,ema]` and `[augment,swa]` at their default knobs, one `python train.py`
process per (seed, setting): seeds outermost, the settings' order rotated every seed, so
machine load falls on every setting alike.
Each run's fit time (training + validation, from `FitClock`) and process wall time are
recorded; the cost column is the median fit time divided by `reg=none`'s. Writes
benchmarks/results/averaging.json; the README table is rendered from it by `markdown_table`.

The default `--recipe` is the experiment's own (ResNet-18, 150 epochs) without the per-epoch
`last.ckpt` (130 MB a write for ResNet-18; it changes no number): 2-5 min a run on this 2-core
machine at one thread, about 70 min for the 30 runs. `--recipe model=small_cnn
trainer.max_epochs=50` is the shortened one (README: `averaging_short.json`). The recipe is
written into the result and the table's caption. Completed runs are kept: re-running the same
command with `--sweep-dir` finishes an interrupted benchmark (and, once all are done, rewrites
the result from them).

    python -m benchmarks.averaging [--seeds 0,1,2,3,4] [--recipe callbacks.last_checkpoint=null ...]
        [--threads 1] [--sweep-dir outputs/bench/averaging_<stamp>] [--collect-only]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

from benchmarks.common import OUT, QUIET, bench_command, mean_std, run_train, write_result

# (label, the `reg=` override), in the table's order.
SETTINGS: list[tuple[str, str]] = [
    ("none", "reg=none"),
    ("augment", "reg=augment"),
    ("ema", "reg=ema"),
    ("swa", "reg=swa"),
    ("augment+ema", "reg=[augment,ema]"),
    ("augment+swa", "reg=[augment,swa]"),
]
DEFAULT_RECIPE = ["callbacks.last_checkpoint=null"]


class FitClock(Callback):
    """Seconds from fit start to fit end (every training step, averaging update and
    validation; not start-up or the test), written to `out` as JSON."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.started = 0.0

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.started = time.perf_counter()

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        seconds = time.perf_counter() - self.started
        self.out.write_text(json.dumps({"fit_seconds": seconds}) + "\n")


def rotated(settings: list[tuple[str, str]], shift: int) -> list[tuple[str, str]]:
    """The settings starting at `shift`: over the seed rounds each setting runs early and
    late alike, so a machine load that drifts during the benchmark (observed: load 12 falling
    to 1 in 30 min) does not make the setting that always runs first look slow."""
    shift %= len(settings)
    return settings[shift:] + settings[:shift]


def run_one(run_dir: Path, setting: str, seed: int, recipe: list[str]) -> None:
    """One training run, unless an earlier invocation completed it; its process wall time is
    stored beside its metrics."""
    if completed(run_dir):
        return
    clock = [
        "+callbacks.fit_clock._target_=benchmarks.averaging.FitClock",
        f"+callbacks.fit_clock.out={run_dir / 'fit_clock.json'}",
    ]
    overrides = ["experiment=digits_lowdata", *recipe, setting, f"seed={seed}", *QUIET]
    started = time.perf_counter()
    run_train([*overrides, *clock, f"hydra.run.dir={run_dir}"], f"{setting} seed {seed}")
    wall = {"wall_seconds": time.perf_counter() - started}
    (run_dir / "wall.json").write_text(json.dumps(wall) + "\n")


def completed(run_dir: Path) -> bool:
    metrics, wall = run_dir / "metrics.json", run_dir / "wall.json"
    if not (wall.is_file() and metrics.is_file()):
        return False
    return json.loads(metrics.read_text()).get("status") == "completed"


def read_run(run_dir: Path, seed: int) -> dict[str, float]:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    fit = json.loads((run_dir / "fit_clock.json").read_text())
    wall = json.loads((run_dir / "wall.json").read_text())
    return {"seed": seed, **{k: metrics[k] for k in ("test/acc", "val/acc_best")}, **fit, **wall}


def median_of(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def summarize(runs: dict[str, list[dict[str, float]]]) -> list[dict[str, Any]]:
    """Per setting: mean ± std test accuracy, the difference to `none`, and the fit and
    wall time as ratios of medians to `none`'s (a median: one run slowed by the machine's
    other work does not move it)."""
    base = runs["none"]
    base_fit, base_wall = median_of(base, "fit_seconds"), median_of(base, "wall_seconds")
    base_acc = mean_std([r["test/acc"] for r in base])[0]
    rows = []
    for label, override in SETTINGS:
        group = runs.get(label, [])
        if not group:
            continue
        acc_mean, acc_std = mean_std([r["test/acc"] for r in group])
        fit_median = median_of(group, "fit_seconds")
        rows.append(
            {
                "setting": label,
                "override": override,
                "seeds": len(group),
                "test_acc_mean": acc_mean,
                "test_acc_std": acc_std,
                "val_acc_best_mean": mean_std([r["val/acc_best"] for r in group])[0],
                "delta_vs_none": acc_mean - base_acc,
                "fit_seconds_median": fit_median,
                "fit_time_ratio": fit_median / base_fit,
                "wall_time_ratio": median_of(group, "wall_seconds") / base_wall,
                "per_seed": group,
            }
        )
    return rows


def markdown_table(result: dict) -> str:
    """The README table: one row per `reg=` setting, mean ± std test accuracy over the
    seeds, its difference to `reg=none`, and the median fit time as a multiple of `reg=none`'s."""
    recipe = " ".join(["experiment=digits_lowdata", *result["recipe"]])
    lines = [
        f"`{recipe}`, seeds {result['seeds']}, {result['threads']} thread(s) per run",
        "",
        "| `reg=` | test acc (%) | Δ vs `none` (points) | fit time × `none` (median) |",
        "|---|---|---|---|",
    ]
    for row in result["rows"]:
        acc = f"{100 * row['test_acc_mean']:.1f} ± {100 * row['test_acc_std']:.1f}"
        delta = "—" if row["setting"] == "none" else f"{100 * row['delta_vs_none']:+.1f}"
        name = row["override"].removeprefix("reg=")
        lines.append(f"| `{name}` | {acc} | {delta} | {row['fit_time_ratio']:.2f} |")
    return "\n".join(lines)


def print_table(result: dict) -> None:
    print()
    print(markdown_table(result))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--recipe", nargs="*", default=DEFAULT_RECIPE, help="after the experiment")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--sweep-dir", default=None)
    parser.add_argument("--collect-only", action="store_true")
    args = parser.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by every train.py
    seeds = [int(s) for s in args.seeds.split(",")]
    sweep = Path(args.sweep_dir or OUT / f"averaging_{time.strftime('%Y%m%d_%H%M%S')}")
    runs: dict[str, list[dict[str, float]]] = {}
    for round_index, seed in enumerate(seeds):
        for label, override in rotated(SETTINGS, round_index):
            run_dir = sweep / label / f"seed{seed}"
            if not args.collect_only:
                run_one(run_dir, override, seed, args.recipe)
            runs.setdefault(label, []).append(read_run(run_dir, seed))
    payload = {
        "sweep_dir": str(sweep),
        "recipe": args.recipe,
        "seeds": args.seeds,
        "threads": args.threads,
        "runs_wall_seconds": round(sum(r["wall_seconds"] for g in runs.values() for r in g), 1),
        "rows": summarize(runs),
    }
    path = write_result("averaging", bench_command("averaging", argv), payload)
    print_table(payload)
    print(f"\nwrote {path} (runs in {sweep})")


if __name__ == "__main__":
    main()
