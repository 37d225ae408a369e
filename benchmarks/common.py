"""Shared by the benchmark scripts: run the real CLI and the seed loop as measured processes,
read multirun jobs back."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "outputs" / "bench"
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
    `key(multirun folder name, job overrides)`."""
    from posttrain.report import collect

    groups: dict[str, list[dict[str, float]]] = {}
    for family in sorted(p for p in sweep_root.iterdir() if p.is_dir()):
        for row in collect(family):
            if row.status == "completed":
                groups.setdefault(key(family.name, row.overrides), []).append(row.metrics)
    return groups


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def write_result(name: str, payload: dict) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def memory_mib() -> dict[str, float]:
    """Current (VmRSS) and peak (VmHWM) resident memory of this process, in MiB (Linux)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return {"rss": fields["VmRSS"], "peak": fields["VmHWM"]}
