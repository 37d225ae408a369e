"""Fast runs of the real composed configs through `posttrain.train.train`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from posttrain.errors import PosttrainError
from posttrain.methods.metrics import DivergenceGuard
from posttrain.models import build_classifier
from posttrain.train import train
from tests.conftest import add_callbacks
from tests.fixtures import write_cifar, write_image_folder

FAST = ["trainer.fast_dev_run=true", "trainer.accelerator=cpu", "trainer.devices=1"]
# The class count each data option below is set up with (the head must be sized to it).
CLASSES = {"digits": 10, "fake": 4, "cifar10": 10, "imagefolder": 3}
CHANNELS_LAST = torch.channels_last


class TrainingProbe(Callback):
    """What the training steps saw and did: logits, conv inputs/weights, weights before/after.

    Hooks record only training-mode forwards (not validation/test) and are removed when
    training ends.
    """

    def __init__(self) -> None:
        self.logits: list[tuple[tuple[int, ...], torch.dtype]] = []
        self.conv_inputs_channels_last: list[bool] = []
        self.conv_weights_channels_last: list[bool] = []
        self.losses: list[float] = []
        self.before: dict[str, torch.Tensor] = {}
        self.after: dict[str, torch.Tensor] = {}
        self.hooks: list = []

    def on_train_start(self, trainer, pl_module) -> None:
        model = pl_module.model
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}

        def record_logits(module: nn.Module, inputs, output: torch.Tensor) -> None:
            if module.training:
                self.logits.append((tuple(output.shape), output.dtype))

        def record_conv(module: nn.Conv2d, inputs) -> None:
            if module.training:
                self.conv_inputs_channels_last.append(
                    inputs[0].is_contiguous(memory_format=CHANNELS_LAST)
                )
                self.conv_weights_channels_last.append(
                    module.weight.is_contiguous(memory_format=CHANNELS_LAST)
                )

        self.hooks.append(model.head.register_forward_hook(record_logits))
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                self.hooks.append(module.register_forward_pre_hook(record_conv))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer, pl_module) -> None:
        for hook in self.hooks:
            hook.remove()
        self.after = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}


def run_with_probe(cfg, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, float], TrainingProbe]:
    probe = TrainingProbe()
    add_callbacks(monkeypatch, probe)
    return train(cfg), probe


def first_conv(model_parameters: dict[str, torch.Tensor]) -> str:
    """The name of the stem's conv weight (the parameter farthest from the loss)."""
    return next(n for n, p in model_parameters.items() if p.ndim == 4)


def data_overrides(data: str, tmp_path: Path) -> list[str]:
    """Overrides that point each data option at a small offline dataset."""
    if data == "cifar10":
        write_cifar(tmp_path / "cifar")
        return ["data=cifar10", f"data.root={tmp_path / 'cifar'}", "data.download=false"]
    if data == "imagefolder":
        write_image_folder(tmp_path / "images", classes=3, per_class=10)
        return ["data=imagefolder", f"data.root={tmp_path / 'images'}", "data.options.size=32"]
    if data == "fake":
        return [
            "data=fake",
            "data.options.num_samples=64",
            "data.options.size=16",
            f"data.options.num_classes={CLASSES['fake']}",
        ]
    return ["data=digits"]


@pytest.mark.parametrize("model", ["small_cnn", "resnet18", "resnet50"])
@pytest.mark.parametrize("data", ["digits", "fake", "cifar10", "imagefolder"])
def test_fast_dev_run_every_model_and_data(
    make_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: str, data: str
) -> None:
    """Every model x data pair trains one batch end to end and records its metrics."""
    cfg = make_config(*FAST, f"model={model}", *data_overrides(data, tmp_path), "data.batch_size=4")
    metrics, probe = run_with_probe(cfg, monkeypatch)
    # One training step, on logits sized (batch, the data's classes), with a finite loss ...
    assert probe.logits and {shape for shape, _ in probe.logits} == {(4, CLASSES[data])}
    assert len(probe.losses) == 1 and torch.isfinite(torch.tensor(probe.losses[0]))
    # ... whose gradient reached both ends of the network: head and stem both moved.
    stem = first_conv(probe.before)
    for name in ("head.weight", "head.bias", stem):
        assert not torch.equal(probe.before[name], probe.after[name]), f"{name} did not change"
    # The run folder's metrics.json is complete and is what `train` returned.
    written = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    # fast_dev_run keeps no checkpoint: the record says the test measured the final weights.
    assert written.pop("tested").startswith("the final weights, after epoch 1")
    assert written == {"status": "completed", **metrics}
    expected = {"train/acc", "val/acc", "val/acc_best", "test/acc", "test/loss", "test/f1_macro"}
    assert expected <= set(written), expected - set(written)
    assert {"train/loss", "train/loss_epoch"} & set(written), "no epoch training loss"
    assert written["global_step"] == 1.0
    assert all(torch.isfinite(torch.tensor(v)) for k, v in written.items() if k != "status")


@pytest.mark.parametrize("arch", ["small_cnn", "resnet18"])
def test_grayscale_input_and_head_size_adapt(arch: str) -> None:
    model = build_classifier(arch, num_classes=7, in_channels=1)
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 7)
    assert model.head.out_features == 7


def test_a_few_epochs_learn_something(make_config) -> None:
    cfg = make_config(
        "trainer.max_epochs=3", "trainer.accelerator=cpu", "logger=csv", "trainer.devices=1"
    )
    metrics = train(cfg)
    assert metrics["test/acc"] > 0.8  # digits, 3 epochs: far above the 0.1 of guessing
    assert {"val/acc_best", "val/acc_gap", "train/acc", "test/f1_macro", "test/ece"} <= set(metrics)
    output = Path(cfg.paths.output_dir)
    assert (output / "checkpoints" / "best.ckpt").is_file()
    assert (output / "checkpoints" / "last.ckpt").is_file()
    assert (output / "csv" / "metrics.csv").is_file()


@pytest.mark.parametrize(
    ("precision", "dtype"), [("bf16-mixed", torch.bfloat16), ("32-true", torch.float32)]
)
def test_precision_passes_through_on_cpu(
    make_config, monkeypatch: pytest.MonkeyPatch, precision: str, dtype: torch.dtype
) -> None:
    cfg = make_config(*FAST, f"trainer.precision={precision}")
    metrics, probe = run_with_probe(cfg, monkeypatch)
    assert probe.logits and {d for _, d in probe.logits} == {dtype}  # the forward ran in it
    assert all(p.dtype == torch.float32 for p in probe.after.values())  # weights stay fp32
    assert metrics["global_step"] == 1.0 and torch.isfinite(torch.tensor(probe.losses)).all()
    written = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert written["status"] == "completed"


def test_channels_last_gives_the_same_outputs() -> None:
    torch.manual_seed(0)
    plain = build_classifier("resnet18", num_classes=5, in_channels=3)
    torch.manual_seed(0)
    nhwc = build_classifier("resnet18", num_classes=5, in_channels=3, channels_last=True)
    assert nhwc.features.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(plain.eval()(x), nhwc.eval()(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("channels_last", [True, False])
def test_channels_last_trains_through_the_cli_config(
    make_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, channels_last: bool
) -> None:
    # RGB data: with one input channel a NCHW tensor is also trivially channels_last.
    data = data_overrides("fake", tmp_path)
    cfg = make_config(*FAST, *data, "data.batch_size=4", f"model.channels_last={channels_last}")
    metrics, probe = run_with_probe(cfg, monkeypatch)
    # Every conv of the training step saw NHWC inputs and NHWC weights (or, off, none did).
    assert probe.conv_inputs_channels_last == [channels_last] * 5  # small_cnn: 5 convs
    assert probe.conv_weights_channels_last == [channels_last] * 5
    convs = [p for p in probe.after.values() if p.ndim == 4]
    assert [p.is_contiguous(memory_format=CHANNELS_LAST) for p in convs] == [channels_last] * 5
    assert metrics["global_step"] == 1.0


@pytest.mark.slow
def test_compiled_model_matches_eager() -> None:
    torch.manual_seed(0)
    eager = build_classifier("small_cnn", num_classes=3, in_channels=1, width=4).eval()
    torch.manual_seed(0)
    compiled = build_classifier("small_cnn", 3, 1, width=4, compile=True).eval()
    assert set(compiled.state_dict()) == set(eager.state_dict())  # checkpoints unchanged
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(eager(x), compiled(x), rtol=1e-4, atol=1e-5)


def test_compile_reaches_the_embedding_protonet_and_multitask_predict_from(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Observed: `model.compile=true` compiled `__call__` only, so `model.embed` (ProtoNet,
    multi-task) ran eager. The `eager` backend traces with Dynamo without generating code."""
    compile_module = nn.Module.compile
    monkeypatch.setattr(nn.Module, "compile", lambda m: compile_module(m, backend="eager"))
    torch._dynamo.reset()
    model = build_classifier("small_cnn", num_classes=3, in_channels=1, width=4, compile=True)
    seen: list[bool] = []
    model.features[0].register_forward_hook(lambda *_: seen.append(torch.compiler.is_compiling()))
    model.embed(torch.randn(2, 1, 8, 8))
    model(torch.randn(2, 1, 8, 8))
    assert seen == [True, True]


def test_maml_refuses_a_compiled_model() -> None:
    from posttrain.methods.meta import MAML

    model = build_classifier("small_cnn", num_classes=3, in_channels=1, width=4, compile=True)
    for first_order in (False, True):
        with pytest.raises(PosttrainError, match=r"model.compile=true. does not apply to MAML"):
            MAML(first_order=first_order).prepare(model)


def test_divergence_guard_flags_a_nonfinite_loss_once_per_epoch() -> None:
    guard = DivergenceGuard()
    guard.observe(torch.tensor(1.0))
    guard.check(epoch=0)  # finite: nothing to report
    guard.observe(torch.tensor(float("nan")))
    guard.observe(torch.tensor(2.0))  # a later finite step does not hide the NaN
    with pytest.raises(PosttrainError, match=r"epoch 1\. Lower `optimizer.lr`"):
        guard.check(epoch=1)
    guard.check(epoch=2)  # the flag is per epoch


def test_divergence_guard_compares_the_loss_without_the_penalty() -> None:
    """The reference was the first step's loss with the penalty (1e8 under a huge L2 weight),
    while each epoch's `train/loss` has none: a blow-up of the loss to 1e3 stayed under the
    limit. A NaN/inf of the total still stops the run."""
    guard = DivergenceGuard()
    guard.observe(torch.tensor(2.3), total=torch.tensor(1e8))
    with pytest.raises(PosttrainError, match="mean training loss of epoch 0 is 1000"):
        guard.check(epoch=0, epoch_loss=torch.tensor(1e3))
    guard.observe(torch.tensor(2.3), total=torch.tensor(float("inf")))
    with pytest.raises(PosttrainError, match="NaN/inf in epoch 1"):
        guard.check(epoch=1)


def test_a_diverging_run_stops_with_a_clear_error(make_config) -> None:
    cfg = make_config(
        "reg=l2", "reg.l2.weight=1e39", "trainer.max_epochs=2",  # penalty overflows to inf
        "trainer.limit_train_batches=4", "trainer.limit_val_batches=1", "logger=none",
        "callbacks.progress_bar=null",
    )  # fmt: skip
    with pytest.raises(PosttrainError, match="Training diverged"):
        train(cfg)


def test_step_loss_is_logged_on_every_logging_step(make_config) -> None:
    cfg = make_config(
        "logger=csv", "trainer.log_every_n_steps=2", "trainer.max_epochs=1",
        "trainer.limit_train_batches=6", "trainer.limit_val_batches=1",
    )  # fmt: skip
    train(cfg)
    with (Path(cfg.paths.output_dir) / "csv" / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    logged_steps = [int(row["step"]) for row in rows if row.get("train/loss_step")]
    assert logged_steps == [1, 3, 5]


def test_accuracy_gap_subtracts_the_same_epochs_validation(make_config) -> None:
    """With validation every 2nd epoch, epoch 2's gap was its `train/acc` minus epoch 1's
    `val/acc`, and that mixed number was the run's final `val/acc_gap` in metrics.json."""
    cfg = make_config(
        "logger=csv", "callbacks.progress_bar=null", "callbacks.run_statement=null",
        "trainer.max_epochs=3", "trainer.check_val_every_n_epoch=2",
        "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1", "trainer.num_sanity_val_steps=0",
    )  # fmt: skip
    metrics = train(cfg)
    with (Path(cfg.paths.output_dir) / "csv" / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))

    def by_epoch(name: str) -> dict[int, float]:
        return {int(row["epoch"]): float(row[name]) for row in rows if row.get(name)}

    train_acc, val_acc, gap = by_epoch("train/acc"), by_epoch("val/acc"), by_epoch("val/acc_gap")
    assert sorted(train_acc) == [0, 1, 2] and sorted(val_acc) == [1]
    assert sorted(gap) == [1]
    assert gap[1] == pytest.approx(train_acc[1] - val_acc[1])
    assert metrics["val/acc_gap"] == pytest.approx(gap[1])


def test_the_record_counts_the_images_validation_and_test_scored(make_config) -> None:
    """Observed: `trainer.limit_val_batches=0.5` scored `val/*` (and the sweep objective
    `val/acc_best`) on 64 of the 143 validation images, and nothing in the record said so."""
    cfg = make_config(
        "logger=none", "callbacks.progress_bar=null", "callbacks.run_statement=null",
        "trainer.max_epochs=1", "trainer.limit_train_batches=2", "model.width=4",
        "data.eval_batch_size=32", "trainer.limit_val_batches=0.5",
    )  # fmt: skip
    metrics = train(cfg)
    assert metrics["val/images"] == 64  # 2 of the 5 batches of 32 (143 images)
    assert metrics["test/images"] == 359  # the whole test split
