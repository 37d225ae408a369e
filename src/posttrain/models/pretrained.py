"""Pretrained weights from three sources, always loaded with `weights_only=True`.

`model.pretrained` is one of:
- a torchvision weights name: `imagenet` (the architecture's DEFAULT weights) or an explicit
  enum member such as `IMAGENET1K_V2`; downloaded once into `$TORCH_HOME/hub/checkpoints`
  (a file already there is checked against the sha256 prefix in its name);
- the checkpoint of an earlier posttrain run (`.../checkpoints/best.ckpt`);
- a weights file as people have them: a plain state dict, or a checkpoint dict holding one
  (`state_dict`, `model`, `net`, ... containers; Lightning checkpoints), with keys in
  torchvision's layout (`conv1.*`, `fc.*`) or posttrain's (`features.*`, `head.*`), behind any
  wrapper prefix (`module.` from DDP, `model.`, `net.backbone.`, `_orig_mod.` ...).

Which wrapper a file carries is not guessed from its origin: every way of stripping a
leading prefix (and of adding `features.`) is tried, and the one under which the most
tensors match the model by name and shape wins. The log says which mapping that was and
how many of the file's tensors it matched, and lists what was dropped. 0-dim buffers
(BatchNorm's `num_batches_tracked`) have the same shape in every network, so they are never
evidence that a file fits: a mapping is chosen, and a file judged, by its other tensors.
A file is refused unless at least half of the backbone's weight kernels (conv and linear
weights, `MIN_KERNEL_FRACTION`) match: BatchNorm vectors of common widths (64, 128) match by
chance across architectures, kernels rarely do, and a backbone mostly left at random
initialization is not fine-tuning. A file with kernels inside the model's own blocks that the
model lacks (`layer1.2.conv1.weight` into a ResNet-18) is refused too: it was saved from a
deeper network of the same family (ResNet-34 into ResNet-18 matches every kernel by name).

The head is freshly initialized and sized to the new task, unless `model.pretrained_head=true`:
then the source's head (`fc.*`/`head.*`, beside the backbone's prefix or one level up, as in
a Lightning module holding `net.backbone.*` and `net.fc.*`) is loaded, and a file without a
head of the model's shape is refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from posttrain.errors import PosttrainError, require

log = logging.getLogger("posttrain")

TORCHVISION_ALIASES = {"imagenet": "DEFAULT"}
# Where training scripts put the weights inside a checkpoint dict, most common first.
CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "module", "weights")
# Prefixes wrappers add to every key; preferred over other prefixes when matches tie.
WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.", "net.", "network.", "backbone.", "encoder.")
# The classifier layer of torchvision models, which posttrain calls `head`.
SOURCE_HEADS = ("fc.", "head.")
PREFIX_DEPTH = 3  # leading key components a wrapper may add (`module.model.features.`)
# The share of the backbone's weight kernels (>= 2-D tensors) a file must match to be loaded.
MIN_KERNEL_FRACTION = 0.5


def shorten(keys: list[str], limit: int = 8) -> str:
    """At most `limit` names, then the count, so a long list stays one readable line."""
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


@dataclass
class LoadReport:
    """What happened to each tensor of the source, so nothing is dropped silently."""

    source: str
    total: int = 0
    loaded: int = 0
    mapping: str = ""
    head_replaced: str = ""
    head_kept: str = ""
    adapted: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        lines = [
            f"pretrained weights from {self.source}: matched {self.loaded} of {self.total} "
            f"tensors{f' ({self.mapping})' if self.mapping else ''}"
        ]
        if self.head_replaced:
            lines.append(f"  head replaced: {self.head_replaced}")
        if self.head_kept:
            lines.append(f"  head kept (model.pretrained_head=true): {self.head_kept}")
        lines += [f"  adapted: {item}" for item in self.adapted]
        for label, keys in (
            ("missing from the source (kept at initialization)", self.missing),
            ("dropped: in the source but not in the model", self.unexpected),
            ("dropped: shape mismatch (kept at initialization)", self.mismatched),
        ):
            if keys:
                lines.append(f"  {label}: {shorten(keys)}")
        return lines


def torchvision_state_dict(arch: str, name: str) -> tuple[dict[str, Tensor], str]:
    """Download (or read from the torch hub cache) torchvision's weights for `arch`, and
    which they are: `imagenet` is the architecture's DEFAULT, which torchvision releases
    have moved (ResNet-50: V1, then V2), so the log names the member and the file."""
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
    cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    check_cached_weights(cache, weights.url, f"`model.pretrained={name}` ({arch})")
    try:
        state = weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except Exception as error:  # offline, proxy: many error types
        raise PosttrainError(
            f"`model.pretrained={name}`: could not get {arch} weights from {weights.url} "
            f"({type(error).__name__}: {error}). Without internet, place the file at {cache} "
            "or point `model.pretrained` at a local checkpoint/state-dict file."
        ) from error
    return state, f"torchvision {arch} {name} ({weights.name}, {cache.name})"


def check_cached_weights(cache: Path, url: str, what: str) -> None:
    """The torch hub cache file is the one published at `url`: its sha256 begins with the
    hash in its name. torch checks that only when it downloads; a file already there (placed
    by hand offline, copied half-way, another file under that name) was loaded unchecked and
    recorded as torchvision's weights."""
    from posttrain.checkpoints import file_sha256

    match = torch.hub.HASH_REGEX.search(cache.name)
    if not cache.is_file() or match is None:
        return
    expected, actual = match.group(1), file_sha256(cache)
    require(
        actual.startswith(expected),
        f"{what}: the torch hub cache file {cache} is not the file published at {url}: its "
        f"sha256 begins {actual[: len(expected)]}, its name says {expected} (a partial copy, "
        "or other weights under that name). Delete it so it is downloaded again (needs "
        f"internet), or replace it with the file downloaded from {url}; to start from your "
        "own weights, point `model.pretrained` at their file instead.",
    )


def tensors_of(mapping: dict[str, Any]) -> dict[str, Tensor]:
    return {str(k): v for k, v in mapping.items() if isinstance(v, Tensor)}


def file_kind(loaded: dict[str, Any], container: list[str]) -> str:
    """What the file is, named for the messages: the reader's first question on a refusal."""
    from posttrain.checkpoints import CONFIG_KEY

    if CONFIG_KEY in loaded:
        return "posttrain checkpoint"
    if "pytorch-lightning_version" in loaded:
        return "Lightning checkpoint"
    if container:
        return f"checkpoint dict (weights under `{'/'.join(container)}`)"
    return "state dict"


def tensor_count(value: Any) -> int:
    """Tensors in `value` and in the dicts nested in it."""
    if isinstance(value, Tensor):
        return 1
    return sum(map(tensor_count, value.values())) if isinstance(value, dict) else 0


def unwrap(loaded: dict[str, Any]) -> tuple[dict[str, Tensor], list[str]]:
    """The tensors of a state dict, looking inside the usual containers (nested up to 3).

    A container is entered when it holds more tensors than the level's own: a checkpoint
    dict may carry a few loose tensors beside its weights (`{"model": ..., "acc": tensor,
    "loss": tensor}`), and those two were taken for the state dict (mostly tensors)."""
    path: list[str] = []
    current = loaded
    for _ in range(3):
        own = tensors_of(current)
        inner = next(
            (
                k
                for k in CONTAINER_KEYS
                if isinstance(current.get(k), dict) and tensor_count(current[k]) > len(own)
            ),
            None,
        )
        if inner is None:
            return own, path
        path.append(inner)
        current = current[inner]
    return tensors_of(current), path


def file_state_dict(path: Path) -> tuple[dict[str, Tensor], str]:
    """State dict and a description (kind and path) of any checkpoint or state-dict file."""
    from posttrain.checkpoints import load_checkpoint

    loaded = load_checkpoint(path, key="model.pretrained")
    state, container = unwrap(loaded)
    kind = file_kind(loaded, container)
    require(
        bool(state),
        f"`model.pretrained={path}` holds no tensors ({kind} with keys "
        f"{shorten(sorted(map(str, loaded)))}): expected a state dict, or a checkpoint dict "
        f"holding one under {', '.join(f'`{k}`' for k in CONTAINER_KEYS)}.",
    )
    return state, f"{kind} {path}"


@dataclass(frozen=True)
class KeyMapping:
    """Source key -> model key: strip `strip`, then add `add` (`fc.*` becomes `head.*`)."""

    strip: str
    add: str

    def apply(self, key: str) -> str | None:
        if not key.startswith(self.strip):
            return None
        rest = key[len(self.strip) :]
        if self.add and rest.startswith(SOURCE_HEADS):
            return "head." + rest.split(".", 1)[1]
        return self.add + rest

    def describe(self) -> str:
        parts = [f"`{self.strip}` stripped"] if self.strip else []
        parts += [f"`{self.add}` added, `fc.` read as `head.`"] if self.add else []
        return "keys as stored" if not parts else "keys: " + ", ".join(parts)


def evidence(value: Tensor) -> bool:
    """Whether a matching tensor says anything about the file fitting: a 0-dim buffer
    (`num_batches_tracked`) has the same shape in every network, so it does not."""
    return value.ndim > 0


def fits(value: Tensor, target: Tensor) -> bool:
    """Same shape, or an RGB first conv that `adapt_input_conv` turns into `target`'s."""
    if value.shape == target.shape:
        return True
    return (
        value.ndim == 4
        and target.ndim == 4
        and target.shape[0] == value.shape[0]
        and value.shape[1] == 3
        and target.shape[2:] == value.shape[2:]
    )


def candidate_mappings(keys: list[str]) -> list[KeyMapping]:
    """Every leading prefix of up to PREFIX_DEPTH components, with and without `features.`."""
    prefixes = {""}
    for key in keys:
        parts = key.split(".")[:-1]
        prefixes.update(
            ".".join(parts[:n]) + "." for n in range(1, min(PREFIX_DEPTH, len(parts)) + 1)
        )
    return [KeyMapping(p, add) for p in sorted(prefixes) for add in ("", "features.")]


def mapping_rank(mapping: KeyMapping, state: dict[str, Tensor], own: dict[str, Tensor]) -> tuple:
    """Backbone tensors matched by name and shape first; wrapper prefixes, then short ones,
    break ties (so `model.` wins over an EMA copy stored under another prefix)."""
    matched = 0
    for key, value in state.items():
        target = mapping.apply(key)
        if (
            target in own
            and not target.startswith("head.")
            and evidence(value)
            and fits(value, own[target])
        ):
            matched += 1
    known = all(part + "." in WRAPPER_PREFIXES for part in mapping.strip.split(".")[:-1])
    return matched, known, -len(mapping.strip), mapping.add == ""


def best_mapping(state: dict[str, Tensor], own: dict[str, Tensor]) -> tuple[KeyMapping, int]:
    ranked = max(candidate_mappings(list(state)), key=lambda m: mapping_rank(m, state, own))
    return ranked, mapping_rank(ranked, state, own)[0]


def adapt_input_conv(weight: Tensor, in_channels: int) -> Tensor:
    """3-channel (RGB) first-conv weights for another channel count, keeping the response
    to a gray image: summed for 1 channel, tiled and rescaled otherwise."""
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-in_channels // weight.shape[1])
    tiled = weight.repeat(1, repeats, 1, 1)[:, :in_channels]
    return tiled * (weight.shape[1] / in_channels)


def refuse_other_architecture(
    state: dict[str, Tensor], own: dict[str, Tensor], source: str, arch: str
) -> None:
    """Nothing matched under any prefix: show both key sets so the reader sees why."""
    theirs = [f"{k} {tuple(v.shape)}" for k, v in list(state.items())[:4]]
    ours = [f"{k} {tuple(v.shape)}" for k, v in list(own.items())[:4]]
    raise PosttrainError(
        f"`model.pretrained` ({source}): none of its {len(state)} tensors matches a backbone "
        f"tensor of `model.arch={arch}` by name and shape, under any wrapper prefix (its keys "
        f"begin {', '.join(theirs)}; the model's {', '.join(ours)}; 0-dim counters such as "
        "`num_batches_tracked` prove nothing): it was trained with another architecture or "
        "another size. Set `model.arch` (and `model.width`/`model.hidden`) to those of the "
        "file, or use weights of this model."
    )


def backbone_kernels(own: dict[str, Tensor]) -> list[str]:
    """The model's backbone weight kernels (conv and linear weights, >= 2-D): the tensors
    whose match says the file holds this network, not a coincidence of widths."""
    return [k for k, v in own.items() if v.ndim >= 2 and not k.startswith("head.")]


def matched_kernels(mapping: KeyMapping, state: dict[str, Tensor], own: dict[str, Tensor]) -> set:
    kernels = set(backbone_kernels(own))
    targets = ((mapping.apply(key), value) for key, value in state.items())
    return {t for t, value in targets if t in kernels and fits(value, own[t])}


def refuse_small_match(
    mapping: KeyMapping, state: dict[str, Tensor], own: dict[str, Tensor], source: str, arch: str
) -> None:
    """Refuse a file that matches fewer than `MIN_KERNEL_FRACTION` of the backbone's kernels:
    most of the backbone would stay random while the log reads as a pretrained start."""
    kernels = backbone_kernels(own)
    matched = matched_kernels(mapping, state, own)
    if not kernels or len(matched) >= MIN_KERNEL_FRACTION * len(kernels):
        return
    unmatched = [f"{k} {tuple(own[k].shape)}" for k in kernels if k not in matched]
    raise PosttrainError(
        f"`model.pretrained` ({source}): only {len(matched)} of the {len(kernels)} weight "
        f"kernels (conv/linear weights) of the `model.arch={arch}` backbone match a tensor of "
        f"the file by name and shape ({mapping.describe()}); not matched: {shorten(unmatched, 4)}. "
        f"At least {MIN_KERNEL_FRACTION:.0%} must match, or fine-tuning would start mostly "
        "from random weights: the file holds another architecture or another size. Set "
        "`model.arch` (and `model.width`/`model.hidden`) to those of the file, or use weights "
        "of this model."
    )


def refuse_deeper_source(
    targets: dict[str, str | None],
    state: dict[str, Tensor],
    own: dict[str, Tensor],
    source: str,
    arch: str,
) -> None:
    """Refuse a file whose extra kernels sit inside the model's own blocks (`layer1.2.*` where
    the model's `layer1` ends at block 1): another depth of the same family, not extra heads
    (a `projector.*` beside the backbone stays allowed and is listed as unused)."""
    blocks = {key.rsplit(".", n)[0] for key in own for n in range(1, key.count(".") + 1)}
    inside = [
        f"{original} -> {target}"
        for original, target in targets.items()
        if target is not None
        and target not in own
        and not target.startswith("head.")
        and state[original].ndim >= 2
        and target.count(".") >= 3
        and target.rsplit(".", 3)[0] in blocks
    ]
    if inside:
        raise PosttrainError(
            f"`model.pretrained` ({source}): {len(inside)} of its weight kernels belong in "
            f"blocks the `model.arch={arch}` backbone does not have ({shorten(inside, 3)}), "
            "although the rest matches by name: it was saved from a deeper network of the same "
            "family (a ResNet-34 file in a ResNet-18 matches every ResNet-18 kernel and drops "
            "the others). Set `model.arch` to the file's architecture, or use weights of "
            "this model."
        )


def sibling_head_keys(state: dict[str, Tensor], mapping: KeyMapping) -> dict[str, str]:
    """Source head keys one prefix above the backbone's (`net.fc.weight` beside
    `net.backbone.*`) -> model head keys; empty when the mapping already reaches a head."""
    if any((mapping.apply(k) or "").startswith("head.") for k in state) or not mapping.strip:
        return {}
    parts = mapping.strip.split(".")[:-1]
    parent = "".join(part + "." for part in parts[:-1])
    found = {}
    for key in state:
        rest = key[len(parent) :] if key.startswith(parent) else ""
        if rest.startswith(SOURCE_HEADS) and rest.count(".") == 1:
            found[key] = "head." + rest.split(".", 1)[1]
    return found


def refuse_head(source: str, own: dict[str, Tensor], found: dict[str, Tensor]) -> None:
    """`model.pretrained_head=true` asked for the source's head: never silently a new one."""
    wanted = tuple(own["head.weight"].shape)
    if found:
        held = ", ".join(f"{k} {tuple(v.shape)}" for k, v in found.items())
        reason = f"its head ({held}) does not have the model's shape {wanted}"
    else:
        reason = (
            "it holds no classifier head (`fc.*` or `head.*` beside the backbone's keys or one "
            "prefix above them)"
        )
    raise PosttrainError(
        f"`model.pretrained_head=true` keeps the source's classifier head, but "
        f"`model.pretrained` ({source}): {reason}. Set `model.pretrained_head=false` to train a "
        "new head sized to this task's classes, or point `model.pretrained` at a file whose "
        "head has this task's classes."
    )


def resolve_source(pretrained: str, arch: str) -> tuple[dict[str, Tensor], str]:
    path = Path(str(pretrained)).expanduser()
    if path.exists():
        return file_state_dict(path)
    if "/" in str(pretrained) or str(pretrained).endswith((".ckpt", ".pt", ".pth")):
        raise PosttrainError(f"`model.pretrained`: file {path} does not exist.")
    return torchvision_state_dict(arch, str(pretrained))


def check_kept_head(
    targets: dict[str, str | None], state: dict[str, Tensor], own: dict[str, Tensor], source: str
) -> None:
    """With `model.pretrained_head=true` the source must hold a head of the model's shape."""
    heads = {o: state[o] for o, key in targets.items() if key and key.startswith("head.")}
    keys = {targets[o] for o in heads}
    fitting = all(
        targets[o] in own and own[targets[o]].shape == value.shape for o, value in heads.items()
    )
    if "head.weight" not in keys or not fitting:
        refuse_head(source, own, heads)


def load_pretrained(
    model: nn.Module, pretrained: str, arch: str, keep_head: bool = False
) -> LoadReport:
    """Load `pretrained` into `model` (an ImageClassifier) and report what fit.

    The head is re-initialized for the new task unless `keep_head` (`model.pretrained_head`):
    then the source's head is loaded, and refused when absent or of another shape.
    """
    state, source = resolve_source(pretrained, arch)
    own = model.state_dict()
    mapping, matched = best_mapping(state, own)
    if matched == 0:
        refuse_other_architecture(state, own, source, arch)
    refuse_small_match(mapping, state, own, source, arch)
    report = LoadReport(source=source, total=len(state), mapping=mapping.describe())
    siblings = sibling_head_keys(state, mapping)
    targets = {original: siblings.get(original) or mapping.apply(original) for original in state}
    refuse_deeper_source(targets, state, own, source, arch)
    if keep_head:
        check_kept_head(targets, state, own, source)
    accepted: dict[str, Tensor] = {}
    for original, value in state.items():
        key = targets[original]
        if key is None or key not in own:
            report.unexpected.append(original)
        elif key.startswith("head."):
            if keep_head:
                accepted[key] = value
                report.head_kept += f"{', ' if report.head_kept else ''}{original} -> {key}"
                continue
            report.unexpected.append(original)
            if key == "head.weight":
                report.head_replaced = (
                    f"new {tuple(own[key].shape)} head for this task's classes (source head "
                    f"{original} {tuple(value.shape)} not used; model.pretrained_head=true "
                    "keeps a same-shape head)"
                )
        elif own[key].shape == value.shape:
            accepted[key] = value
        elif fits(value, own[key]):
            accepted[key] = adapt_input_conv(value, own[key].shape[1])
            report.adapted.append(f"{key}: {value.shape[1]} -> {own[key].shape[1]} input channels")
        else:
            report.mismatched.append(
                f"{original} {tuple(value.shape)} vs {key} {tuple(own[key].shape)}"
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
