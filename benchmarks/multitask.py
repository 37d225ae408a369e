"""Multi-task vs single-task on digits with 20 labels per class.

Trains `experiment=digits_multitask` (digit + parity + large, one shared small CNN) with each
loss weighting, and the same method with the `digit` task alone, over several seeds; prints
mean ± std test accuracy on `digit`. Writes benchmarks/results/multitask.json (per-seed values
and aggregates); the README table is rendered from it by `markdown_table`.

    python -m benchmarks.multitask [--seeds 0,1,2] [--samples-per-class 20]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.common import (
    OUT,
    QUIET,
    bench_command,
    grouped_metrics,
    mean_std,
    run_train,
    write_result,
)

SETTINGS: dict[str, list[str]] = {
    "single-task_digit": ["~data.targets.parity", "~data.targets.large"],
    "multi-task_equal": ["method.weighting=equal"],
    "multi-task_uncertainty": ["method.weighting=uncertainty"],
    "multi-task_dwa": ["method.weighting=dwa"],
}
# How the README names each setting.
LABELS = {
    "single-task_digit": "single-task (digit)",
    "multi-task_equal": "multi-task digit + parity + large, equal weights",
    "multi-task_uncertainty": "multi-task, uncertainty weighting",
    "multi-task_dwa": "multi-task, DWA",
}


def setting_of(family: str, overrides: dict[str, str]) -> str:
    return family


def markdown_table(result: dict) -> str:
    """The README table: mean ± std digit test accuracy per setting, the best in bold."""
    best = max(r["digit_acc_mean"] for r in result["rows"])
    lines = ["| setting | digit test acc % |", "|---|---|"]
    for r in result["rows"]:
        cell = f"{100 * r['digit_acc_mean']:.1f} ± {100 * r['digit_acc_std']:.1f}"
        lines.append(
            f"| {LABELS[r['setting']]} | {f'**{cell}**' if r['digit_acc_mean'] == best else cell} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--samples-per-class", default="20")
    parser.add_argument("--sweep-dir", default=None)
    parser.add_argument("--collect-only", action="store_true")
    args = parser.parse_args(argv)
    sweep = Path(args.sweep_dir or OUT / f"multitask_{time.strftime('%Y%m%d_%H%M%S')}")
    started = time.time()
    if not args.collect_only:
        for name, overrides in SETTINGS.items():
            run_train(
                [
                    "-m",
                    "experiment=digits_multitask",
                    f"seed={args.seeds}",
                    f"data.samples_per_class={args.samples_per_class}",
                    *overrides,
                    *QUIET,
                    f"hydra.sweep.dir={sweep / name}",
                ],
                name,
            )
    groups = grouped_metrics(sweep, setting_of)
    rows = []
    print(f"\n{'setting':<24} {'n':>2} {'digit test acc %':>17}")
    for name in SETTINGS:
        runs = groups.get(name, [])
        if not runs:
            continue
        acc_mean, acc_std = mean_std([m["test/digit/acc"] for m in runs])
        rows.append(
            {
                "setting": name,
                "seeds": len(runs),
                "digit_acc_mean": acc_mean,
                "digit_acc_std": acc_std,
                "per_seed": [
                    {"seed": m.get("seed"), "digit_acc": m["test/digit/acc"]} for m in runs
                ],
            }
        )
        print(f"{name:<24} {len(runs):>2} {100 * acc_mean:>9.1f} ± {100 * acc_std:.1f}")
    payload = {
        "sweep_dir": str(sweep),
        "seeds": args.seeds,
        "samples_per_class": args.samples_per_class,
        "wall_seconds": round(time.time() - started, 1),
        "rows": rows,
    }
    path = write_result("multitask", bench_command("multitask", argv), payload)
    print(f"\nwrote {path} (jobs in {sweep})")


if __name__ == "__main__":
    main()
