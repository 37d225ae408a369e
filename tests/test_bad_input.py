"""Every bad value is one paragraph naming the key, exit status 2, no traceback, and
checked before any training; a run that blows up is recorded `diverged`, never `completed`.
Each case below was observed as a traceback, a late failure or a false "completed"."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.errors import PosttrainError
from posttrain.runs import find_user_error
from posttrain.train import train
from tests.conftest import compose_config, run_cli

QUICK = ["trainer.max_epochs=1", "logger=none", "model.width=4"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("trainer.max_epochs=abc", "trainer.max_epochs"),
        ("seed=notanumber", "`seed`"),
        ("trainer.precision=64", "trainer.precision"),
        ("trainer.precision=16-mixed", "needs a GPU"),
        ("trainer=gpu", "needs a CUDA GPU"),
        ("trainer.limit_train_batches=1.5", "trainer.limit_train_batches"),
        ("data.test_fraction=0", "data.test_fraction"),
    ],
)
def test_bad_value_is_one_paragraph_before_training(
    tmp_path: Path, override: str, named: str
) -> None:
    result = run_cli("train.py", *QUICK, override, f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert named in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "checkpoints").exists()  # refused before any training
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "failed"


@pytest.mark.slow
def test_unwritable_run_folder_is_one_paragraph(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = run_cli("train.py", *QUICK, f"hydra.run.dir={blocker / 'run'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "hydra.run.dir" in result.stderr and "is not a folder" in result.stderr


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_a_folder_that_permission_bits_allow_but_mkdir_refuses_is_one_paragraph() -> None:
    """Observed as root: `hydra.run.dir=/proc/nope/run` passed the permission check, then
    Hydra's mkdir failed with a traceback and exit status 1."""
    from posttrain.run_names import check_output_folders

    problem = check_output_folders(["debug=fast", "hydra.run.dir=/proc/nope/run"])
    assert problem is not None and "`hydra.run.dir`" in problem, problem
    assert "/proc is not writable" in problem
    assert check_output_folders(["hydra.run.dir=/tmp/posttrain-probe-test/run"]) is None


def refusal_before_training(folder: Path, overrides: list[str], fast: bool = True) -> str:
    """The paragraph `train` refuses `overrides` with (a PosttrainError, not a traceback)."""
    quick = ["logger=none", "debug=fast"] if fast else []
    with pytest.raises(Exception) as refused:
        train(compose_config(folder / "run", [*quick, *overrides]))
    error = find_user_error(refused.value)
    assert isinstance(error, PosttrainError), refused.value
    return str(error)


@pytest.mark.parametrize(
    ("overrides", "valid"),
    [
        # convnet4 halves the side four times: torch's "Output size is too small".
        (["experiment=digits_protonet", "model.hidden=4", "data.image_size=8"], 16),
        (["data.image_size=2"], 4),  # the small CNN halves it twice
    ],
)
def test_images_too_small_for_the_model_are_one_paragraph(
    tmp_path: Path, overrides: list[str], valid: int
) -> None:
    """Observed: a torch traceback at the first training step."""
    message = refusal_before_training(tmp_path, overrides)
    assert "`data.image_size=" in message and "too small for `model=" in message
    assert f"Valid: `data.image_size={valid}` or larger" in message


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["data.seed=abc"], "data.seed"),  # torch's manual_seed traceback at set-up
        (["data=fake", "data.options.noise=abc"], "data.options.noise"),
        (["data=fake", "data.options.num_test_samples=abc"], "data.options.num_test_samples"),
        (["reg=augment", "reg.augment.translate=abc"], "reg.augment.translate"),
        # Truthy strings that switched the option on: rotated classes, a download attempt.
        (["experiment=digits_protonet", "data.rotations=no"], "data.rotations"),
        (["data.download=no"], "data.download"),
        # MAML ran first-order while asked not to.
        (["experiment=digits_maml", "method.first_order=no"], "method.first_order"),
        # Counts given a fraction: `range()`/DataLoader tracebacks, or accepted as given.
        (["experiment=digits_maml", "method.inner_steps=1.5"], "method.inner_steps"),
        (["data.batch_size=1.5"], "data.batch_size"),
        (["experiment=digits_protonet", "data.shots=1.5"], "data.shots"),
        (["calibration=temperature", "calibration.max_iter=1.5"], "calibration.max_iter"),
    ],
)
def test_a_word_fraction_or_truthy_string_where_a_count_or_switch_goes_is_one_paragraph(
    tmp_path: Path, overrides: list[str], named: str
) -> None:
    assert f"Config key `{named}`" in refusal_before_training(tmp_path, overrides)


@pytest.mark.parametrize(
    ("overrides", "named", "unknown"),
    [
        (["+data.foo=1"], "data", "foo"),
        (["experiment=digits_protonet", "+data.batch_size=8"], "data", "batch_size"),
        (["+method.foo=1"], "method", "foo"),
        (["+method.model=x"], "method", "model"),  # posttrain passes it: would be overwritten
        (["reg=[l2,dropout]", "+reg.l2.foo=1"], "reg.l2", "foo"),
        (["calibration=temperature", "+calibration.foo=1"], "calibration", "foo"),
        (["+trainer.foo=1"], "trainer", "foo"),
        (["+callbacks.model_checkpoint.foo=1"], "callbacks.model_checkpoint", "foo"),
    ],
)
def test_a_key_nothing_reads_inside_a_group_is_one_paragraph(
    tmp_path: Path, overrides: list[str], named: str, unknown: str
) -> None:
    """Observed: Hydra's "Error executing job ... TypeError: __init__() got an unexpected
    keyword argument 'foo'", exit status 1 and a traceback in metrics.json, where the README
    promises one paragraph for "a top-level key nothing reads such as `train.py +tta=flip`"."""
    message = refusal_before_training(tmp_path, overrides)
    assert f"Config key `{named}` has unknown option(s) {unknown}; valid: " in message
    assert "model, " not in message and "logger, " not in message  # passed by posttrain


def test_resuming_with_another_architecture_is_one_paragraph(tmp_path: Path) -> None:
    train(compose_config(tmp_path / "run", [*QUICK, "debug=limit"]))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    message = refusal_before_training(
        tmp_path / "other", [*QUICK, "model.width=8", f"ckpt_path={last}"], fast=False
    )
    assert "ckpt_path" in message and "`model.width` 4 → 8" in message


@pytest.mark.slow
def test_a_finite_blow_up_is_recorded_diverged(tmp_path: Path) -> None:
    """Observed: lr=1e6 ended "completed" with test/loss 3.65e13 and chance accuracy."""
    result = run_cli("train.py", *QUICK, "optimizer.lr=1e6", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2 and "Training diverged" in result.stderr
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["status"] == "diverged" and "first step" in record["error"]


@pytest.mark.slow
def test_sweep_report_counts_the_diverged_job(tmp_path: Path) -> None:
    result = run_cli(
        "train.py", "-m", *QUICK, "debug=limit", "optimizer.lr=1e-3,1e6",
        f"hydra.sweep.dir={tmp_path}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 jobs: 1 completed, 1 diverged" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize(
    ("override", "named"),
    [
        # Lightning skips clipping at <= 0: the run trained unclipped.
        ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val"),
        ("+trainer.gradient_clip_algorithm=value", "trainer.gradient_clip_algorithm"),
        ("+trainer.gradient_clip_algorithm=bogus", "trainer.gradient_clip_algorithm"),
        ("trainer.gradient_clip_val=abc", "trainer.gradient_clip_val"),  # a traceback
        # Truthy strings switched on the cuDNN half of `deterministic` only.
        ("trainer.deterministic=no", "trainer.deterministic"),
        ("trainer.deterministic=1", "trainer.deterministic"),
        # Tracebacks: numpy's seed range, and a modulo by zero at the first epoch's end.
        ("seed=-1", "`seed`"),
        ("seed=4294967296", "`seed`"),
        ("trainer.check_val_every_n_epoch=0", "trainer.check_val_every_n_epoch"),
        # k checkpoints under one name: best.ckpt held the last epoch, tested as the best.
        ("callbacks.model_checkpoint.save_top_k=3", "callbacks.model_checkpoint.save_top_k"),
        ("callbacks.model_checkpoint.save_top_k=-1", "callbacks.model_checkpoint.save_top_k"),
        # Lightning's traceback at the end of the first epoch.
        ("callbacks.model_checkpoint.monitor=val/accuracy", "callbacks.model_checkpoint.monitor"),
        ("callbacks.model_checkpoint.monitor=test/acc", "callbacks.model_checkpoint.monitor"),
        # The default mode=max on a loss kept the worst epoch as best.ckpt, then tested it.
        ("callbacks.model_checkpoint.monitor=val/loss", "callbacks.model_checkpoint.mode=max"),
    ],
)
def test_run_value_lightning_ignores_or_mishandles_is_refused(
    tmp_path: Path, override: str, named: str
) -> None:
    from posttrain.checks import check_run_config

    with pytest.raises(PosttrainError, match=named.replace(".", r"\.")):
        check_run_config(compose_config(tmp_path, [override]))


@pytest.mark.parametrize(
    "overrides",
    [
        ["trainer.gradient_clip_val=0.5", "+trainer.gradient_clip_algorithm=value"],
        ["trainer.gradient_clip_val=0"],
        ["trainer.deterministic=true"],
        ["trainer.deterministic=false"],
        ["trainer.deterministic=null"],
        ["seed=4294967295"],
        ["trainer.check_val_every_n_epoch=2"],
        [
            "callbacks.model_checkpoint.save_top_k=3",
            "callbacks.model_checkpoint.filename='b-{epoch}'",
        ],
        ["callbacks.last_checkpoint.save_top_k=-1"],  # unmonitored: one file, rewritten
        ["callbacks.model_checkpoint.monitor=val/loss", "callbacks.model_checkpoint.mode=min"],
    ],
)
def test_run_values_lightning_applies_are_accepted(tmp_path: Path, overrides: list[str]) -> None:
    from posttrain.checks import check_run_config

    check_run_config(compose_config(tmp_path, overrides))


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("trainer.devices=0", "devices=0"),
        ("trainer.accelerator=tpu", "torch_xla"),
        ("+trainer.enable_checkpointing=false", "ModelCheckpoint"),
    ],
)
def test_a_trainer_setting_lightning_refuses_is_one_paragraph(
    tmp_path: Path, override: str, named: str
) -> None:
    """Observed: Lightning's refusal came through Hydra's InstantiationException with its
    `full_key: trainer` wrapper and a traceback in metrics.json."""
    from posttrain.runs import build_trainer

    with pytest.raises(PosttrainError, match="refused by Lightning") as refused:
        build_trainer(compose_config(tmp_path, [override]), extra_callbacks=[])
    assert named in str(refused.value) and "Traceback" not in str(refused.value)


def test_a_monitor_the_method_does_not_log_is_one_paragraph(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Observed: `experiment=digits_protonet callbacks.model_checkpoint.monitor=val/f1_macro`
    (a documented metric ProtoNet does not log) ended in Lightning's traceback at the first
    validation, and metrics.json held the traceback."""
    from posttrain.runs import guarded
    from posttrain.train import train

    overrides = ["experiment=digits_protonet", "debug=limit", "model.hidden=8", "logger=none",
                 "callbacks.model_checkpoint.monitor=val/f1_macro"]  # fmt: skip
    with pytest.raises(SystemExit) as stopped:
        guarded(train, compose_config(tmp_path, overrides))
    assert stopped.value.code == 2
    said = capsys.readouterr().err
    assert "Lightning refused a setting" in said and "val/f1_macro" in said
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["status"] == "failed" and "Traceback" not in record["error"]
