"""The console a person reads: each line once, no tips or FLOPs, one line per epoch off a TTY."""

from __future__ import annotations

import io
import re
from collections import Counter
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary
from omegaconf import OmegaConf

from posttrain.console import (
    BarWithEta,
    EpochLines,
    RunStatement,
    console_flags,
    duration,
    progress_bar,
    tensorboard_logdir,
)
from tests.conftest import run_cli

HANG = 1800  # only catches a hang; not a performance check
EPOCH_LINE = re.compile(r"^epoch (\d+)/2 ")


def repeated_lines(text: str) -> list[str]:
    counts = Counter(line for line in text.splitlines() if line.strip())
    return [line for line, n in counts.items() if n > 1]


def assert_quiet(output: str) -> None:
    assert not repeated_lines(output), repeated_lines(output)
    for noise in ("FLOPs", "litlogger", "Tip:", "GPU available", "LeafSpec"):
        assert noise not in output


def summary_logdir(stdout: str) -> Path:
    match = re.search(r"tensorboard --logdir (\S+)", stdout)
    assert match, stdout
    return Path(match.group(1))


@pytest.mark.slow
def test_train_and_eval_console(tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = run_cli("train.py", "trainer.max_epochs=2", f"hydra.run.dir={run}", timeout=HANG)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert_quiet(out + result.stderr)
    assert "\r" not in out + result.stderr  # no progress bar redrawn into a pipe

    epoch_lines = [line for line in out.splitlines() if EPOCH_LINE.match(line)]
    assert [EPOCH_LINE.match(line).group(1) for line in epoch_lines] == ["1", "2"]
    for line in epoch_lines:
        assert all(key in line for key in ("train/loss", "val/acc", "elapsed", "ETA")), line
    assert "epoch 1/2" in (run / "train.log").read_text()  # the run folder keeps them

    statement = out[out.index("posttrain: train") : out.index("epoch 1/2")]
    for expected in ("data", "digits", "model", "small_cnn", "method", "supervised"):
        assert expected in statement
    for expected in ("regularizers none", "2 epochs", "device", "cpu", str(run)):
        assert re.sub(r" +", " ", expected) in re.sub(r" +", " ", statement)

    assert f"posttrain: run folder   {run}" in out
    assert list(summary_logdir(out).rglob("events.out.tfevents.*"))

    checkpoint = run / "checkpoints" / "best.ckpt"
    evaluated = run_cli(
        "eval.py", f"ckpt_path={checkpoint}", f"hydra.run.dir={tmp_path / 'eval'}", timeout=HANG
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert_quiet(evaluated.stdout + evaluated.stderr)
    assert "\r" not in evaluated.stdout + evaluated.stderr
    assert "Be aware" not in evaluated.stderr
    assert "posttrain: test" in evaluated.stdout
    assert str(checkpoint) in evaluated.stdout
    assert f"posttrain: run folder   {tmp_path / 'eval'}" in evaluated.stdout


@pytest.mark.slow
def test_help_shows_usage_and_examples() -> None:
    result = run_cli("train.py", "--help", timeout=HANG)
    assert result.returncode == 0, result.stderr
    for example in (
        "python train.py model=",
        "experiment=",
        "python train.py -m ",
        "ckpt_path=",
        "python eval.py ckpt_path=",
        "--cfg job",
    ):
        assert example in result.stdout
    assert "reg: " in result.stdout  # the config groups and their options
    assert "_target_" not in result.stdout  # no config dump


def test_tensorboard_line_points_at_events(tmp_path: Path) -> None:
    runs = tmp_path / "outputs"
    inside, outside = runs / "train" / "runs" / "a", tmp_path / "elsewhere"
    for run in (inside, outside):
        (run / "tensorboard").mkdir(parents=True)
        (run / "tensorboard" / "events.out.tfevents.1.host").write_bytes(b"")
    assert tensorboard_logdir(inside, str(runs)) == runs  # compare with the other runs
    assert tensorboard_logdir(outside, str(runs)) == outside
    (tmp_path / "csv_only").mkdir()
    assert tensorboard_logdir(tmp_path / "csv_only", str(tmp_path)) is None


def test_progress_bar_only_on_a_tty(monkeypatch: pytest.MonkeyPatch) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stdout", io.StringIO())
    assert isinstance(progress_bar(), EpochLines)
    monkeypatch.setattr("sys.stdout", Tty())
    assert isinstance(progress_bar(), BarWithEta)


def test_lightning_adds_no_bar_or_summary_of_its_own() -> None:
    checkpoint, statement, bar = ModelCheckpoint(), RunStatement(), EpochLines()
    trainer_cfg = OmegaConf.create({"enable_model_summary": True})
    kept, flags = console_flags(trainer_cfg, [checkpoint])  # callbacks.progress_bar=null
    assert kept == [checkpoint]
    assert flags == {"enable_progress_bar": False, "enable_model_summary": False}
    kept, flags = console_flags(trainer_cfg, [checkpoint, statement, bar])
    assert kept == [checkpoint, statement, bar] and flags["enable_progress_bar"]
    off = OmegaConf.create({"enable_model_summary": False, "enable_progress_bar": False})
    kept, flags = console_flags(off, [checkpoint, statement, bar])
    assert kept == [checkpoint] and not any(isinstance(c, ModelSummary) for c in kept)


def test_durations_read_naturally() -> None:
    assert [duration(s) for s in (0.4, 42, 185, 7620)] == ["0s", "42s", "3m05s", "2h07m"]
