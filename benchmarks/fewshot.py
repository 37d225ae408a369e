"""Few-shot accuracy on the embedded digits: ProtoNet and MAML, 5-way 1-shot and 5-shot.

Runs `experiment=digits_protonet` and `experiment=digits_maml` (convnet4, digit x rotation
classes split into disjoint meta-train/val/test classes) for each shot count and prints the
test accuracy over 600 fixed test episodes with its 95% confidence interval. Writes
benchmarks/results/fewshot.json; the README table is rendered from it by `markdown_table`.

    python -m benchmarks.fewshot [--shots 1,5] [--methods digits_maml]
        [--extra trainer.max_epochs=5]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.common import OUT, QUIET, bench_command, grouped_metrics, run_train, write_result

METHODS = ("digits_protonet", "digits_maml")
# How the README names each method's row.
LABELS = {"protonet": "ProtoNet", "maml": "MAML (1 inner step, α = 0.4, 3 steps at test)"}


def markdown_table(result: dict) -> str:
    """The README table: one row per method, one column per shot count, acc ± 95% CI."""
    shots = sorted({r["shots"] for r in result["rows"]})
    cells = {(r["method"], r["shots"]): r for r in result["rows"]}
    lines = [
        "| method | " + " | ".join(f"{k}-shot" for k in shots) + " |",
        "|---" * (len(shots) + 1) + "|",
    ]
    present = {r["method"] for r in result["rows"]}
    for method in [
        m.removeprefix("digits_") for m in METHODS if m.removeprefix("digits_") in present
    ]:
        row = [
            f"{100 * cells[method, k]['test_acc']:.1f} ± {100 * cells[method, k]['ci95']:.1f} %"
            if (method, k) in cells
            else "—"
            for k in shots
        ]
        lines.append(f"| {LABELS.get(method, method)} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shots", default="1,5")
    parser.add_argument("--extra", nargs="*", default=[])
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    parser.add_argument("--sweep-dir", default=None)
    parser.add_argument("--collect-only", action="store_true")
    args = parser.parse_args(argv)
    sweep = Path(args.sweep_dir or OUT / f"fewshot_{time.strftime('%Y%m%d_%H%M%S')}")
    started = time.time()
    if not args.collect_only:
        for experiment in args.methods:
            run_train(
                [
                    "-m",
                    f"experiment={experiment}",
                    f"data.shots={args.shots}",
                    *args.extra,
                    *QUIET,
                    f"hydra.sweep.dir={sweep / experiment}",
                ],
                experiment,
            )
    groups = grouped_metrics(sweep, lambda family, o: f"{family}|{o['data.shots']}")
    rows = []
    print(f"\n{'method':<18} {'5-way K-shot':>12} {'test acc % ± 95% CI':>22} {'episodes':>9}")
    for key, runs in sorted(groups.items()):
        family, shots = key.split("|")
        metrics = runs[0]
        rows.append(
            {
                "method": family.removeprefix("digits_"),
                "shots": int(shots),
                "test_acc": metrics["test/acc"],
                "ci95": metrics["test/acc_ci95"],
                "episodes": metrics["test/episodes"],
                "metrics": metrics,
            }
        )
        print(
            f"{rows[-1]['method']:<18} {shots:>12} {100 * metrics['test/acc']:>14.1f} ± "
            f"{100 * metrics['test/acc_ci95']:.1f} {int(metrics['test/episodes']):>9}"
        )
    payload = {
        "sweep_dir": str(sweep),
        "extra": args.extra,
        "wall_seconds": round(time.time() - started, 1),
        "rows": rows,
    }
    path = write_result("fewshot", bench_command("fewshot", argv), payload)
    print(f"\nwrote {path} (jobs in {sweep})")


if __name__ == "__main__":
    main()
