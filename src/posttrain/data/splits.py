"""Do two runs hold out the same validation and test images? One answer for every part that
compares runs (a distillation teacher with its student, the jobs of a model soup).

A teacher or soup ingredient trained on another split has trained on images the other run
validates or tests on (a `data.seed=1` teacher had seen 244 of a `data.seed=0` student's 359
test images), and one trained on other classes predicts other things under the same indices.
What decides the split, read from `ImageClassificationDataModule.setup`: the source
(`dataset`, its `options`, and `root` where the folder is the data), the kept `classes`, and
the seeded stratified draws (`seed`, `test_fraction`, then `val_fraction`). Episodes
(`EpisodicDataModule`) split classes by the same keys, or by a named class protocol,
`split` (Omniglot's `vinyals`/`lake`; an image-classification config carries it in
`options.split`): lake's meta-test characters are among vinyals' meta-training ones.
`rotations` is not a split key: classes are rotated after they are split, so the same
characters stay meta-test with or without their rotations. The per-class
training subset (`samples_per_class`) is drawn afterwards from the training pool only, so it
never moves a validation or test image: runs may differ there, and in `image_size`.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SPLIT_KEYS = (
    "dataset", "root", "options", "split", "classes", "seed", "val_fraction", "test_fraction"
)  # fmt: skip
# Options that say where decoded images are cached, not which images there are.
NOT_DATA_OPTIONS = frozenset({"cache_dir"})
# Where a checkpoint's DataModule state keeps the listing its splits were drawn from.
LISTING_KEY = "data_listing"
# Sources whose `root` is the data itself; elsewhere it is where a download lives, which may
# move (another checkout, another machine) without changing one image.
ROOT_IS_THE_DATA = frozenset({"imagefolder"})


def plain(value: Any) -> Any:
    """Config values as plain Python (OmegaConf containers to dicts and lists)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def datamodule_defaults() -> dict[str, Any]:
    """What an older config that lacks a key meant: the DataModule's default for it."""
    from posttrain.data.datamodule import ImageClassificationDataModule

    parameters = inspect.signature(ImageClassificationDataModule.__init__).parameters
    return {name: p.default for name, p in parameters.items() if p.default is not p.empty}


def split_settings(data: Mapping[str, Any]) -> dict[str, Any]:
    """The values of a `data` config that decide which images are validation and test."""
    settings = {key: plain(data.get(key, datamodule_defaults().get(key))) for key in SPLIT_KEYS}
    options = settings["options"] or {}
    settings["options"] = {k: v for k, v in options.items() if k not in NOT_DATA_OPTIONS}
    if settings["dataset"] not in ROOT_IS_THE_DATA:
        settings["root"] = None
    return settings


def as_typed(value: Any) -> str:
    """A value as it is typed on the command line: `null`, `[0,1,2]`, `{size:64}`."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return "[" + ",".join(as_typed(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{as_typed(v)}" for k, v in value.items()) + "}"
    return str(value)


def data_listing(loaded: Any, settings: Mapping[str, Any]) -> dict[str, Any]:
    """What the seeded split is drawn from beyond the config: the source's images in load
    order (labels, and file paths under the root for file sources). Stored with checkpoints:
    with the same config, an image folder whose files were added, removed or renamed since
    draws another split (one image more per class put 6 of a 12-image test split among the
    images the earlier checkpoint trained on), so evaluating or resuming it would test on
    training images without a word."""
    from posttrain.data.sources import ImageRows

    digest = hashlib.sha256()
    images = 0
    for name in ("train", "val", "test"):
        part = getattr(loaded, name)
        if part is None:
            continue
        images += len(part)
        digest.update(f"{name}:{part.labels.tolist()}".encode())
        if isinstance(part.images, ImageRows):
            files, root = part.images.files.files, str(part.images.files.root)
            for row in part.images.rows.tolist():
                digest.update(str(files[row]).removeprefix(root).encode() + b"\0")
    root = settings.get("root")
    return {
        "dataset": settings.get("dataset"),
        # Resolved: `./data` and its absolute path are one folder. Kept for every source: a
        # CIFAR-format copy of other images in another folder is other data, as a folder is.
        "root": str(Path(str(root)).expanduser().resolve()) if root else None,
        "images": images,
        "digest": digest.hexdigest(),
    }


def stored_listing(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """The listing a checkpoint's splits were drawn from (`data_listing`, kept in its
    DataModule's state, whichever DataModule wrote it), or None when it predates listings."""
    for state in checkpoint.values():
        if isinstance(state, Mapping) and isinstance(state.get(LISTING_KEY), Mapping):
            return dict(state[LISTING_KEY])
    return None


def listing_change(
    stored: Mapping[str, Any] | None, current: Mapping[str, Any], root_may_move: bool = False
) -> str | None:
    """How the data changed since `stored` was recorded (`data_listing`), or None: the same,
    unknown (a checkpoint written before listings were stored), or other data on purpose
    (another dataset, or another `data.root` unless `root_may_move`)."""
    if not stored or stored.get("dataset") != current["dataset"]:
        return None
    if stored.get("root") != current["root"] and not root_may_move:
        return None
    if stored.get("digest") == current["digest"]:
        return None
    where = f"`data.dataset={current['dataset']}`" + (
        f" in `data.root={current['root']}`" if current["root"] else ""
    )
    if stored.get("images") != current["images"]:
        return f"{where} holds {current['images']} images now, {stored.get('images')} then"
    return (
        f"{where} holds as many images as then ({current['images']}), but under other names "
        "or labels (files renamed or moved between classes)"
    )


def split_difference(
    ours: Mapping[str, Any], theirs: Mapping[str, Any]
) -> tuple[str, str, str] | None:
    """The first `data.*` key whose value makes the two splits differ, with both values as
    typed (`as_typed`); None when the two configs hold out the same validation and test images."""
    mine, other = split_settings(ours), split_settings(theirs)
    for key in SPLIT_KEYS:
        if mine[key] != other[key]:
            return f"data.{key}", as_typed(mine[key]), as_typed(other[key])
    return None


__all__ = [
    "LISTING_KEY",
    "SPLIT_KEYS",
    "as_typed",
    "data_listing",
    "listing_change",
    "split_difference",
    "split_settings",
    "stored_listing",
]
