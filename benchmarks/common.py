"""Shared by the benchmark scripts: run the real CLI and the seed loop as measured processes,
read multirun jobs back, and write the committed result files the README is rendered from."""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Scratch: run folders, sweeps and checkpoints of benchmark jobs (not committed).
OUT = ROOT / "outputs" / "bench"
# Committed: one JSON per benchmark result; README tables are rendered from these files.
RESULTS = ROOT / "benchmarks" / "results"
QUIET = ["logger=none", "callbacks.progress_bar=null"]


def run_command(command: list[str], label: str) -> str:
    """Run `command` from the repository root and return its stdout; fails loudly."""
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"[{label}] failed:\n{result.stderr[-3000:]}")
    return result.stdout


def run_train(args: list[str], label: str) -> None:
    """`python train.py <args>` from the repository root; fails loudly with its stderr."""
    print(f"[{label}] python train.py {' '.join(args)}", flush=True)
    run_command([sys.executable, str(ROOT / "train.py"), *args], label)


def last_json_line(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def train_with_probe(overrides: list[str], run_dir: Path, warmup: int = 0) -> dict:
    """`python train.py <overrides>` with `benchmarks.probe.BenchProbe` added; its report."""
    probe = run_dir / "probe.json"
    add_probe = [
        "+callbacks.probe._target_=benchmarks.probe.BenchProbe",
        f"+callbacks.probe.out={probe}",
        f"+callbacks.probe.warmup_steps={warmup}",
    ]
    command = [sys.executable, str(ROOT / "train.py"), *overrides, f"hydra.run.dir={run_dir}"]
    run_command([*command, *add_probe], "posttrain")
    return json.loads(probe.read_text())


def seed_loop(root: Path, arch: str, steps: int, warmup: int = 0, pipeline: str = "memory") -> dict:
    """The seed's hand-written loop (`benchmarks.seed_loop`) in a fresh process; its report."""
    command = [sys.executable, "-m", "benchmarks.seed_loop", "--root", str(root), "--arch", arch,
               "--pipeline", pipeline, "--warmup", str(warmup), "--steps", str(steps)]  # fmt: skip
    return last_json_line(run_command(command, f"seed loop ({pipeline})"))


def import_floor(modules: str) -> dict:
    """A fresh process that only imports `modules`: when it was done, and its peak memory."""
    report = (
        "from benchmarks.common import memory_mib; "
        "print(json.dumps({'first_step_wall': time.time(), 'peak_rss_mib': memory_mib()['peak']}))"
    )
    code = f"import json, time; import {modules}; {report}"
    return last_json_line(run_command([sys.executable, "-c", code], f"import {modules}"))


def generated_cifar(folder: Path, train_images: int) -> Path:
    """A CIFAR-10 copy in the real on-disk format with `train_images` training images."""
    from tests.fixtures import write_cifar

    write_cifar(folder, train_per_batch=train_images // 5, test=256)
    return folder


def grouped_metrics(
    sweep_root: Path, key: Callable[[str, dict[str, str]], str]
) -> dict[str, list[dict[str, float]]]:
    """Metrics of completed jobs in every multirun under `sweep_root`, grouped by
    `key(multirun folder name, job overrides)`. Each job's `seed` override, if any, is added
    as `"seed"` so result files can keep the raw per-seed values next to their aggregates."""
    from posttrain.report import collect

    groups: dict[str, list[dict[str, float]]] = {}
    for family in sorted(p for p in sweep_root.iterdir() if p.is_dir()):
        for row in collect(family):
            if row.status == "completed":
                metrics = dict(row.metrics)
                if "seed" in row.overrides:
                    metrics["seed"] = int(row.overrides["seed"])
                groups.setdefault(key(family.name, row.overrides), []).append(metrics)
    return groups


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def comparable(score: float) -> float:
    """A mean of float32 accuracies, rounded to compare as equal what counts the same images
    right: (140 + 142) / 2 and 141 of 143 differ in the 8th digit, and a choice among "equals"
    must not fall to that rounding."""
    return round(score, 6)


def bench_command(module: str, argv: list[str] | None) -> str:
    """The command line that reproduces this run, as the README quotes it: `argv` is what
    `main` received (None when run as `python -m benchmarks.<module>`: then sys.argv)."""
    args = sys.argv[1:] if argv is None else argv
    return shlex.join(["python", "-m", f"benchmarks.{module}", *args])


def machine_note() -> str:
    """Enough about the machine to judge a number later: cores, CPU, GPU, how busy it was."""
    cpu = platform.processor() or platform.machine()
    for line in (
        Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    ):
        if line.startswith("model name"):
            cpu = line.partition(":")[2].strip()
            break
    gpu = "no GPU"
    if Path("/proc/driver/nvidia/gpus").exists():
        gpu = f"{len(list(Path('/proc/driver/nvidia/gpus').iterdir()))} NVIDIA GPU(s)"
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    return (
        f"{os.cpu_count()} CPU cores ({cpu}), {gpu}; load average {load} (1/5/15 min) when "
        f"written; OMP_NUM_THREADS={threads}; Python {platform.python_version()}"
    )


def write_result(
    name: str, command: str, payload: dict, results_dir: str | Path | None = None
) -> Path:
    """Write `benchmarks/results/<name>.json` (or `<results_dir>/<name>.json`: a test's or a
    trial's result that must not replace the committed one). The README's tables are rendered
    from these committed files, so each carries what produced it: command, date, machine,
    commit."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    record = {
        "benchmark": name,
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": machine_note(),
        "git_head": head.stdout.strip() or None,
        **payload,
    }
    folder = RESULTS if results_dir is None else Path(results_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def memory_mib() -> dict[str, float]:
    """Current (VmRSS) and peak (VmHWM) resident memory of this process, in MiB (Linux)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return {"rss": fields["VmRSS"], "peak": fields["VmHWM"]}
