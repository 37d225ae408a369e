"""Weight averaging (`reg=ema`, `reg=swa`): the averaged weights are what is validated, what
`best.ckpt`/`last.ckpt` hold, what the test and `eval.py` score, and a resumed run ends
exactly like the uninterrupted one. Knobs out of range are refused naming the key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from posttrain.checkpoints import load_checkpoint
from posttrain.errors import PosttrainError
from posttrain.regularizers.averaging import EMA, SWA, resolved_start_epoch
from posttrain.runs import find_user_error
from posttrain.train import train
from tests.conftest import add_callbacks, compose_config
from tests.test_eval import evaluated
from tests.test_resume import SMALL, whole_cut_and_resumed

TINY = [*SMALL, "model.width=8", "trainer.max_epochs=3"]  # 3 epochs of 4 batches
Weights = dict[str, Tensor]


def float_entries(state: dict[str, Any], prefix: str = "") -> Weights:
    """The floating-point tensors of a state dict (the averaged ones), prefix stripped."""
    return {
        name.removeprefix(prefix): value
        for name, value in state.items()
        if isinstance(value, Tensor) and value.is_floating_point() and name.startswith(prefix)
    }


def snapshot(pl_module: Any) -> Weights:
    return {k: v.clone() for k, v in float_entries(pl_module.model.state_dict()).items()}


def saved(checkpoint: dict[str, Any], key: str = "state_dict") -> Weights:
    return float_entries(checkpoint[key], prefix="model.")


def same(a: Weights, b: Weights) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class WeightsSeen(Callback):
    """The model's weights per epoch as trained (`raw`, when validation starts, before the
    averaging callback swaps) and as validated (`validated`, at the first validation batch),
    and those the test scored (`tested`)."""

    def __init__(self) -> None:
        self.raw: dict[int, Weights] = {}
        self.validated: dict[int, Weights] = {}
        self.tested: Weights = {}

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self.raw[trainer.current_epoch] = snapshot(pl_module)

    def on_validation_batch_start(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        epoch = trainer.current_epoch
        if not trainer.sanity_checking and epoch not in self.validated:
            self.validated[epoch] = snapshot(pl_module)

    def on_test_batch_start(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        self.tested = self.tested or snapshot(pl_module)


def trained_with_probe(
    folder: Path, overrides: list[str], monkeypatch: pytest.MonkeyPatch
) -> tuple[WeightsSeen, dict[str, float]]:
    seen = WeightsSeen()
    add_callbacks(monkeypatch, seen)
    torch.set_num_threads(1)
    return seen, train(compose_config(folder, overrides))


def checkpoints(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    files = folder / "checkpoints"
    return tuple(load_checkpoint(files / f"{n}.ckpt", key="ckpt_path") for n in ("best", "last"))


def test_ema_is_validated_checkpointed_and_tested(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "ema"
    seen, metrics = trained_with_probe(folder, [*TINY, "reg=ema", "reg.ema.decay=0.9"], monkeypatch)
    assert "still holds 31% of the first step's weights" in caplog.text  # 0.9**11: too short
    best, last = checkpoints(folder)
    assert int(last["averaging_state"]["n_averaged"]) == 12  # one update per optimizer step
    assert same(saved(last, "current_model_state"), seen.raw[2])  # raw kept for resume
    assert not same(seen.validated[2], seen.raw[2])  # EMA weights differ from the raw ones
    assert same(saved(last), seen.validated[2])  # last.ckpt holds what was validated
    # best.ckpt is the epoch whose *averaged* weights scored val/acc_best, and holds them
    assert same(saved(best), seen.validated[best["epoch"]])
    assert same(seen.tested, saved(best))  # the test scored them
    steps = 4 * (best["epoch"] + 1)  # and metrics.json says so
    average = f"; the reg=ema average of the weights, over {steps} optimizer steps"
    assert json.loads((folder / "metrics.json").read_text())["tested"].endswith(average)
    tracker = "tracker.best.max_value"  # not the stale copy made when averaging began
    assert float(best["state_dict"][tracker]) == pytest.approx(metrics["val/acc_best"])
    again = evaluated(
        tmp_path / "eval", folder / "checkpoints" / "best.ckpt", "trainer.limit_test_batches=2"
    )
    assert again["test/acc"] == metrics["test/acc"]  # eval.py scores the averaged weights


def test_swa_averages_epoch_ends_from_start_epoch_and_validates_the_average(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "swa"
    seen, _ = trained_with_probe(folder, [*TINY, "reg=swa", "reg.swa.start_epoch=1"], monkeypatch)
    raw, validated = seen.raw, seen.validated
    assert same(validated[0], raw[0])  # before start_epoch: the raw weights, not the initial
    assert same(validated[1], raw[1])  # the average of one epoch end
    mean = {k: (raw[1][k] + raw[2][k]) / 2 for k in raw[2]}
    assert validated[2].keys() == mean.keys()
    for name, value in validated[2].items():  # validated in the epoch it was made
        torch.testing.assert_close(value, mean[name], rtol=1e-5, atol=1e-6, msg=name)
    best, last = checkpoints(folder)
    assert int(last["averaging_state"]["n_averaged"]) == 2
    assert same(saved(last), validated[2]) and same(saved(best), validated[best["epoch"]])
    assert same(seen.tested, saved(best))
    tested = json.loads((folder / "metrics.json").read_text())["tested"]
    if best["epoch"] == 0:  # before start_epoch: raw weights, and metrics.json says so
        raw = "; the raw weights: reg=swa had averaged nothing (it averages from the end of epoch 1"
        assert raw in tested
    else:
        over = "1 epoch end" if best["epoch"] == 1 else "2 epoch ends"
        assert tested.endswith(f"; the reg=swa average of the weights, over {over}")


def test_a_test_of_raw_weights_says_so_when_early_stopping_ends_before_swa_starts(
    tmp_path: Path,
) -> None:
    """Early stopping (patience 1, no progress at this learning rate) ends training after
    epoch 1, before `reg.swa.start_epoch=6`: the test scored raw weights, while metrics.json
    said only "best.ckpt" and the run statement "validated, checkpointed and tested"."""
    folder = tmp_path / "stopped"
    overrides = [*TINY, "reg=[swa,early_stopping]", "reg.early_stopping.patience=1",
                 "reg.swa.start_epoch=6", "trainer.max_epochs=8", "optimizer.lr=1e-7"]  # fmt: skip
    metrics = train(compose_config(folder, overrides))
    assert metrics["epoch"] < 6
    best, _ = checkpoints(folder)
    assert "averaging_state" not in best
    record = json.loads((folder / "metrics.json").read_text())
    assert record["status"] == "completed"
    assert record["tested"].startswith("best.ckpt: the epoch with the best val/acc")
    raw = "; the raw weights: reg=swa had averaged nothing (it averages from the end of epoch 6 on"
    assert raw in record["tested"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "averaging", [["reg=[augment,ema]"], ["reg=[augment,swa]", "reg.swa.start_epoch=1"]]
)
def test_resume_with_averaging_matches_the_uninterrupted_run(
    averaging: list[str], tmp_path: Path
) -> None:
    """Interrupted at epoch 2: SWA (from epoch 1) has averaged one epoch end by then."""
    uninterrupted, resumed, last = whole_cut_and_resumed(tmp_path, [*TINY, *averaging])
    assert "current_model_state" in last
    assert resumed == uninterrupted


OTHER_METHODS = {
    "finetune": ["method=finetune", "model.width=8"],
    "multitask": ["experiment=digits_multitask", "model.width=8"],
    "maml": ["experiment=digits_maml", "model.hidden=8", "data.queries=3", "data.image_size=16"],
    "protonet": ["experiment=digits_protonet", "model.hidden=8", "data.image_size=16"],
}


def small_cnn_weights(folder: Path) -> Path:
    """What `method=finetune` starts from: a state dict of the small CNN."""
    from posttrain.models import build_classifier

    path = folder / "small_cnn.pt"
    torch.save(build_classifier("small_cnn", 10, 1, width=8).state_dict(), path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("method", list(OTHER_METHODS))
def test_every_method_validates_and_checkpoints_the_average(
    method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MAML's functional inner loop adapts from the averaged initialization; finetune's
    freeze schedule, multi-task heads and ProtoNet's embedding are averaged like any weight."""
    folder = tmp_path / method
    overrides = [*SMALL, *OTHER_METHODS[method], "reg=ema"]
    if method == "finetune":
        overrides.append(f"model.pretrained={small_cnn_weights(tmp_path)}")
    seen, _ = trained_with_probe(folder, overrides, monkeypatch)
    _, last = checkpoints(folder)
    final = max(seen.validated)
    assert not same(seen.validated[final], seen.raw[final])
    assert same(saved(last), seen.validated[final])


class StepWeights(Callback):
    """The model's weights after every optimizer step."""

    def __init__(self) -> None:
        self.after: list[Weights] = []

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        self.after.append(snapshot(pl_module))


def test_ema_is_the_reference_average_and_its_warning_the_true_share(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Observed: the warning said 28% (0.9**12) of the first step's weights were left after
    12 steps; the first update copies them, so 0.9**11 = 31% were."""
    steps = StepWeights()
    add_callbacks(monkeypatch, steps)
    torch.set_num_threads(1)
    folder = tmp_path / "ema"
    train(compose_config(folder, [*TINY, "reg=ema", "reg.ema.decay=0.9"]))
    assert len(steps.after) == 12
    first = steps.after[0]
    # avg_1 = w_1, avg_t = d avg_{t-1} + (1 - d) w_t (BatchNorm statistics too)
    reference = {k: v.clone() for k, v in first.items()}
    for weights in steps.after[1:]:
        reference = {k: 0.9 * reference[k] + 0.1 * weights[k] for k in reference}
    last = load_checkpoint(folder / "checkpoints" / "last.ckpt", key="ckpt_path")
    average = saved(last)
    for name, value in reference.items():
        torch.testing.assert_close(average[name], value)
    share = 0.9**11  # of w_1 in the reference average
    assert f"still holds {100 * share:.0f}% of the first step's weights" in caplog.text
    assert f"below {0.01 ** (1 / 11):.3g}" in caplog.text


@pytest.mark.parametrize("decay", [0, 1, 1.5, -0.5, True, "high"])
def test_ema_decay_outside_zero_one_is_refused(decay: object) -> None:
    with pytest.raises(PosttrainError, match=r"`reg\.ema\.decay` must be a number in \(0, 1\)"):
        EMA(decay=decay)  # type: ignore[arg-type]


@pytest.mark.parametrize("start_epoch", [-1, 1.5, True])
def test_swa_start_epoch_must_be_an_epoch_number(start_epoch: object) -> None:
    with pytest.raises(PosttrainError, match=r"`reg\.swa\.start_epoch` must be an epoch"):
        SWA(start_epoch=start_epoch)  # type: ignore[arg-type]


def test_swa_start_epoch_is_checked_against_max_epochs() -> None:
    assert resolved_start_epoch(None, 150) == 112  # null: 75% of the budget
    assert resolved_start_epoch(4, -1) == 4  # unbounded training: any epoch
    with pytest.raises(PosttrainError, match=r"`reg\.swa\.start_epoch` is null.*max_epochs"):
        resolved_start_epoch(None, -1)


def refusal(tmp_path: Path, overrides: list[str]) -> str:
    with pytest.raises(Exception) as refused:
        train(compose_config(tmp_path / "run", [*TINY, *overrides]))
    error = find_user_error(refused.value)
    assert isinstance(error, PosttrainError), refused.value
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()  # before any epoch
    return str(error)


def test_swa_starting_after_the_last_epoch_is_refused_before_training(tmp_path: Path) -> None:
    message = refusal(tmp_path, ["reg=swa", "reg.swa.start_epoch=3"])
    assert "`reg.swa.start_epoch` is 3" in message and "`trainer.max_epochs=3`" in message


def test_ema_and_swa_together_are_refused(tmp_path: Path) -> None:
    message = refusal(tmp_path, ["reg=[ema,swa]"])
    assert "`reg=[ema,swa]`" in message and "Choose one" in message


def test_swa_default_start_counts_the_epochs_max_steps_allows(tmp_path: Path) -> None:
    """`reg=swa trainer.max_steps=12` (3 epochs of 4 steps) started at 75% of max_epochs=30,
    averaged nothing and completed on the raw weights with a warning at the end."""
    folder = tmp_path / "run"
    train(
        compose_config(folder, [*TINY, "reg=swa", "trainer.max_epochs=30", "trainer.max_steps=12"])
    )
    last = load_checkpoint(folder / "checkpoints" / "last.ckpt", "ckpt_path")
    assert int(last["averaging_state"]["n_averaged"]) == 1  # epoch 2 = int(0.75 * 3)


def test_swa_starting_after_max_steps_is_refused_before_training(tmp_path: Path) -> None:
    overrides = [
        "reg=swa",
        "reg.swa.start_epoch=3",
        "trainer.max_epochs=30",
        "trainer.max_steps=12",
    ]
    message = refusal(tmp_path, overrides)
    assert "`reg.swa.start_epoch` is 3" in message and "`trainer.max_steps=12`" in message
