"""Decoded-image cache of the file-backed sources (issue 13, item 4: every start decoded every
file again: Omniglot about 65 s, a 50,000-JPEG folder 64 s; 32-pixel images were upsampled to
64 without a word)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from posttrain.data.sources import ImageFolderSource, OmniglotSource
from tests.fixtures import write_image_folder


def source(root: Path, cache: Path, **options) -> ImageFolderSource:
    return ImageFolderSource(root=str(root), cache_dir=str(cache), **options)


def entries(cache: Path) -> list[Path]:
    return sorted(cache.glob("*.pt"))


def load_logged(src, caplog) -> tuple[torch.Tensor, str]:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="posttrain"):
        images = src.load().train.images
    return images, caplog.text


@pytest.fixture
def images(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "images", classes=2, per_class=3, size=12)


def test_second_load_hits_the_cache_with_identical_tensors(images, tmp_path, caplog) -> None:
    cache = tmp_path / "cache"
    first, text = load_logged(source(images, cache, size=8), caplog)
    assert "cache miss" in text and len(entries(cache)) == 1
    second, text = load_logged(source(images, cache, size=8), caplog)
    assert "cache hit" in text
    assert second.dtype == torch.uint8 and torch.equal(first, second)
    uncached = ImageFolderSource(root=str(images), size=8).load().train.images
    assert torch.equal(first, uncached)


def test_the_hit_does_not_decode(images, tmp_path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    source(images, cache).load()

    def refuse(*args):
        raise AssertionError("decoded on a cache hit")

    monkeypatch.setattr(ImageFolderSource, "decode_file", staticmethod(refuse))
    assert len(source(images, cache).load().train) == 6


def bump_mtime(path: Path) -> None:
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


@pytest.mark.parametrize("change", ["touch", "content"])
def test_a_changed_file_invalidates_the_entry(images, tmp_path, caplog, change) -> None:
    cache = tmp_path / "cache"
    first, _ = load_logged(source(images, cache), caplog)
    target = images / "class_1" / "0.png"
    if change == "touch":
        bump_mtime(target)
    else:
        stat = target.stat()
        Image.fromarray(np.zeros((12, 12, 3), dtype=np.uint8)).save(target)
        os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same mtime: size differs
    second, text = load_logged(source(images, cache), caplog)
    assert "cache miss" in text
    if change == "content":
        assert not torch.equal(first, second) and second[3].sum() == 0
    assert len(entries(cache)) == 1, "the superseded entry is removed"


def test_an_added_or_removed_file_invalidates_the_entry(images, tmp_path, caplog) -> None:
    cache = tmp_path / "cache"
    source(images, cache).load()
    Image.fromarray(np.zeros((12, 12, 3), dtype=np.uint8)).save(images / "class_0" / "new.png")
    added, text = load_logged(source(images, cache), caplog)
    assert "cache miss" in text and len(added) == 7
    (images / "class_1" / "2.png").unlink()
    removed, text = load_logged(source(images, cache), caplog)
    assert "cache miss" in text and len(removed) == 6


@pytest.mark.parametrize("damage", [b"not a torch file", b""])
def test_a_corrupt_entry_is_rebuilt(images, tmp_path, caplog, damage) -> None:
    cache = tmp_path / "cache"
    first, _ = load_logged(source(images, cache), caplog)
    (entry,) = entries(cache)
    entry.write_bytes(damage or entry.read_bytes()[: entry.stat().st_size // 2])
    second, text = load_logged(source(images, cache), caplog)
    assert "ignoring it" in text and "cache miss" in text and torch.equal(first, second)
    third, text = load_logged(source(images, cache), caplog)
    assert "cache hit" in text and torch.equal(first, third)


def test_an_entry_of_the_wrong_shape_is_rebuilt(images, tmp_path, caplog) -> None:
    cache = tmp_path / "cache"
    source(images, cache).load()
    (entry,) = entries(cache)
    torch.save({"images": torch.zeros(2, 3, 4, 4, dtype=torch.uint8)}, entry)
    loaded, text = load_logged(source(images, cache), caplog)
    assert "ignoring it" in text and len(loaded) == 6


def test_decode_options_get_their_own_entries(images, tmp_path, caplog) -> None:
    cache = tmp_path / "cache"
    variants = [{"size": 8}, {"size": 6}, {"size": 8, "channels": 1}, {}]
    shapes = [tuple(source(images, cache, **v).load().train.images.shape) for v in variants]
    assert shapes == [(6, 3, 8, 8), (6, 3, 6, 6), (6, 1, 8, 8), (6, 3, 12, 12)]
    assert len(entries(cache)) == 4
    for variant in variants:  # each still there, each a hit
        _, text = load_logged(source(images, cache, **variant), caplog)
        assert "cache hit" in text


def test_unwritable_cache_dir_only_costs_a_decode(images, tmp_path, caplog) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    loaded, text = load_logged(source(images, blocker / "cache"), caplog)
    assert len(loaded) == 6 and "Could not write" in text


def test_shared_size_is_kept_and_logged(images, tmp_path, caplog) -> None:
    loaded, text = load_logged(ImageFolderSource(root=str(images)), caplog)
    assert loaded.shape[-2:] == (12, 12) and "12x12 (the images' own size)" in text


def test_mixed_sizes_fall_back_to_64_logged(images, caplog) -> None:
    Image.fromarray(np.zeros((20, 10, 3), dtype=np.uint8)).save(images / "class_1" / "odd.png")
    loaded, text = load_logged(ImageFolderSource(root=str(images)), caplog)
    assert loaded.shape[-2:] == (64, 64) and "differ in size" in text
    resized = ImageFolderSource.decode_file(images / "class_0" / "0.png", 3, 64)
    assert torch.equal(loaded[0], resized), "same pixels as decoding at 64 directly"


def test_omniglot_second_load_hits_the_cache(omniglot_all_characters, tmp_path, caplog) -> None:
    cache = tmp_path / "cache"

    def load(split: str = "lake"):
        omniglot = OmniglotSource(
            root=str(omniglot_all_characters), download=False, split=split, cache_dir=str(cache)
        )
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="posttrain"):
            return omniglot.load(), caplog.text

    first, text = load()
    assert "cache miss" in text and (len(first.train), len(first.test)) == (964 * 2, 659 * 2)
    second, text = load()
    assert "cache hit" in text
    assert torch.equal(first.train.images, second.train.images)
    assert torch.equal(first.test.labels, second.test.labels)
    assert first.train.images.shape[1:] == (1, 28, 28)


def test_cache_dir_is_where_the_config_says(tmp_path, make_config) -> None:
    from hydra.utils import instantiate

    write_image_folder(tmp_path / "images", classes=2, per_class=10, size=8)
    cache = tmp_path / "elsewhere"
    cfg = make_config(
        "data=imagefolder", f"data.root={tmp_path / 'images'}", f"paths.cache_dir={cache}"
    )
    assert cfg.data.options.cache_dir == str(cache)
    instantiate(cfg.data).setup("fit")
    assert len(entries(cache)) == 1
    default = make_config("data=imagefolder", f"data.root={tmp_path / 'images'}")
    assert default.data.options.cache_dir == f"{default.paths.data_dir}/.cache"
