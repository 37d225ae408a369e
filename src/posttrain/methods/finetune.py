"""Fine-tuning policies: which backbone layers train, when, and at what learning rate.

- `full`: every layer trains from the start.
- `linear_probe`: the backbone is frozen (weights and BatchNorm statistics); only the head
  trains.
- `gradual`: the backbone starts frozen and unfreezes at `unfreeze_at_epoch`, split into
  `unfreeze_groups` layer groups released one per epoch from the top (closest to the head).

The optimizer holds every parameter from the start (frozen ones simply get no gradient,
and torch optimizers skip those), so unfreezing is only `requires_grad=True`: learning-rate
schedules keep working and a resumed run re-applies the schedule for its epoch.
`backbone_lr_factor` gives discriminative learning rates (backbone lr = factor x head lr);
`freeze_bn_stats` keeps every backbone BatchNorm in inference mode (pretrained statistics),
and frozen layers always keep theirs. `reinit_top_layers` starts the top N backbone layers
from fresh weights: the layers closest to the source head are the most specific to the source
task, the lower ones the most general.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lightning.pytorch.callbacks import Callback
from torch import nn

from posttrain.errors import require, require_choice, require_positive

POLICIES = ("full", "linear_probe", "gradual")


@dataclass(frozen=True)
class FinetuneSettings:
    """`method.finetune.*`, validated."""

    policy: str = "full"
    unfreeze_at_epoch: int = 0
    unfreeze_groups: int = 1
    backbone_lr_factor: float = 1.0
    freeze_bn_stats: bool = False
    reinit_top_layers: int = 0
    weights: str | None = None  # `${model.pretrained}`: what is being fine-tuned

    @classmethod
    def for_method(cls, finetune: dict[str, Any] | None) -> FinetuneSettings:
        """`method=supervised` passes none (plain training); `method=finetune` must have
        pretrained weights: fine-tuning random weights would silently be training from
        scratch under another name (a recipe's `???` does not survive Hydra's merge)."""
        if finetune is None:
            return cls()
        settings = cls(**finetune)
        require(
            bool(settings.weights),
            "`method=finetune` fine-tunes pretrained weights, but `model.pretrained` is not set. "
            "Set it to `imagenet` (torchvision models), a posttrain checkpoint or a state-dict "
            "file, e.g. `model.pretrained=outputs/<run>/checkpoints/best.ckpt`; to train from "
            "scratch, use `method=supervised`.",
        )
        return settings

    def __post_init__(self) -> None:
        require_choice("method.finetune.policy", self.policy, POLICIES)
        require(
            isinstance(self.unfreeze_at_epoch, int) and self.unfreeze_at_epoch >= 0,
            f"`method.finetune.unfreeze_at_epoch` must be >= 0, got {self.unfreeze_at_epoch!r}.",
        )
        require_positive("method.finetune.unfreeze_groups", self.unfreeze_groups)
        require_positive("method.finetune.backbone_lr_factor", self.backbone_lr_factor)
        require(
            isinstance(self.reinit_top_layers, int) and self.reinit_top_layers >= 0,
            f"`method.finetune.reinit_top_layers` must be >= 0, got {self.reinit_top_layers!r}.",
        )

    @property
    def starts_frozen(self) -> bool:
        return self.policy in ("linear_probe", "gradual")


def parameterized_layers(backbone: nn.Module) -> list[nn.Module]:
    """The backbone's top-level layers that hold weights, bottom (input side) first."""
    layers = [m for m in backbone.children() if any(True for _ in m.parameters())]
    return layers or [backbone]


def layer_groups(backbone: nn.Module, count: int) -> list[list[nn.Module]]:
    """The backbone's parameterized top-level layers in `count` contiguous groups, top first."""
    layers = parameterized_layers(backbone)
    count = min(count, len(layers))
    size = -(-len(layers) // count)
    groups = [layers[i : i + size] for i in range(0, len(layers), size)]
    return list(reversed(groups))


def reinit_top_layers(backbone: nn.Module, count: int) -> None:
    """Fresh initial weights for the `count` parameterized backbone layers nearest the head."""
    layers = list(reversed(parameterized_layers(backbone)))
    require(
        count <= len(layers),
        f"`method.finetune.reinit_top_layers` is {count}, but the backbone has only "
        f"{len(layers)} layers with weights.",
    )
    for layer in layers[:count]:
        for module in layer.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()


def set_trainable(module: nn.Module, trainable: bool) -> None:
    for parameter in module.parameters():
        parameter.requires_grad_(trainable)


def keep_frozen_norms_in_eval(backbone: nn.Module, all_norms: bool) -> None:
    """BatchNorm layers that are frozen (or all, with `freeze_bn_stats`) use running stats."""
    for module in backbone.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            frozen = not any(p.requires_grad for p in module.parameters(recurse=False))
            if all_norms or frozen:
                module.eval()


class FreezeSchedule(Callback):
    """Freezes the backbone when fitting starts and releases it on the policy's schedule."""

    def __init__(self, settings: FinetuneSettings) -> None:
        self.settings = settings

    def released_groups(self, epoch: int, total: int) -> int:
        """How many layer groups (from the top) train in `epoch`."""
        if self.settings.policy != "gradual":
            return 0
        return max(0, min(total, epoch - self.settings.unfreeze_at_epoch + 1))

    def apply(self, pl_module: Any, epoch: int) -> None:
        groups = layer_groups(pl_module.model.features, self.settings.unfreeze_groups)
        released = self.released_groups(epoch, len(groups))
        for index, group in enumerate(groups):
            for layer in group:
                set_trainable(layer, index < released)
        pl_module.train(pl_module.training)  # re-applies the BatchNorm modes

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.apply(pl_module, trainer.current_epoch)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.apply(pl_module, trainer.current_epoch)
