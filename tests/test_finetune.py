"""Pretrained weights from every source, fine-tuning policies, discriminative LRs, L2-SP."""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from posttrain.errors import PosttrainError
from posttrain.methods.finetune import FinetuneSettings
from posttrain.models import build_classifier
from posttrain.models.pretrained import load_pretrained
from posttrain.regularizers.base import ModelParts
from posttrain.regularizers.penalties import L2SP
from posttrain.train import train
from tests.conftest import add_callbacks
from tests.fixtures import write_cifar, write_malicious_checkpoint

CPU = ["trainer.accelerator=cpu", "logger=none", "callbacks.progress_bar=null"]


def place_torchvision_weights(torch_home: Path, arch: str, monkeypatch) -> dict:
    """Put a state dict where torchvision's download would cache `arch`'s DEFAULT weights,
    under a URL whose file name carries this file's own sha256 prefix (as torchvision's do),
    so the hub cache check accepts it as the published file."""
    import hashlib

    from torchvision import models

    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    enum = models.get_model_weights(arch)
    torch.manual_seed(123)
    state = models.get_model(arch, weights=None).state_dict()
    cache = torch_home / "hub" / "checkpoints"
    cache.mkdir(parents=True, exist_ok=True)
    staged = cache / "staged.pth"
    torch.save(state, staged)
    name = f"{arch}-{hashlib.sha256(staged.read_bytes()).hexdigest()[:8]}.pth"
    staged.rename(cache / name)
    url = f"https://download.pytorch.org/models/{name}"
    monkeypatch.setattr(enum, "url", property(lambda self: url))
    return state


def test_a_wrong_or_partial_file_in_the_hub_cache_is_refused(tmp_path, monkeypatch) -> None:
    """torch checks the hash only when it downloads: random weights under the published name
    loaded as `torchvision resnet18 imagenet`, and a truncated copy said 'place the file'."""
    from torchvision import models

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    url = models.ResNet18_Weights.DEFAULT.url
    cache = tmp_path / "torch" / "hub" / "checkpoints" / Path(url).name
    cache.parent.mkdir(parents=True)
    torch.save(models.resnet18().state_dict(), cache)  # other weights under its name
    with pytest.raises(PosttrainError, match=r"(?s)is not the file published at .*Delete it"):
        build_classifier("resnet18", 4, 3, pretrained="imagenet")
    cache.write_bytes(cache.read_bytes()[:1000])  # a partial copy
    with pytest.raises(PosttrainError, match="its name says f37072fd"):
        build_classifier("resnet18", 4, 3, pretrained="imagenet")


def test_imagenet_name_loads_from_the_torch_hub_cache(tmp_path, monkeypatch, caplog) -> None:
    state = place_torchvision_weights(tmp_path / "torch", "resnet18", monkeypatch)
    with caplog.at_level(logging.INFO, logger="posttrain"):
        model = build_classifier("resnet18", num_classes=7, in_channels=3, pretrained="imagenet")
    assert torch.equal(model.features.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    assert model.head.out_features == 7
    assert "head replaced" in caplog.text and "(1000, 512)" in caplog.text
    # which weights `imagenet` stood for (torchvision has moved DEFAULT between releases)
    assert "torchvision resnet18 imagenet (IMAGENET1K_V1, resnet18-" in caplog.text


def test_grayscale_model_adapts_the_rgb_stem(tmp_path, monkeypatch, caplog) -> None:
    state = place_torchvision_weights(tmp_path / "torch", "resnet18", monkeypatch)
    with caplog.at_level(logging.INFO, logger="posttrain"):
        model = build_classifier("resnet18", num_classes=3, in_channels=1, pretrained="imagenet")
    expected = state["conv1.weight"].sum(dim=1, keepdim=True)
    assert torch.allclose(model.features.conv1.weight, expected)
    assert "3 -> 1 input channels" in caplog.text


def test_unknown_weights_name_and_missing_file_are_clear() -> None:
    with pytest.raises(PosttrainError, match="valid names: imagenet, IMAGENET1K_V1"):
        build_classifier("resnet18", 10, 3, pretrained="imagenet22k")
    with pytest.raises(PosttrainError, match="does not exist"):
        build_classifier("resnet18", 10, 3, pretrained="/no/such/weights.pt")


def test_plain_state_dicts_in_both_layouts(tmp_path) -> None:
    from torchvision import models

    source = build_classifier("small_cnn", num_classes=10, in_channels=1)
    torch.save(source.state_dict(), tmp_path / "ours.pt")
    model = build_classifier("small_cnn", 4, 1, pretrained=str(tmp_path / "ours.pt"))
    assert torch.equal(model.features[0][0].weight, source.features[0][0].weight)
    resnet = models.resnet18().state_dict()
    torch.save(resnet, tmp_path / "tv.pth")
    model = build_classifier("resnet18", 4, 3, pretrained=str(tmp_path / "tv.pth"))
    assert torch.equal(model.features.conv1.weight, resnet["conv1.weight"])


def test_key_mismatches_are_reported_not_ignored(tmp_path, caplog) -> None:
    source = build_classifier("small_cnn", num_classes=10, in_channels=1).state_dict()
    del source["features.6.0.weight"]
    source["features.99.weight"] = torch.zeros(3)
    torch.save(source, tmp_path / "partial.pt")
    with caplog.at_level(logging.INFO, logger="posttrain"):
        load_pretrained(
            build_classifier("small_cnn", 10, 1), str(tmp_path / "partial.pt"), "small_cnn"
        )
    assert "missing from the source" in caplog.text and "features.6.0.weight" in caplog.text
    assert "not in the model" in caplog.text and "features.99.weight" in caplog.text


def test_weights_of_another_architecture_are_refused(tmp_path) -> None:
    from torchvision import models

    torch.save(models.resnet18().state_dict(), tmp_path / "resnet.pt")
    with pytest.raises(PosttrainError, match=r"tensors matches.*another architecture"):
        build_classifier("small_cnn", 10, 3, pretrained=str(tmp_path / "resnet.pt"))


def test_pickle_that_runs_code_is_refused(tmp_path) -> None:
    evil = write_malicious_checkpoint(tmp_path / "evil.pt")
    with pytest.raises(PosttrainError, match=r"model\.pretrained.*refused"):
        build_classifier("small_cnn", 10, 1, pretrained=str(evil))


@pytest.fixture(scope="module")
def pretrained_digits(tmp_path_factory) -> Path:
    """A real posttrain checkpoint: the small CNN after 2 short epochs on digits 0-4."""
    from tests.conftest import compose_config

    out = tmp_path_factory.mktemp("pretrain") / "run"
    train(compose_config(out, ["experiment=digits_pretrain", "debug=limit", *CPU]))
    return out / "checkpoints" / "best.ckpt"


def test_posttrain_checkpoint_is_a_pretrained_source(pretrained_digits: Path) -> None:
    checkpoint = torch.load(pretrained_digits, weights_only=True)
    model = build_classifier("small_cnn", 5, 1, pretrained=str(pretrained_digits))
    expected = checkpoint["state_dict"]["model.features.0.0.weight"]
    assert torch.equal(model.features[0][0].weight, expected)
    assert not torch.equal(model.head.weight, checkpoint["state_dict"]["model.head.weight"])
    kept = build_classifier(
        "small_cnn", 5, 1, pretrained=str(pretrained_digits), pretrained_head=True
    )
    assert torch.equal(kept.head.weight, checkpoint["state_dict"]["model.head.weight"])


def test_reinit_top_layers_restarts_only_the_top(
    make_config, pretrained_digits: Path, caplog
) -> None:
    from posttrain.runs import build_components, find_user_error

    checkpoint = torch.load(pretrained_digits, weights_only=True)["state_dict"]
    overrides = ["experiment=digits_transfer", f"model.pretrained={pretrained_digits}"]
    with caplog.at_level(logging.INFO, logger="posttrain"):
        _, method = build_components(make_config(*overrides, "method.finetune.reinit_top_layers=1"))
    assert "reinit_top_layers=1 re-initialized features.6 " in caplog.text
    state = method.model.state_dict()
    top, below = "features.6.0.weight", "features.4.0.weight"  # the last two conv blocks
    assert not torch.equal(state[top], checkpoint[f"model.{top}"])
    assert torch.equal(state[below], checkpoint[f"model.{below}"])
    with pytest.raises(Exception) as caught:  # Hydra wraps it; the CLI unwraps it the same way
        build_components(make_config(*overrides, "method.finetune.reinit_top_layers=9"))
    assert "reinit_top_layers` is 9, but the backbone" in str(find_user_error(caught.value))


@pytest.mark.parametrize(
    ("options", "refusal"),
    [
        ({"policy": "linear_probe"}, r"policy=linear_probe`: the linear probe freezes"),
        ({"freeze_bn_stats": True}, r"freeze_bn_stats=true`: frozen statistics"),
    ],
)
def test_reinit_top_layers_is_refused_where_it_cannot_work(options: dict, refusal: str) -> None:
    """Frozen, the fresh layers stay random; with frozen BN stats they normalize with 0/1."""
    with pytest.raises(PosttrainError, match=refusal) as raised:
        FinetuneSettings(weights="w.pt", reinit_top_layers=1, **options)
    assert "`method.finetune.reinit_top_layers=1`" in str(raised.value)
    FinetuneSettings(weights="w.pt", reinit_top_layers=1, policy="gradual")  # top released first


@pytest.mark.parametrize(
    ("options", "refusal"),
    [
        ({"freeze_bn_stats": "no"}, "`method.finetune.freeze_bn_stats` must be true or false"),
        ({"freeze_bn_stats": 1}, "`method.finetune.freeze_bn_stats` must be true or false"),
        ({"reinit_top_layers": True}, "`method.finetune.reinit_top_layers` must be a whole"),
        ({"unfreeze_groups": 2.5}, "`method.finetune.unfreeze_groups` must be a whole"),
        ({"unfreeze_groups": 0}, "`method.finetune.unfreeze_groups` must be a whole number >= 1"),
        ({"unfreeze_at_epoch": 1.5}, "`method.finetune.unfreeze_at_epoch` must be a whole"),
        ({"backbone_lr_factor": "0.1"}, "`method.finetune.backbone_lr_factor` must be a positive"),
        ({"weights": 3}, "`method.finetune.weights` must be a path"),
    ],
)
def test_finetune_options_are_type_checked(options: dict, refusal: str) -> None:
    with pytest.raises(PosttrainError, match=refusal):
        FinetuneSettings(**{"weights": "w.pt", **options})


@pytest.mark.parametrize(
    ("override", "refusal"),
    [
        # Hydra keeps `no` as the string 'no', which is truthy: it would freeze the statistics
        ("method.finetune.freeze_bn_stats=no", "freeze_bn_stats` must be true or false, got 'no'"),
        # small_cnn has 5 layers with weights: 6 groups were silently 5
        ("method.finetune.unfreeze_groups=6", "at most 5 groups"),
    ],
)
def test_a_finetune_setting_that_cannot_apply_is_refused_before_training(
    make_config, pretrained_digits: Path, override: str, refusal: str
) -> None:
    from posttrain.runs import build_components, find_user_error

    overrides = ["experiment=digits_transfer", f"model.pretrained={pretrained_digits}"]
    with pytest.raises(Exception) as caught:
        build_components(make_config(*overrides, override))
    assert refusal in str(find_user_error(caught.value))


@pytest.mark.parametrize(
    ("policy", "override"),
    [("full", "unfreeze_groups=3"), ("linear_probe", "unfreeze_at_epoch=0")],
)
def test_a_gradual_key_with_another_policy_is_refused(
    make_config, pretrained_digits: Path, policy: str, override: str
) -> None:
    """Observed: `method.finetune.unfreeze_groups=3` with the default `policy=full` was
    accepted and trained exactly as without it: only the gradual schedule reads it."""
    recipe = ["experiment=digits_transfer", f"model.pretrained={pretrained_digits}", *CPU]
    cfg = make_config(*recipe, "debug=fast", f"method.finetune.policy={policy}",
                      f"method.finetune.{override}")  # fmt: skip
    key = override.split("=")[0]
    with pytest.raises(PosttrainError, match=f"`method.finetune.{key}`=.* read only by"):
        train(cfg)
    from posttrain.methods.finetune import check_gradual_keys

    check_gradual_keys(make_config(*recipe, "method.finetune.policy=gradual",
                                   f"method.finetune.{override}"))  # fmt: skip
    check_gradual_keys(make_config(*recipe, f"method.finetune.policy={policy}"))  # defaults


def test_a_gradual_run_that_would_never_unfreeze_is_refused(
    make_config, pretrained_digits: Path
) -> None:
    """Observed: `policy=gradual unfreeze_at_epoch=3 trainer.max_epochs=3` was accepted and
    trained the head alone all run (epochs 0-2), recorded as gradual fine-tuning."""
    from posttrain.methods.finetune import check_gradual_keys

    recipe = ["experiment=digits_transfer", f"model.pretrained={pretrained_digits}", *CPU,
              "method.finetune.policy=gradual", "method.finetune.unfreeze_at_epoch=3"]  # fmt: skip
    with pytest.raises(PosttrainError, match="would never unfreeze") as refused:
        train(make_config(*recipe, "trainer.max_epochs=3"))
    assert "`trainer.max_epochs`=3" in str(refused.value) and "\n" not in str(refused.value)
    check_gradual_keys(make_config(*recipe, "trainer.max_epochs=4"))  # unfreezes in the last
    check_gradual_keys(make_config(*recipe, "trainer.max_epochs=-1", "trainer.max_steps=50"))


def test_model_switches_are_type_checked() -> None:
    with pytest.raises(PosttrainError, match=r"`model.pretrained_head` must be true or false"):
        build_classifier("small_cnn", 5, 1, pretrained_head="yes")
    with pytest.raises(PosttrainError, match=r"`model.channels_last` must be true or false"):
        build_classifier("small_cnn", 5, 1, channels_last="false")
    with pytest.raises(PosttrainError, match=r"pretrained_head=true`.*not set"):
        build_classifier("small_cnn", 5, 1, pretrained_head=True)


@pytest.mark.parametrize(
    ("arch", "options", "layers"),
    [("resnet18", {}, 6), ("small_cnn", {}, 5), ("convnet4", {"hidden": 8}, 4)],
)
def test_unfreeze_groups_gives_exactly_the_groups_asked(arch, options, layers) -> None:
    from posttrain.methods.finetune import layer_groups, parameterized_layers

    features = build_classifier(arch, 5, 1, **options).features
    bottom_first = parameterized_layers(features)
    for count in range(1, layers + 1):
        groups = layer_groups(features, count)
        assert len(groups) == count and all(groups), (arch, count)
        assert [m for g in reversed(groups) for m in g] == bottom_first  # contiguous, in order
        sizes = [len(g) for g in groups]
        assert max(sizes) - min(sizes) <= 1
    with pytest.raises(PosttrainError, match=f"at most {layers} groups") as raised:
        layer_groups(features, layers + 1)
    assert "`method.finetune.unfreeze_groups` is" in str(raised.value)


class Recorder:
    """Snapshots of backbone state per epoch, read by the freezing tests."""

    def __new__(cls):
        from lightning.pytorch.callbacks import Callback

        class _Recorder(Callback):
            def __init__(self) -> None:
                self.trainable: list[bool] = []

            def on_train_epoch_end(self, trainer, pl_module) -> None:
                features = pl_module.model.features
                self.trainable.append(any(p.requires_grad for p in features.parameters()))

        return _Recorder()


def transfer_run(make_config, pretrained: Path, *overrides: str):
    from posttrain.runs import build_components, build_trainer

    cfg = make_config(
        "experiment=digits_transfer",
        f"model.pretrained={pretrained}",
        "debug=limit",
        *CPU,
        *overrides,
    )
    datamodule, method = build_components(cfg)
    recorder = Recorder()
    trainer = build_trainer(cfg, extra_callbacks=[recorder])
    before = {k: v.clone() for k, v in method.model.state_dict().items()}
    trainer.fit(method, datamodule=datamodule)
    return method, before, recorder.trainable


class TrainableAtFirstBatch(Callback):
    """The parameter count that really trains when the first batch runs."""

    def __init__(self) -> None:
        self.trainable: int | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.trainable is None:
            self.trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    "policy",
    [
        ["method.finetune.policy=linear_probe"],
        ["method.finetune.policy=gradual", "method.finetune.unfreeze_at_epoch=0"],
        ["method.finetune.policy=full"],
    ],
)
def test_the_start_statement_counts_what_trains(
    make_config, pretrained_digits, caplog, policy: list[str]
) -> None:
    """The statement is printed in a trainer callback's `on_fit_start`, before the freeze
    schedule's: it printed the whole model as trainable under a linear probe."""
    from posttrain.console import count
    from posttrain.runs import build_components, build_trainer

    cfg = make_config(
        "experiment=digits_transfer",
        f"model.pretrained={pretrained_digits}",
        "debug=limit",
        "trainer.max_epochs=1",
        *CPU,
        *policy,
        "method.finetune.unfreeze_groups=5",
    )
    datamodule, method = build_components(cfg)
    seen = TrainableAtFirstBatch()
    with caplog.at_level(logging.INFO, logger="posttrain"):
        build_trainer(cfg, extra_callbacks=[seen]).fit(method, datamodule=datamodule)
    total = sum(p.numel() for p in method.parameters())
    assert seen.trainable is not None and (seen.trainable < total) == (
        policy != ["method.finetune.policy=full"]
    )
    assert f"{count(total)} parameters ({count(seen.trainable)} trainable)" in caplog.text


def test_linear_probe_really_freezes(make_config, pretrained_digits) -> None:
    method, before, trainable = transfer_run(
        make_config,
        pretrained_digits,
        "method.finetune.policy=linear_probe",
        "trainer.max_epochs=2",
    )
    after = method.model.state_dict()
    backbone = [k for k in after if k.startswith("features.")]
    assert all(torch.equal(before[k], after[k]) for k in backbone)  # weights and BN statistics
    assert not torch.equal(before["head.weight"], after["head.weight"])
    assert trainable == [False, False]


def test_full_finetuning_changes_the_backbone(make_config, pretrained_digits) -> None:
    method, before, trainable = transfer_run(
        make_config, pretrained_digits, "method.finetune.policy=full"
    )
    after = method.model.state_dict()
    assert not all(torch.equal(before[k], after[k]) for k in after if k.startswith("features."))
    assert trainable == [True, True]


@pytest.mark.parametrize("freeze_bn_stats", [True, False])
def test_frozen_bn_statistics_in_full_finetuning(
    make_config, pretrained_digits, freeze_bn_stats: bool
) -> None:
    method, before, _ = transfer_run(
        make_config,
        pretrained_digits,
        "method.finetune.policy=full",
        f"method.finetune.freeze_bn_stats={str(freeze_bn_stats).lower()}",
        "trainer.max_epochs=2",
    )
    after = method.model.state_dict()
    stats = [k for k in after if k.startswith("features.") and k.endswith("running_mean")]
    convs = [k for k in after if k.startswith("features.") and k.endswith(".0.weight")]
    assert stats and all(torch.equal(before[k], after[k]) for k in stats) == freeze_bn_stats
    assert convs and not any(torch.equal(before[k], after[k]) for k in convs)  # it trains


def test_gradual_unfreezing_happens_at_the_right_epoch(make_config, pretrained_digits) -> None:
    _, _, trainable = transfer_run(
        make_config,
        pretrained_digits,
        "method.finetune.policy=gradual",
        "method.finetune.unfreeze_at_epoch=2",
        "trainer.max_epochs=4",
    )
    assert trainable == [False, False, True, True]


def test_gradual_unfreezes_layer_groups_from_the_top() -> None:
    from posttrain.methods.finetune import FreezeSchedule, layer_groups

    model = build_classifier("small_cnn", 5, 1)
    module = nn.Module()
    module.model = model
    schedule = FreezeSchedule(
        FinetuneSettings(policy="gradual", unfreeze_at_epoch=1, unfreeze_groups=3)
    )
    groups = layer_groups(model.features, 3)
    states = []
    for epoch in range(5):
        schedule.apply(module, epoch)
        states.append([all(p.requires_grad for m in g for p in m.parameters()) for g in groups])
    assert states == [
        [False] * 3,
        [True, False, False],
        [True, True, False],
        [True] * 3,
        [True] * 3,
    ]
    assert groups[0][-1] is model.features[-3]  # the top conv block is released first


def test_discriminative_learning_rates(make_config, pretrained_digits) -> None:
    from posttrain.runs import build_components

    cfg = make_config(
        "experiment=digits_transfer",
        f"model.pretrained={pretrained_digits}",
        "method.finetune.backbone_lr_factor=0.1",
        "optimizer.lr=0.01",
        *CPU,
    )
    _, method = build_components(cfg)
    from posttrain.methods.optim import build_optimizer

    built = build_optimizer(
        method.named_parameters(), method.hparams.optimizer, lr_scale=method.lr_scale
    )
    head_ids = {id(p) for p in method.model.head.parameters()}
    for group in built.param_groups:
        is_head = all(id(p) in head_ids for p in group["params"])
        assert group["lr"] == pytest.approx(0.01 if is_head else 0.001)


def test_l2sp_is_zero_at_the_start_and_grows_away() -> None:
    model = build_classifier("small_cnn", 5, 1)
    l2sp = L2SP(alpha=1.0, beta=0.0, start="w.pt")
    l2sp.modify_model(ModelParts.of_classifier(model))
    assert float(l2sp.penalty(ModelParts.of_classifier(model))) == 0.0
    distances = []
    for step in (0.01, 0.1):
        with torch.no_grad():
            for name, p in model.features.named_parameters():
                if name in l2sp.reference:
                    p.copy_(l2sp.reference[name] + step)
        distances.append(float(l2sp.penalty(ModelParts.of_classifier(model))))
    assert 0 < distances[0] < distances[1]
    assert distances[1] == pytest.approx(100 * distances[0], rel=1e-4)
    with_head = L2SP(alpha=0.0, beta=1.0, start="w.pt")
    with_head.modify_model(ModelParts.of_classifier(model))
    assert float(with_head.penalty(ModelParts.of_classifier(model))) == pytest.approx(
        0.5 * float(model.head.weight.pow(2).sum()), rel=1e-5
    )


@pytest.mark.slow
def test_cifar10_resnet50_recipe_runs_offline(make_config, tmp_path, monkeypatch) -> None:
    imagenet = place_torchvision_weights(tmp_path / "torch", "resnet50", monkeypatch)
    write_cifar(tmp_path / "cifar")
    cfg = make_config(
        "experiment=cifar10_resnet50_finetune",
        "trainer=cpu",
        "trainer.precision=32-true",
        "trainer.fast_dev_run=true",
        f"data.root={tmp_path / 'cifar'}",
        "data.download=false",
        "data.image_size=64",
        "data.batch_size=4",
        "logger=none",
    )
    assert cfg.model.pretrained == "imagenet" and cfg.reg.augment.flip

    def no_network(*args, **kwargs):
        raise OSError("this test runs offline")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    seen: dict = {}

    class AtTrainStart(Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            model = pl_module.model
            seen["backbone"] = model.features.layer4[1].conv2.weight.detach().clone()
            seen["head"] = (model.head.in_features, model.head.out_features)
            seen["trainable"] = all(p.requires_grad for p in model.parameters())

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            seen["images"] = tuple(batch[0].shape)

    add_callbacks(monkeypatch, AtTrainStart())
    metrics = train(cfg)
    # The ImageNet weights came from the local cache (no network), under a new 10-way head,
    # fully trainable (policy full), on 64 px images; the one step completed.
    assert torch.equal(seen["backbone"], imagenet["layer4.1.conv2.weight"])
    assert seen["head"] == (2048, 10) and seen["trainable"]
    assert seen["images"] == (4, 3, 64, 64)
    assert metrics["global_step"] == 1.0
    written = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert written["status"] == "completed"


def test_eval_rebuilds_a_kept_head_run_from_the_checkpoint_alone(tmp_path: Path) -> None:
    """eval.py drops `model.pretrained`; the kept head is in the checkpoint, so the rebuilt
    model must not ask for the source's head (refused without `model.pretrained`)."""
    from omegaconf import OmegaConf

    from posttrain.evaluate import evaluation_config
    from tests.conftest import compose_config

    model = {"pretrained": "w.pt", "pretrained_head": True}
    reg = {"l2sp": {"alpha": 0.01, "start": None}}  # a run written before `start` existed
    trained = OmegaConf.create({"data": {}, "method": {}, "model": model, "reg": reg})
    evaluated = evaluation_config(trained, compose_config(tmp_path, ["ckpt_path=x.ckpt"], "eval"))
    assert evaluated.model.pretrained is None and evaluated.model.pretrained_head is False
    assert evaluated.reg.l2sp.start == "x.ckpt"  # L2-SP's start: the checkpoint's weights


def test_l2sp_without_pretrained_weights_is_refused(make_config) -> None:
    """Its reference would be the random initialization, logged as "pretrained" values."""
    from posttrain.runs import build_components, find_user_error

    with pytest.raises(Exception) as caught:
        build_components(make_config("reg=l2sp", "model.width=8"))
    message = str(find_user_error(caught.value))
    assert "`reg=l2sp`" in message and "`model.pretrained` is not set" in message


def test_an_l2sp_reference_other_than_the_starting_weights_is_refused(make_config) -> None:
    """`reg.l2sp.start` mirrors `model.pretrained`; set to another file it was accepted and
    ignored (the reference is always the weights training starts from)."""
    from posttrain.regularizers.penalties import check_l2sp_start

    check_l2sp_start(make_config("reg=l2sp", "model.pretrained=a.pt"))  # the recipe's mirror
    check_l2sp_start(make_config())  # no L2-SP at all
    with pytest.raises(PosttrainError, match=r"`reg\.l2sp\.start=b\.pt`.*model\.pretrained=a\.pt"):
        check_l2sp_start(make_config("reg=l2sp", "model.pretrained=a.pt", "reg.l2sp.start=b.pt"))
