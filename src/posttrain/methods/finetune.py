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

import logging
from dataclasses import dataclass, fields
from typing import Any

from lightning.pytorch.callbacks import Callback
from torch import nn

from posttrain.errors import require, require_bool, require_choice, require_count, require_positive

log = logging.getLogger("posttrain")

POLICIES = ("full", "linear_probe", "gradual")


@dataclass(frozen=True)
class FinetuneSettings:
    """`method.finetune.*`, validated."""

    policy: str = "full"
    unfreeze_at_epoch: int = 2  # as conf/method/finetune.yaml ships it
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
        """Types first (Hydra passes `no` as a string, `2.5` as a float), then the
        combinations in which an option could not do what it says."""
        require_choice("method.finetune.policy", self.policy, POLICIES)
        require_count("method.finetune.unfreeze_at_epoch", self.unfreeze_at_epoch, 0)
        require_count("method.finetune.unfreeze_groups", self.unfreeze_groups, 1)
        require_positive("method.finetune.backbone_lr_factor", self.backbone_lr_factor)
        require_bool("method.finetune.freeze_bn_stats", self.freeze_bn_stats)
        require_count("method.finetune.reinit_top_layers", self.reinit_top_layers, 0)
        require(
            self.weights is None or isinstance(self.weights, str),
            f"Config key `method.finetune.weights` must be a path or weights name, got "
            f"{self.weights!r}.",
        )
        self.check_reinit()

    def check_reinit(self) -> None:
        """Re-initialized layers must train and estimate their own BatchNorm statistics:
        frozen (linear probe) they are random features, and with frozen statistics their
        BatchNorm normalizes with the fresh 0/1 running values all run."""
        if not self.reinit_top_layers:
            return
        require(
            self.policy != "linear_probe",
            f"`method.finetune.reinit_top_layers={self.reinit_top_layers}` cannot be used with "
            "`method.finetune.policy=linear_probe`: the linear probe freezes the whole backbone, "
            "so the re-initialized layers would stay random for the whole run and the head "
            "would learn from random features. Use `policy=full` or `policy=gradual` (the top "
            "layers are released first), or set `method.finetune.reinit_top_layers=0`.",
        )
        require(
            not self.freeze_bn_stats,
            f"`method.finetune.reinit_top_layers={self.reinit_top_layers}` cannot be used with "
            "`method.finetune.freeze_bn_stats=true`: frozen statistics keep every BatchNorm's "
            "running mean and variance, and those of the re-initialized layers are fresh (0 "
            "and 1), not pretrained, so those layers would normalize with them all run. Set "
            "`method.finetune.freeze_bn_stats=false` or `method.finetune.reinit_top_layers=0`.",
        )

    @property
    def starts_frozen(self) -> bool:
        return self.policy in ("linear_probe", "gradual")


# Keys only `policy=gradual` reads; changed with another policy they would change nothing.
GRADUAL_KEYS = ("unfreeze_at_epoch", "unfreeze_groups")


def check_gradual_keys(cfg: Any) -> None:
    """`method.finetune.unfreeze_groups=3` with `policy=full` (or `linear_probe`) was accepted
    and trained exactly as the default: only the gradual schedule reads these keys, and a
    sweep over them compared identical runs. Checked when training starts (a checkpoint
    stored with such a value still evaluates)."""
    finetune = (cfg.get("method") or {}).get("finetune")
    if finetune is None:
        return
    if finetune.get("policy") == "gradual":
        check_gradual_unfreezes(finetune, (cfg.get("trainer") or {}).get("max_epochs"))
        return
    defaults = {field.name: field.default for field in fields(FinetuneSettings)}
    for key in GRADUAL_KEYS:
        value, default = finetune.get(key, defaults[key]), defaults[key]
        require(
            value == default,
            f"Config key `method.finetune.{key}`={value!r} is read only by "
            f"`method.finetune.policy=gradual`, and the policy is {finetune.get('policy')!r}, "
            f"which ignores it: set `method.finetune.policy=gradual`, or leave "
            f"`method.finetune.{key}` at its default ({default}).",
        )


def check_gradual_unfreezes(finetune: Any, max_epochs: Any) -> None:
    """`policy=gradual` with `unfreeze_at_epoch` at or past the last epoch trained a linear
    probe recorded as gradual fine-tuning: the backbone never unfroze (epochs count from 0)."""
    start = finetune.get("unfreeze_at_epoch")
    if not isinstance(max_epochs, int) or max_epochs < 0 or not isinstance(start, int):
        return  # no epoch limit (`max_steps` decides), or a type its own check refuses
    require(
        start < max_epochs,
        f"Config key `method.finetune.unfreeze_at_epoch`={start} with "
        f"`trainer.max_epochs`={max_epochs}: epochs count from 0, so the last one is "
        f"{max_epochs - 1} and the backbone would never unfreeze: the run would be a linear "
        "probe recorded as `policy=gradual`. Set `unfreeze_at_epoch` below "
        f"{max_epochs}, raise `trainer.max_epochs`, or use "
        "`method.finetune.policy=linear_probe`.",
    )


def named_layers(backbone: nn.Module) -> list[tuple[str, nn.Module]]:
    """The backbone's top-level layers that hold weights, with their names, bottom (input
    side) first."""
    layers = [(n, m) for n, m in backbone.named_children() if any(True for _ in m.parameters())]
    return layers or [("", backbone)]


def parameterized_layers(backbone: nn.Module) -> list[nn.Module]:
    """The backbone's top-level layers that hold weights, bottom (input side) first."""
    return [layer for _, layer in named_layers(backbone)]


def check_unfreeze_groups(backbone: nn.Module, count: int) -> None:
    """A backbone of L layers splits into at most L groups: more would be fewer than asked."""
    layers = len(parameterized_layers(backbone))
    require(
        count <= layers,
        f"`method.finetune.unfreeze_groups` is {count}, but this backbone has {layers} layers "
        f"with weights, so at most {layers} groups: set `method.finetune.unfreeze_groups` to "
        f"1..{layers}.",
    )


def layer_groups(backbone: nn.Module, count: int) -> list[list[nn.Module]]:
    """The backbone's parameterized top-level layers in exactly `count` contiguous groups
    (sizes differ by at most one, the larger ones at the bottom), top first.

    Ceil-sized chunks gave fewer groups than asked (6 ResNet layers in 4 asked groups made 3).
    """
    check_unfreeze_groups(backbone, count)
    layers = parameterized_layers(backbone)
    size, extra = divmod(len(layers), count)
    groups, start = [], 0
    for index in range(count):
        end = start + size + (1 if index < extra else 0)
        groups.append(layers[start:end])
        start = end
    return list(reversed(groups))


def reinit_top_layers(backbone: nn.Module, count: int) -> None:
    """Fresh initial weights for the `count` parameterized backbone layers nearest the head,
    logged by name (the pretrained weights of those layers are gone for this run)."""
    layers = list(reversed(named_layers(backbone)))
    require(
        count <= len(layers),
        f"`method.finetune.reinit_top_layers` is {count}, but the backbone has only "
        f"{len(layers)} layers with weights.",
    )
    if not count:
        return
    for _, layer in layers[:count]:
        for module in layer.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    names = ", ".join(f"features.{name}" if name else "features" for name, _ in layers[:count])
    log.info(
        "fine-tuning: method.finetune.reinit_top_layers=%d re-initialized %s (pretrained "
        "weights of those layers not used)",
        count,
        names,
    )


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


def resumed_epoch(checkpoint: dict, default: int) -> int:
    """The epoch a resumed fit starts at, before Lightning restores `trainer.current_epoch`
    (after `on_fit_start`): the fit loop's processed epochs in the checkpoint. A checkpoint
    written at an epoch's end has processed it but not yet marked it completed, and
    Lightning resumes at the next epoch; one written mid-epoch resumes that epoch."""
    try:
        progress = checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]
        return int(progress["processed"])
    except (KeyError, TypeError, ValueError):
        return default


class FreezeSchedule(Callback):
    """Freezes the backbone when fitting starts and releases it on the policy's schedule.

    The freeze is applied in `on_fit_start`, after the strategy has set the model up: DDP
    registers only parameters that require gradients when it wraps the model, so freezing
    earlier would leave gradually released layers unsynchronized. What trains at the start
    is therefore computed from the policy (`trainable_count`) for the run statement, whose
    `on_fit_start` runs before this module callback's.
    """

    def __init__(self, settings: FinetuneSettings) -> None:
        self.settings = settings
        self.resume_epoch: int | None = None

    def released_groups(self, epoch: int, total: int) -> int:
        """How many layer groups (from the top) train in `epoch`."""
        if self.settings.policy != "gradual":
            return 0
        return max(0, min(total, epoch - self.settings.unfreeze_at_epoch + 1))

    def frozen_layers(self, backbone: nn.Module, epoch: int) -> list[nn.Module]:
        """The backbone layers that do not train in `epoch`."""
        groups = layer_groups(backbone, self.settings.unfreeze_groups)
        released = self.released_groups(epoch, len(groups))
        return [layer for group in groups[released:] for layer in group]

    def first_epoch(self, trainer: Any) -> int:
        """The epoch this fit starts at: a resumed one's, known from its checkpoint before
        Lightning restores `trainer.current_epoch` (after `on_fit_start`)."""
        return self.resume_epoch if self.resume_epoch is not None else trainer.current_epoch

    def trainable_count(self, pl_module: Any, trainer: Any) -> int:
        """Trainable parameters once the policy is applied for the first epoch."""
        frozen = self.frozen_layers(pl_module.model.features, self.first_epoch(trainer))
        held = {id(p) for layer in frozen for p in layer.parameters()}
        return sum(
            p.numel() for p in pl_module.parameters() if p.requires_grad and id(p) not in held
        )

    def apply(self, pl_module: Any, epoch: int) -> None:
        backbone = pl_module.model.features
        frozen = {id(layer) for layer in self.frozen_layers(backbone, epoch)}
        for layer in parameterized_layers(backbone):
            set_trainable(layer, id(layer) not in frozen)
        pl_module.train(pl_module.training)  # re-applies the BatchNorm modes

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict) -> None:
        self.resume_epoch = resumed_epoch(checkpoint, trainer.current_epoch)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.apply(pl_module, self.first_epoch(trainer))

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.apply(pl_module, trainer.current_epoch)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self.resume_epoch = None  # a later fit of the same module starts from its own epoch
