"""`data=imagefolder` with `train/` (+ `val/`, `test/`) split folders (issue 13, item 3).

Observed: `data.root=<parent of train and test>` trained a 2-class model on the classes
`test` and `train`, and the test set was always 20% of one folder.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from posttrain.data import ImageClassificationDataModule
from posttrain.data.sources import ImageFolderSource
from posttrain.errors import PosttrainError
from posttrain.train import train
from tests.conftest import add_callbacks
from tests.fixtures import write_image_folder, write_split_image_folder


def decoded(folder: Path, size: int = 16) -> torch.Tensor:
    """Every image under `folder`, decoded the way the source decodes, as a set of rows."""
    files = sorted(p for p in folder.rglob("*.png"))
    return torch.stack([ImageFolderSource.decode_file(p, 3, size) for p in files])


def rows(images: torch.Tensor) -> set[tuple]:
    return {tuple(x.flatten().tolist()) for x in images}


def module_for(root: Path, **kwargs) -> ImageClassificationDataModule:
    datamodule = ImageClassificationDataModule(
        dataset="imagefolder", root=str(root), options={"size": 16}, **kwargs
    )
    datamodule.setup("fit")
    return datamodule


def test_train_and_test_folders_are_the_splits(tmp_path: Path, caplog) -> None:
    write_split_image_folder(tmp_path, {"train": 10, "test": 4})
    with caplog.at_level(logging.INFO, logger="posttrain"):
        datamodule = module_for(tmp_path, val_fraction=0.2, test_fraction=0.2)
    assert datamodule.num_classes == 3 and datamodule.class_names == [
        "class_0",
        "class_1",
        "class_2",
    ]
    test = datamodule.splits["test"]
    assert rows(test.images) == rows(decoded(tmp_path / "test")) and len(test) == 12
    fitted = torch.cat([datamodule.splits["train"].images, datamodule.splits["val"].images])
    assert rows(fitted) == rows(decoded(tmp_path / "train")) and len(fitted) == 30
    assert "split folders" in caplog.text and "train/" in caplog.text


def test_val_folder_is_used_instead_of_a_fraction(tmp_path: Path) -> None:
    write_split_image_folder(tmp_path, {"train": 6, "val": 2, "test": 3})
    datamodule = module_for(tmp_path)
    assert len(datamodule.splits["train"]) == 18
    assert rows(datamodule.splits["val"].images) == rows(decoded(tmp_path / "val"))
    assert len(datamodule.splits["test"]) == 9


def test_a_flat_tree_is_still_split_by_fractions(tmp_path: Path, caplog) -> None:
    write_image_folder(tmp_path, classes=3, per_class=10)
    with caplog.at_level(logging.INFO, logger="posttrain"):
        datamodule = module_for(tmp_path)
    assert sum(len(s) for s in datamodule.splits.values()) == 30
    assert "one folder of classes" in caplog.text


def test_class_folders_named_like_splits_are_refused(tmp_path: Path) -> None:
    write_split_image_folder(tmp_path, {"training": 4, "test": 2})
    with pytest.raises(PosttrainError, match=r"named like splits.*train/"):
        ImageFolderSource(root=str(tmp_path))


def test_split_folders_must_hold_the_same_classes(tmp_path: Path) -> None:
    write_split_image_folder(tmp_path, {"train": 4, "test": 2})
    (tmp_path / "test" / "class_9").mkdir()
    (tmp_path / "test" / "class_2").rename(tmp_path / "test" / "class_x")
    with pytest.raises(PosttrainError, match=r"test.*class_9.*class_x.*class_2"):
        ImageFolderSource(root=str(tmp_path))


def test_an_empty_class_of_one_split_folder_gets_advice_that_works(tmp_path: Path) -> None:
    """Observed: 'remove it or add its images' for test/class_2, and removing it was refused
    as 'missing class_2' (every split folder holds the same classes)."""
    write_split_image_folder(tmp_path, {"train": 4, "test": 2}, classes=3, size=8)
    for image in (tmp_path / "test" / "class_2").iterdir():
        image.unlink()
    with pytest.raises(PosttrainError) as refused:
        ImageFolderSource(root=str(tmp_path)).load()
    message = str(refused.value)
    assert "test/class_2" in message and "remove it" not in message
    assert "remove the class folder `class_2` from every split folder (test/, train/)" in message


def test_other_folders_beside_split_folders_are_refused(tmp_path: Path) -> None:
    write_split_image_folder(tmp_path, {"train": 4, "extra": 2})
    with pytest.raises(PosttrainError, match="extra"):
        ImageFolderSource(root=str(tmp_path))


def test_a_run_trains_on_train_and_tests_on_exactly_the_test_images(
    make_config, tmp_path: Path, monkeypatch
) -> None:
    write_split_image_folder(tmp_path / "images", {"train": 8, "test": 5})
    seen: dict[str, list] = {"fit": [], "test": []}

    class Batches(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            seen["fit"].append(len(batch[1]))

        def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            seen["test"].append(trainer.datamodule.splits["test"])

    add_callbacks(monkeypatch, Batches())
    cfg = make_config(
        "data=imagefolder",
        f"data.root={tmp_path / 'images'}",
        "data.options.size=16",
        "data.batch_size=8",
        "trainer.max_epochs=1",
        "trainer.accelerator=cpu",
        "logger=none",
        "model.width=4",
    )
    train(cfg)
    test = seen["test"][0]
    assert rows(test.images) == rows(decoded(tmp_path / "images" / "test"))
    assert len(test) == 15 and sum(seen["fit"]) == 24 - round(0.1 * 8) * 3
