"""The real CLI in a subprocess: accuracy floor, TensorBoard contents, resume, eval, errors."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from tests.conftest import read_metrics, run_cli
from tests.fixtures import write_malicious_checkpoint, write_malicious_pickle

pytestmark = pytest.mark.slow


def epoch_loss(metrics: dict) -> float:
    """The epoch training loss: `train/loss` (design rule 4), `train/loss_epoch` before it."""
    return metrics["train/loss"] if "train/loss" in metrics else metrics["train/loss_epoch"]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`python train.py` with nothing but a run folder: the embedded default."""
    run_dir = tmp_path_factory.mktemp("default") / "run"
    result = run_cli("train.py", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"run folder   {run_dir}" in result.stdout
    assert "tensorboard --logdir" in result.stdout
    return run_dir


def test_default_run_beats_the_accuracy_floor(default_run: Path) -> None:
    metrics = read_metrics(default_run)
    assert metrics["status"] == "completed"
    assert metrics["test/acc"] >= 0.98, metrics
    best = f"best.ckpt: the epoch with the best val/acc ({metrics['val/acc_best']:.4f})"
    assert metrics["tested"] == best


def test_run_folder_is_self_describing(default_run: Path) -> None:
    assert (default_run / ".hydra" / "config.yaml").is_file()
    assert (default_run / "checkpoints" / "best.ckpt").is_file()
    assert (default_run / "checkpoints" / "last.ckpt").is_file()
    checkpoint = torch.load(default_run / "checkpoints" / "best.ckpt", weights_only=True)
    assert checkpoint["posttrain_config"]["data"]["dataset"] == "digits"


def test_tensorboard_events_hold_the_expected_tags(default_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(default_run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    expected = {
        "train/loss_step",
        "train/acc",
        "val/acc",
        "val/acc_best",
        "val/acc_gap",
        "val/f1_macro",
        "val/ece",
        "test/acc",
        "test/f1_macro",
        "test/ece",
    }
    assert expected <= scalars, expected - scalars
    assert "train/loss" in scalars, "no epoch training loss"
    assert any(tag.startswith("lr-") for tag in scalars)
    assert "test/confusion_matrix" in events.Tags()["images"]
    hparams = events.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in hparams
    start_info = hparams["_hparams_/session_start_info"].decode("latin1")
    assert "optimizer.lr" in start_info and "model.arch" in start_info
    # Each run writes its session only; TensorBoard unites them (see tests/test_hparams.py).
    assert "_hparams_/session_end_info" in hparams
    assert len(events.Scalars("val/acc")) == 30  # one point per epoch


def test_eval_reproduces_the_test_metrics(default_run: Path, tmp_path: Path) -> None:
    result = run_cli(
        "eval.py",
        f"ckpt_path={default_run / 'checkpoints' / 'best.ckpt'}",
        f"hydra.run.dir={tmp_path / 'eval'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = read_metrics(tmp_path / "eval")
    assert evaluated["test/acc"] == pytest.approx(read_metrics(default_run)["test/acc"], abs=1e-6)


SHORT = ["trainer.max_epochs=2", "logger=csv", "callbacks.progress_bar=null"]


def test_resume_continues_from_last_checkpoint(tmp_path: Path) -> None:
    """The real CLI continues from last.ckpt (a few batches an epoch: counting is the point)."""
    first = tmp_path / "first"
    assert run_cli("train.py", *SHORT, "debug=limit", f"hydra.run.dir={first}").returncode == 0
    steps_per_epoch = read_metrics(first)["global_step"] / 2
    resumed = tmp_path / "resumed"
    result = run_cli(
        "train.py",
        *SHORT,
        "debug=limit",
        "trainer.max_epochs=4",
        f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}",
        f"hydra.run.dir={resumed}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_metrics(resumed)["global_step"] == 4 * steps_per_epoch
    with (resumed / "csv" / "metrics.csv").open() as handle:
        epochs = [int(row["epoch"]) for row in csv.DictReader(handle) if row.get("epoch")]
    assert epochs and min(epochs) == 2  # continued at epoch 2: no epoch 0 or 1 again


def test_same_seed_same_metrics(tmp_path: Path) -> None:
    """Across processes: a few batches show it as well as whole epochs would."""
    runs = [tmp_path / name for name in ("a", "b", "c")]
    for run_dir, seed in zip(runs, (7, 7, 8), strict=True):
        limited = [*SHORT, "debug=limit", f"seed={seed}", f"hydra.run.dir={run_dir}"]
        result = run_cli("train.py", *limited)
        assert result.returncode == 0, result.stderr[-3000:]
    a, b, c = (read_metrics(run_dir) for run_dir in runs)
    assert a["test/loss"] == b["test/loss"] and epoch_loss(a) == epoch_loss(b)
    assert epoch_loss(a) != epoch_loss(c)


def test_multirun_honours_sweep_dir(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = run_cli(
        "train.py", "-m", "seed=0,1", "debug=fast", "logger=none", f"hydra.sweep.dir={sweep}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(sweep.glob("*_*seed=*"))
    assert [job.name.split("_")[0] for job in jobs] == ["0", "1"]
    for job in jobs:
        assert read_metrics(job)["status"] == "completed"


def assert_clear_error(result, *fragments: str) -> None:
    """Non-zero exit, a readable message naming the key, and no traceback."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr[-3000:]


def test_unknown_group_option_lists_choices(tmp_path: Path) -> None:
    result = run_cli("train.py", "model=vgg_nonexistent", f"hydra.run.dir={tmp_path}")
    assert_clear_error(result, "model/vgg_nonexistent", "small_cnn", "resnet18")


def test_missing_data_root_names_the_key(tmp_path: Path) -> None:
    result = run_cli("train.py", "data=imagefolder", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2
    assert_clear_error(result, "`data.root`", "one sub-folder")
    assert read_metrics(tmp_path)["status"] == "failed"


def test_non_positive_size_names_the_key(tmp_path: Path) -> None:
    result = run_cli("train.py", "data.batch_size=-4", f"hydra.run.dir={tmp_path}")
    assert_clear_error(result, "`data.batch_size`", "a whole number >= 1")


def test_unreadable_checkpoint_names_the_key(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"this is not a checkpoint")
    result = run_cli("eval.py", f"ckpt_path={garbage}", f"hydra.run.dir={tmp_path / 'e'}")
    assert_clear_error(result, "`ckpt_path`", "garbage.ckpt", "not a PyTorch checkpoint at all")
    result = run_cli(
        "train.py", f"ckpt_path={tmp_path / 'missing.ckpt'}", f"hydra.run.dir={tmp_path / 't'}"
    )
    assert_clear_error(result, "`ckpt_path`", "does not exist")


@pytest.mark.parametrize("writer", [write_malicious_checkpoint, write_malicious_pickle])
def test_checkpoint_that_runs_code_is_refused(tmp_path: Path, writer) -> None:
    evil = writer(tmp_path / "evil.ckpt")
    result = run_cli("eval.py", f"ckpt_path={evil}", f"hydra.run.dir={tmp_path / 'e'}")
    assert_clear_error(result, "`ckpt_path`", "refused")
    assert "pwned" not in result.stdout


def test_failing_sweep_job_is_recorded_and_the_sweep_goes_on(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = run_cli(
        "train.py",
        "-m",
        "data.batch_size=8,-1",
        "debug=fast",
        "logger=none",
        f"hydra.sweep.dir={sweep}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (completed,) = sweep.glob("0_*")
    (failed_job,) = sweep.glob("1_*")
    assert read_metrics(completed)["status"] == "completed"
    failed = read_metrics(failed_job)
    assert failed["status"] == "failed" and "data.batch_size" in failed["error"]
