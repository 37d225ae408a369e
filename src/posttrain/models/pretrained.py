"""Pretrained weights from three sources, always loaded with `weights_only=True`.

`model.pretrained` is one of:
- a torchvision weights name: `imagenet` (the architecture's DEFAULT weights) or an explicit
  enum member such as `IMAGENET1K_V2`; downloaded once into `$TORCH_HOME/hub/checkpoints`;
- the checkpoint of an earlier posttrain run (`.../checkpoints/best.ckpt`);
- a plain state-dict file (torchvision layout or posttrain's `features.* / head.*`).

The head is never taken from the source when its shape differs: it stays freshly
initialized and sized to the new task. Every other key that does not fit is reported.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from posttrain.errors import PosttrainError, require

log = logging.getLogger("posttrain")

TORCHVISION_ALIASES = {"imagenet": "DEFAULT"}


@dataclass
class LoadReport:
    """What happened to each key, so nothing is dropped silently."""

    source: str
    loaded: int = 0
    head_replaced: str = ""
    adapted: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        lines = [f"pretrained weights from {self.source}: {self.loaded} tensors loaded"]
        if self.head_replaced:
            lines.append(f"  head replaced: {self.head_replaced}")
        lines += [f"  adapted: {item}" for item in self.adapted]
        for label, keys in (
            ("missing from the source (kept at initialization)", self.missing),
            ("in the source but not in the model (ignored)", self.unexpected),
            ("shape mismatch (kept at initialization)", self.mismatched),
        ):
            if keys:
                shown = ", ".join(keys[:8]) + (
                    f", ... ({len(keys)} in all)" if len(keys) > 8 else ""
                )
                lines.append(f"  {label}: {shown}")
        return lines


def torchvision_state_dict(arch: str, name: str) -> dict[str, Tensor]:
    """Download (or read from the torch hub cache) torchvision's weights for `arch`."""
    from torchvision import models

    try:
        weights_enum = models.get_model_weights(arch)
    except ValueError as error:
        raise PosttrainError(
            f"`model.pretrained={name}`: torchvision has no weights for `model.arch={arch}`."
        ) from error
    member = TORCHVISION_ALIASES.get(name, name)
    valid = ["imagenet", *weights_enum.__members__]
    require(
        member in weights_enum.__members__,
        f"`model.pretrained={name}` is not a weights name of {arch} nor an existing file; "
        f"valid names: {', '.join(valid)}, or a path to a checkpoint/state-dict file.",
    )
    weights = weights_enum[member]
    try:
        return weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except Exception as error:  # offline, proxy, corrupt cache: many error types
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise PosttrainError(
            f"`model.pretrained={name}`: could not get {arch} weights from {weights.url} "
            f"({type(error).__name__}: {error}). Without internet, place the file at {cache} "
            "or point `model.pretrained` at a local checkpoint/state-dict file."
        ) from error


def file_state_dict(path: Path) -> tuple[dict[str, Tensor], str]:
    """State dict from a posttrain checkpoint or a plain state-dict file."""
    from posttrain.checkpoints import CONFIG_KEY, load_checkpoint

    loaded = load_checkpoint(path, key="model.pretrained")
    if "state_dict" in loaded and isinstance(loaded["state_dict"], dict):
        prefix = "model."
        state = {
            k.removeprefix(prefix): v
            for k, v in loaded["state_dict"].items()
            if k.startswith(prefix) and isinstance(v, Tensor)
        }
        kind = "posttrain checkpoint" if CONFIG_KEY in loaded else "Lightning checkpoint"
        return state, f"{kind} {path}"
    state = {k: v for k, v in loaded.items() if isinstance(v, Tensor)}
    require(
        bool(state),
        f"`model.pretrained={path}` holds no tensors: expected a state dict or checkpoint.",
    )
    return state, f"state dict {path}"


def to_model_layout(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Map a torchvision-layout state dict (`conv1.*`, `fc.*`) onto `features.*`/`head.*`."""
    own = model.state_dict()
    if any(key in own for key in state):
        return state
    mapped = {}
    for key, value in state.items():
        if key.startswith("fc."):
            mapped["head." + key.removeprefix("fc.")] = value
        else:
            mapped["features." + key] = value
    return mapped


def adapt_input_conv(weight: Tensor, in_channels: int) -> Tensor:
    """3-channel (RGB) first-conv weights for another channel count, keeping the response
    to a gray image: summed for 1 channel, tiled and rescaled otherwise."""
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-in_channels // weight.shape[1])
    tiled = weight.repeat(1, repeats, 1, 1)[:, :in_channels]
    return tiled * (weight.shape[1] / in_channels)


def load_pretrained(
    model: nn.Module, pretrained: str, arch: str, keep_head: bool = False
) -> LoadReport:
    """Load `pretrained` into `model` (an ImageClassifier) and report what fit.

    The head is re-initialized for the new task unless `keep_head` and the shapes match
    (e.g. continuing on the same classes).
    """
    path = Path(str(pretrained)).expanduser()
    if path.exists():
        state, source = file_state_dict(path)
    elif "/" in str(pretrained) or str(pretrained).endswith((".ckpt", ".pt", ".pth")):
        raise PosttrainError(f"`model.pretrained`: file {path} does not exist.")
    else:
        state, source = (
            torchvision_state_dict(arch, str(pretrained)),
            f"torchvision {arch} {pretrained}",
        )
    state = to_model_layout(state, model)
    own = model.state_dict()
    report = LoadReport(source=source)
    accepted: dict[str, Tensor] = {}
    for key, value in state.items():
        if key not in own:
            report.unexpected.append(key)
        elif key.startswith("head.") and not (keep_head and own[key].shape == value.shape):
            if key == "head.weight":
                report.head_replaced = (
                    f"new {tuple(own[key].shape)} head for this task's classes (source head "
                    f"{tuple(value.shape)} not used; model.pretrained_head=true keeps a "
                    "same-shape head)"
                )
        elif own[key].shape == value.shape:
            accepted[key] = value
        elif (
            value.ndim == 4
            and own[key].shape[0] == value.shape[0]
            and value.shape[1] == 3
            and own[key].shape[2:] == value.shape[2:]
        ):
            accepted[key] = adapt_input_conv(value, own[key].shape[1])
            report.adapted.append(f"{key}: {value.shape[1]} -> {own[key].shape[1]} input channels")
        else:
            report.mismatched.append(f"{key} {tuple(value.shape)} vs {tuple(own[key].shape)}")
    backbone_keys = [k for k in accepted if not k.startswith("head.")]
    require(
        bool(backbone_keys),
        f"`model.pretrained` ({source}) shares no backbone weights with `model.arch={arch}`: "
        "it was trained with another architecture. Use a checkpoint of the same model.",
    )
    report.missing = sorted(
        k
        for k in own
        if k not in accepted and not k.startswith("head.") and not k.endswith("num_batches_tracked")
    )
    model.load_state_dict(accepted, strict=False)
    report.loaded = len(accepted)
    for line in report.lines():
        (log.warning if (report.missing or report.mismatched) else log.info)(line)
    return report


__all__ = ["LoadReport", "adapt_input_conv", "load_pretrained"]
