"""Interrupted work resumes exactly: a run stopped between epochs and resumed from its
`last.ckpt` ends with the metrics of the uninterrupted run (bitwise on CPU), for every
method family; checkpoints are written atomically; unreadable files are named for what
they are."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from posttrain.checkpoints import load_checkpoint, remove_partial_files, write_atomically
from posttrain.errors import PosttrainError
from posttrain.runs import guarded
from posttrain.train import train
from tests.conftest import compose_config

SMALL = ["logger=none", "trainer.accelerator=cpu", "trainer.devices=1", "debug=limit"]
METHODS = {
    "supervised": ["reg=[augment,dropout]", "model.width=8", "trainer.max_epochs=3"],
    "maml": ["experiment=digits_maml", "model.hidden=8", "data.image_size=16", "data.queries=3"],
    "protonet": ["experiment=digits_protonet", "model.hidden=8", "data.image_size=16"],
    "multitask": ["experiment=digits_multitask", "method.weighting=dwa", "model.width=8"],
}


class Interrupted(Exception):
    """Stands in for a kill: the process is gone, only the files it wrote remain."""


class InterruptAtEpoch(Callback):
    """Dies when epoch `epoch` starts, after the previous epoch's checkpoints were written."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            raise Interrupted


class InterruptMidEpoch(Callback):
    """Dies after the second step of epoch `epoch`, when that epoch has logged some steps."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == 1:
            raise Interrupted


class SignalAtEpoch(Callback):
    """Sends SIGTERM to its own process when epoch `epoch` starts, as a scheduler would."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGTERM)


def run(folder: Path, overrides: list[str]) -> dict[str, float]:
    torch.set_num_threads(1)  # one thread: reductions in one order, bitwise comparable
    train(compose_config(folder, overrides))
    return json.loads((folder / "metrics.json").read_text())


def whole_cut_and_resumed(tmp_path: Path, overrides: list[str]) -> tuple[dict, dict, dict]:
    """The metrics of a run left alone and of the same run killed when epoch 2 starts, then
    resumed from its `last.ckpt`; and that checkpoint's contents."""
    uninterrupted = run(tmp_path / "whole", overrides)
    interrupt = [
        "+callbacks.interrupt._target_=tests.test_resume.InterruptAtEpoch",
        "+callbacks.interrupt.epoch=2",
    ]
    with pytest.raises(Interrupted):
        run(tmp_path / "cut", [*overrides, *interrupt])
    last = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    resumed = run(tmp_path / "resumed", [*overrides, f"ckpt_path={last}"])
    return uninterrupted, resumed, load_checkpoint(last, key="ckpt_path")


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_resume_after_an_interruption_matches_the_uninterrupted_run(
    method: str, tmp_path: Path
) -> None:
    overrides = [*SMALL, *METHODS[method], "trainer.max_epochs=3"]
    uninterrupted, resumed, last = whole_cut_and_resumed(tmp_path, overrides)
    assert last["epoch"] == 1  # the last completed epoch
    assert resumed == uninterrupted


# Features whose resumed run differed from the uninterrupted one, each with what did.
FEATURES = {
    # Lightning resumes every checkpoint of a `max_steps` run as if written mid-epoch: it
    # replayed the finished epoch's end on no batches (`ValueError: No samples to concatenate`).
    "max_steps": ["model.width=8", "trainer.max_epochs=-1", "trainer.max_steps=14"],
    # Persistent loader workers: the resumed run's first iterator drew the workers' base seed
    # from the batch-order generator a second time, so every later batch order differed.
    "num_workers": ["model.width=8", "trainer.max_epochs=4", "data.num_workers=1", "reg=augment"],
}


@pytest.mark.parametrize("feature", list(FEATURES))
def test_resume_of_a_feature_matches_the_uninterrupted_run(feature: str, tmp_path: Path) -> None:
    uninterrupted, resumed, _ = whole_cut_and_resumed(tmp_path, [*SMALL, *FEATURES[feature]])
    assert resumed == uninterrupted


def test_resume_may_change_the_number_of_loader_workers(tmp_path: Path) -> None:
    """`data.num_workers` is a resumable key: it must not change which batches are drawn."""
    overrides = [*SMALL, "model.width=8", "trainer.max_epochs=4", "reg=[augment,dropout]"]
    uninterrupted, _, _ = whole_cut_and_resumed(tmp_path, overrides)
    last = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    resumed = run(tmp_path / "workers", [*overrides, f"ckpt_path={last}", "data.num_workers=2"])
    assert resumed == uninterrupted


def test_last_checkpoint_is_the_last_epoch_even_when_best_did_not_improve(tmp_path: Path) -> None:
    """Observed: `last.ckpt` was written only when `best.ckpt` improved (epoch 5 of 10)."""
    overrides = [*SMALL, "model.width=4", "trainer.max_epochs=4", "optimizer.lr=1e-9"]
    run(tmp_path / "run", overrides)  # lr ~0: val/acc never improves after epoch 0
    checkpoints = tmp_path / "run" / "checkpoints"
    assert load_checkpoint(checkpoints / "last.ckpt", key="ckpt_path")["epoch"] == 3
    assert load_checkpoint(checkpoints / "best.ckpt", key="ckpt_path")["epoch"] == 0


@pytest.mark.parametrize(
    "sparse_validation", ["trainer.check_val_every_n_epoch=2", "+trainer.val_check_interval=0.5"]
)
def test_last_checkpoint_is_every_epoch_end_when_validation_is_not(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sparse_validation: str
) -> None:
    """Observed: with validation every 2nd epoch, `last.ckpt` was saved at validation end,
    before the epoch-end hooks, so a run stopped in epoch 3 had a `last.ckpt` of epoch 1 whose
    epoch counter said 1 (the message said 2 completed) and resuming it raised `ValueError: No
    samples to concatenate`; with `val_check_interval<1` it held a half epoch."""
    overrides = [*SMALL, "model.width=4", "trainer.max_epochs=4", sparse_validation]
    stop = ["+callbacks.stop._target_=tests.test_resume.SignalAtEpoch", "+callbacks.stop.epoch=2"]
    cut = tmp_path / "cut"
    with pytest.raises(SystemExit):
        guarded(train, compose_config(cut, [*overrides, *stop]))
    record = json.loads((cut / "metrics.json").read_text())
    last = load_checkpoint(cut / "checkpoints" / "last.ckpt", key="ckpt_path")
    assert (
        record["epochs_completed"] == 2 and last["callbacks"]["CompletedEpochs"]["completed"] == 2
    )
    assert last["epoch"] == 1 and "after 2 completed epoch(s)" in capsys.readouterr().err
    resumed = run(cut, [*overrides, "ckpt_path=last"])  # in place, as the message advises
    assert resumed == run(tmp_path / "whole", overrides)


@pytest.mark.parametrize(
    "cadence", ["trainer.check_val_every_n_epoch=2", "+trainer.val_check_interval=0.5"]
)
def test_validation_cadence_does_not_move_the_training(tmp_path: Path, cadence: str) -> None:
    """Observed: each validation drew its loader's worker seed from the global generator that
    dropout and augmentation draw from, so validating every 2nd epoch (a change a resume
    accepts) ended with other weights and `train/loss` 2.2797 against 2.2809."""
    overrides = [*SMALL, "model.width=4", "trainer.max_epochs=3", "reg=[augment,dropout]"]
    every, sparse = (
        run(tmp_path / "every", overrides),
        run(tmp_path / "sparse", [*overrides, cadence]),
    )
    trained = [key for key in every if key.startswith("train/")]
    assert trained and {k: every[k] for k in trained} == {k: sparse[k] for k in trained}
    weights = [
        load_checkpoint(tmp_path / run_dir / "checkpoints" / "last.ckpt", key="ckpt_path")
        for run_dir in ("every", "sparse")
    ]
    for name, tensor in weights[0]["state_dict"].items():
        assert torch.equal(tensor, weights[1]["state_dict"][name]), name


class SignalWhenTesting(Callback):
    """Sends SIGTERM to its own process when the test after training starts."""

    def on_test_start(self, trainer, pl_module) -> None:
        os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize(
    ("extra", "stop"),
    [
        ([], ["+callbacks.stop._target_=tests.test_resume.SignalWhenTesting"]),
        (
            ["trainer.check_val_every_n_epoch=2"],
            ["+callbacks.stop._target_=tests.test_resume.SignalAtEpoch", "+callbacks.stop.epoch=2"],
        ),
    ],
    ids=["signal_during_the_test", "no_validation_after_the_resume"],
)
def test_a_resume_records_the_epoch_metrics_it_did_not_compute_again(
    tmp_path: Path, extra: list[str], stop: list[str]
) -> None:
    """Observed: a run stopped while testing after its last epoch, resumed with the advised
    `ckpt_path=last`, trained nothing more and recorded `completed` without any `train/*`,
    `val/*` or `val/acc_best` (the sweep objective); a resume whose epochs ran no validation
    recorded no `val/*`. The epoch-end metrics travel in `last.ckpt`."""
    overrides = [*SMALL, "model.width=4", "trainer.max_epochs=3", *extra]
    cut = tmp_path / "cut"
    with pytest.raises(SystemExit):
        guarded(train, compose_config(cut, [*overrides, *stop]))
    assert json.loads((cut / "metrics.json").read_text())["status"] == "interrupted"
    resumed = run(cut, [*overrides, "ckpt_path=last"])  # in place, as the message advises
    assert "val/acc_best" in resumed
    assert resumed == run(tmp_path / "whole", overrides)


@pytest.fixture(scope="module")
def two_epoch_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A finished two-epoch run to resume from, and its overrides."""
    overrides = [*SMALL, "model.width=4"]
    folder = tmp_path_factory.mktemp("trained")
    run(folder, overrides)
    return folder / "checkpoints" / "last.ckpt", overrides


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ("optimizer.lr=0.9", "`optimizer.lr` 0.003 → 0.9"),
        ("optimizer=sgd", "`optimizer.name` 'adamw' → 'sgd'"),
        ("optimizer.decay_1d=true", "`optimizer.decay_1d` False → True"),
        ("seed=1", "`seed` 0 → 1"),
    ],
)
def test_resume_refuses_a_change_it_cannot_apply(
    tmp_path: Path, two_epoch_run: tuple[Path, list[str]], change: str, named: str
) -> None:
    """Observed: `optimizer.lr=0.9` trained on with the checkpoint's lr while the run's config
    said 0.9; `optimizer=sgd` ended in `KeyError: 'momentum'` at the first step and
    `optimizer.decay_1d=true` in a "different number of parameter groups" traceback."""
    last, overrides = two_epoch_run
    cfg = compose_config(tmp_path, [*overrides, f"ckpt_path={last}", change])
    with pytest.raises(PosttrainError, match="resuming") as refused:
        train(cfg)
    assert named in str(refused.value) and "`model.pretrained=" in str(refused.value)
    assert not (tmp_path / "checkpoints").exists()  # refused before any training


def test_resume_applies_the_changes_it_can(
    tmp_path: Path, two_epoch_run: tuple[Path, list[str]]
) -> None:
    """Longer training, another logger, other data workers: the resumed run does them."""
    last, overrides = two_epoch_run
    changes = ["trainer.max_epochs=3", "logger=csv", "data.num_workers=1", "callbacks=console"]
    resumed = run(tmp_path, [*overrides, f"ckpt_path={last}", *changes])
    assert resumed["status"] == "completed" and resumed["epoch"] == 3
    assert (tmp_path / "csv" / "metrics.csv").is_file()
    # No best checkpoint without the checkpoint callback: the record says test/* measured
    # the final weights, not the best epoch's.
    assert resumed["tested"].startswith("the final weights, after epoch 3")
    # ... and none was written: Lightning's own `epoch=2-step=...ckpt` used to appear.
    assert not list(tmp_path.rglob("*.ckpt"))


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every TensorBoard curve of a run, as TensorBoard shows it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def test_logs_resumed_in_place_keep_the_earlier_epochs_once(tmp_path: Path) -> None:
    """Observed: `logger=csv` deleted `csv/metrics.csv` when a run resumed in its own folder,
    so the file started at the resumed step; TensorBoard showed the steps of the abandoned
    half epoch twice. Both now read as the uninterrupted run's logs."""
    overrides = [*SMALL, "model.width=4", "trainer.max_epochs=3", "logger=[csv,tensorboard]"]
    overrides += ["trainer.log_every_n_steps=1"]
    stop = [
        "+callbacks.stop._target_=tests.test_resume.InterruptMidEpoch",
        "+callbacks.stop.epoch=2",
    ]
    with pytest.raises(Interrupted):
        run(tmp_path / "cut", [*overrides, *stop])
    run(tmp_path / "cut", [*overrides, "ckpt_path=last"])
    run(tmp_path / "whole", overrides)
    resumed, whole = ((tmp_path / f / "csv" / "metrics.csv").read_text() for f in ("cut", "whole"))
    assert resumed == whole
    assert scalars(tmp_path / "cut") == scalars(tmp_path / "whole")


def test_atomic_write_replaces_whole_files_and_leaves_nothing_behind(tmp_path: Path) -> None:
    target = tmp_path / "last.ckpt"
    write_atomically(b"old", target)
    write_atomically(b"new" * 1000, target)
    assert target.read_bytes() == b"new" * 1000
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


@pytest.mark.parametrize("unnamed_files", [True, False])
def test_a_full_disk_keeps_the_old_file_and_leaves_no_partial_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unnamed_files: bool
) -> None:
    """Observed (a 64 KiB tmpfs): a checkpoint write that filled the disk was written a second
    time under `.partial-<pid>-last.ckpt`, which then kept the space, so the run's record of
    the failure could not be written either. The old file stays whole, and nothing is left."""
    import errno

    import posttrain.checkpoints as checkpoints

    target = tmp_path / "last.ckpt"
    write_atomically(b"old", target)
    room = [1000]  # bytes the disk has left

    def write_fd(fd: int, payload: bytes | memoryview) -> None:
        os.write(fd, bytes(payload[: room[0]]))
        room[0] = 0
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints, "write_fd", write_fd)
    if not unnamed_files:  # a filesystem without O_TMPFILE: the named file is the stage
        monkeypatch.setattr(checkpoints, "stage_unnamed", lambda payload, staged: False)
    with pytest.raises(OSError, match="No space left"):
        write_atomically(b"new" * 1000, target)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_partial_files_of_dead_writers_are_removed(tmp_path: Path) -> None:
    import os

    dead = tmp_path / ".partial-999999999-last.ckpt"  # no such process
    alive = tmp_path / f".partial-{os.getpid()}-best.ckpt"  # a writer still at work
    dead.write_bytes(b"torn")
    alive.write_bytes(b"in progress")
    remove_partial_files(tmp_path)
    assert not dead.exists() and alive.exists()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"just some notes\n", "not a PyTorch checkpoint at all"),
        (b"PK\x03\x04 truncated zip", "damaged or truncated"),
        (b"", r"is empty \(0 bytes\)"),
        # safetensors: the header length (little-endian), then its JSON
        (b"\x40\x00\x00\x00\x00\x00\x00\x00" + b'{"w": {"dtype": "F32"}}', "safetensors file"),
    ],
)
def test_unreadable_files_are_named_for_what_they_are(
    tmp_path: Path, content: bytes, expected: str
) -> None:
    """Observed: a plain text file was said to hold objects that "may run arbitrary code"."""
    file = tmp_path / "model.ckpt"
    file.write_bytes(content)
    with pytest.raises(PosttrainError, match=expected) as refused:
        load_checkpoint(file, key="ckpt_path")
    assert "arbitrary code" not in str(refused.value) and "`ckpt_path`" in str(refused.value)


def test_each_ddp_rank_resumes_its_own_random_state() -> None:
    """Under DDP rank 0's file holds every rank's states (`by_rank`); rank 1 restored rank
    0's before, so after a resume both ranks drew the same augmentation again."""
    from types import SimpleNamespace

    from posttrain.checkpoints import RANDOM_STATE_KEY, RandomStateInCheckpoint
    from posttrain.data.datamodule import process_seed

    states = [{"torch": "rank0"}, {"torch": "rank1"}]
    checkpoint = {RANDOM_STATE_KEY: {**states[0], "by_rank": states}}
    for rank, expected in [(0, "rank0"), (1, "rank1"), (2, None)]:
        callback = RandomStateInCheckpoint(seed=0)
        callback.on_load_checkpoint(SimpleNamespace(global_rank=rank), None, checkpoint)
        assert (callback.pending or {}).get("torch") == expected  # rank 2: keeps its own seed
    assert process_seed(0, 0) == 0 and len({process_seed(0, 1), process_seed(1, 0)}) == 2


def test_trimming_the_csv_log_is_whole_or_not_at_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The resume's trim of `metrics.csv` rewrote the file in place: an error (or a kill)
    mid-write left the run's log truncated to what had been written."""
    import csv

    from posttrain.loggers import HistoryKeepingWriter

    log = tmp_path / "metrics.csv"
    log.write_text("epoch,step,train/loss\n0,1,2.0\n0,2,1.5\n1,3,1.0\n")
    kept = log.read_text()
    writer = HistoryKeepingWriter(log_dir=str(tmp_path))

    def fail(self: object, rows: object) -> None:
        raise OSError("No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(csv.DictWriter, "writerows", fail)
        with pytest.raises(OSError):
            writer.drop_from_step(3)
    assert log.read_text() == kept
    writer.drop_from_step(3)
    assert [row["step"] for row in csv.DictReader(log.open())] == ["1", "2"]
