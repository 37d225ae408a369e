"""Sources and the DataModule: splits, subsets, real on-disk formats, bad inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from posttrain.data import ImageClassificationDataModule
from posttrain.data.sources import CifarSource
from posttrain.errors import PosttrainError
from tests.fixtures import write_cifar, write_image_folder, write_malicious_pickle


def setup_module_for(**kwargs) -> ImageClassificationDataModule:
    datamodule = ImageClassificationDataModule(**kwargs)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def test_digits_splits_are_stratified_disjoint_and_seeded() -> None:
    first = setup_module_for(dataset="digits", seed=3)
    second = setup_module_for(dataset="digits", seed=3)
    other = setup_module_for(dataset="digits", seed=4)
    sizes = {name: len(split) for name, split in first.splits.items()}
    assert sum(sizes.values()) == 1797
    assert sizes["test"] == pytest.approx(0.2 * 1797, abs=10)
    assert sizes["val"] == pytest.approx(0.1 * 0.8 * 1797, abs=10)
    for name in first.splits:
        assert torch.equal(first.splits[name].images, second.splits[name].images)
    assert not torch.equal(first.splits["test"].labels, other.splits["test"].labels)
    test_counts = torch.bincount(first.splits["test"].labels)
    assert test_counts.min() >= 34 and test_counts.max() <= 38  # ~20% of each class
    train_rows = {tuple(x.flatten().tolist()) for x in first.splits["train"].images}
    test_rows = [tuple(x.flatten().tolist()) for x in first.splits["test"].images]
    # A handful of digits images are exact duplicates of each other; splits are by index.
    assert sum(row in train_rows for row in test_rows) < 5


def test_samples_per_class_keeps_k_of_each_class() -> None:
    datamodule = setup_module_for(dataset="digits", samples_per_class=5)
    assert torch.bincount(datamodule.splits["train"].labels).tolist() == [5] * 10
    assert len(datamodule.splits["test"]) > 300  # evaluation data is untouched


def test_samples_per_class_above_a_class_count_is_refused_naming_the_classes(
    tmp_path: Path,
) -> None:
    """Observed: with a class of few images, `data.samples_per_class=5` trained on 5/5/1
    images per class without a word, though the README promises K of every class."""
    write_image_folder(tmp_path, classes=3, per_class=8, size=8)
    for extra in sorted((tmp_path / "class_2").glob("*.png"))[1:]:
        extra.unlink()  # class_2: 1 image, kept for training (1 * 0.2 and 1 * 0.1 round to 0)
    with pytest.raises(PosttrainError) as refused:
        setup_module_for(dataset="imagefolder", root=str(tmp_path), samples_per_class=5)
    message = str(refused.value)
    assert "`data.samples_per_class`" in message and "class_2 (1)" in message, message
    assert "at most 1" in message and "class_0" not in message and "\n" not in message
    kept = setup_module_for(dataset="imagefolder", root=str(tmp_path), samples_per_class=1)
    assert torch.bincount(kept.splits["train"].labels).tolist() == [1, 1, 1]


def test_batches_are_resized_normalized_and_typed() -> None:
    datamodule = setup_module_for(dataset="digits", image_size=16, batch_size=32)
    images, labels = datamodule.on_after_batch_transfer(
        next(iter(datamodule.train_dataloader())), 0
    )
    assert images.shape == (32, 1, 16, 16) and images.dtype == torch.float32
    assert labels.dtype == torch.long
    everything = datamodule.normalize(datamodule.to_model_input(datamodule.splits["train"].images))
    assert everything.mean().abs() < 0.05 and (everything.std() - 1).abs() < 0.05


def test_fake_source_any_size_and_classes() -> None:
    options = {"num_classes": 4, "channels": 2, "size": 12, "num_samples": 80}
    datamodule = setup_module_for(dataset="fake", options=options)
    assert datamodule.num_classes == 4 and datamodule.in_channels == 2
    assert datamodule.splits["train"].images.shape[1:] == (2, 12, 12)


@pytest.mark.parametrize("classes", [10, 100])
def test_cifar_loader_reads_the_real_format(tmp_path: Path, classes: int) -> None:
    per_batch = 2 * classes  # CIFAR-100 writes 5 batches' worth into one file: 10 per class
    write_cifar(tmp_path, classes=classes, train_per_batch=per_batch)
    datamodule = setup_module_for(
        dataset="cifar",
        root=str(tmp_path),
        download=False,
        options={"classes": classes},
        test_fraction=0.0,
    )
    assert datamodule.num_classes == classes and datamodule.in_channels == 3
    assert len(datamodule.splits["test"]) == 20  # the official test batch
    assert len(datamodule.splits["train"]) + len(datamodule.splits["val"]) == 5 * per_batch
    assert datamodule.splits["train"].images.shape[1:] == (3, 32, 32)
    assert datamodule.class_names[1] == "name1"


def test_cifar_missing_without_download_names_the_keys(tmp_path: Path) -> None:
    source = CifarSource(root=str(tmp_path), download=False)
    with pytest.raises(PosttrainError, match=r"data\.download.*data\.root"):
        source.prepare()


@pytest.mark.parametrize("download", [False, True])
def test_cifar_folder_missing_one_batch_names_it(tmp_path: Path, monkeypatch, download) -> None:
    """Observed: 'CIFAR-10 is not in <folder>' for a folder holding all but data_batch_5."""
    from torchvision import datasets

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(datasets, "CIFAR10", offline)
    folder = write_cifar(tmp_path)
    (folder / "data_batch_5").unlink()
    source = CifarSource(root=str(tmp_path), download=download)
    with pytest.raises(PosttrainError, match=f"{folder} lacks data_batch_5 \\(1 of the 7 files"):
        source.prepare()


def test_cifar_refuses_a_pickle_that_runs_code(tmp_path: Path) -> None:
    folder = write_cifar(tmp_path)
    write_malicious_pickle(folder / "data_batch_1")
    with pytest.raises(PosttrainError, match="data_batch_1"):
        CifarSource(root=str(tmp_path), download=False).load()


def test_image_folder_loader(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "images", classes=3, per_class=10)
    datamodule = setup_module_for(
        dataset="imagefolder", root=str(tmp_path / "images"), options={"size": 16, "channels": 1}
    )
    assert datamodule.num_classes == 3 and datamodule.in_channels == 1
    assert datamodule.class_names == ["class_0", "class_1", "class_2"]
    total = sum(len(split) for split in datamodule.splits.values())
    assert total == 30
    assert datamodule.splits["train"].images.shape[1:] == (1, 16, 16)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"dataset": "imagefolder"}, "data.root"),
        ({"dataset": "imagefolder", "root": "/no/such/folder"}, "data.root"),
        ({"dataset": "digits", "batch_size": 0}, "data.batch_size"),
        ({"dataset": "digits", "batch_size": -8}, "data.batch_size"),
        ({"dataset": "digits", "image_size": -1}, "data.image_size"),
        ({"dataset": "digits", "samples_per_class": 0}, "data.samples_per_class"),
        ({"dataset": "digits", "val_fraction": 1.5}, "data.val_fraction"),
        ({"dataset": "mnist"}, "data.dataset"),
        ({"dataset": "fake", "options": {"num_classes": 0}}, "data.options.num_classes"),
        ({"dataset": "fake", "options": {"classes": 3}}, "data.options"),
    ],
)
def test_bad_data_config_names_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(PosttrainError, match=key.replace(".", r"\.")):
        ImageClassificationDataModule(**kwargs)


def test_a_changed_listing_is_told_apart_from_other_data(tmp_path: Path) -> None:
    """The same folder with other files is refused; another folder (a CIFAR-format copy of
    other images) is other data at evaluation, and the same data for a resume."""
    from posttrain.data.splits import data_listing, listing_change

    def listing(root: Path):
        return data_listing(CifarSource(root=str(root), download=False).load(), {
            "dataset": "cifar", "root": str(root)})  # fmt: skip

    write_cifar(tmp_path / "a")
    write_cifar(tmp_path / "b", train_per_batch=21)
    first = listing(tmp_path / "a")
    assert listing_change(first, listing(tmp_path / "a")) is None
    assert listing_change(first, listing(tmp_path / "b")) is None  # evaluated on other data
    moved = listing_change(first, listing(tmp_path / "b"), root_may_move=True)
    assert moved is not None and "125 images now, 120 then" in moved
