"""Fast runs of the real composed configs through `posttrain.train.train`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from posttrain.errors import PosttrainError
from posttrain.methods.metrics import DivergenceGuard
from posttrain.models import build_classifier
from posttrain.train import train
from tests.fixtures import write_cifar, write_image_folder

FAST = ["trainer.fast_dev_run=true", "trainer.accelerator=cpu", "trainer.devices=1"]


def data_overrides(data: str, tmp_path: Path) -> list[str]:
    """Overrides that point each data option at a small offline dataset."""
    if data == "cifar10":
        write_cifar(tmp_path / "cifar")
        return ["data=cifar10", f"data.root={tmp_path / 'cifar'}", "data.download=false"]
    if data == "imagefolder":
        write_image_folder(tmp_path / "images", classes=3, per_class=10)
        return ["data=imagefolder", f"data.root={tmp_path / 'images'}", "data.options.size=32"]
    if data == "fake":
        return ["data=fake", "data.options.num_samples=64", "data.options.size=16"]
    return ["data=digits"]


@pytest.mark.parametrize("model", ["small_cnn", "resnet18", "resnet50"])
@pytest.mark.parametrize("data", ["digits", "fake", "cifar10", "imagefolder"])
def test_fast_dev_run_every_model_and_data(make_config, tmp_path: Path, model: str, data: str):
    cfg = make_config(*FAST, f"model={model}", *data_overrides(data, tmp_path), "data.batch_size=4")
    metrics = train(cfg)
    assert 0.0 <= metrics["test/acc"] <= 1.0
    assert torch.isfinite(torch.tensor(metrics["test/loss"]))
    written = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert written["status"] == "completed" and written["test/acc"] == metrics["test/acc"]


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


@pytest.mark.parametrize("precision", ["bf16-mixed"])
def test_precision_passes_through_on_cpu(make_config, precision: str) -> None:
    cfg = make_config(*FAST, f"trainer.precision={precision}")
    assert train(cfg)["test/acc"] >= 0.0


def test_channels_last_gives_the_same_outputs() -> None:
    torch.manual_seed(0)
    plain = build_classifier("resnet18", num_classes=5, in_channels=3)
    torch.manual_seed(0)
    nhwc = build_classifier("resnet18", num_classes=5, in_channels=3, channels_last=True)
    assert nhwc.features.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(plain.eval()(x), nhwc.eval()(x), rtol=1e-4, atol=1e-5)


def test_channels_last_trains_through_the_cli_config(make_config) -> None:
    cfg = make_config(*FAST, "model.channels_last=true")
    assert train(cfg)["test/acc"] >= 0.0


@pytest.mark.slow
def test_compiled_model_matches_eager() -> None:
    torch.manual_seed(0)
    eager = build_classifier("small_cnn", num_classes=3, in_channels=1, width=4).eval()
    torch.manual_seed(0)
    compiled = build_classifier("small_cnn", 3, 1, width=4, compile=True).eval()
    assert set(compiled.state_dict()) == set(eager.state_dict())  # checkpoints unchanged
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(eager(x), compiled(x), rtol=1e-4, atol=1e-5)


def test_divergence_guard_flags_a_nonfinite_loss_once_per_epoch() -> None:
    guard = DivergenceGuard()
    guard.observe(torch.tensor(1.0))
    guard.check(epoch=0)  # finite: nothing to report
    guard.observe(torch.tensor(float("nan")))
    guard.observe(torch.tensor(2.0))  # a later finite step does not hide the NaN
    with pytest.raises(PosttrainError, match=r"epoch 1\. Lower `optimizer.lr`"):
        guard.check(epoch=1)
    guard.check(epoch=2)  # the flag is per epoch


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
