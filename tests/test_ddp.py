"""What DDP runs compute: every evaluation item counted once, each rank its own randomness.

Two processes on CPU (gloo), through the real CLI. Each run costs ~10-20 s, so each test
checks several things of one run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from tests.conftest import read_metrics, run_cli

DDP = ("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "logger=none")
QUIET = "callbacks.progress_bar=null"
DRAWS = "+callbacks.draws._target_=tests.test_ddp.FirstDraws"


class FirstDraws(Callback):
    """Writes `draws-rank<r>.json`: the next draws of the global generator and the sum of
    the first training batch's images, as each rank's first training step meets them."""

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, index: int) -> None:
        if index != 0 or trainer.current_epoch != 0:
            return
        state = torch.get_rng_state()
        draws = torch.rand(4).tolist()
        torch.set_rng_state(state)  # peeked, not taken: the run draws what it would have
        report = {"draws": draws, "batch_sum": float(batch[0].double().sum())}
        folder = Path(trainer.default_root_dir)
        (folder / f"draws-rank{trainer.global_rank}.json").write_text(json.dumps(report))


def read_draws(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(run_dir.glob("draws-rank*.json"))]


@pytest.mark.slow
def test_ddp_scores_each_image_once_calibrates_them_and_augments_per_rank(tmp_path: Path) -> None:
    """Observed under DDP: test/acc over 360 images (the split has 359: Lightning's sampler
    padded it), calibration over other images than the test (test/acc 0.1528, test/acc_
    calibrated 0.1504), eval.py alike, and both ranks flipping and shifting alike."""
    run_dir = tmp_path / "run"
    trained = run_cli(
        "train.py",
        *DDP,
        QUIET,
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "reg=augment",
        "calibration=temperature",
        DRAWS,
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    metrics = read_metrics(run_dir)
    assert metrics["status"] == "completed"
    assert metrics["test/acc"] == pytest.approx(metrics["test/acc_calibrated"], abs=1e-6)
    assert metrics["test/loss"] == pytest.approx(metrics["test/nll"], abs=1e-5)
    assert metrics["test/images"] == 359  # the split's size: none left out, none twice
    ranks = read_draws(run_dir)
    assert len(ranks) == 2 and ranks[0]["draws"] != ranks[1]["draws"]

    eval_dir = tmp_path / "eval"
    evaluated = run_cli(
        "eval.py",
        *DDP,
        QUIET,
        f"ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}",
        f"hydra.run.dir={eval_dir}",
        cwd=tmp_path,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    again = read_metrics(eval_dir)
    assert again["test/images"] == 359
    assert again["test/acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)


@pytest.mark.slow
def test_ddp_protonet_trains_each_rank_on_its_own_episodes_and_tests_each_once(
    tmp_path: Path,
) -> None:
    """Observed under DDP: ProtoNet stopped at its first step (its unused head got no
    gradient), every rank drew the same training episodes, and `data.test_episodes=9`
    was scored as 10 episodes."""
    run_dir = tmp_path / "run"
    result = run_cli(
        "train.py",
        *DDP,
        QUIET,
        "experiment=digits_protonet",
        "trainer.max_epochs=1",
        "data.train_episodes=16",  # 2 steps per rank: DDP checks unused parameters at the 2nd
        "data.val_episodes=3",
        "data.test_episodes=9",
        DRAWS,
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(run_dir)
    assert metrics["status"] == "completed" and metrics["test/episodes"] == 9
    ranks = read_draws(run_dir)
    assert len(ranks) == 2 and ranks[0]["batch_sum"] != ranks[1]["batch_sum"]


@pytest.mark.slow
def test_ddp_distillation_measures_the_teacher_on_the_whole_validation_split(
    tmp_path: Path,
) -> None:
    """Observed under DDP: `teacher/val_acc` 0.9861, the teacher's accuracy on rank 0's 72
    validation images, where the split's 143 give 0.9930 (and each rank logged its own)."""
    teacher_dir, run_dir = tmp_path / "teacher", tmp_path / "run"
    teacher = run_cli(
        "train.py",
        "logger=none",
        QUIET,
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=12",  # a teacher with mistakes: shares score differently
        f"hydra.run.dir={teacher_dir}",
        cwd=tmp_path,
    )
    assert teacher.returncode == 0, teacher.stderr[-3000:]
    student = run_cli(
        "train.py",
        *DDP,
        QUIET,
        "method=distill",
        f"method.teacher={teacher_dir / 'checkpoints' / 'best.ckpt'}",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert student.returncode == 0, student.stderr[-3000:]
    measured, own_run = read_metrics(run_dir), read_metrics(teacher_dir)
    assert 0.2 < own_run["val/acc_best"] < 0.95
    # the teacher's own run validated the same 143 images in one process
    assert measured["teacher/val_acc_own_input"] == pytest.approx(own_run["val/acc_best"])
    assert measured["teacher/val_acc"] == pytest.approx(own_run["val/acc_best"])
