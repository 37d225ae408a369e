"""Files are validated on read (issue 13, item 2): every malformed file is one paragraph
naming the file and what is wrong, before any training; never a traceback, never a run on
silently corrupted data. Each case was observed as a traceback or as a completed run."""

from __future__ import annotations

import logging
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from posttrain.data.datamodule import ImageClassificationDataModule
from posttrain.data.sources import CifarSource, ImageFolderSource, OmniglotSource
from posttrain.errors import PosttrainError
from tests.conftest import run_cli
from tests.fixtures import (
    write_16bit_image_folder,
    write_cifar,
    write_image_folder,
    write_split_image_folder,
)


def rewrite_batch(folder: Path, name: str, change) -> Path:
    """Load one CIFAR batch of the fixture, let `change` edit the dict, write it back."""
    path = folder / name
    with path.open("rb") as handle:
        batch = pickle.load(handle, encoding="latin1")
    with path.open("wb") as handle:
        pickle.dump(change(batch), handle, protocol=2)
    return path


def load_cifar(root: Path, classes: int = 10):
    return CifarSource(root=str(root), download=False, classes=classes).load()


def fewer_labels(batch: dict) -> dict:
    return {**batch, "labels": batch["labels"][:-2]}


def float_pixels(batch: dict) -> dict:
    return {**batch, "data": batch["data"].astype(np.float32) / 255.0}


def labels_one_to_ten(batch: dict) -> dict:
    return {**batch, "labels": [label + 1 for label in batch["labels"]]}


def no_labels(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def narrow_rows(batch: dict) -> dict:
    return {**batch, "data": batch["data"][:, :3000]}


def four_d(batch: dict) -> dict:
    return {**batch, "data": batch["data"].reshape(-1, 32, 32, 3)}


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (fewer_labels, "18 labels for 20 images"),
        (float_pixels, "float32"),
        (labels_one_to_ten, "labels must be 0..9"),
        (no_labels, "no `labels`"),
        (narrow_rows, "3000"),
        (four_d, "4-D"),
    ],
)
def test_malformed_cifar_batch_is_one_paragraph(tmp_path: Path, change, said: str) -> None:
    folder = write_cifar(tmp_path)
    bad = rewrite_batch(folder, "data_batch_3", change)
    with pytest.raises(PosttrainError) as refused:
        load_cifar(tmp_path)
    message = str(refused.value)
    assert str(bad) in message and said in message, message
    assert "\n" not in message


def test_float_pixels_are_refused_not_cast(tmp_path: Path) -> None:
    """Observed: pixels in 0..1 were cast to uint8, so every pixel became 0 or 1."""
    folder = write_cifar(tmp_path)
    rewrite_batch(folder, "test_batch", float_pixels)
    with pytest.raises(PosttrainError, match="uint8"):
        load_cifar(tmp_path)


def test_bytes_keys_of_a_python3_rebuild_are_read(tmp_path: Path) -> None:
    """A batch re-saved after `pickle.load(f, encoding="bytes")` has b'data'/b'labels' keys."""
    folder = write_cifar(tmp_path)
    rewrite_batch(folder, "data_batch_2", lambda b: {k.encode(): v for k, v in b.items()})
    rewrite_batch(folder, "batches.meta", lambda b: {k.encode(): v for k, v in b.items()})
    data = load_cifar(tmp_path)
    assert len(data.train) == 100 and data.class_names[0] == "name0"


def test_a_batch_re_saved_with_pickle_protocol_5_is_read(tmp_path: Path) -> None:
    """`pickle.dump(batch, f, protocol=pickle.HIGHEST_PROTOCOL)` (Python 3.14's default)
    stores numpy arrays through `numpy._core.numeric._frombuffer`, which was refused."""
    folder = write_cifar(tmp_path)
    before = load_cifar(tmp_path)
    path = folder / "data_batch_2"
    with path.open("rb") as handle:
        batch = pickle.load(handle, encoding="latin1")
    batch["labels"] = np.asarray(batch["labels"])
    with path.open("wb") as handle:
        pickle.dump(batch, handle, protocol=5)
    after = load_cifar(tmp_path)
    assert torch.equal(after.train.images, before.train.images)
    assert torch.equal(after.train.labels, before.train.labels)


def test_cifar100_label_range_uses_its_class_count(tmp_path: Path) -> None:
    folder = write_cifar(tmp_path, classes=100)
    rewrite_batch(folder, "test", lambda b: {**b, "fine_labels": [100] * len(b["fine_labels"])})
    with pytest.raises(PosttrainError, match=r"labels must be 0\.\.99"):
        load_cifar(tmp_path, classes=100)


def test_meta_file_with_wrong_class_count_is_refused(tmp_path: Path) -> None:
    folder = write_cifar(tmp_path)
    rewrite_batch(folder, "batches.meta", lambda b: {"label_names": b["label_names"][:9]})
    with pytest.raises(PosttrainError, match="9 class names"):
        load_cifar(tmp_path)


def test_empty_image_folder_class_is_refused(tmp_path: Path) -> None:
    write_image_folder(tmp_path, classes=3, per_class=2, size=8)
    (tmp_path / "class_3").mkdir()
    with pytest.raises(PosttrainError, match=r"class_3.*holds no images"):
        ImageFolderSource(root=str(tmp_path)).load()


def copy_of_omniglot(omniglot_all_characters: Path, tmp_path: Path) -> Path:
    """The session's complete Omniglot fixture, copied to be changed."""
    shutil.copytree(omniglot_all_characters / "omniglot-py", tmp_path / "omniglot-py")
    return tmp_path / "omniglot-py"


def test_empty_omniglot_character_folder_is_refused(
    omniglot_all_characters: Path, tmp_path: Path
) -> None:
    empty = copy_of_omniglot(omniglot_all_characters, tmp_path) / "images_evaluation" / "ULOG"
    for drawing in (empty / "character09").glob("*.png"):
        drawing.unlink()
    with pytest.raises(PosttrainError, match=r"ULOG/character09.*holds no"):
        OmniglotSource(root=str(tmp_path), download=False, split="lake").load()


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (lambda o: shutil.rmtree(o / "images_background" / "Korean"), "lacks 40 of its 964"),
        (lambda o: shutil.rmtree(o / "images_evaluation" / "Tengwar" / "character25"), "659"),
        (
            lambda o: shutil.move(o / "images_evaluation" / "ULOG", o / "images_background"),
            "holds 26 characters of no alphabet of that half (e.g. ULOG/character01",
        ),
    ],
)
def test_an_incomplete_omniglot_is_refused_for_lake(
    omniglot_all_characters: Path, tmp_path: Path, change, said: str
) -> None:
    """Observed: with an alphabet (or a character) missing, `lake` ran on the rest and was
    reported as the protocol; `vinyals` already refused it."""
    change(copy_of_omniglot(omniglot_all_characters, tmp_path))
    with pytest.raises(PosttrainError, match="is not the `lake` protocol's") as refused:
        OmniglotSource(root=str(tmp_path), download=False, split="lake").load_listed()
    assert said in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.slow
def test_malformed_cifar_through_the_cli_exits_2_without_traceback(tmp_path: Path) -> None:
    """Observed: 9,000 labels for 10,000 images trained to completion (0.4% test accuracy)."""
    folder = write_cifar(tmp_path / "cifar")
    bad = rewrite_batch(folder, "data_batch_1", fewer_labels)
    result = run_cli(
        "train.py", "data=cifar10", f"data.root={tmp_path / 'cifar'}", "data.download=false",
        "trainer.max_epochs=1", "logger=none", "model.width=4", f"hydra.run.dir={tmp_path / 'run'}",
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and str(bad) in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_test_split_of_classes_never_trained_on_is_refused(
    omniglot_all_characters: Path,
) -> None:
    """Observed: `data.dataset=omniglot` in a classifier (the source's default `lake`
    protocol) trained on background characters and tested on evaluation characters."""
    root = str(omniglot_all_characters)
    data = ImageClassificationDataModule("omniglot", root=root, options={"split": "lake"})
    with pytest.raises(PosttrainError, match=r"test split .* classes that the training split"):
        data.setup("fit")


def sixteen_bit_pixels(root: Path) -> dict[str, np.ndarray]:
    """Each PNG's own 16-bit values, keyed by path as the source lists them."""
    from PIL import Image

    pixels = {}
    for path in sorted(root.glob("class_*/*.png")):
        with Image.open(path) as image:
            assert image.mode == "I;16", image.mode  # really a 16-bit file
            pixels[str(path)] = np.asarray(image).astype(np.int64)
    return pixels


@pytest.mark.parametrize("channels", [1, 3])
def test_16_bit_pngs_are_scaled_to_8_bits_not_saturated(tmp_path: Path, channels: int) -> None:
    """Observed: uint16 PNGs of 10,000-50,000 decoded to all-255 pixels (PIL's convert clips
    mode I;16), so both classes were one white image and training ran at chance. The full
    16-bit range maps to 0..255 as torchvision's `to_dtype(torch.uint8, scale=True)` does."""
    write_16bit_image_folder(tmp_path)
    data = ImageFolderSource(root=str(tmp_path), channels=channels).load()
    expected = sixteen_bit_pixels(tmp_path)
    images = data.train.images
    assert images.dtype == torch.uint8 and images.shape[1] == channels
    wanted = torch.tensor(np.stack(list(expected.values())) // 256, dtype=torch.uint8)
    for channel in range(channels):
        assert torch.equal(images[:, channel], wanted)
    class_means = [float(images[data.train.labels == k].float().mean()) for k in (0, 1)]
    assert 39 < class_means[0] < 78 and 156 < class_means[1] < 196, class_means


def test_a_cache_entry_of_the_saturating_decoder_is_not_read_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The decode recipe is part of the cache key: a folder first read by the clipping decoder
    of earlier releases (cache format v1, cached all-255) must be decoded again, not served
    from that entry."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as F

    from posttrain.data import cache as decode_cache

    def clipping(path, channels: int, size):
        with Image.open(path) as image:
            return F.pil_to_tensor(image.convert("L" if channels == 1 else "RGB"))

    images, cache = write_16bit_image_folder(tmp_path / "images"), tmp_path / "cache"
    with monkeypatch.context() as patch:
        patch.setattr(ImageFolderSource, "decode_file", staticmethod(clipping))
        patch.setattr(
            decode_cache, "FORMAT", "pil-convert/pil_to_tensor/resize-bilinear-antialias/v1"
        )
        saturated = ImageFolderSource(root=str(images), channels=1, cache_dir=str(cache)).load()
    assert bool((saturated.train.images == 255).all())  # what the old decoder cached
    data = ImageFolderSource(root=str(images), channels=1, cache_dir=str(cache)).load()
    assert int(data.train.images.max()) < 200


def test_tiff_and_netpbm_images_are_read_and_other_files_are_named(tmp_path: Path, caplog) -> None:
    """Observed: a class folder of .png and .tif images (torchvision's ImageFolder reads both)
    trained on the .png ones only, without a word; what is still not read is logged."""
    from PIL import Image

    rng = np.random.default_rng(0)
    written = {}
    for label in range(2):
        folder = tmp_path / f"class_{label}"
        folder.mkdir()
        for ext in ("png", "tif", "tiff", "ppm", "pgm"):
            pixels = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
            image = (
                Image.fromarray(pixels).convert("L") if ext == "pgm" else Image.fromarray(pixels)
            )
            image.convert("RGB").save(folder / f"{ext}.{ext}")
            written[f"{label}/{ext}"] = torch.from_numpy(np.array(image.convert("RGB")))
        (folder / "notes.txt").write_text("annotator: me")
    with caplog.at_level(logging.WARNING, logger="posttrain"):
        data = ImageFolderSource(root=str(tmp_path)).load()
    assert len(data.train) == 10
    for index, key in enumerate(sorted(written)):  # listed in path order
        assert torch.equal(data.train.images[index], written[key].permute(2, 0, 1)), key
    assert "2 files in the class folders are not read, by extension: .txt 2" in caplog.text


def test_an_image_mode_pil_cannot_convert_is_one_paragraph(tmp_path: Path) -> None:
    from PIL import Image

    for label in range(2):
        (tmp_path / f"class_{label}").mkdir()
        Image.new("RGB", (4, 4)).save(tmp_path / f"class_{label}" / "0.png")
    Image.new("LAB", (4, 4)).save(tmp_path / "class_1" / "lab.tif")
    with pytest.raises(PosttrainError, match=r"Cannot read image file .*lab\.tif: conversion"):
        ImageFolderSource(root=str(tmp_path), channels=1).load()


def test_float_images_are_refused_naming_the_file(tmp_path: Path) -> None:
    """32-bit float pixels (PIL mode F, e.g. a float TIFF) have no defined range to scale from."""
    from PIL import Image

    path = tmp_path / "depth.tiff"
    Image.fromarray(np.linspace(0, 3.5, 16, dtype=np.float32).reshape(4, 4)).save(path)
    with pytest.raises(PosttrainError) as refused:
        ImageFolderSource.decode_file(path, 1, None)
    message = str(refused.value)
    assert str(path) in message and "float" in message and "\n" not in message, message


def listed_files(root: Path) -> list[str]:
    """The image files an ImageFolder source lists under `root` (before any decode)."""
    return ImageFolderSource(root=str(root)).load_listed().train.images.files.files


def test_a_symlink_loop_in_a_class_folder_lists_each_image_once(tmp_path: Path) -> None:
    """Observed: `ln -s . class_0/again` turned 24 files into 344 "images" (os.walk followed
    the loop until the path was too long), copies landing in train and test alike."""
    write_image_folder(tmp_path, classes=3, per_class=8, size=8)
    (tmp_path / "class_0" / "again").symlink_to(".")
    files = listed_files(tmp_path)
    assert len(files) == 24 and len({os.path.realpath(f) for f in files}) == 24


def test_a_linked_sub_folder_outside_the_root_is_still_read(tmp_path: Path) -> None:
    """Following links stays: a class folder may gather its images from elsewhere."""
    write_image_folder(tmp_path / "data", classes=2, per_class=3, size=8)
    write_image_folder(tmp_path / "more", classes=1, per_class=2, size=8, seed=1)
    (tmp_path / "data" / "class_0" / "extra").symlink_to(tmp_path / "more" / "class_0")
    assert len(listed_files(tmp_path / "data")) == 8


def test_hidden_folders_and_files_in_class_folders_are_not_images(tmp_path: Path) -> None:
    """Observed: `class_1/.ipynb_checkpoints/` holding copies of its images was listed as
    more class-1 images; macOS `._name.png` resource forks are not images either."""
    write_image_folder(tmp_path, classes=3, per_class=8, size=8)
    shutil.copytree(tmp_path / "class_1", tmp_path / "checkpoints")
    (tmp_path / "checkpoints").rename(tmp_path / "class_1" / ".ipynb_checkpoints")
    (tmp_path / "class_2" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    files = listed_files(tmp_path)
    assert len(files) == 24 and not [f for f in files if "/." in f], files


def test_a_file_linked_twice_in_one_class_counts_once(tmp_path: Path) -> None:
    write_image_folder(tmp_path, classes=2, per_class=3, size=8)
    (tmp_path / "class_0" / "same.png").symlink_to(tmp_path / "class_0" / "1.png")
    files = listed_files(tmp_path)
    assert len(files) == 6 and str(tmp_path / "class_0" / "same.png") not in files


@pytest.mark.parametrize("layout", ["classes", "splits"])
def test_one_file_under_two_class_or_split_folders_is_refused(tmp_path: Path, layout) -> None:
    """The same file (through a link) as two classes is a contradiction; in train/ and test/
    it tests on a training image. Neither is guessed away: refused, naming both paths."""
    if layout == "classes":
        write_image_folder(tmp_path, classes=2, per_class=3, size=8)
        original, link = tmp_path / "class_0" / "1.png", tmp_path / "class_1" / "x.png"
    else:
        write_split_image_folder(tmp_path, {"train": 3, "test": 2}, classes=2, size=8)
        original, link = (
            tmp_path / "train" / "class_0" / "1.png",
            tmp_path / "test" / "class_0" / "x.png",
        )
    link.symlink_to(original)
    with pytest.raises(PosttrainError) as refused:
        listed_files(tmp_path)
    message = str(refused.value)
    assert str(original) in message and str(link) in message and "\n" not in message, message


def test_hidden_omniglot_folders_are_not_alphabets_or_characters(
    omniglot_all_characters: Path, tmp_path: Path
) -> None:
    """Observed: `Korean/.ipynb_checkpoints/` became a character of its own."""
    background = copy_of_omniglot(omniglot_all_characters, tmp_path) / "images_background"
    before = OmniglotSource(root=str(tmp_path), download=False, split="lake").load_listed()
    shutil.copytree(background / "Korean" / "character01", tmp_path / "copy")
    (tmp_path / "copy").rename(background / "Korean" / ".ipynb_checkpoints")
    shutil.copytree(background / "Korean", background / ".ipynb_checkpoints")
    data = OmniglotSource(root=str(tmp_path), download=False, split="lake").load_listed()
    assert data.class_names == before.class_names and len(data.class_names) == 1623


def test_a_link_to_a_missing_file_is_refused_naming_it(tmp_path: Path) -> None:
    write_image_folder(tmp_path, classes=2, per_class=3, size=8)
    link = tmp_path / "class_1" / "gone.png"
    link.symlink_to(tmp_path / "elsewhere" / "gone.png")
    with pytest.raises(PosttrainError, match=r"gone\.png is a link to .* not a file"):
        listed_files(tmp_path)
