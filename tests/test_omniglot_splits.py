"""Omniglot protocols by name (issue 13, item 5 of the report): `data.split=vinyals` (the
papers' class lists, shipped in the package) and `data.split=lake` (background vs
evaluation alphabets). Observed before: meta-val was drawn over rotated classes, so with
seed 0 all 329 meta-val characters were also in meta-train under another rotation.

The tree is generated with every character the real split files name (tiny images)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from posttrain.data.episodes import EpisodicDataModule
from posttrain.data.omniglot_splits import VINYALS_FILES, characters_of, split_file_text
from posttrain.errors import PosttrainError
from tests.conftest import CONF, ROOT
from tests.fixtures import OMNIGLOT_EVALUATION_ALPHABETS


@pytest.fixture(scope="module")
def omniglot_root(omniglot_all_characters: Path) -> Path:
    return omniglot_all_characters


def episodes(root: Path, split: str, rotations: bool = True, seed: int = 0, **kwargs):
    datamodule = EpisodicDataModule(
        dataset="omniglot",
        root=str(root),
        download=False,
        options={"size": 8},
        ways=5,
        shots=1,
        queries=1,
        rotations=rotations,
        val_fraction=0.1,
        test_fraction=0.0,
        seed=seed,
        split=split,
        **kwargs,
    )
    datamodule.setup("fit")
    return datamodule


def characters_in(datamodule: EpisodicDataModule, split: str) -> set[int]:
    """Characters (not rotated classes) of a meta-split, read back from the images' pixels."""
    pool = datamodule.pools[split]
    return {decode_character(pool.images[members[0]]) for members in pool.members}


CODE_PIXELS = torch.zeros(8, 8, dtype=torch.bool)
CODE_PIXELS[0, :2] = CODE_PIXELS[1, 0] = True


def decode_character(image: torch.Tensor) -> int:
    """Index of the character whose drawing this is (the fixture writes it in one corner)."""
    for k in range(4):  # undo the rotation the episodic pool applied
        upright = torch.rot90(image, -k, dims=(-2, -1))[0]
        if not upright[~CODE_PIXELS].any():
            return int(upright[0, 0]) * 256 + int(upright[0, 1])
    raise AssertionError("not a fixture drawing")


def test_the_shipped_files_keep_each_character_in_one_split() -> None:
    seen: dict[str, str] = {}
    counts = {}
    for split, name in VINYALS_FILES.items():
        lines = split_file_text(name).split()
        characters = characters_of("\n".join(lines), name)
        assert len(lines) == 4 * len(characters)  # every character with its 4 rotations
        counts[split] = len(characters)
        for character in characters:
            assert character not in seen, (character, seen.get(character), split)
            seen[character] = split
    assert counts == {"train": 1028, "val": 172, "test": 423}
    assert len({c.split("/")[0] for c in seen}) == 50  # drawn from all 50 alphabets
    trainval = set(characters_of(split_file_text("trainval.txt"), "trainval.txt"))
    assert trainval == {c for c, s in seen.items() if s in ("train", "val")}


def test_the_split_files_are_package_data() -> None:
    """An installed wheel carries them: they sit in the package and pyproject lists them."""
    import tomllib

    folder = ROOT / "src" / "posttrain" / "data" / "omniglot_vinyals_split"
    assert {p.name for p in folder.iterdir()} >= {*VINYALS_FILES.values(), "README.md", "LICENSE"}
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["posttrain"]
    assert "data/omniglot_vinyals_split/*" in patterns


def test_vinyals_split_uses_the_papers_classes(omniglot_root: Path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="posttrain"):
        datamodule = episodes(omniglot_root, "vinyals")
    assert {s: len(p) for s, p in datamodule.pools.items()} == {
        "train": 4 * 1028,
        "val": 4 * 172,
        "test": 4 * 423,
    }
    names = sorted(
        {c for f in VINYALS_FILES.values() for c in characters_of(split_file_text(f), f)}
    )
    for split, file in VINYALS_FILES.items():
        expected = {names.index(c) for c in characters_of(split_file_text(file), file)}
        assert characters_in(datamodule, split) == expected, split
    assert "vinyals" in caplog.text and "1028/172/423" in caplog.text


@pytest.mark.parametrize(("split", "seed"), [("vinyals", 0), ("lake", 0), ("lake", 1)])
def test_no_character_has_rotations_in_two_splits(omniglot_root: Path, split, seed) -> None:
    datamodule = episodes(omniglot_root, split, seed=seed)
    by_split = {s: set((pool.classes // 4).tolist()) for s, pool in datamodule.pools.items()}
    for s, pool in datamodule.pools.items():  # each character comes with all four rotations
        assert len(pool) == 4 * len(by_split[s])
    assert not by_split["train"] & by_split["val"]
    assert not by_split["train"] & by_split["test"]
    assert not by_split["val"] & by_split["test"]
    read = {s: characters_in(datamodule, s) for s in datamodule.pools}
    assert not read["train"] & read["val"] and not read["val"] & read["test"]


def test_lake_split_is_background_against_evaluation(omniglot_root: Path) -> None:
    datamodule = episodes(omniglot_root, "lake")
    names = datamodule.source.load().class_names
    alphabets = {
        s: {names[c].split("/")[0] for c in (pool.classes // 4).tolist()}
        for s, pool in datamodule.pools.items()
    }
    assert alphabets["test"] == set(OMNIGLOT_EVALUATION_ALPHABETS)
    assert not (alphabets["train"] | alphabets["val"]) & set(OMNIGLOT_EVALUATION_ALPHABETS)
    background = len(datamodule.pools["train"]) + len(datamodule.pools["val"])
    assert background == 4 * 964 and len(datamodule.pools["test"]) == 4 * 659
    assert len(datamodule.pools["val"]) == 4 * round(0.1 * 964)  # drawn by character


def test_vinyals_without_rotations_keeps_characters(omniglot_root: Path) -> None:
    datamodule = episodes(omniglot_root, "vinyals", rotations=False)
    assert len(datamodule.pools["test"]) == 423


def test_an_incomplete_folder_is_refused_for_vinyals(tmp_path: Path) -> None:
    from tests.fixtures import write_omniglot

    write_omniglot(tmp_path)
    with pytest.raises(PosttrainError, match=r"lacks 1623 of the 1623 characters.*vinyals"):
        episodes(tmp_path, "vinyals")


def test_split_on_a_source_without_protocols_is_refused() -> None:
    with pytest.raises(PosttrainError, match=r"data\.split=vinyals"):
        EpisodicDataModule(dataset="digits", split="vinyals")
    with pytest.raises(PosttrainError, match=r"data\.split.*vinyals, lake"):
        EpisodicDataModule(dataset="omniglot", root="/tmp", split="papers")


def test_omniglot_recipes_use_the_papers_split(make_config) -> None:
    assert make_config("data=omniglot").data.split == "vinyals"
    for recipe in sorted((CONF / "experiment").glob("omniglot_*.yaml")):
        cfg = make_config(f"experiment={recipe.stem}")
        assert cfg.data.split == "vinyals", recipe.name
