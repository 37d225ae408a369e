"""Temperature scaling (`calibration=temperature`): it finds the temperature that made logits
over-confident, never changes a prediction, lowers the NLL, reports the logged `test/ece` as
its "before", and is refused in one paragraph where a method has no per-image logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from posttrain.calibration import (
    Predictions,
    TemperatureScaling,
    expected_calibration_error,
    negative_log_likelihood,
)
from posttrain.errors import PosttrainError
from posttrain.methods.metrics import SplitMetrics
from posttrain.runs import find_user_error
from posttrain.train import train
from tests.conftest import compose_config

TINY = ["logger=none", "trainer.accelerator=cpu", "callbacks.progress_bar=null", "debug=limit",
        "model.width=8"]  # fmt: skip


def calibrated_sample(count: int, seed: int) -> Predictions:
    """Logits whose softmax is exactly the label distribution (labels drawn from it)."""
    generator = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(count, 10, generator=generator)
    targets = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)
    return Predictions(logits, targets)


def over_confident(sample: Predictions, factor: float = 3.0) -> Predictions:
    return Predictions(sample.logits * factor, sample.targets)


def test_fits_the_temperature_that_scaled_calibrated_logits() -> None:
    val = over_confident(calibrated_sample(4000, seed=0))
    assert TemperatureScaling().fit(val.logits, val.targets) == pytest.approx(3.0, rel=0.05)


def test_max_iter_is_the_lbfgs_budget() -> None:
    val = over_confident(calibrated_sample(4000, seed=0))
    one, full = (TemperatureScaling(n).fit(val.logits, val.targets) for n in (1, 100))
    assert abs(full - 3.0) < abs(one - 3.0) - 0.1
    with pytest.raises(PosttrainError, match=r"calibration\.max_iter"):
        TemperatureScaling(0)


def test_keeps_every_prediction_and_lowers_nll_and_ece_on_over_confident_logits() -> None:
    val, test = (over_confident(calibrated_sample(4000, seed=s)) for s in (0, 1))
    report = TemperatureScaling().report(val, test)
    scaled = test.logits / report["test/temperature"]
    assert torch.equal(scaled.argmax(-1), test.logits.argmax(-1))
    accuracy = float((test.logits.argmax(-1) == test.targets).float().mean())
    assert report["test/acc_calibrated"] == pytest.approx(accuracy)
    assert report["test/nll"] == pytest.approx(negative_log_likelihood(test.logits, test.targets))
    assert report["test/nll_calibrated"] < report["test/nll"] - 0.5
    assert report["test/ece_calibrated"] < expected_calibration_error(test.logits, test.targets) / 5


def test_validation_without_a_mistake_keeps_t_1(caplog: pytest.LogCaptureFixture) -> None:
    """Its NLL falls as T -> 0; an unbounded fit made every test mistake cost ~100 nats."""
    sample = over_confident(calibrated_sample(400, seed=3))
    right = Predictions(sample.logits, sample.logits.argmax(-1))
    assert TemperatureScaling().fit(right.logits, right.targets) == 1.0
    assert "no temperature minimizes" in caplog.text
    one_wrong = Predictions(right.logits, right.targets.clone())
    one_wrong.targets[0] = (one_wrong.targets[0] + 1) % 10
    assert TemperatureScaling().fit(one_wrong.logits, one_wrong.targets) != 1.0


def test_validation_no_better_than_chance_keeps_t_1(caplog: pytest.LogCaptureFixture) -> None:
    """Its NLL falls as T -> infinity: LBFGS stopped at T ~ 2e7, recorded as the fit."""
    sample = over_confident(calibrated_sample(400, seed=4))
    worst = Predictions(sample.logits, sample.logits.argmin(-1))  # the true class scores lowest
    assert TemperatureScaling().fit(worst.logits, worst.targets) == 1.0
    assert "no better than chance" in caplog.text


def test_ece_is_the_logged_test_ece() -> None:
    """Same bins and definition as `SplitMetrics`, accumulated over several batches."""
    sample = over_confident(calibrated_sample(1000, seed=2))
    metrics = SplitMetrics(num_classes=10)
    for logits, targets in zip(sample.logits.split(128), sample.targets.split(128), strict=True):
        metrics.update("test", logits, targets)
    logged = float(metrics.compute_and_reset("test")["test/ece"])
    assert expected_calibration_error(sample.logits, sample.targets) == pytest.approx(logged)


def test_train_records_before_and_after_from_the_tested_logits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The logits calibrated are the test's own: their NLL is `test/loss` and their ECE the
    logged `test/ece`; the before/after keys reach metrics.json."""
    seen: list[Predictions] = []
    report = TemperatureScaling.report

    def spy(self: TemperatureScaling, val: Predictions, test: Predictions) -> dict[str, float]:
        seen.append(test)
        return report(self, val, test)

    monkeypatch.setattr(TemperatureScaling, "report", spy)
    torch.set_num_threads(1)
    overrides = [*TINY, "calibration=temperature", "data.eval_batch_size=128"]
    train(compose_config(tmp_path / "run", overrides))
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    keys = ("test/temperature", "test/nll", "test/nll_calibrated", "test/ece_calibrated")
    assert set(keys) <= set(record) and record["test/temperature"] > 0
    (test,) = seen
    assert len(test.targets) == 2 * 128  # debug=limit tests 2 batches: so does calibration
    assert expected_calibration_error(test.logits, test.targets) == pytest.approx(
        record["test/ece"], abs=1e-6
    )
    assert record["test/nll"] == pytest.approx(record["test/loss"], abs=1e-5)
    assert record["test/acc_calibrated"] == pytest.approx(record["test/acc"])


def refusal(folder: Path, *overrides: str) -> str:
    with pytest.raises(Exception) as refused:
        train(compose_config(folder, ["logger=none", "trainer.accelerator=cpu", *overrides]))
    error = find_user_error(refused.value)
    assert isinstance(error, PosttrainError), refused.value
    assert not (folder / "checkpoints").exists()  # refused before training started
    message = str(error)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("experiment", "method"),
    [("digits_multitask", "multitask"), ("digits_protonet", "protonet")],
)
def test_methods_without_per_image_logits_are_refused(
    tmp_path: Path, experiment: str, method: str
) -> None:
    message = refusal(tmp_path / "run", f"experiment={experiment}", "calibration=temperature")
    assert f"`method={method}`" in message and "`calibration=none`" in message


def test_no_validation_batches_is_refused(tmp_path: Path) -> None:
    message = refusal(tmp_path / "run", "calibration=temperature", "trainer.limit_val_batches=0")
    assert "`trainer.limit_val_batches=0`" in message


SHORT = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "model.width=8"]


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        # calibration reads the test split; a run that skips it used to crash after training
        (["calibration=temperature", "trainer.limit_test_batches=0"], "limit_test_batches=0"),
        # digits' validation split is one batch of 512: 0.5 of it is 0 batches
        (["calibration=temperature", "trainer.limit_val_batches=0.5"], "limit_val_batches=0.5"),
        (["trainer.limit_val_batches=0.5"], "limit_val_batches=0.5"),  # Lightning's traceback
        (["trainer.limit_test_batches=0.5"], "limit_test_batches=0.5"),  # after training
    ],
)
def test_a_limit_that_leaves_a_used_split_no_batches_is_refused_before_training(
    tmp_path: Path, overrides: list[str], key: str
) -> None:
    message = refusal(tmp_path / "run", *SHORT, *overrides)
    assert f"`trainer.{key}`" in message and "no batches" in message
    assert "1 batch(es) of 512" in message


def test_eval_refuses_calibration_on_a_limit_that_leaves_no_validation_batch(
    tmp_path: Path,
) -> None:
    from posttrain.evaluate import evaluate, open_overrides

    torch.set_num_threads(1)
    train(compose_config(tmp_path / "run", [*TINY, "data.eval_batch_size=512"]))
    best = tmp_path / "run" / "checkpoints" / "best.ckpt"
    arguments = ["logger=none", "trainer.accelerator=cpu", f"ckpt_path={best}",
                 "calibration=temperature", "trainer.limit_val_batches=0.5"]  # fmt: skip
    with pytest.raises(PosttrainError) as refused:
        evaluate(compose_config(tmp_path / "eval", open_overrides(arguments), "eval"))
    assert "`trainer.limit_val_batches=0.5` leaves the val split no batches" in str(refused.value)
    # switching the test off in train.py stays allowed: the run just has no test numbers
    record = train(compose_config(tmp_path / "notest", [*TINY, "trainer.limit_test_batches=0"]))
    assert "val/acc" in record and not any(k.startswith("test/") for k in record)


def test_benchmark_table_shows_before_after_and_cost() -> None:
    from benchmarks.calibration import FIELDS, markdown_table, summarize

    def run(seed: int, ece: float) -> dict:
        values = dict.fromkeys(FIELDS.values(), 0.5) | {"ece": ece, "ece_calibrated": 0.01}
        return {"seed": seed, "wall_seconds": 100.0, **values, "calibration_seconds": 5.0}

    row = summarize("default", 3, [run(0, 0.04), run(1, 0.06)])
    assert row["ece_mean"] == pytest.approx(0.05) and row["ece_halved"]
    assert row["cost_ratio_mean"] == pytest.approx(0.05) and row["predictions_unchanged"]
    assert "seed=S" in row["command"] and "trainer.max_epochs=3" in row["command"]
    table = markdown_table({"rows": [row]})
    assert "(3 / 30)" in table and "5.00 ± 1.41 | 1.00 ± 0.00" in table
    assert "5.0 s (5.0% of the run)" in table and "T = 1 kept" not in table
    row["per_seed"][1]["temperature"] = 1.0
    assert "T = 1 kept for seed(s) 1:" in markdown_table({"rows": [row]})


def test_the_benchmark_says_why_each_seed_kept_t_1() -> None:
    """The README note said 'every validation image was already right' for any T = 1."""
    from benchmarks.calibration import kept_t1_notes

    seeds = [
        {"seed": 0, "temperature": 1.0, "val_acc": 1.0},
        {"seed": 1, "temperature": 1.0, "val_acc": 0.08},
        {"seed": 2, "temperature": 1.7, "val_acc": 0.9},
        {"seed": 3, "temperature": 1.0},  # written before val_acc was kept
    ]
    right, chance = kept_t1_notes([{"label": "run", "per_seed": seeds}])
    assert "seed(s) 0, 3: every validation image was already right" in right
    assert "seed(s) 1: its validation predictions were no better than chance" in chance
