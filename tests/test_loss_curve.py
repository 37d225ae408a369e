"""A pinned loss curve: the first optimizer steps of the default run, step by step.

`python train.py` (digits, small CNN, AdamW with a one-epoch warm-up, seed 0) is run for
its first epoch, and the training loss of each of the first `STEPS` optimizer steps is
compared with the values in `tests/data/loss_curve.json` (relative tolerance `RTOL`). Any
silent change to the training maths (initialization, data split or order, preprocessing,
loss, optimizer, learning-rate schedule, regularizers on by default) moves these numbers:
a 1% learning-rate change fails at the second step, `weight_decay=1e-4` by step 9.

`trainer.max_epochs=1` only shortens the run: the warm-up is one epoch long either way, so
the first epoch's learning rates are the default run's. Torch runs on one thread here,
because the number of threads changes the order of float sums (2 threads vs 1 differ by
~1e-6 from step 6, ~3e-3 by step 20); on one thread, repeated runs are bitwise equal.

Re-pin after an *intentional* change (and say why in the commit message):

    .venv/bin/python -m tests.test_loss_curve    # rewrites tests/data/loss_curve.json

A different CPU (vector instruction set) or torch version may also shift the late steps
slightly; re-pin there only after checking that the first steps still agree.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from tests.conftest import add_callbacks, compose_config

PINNED = Path(__file__).parent / "data" / "loss_curve.json"
STEPS = 20
RTOL = 1e-4
OVERRIDES = ["trainer.max_epochs=1", "logger=none", "callbacks.progress_bar=null"]


class StepLosses(Callback):
    """The training loss each optimizer step returned (what was back-propagated)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def first_losses(output_dir: Path, monkeypatch: pytest.MonkeyPatch) -> list[float]:
    from posttrain.train import train

    recorder = StepLosses()
    add_callbacks(monkeypatch, recorder)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(compose_config(output_dir, OVERRIDES))
    finally:
        torch.set_num_threads(threads)
    return recorder.losses[:STEPS]


def test_default_run_follows_the_pinned_loss_curve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pinned = json.loads(PINNED.read_text())["losses"]
    losses = first_losses(tmp_path / "run", monkeypatch)
    assert len(losses) == len(pinned) == STEPS
    torch.testing.assert_close(
        torch.tensor(losses, dtype=torch.float64),
        torch.tensor(pinned, dtype=torch.float64),
        rtol=RTOL,
        atol=0.0,
        msg=lambda detail: f"{detail}\nlosses now: {losses}\nRe-pin only if intended (see top).",
    )


def repin() -> None:
    """Run the curve twice, check that the runs agree exactly, write the pinned file."""
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as monkeypatch:
        runs = [first_losses(Path(tmp) / name, monkeypatch) for name in ("a", "b")]
    if runs[0] != runs[1]:
        raise SystemExit(f"two runs differ, not pinning:\n{runs[0]}\n{runs[1]}")
    payload = {
        "about": "train loss of the first optimizer steps of `python train.py` (seed 0), "
        "one torch thread; re-pin with `python -m tests.test_loss_curve`",
        "overrides": OVERRIDES,
        "torch": torch.__version__,
        "losses": runs[0],
    }
    PINNED.parent.mkdir(parents=True, exist_ok=True)
    PINNED.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"pinned {len(runs[0])} steps in {PINNED}")


if __name__ == "__main__":
    repin()
