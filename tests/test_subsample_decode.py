"""Subsampling decodes only what it keeps (issue 13, "Decoded-image cache": a first start with
`data.samples_per_class=10` on a 50,000-JPEG folder decoded all 50,000 files, then kept 100).

The rows are chosen on the listing's labels with the same seeded draws as before, so the
splits must equal those of the old path (decode everything, then subsample), which each test
computes by swapping `load_listed` back to `source.load()`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from posttrain.data import ImageClassificationDataModule
from posttrain.data import datamodule as datamodule_module
from posttrain.data.cache import HEADER_BYTES, header_shape, jpeg_shape, png_shape
from posttrain.data.sources import ImageFolderSource
from posttrain.errors import PosttrainError
from tests.fixtures import (
    write_image_folder,
    write_omniglot_characters,
    write_split_image_folder,
)

SPLITS = ("train", "val", "test")


@pytest.fixture
def decoded(monkeypatch) -> list[str]:
    """The path of every file decoded from now on, in order."""
    seen: list[str] = []
    real = ImageFolderSource.decode_file

    def counting(path, channels, size):
        seen.append(str(path))
        return real(path, channels, size)

    monkeypatch.setattr(ImageFolderSource, "decode_file", staticmethod(counting))
    return seen


def set_up(root: Path, dataset: str = "imagefolder", **kwargs) -> ImageClassificationDataModule:
    datamodule = ImageClassificationDataModule(dataset=dataset, root=str(root), **kwargs)
    datamodule.setup("fit")
    return datamodule


def set_up_the_old_way(monkeypatch, root: Path, **kwargs) -> ImageClassificationDataModule:
    """As before this change: every file decoded by `source.load()`, then subsampled."""
    with monkeypatch.context() as patched:
        patched.setattr(datamodule_module, "load_listed", lambda source: source.load())
        return set_up(root, **kwargs)


def assert_same_splits(new, old) -> None:
    for split in SPLITS:
        assert torch.equal(new.splits[split].labels, old.splits[split].labels), split
        assert torch.equal(new.splits[split].images, old.splits[split].images), split


def used(datamodule) -> int:
    return sum(len(datamodule.splits[split]) for split in SPLITS)


LAYOUTS = {
    "one folder": lambda root: write_image_folder(root, classes=3, per_class=20, size=8),
    "split folders": lambda root: write_split_image_folder(
        root, {"train": 20, "test": 4}, classes=3, size=8
    ),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "subsample",
    [{"samples_per_class": 2}, {"classes": [2, 0]}, {"classes": [0, 2], "samples_per_class": 3}],
)
def test_only_the_kept_files_are_decoded_and_the_splits_are_unchanged(
    tmp_path, monkeypatch, decoded, layout, subsample
) -> None:
    LAYOUTS[layout](tmp_path)
    for seed in (0, 1):
        decoded.clear()
        old = set_up_the_old_way(monkeypatch, tmp_path, seed=seed, **subsample)
        listed = len(decoded)
        decoded.clear()
        new = set_up(tmp_path, seed=seed, **subsample)
        assert_same_splits(new, old)
        assert len(decoded) == len(set(decoded)) == used(new) < listed
    if "classes" in subsample:
        assert all("class_1" not in path for path in decoded)


def test_omniglot_decodes_only_the_kept_characters(tmp_path, monkeypatch, decoded) -> None:
    """`vinyals`: one pool of every character, split by image (`lake` keeps other characters
    for its test split and is refused for a classifier)."""
    names = write_omniglot_characters(tmp_path, drawers=3)
    options = {"dataset": "omniglot", "download": False, "classes": [0, 3], "val_fraction": 0.5,
               "options": {"split": "vinyals"}}  # fmt: skip
    old = set_up_the_old_way(monkeypatch, tmp_path, **options)
    assert len(decoded) == 3 * len(names)
    decoded.clear()
    new = set_up(tmp_path, **options)
    assert_same_splits(new, old)
    assert len(decoded) == used(new) == 6  # the 3 drawings of each of the 2 kept characters
    assert {Path(p).parent.name for p in decoded} == {Path(names[0]).name, Path(names[3]).name}


def cached(root: Path, cache: Path, **kwargs) -> ImageClassificationDataModule:
    return set_up(root, options={"cache_dir": str(cache)}, **kwargs)


def entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.glob("*.pt"))


def test_a_subset_entry_is_not_read_as_the_full_listing(tmp_path, decoded) -> None:
    images, cache = write_image_folder(tmp_path / "images", 3, 20, 8), tmp_path / "cache"
    subsampled = cached(images, cache, samples_per_class=2)
    (subset,) = entries(cache)
    assert subset.startswith("imagefolder-subset-") and len(decoded) == used(subsampled)
    decoded.clear()
    again = cached(images, cache, samples_per_class=2)
    assert not decoded, "the same subset again is a hit"
    assert_same_splits(again, subsampled)
    full = cached(images, cache)
    assert len(decoded) == 60 and used(full) == 60, "the full run decoded every file"
    assert len(entries(cache)) == 2 and subset in entries(cache)


def test_a_full_entry_serves_any_subset_without_decoding(tmp_path, decoded) -> None:
    images, cache = write_image_folder(tmp_path / "images", 3, 20, 8), tmp_path / "cache"
    uncached = [set_up(images, seed=seed, samples_per_class=2) for seed in (0, 1)]
    cached(images, cache)
    decoded.clear()
    for seed, expected in enumerate(uncached):
        assert_same_splits(cached(images, cache, seed=seed, samples_per_class=2), expected)
    assert not decoded
    assert len(entries(cache)) == 1, "slices of the full entry: no subset entry written"


def test_a_change_to_a_file_not_kept_invalidates_the_subset_entry(tmp_path, decoded) -> None:
    images, cache = write_image_folder(tmp_path / "images", 3, 20, 8), tmp_path / "cache"
    cached(images, cache, classes=[0, 2])
    target = images / "class_1" / "0.png"  # not kept, but with `size` unset it sets the size
    Image.fromarray(np.zeros((10, 10, 3), dtype=np.uint8)).save(target)
    decoded.clear()
    changed = cached(images, cache, classes=[0, 2])
    assert len(decoded) == 40 and changed.splits["train"].images.shape[-1] == 64


def test_a_subset_is_decoded_at_the_size_a_full_decode_picks(tmp_path, monkeypatch) -> None:
    """Kept files all 8x8, one file not kept 10x20: the full decode resizes all to 64, so
    decoding the subset must too (else a cache hit and a miss would give other pixels)."""
    write_image_folder(tmp_path, classes=3, per_class=10, size=8)
    Image.fromarray(np.zeros((10, 20, 3), dtype=np.uint8)).save(tmp_path / "class_1" / "odd.png")
    old = set_up_the_old_way(monkeypatch, tmp_path, classes=[0, 2])
    new = set_up(tmp_path, classes=[0, 2])
    assert new.splits["train"].images.shape[-2:] == (64, 64)
    assert_same_splits(new, old)


def test_a_broken_file_is_refused_only_by_the_runs_that_use_it(tmp_path) -> None:
    write_image_folder(tmp_path, classes=3, per_class=10, size=8)
    broken = tmp_path / "class_1" / "broken.png"
    broken.write_bytes(b"not an image")
    assert used(set_up(tmp_path, classes=[0, 2])) == 20, "class_1 is not kept: not decoded"
    with pytest.raises(PosttrainError, match=rf"Cannot read image file {broken}"):
        set_up(tmp_path, classes=[0, 1])
    truncated = tmp_path / "class_0" / "3.png"
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(PosttrainError, match=rf"Cannot read image file {truncated}"):
        set_up(tmp_path, classes=[0, 2])


def test_an_empty_class_folder_is_refused_even_when_not_kept(tmp_path) -> None:
    """Labels are the sorted class folders, so every one is listed (no decode needed)."""
    write_image_folder(tmp_path, classes=3, per_class=4, size=8)
    os.mkdir(tmp_path / "class_3")
    with pytest.raises(PosttrainError, match=r"class_3.*holds no images"):
        set_up(tmp_path, classes=[0, 1])


def test_header_shapes_agree_with_pil_for_every_format(tmp_path) -> None:
    """The size decision reads headers (PNG and JPEG parsed by hand): each must be PIL's."""
    rng = np.random.default_rng(0)
    written = []
    for name, mode, size, options in [
        ("rgb.png", "RGB", (13, 7), {}),
        ("gray.png", "L", (5, 9), {}),
        ("palette.png", "P", (6, 4), {}),
        ("base.jpg", "RGB", (17, 11), {}),
        ("progressive.jpg", "RGB", (9, 21), {"progressive": True}),
        ("gray.jpg", "L", (8, 3), {}),
        ("exif.jpg", "RGB", (10, 12), {"exif": b"Exif\x00\x00" + bytes(30_000)}),
        ("image.bmp", "RGB", (7, 5), {}),
        ("image.gif", "P", (4, 6), {}),
        ("image.webp", "RGB", (12, 8), {}),
    ]:
        pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).convert(mode).save(tmp_path / name, **options)
        written.append(tmp_path / name)
    for path in written:
        with Image.open(path) as image:
            assert header_shape(path) == (image.height, image.width), path.name
        if path.suffix in (".png", ".jpg"):  # parsed by hand, not by PIL's fallback
            head = path.read_bytes()[:HEADER_BYTES]
            assert (png_shape(head) or jpeg_shape(head)) == header_shape(path), path.name
    (tmp_path / "junk.png").write_bytes(b"not an image")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "base.jpg").read_bytes()[:40])
    assert header_shape(tmp_path / "junk.png") is None
    assert header_shape(tmp_path / "cut.jpg") is None
