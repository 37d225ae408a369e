"""Knowledge distillation on digits: does a ResNet-18 teacher make a small CNN better than the
same CNN trained alone on the same 100 images, epochs and seeds?

One teacher for all seeds: `model=resnet18` trained once (seed 0) on
`experiment=digits_lowdata` (10 digits per class, 32x32). Then, per seed, the student
`model=small_cnn` on the same recipe, trained alone (`method=supervised`) and distilled
(`method=distill method.teacher=<teacher best.ckpt>`, T and alpha at their defaults), the two
runs one after the other so they share the machine's load; each process's wall time is
measured, and the table gives their ratio. Test accuracy is each run's own `test/acc` (its
best checkpoint by `val/acc`) on the recipe's fixed test split. Writes
benchmarks/results/distill.json; the README table is rendered from it by `markdown_table`.

    python -m benchmarks.distill [--seeds 0,1,2,3,4] [--teacher-epochs 150]
        [--student-epochs 150] [--extra method.temperature=2] [--teacher-result <json>]

`--choose-on-val method.temperature=2,4,8 method.alpha=0.5,0.9` first trains the distilled
student with every combination on `--choose-seeds` and keeps the one with the best mean
`val/acc_best` (ties: the first in grid order); the comparison then runs with it. Test
accuracy plays no part in the choice, and every candidate is kept in the result file.

`--teacher-result` reuses the teacher of an earlier run of this benchmark (its result file
names the checkpoint, how it was trained and what it measured) instead of training one.

`--teacher-epochs`/`--student-epochs` below the recipe's 150 shorten it to fit a time budget;
the table says so. `callbacks.last_checkpoint=null` skips the per-epoch resume checkpoint
(it changes no number; the ResNet-18 one is 130 MB a write).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

from benchmarks.common import (
    OUT,
    QUIET,
    bench_command,
    comparable,
    mean_std,
    run_train,
    write_result,
)

RECIPE = ["experiment=digits_lowdata", "callbacks.last_checkpoint=null", *QUIET]
STUDENT = ["model=small_cnn"]
RECIPE_EPOCHS = 150


def timed_run(overrides: list[str], run_dir: Path, label: str) -> dict:
    """One `python train.py` process: its metrics.json and its wall time in seconds."""
    started = time.perf_counter()
    run_train([*overrides, f"hydra.run.dir={run_dir}"], label)
    wall = time.perf_counter() - started
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"test_acc": metrics["test/acc"], "val_acc_best": metrics["val/acc_best"],
            "wall_seconds": round(wall, 1)}  # fmt: skip


def train_teacher(sweep: Path, epochs: int, extra: list[str]) -> dict:
    overrides = [*RECIPE, "model=resnet18", f"trainer.max_epochs={epochs}", "seed=0", *extra]
    result = timed_run(overrides, sweep / "teacher", "teacher")
    return {
        **result,
        "overrides": overrides,
        "extra": extra,
        "checkpoint": str(sweep / "teacher" / "checkpoints" / "best.ckpt"),
    }


def reused_teacher(result_file: str) -> dict:
    """The teacher record of an earlier result file, with where it came from."""
    earlier = json.loads(Path(result_file).read_text())
    teacher = earlier["teacher"]
    if not Path(teacher["checkpoint"]).is_file():
        raise SystemExit(f"{result_file}: its teacher {teacher['checkpoint']} no longer exists")
    return {**teacher, "epochs": earlier["teacher_epochs"], "reused_from": result_file}


def train_students(
    sweep: Path, seeds: list[int], epochs: int, teacher: str, extra: list[str]
) -> list[dict]:
    """Per seed: the student alone, then distilled, run back to back (same load)."""
    common = [*RECIPE, *STUDENT, f"trainer.max_epochs={epochs}"]
    distill = ["method=distill", f"method.teacher={teacher}", *extra]
    rows = []
    for seed in seeds:
        alone = timed_run([*common, f"seed={seed}"], sweep / f"alone_seed{seed}", f"alone {seed}")
        distilled = timed_run([*common, *distill, f"seed={seed}"], sweep / f"distill_seed{seed}",
                              f"distill {seed}")  # fmt: skip
        rows.append({"seed": seed, "alone": alone, "distilled": distilled,
                     "wall_ratio": distilled["wall_seconds"] / alone["wall_seconds"]})  # fmt: skip
    return rows


def override_grid(options: list[str]) -> list[list[str]]:
    """`["a=1,2", "b=x"]` -> `[["a=1", "b=x"], ["a=2", "b=x"]]`: every combination, in order."""
    axes = []
    for option in options:
        key, sep, values = option.partition("=")
        if not sep or not values:
            raise SystemExit(f"--choose-on-val {option!r}: expected key=value[,value...]")
        axes.append([f"{key}={value}" for value in values.split(",")])
    return [list(combination) for combination in itertools.product(*axes)]


def best_on_validation(candidates: list[dict]) -> dict:
    """The candidate with the highest mean `val/acc_best`; the first listed among equals."""
    # max keeps the first of ties
    return max(candidates, key=lambda c: comparable(c["val_acc_best_mean"]))


def choose_on_validation(
    sweep: Path, seeds: list[int], epochs: int, teacher: str, extra: list[str], grid: list[str]
) -> dict:
    """Train the distilled student with each combination of `grid` on `seeds`; the choice."""
    common = [*RECIPE, *STUDENT, f"trainer.max_epochs={epochs}", "method=distill",
              f"method.teacher={teacher}", *extra]  # fmt: skip
    candidates = []
    for number, combination in enumerate(override_grid(grid)):
        scores = []
        for seed in seeds:
            folder = sweep / "choose" / f"{number}_seed{seed}"
            run = timed_run([*common, *combination, f"seed={seed}"], folder, f"choose {number}")
            scores.append(run["val_acc_best"])
        candidates.append({"overrides": combination, "val_acc_best": scores,
                           "val_acc_best_mean": statistics.fmean(scores)})  # fmt: skip
    return {"seeds": seeds, "grid": grid, "candidates": candidates,
            "chosen": best_on_validation(candidates)["overrides"]}  # fmt: skip


def summarize(rows: list[dict]) -> dict:
    """Mean ± std over seeds of each setting's test accuracy and of the wall-time ratio."""
    summary = {}
    for setting in ("alone", "distilled"):
        acc_mean, acc_std = mean_std([r[setting]["test_acc"] for r in rows])
        wall_mean, _ = mean_std([r[setting]["wall_seconds"] for r in rows])
        summary[setting] = {"test_acc_mean": acc_mean, "test_acc_std": acc_std,
                            "wall_seconds_mean": wall_mean}  # fmt: skip
    ratio_mean, ratio_std = mean_std([r["wall_ratio"] for r in rows])
    gain = summary["distilled"]["test_acc_mean"] - summary["alone"]["test_acc_mean"]
    alone_std = summary["alone"]["test_acc_std"]
    summary.update(
        wall_ratio_mean=ratio_mean,
        wall_ratio_std=ratio_std,
        gain=gain,
        gain_in_alone_stds=gain / alone_std if alone_std else None,
        # No spread (one seed, or every seed alike): "more than one std" would be any gain.
        target_met=bool(gain > alone_std) if alone_std else None,
    )
    return summary


def target_note(summary: dict, seeds: int) -> str:
    """The verdict on the target, more than one std of the student alone, or why none."""
    if summary["target_met"] is None:
        return f"not measurable (the student alone has std 0 over {seeds} seed(s))"
    return "met" if summary["target_met"] else "not met"


def teacher_note(teacher: dict, alone: dict) -> str:
    """A weaker teacher is a fact of the table, stated on its own: not the verdict's reason."""
    if teacher["test_acc"] >= alone["test_acc_mean"]:
        return ""
    return (
        f" The teacher ({100 * teacher['test_acc']:.1f}%) scores below the student trained "
        f"alone ({100 * alone['test_acc_mean']:.1f}%)."
    )


def epochs_note(result: dict) -> str:
    teacher, student = result["teacher_epochs"], result["student_epochs"]
    if teacher == student == RECIPE_EPOCHS:
        return f"the recipe's {RECIPE_EPOCHS} epochs"
    return f"teacher {teacher} epochs, students {student} (the recipe: {RECIPE_EPOCHS})"


def markdown_table(result: dict) -> str:
    """The README table: teacher, student alone, student distilled; test accuracy mean ± std
    over seeds, wall time and its ratio to the student alone."""
    s, teacher = result["summary"], result["teacher"]
    seeds = len(result["rows"])

    def acc(cell: dict) -> str:
        return f"{100 * cell['test_acc_mean']:.1f} ± {100 * cell['test_acc_std']:.1f}"

    gain = f"{100 * s['gain']:+.1f} points"
    if s["gain_in_alone_stds"] is not None:
        gain += f" ({s['gain_in_alone_stds']:+.1f} std of alone)"
    selection = result.get("selection")
    extra = " ".join([*result["extra"], *(selection["chosen"] if selection else [])]) or "defaults"
    # The median too: one run caught in a load spike moves the mean of a few ratios a lot.
    ratio_median = statistics.median(r["wall_ratio"] for r in result["rows"])
    origin = ", trained by an earlier run of this benchmark" if "reused_from" in teacher else ""
    return "\n".join(
        [
            "| model | test acc % | wall time per run | time ratio |",
            "|---|---|---|---|",
            f"| teacher: `{' '.join(['model=resnet18', *teacher.get('extra', [])])}` "
            f"(1 run, seed 0{origin}) | "
            f"{100 * teacher['test_acc']:.1f} | "
            f"{teacher['wall_seconds']:.0f} s | — |",
            f"| student `model=small_cnn` alone ({seeds} seeds) | {acc(s['alone'])} | "
            f"{s['alone']['wall_seconds_mean']:.0f} s | 1 |",
            f"| student distilled, `method=distill` ({extra}) | {acc(s['distilled'])} | "
            f"{s['distilled']['wall_seconds_mean']:.0f} s | "
            f"{s['wall_ratio_mean']:.2f} ± {s['wall_ratio_std']:.2f} (median {ratio_median:.2f}) |",
            "",
            f"`experiment=digits_lowdata` (100 training images, 32×32), {epochs_note(result)}; "
            f"one teacher for every seed; distilled − alone: {gain}; target (more than one std "
            f"of alone): {target_note(s, seeds)}.{teacher_note(teacher, s['alone'])} Wall time: "
            "whole `train.py` processes, each distilled run right after its seed's alone run; "
            "time ratio: mean ± std and median of the per-seed distilled / alone ratios."
            + (selection_note(selection) if selection else ""),
        ]
    )


def selection_note(selection: dict) -> str:
    """How the distilled run's settings were chosen, in one sentence of the table's note."""
    tried = "; ".join(
        f"`{' '.join(c['overrides'])}` {100 * c['val_acc_best_mean']:.1f}"
        for c in selection["candidates"]
    )
    seeds = ",".join(str(seed) for seed in selection["seeds"])
    return (
        f" Settings chosen on validation before the comparison (mean `val/acc_best` %, "
        f"seeds {seeds}; test accuracy not used): {tried}."
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--teacher-epochs", type=int, default=RECIPE_EPOCHS)
    parser.add_argument("--student-epochs", type=int, default=RECIPE_EPOCHS)
    parser.add_argument(
        "--extra", nargs="*", default=[], help="distilled runs, e.g. method.alpha=0.5"
    )
    parser.add_argument(
        "--teacher-extra", nargs="*", default=[], help="the teacher's run, e.g. reg=augment"
    )
    parser.add_argument("--teacher-result", default=None, help="reuse this result's teacher")
    parser.add_argument(
        "--choose-on-val",
        nargs="*",
        default=[],
        help="grid for the distilled runs, e.g. method.alpha=0.5,0.9",
    )
    parser.add_argument("--choose-seeds", default="0,1", help="seeds the choice is made on")
    parser.add_argument("--sweep-dir", default=None)
    parser.add_argument("--results-dir", default=None, help="instead of benchmarks/results")
    args = parser.parse_args(argv)
    sweep = Path(args.sweep_dir or OUT / f"distill_{time.strftime('%Y%m%d_%H%M%S')}")
    seeds = [int(s) for s in args.seeds.split(",")]
    started = time.time()
    if args.teacher_result:
        teacher = reused_teacher(args.teacher_result)
    else:
        trained = train_teacher(sweep, args.teacher_epochs, args.teacher_extra)
        teacher = {**trained, "epochs": args.teacher_epochs}
    extra, selection = args.extra, None
    if args.choose_on_val:
        choose_seeds = [int(s) for s in args.choose_seeds.split(",")]
        selection = choose_on_validation(
            sweep,
            choose_seeds,
            args.student_epochs,
            teacher["checkpoint"],
            extra,
            args.choose_on_val,
        )
        extra = [*extra, *selection["chosen"]]
    rows = train_students(sweep, seeds, args.student_epochs, teacher["checkpoint"], extra)
    payload = {
        "sweep_dir": str(sweep),
        "teacher_epochs": teacher["epochs"],
        "student_epochs": args.student_epochs,
        "extra": args.extra,
        "wall_seconds": round(time.time() - started, 1),
        "teacher": teacher,
        **({"selection": selection} if selection else {}),
        "summary": summarize(rows),
        "rows": rows,
    }
    path = write_result("distill", bench_command("distill", argv), payload, args.results_dir)
    print(markdown_table(json.loads(path.read_text())))
    print(f"\nwrote {path} (runs in {sweep})")


if __name__ == "__main__":
    main()
