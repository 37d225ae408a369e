"""The default run, as a user first meets it: `python train.py seed=S` for a few seeds.

Runs the real CLI with nothing but the seed (digits, small CNN, the shipped defaults: logging,
checkpoints and progress bar included) one seed after another, and records per seed the
test accuracy from the run's `metrics.json` and the wall time of the whole process
(interpreter start to exit, as `/usr/bin/time` would report it), and, as a reference point
outside the framework, scikit-learn's SVC on a stratified 80/20 split of the same data. Writes
benchmarks/results/default_run.json; the README's default-run table is rendered from it.

    python -m benchmarks.default_run [--seeds 0,1,2,3,4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from benchmarks.common import OUT, ROOT, bench_command, run_command, write_result


def run_seed(seed: int, run_dir: Path) -> dict:
    """One `python train.py seed=<seed>` process; its wall time and its final metrics.
    Only `hydra.run.dir` is added, so the result can be found without guessing a timestamp."""
    command = [sys.executable, str(ROOT / "train.py"), f"seed={seed}", f"hydra.run.dir={run_dir}"]
    print(f"[seed {seed}] python train.py seed={seed}", flush=True)
    started = time.perf_counter()
    run_command(command, f"seed {seed}")
    wall = time.perf_counter() - started
    metrics = json.loads((run_dir / "metrics.json").read_text())
    if metrics.get("status") != "completed":
        raise SystemExit(f"[seed {seed}] run did not complete: {metrics}")
    return {
        "seed": seed,
        "test_acc": metrics["test/acc"],
        "wall_seconds": round(wall, 2),
        "metrics": metrics,
    }


def svc_reference() -> dict:
    """Test accuracy of scikit-learn's SVC (default settings) on a stratified 80/20 split of
    the digits: how good a non-neural baseline is on this data, so 99% is read in context."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    images, labels = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.2, stratify=labels, random_state=0
    )
    accuracy = SVC().fit(x_train, y_train).score(x_test, y_test)
    return {
        "model": "sklearn.svm.SVC()",
        "split": "train_test_split(test_size=0.2, stratify=labels, random_state=0)",
        "test_images": len(y_test),
        "test_acc": accuracy,
    }


def markdown_table(result: dict) -> str:
    """The README table: one column per seed, then the mean (computed here from the raw
    values, never typed)."""
    runs = result["runs"]
    header = "| seed | " + " | ".join(str(r["seed"]) for r in runs) + " | mean |"
    rule = "|---" * (len(runs) + 2) + "|"
    acc = [f"{100 * r['test_acc']:.1f}%" for r in runs] + [f"{100 * result['test_acc_mean']:.1f}%"]
    wall = [f"{r['wall_seconds']:.1f} s" for r in runs] + [f"{result['wall_seconds_mean']:.1f} s"]
    svc = result["svc_reference"]
    return "\n".join(
        [
            header,
            rule,
            "| test accuracy | " + " | ".join(acc) + " |",
            "| wall time incl. start-up | " + " | ".join(wall) + " |",
            "",
            f"Reference outside the framework: scikit-learn's `SVC()` reaches "
            f"{100 * svc['test_acc']:.1f}% on a stratified 80/20 split of the same data "
            f"({svc['test_images']} test images, `random_state=0`).",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2,3,4")
    args = parser.parse_args(argv)
    scratch = OUT / f"default_run_{time.strftime('%Y%m%d_%H%M%S')}"
    runs = [run_seed(int(s), scratch / f"seed{s}") for s in args.seeds.split(",")]
    payload = {
        "seeds": args.seeds,
        "per_seed_command": "python train.py seed=S",
        "runs": runs,
        "test_acc_mean": statistics.mean(r["test_acc"] for r in runs),
        "wall_seconds_mean": statistics.mean(r["wall_seconds"] for r in runs),
        "svc_reference": svc_reference(),
    }
    print("\n" + markdown_table(payload))
    path = write_result("default_run", bench_command("default_run", argv), payload)
    print(f"\nwrote {path} (runs in {scratch})")


if __name__ == "__main__":
    main()
