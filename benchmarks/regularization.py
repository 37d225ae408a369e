"""Does regularization help where over-fitting is real?

Runs `experiment=digits_lowdata` (ResNet-18, 10 digits per class) with `reg=none` and each
regularizer at a few strengths over several seeds, as Hydra multiruns of the real CLI, then
prints mean ± std of test accuracy and of the train/val gap per setting, and the difference
to `reg=none` in units of its std. Writes benchmarks/results/<--result>.json (default
`regularization`; give each configuration its own name, e.g. `--result regularization_60ep`,
so one README table does not overwrite another); the README table is rendered from it by
`markdown_table`.

    python -m benchmarks.regularization [--seeds 0,1,2,3,4] [--extra trainer.max_epochs=30 ...]
        [--only none augment mixup] [--result regularization]
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

# One multirun per setting family: (label, overrides). Strength lists sweep inside a family.
SETTINGS: list[tuple[str, list[str]]] = [
    ("none", ["reg=none"]),
    ("l2", ["reg=l2", "reg.l2.weight=1e-4,1e-3"]),
    ("dropout", ["reg=dropout", "reg.dropout.p=0.25,0.5"]),
    ("augment", ["reg=augment", "reg.augment.policy=basic,randaugment"]),
    ("label_smoothing", ["reg=label_smoothing", "reg.label_smoothing.epsilon=0.1"]),
    ("mixup", ["reg=mixup", "reg.mixup.alpha=0.2"]),
]


def run_family(label: str, overrides: list[str], seeds: str, extra: list[str], sweep: Path) -> None:
    args = ["-m", "experiment=digits_lowdata", f"seed={seeds}", *overrides, *extra, *QUIET]
    run_train([*args, f"hydra.sweep.dir={sweep / label}"], label)


def setting_name(family: str, overrides: dict[str, str]) -> str:
    """The reg part of a job's overrides, e.g. `l2 weight=1e-3` (seed excluded)."""
    knobs = [f"{k.split('.', 2)[-1]}={v}" for k, v in overrides.items() if k.startswith("reg.")]
    return " ".join([overrides.get("reg", "none"), *knobs])


def delta_to_none(
    acc_mean: float, none: list[dict[str, float]]
) -> tuple[float | None, float | None]:
    """The difference to `reg=none`'s mean, and in units of its std; None where there is no
    such number: no `none` jobs (`--only augment mixup`), or a std of 0 (one seed)."""
    if not none:
        return None, None
    base_mean, base_std = mean_std([m["test/acc"] for m in none])
    delta = acc_mean - base_mean
    return delta, (delta / base_std if base_std else None)


def summarize(results: dict[str, list[dict[str, float]]]) -> list[dict[str, float | str]]:
    """Mean ± std per setting and the difference to `none` in units of none's std."""
    rows = []
    for name, runs in results.items():
        acc_mean, acc_std = mean_std([m["test/acc"] for m in runs])
        gap_mean, gap_std = mean_std([m["val/acc_gap"] for m in runs])
        delta, delta_in_std = delta_to_none(acc_mean, results.get("none", []))
        rows.append(
            {
                "setting": name,
                "seeds": len(runs),
                "test_acc_mean": acc_mean,
                "test_acc_std": acc_std,
                "gap_mean": gap_mean,
                "gap_std": gap_std,
                "delta_vs_none": delta,
                "delta_in_none_std": delta_in_std,
                "per_seed": [
                    {"seed": m.get("seed"), "test_acc": m["test/acc"], "gap": m["val/acc_gap"]}
                    for m in runs
                ],
            }
        )
    return sorted(rows, key=lambda r: (r["setting"] != "none", -r["test_acc_mean"]))


def markdown_table(result: dict) -> str:
    """The README table: mean ± std test accuracy and train − val gap per setting (named by
    its overrides), the best accuracy in bold, and the difference to `reg=none` in units of
    none's std."""
    best = max(r["test_acc_mean"] for r in result["rows"])
    lines = ["| setting | test acc % | train − val gap % | Δ vs none |", "|---|---|---|---|"]
    for r in result["rows"]:
        acc = f"{100 * r['test_acc_mean']:.1f} ± {100 * r['test_acc_std']:.1f}"
        lines.append(
            f"| `{r['setting']}` | {f'**{acc}**' if r['test_acc_mean'] == best else acc} | "
            f"{100 * r['gap_mean']:.1f} ± {100 * r['gap_std']:.1f} | {delta_cell(r)} |"
        )
    return "\n".join(lines)


def delta_cell(row: dict) -> str:
    """`+3.8 (+2.3 σ of none)`, or what is missing: a number here is never a stand-in."""
    if row["setting"] == "none":
        return "—"
    if row["delta_vs_none"] is None:
        return "no `reg=none` run to compare with"
    points = f"{100 * row['delta_vs_none']:+.1f}"
    if row["delta_in_none_std"] is None:
        return f"{points} (σ of none is 0)"
    return f"{points} ({row['delta_in_none_std']:+.1f} σ of none)"


def print_table(rows: list[dict[str, float | str]]) -> None:
    print(
        f"\n{'setting':<34} {'n':>2} {'test acc %':>14} {'train-val gap %':>16} {'Δ vs none':>14}"
    )
    for r in rows:
        print(
            f"{r['setting']:<34} {r['seeds']:>2} "
            f"{100 * r['test_acc_mean']:>7.1f} ± {100 * r['test_acc_std']:<4.1f} "
            f"{100 * r['gap_mean']:>8.1f} ± {100 * r['gap_std']:<5.1f} "
            f"{delta_cell(r)}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides for every job")
    parser.add_argument("--only", nargs="*", default=None, help="families to run (default all)")
    parser.add_argument("--sweep-dir", default=None, help="where the multiruns go")
    parser.add_argument("--collect-only", action="store_true", help="only re-read --sweep-dir")
    parser.add_argument("--result", default="regularization", help="benchmarks/results/<name>")
    args = parser.parse_args(argv)
    sweep = Path(args.sweep_dir or OUT / f"regularization_{time.strftime('%Y%m%d_%H%M%S')}")
    started = time.time()
    for label, overrides in SETTINGS:
        if not args.collect_only and (args.only is None or label in args.only):
            run_family(label, overrides, args.seeds, args.extra, sweep)
    rows = summarize(grouped_metrics(sweep, setting_name))
    print_table(rows)
    payload = {
        "sweep_dir": str(sweep),
        "seeds": args.seeds,
        "extra": args.extra,
        "wall_seconds": round(time.time() - started, 1),
        "rows": rows,
    }
    path = write_result(args.result, bench_command("regularization", argv), payload)
    print(f"\nwrote {path} (jobs in {sweep})")


if __name__ == "__main__":
    main()
