"""Transfer learning on digits: does a pretrained backbone help with few labels?

Pretrains the small CNN on digits 0-4 (`experiment=digits_pretrain`), then trains on digits
5-9 with K labelled images per class (`experiment=digits_transfer`): from scratch, linear
probe, full fine-tuning, and full fine-tuning with frozen BatchNorm statistics, with the top
backbone layer re-initialized, with discriminative learning rates (backbone 0.1x) and with
L2-SP. Same epochs and the same learning-rate grid for every setting; each keeps its best
rate by mean validation accuracy (the test split is never used to choose). Each seed draws
its own K-shot subset (`data.seed=${seed}`). Prints mean ± std test accuracy per K; writes
benchmarks/results/transfer.json (every setting × K × lr with its per-seed values, and the
chosen rows); the README table is rendered from it by `markdown_table`.

    python -m benchmarks.transfer [--shots 1,5,20] [--seeds 0,1,2,3,4]
        [--pretrain-extra reg=augment] [--extra reg=augment]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.common import (
    OUT,
    QUIET,
    bench_command,
    comparable,
    grouped_metrics,
    mean_std,
    run_train,
    write_result,
)

LRS = ("0.001", "0.003", "0.01", "0.03")
POLICIES: dict[str, list[str]] = {
    "linear_probe": ["method.finetune.policy=linear_probe", "method.finetune.backbone_lr_factor=1"],
    "full": ["method.finetune.policy=full", "method.finetune.backbone_lr_factor=1"],
    "full_frozen_bn": [
        "method.finetune.policy=full",
        "method.finetune.backbone_lr_factor=1",
        "method.finetune.freeze_bn_stats=true",
    ],
    "full_reinit_top": [
        "method.finetune.policy=full",
        "method.finetune.backbone_lr_factor=1",
        "method.finetune.reinit_top_layers=1",
    ],
    "full_disc_lr": ["method.finetune.policy=full", "method.finetune.backbone_lr_factor=0.1"],
    "full_l2sp": [
        "method.finetune.policy=full",
        "method.finetune.backbone_lr_factor=1",
        "reg=l2sp",
    ],
}


def run_all(sweep: Path, shots: str, seeds: str, pretrained: Path, extra: list[str]) -> None:
    common = [
        "-m",
        "experiment=digits_transfer",
        f"data.samples_per_class={shots}",
        f"seed={seeds}",
        "data.seed=${seed}",
        f"optimizer.lr={','.join(LRS)}",
        *extra,
        *QUIET,
    ]
    scratch = ["method=supervised", "model.pretrained=null"]
    run_train([*common, *scratch, f"hydra.sweep.dir={sweep / 'scratch'}"], "scratch")
    for name, overrides in POLICIES.items():
        args = [*common, f"model.pretrained={pretrained}", *overrides]
        run_train([*args, f"hydra.sweep.dir={sweep / name}"], name)


def job_key(family: str, overrides: dict[str, str]) -> str:
    """`<setting>|<K>|<lr>` for a transfer job (the multirun folder is the setting)."""
    setting = family
    return f"{setting}|{overrides['data.samples_per_class']}|{overrides.get('optimizer.lr', '')}"


# How the README names each setting (columns, in this order).
LABELS = {
    "scratch": "scratch",
    "linear_probe": "linear probe",
    "full": "full fine-tune",
    "full_reinit_top": "full, top layer re-initialized",
    "full_frozen_bn": "full, frozen BN stats",
    "full_disc_lr": "full, backbone lr 0.1×",
    "full_l2sp": "full + L2-SP",
}


def grid(groups: dict[str, list[dict[str, float]]]) -> list[dict]:
    """Mean ± std and per-seed values of every (setting, K, lr) cell of the sweep."""
    cells = []
    for key, runs in groups.items():
        setting, shots, lr = key.split("|")
        test_mean, test_std = mean_std([m["test/acc"] for m in runs])
        val_mean, _ = mean_std([m["val/acc_best"] for m in runs])
        row = {
            "setting": setting,
            "shots": int(shots),
            "lr": lr,
            "seeds": len(runs),
            "test_acc_mean": test_mean,
            "test_acc_std": test_std,
            "val_acc_mean": val_mean,
            "per_seed": [{"seed": m.get("seed"), "test_acc": m["test/acc"]} for m in runs],
        }
        cells.append(row)
    return cells


def summarize(cells: list[dict]) -> list[dict]:
    """Per (setting, K) the cell at the setting's best lr by mean val/acc_best (never test;
    the first in job order among equals)."""
    rows: dict[tuple[str, int], dict] = {}
    for row in cells:
        best = rows.get((row["setting"], row["shots"]))
        if best is None or comparable(row["val_acc_mean"]) > comparable(best["val_acc_mean"]):
            rows[(row["setting"], row["shots"])] = row
    return sorted(
        rows.values(), key=lambda r: (r["shots"], r["setting"] != "scratch", r["setting"])
    )


def markdown_table(result: dict) -> str:
    """The README table: one row per K, one column per setting, mean ± std test accuracy at
    the setting's chosen lr (shown, since it is part of what produced the number); the best
    of each row in bold."""
    settings = [s for s in LABELS if any(r["setting"] == s for r in result["rows"])]
    cells = {(r["shots"], r["setting"]): r for r in result["rows"]}
    lines = [
        "| K | " + " | ".join(LABELS[s] for s in settings) + " |",
        "|---" * (len(settings) + 1) + "|",
    ]
    for shots in sorted({r["shots"] for r in result["rows"]}):
        best = max(cells[shots, s]["test_acc_mean"] for s in settings if (shots, s) in cells)
        row = []
        for setting in settings:
            cell = cells.get((shots, setting))
            if cell is None:
                row.append("—")
                continue
            acc = f"{100 * cell['test_acc_mean']:.1f} ± {100 * cell['test_acc_std']:.1f}"
            acc = f"**{acc}**" if cell["test_acc_mean"] == best else acc
            row.append(f"{acc} (lr {cell['lr']})")
        lines.append(f"| {shots} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def print_table(rows: list[dict]) -> None:
    print(f"\n{'K':>3} {'setting':<16} {'test acc %':>14} {'Δ vs scratch':>13}  note")
    scratch = {r["shots"]: r for r in rows if r["setting"] == "scratch"}
    for r in rows:
        base = scratch.get(r["shots"])
        delta = 100 * (r["test_acc_mean"] - base["test_acc_mean"]) if base else float("nan")
        note = f"lr {r['lr']}"
        print(
            f"{r['shots']:>3} {r['setting']:<16} {100 * r['test_acc_mean']:>7.1f} ± "
            f"{100 * r['test_acc_std']:<4.1f} {delta:>+12.1f}  {note}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shots", default="1,5,20")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--pretrain-extra", nargs="*", default=[], help="e.g. reg=augment")
    parser.add_argument("--extra", nargs="*", default=[], help="for every target-task job")
    parser.add_argument("--sweep-dir", default=None)
    parser.add_argument("--collect-only", action="store_true")
    args = parser.parse_args(argv)
    sweep = Path(args.sweep_dir or OUT / f"transfer_{time.strftime('%Y%m%d_%H%M%S')}")
    started = time.time()
    pretrained = sweep / "pretrain" / "checkpoints" / "best.ckpt"
    if not args.collect_only:
        run_train(
            [
                "experiment=digits_pretrain",
                *args.pretrain_extra,
                *QUIET,
                f"hydra.run.dir={sweep / 'pretrain'}",
            ],
            "pretrain",
        )
        run_all(sweep / "transfer", args.shots, args.seeds, pretrained, args.extra)
    cells = grid(grouped_metrics(sweep / "transfer", job_key))
    rows = summarize(cells)
    print_table(rows)
    payload = {
        "sweep_dir": str(sweep),
        "shots": args.shots,
        "seeds": args.seeds,
        "pretrain_extra": args.pretrain_extra,
        "extra": args.extra,
        "wall_seconds": round(time.time() - started, 1),
        "rows": rows,
        "grid": cells,
    }
    path = write_result("transfer", bench_command("transfer", argv), payload)
    print(f"\nwrote {path} (jobs in {sweep})")


if __name__ == "__main__":
    main()
