"""The named Omniglot protocols: which characters are meta-train, meta-val and meta-test.

- `vinyals` (Vinyals et al. 2016; used by Matching Networks, Prototypical Networks, MAML):
  1,028 / 172 / 423 characters drawn from all 50 alphabets, each with its four rotations in
  one split. The class lists ship in `omniglot_vinyals_split/` (MIT, see its README/LICENSE).
- `lake` (Lake et al. 2015): the 30 background alphabets (964 characters) for meta-train
  and meta-val, the 20 evaluation alphabets (659) for meta-test; meta-val is drawn by
  character, so no character's rotations are on both sides.

Splits are by character (`<alphabet>/<character>`), never by rotated class: a character in
meta-train under one rotation and in meta-val under another leaks the validation score.
"""

from __future__ import annotations

from importlib import resources

from posttrain.errors import require

PROTOCOLS = ("vinyals", "lake")
VINYALS_FILES = {"train": "train.txt", "val": "val.txt", "test": "test.txt"}
ROTATIONS = ("rot000", "rot090", "rot180", "rot270")
# The 20 alphabets of Omniglot's `images_evaluation` half (the other 30 are `images_background`).
EVALUATION_ALPHABETS = (
    "Angelic", "Atemayar_Qelisayer", "Atlantean", "Aurek-Besh", "Avesta", "Ge_ez",
    "Glagolitic", "Gurmukhi", "Kannada", "Keble", "Malayalam", "Manipuri", "Mongolian",
    "Old_Church_Slavonic_(Cyrillic)", "Oriya", "Sylheti", "Syriac_(Serto)", "Tengwar",
    "Tibetan", "ULOG",
)  # fmt: skip


def split_file_text(name: str) -> str:
    """A class-list file shipped inside the package (works from a wheel, not only a checkout)."""
    folder = resources.files("posttrain.data") / "omniglot_vinyals_split"
    return (folder / name).read_text(encoding="utf-8")


def characters_of(text: str, name: str) -> list[str]:
    """`<alphabet>/<character>` of every line `<alphabet>/<character>/rotNNN`, checking that
    each character comes with its four rotations (the protocol's classes)."""
    rotations: dict[str, set[str]] = {}
    for line in text.split():
        character, _, rotation = line.rpartition("/")
        rotations.setdefault(character, set()).add(rotation)
    incomplete = [c for c, r in rotations.items() if r != set(ROTATIONS)]
    require(
        not incomplete,
        f"Omniglot split file {name} lists {len(incomplete)} characters without all four "
        f"rotations (e.g. {', '.join(incomplete[:3])}); the package's copy is damaged.",
    )
    return sorted(rotations)


def vinyals_characters() -> dict[str, list[str]]:
    """{split: characters} of the Vinyals et al. split, each character in one split only."""
    splits = {s: characters_of(split_file_text(f), f) for s, f in VINYALS_FILES.items()}
    seen: dict[str, str] = {}
    for split, characters in splits.items():
        for character in characters:
            require(
                character not in seen,
                f"Omniglot split files put {character} in both {seen.get(character)} and "
                f"{split}; the package's copy is damaged.",
            )
            seen[character] = split
    return splits


def lake_characters() -> dict[str, set[str]]:
    """{half folder: its characters} of the `lake` protocol: the 964 characters of the 30
    background alphabets in `images_background`, the 659 of the 20 evaluation alphabets in
    `images_evaluation` (all 1,623 are named by the shipped class lists)."""
    every = {c for characters in vinyals_characters().values() for c in characters}
    evaluation = {c for c in every if c.split("/")[0] in EVALUATION_ALPHABETS}
    return {"images_background": every - evaluation, "images_evaluation": evaluation}
