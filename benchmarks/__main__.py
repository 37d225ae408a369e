"""`python -m benchmarks [name ...]`: run the named benchmarks (default: all)."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = (
    "default_run",
    "overhead",
    "pipeline",
    "startup",
    "memory",
    "maml_speed",
    "fewshot",
    "regularization",
    "transfer",
    "multitask",
    "decode_cache",
    "soup",
    "distill",
    "averaging",
    "calibration",
    "tta",
)


def main(names: list[str]) -> None:
    for name in names or BENCHMARKS:
        if name not in BENCHMARKS:
            raise SystemExit(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
        importlib.import_module(f"benchmarks.{name}").main([])


if __name__ == "__main__":
    main(sys.argv[1:])
