"""Measurements taken inside a `python train.py` run, written as JSON when training ends.

Added to any run from the command line, so the benchmarks time the real CLI:

    python train.py +callbacks.probe._target_=benchmarks.probe.BenchProbe \
        +callbacks.probe.out=probe.json +callbacks.probe.warmup_steps=5

Records the wall clock of the first training step (start-up time), the duration of the
training steps after `warmup_steps` (the same window `benchmarks.seed_loop` times: each step
with its batch fetch), and the resident memory after every epoch plus the peak.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from benchmarks.common import memory_mib


def batch_size_of(batch: Any) -> int:
    images = batch[0] if isinstance(batch, list | tuple) else batch
    return len(images)


class BenchProbe(Callback):
    """Times the training steps after `warmup_steps` and follows memory across epochs."""

    def __init__(self, out: str, warmup_steps: int = 5) -> None:
        self.out, self.warmup_steps = Path(out), warmup_steps
        self.first_step_wall: float | None = None
        self.window_start: float | None = None
        self.window_end: float | None = None
        self.timed_steps = self.timed_images = 0
        self.epoch_rss: list[float] = []

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if self.first_step_wall is None:
            self.first_step_wall = time.time()

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, *args: Any
    ) -> None:
        now = time.perf_counter()
        if trainer.global_step == self.warmup_steps:
            self.window_start = now
        elif trainer.global_step > self.warmup_steps and self.window_start is not None:
            self.window_end = now
            self.timed_steps += 1
            self.timed_images += batch_size_of(batch)

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.epoch_rss.append(memory_mib()["rss"])

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        window = (self.window_end or 0.0) - (self.window_start or 0.0)
        result = {
            "first_step_wall": self.first_step_wall,
            "timed_steps": self.timed_steps,
            "timed_images": self.timed_images,
            "seconds": window,
            "images_per_s": self.timed_images / window if window > 0 else None,
            "epoch_rss_mib": self.epoch_rss,
            "peak_rss_mib": memory_mib()["peak"],
        }
        self.out.write_text(json.dumps(result, indent=2) + "\n")
