"""Backbones as `(feature_extractor, feature_dim)` pairs, built by name.

Every model posttrain trains is `ImageClassifier(features, head)`: the head is a plain
`nn.Linear` sized to the task, so replacing it (fine-tuning) or putting dropout in front of
it (regularization) works the same for every backbone.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn

from posttrain.errors import (
    require,
    require_bool,
    require_choice,
    require_count,
    require_known_options,
)


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 conv -> BatchNorm -> ReLU: the unit every small backbone here stacks."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def small_cnn(in_channels: int, width: int = 32) -> tuple[nn.Module, int]:
    """A 5-conv VGG-style net with global pooling: any input size >= 4 pixels, trains in seconds."""
    require_count("model.width", width, 1)  # 2.5 failed inside nn.Conv2d
    features = nn.Sequential(
        conv_block(in_channels, width),
        conv_block(width, width),
        nn.MaxPool2d(2),
        conv_block(width, 2 * width),
        conv_block(2 * width, 2 * width),
        nn.MaxPool2d(2),
        conv_block(2 * width, 4 * width),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    return features, 4 * width


def convnet4(in_channels: int, hidden: int = 64) -> tuple[nn.Module, int]:
    """The few-shot standard (Vinyals et al. 2016): 4 x [conv 3x3, BN, ReLU, max-pool 2].

    Ends in global average pooling, which equals the usual flatten on 28x28 Omniglot (1x1
    maps) and keeps the feature size independent of the input size elsewhere.
    """
    require_count("model.hidden", hidden, 1)
    blocks = [
        nn.Sequential(conv_block(c, hidden), nn.MaxPool2d(2))
        for c in (in_channels, hidden, hidden, hidden)
    ]
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten()), hidden


TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def torchvision_resnet(
    arch: str, in_channels: int, small_input: bool = False
) -> tuple[nn.Module, int]:
    """A torchvision ResNet without its `fc`, its stem adapted to the data.

    `in_channels != 3` (e.g. grayscale digits) gets a fresh first conv of the right width;
    `small_input=True` swaps the 7x7/stride-2 stem and max-pool for a 3x3/stride-1 conv, the
    usual choice for 32x32 inputs.
    """
    from torchvision import models

    require_bool("model.small_input", small_input)  # `no` is a truthy string: the 3x3 stem
    network = models.get_model(arch, weights=None)
    if small_input:
        network.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        network.maxpool = nn.Identity()
    elif in_channels != 3:
        network.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    feature_dim = network.fc.in_features
    network.fc = nn.Identity()
    return network, feature_dim


BACKBONES: dict[str, Callable[..., tuple[nn.Module, int]]] = {
    "small_cnn": small_cnn,
    "convnet4": convnet4,
    **{arch: partial(torchvision_resnet, arch) for arch in TORCHVISION_RESNETS},
}


class ImageClassifier(nn.Module):
    """features -> head_dropout (identity unless `reg=dropout` sets it) -> linear head."""

    def __init__(self, features: nn.Module, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.features = features
        self.feature_dim = feature_dim
        self.head_dropout: nn.Module = nn.Identity()
        self.head = nn.Linear(feature_dim, num_classes)
        self.channels_last = False
        self.compiled = False  # `model.compile=true`: `features` runs under torch.compile

    def embed(self, x: Tensor) -> Tensor:
        """The features every method predicts from (classifier head, prototypes, task heads),
        after `head_dropout`, so dropout reaches all of them."""
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.head_dropout(self.features(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.embed(x))


def build_classifier(
    arch: str,
    num_classes: int,
    in_channels: int,
    pretrained: str | None = None,
    pretrained_head: bool = False,
    channels_last: bool = False,
    compile: bool = False,
    **backbone_options: object,
) -> ImageClassifier:
    """The model factory every config in `conf/model/` points at.

    `pretrained` (torchvision weights name, posttrain checkpoint or state-dict file) is
    loaded into the backbone; the head stays sized to `num_classes`. `channels_last` stores
    weights and activations NHWC (faster convolutions on recent GPUs, mostly with mixed
    precision); `compile` compiles the feature extractor in place (state-dict keys unchanged;
    pays a compilation pause at the first batches).
    """
    require_choice("model.arch", arch, BACKBONES)
    for key, switch in (
        ("pretrained_head", pretrained_head),
        ("channels_last", channels_last),
        ("compile", compile),
    ):
        require_bool(f"model.{key}", switch)
    require(
        pretrained is None or isinstance(pretrained, str),
        f"Config key `model.pretrained` must be a weights name or a file path, got {pretrained!r}.",
    )
    require(
        pretrained is not None or not pretrained_head,
        "`model.pretrained_head=true` keeps the head of `model.pretrained`, which is not set. "
        "Set `model.pretrained` to the weights whose head to keep, or leave "
        "`model.pretrained_head=false`.",
    )
    factory = BACKBONES[arch]
    require_known_options(factory, {"in_channels": in_channels, **backbone_options}, "model")
    features, feature_dim = factory(in_channels, **backbone_options)
    model = ImageClassifier(features, feature_dim, num_classes)
    if pretrained:
        from posttrain.models.pretrained import load_pretrained

        load_pretrained(model, pretrained, arch, keep_head=pretrained_head)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        model.channels_last = True
    if compile:
        # `nn.Module.compile` compiles `__call__` only, and ProtoNet and multi-task predict
        # from `model.embed`: the features, which forward and embed both run, are compiled
        # (the linear head, a single matmul, stays eager).
        model.features.compile()
        model.compiled = True
    return model
