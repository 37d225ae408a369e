"""Memory: peak resident memory of the default run, and no growth from epoch to epoch.

Peaks (VmHWM) side by side: the import floor (`import torch, torchvision, lightning`), the
seed's hand-written loop and `python train.py` on the same generated CIFAR-10, small CNN,
batch 32 and step count, and plain `python train.py` (what `make train` runs: digits, small
CNN, 30 epochs). `benchmarks.probe.BenchProbe` also reads VmRSS after every epoch of the
default run: the growth from epoch 2 (after first-epoch allocations) to the last is printed.
Writes benchmarks/results/memory.json.

    python -m benchmarks.memory [--epochs 30]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.common import (
    bench_command,
    generated_cifar,
    import_floor,
    seed_loop,
    train_with_probe,
    write_result,
)


def markdown_table(result: dict) -> str:
    """The README table: peak resident memory per process as a multiple of the import
    floor, and the default run's growth across epochs (a leak would show there)."""
    peaks = result["peak_mib"]
    floor = peaks["import floor"]
    lines = ["| process | peak MiB | × import floor |", "|---|---|---|"]
    lines += [f"| {name} | {value:,.0f} | {value / floor:.2f} |" for name, value in peaks.items()]
    rss = result["default_epoch_rss_mib"]
    return "\n".join(
        [
            *lines,
            "",
            f"posttrain / seed loop, same model, data and steps: "
            f"{result['posttrain_over_seed']:.2f}×. Default run, resident memory after epoch 2 "
            f"and after epoch {len(rss)}: {rss[1]:.0f} → {rss[-1]:.0f} MiB "
            f"({result['default_growth_epoch2_to_last_mib']:+.1f} MiB).",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data = generated_cifar(Path(tmp) / "data", train_images=10_000)
        same_as_seed = [
            "data=cifar10", f"data.root={data}", "data.download=false", "data.batch_size=32",
            "model=small_cnn", f"trainer.max_steps={args.steps}", "trainer.limit_val_batches=2",
            "trainer.limit_test_batches=2",
        ]  # fmt: skip
        peaks = {
            "import floor": import_floor("torch, torchvision, lightning")["peak_rss_mib"],
            "seed loop (CIFAR, small CNN)": seed_loop(data, "small_cnn", args.steps)[
                "peak_rss_mib"
            ],
            "posttrain (CIFAR, small CNN)": train_with_probe(same_as_seed, Path(tmp) / "cifar")[
                "peak_rss_mib"
            ],
        }
        default = train_with_probe([f"trainer.max_epochs={args.epochs}"], Path(tmp) / "digits")
    peaks["posttrain default (digits)"] = default["peak_rss_mib"]
    rss = default["epoch_rss_mib"]
    growth = rss[-1] - rss[1]
    ratio = peaks["posttrain (CIFAR, small CNN)"] / peaks["seed loop (CIFAR, small CNN)"]
    print(f"{'peak resident memory':<32} {'MiB':>7} {'x import floor':>15}")
    for name, value in peaks.items():
        print(f"{name:<32} {value:7.0f} {value / peaks['import floor']:15.2f}")
    print(f"posttrain / seed loop, same model, data and steps: {ratio:.2f}x")
    print(f"default run, RSS after epoch 2 -> epoch {len(rss)}: {rss[1]:.0f} -> {rss[-1]:.0f} MiB "
          f"({growth:+.1f} MiB, {100 * growth / rss[1]:+.1f}%)")  # fmt: skip
    payload = {
        "peak_mib": peaks,
        "posttrain_over_seed": ratio,
        "default_epoch_rss_mib": rss,
        "default_growth_epoch2_to_last_mib": growth,
    }
    print(f"\nwrote {write_result('memory', bench_command('memory', argv), payload)}")


if __name__ == "__main__":
    main()
