"""Start-up: from `python train.py` to the first training step, and the commands that must
not pay for torch at all.

Each round runs, in rotating order, fresh processes:

- import floors: launch -> `import torch, torchvision` done (what the seed pays before its
  first line of work), and with `lightning` too (what any Lightning script pays);
- `seed`: the seed's hand-written loop (`benchmarks.seed_loop`, small CNN, the generated
  CIFAR-10 read as the seed does) until its first step starts;
- `posttrain`: `python train.py` on the same model and data until its first step starts
  (config composition, run folder, logger, DataModule set-up, sanity validation included);
- `posttrain (default digits)`: plain `python train.py`, what `make train` runs;
- `--help` and `--cfg job`: complete, and checked with `-X importtime` not to import torch.

Times are launch -> first step (wall clock, same machine). Prints medians and ratios, writes
benchmarks/results/startup.json.

    python -m benchmarks.startup [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import (
    ROOT,
    bench_command,
    generated_cifar,
    import_floor,
    run_command,
    seed_loop,
    train_with_probe,
    write_result,
)

TRAIN = [sys.executable, str(ROOT / "train.py")]


def wall_seconds(command: list[str]) -> float:
    start = time.time()
    run_command(command, " ".join(command[1:]))
    return time.time() - start


def seconds_to_first_step(launch: Callable[[], dict]) -> float:
    """Launch -> first training step (`first_step_wall` in the process's report)."""
    start = time.time()
    return launch()["first_step_wall"] - start


def imported_modules(importtime_report: str) -> set[str]:
    """Module names in a `python -X importtime` report (stderr)."""
    return {line.split("|")[-1].strip() for line in importtime_report.splitlines() if "|" in line}


def imports_torch(args: list[str]) -> bool:
    """Whether `python train.py <args>` imports torch (per `-X importtime`)."""
    command = [sys.executable, "-X", "importtime", str(ROOT / "train.py"), *args]
    result = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True)
    return "torch" in imported_modules(result.stderr)


def one_step(run_dir: Path, data: Path | None) -> dict:
    """One training step of `python train.py` (on `data` if given, else the default)."""
    cifar = [f"data.root={data}", "data=cifar10", "data.download=false"] if data else []
    return train_with_probe(
        [*cifar, "trainer.max_steps=1", "trainer.limit_test_batches=1"], run_dir
    )


def measurements(data: Path, work: Path) -> dict[str, Callable[[], float]]:
    return {
        "import torch, torchvision": lambda: seconds_to_first_step(
            lambda: import_floor("torch, torchvision")
        ),
        "... + lightning": lambda: seconds_to_first_step(
            lambda: import_floor("torch, torchvision, lightning")
        ),
        "seed": lambda: seconds_to_first_step(lambda: seed_loop(data, "small_cnn", steps=1)),
        "posttrain": lambda: seconds_to_first_step(lambda: one_step(work / "cifar", data)),
        "posttrain (default digits)": lambda: seconds_to_first_step(
            lambda: one_step(work / "digits", None)
        ),
        "train.py --help": lambda: wall_seconds([*TRAIN, "--help"]),
        "train.py --cfg job": lambda: wall_seconds([*TRAIN, "--cfg", "job"]),
    }


def markdown_table(result: dict) -> str:
    """The README table: median seconds from launch to ready per process, as a multiple of
    the `import torch, torchvision, lightning` floor; whether `--help`/`--cfg` import torch."""
    lines = ["| process | seconds (median) | × Lightning import |", "|---|---|---|"]
    for name, value in result["median_seconds"].items():
        ratio = result["ratio_to_lightning_import"][name]
        imports = result["imports_torch"].get(name)
        note = "" if imports is None else f" (imports torch: {'yes' if imports else 'no'})"
        lines.append(f"| {name}{note} | {value:.2f} | {ratio:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    rounds: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        data = generated_cifar(Path(tmp) / "data", train_images=10_000)
        timers = measurements(data, Path(tmp))
        for index in range(args.rounds):
            names = list(timers)[index % len(timers) :] + list(timers)[: index % len(timers)]
            rounds.append({name: timers[name]() for name in names})
            print(
                f"round {index + 1}: " + ", ".join(f"{k} {v:.2f}s" for k, v in rounds[-1].items())
            )
    median = {name: statistics.median(r[name] for r in rounds) for name in rounds[0]}
    floor = median["... + lightning"]
    torch_imported = {cmd: imports_torch(cmd.split()[1:]) for cmd in median if "--" in cmd}
    print(f"\n{'launch -> ready (median)':<28} {'seconds':>8} {'x lightning floor':>18}")
    for name, value in median.items():
        note = (
            f"  imports torch: {'yes' if torch_imported[name] else 'no'}"
            if name in torch_imported
            else ""
        )
        print(f"{name:<28} {value:8.2f} {value / floor:18.2f}{note}")
    ratio = median["posttrain"] / median["seed"]
    print(f"posttrain / seed, time to first step: {ratio:.2f}x")
    print(f"posttrain's own set-up beyond the imports: {median['posttrain'] - floor:.2f}s")
    payload = {
        "rounds": rounds,
        "median_seconds": median,
        "ratio_to_lightning_import": {k: v / floor for k, v in median.items()},
        "posttrain_over_seed_first_step": ratio,
        "imports_torch": torch_imported,
    }
    print(f"\nwrote {write_result('startup', bench_command('startup', argv), payload)}")


if __name__ == "__main__":
    main()
