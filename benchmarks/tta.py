"""Test-time augmentation at evaluation: test accuracy with `tta=shift` and `tta=flip` against
the same checkpoints evaluated plainly (`tta=none`), and the cost.

For each recipe and seed, one `python train.py <recipe> seed=S` run; its `best.ckpt` is then
evaluated three times, `python eval.py ckpt_path=<best.ckpt> tta=none|shift|flip`, one process
after another so they share the machine's load. Every accuracy is that evaluation's `test/acc`
(the recipe's fixed test split, every image once); the cost is each evaluation process's wall
time as a ratio to the plain one's (start-up included: on 359 digits it dominates). Two
recipes by default: the small CNN on `experiment=digits_lowdata` (100 training images) trained
without and with `reg=augment` (random shifts, no flips): shift views average translations the
augmented model has learnt to ignore; flip views show digits as no training image was (digits
are not mirror-symmetric), the failure case. Writes benchmarks/results/tta.json; the README
table is rendered from it by `markdown_table`.

    python -m benchmarks.tta [--seeds 0,1,2,3,4] [--recipes plain,augment] [--scratch DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
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
    run_train,
    write_result,
)

BASE = ["experiment=digits_lowdata", "model=small_cnn", "callbacks.last_checkpoint=null", *QUIET]
RECIPES: dict[str, list[str]] = {"plain": [], "augment": ["reg=augment"]}
VIEWS = ("none", "shift", "flip")
PLUMBING = ("callbacks.", "logger=")


def trained_checkpoint(recipe: str, seed: int, folder: Path, epochs: int | None) -> Path:
    """The seed's best.ckpt, trained unless `folder` already holds the completed run."""
    record = folder / "metrics.json"
    if not (record.is_file() and json.loads(record.read_text()).get("status") == "completed"):
        length = [] if epochs is None else [f"trainer.max_epochs={epochs}"]
        args = [*BASE, *RECIPES[recipe], *length, f"seed={seed}", f"hydra.run.dir={folder}"]
        run_train(args, f"{recipe} seed {seed}")
    return folder / "checkpoints" / "best.ckpt"


def evaluated(checkpoint: Path, view: str, folder: Path) -> dict:
    """One `eval.py` process (kept if `folder` holds its record): test accuracy, views, wall
    time."""
    timing = folder / "wall_seconds.txt"
    if not timing.is_file():
        args = [f"ckpt_path={checkpoint}", f"tta={view}", "logger=none", f"hydra.run.dir={folder}"]
        print(f"[eval {view}] python eval.py {' '.join(args)}", flush=True)
        started = time.perf_counter()
        run_command([sys.executable, str(ROOT / "eval.py"), *args], f"eval {view}")
        timing.write_text(f"{time.perf_counter() - started:.2f}\n")
    metrics = json.loads((folder / "metrics.json").read_text())
    return {"test_acc": metrics["test/acc"], "views": metrics["test/tta_views"],
            "test_images": metrics["test/images"],
            "wall_seconds": float(timing.read_text())}  # fmt: skip


def run_seed(recipe: str, seed: int, scratch: Path, epochs: int | None) -> dict:
    folder = scratch / recipe / f"seed{seed}"
    checkpoint = trained_checkpoint(recipe, seed, folder / "train", epochs)
    views = {view: evaluated(checkpoint, view, folder / f"eval_{view}") for view in VIEWS}
    return {"seed": seed, **views}


def summarize(recipe: str, runs: list[dict]) -> dict:
    """Per view: accuracy mean ± std, its difference to `none` (mean and std of the per-seed
    differences: the same checkpoints, so the seeds' spread cancels), seeds it helped or hurt,
    and the wall-time ratio to `none`."""
    row: dict = {"recipe": recipe, "overrides": [*BASE, *RECIPES[recipe]], "per_seed": runs}
    for view in VIEWS:
        accs = [r[view]["test_acc"] for r in runs]
        deltas = [r[view]["test_acc"] - r["none"]["test_acc"] for r in runs]
        ratios = [r[view]["wall_seconds"] / r["none"]["wall_seconds"] for r in runs]
        row[view] = {
            "acc": mean_std(accs),
            "delta": mean_std(deltas),
            "better": sum(d > 0 for d in deltas),
            "worse": sum(d < 0 for d in deltas),
            "wall_ratio_median": statistics.median(ratios),
            "views": runs[0][view]["views"],
        }
    return row


def markdown_table(result: dict) -> str:
    """The README table: one row per recipe and view."""
    lines = [
        "| recipe | `tta=` | views | test acc % | Δ vs `none` (points, same checkpoints) | "
        "seeds better / worse | eval time × `none` (median) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        # What makes the model; the console and checkpoint plumbing changes no number.
        recipe = " ".join(o for o in row["overrides"] if not o.startswith(PLUMBING))
        for view in VIEWS:
            cell = row[view]
            acc, delta = cell["acc"], cell["delta"]
            change = "—" if view == "none" else f"{100 * delta[0]:+.1f} ± {100 * delta[1]:.1f}"
            counts = "—" if view == "none" else f"{cell['better']} / {cell['worse']}"
            ratio = "1" if view == "none" else f"{cell['wall_ratio_median']:.2f}"
            lines.append(
                f"| `{recipe}` | `{view}` | {cell['views']:.0f} | "
                f"{100 * acc[0]:.1f} ± {100 * acc[1]:.1f} | {change} | {counts} | {ratio} |"
            )
    seeds = len(result["rows"][0]["per_seed"]) if result["rows"] else 0
    epochs = result.get("epochs") or "the recipe's 150"
    lines += [
        "",
        f"{seeds} seeds; {epochs} epochs; each seed's `best.ckpt` evaluated with every `tta=` "
        "(`python eval.py ckpt_path=<best.ckpt> tta=<view>`), one process after another. "
        "Eval time: whole processes, start-up included.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--recipes", default="plain,augment")
    parser.add_argument("--epochs", type=int, default=None, help="shorten the recipe's 150")
    parser.add_argument("--scratch", default=None, help="run folders; completed runs are kept")
    parser.add_argument("--results-dir", default=None)
    args = parser.parse_args(argv)
    scratch = Path(args.scratch or OUT / f"tta_{time.strftime('%Y%m%d_%H%M%S')}")
    seeds = [int(s) for s in args.seeds.split(",")]
    started = time.time()
    rows = [
        summarize(recipe, [run_seed(recipe, seed, scratch, args.epochs) for seed in seeds])
        for recipe in args.recipes.split(",")
    ]
    payload = {"seeds": args.seeds, "epochs": args.epochs, "scratch": str(scratch), "rows": rows,
               "wall_seconds": round(time.time() - started, 1)}  # fmt: skip
    print("\n" + markdown_table(payload))
    path = write_result("tta", bench_command("tta", argv), payload, args.results_dir)
    print(f"\nwrote {path} (runs in {scratch})")


if __name__ == "__main__":
    main()
