"""Each regularizer changes what it should, alone and composed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from posttrain.data import ImageClassificationDataModule
from posttrain.errors import PosttrainError
from posttrain.methods.supervised import SupervisedClassifier
from posttrain.models import build_classifier
from posttrain.regularizers import RegularizerSet
from posttrain.regularizers.augment import Augment
from posttrain.regularizers.base import ModelParts
from posttrain.regularizers.dropout import Dropout
from posttrain.regularizers.mixing import CutMix, Mixup
from posttrain.regularizers.penalties import L1Penalty, L2Penalty
from posttrain.regularizers.targets import EarlyStopping, LabelSmoothing
from posttrain.runs import build_components


def model(arch: str = "small_cnn") -> nn.Module:
    torch.manual_seed(0)
    return build_classifier(arch, num_classes=10, in_channels=1)


@pytest.mark.parametrize("penalty_class", [L1Penalty, L2Penalty])
def test_penalty_is_positive_and_grows_with_weight(penalty_class) -> None:
    network = model()
    small = float(penalty_class(weight=1e-4).penalty(ModelParts.of_classifier(network)))
    large = float(penalty_class(weight=1e-2).penalty(ModelParts.of_classifier(network)))
    assert 0 < small < large
    assert large == pytest.approx(100 * small, rel=1e-5)
    assert penalty_class(weight=0.0).penalty(ModelParts.of_classifier(network)) == 0


def test_l2_excludes_biases_and_norms_unless_asked() -> None:
    network = model()
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.fill_(100.0)
    plain = float(L2Penalty(weight=1.0).penalty(ModelParts.of_classifier(network)))
    with_1d = float(
        L2Penalty(weight=1.0, include_1d=True).penalty(ModelParts.of_classifier(network))
    )
    assert with_1d > plain + 1000
    expected = 0.5 * sum(p.pow(2).sum() for p in network.parameters() if p.ndim > 1)
    assert plain == pytest.approx(float(expected), rel=1e-5)


def test_penalty_gradient_reaches_the_weights() -> None:
    network = model()
    L2Penalty(weight=1.0).penalty(ModelParts.of_classifier(network)).backward()
    assert torch.allclose(network.head.weight.grad, network.head.weight)


@pytest.mark.parametrize("arch", ["small_cnn", "resnet18"])
def test_dropout_is_inserted_before_the_head_with_p(arch: str) -> None:
    network = model(arch)
    Dropout(p=0.3).modify_model(ModelParts.of_classifier(network))
    assert isinstance(network.head_dropout, nn.Dropout) and network.head_dropout.p == 0.3
    network.train()
    x = torch.randn(4, 1, 32, 32)
    assert not torch.equal(network(x), network(x))  # stochastic in training
    network.eval()
    assert torch.equal(network(x), network(x))


def test_dropout_sets_existing_dropout_layers() -> None:
    network = model()
    network.features.append(nn.Dropout(0.9))
    Dropout(p=0.2).modify_model(ModelParts.of_classifier(network))
    assert all(m.p == 0.2 for m in network.modules() if isinstance(m, nn.Dropout))


def digits_with(*regularizers) -> tuple[ImageClassificationDataModule, nn.Module]:
    datamodule = ImageClassificationDataModule(dataset="digits", image_size=16, batch_size=32)
    datamodule.setup()
    network = model()
    method = SupervisedClassifier(
        network, {"name": "adamw", "lr": 1e-3}, {"name": "none"}, RegularizerSet(regularizers)
    )
    method.regularizers.attach(method, datamodule)
    return datamodule, network


def batch_as(datamodule: ImageClassificationDataModule, training: bool):
    datamodule.trainer = SimpleNamespace(training=training)
    raw = next(iter(datamodule.val_dataloader()))
    torch.manual_seed(1)
    return datamodule.on_after_batch_transfer(raw, 0)


@pytest.mark.parametrize("policy", ["basic", "randaugment", "trivialaugment"])
def test_augmentation_changes_training_batches_only(policy: str) -> None:
    plain, _ = digits_with()
    augmented, _ = digits_with(Augment(policy=policy))
    reference = batch_as(plain, training=True)[0]
    assert torch.equal(batch_as(augmented, training=False)[0], reference)
    changed = batch_as(augmented, training=True)[0]
    assert changed.shape == reference.shape
    per_image = (changed - reference).flatten(1).abs().sum(1) > 0
    assert per_image.float().mean() > 0.5  # each image draws its own transformation


@pytest.mark.parametrize("policy", ["basic", "trivialaugment"])
@pytest.mark.parametrize(("key", "value"), [("magnitude", 0), ("magnitude", 30), ("num_ops", 5)])
def test_randaugment_knobs_are_refused_with_a_policy_that_ignores_them(
    policy: str, key: str, value: int
) -> None:
    """Observed: `reg.augment.policy=trivialaugment` with magnitude=0 and with magnitude=30
    num_ops=5 gave identical metrics: TrivialAugment draws its own magnitude and applies one
    op, `basic` none; the knobs were accepted and ignored."""
    with pytest.raises(PosttrainError) as refused:
        Augment(policy=policy, **{key: value})
    message = str(refused.value)
    assert f"`reg.augment.{key}`" in message and "randaugment" in message, message
    assert policy in message and "\n" not in message
    Augment(policy="randaugment", **{key: value})  # where they apply, they are accepted


@pytest.mark.parametrize(
    ("options", "said"),
    [
        ({"magnitude": 4.5}, "reg.augment.magnitude"),
        ({"magnitude": 31}, "reg.augment.magnitude"),
        ({"num_ops": 0}, "reg.augment.num_ops"),
        ({"num_ops": 1.5}, "reg.augment.num_ops"),
    ],
)
def test_randaugment_knob_values_are_checked(options: dict, said: str) -> None:
    """A float magnitude used to fail inside torchvision at the first training batch."""
    with pytest.raises(PosttrainError, match=said.replace(".", r"\.")):
        Augment(policy="randaugment", **options)


def test_randaugment_knobs_change_the_batches() -> None:
    """The knobs it accepts take effect: another magnitude, other training images."""
    images = torch.rand(8, 1, 16, 16)
    outputs = []
    for magnitude, num_ops in ((0, 2), (30, 2), (30, 5)):
        torch.manual_seed(0)
        transform = Augment("randaugment", translate=0, magnitude=magnitude, num_ops=num_ops)
        outputs.append(transform.batch_transform(10)(images, torch.zeros(8))[0])
    assert not torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[1], outputs[2])


def test_translation_is_per_image_and_whole_pixel() -> None:
    from posttrain.regularizers.augment import random_translate_flip

    images = torch.zeros(64, 1, 8, 8)
    images[:, :, 4, 4] = 1.0
    torch.manual_seed(0)
    shifted = random_translate_flip(images, translate=0.25, flip=False)
    positions = {tuple((image[0] == 1).nonzero()[0].tolist()) for image in shifted}
    assert len(positions) > 5
    assert all(abs(r - 4) <= 2 and abs(c - 4) <= 2 for r, c in positions)
    assert torch.equal(shifted.sum((1, 2, 3)), torch.ones(64))  # moved, not blurred


@pytest.mark.parametrize("mixer", [Mixup(alpha=0.4), CutMix(alpha=1.0)])
def test_mixing_mixes_labels(mixer) -> None:
    datamodule, _ = digits_with(mixer)
    _images, targets = batch_as(datamodule, training=True)
    assert targets.is_floating_point() and targets.shape == (32, 10)
    assert torch.allclose(targets.sum(1), torch.ones(32))
    assert ((targets > 0).sum(1) == 2).any()  # at least one pair really got two labels
    _, val_targets = batch_as(datamodule, training=False)
    assert val_targets.dtype == torch.long


def test_label_smoothing_and_callbacks_dispatch() -> None:
    regularizers = RegularizerSet([LabelSmoothing(0.1), EarlyStopping(patience=3)])
    assert regularizers.label_smoothing == pytest.approx(0.1)
    (callback,) = regularizers.callbacks()
    assert callback.patience == 3 and callback.monitor == "val/acc"
    assert RegularizerSet().penalty(ModelParts.of_classifier(model())) is None


@pytest.mark.parametrize(
    ("build", "key"),
    [
        (lambda: L2Penalty(weight=-1), "reg.l2.weight"),
        (lambda: L1Penalty(weight="x"), "reg.l1.weight"),
        (lambda: Dropout(p=1.5), "reg.dropout.p"),
        (lambda: Augment(policy="autoaugment"), "reg.augment.policy"),
        (lambda: Mixup(alpha=0), "reg.mixup.alpha"),
        (lambda: LabelSmoothing(epsilon=1.0), "reg.label_smoothing.epsilon"),
        (lambda: EarlyStopping(patience=0), "reg.early_stopping.patience"),
        (lambda: L2Penalty(weight=True), "reg.l2.weight"),
        # A typo or a wrong mode was a traceback after the first epoch.
        (lambda: EarlyStopping(monitor="val/accc"), "reg.early_stopping.monitor"),
        (lambda: EarlyStopping(monitor="test/acc"), "reg.early_stopping.monitor"),
        (lambda: EarlyStopping(mode="maximum"), "reg.early_stopping.mode"),
        (lambda: EarlyStopping(patience=2.5), "reg.early_stopping.patience"),
    ],
)
def test_bad_strengths_name_the_key(build, key: str) -> None:
    with pytest.raises(PosttrainError, match=key.replace(".", r"\.")):
        build()


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("reg.l1.include_1d=no", "reg.l1.include_1d"),
        ("reg.l2.include_1d=no", "reg.l2.include_1d"),
        ("reg.augment.flip=no", "reg.augment.flip"),
    ],
)
def test_switches_spelled_no_are_refused_not_read_as_true(make_config, override, key) -> None:
    """Hydra keeps `no` a string, which is truthy: `reg.l2.include_1d=no` penalized biases
    and norms, `reg.augment.flip=no` flipped the digits."""
    from hydra.utils import instantiate

    from posttrain.runs import find_user_error

    cfg = make_config("reg=[l1,l2,augment]", override)
    with pytest.raises(Exception) as raised:
        [instantiate(entry) for entry in cfg.reg.values()]
    error = find_user_error(raised.value)
    assert error is not None and f"`{key}` must be true or false" in str(error)


def test_several_regularizers_compose_from_config(make_config) -> None:
    cfg = make_config("reg=[dropout,l2,augment,label_smoothing]", "reg.l2.weight=0.01")
    assert set(cfg.reg) == {"dropout", "l2", "augment", "label_smoothing"}
    datamodule, method = build_components(cfg)
    assert isinstance(method.model.head_dropout, nn.Dropout)
    assert len(datamodule.train_transforms) == 1
    assert method.regularizers.label_smoothing == pytest.approx(0.1)
    assert method.regularizers.penalty(method.regularized_parts()) > 0


def test_none_is_the_empty_baseline(make_config) -> None:
    _, method = build_components(make_config("reg=none"))
    assert not method.regularizers
    assert isinstance(method.model.head_dropout, nn.Identity)


def test_training_with_every_regularizer_runs(make_config) -> None:
    from posttrain.train import train

    cfg = make_config(
        "reg=[dropout,l1,l2,augment,mixup,cutmix,label_smoothing,early_stopping]",
        "trainer.fast_dev_run=true",
        "trainer.accelerator=cpu",
    )
    metrics = train(cfg)
    assert "train/penalty" in metrics and metrics["train/penalty"] > 0


def test_early_stopping_on_the_loss_needs_mode_min() -> None:
    """`reg.early_stopping.monitor=val/loss` with the default `mode=max` stopped training
    `patience` epochs in while the loss was still falling."""
    with pytest.raises(PosttrainError, match=r"reg\.early_stopping\.mode=min"):
        EarlyStopping(monitor="val/loss", mode="max")
    assert EarlyStopping(monitor="val/loss", mode="min").callbacks()[0].mode == "min"


def test_early_stopping_on_a_metric_the_method_does_not_log_is_one_paragraph(make_config) -> None:
    """ProtoNet logs no `val/f1_macro`: Lightning's RuntimeError traceback after an epoch."""
    from posttrain.train import train

    cfg = make_config(
        "experiment=digits_protonet", "reg=early_stopping",
        "reg.early_stopping.monitor=val/f1_macro",
        "logger=none", "callbacks=none", "trainer.accelerator=cpu", "trainer.max_epochs=1",
        "+trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
        "trainer.num_sanity_val_steps=0",
    )  # fmt: skip
    with pytest.raises(PosttrainError, match=r"val/f1_macro.*does not log it.*`val/acc`"):
        train(cfg)
