"""Small datasets in the real on-disk formats, generated so the loaders are tested offline."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from posttrain.data.omniglot_splits import EVALUATION_ALPHABETS as OMNIGLOT_EVALUATION_ALPHABETS


def write_cifar(root: Path, classes: int = 10, train_per_batch: int = 20, test: int = 20) -> Path:
    """A miniature CIFAR-10/100 folder in the original python-pickle batch format."""
    rng = np.random.default_rng(0)

    def batch(count: int, label_key: str) -> dict:
        labels = [int(i % classes) for i in range(count)]
        data = rng.integers(0, 256, size=(count, 3 * 32 * 32), dtype=np.uint8)
        return {"batch_label": "fixture", label_key: labels, "data": data}

    def dump(path: Path, payload: dict) -> None:
        with path.open("wb") as handle:
            pickle.dump(payload, handle, protocol=2)

    if classes == 10:
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for index in range(1, 6):
            dump(folder / f"data_batch_{index}", batch(train_per_batch, "labels"))
        dump(folder / "test_batch", batch(test, "labels"))
        dump(folder / "batches.meta", {"label_names": [f"name{i}" for i in range(10)]})
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        dump(folder / "train", batch(train_per_batch * 5, "fine_labels"))
        dump(folder / "test", batch(test, "fine_labels"))
        dump(folder / "meta", {"fine_label_names": [f"name{i}" for i in range(classes)]})
    return folder


def write_image_folder(
    root: Path, classes: int = 3, per_class: int = 8, size: int = 20, seed: int = 0
) -> Path:
    """root/<class>/<n>.png with a distinct colour per class, as a user would lay it out."""
    rng = np.random.default_rng(seed)
    for label in range(classes):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True)
        for index in range(per_class):
            pixels = np.full((size, size, 3), 60 * label, dtype=np.uint8)
            pixels += rng.integers(0, 40, size=pixels.shape, dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{index}.png")
    return root


def write_split_image_folder(
    root: Path, counts: dict[str, int], classes: int = 3, size: int = 20
) -> Path:
    """root/<split>/<class>/<n>.png (e.g. train/ and test/), each split its own pixels."""
    for seed, (split, per_class) in enumerate(counts.items()):
        write_image_folder(root / split, classes=classes, per_class=per_class, size=size, seed=seed)
    return root


class RunsCode:
    """A pickle that would run code when loaded without `weights_only`."""

    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def write_malicious_pickle(path: Path) -> Path:
    with path.open("wb") as handle:
        pickle.dump({"data": RunsCode()}, handle)
    return path


def write_malicious_checkpoint(path: Path) -> Path:
    """A torch.save checkpoint whose unpickling would run a shell command."""
    import torch

    torch.save({"state_dict": {}, "payload": RunsCode()}, path)
    return path


def write_omniglot(root: Path, alphabets: int = 2, characters: int = 4, drawers: int = 6) -> Path:
    """omniglot-py/images_{background,evaluation}/<alphabet>/<character>/<n>.png, 105x105."""
    rng = np.random.default_rng(0)
    for part in ("images_background", "images_evaluation"):
        for a in range(alphabets):
            for c in range(characters):
                folder = root / "omniglot-py" / part / f"Alphabet_{a}" / f"character{c + 1:02d}"
                folder.mkdir(parents=True)
                stroke = rng.integers(10, 95, size=4)
                for d in range(drawers):
                    pixels = np.full((105, 105), 255, dtype=np.uint8)
                    pixels[stroke[0] : stroke[1], stroke[2] : stroke[3]] = 0
                    pixels[rng.integers(0, 105), :] = 0
                    Image.fromarray(pixels, mode="L").save(folder / f"{d}.png")
    return root


def write_omniglot_characters(root: Path, drawers: int = 2, size: int = 8) -> list[str]:
    """Every character the shipped Vinyals split files name (all 1,623), in the real folder
    layout and halves, with `drawers` tiny drawings each; returns `<alphabet>/<character>`s.

    Each drawing encodes its character's index in its pixels, so a test can tell from an
    image which character it is.
    """
    from posttrain.data.omniglot_splits import VINYALS_FILES, characters_of, split_file_text

    names = sorted(
        {c for f in VINYALS_FILES.values() for c in characters_of(split_file_text(f), f)}
    )
    for index, name in enumerate(names):
        alphabet = name.split("/")[0]
        half = (
            "images_evaluation"
            if alphabet in OMNIGLOT_EVALUATION_ALPHABETS
            else "images_background"
        )
        folder = root / "omniglot-py" / half / name
        folder.mkdir(parents=True)
        for drawer in range(drawers):
            pixels = np.zeros((size, size), dtype=np.uint8)
            pixels[0, :2] = (index // 256, index % 256)
            pixels[1, 0] = 40 * drawer
            Image.fromarray(pixels, mode="L").save(folder / f"{index:04d}_{drawer:02d}.png")
    return names


def write_16bit_image_folder(root: Path, per_class: int = 4, size: int = 6) -> Path:
    """root/class_<k>/<n>.png as 16-bit grayscale PNGs (PIL mode I;16), the way microscopy and
    medical exports store them: class 0 around 10,000-20,000, class 1 around 40,000-50,000."""
    rng = np.random.default_rng(0)
    for label, (low, high) in enumerate([(10_000, 20_000), (40_000, 50_000)]):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True)
        for index in range(per_class):
            pixels = rng.integers(low, high, size=(size, size), dtype=np.uint16)
            Image.fromarray(pixels).save(folder / f"{index}.png")
    return root
