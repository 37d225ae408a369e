"""Every (method, regularizer) pair either trains and shows the regularizer's effect, or is
refused at start-up with one paragraph. No pair may be silently ignored.

The expected refusals are written out here, not derived from the code, so a pairing that
starts or stops being supported fails this test until the table (and the README) change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, WeightAveraging
from torch import Tensor, nn

import posttrain.runs
from posttrain.checkpoints import load_checkpoint
from posttrain.errors import PosttrainError
from posttrain.methods.metrics import documented_metric
from posttrain.train import train
from tests.conftest import CONF, compose_config

METHODS: dict[str, list[str]] = {
    "supervised": ["model.width=8"],
    "finetune": ["method=finetune", "model.width=8"],
    "distill": ["method=distill", "model.width=8"],
    "maml": ["experiment=digits_maml", "model.hidden=8", "data.queries=3", "data.image_size=16"],
    "protonet": ["experiment=digits_protonet", "model.hidden=8", "data.image_size=16"],
    "multitask": ["experiment=digits_multitask", "model.width=8"],
}
REGULARIZERS = sorted(path.stem for path in (CONF / "reg").glob("*.yaml"))
FAST = ["debug=limit", "logger=none", "trainer.accelerator=cpu", "trainer.devices=1"]
REFUSED: dict[tuple[str, str], str] = {
    **{(m, r): "image" for m in ("maml", "protonet") for r in ("augment", "mixup", "cutmix")},
    ("protonet", "l2sp"): "reg.l2sp.beta=0",
    ("multitask", "mixup"): "soft",
    ("multitask", "cutmix"): "soft",
}


def test_the_matrix_lists_every_method_and_regularizer() -> None:
    assert set(METHODS) == {path.stem for path in (CONF / "method").glob("*.yaml")}
    assert {
        "none",
        "l1",
        "l2",
        "l2sp",
        "dropout",
        "augment",
        "mixup",
        "cutmix",
        "ema",
        "swa",
    } <= set(REGULARIZERS)


class Probe:
    """Captures the built DataModule/method/trainer and what the regularizers did."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.built: dict[str, Any] = {}
        self.transform_calls: list[tuple[bool, bool]] = []  # (images changed, targets soft)
        self.dropout_calls: list[tuple[bool, float]] = []  # (training, fraction zeroed)
        self.smoothing: list[float] = []
        build_components, build_trainer = (
            posttrain.runs.build_components,
            posttrain.runs.build_trainer,
        )

        def components(cfg: Any) -> Any:
            datamodule, method = build_components(cfg)
            self.built.update(datamodule=datamodule, method=method)
            self.spy_transforms(datamodule)
            self.spy_dropout(method.model.head_dropout)
            return datamodule, method

        def trainer(*args: Any, **kwargs: Any) -> Any:
            self.built["trainer"] = built = build_trainer(*args, **kwargs)
            return built

        cross_entropy = torch.nn.functional.cross_entropy

        def recording_cross_entropy(*args: Any, label_smoothing: float = 0.0, **kwargs: Any):
            self.smoothing.append(label_smoothing)
            return cross_entropy(*args, label_smoothing=label_smoothing, **kwargs)

        monkeypatch.setattr(posttrain.runs, "build_components", components)
        monkeypatch.setattr(posttrain.runs, "build_trainer", trainer)
        monkeypatch.setattr(torch.nn.functional, "cross_entropy", recording_cross_entropy)

    def spy_transforms(self, datamodule: Any) -> None:
        def spied(transform: Any) -> Any:
            def run(images: Tensor, targets: Any) -> tuple[Tensor, Any]:
                out_images, out_targets = transform(images, targets)
                soft = isinstance(out_targets, Tensor) and out_targets.is_floating_point()
                self.transform_calls.append((not torch.equal(out_images, images), soft))
                return out_images, out_targets

            return run

        datamodule.train_transforms[:] = [spied(t) for t in datamodule.train_transforms]

    def spy_dropout(self, layer: nn.Module) -> None:
        def hook(module: nn.Module, inputs: tuple[Tensor], output: Tensor) -> None:
            zeroed = float((output == 0).float().mean() - (inputs[0] == 0).float().mean())
            self.dropout_calls.append((module.training, zeroed))

        layer.register_forward_hook(hook)


def penalized_weights(method: Any) -> list[tuple[str, Tensor]]:
    """Every trained weight matrix/kernel of the method, found without asking the method:
    all of them but ProtoNet's linear head, which it never uses."""
    unused = "model.head." if method.method_name == "protonet" else "-"
    return [
        (name, p)
        for name, p in method.named_parameters()
        if p.requires_grad and p.ndim > 1 and not name.startswith(unused)
    ]


def show_effect(regularizer: str, probe: Probe, metrics: dict[str, float]) -> None:
    """The regularizer changed training the way it claims to."""
    method, trainer = probe.built["method"], probe.built["trainer"]
    if regularizer in ("l1", "l2", "l2sp"):
        assert metrics["train/penalty"] > 0
        method.zero_grad(set_to_none=True)
        method.regularizers.penalty(method.regularized_parts()).backward()
        for name, weight in penalized_weights(method):  # task heads included
            assert weight.grad is not None and weight.grad.abs().sum() > 0, name
    else:
        assert "train/penalty" not in metrics
    if regularizer == "dropout":
        training_calls = [zeroed for training, zeroed in probe.dropout_calls if training]
        assert training_calls and max(training_calls) > 0.2  # p=0.5 zeroes about half
        assert all(zeroed == 0 for training, zeroed in probe.dropout_calls if not training)
    else:
        assert isinstance(method.model.head_dropout, nn.Identity)
    if regularizer == "augment":
        assert probe.transform_calls and all(changed for changed, _ in probe.transform_calls)
    if regularizer in ("mixup", "cutmix"):
        assert probe.transform_calls and all(soft for _, soft in probe.transform_calls)
    if regularizer not in ("augment", "mixup", "cutmix"):
        assert not probe.transform_calls
    assert (0.1 in probe.smoothing) == (regularizer == "label_smoothing")
    averages = [c for c in trainer.callbacks if isinstance(c, WeightAveraging)]
    if regularizer in ("ema", "swa"):
        # The checkpoints hold the average (the raw weights ride along), and the test ran on
        # best.ckpt's averaged weights.
        assert len(averages) == 1
        folder = Path(trainer.checkpoint_callback.dirpath)
        last = load_checkpoint(folder / "last.ckpt", "ckpt_path")
        saved, raw = last["state_dict"], last["current_model_state"]
        assert int(last["averaging_state"]["n_averaged"]) > 0
        weights = [k for k, v in raw.items() if isinstance(v, Tensor) and v.is_floating_point()]
        assert any(not torch.equal(saved[k], raw[k]) for k in weights)
        best = load_checkpoint(folder / "best.ckpt", "ckpt_path")["state_dict"]
        for name, value in method.state_dict().items():
            assert not isinstance(value, Tensor) or torch.equal(best[name], value), name
    else:
        assert not averages
    stoppers = [c for c in trainer.callbacks if isinstance(c, EarlyStopping)]
    if regularizer == "early_stopping":
        (stopper,) = stoppers
        assert stopper.monitor == "val/acc" and torch.isfinite(stopper.best_score)
    else:
        assert not stoppers


@pytest.fixture(scope="module")
def pretrained_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What `method=finetune` fine-tunes: a state dict of the matrix's small CNN."""
    from posttrain.models import build_classifier

    path = tmp_path_factory.mktemp("weights") / "small_cnn.pt"
    torch.save(build_classifier("small_cnn", 10, 1, width=8).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What `method=distill` learns from: a one-epoch run of another architecture."""
    run = tmp_path_factory.mktemp("teacher") / "run"
    teacher = ["model=convnet4", "model.hidden=8", "data.image_size=16", "trainer.max_epochs=1"]
    train(compose_config(run, [*FAST, *teacher]))
    return run / "checkpoints" / "best.ckpt"


@pytest.fixture(scope="module")
def convnet4_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What `reg=l2sp` pulls the meta-learners' backbone toward: a state dict of their net."""
    from posttrain.models import build_classifier

    path = tmp_path_factory.mktemp("weights") / "convnet4.pt"
    torch.save(build_classifier("convnet4", 10, 1, hidden=8).state_dict(), path)
    return path


def source_weights(method: str, regularizer: str, request: pytest.FixtureRequest) -> list[str]:
    """The files a method starts from or learns from, built only where needed: fine-tuning
    and L2-SP (whose reference is the pretrained backbone) need `model.pretrained`."""
    sources = []
    if method == "finetune" or regularizer == "l2sp":
        weights = "convnet4_weights" if method in ("maml", "protonet") else "pretrained_weights"
        sources.append(f"model.pretrained={request.getfixturevalue(weights)}")
    if method == "distill":
        sources.append(f"method.teacher={request.getfixturevalue('teacher_checkpoint')}")
    return sources


@pytest.mark.slow
@pytest.mark.parametrize("regularizer", REGULARIZERS)
@pytest.mark.parametrize("method", list(METHODS))
def test_method_and_regularizer_pair(
    method: str,
    regularizer: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    torch.set_num_threads(1)  # tiny models: threads only add contention on a busy machine
    weights = source_weights(method, regularizer, request)
    # SWA averages from epoch 0 of the two: from its default start it would hold one epoch.
    averaged_from = ["reg.swa.start_epoch=0"] if regularizer == "swa" else []
    overrides = [*METHODS[method], *weights, *FAST, f"reg={regularizer}", *averaged_from]
    cfg = compose_config(tmp_path / "run", overrides)
    probe = Probe(monkeypatch)
    if (method, regularizer) in REFUSED:
        with pytest.raises(PosttrainError, match=REFUSED[(method, regularizer)]) as refused:
            train(cfg)
        message = str(refused.value)
        assert f"`reg={regularizer}`" in message and f"`method={method}`" in message
        assert "trainer" not in probe.built  # refused before any work
        return
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert [name for name in metrics if not documented_metric(name)] == []
    show_effect(regularizer, probe, metrics)


def test_mixup_and_cutmix_together_switch_per_batch(tmp_path: Path) -> None:
    """Both selected: each batch gets one of them (cutmix with `switch_prob`), never both."""
    from posttrain.regularizers.mixing import MixupOrCutMix

    cfg = compose_config(tmp_path / "run", ["reg=[mixup,cutmix]", "reg.cutmix.switch_prob=0.5"])
    datamodule, method = posttrain.runs.build_components(cfg)
    (member,) = method.regularizers.members
    assert isinstance(member, MixupOrCutMix)
    (transform,) = datamodule.train_transforms
    torch.manual_seed(0)
    images = torch.rand(16, 1, 8, 8)
    labels = torch.arange(16) % 10
    kinds = []
    for _ in range(40):
        mixed, targets = transform(images, labels)
        # CutMix pastes boxes: every pixel comes from one of the two images unchanged, so
        # most pixels equal the original; Mixup blends every pixel.
        unchanged = (mixed == images).float().mean()
        kinds.append("cutmix" if unchanged > 0.3 else "mixup")
        assert targets.shape == (16, 10) and torch.allclose(targets.sum(1), torch.ones(16))
    assert 8 <= kinds.count("cutmix") <= 32, kinds  # about half of 40 at switch_prob=0.5


def test_switch_prob_without_mixup_is_refused(tmp_path: Path) -> None:
    cfg = compose_config(tmp_path / "run", ["reg=cutmix", "reg.cutmix.switch_prob=0.2"])
    with pytest.raises(Exception) as caught:
        posttrain.runs.build_components(cfg)
    error = posttrain.runs.find_user_error(caught.value)
    assert error is not None and "reg.cutmix.switch_prob" in str(error)
