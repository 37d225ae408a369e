"""Where labelled images come from: a small registry of dataset sources.

Every source yields uint8 tensors (N, C, H, W) held in memory, so batches are sliced rather
than decoded sample by sample; resizing, augmentation and normalization happen on whole
batches on the training device (see `datamodule.py`). Adding a dataset = one class here plus
one yaml in `conf/data/`.

Sources that read image files (ImageFolder, Omniglot) can also hand out their listing before
any decode (`load_listed`: labels known from folder names, images as `ImageRows`), so the
DataModule subsamples first and decodes only what it keeps (`decode_kept`).
"""

from __future__ import annotations

import logging
import os
import pickle
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor

from posttrain.data.cache import ImageFiles
from posttrain.errors import (
    PosttrainError,
    is_number,
    require,
    require_bool,
    require_choice,
    require_count,
    require_known_options,
)

log = logging.getLogger("posttrain")


@dataclass(frozen=True)
class ImageRows:
    """Rows of a file listing, not decoded yet: indexed like the image tensor they stand for,
    so subsets are chosen on labels alone and only the rows kept in the end are decoded."""

    files: ImageFiles
    rows: Tensor

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: Tensor | slice) -> ImageRows:
        return ImageRows(self.files, self.rows[index])


@dataclass
class LabelledImages:
    """Images as uint8 (N, C, H, W), or `ImageRows` until decoded, and integer labels (N,)."""

    images: Tensor | ImageRows
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Tensor) -> LabelledImages:
        return LabelledImages(self.images[indices], self.labels[indices])


def decode_kept(parts: dict[str, LabelledImages]) -> dict[str, LabelledImages]:
    """`parts` with every `ImageRows` decoded: one pass per file listing over the rows the
    parts hold (each row decoded once; the listing's other rows never)."""
    decoded = dict(parts)
    listed = {key: p.images for key, p in parts.items() if isinstance(p.images, ImageRows)}
    for files in {id(r.files): r.files for r in listed.values()}.values():
        mine = {key: r.rows for key, r in listed.items() if r.files is files}
        kept = torch.cat(list(mine.values())).unique()  # sorted
        images = files.decoded(kept)
        position = torch.full((len(files),), -1, dtype=torch.long)
        position[kept] = torch.arange(len(kept))
        for key, rows in mine.items():
            decoded[key] = LabelledImages(images[position[rows]], parts[key].labels)
    return decoded


@dataclass
class SourceData:
    """What a source loads: a training pool and, where the dataset defines them, its own
    validation and test splits (otherwise the DataModule holds fractions of the pool out)."""

    train: LabelledImages
    test: LabelledImages | None
    class_names: list[str]
    val: LabelledImages | None = None
    # Meta-learning sources that fix which classes are meta-train/val/test (Omniglot's named
    # protocols): {split: label ids}; a missing `val` is drawn from `train` by class.
    class_splits: dict[str, list[int]] | None = None

    def decoded(self) -> SourceData:
        """Every part's images as tensors (all of them: nothing was subsampled)."""
        parts = {"train": self.train, "val": self.val, "test": self.test}
        done = decode_kept({k: p for k, p in parts.items() if p is not None})
        return replace(self, train=done["train"], val=done.get("val"), test=done.get("test"))


@dataclass(frozen=True)
class SourceInfo:
    """What the model needs to know before any data is loaded."""

    num_classes: int
    channels: int


class Source(Protocol):
    """A dataset: cheap `info()`, `prepare()` that may download (rank 0), `load()` into memory."""

    def info(self) -> SourceInfo: ...

    def prepare(self) -> None: ...

    def load(self) -> SourceData: ...


@runtime_checkable
class ListsFiles(Protocol):
    """A source that reads image files and can list them (labels) before decoding any."""

    def load_listed(self) -> SourceData:
        """`load()` with images left as `ImageRows`: pick the rows, then `decode_kept`."""
        ...


def load_listed(source: Source) -> SourceData:
    """The source's data with file images undecoded where it can (in-memory sources load)."""
    return source.load_listed() if isinstance(source, ListsFiles) else source.load()


class DigitsSource:
    """scikit-learn's 8x8 handwritten digits: 1,797 images, ships inside the wheel (offline)."""

    def __init__(self, root: str | None = None, download: bool = False) -> None:
        del root, download  # embedded data: nothing to find or fetch

    def info(self) -> SourceInfo:
        return SourceInfo(num_classes=10, channels=1)

    def prepare(self) -> None:
        return None

    def load(self) -> SourceData:
        from sklearn.datasets import load_digits

        digits = load_digits()
        # Pixel values are 0..16; scale to the 0..255 range every other source uses.
        pixels = torch.from_numpy(digits.images * (255.0 / 16.0)).round().clamp(0, 255)
        images = pixels.to(torch.uint8).unsqueeze(1)
        labels = torch.from_numpy(digits.target).long()
        return SourceData(LabelledImages(images, labels), None, [str(i) for i in range(10)])


class FakeSource:
    """Synthetic, learnable images of any size and class count (tests, smoke runs, benchmarks).

    Each class is a fixed random pattern plus per-sample noise, so models can actually learn
    it and accuracy is a meaningful signal.
    """

    def __init__(
        self,
        root: str | None = None,
        download: bool = False,
        num_samples: int = 1000,
        num_test_samples: int = 200,
        num_classes: int = 10,
        channels: int = 3,
        size: int = 32,
        noise: float = 0.5,
        generator_seed: int = 0,
    ) -> None:
        del root, download
        for key, value in [
            ("num_samples", num_samples),
            ("num_test_samples", num_test_samples),
            ("num_classes", num_classes),
            ("channels", channels),
            ("size", size),
        ]:
            require_count(f"data.options.{key}", value, 1)
        require(
            is_number(noise) and noise >= 0,
            f"Config key `data.options.noise` must be a number >= 0 (the pixel noise's "
            f"standard deviation), got {noise!r}.",
        )
        require_count("data.options.generator_seed", generator_seed, 0)
        require(
            num_samples >= num_classes,
            f"`data.options.num_samples` ({num_samples}) must be at least "
            f"`data.options.num_classes` ({num_classes}) so every class has an example.",
        )
        self.num_samples, self.num_test_samples = num_samples, num_test_samples
        self.num_classes, self.channels, self.size = num_classes, channels, size
        self.noise, self.generator_seed = noise, generator_seed

    def info(self) -> SourceInfo:
        return SourceInfo(num_classes=self.num_classes, channels=self.channels)

    def prepare(self) -> None:
        return None

    def load(self) -> SourceData:
        gen = torch.Generator().manual_seed(self.generator_seed)
        shape = (self.num_classes, self.channels, self.size, self.size)
        prototypes = torch.rand(shape, generator=gen)

        def draw(count: int) -> LabelledImages:
            labels = torch.arange(count) % self.num_classes
            labels = labels[torch.randperm(count, generator=gen)]
            noise = torch.randn((count, *shape[1:]), generator=gen) * self.noise
            pixels = (prototypes[labels] + noise).clamp(0, 1) * 255
            return LabelledImages(pixels.round().to(torch.uint8), labels)

        test = draw(self.num_test_samples) if self.num_test_samples > 0 else None
        names = [f"class_{i}" for i in range(self.num_classes)]
        return SourceData(draw(self.num_samples), test, names)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batch format (dicts, lists, numpy arrays) and nothing that runs code."""

    ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
        # How numpy arrays are pickled with protocol 5 (`pickle.HIGHEST_PROTOCOL`, Python
        # 3.14's default): their bytes rebuilt as an array, nothing else.
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_pickle(path: Path) -> dict[str, Any]:
    """One CIFAR pickle as a dict with `str` keys: the originals (Python 2) have `str` keys,
    batches re-saved after `pickle.load(f, encoding="bytes")` have `bytes` keys."""
    try:
        with path.open("rb") as handle:
            loaded = _NumpyOnlyUnpickler(handle, encoding="latin1").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as error:
        raise PosttrainError(
            f"Cannot read CIFAR file {path} ({error}). It should be an original CIFAR python "
            "batch; delete the folder to download it again with `data.download=true`."
        ) from error
    require(
        isinstance(loaded, dict),
        f"CIFAR file {path} holds a {type(loaded).__name__}, not the dict of a CIFAR batch "
        "(keys `data`, `labels`).",
    )
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in loaded.items()}


CIFAR_ROW = 3 * 32 * 32  # one image: 1024 red, then 1024 green, then 1024 blue bytes


def check_cifar_pixels(path: Path, data: Any) -> Any:
    """`data` as the format defines it: uint8 rows of 3072 values (N, 3072).

    Float pixels are refused rather than cast: 0..1 floats would become all 0s and 1s.
    """
    import numpy as np

    require(
        isinstance(data, np.ndarray),
        f"CIFAR file {path}: `data` is a {type(data).__name__}, not a numpy array of "
        f"(images, {CIFAR_ROW}) uint8 pixels.",
    )
    require(
        data.ndim == 2 and data.shape[1] == CIFAR_ROW,
        f"CIFAR file {path}: `data` has shape {tuple(data.shape)} ({data.ndim}-D); the format "
        f"is 2-D (images, {CIFAR_ROW}), each row 1024 red, 1024 green, 1024 blue pixels of "
        "one 32x32 image. Re-save it as `array.reshape(len(array), -1)` in that channel order.",
    )
    require(
        data.dtype == np.uint8,
        f"CIFAR file {path}: `data` holds {data.dtype} pixels; the format stores uint8 "
        "(0..255). Refused rather than cast (floats in 0..1 would all become 0 or 1): "
        "re-save as `(array * 255).round().astype(numpy.uint8)` if they are 0..1.",
    )
    return data


def check_cifar_labels(path: Path, labels: Any, key: str, images: int, classes: int) -> Tensor:
    """Integer labels, one per image, each in 0..classes-1."""
    try:
        values = torch.as_tensor(list(labels))
    except (TypeError, ValueError) as error:
        raise PosttrainError(
            f"CIFAR file {path}: `{key}` is not a list of integer labels ({error})."
        ) from error
    require(
        values.ndim == 1 and not values.is_floating_point() and values.dtype != torch.bool,
        f"CIFAR file {path}: `{key}` must be a flat list of integers, got {values.dtype} "
        f"values of shape {tuple(values.shape)}.",
    )
    require(
        len(values) == images,
        f"CIFAR file {path}: {len(values)} labels for {images} images; every image needs "
        f"exactly one label in `{key}`.",
    )
    if len(values):
        low, high = int(values.min()), int(values.max())
        require(
            low >= 0 and high < classes,
            f"CIFAR file {path}: labels must be 0..{classes - 1} for CIFAR-{classes}, but "
            f"`{key}` holds {low}..{high} (labels counted from 1? subtract 1 when re-saving).",
        )
    return values.long()


class CifarSource:
    """CIFAR-10 / CIFAR-100 in their original python-pickle batch format.

    Downloading goes through torchvision (checksums included); reading is ours, so the
    loader works on any folder in the real on-disk format and never unpickles code.
    """

    LAYOUTS: ClassVar[dict[int, dict[str, Any]]] = {
        10: {
            "folder": "cifar-10-batches-py",
            "train": [f"data_batch_{i}" for i in range(1, 6)],
            "test": ["test_batch"],
            "meta": ("batches.meta", "label_names"),
            "labels": "labels",
        },
        100: {
            "folder": "cifar-100-python",
            "train": ["train"],
            "test": ["test"],
            "meta": ("meta", "fine_label_names"),
            "labels": "fine_labels",
        },
    }

    def __init__(self, root: str | None, download: bool = True, classes: int = 10) -> None:
        require_choice("data.options.classes", classes, self.LAYOUTS)
        require(root is not None, "Config key `data.root` must name a folder for CIFAR data.")
        self.root, self.download, self.classes = Path(str(root)).expanduser(), download, classes
        self.layout = self.LAYOUTS[classes]

    @property
    def folder(self) -> Path:
        return self.root / self.layout["folder"]

    def info(self) -> SourceInfo:
        return SourceInfo(num_classes=self.classes, channels=3)

    def _missing_files(self) -> list[str]:
        names = [*self.layout["train"], *self.layout["test"], self.layout["meta"][0]]
        return [name for name in names if not (self.folder / name).is_file()]

    def _absence(self, missing: list[str]) -> str:
        """What is absent, said as it is: the whole folder, or some of its files (a folder
        without `data_batch_5` was reported as 'not in' the folder that holds the rest)."""
        if not self.folder.is_dir():
            return f"CIFAR-{self.classes} is not in {self.folder}"
        return (
            f"{self.folder} lacks {', '.join(missing)} ({len(missing)} of the "
            f"{len(self.layout['train']) + len(self.layout['test']) + 1} files of "
            f"CIFAR-{self.classes}: an incomplete copy or extraction)"
        )

    def prepare(self) -> None:
        missing = self._missing_files()
        if not missing:
            return
        require(
            self.download,
            f"{self._absence(missing)} and `data.download` is false. Set "
            f"`data.download=true` (needs internet) or point `data.root` at a folder that "
            f"holds the complete `{self.layout['folder']}/`.",
        )
        from torchvision import datasets

        dataset_class = datasets.CIFAR10 if self.classes == 10 else datasets.CIFAR100
        try:
            dataset_class(str(self.root), train=True, download=True)
        except Exception as error:  # network failures come in many types
            raise PosttrainError(
                f"{self._absence(missing)}, and downloading CIFAR-{self.classes} into "
                f"`data.root`={self.root} failed ({error}). Check the internet connection, or "
                f"place the complete extracted `{self.layout['folder']}/` folder there yourself."
            ) from error

    def _read_batch(self, name: str) -> LabelledImages:
        """One batch file, validated: pixels, label count and label range."""
        path = self.folder / name
        batch = _read_cifar_pickle(path)
        key = self.layout["labels"]
        for needed in ("data", key):
            require(
                needed in batch,
                f"CIFAR file {path} has no `{needed}` entry (keys: "
                f"{', '.join(sorted(batch)) or 'none'}); a CIFAR-{self.classes} batch holds "
                f"`data` and `{key}`.",
            )
        pixels = check_cifar_pixels(path, batch["data"])
        labels = check_cifar_labels(path, batch[key], key, len(pixels), self.classes)
        images = torch.from_numpy(pixels.reshape(-1, 3, 32, 32).copy())
        return LabelledImages(images, labels)

    def _read(self, names: list[str]) -> LabelledImages:
        parts = [self._read_batch(name) for name in names]
        return LabelledImages(
            torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts])
        )

    def _class_names(self) -> list[str]:
        meta_file, meta_key = self.layout["meta"]
        path = self.folder / meta_file
        meta = _read_cifar_pickle(path)
        require(
            meta_key in meta,
            f"CIFAR file {path} has no `{meta_key}` entry (keys: {', '.join(sorted(meta))}).",
        )
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[meta_key]]
        require(
            len(names) == self.classes,
            f"CIFAR file {path} lists {len(names)} class names in `{meta_key}`; "
            f"CIFAR-{self.classes} has {self.classes} (is `data.options.classes` right?).",
        )
        return names

    def load(self) -> SourceData:
        self.prepare()
        names = self._class_names()
        return SourceData(self._read(self.layout["train"]), self._read(self.layout["test"]), names)


# Folder names that mean a split (value: the split), and names that only look like one.
SPLIT_FOLDERS = {
    "train": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
}
SPLIT_LIKE = {*SPLIT_FOLDERS, "training", "testing", "eval", "evaluation", "trainval", "dev"}


def sub_folders(folder: Path) -> list[str]:
    """Visible sub-folders, sorted (hidden ones such as `.ipynb_checkpoints` are not classes)."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def split_folders(root: Path) -> dict[str, Path]:
    """`{split: folder}` when `root` holds `train/` (+ `val/`, `test/`), else `{}`.

    A root whose folders are named like splits but has no `train/` is refused: read as one
    folder of classes it would train a classifier whose classes are `test` and `val`.
    """
    names = sub_folders(root)
    if "train" not in names:
        like = [n for n in names if n.lower() in SPLIT_LIKE]
        require(
            not like,
            f"`data.root`={root} has class folders named like splits ({', '.join(like)}), "
            "so read as one folder of classes it would learn the classes "
            f"{', '.join(names)}. For split folders, name them train/ (required), val/ and "
            "test/ (optional), each holding one sub-folder per class; for one folder of "
            "classes, point `data.root` at the folder whose sub-folders are the classes.",
        )
        return {}
    others = [n for n in names if n not in SPLIT_FOLDERS]
    require(
        not others,
        f"`data.root`={root} holds train/ and also {', '.join(o + '/' for o in others)}: with "
        "split folders, only train/, val/ (or valid/, validation/) and test/ are read, each "
        "holding one sub-folder per class. Move or remove the others.",
    )
    found: dict[str, Path] = {}
    for name in names:
        split = SPLIT_FOLDERS[name]
        require(
            split not in found,
            f"`data.root`={root} has two {split} folders ({found.get(split, root).name}/ and "
            f"{name}/); keep one.",
        )
        found[split] = root / name
    return found


def check_same_classes(splits: dict[str, Path], classes: list[str]) -> None:
    """Every split folder has exactly the training folder's classes (labels are by name)."""
    for folder in splits.values():
        theirs = sub_folders(folder)
        extra = sorted(set(theirs) - set(classes))
        absent = sorted(set(classes) - set(theirs))
        require(
            not extra and not absent,
            f"Split folder {folder} does not have the classes of {splits['train']}: "
            f"{'extra ' + ', '.join(extra) if extra else ''}"
            f"{'; ' if extra and absent else ''}"
            f"{'missing ' + ', '.join(absent) if absent else ''}. Labels are matched by "
            "class-folder name, so every split folder needs the same class sub-folders.",
        )


# PIL modes of one channel wider than 8 bits: 16-bit PNGs open as I;16 (older Pillow: I).
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


def to_eight_bits(image: Any, path: str | Path) -> Any:
    """`image` (a PIL image) with 16-bit grayscale pixels scaled to 8 bits over the full
    16-bit range (value // 256: 0 -> 0, 65535 -> 255), as torchvision's
    `to_dtype(torch.uint8, scale=True)` does on a decoded 16-bit PNG and as PIL already does for
    16-bit RGB PNGs; other modes unchanged. Why: PIL's `convert("L")` clips such pixels at 255.
    Pixels outside 0..65535 (32-bit integers) and float pixels (mode F) have no range to scale
    from: refused, naming the file, rather than guessed."""
    import numpy as np
    from PIL import Image

    require(
        image.mode != "F",
        f"Image file {path} holds 32-bit float pixels (PIL mode F), whose range the file does "
        "not define, so they cannot be scaled to the 0..255 the models read. Re-save it as an "
        "8-bit or 16-bit image (PNG), e.g. `(array / array.max() * 65535).astype(numpy.uint16)`.",
    )
    if image.mode not in SIXTEEN_BIT_MODES:
        return image
    pixels = np.asarray(image).astype(np.int64)
    low, high = (int(pixels.min()), int(pixels.max())) if pixels.size else (0, 0)
    require(
        low >= 0 and high <= 65535,
        f"Image file {path} holds integer pixels from {low} to {high} (PIL mode {image.mode}); "
        "8-bit (0..255) and 16-bit (0..65535) images are read, 16-bit ones scaled to 0..255. "
        "Re-save it as an 8-bit or 16-bit image.",
    )
    return Image.fromarray((pixels // 256).astype(np.uint8))


@dataclass(frozen=True)
class ListedFile:
    """An image file as listed (`path`, under `data.root`) and the file it is (`real`, links
    resolved), so one file reached twice through links is recognised."""

    path: str
    real: str


def walk_images(
    folder: Path, extensions: tuple[str, ...], skipped: Counter[str] | None = None
) -> list[ListedFile]:
    """Image files anywhere under `folder`, in path order, links followed but each real
    directory entered once (`ln -s . again` inside a class folder made 24 files 344), hidden
    files and folders skipped (`.ipynb_checkpoints/` copies, macOS `._name.png` forks).

    An explicit depth-first walk with `os.scandir` in sorted order, so which path a linked
    directory is listed under does not depend on the file system's order; paths are built as
    strings (pathlib's rglob and Path sorting took ~1 s for 50,000 files, more than reading
    them back from the decoded-image cache) and only directories and links are resolved.
    Other files are counted in `skipped` by extension, so the caller can say what it left."""
    found: list[tuple[tuple[str, ...], ListedFile]] = []
    entered: set[str] = set()
    pending: list[tuple[str, tuple[str, ...]]] = [(str(folder), ())]
    while pending:
        directory, inner = pending.pop()
        real = os.path.realpath(directory)
        if real in entered:
            continue
        entered.add(real)
        with os.scandir(directory) as scan:
            entries = sorted((e for e in scan if not e.name.startswith(".")), key=lambda e: e.name)
        folders = []
        for entry in entries:
            if entry.is_dir():
                folders.append((entry.path, (*inner, entry.name)))
            elif entry.name.lower().endswith(extensions):
                found.append(((*inner, entry.name), listed_file(entry, real)))
            elif skipped is not None:
                skipped[os.path.splitext(entry.name)[1].lower() or entry.name] += 1
        pending += reversed(folders)
    return [file for _, file in sorted(found, key=lambda pair: pair[0])]


def listed_file(entry: os.DirEntry, directory: str) -> ListedFile:
    """`entry` (in the real `directory`) as a `ListedFile`; a link to nothing is refused here,
    where it is found, rather than failing later without a name."""
    if not entry.is_symlink():
        return ListedFile(entry.path, f"{directory}/{entry.name}")
    real = os.path.realpath(entry.path)
    require(
        entry.is_file(),
        f"Image file {entry.path} is a link to {real}, which is not a file (moved or "
        "deleted?): restore it or remove the link.",
    )
    return ListedFile(entry.path, real)


def once_each(files: list[ListedFile], folder: Path) -> list[ListedFile]:
    """`files` with a real file reached again through a link (inside one class folder)
    counted once, at its first path; logged, as the folder holds fewer images than names."""
    first: dict[str, ListedFile] = {}
    for file in files:
        first.setdefault(file.real, file)
    if len(first) < len(files):
        log.warning(
            "Class folder %s: %d of its %d image names are links to files already listed "
            "there; each file counts once",
            folder,
            len(files) - len(first),
            len(files),
        )
    return list(first.values())


def check_one_place_each(files: list[ListedFile]) -> None:
    """No real file is listed under two class (or split) folders: through a link, one image
    would be two classes at once, or a test image that is also trained on."""
    first: dict[str, str] = {}
    for file in files:
        other = first.setdefault(file.real, file.path)
        require(
            other == file.path,
            f"Image files {other} and {file.path} are one file ({file.real}, reached through "
            "a link) under two class or split folders: an image belongs to one class and one "
            "split (else the test scores images it trained on). Remove one of the two "
            "(folders are read with links followed).",
        )


class ImageFolderSource:
    """The user's own images, decoded once into memory, in one of two layouts:

    - `root/<class>/<images>`: one folder; the DataModule holds fractions out for val/test;
    - `root/train/<class>/...` (+ `root/val/...`, `root/test/...`): the dataset's own splits,
      used as they are (a missing val/ or test/ is held out of train/ by fraction).

    `size` None (the default): the images' own size when they all share one, else 64x64
    (logged). With a `cache_dir`, the decoded tensors are cached there (see `cache.py`).
    The DataModule lists the files first (`load_listed`) and decodes only those it keeps.
    """

    # torchvision's ImageFolder extensions (a tree it reads is read whole) and GIF.
    EXTENSIONS: ClassVar[tuple[str, ...]] = (
        ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm",
    )  # fmt: skip

    def __init__(
        self,
        root: str | None,
        download: bool = False,
        channels: int = 3,
        size: int | None = None,
        cache_dir: str | None = None,
    ) -> None:
        del download
        require(
            root is not None,
            "Config key `data.root` is not set: `data=imagefolder` needs the folder that holds "
            "one sub-folder of images per class, e.g. `data.root=/path/to/images`.",
        )
        self.root = Path(str(root)).expanduser()
        require(
            self.root.is_dir(),
            f"`data.root`={self.root} is not a folder: it must hold one sub-folder of images "
            "per class.",
        )
        require_choice("data.options.channels", channels, [1, 3])
        require_count("data.options.size", size, 1, allow_none=True)
        self.channels, self.size, self.cache_dir = channels, size, cache_dir
        self.splits = split_folders(self.root)
        classes_root = self.splits.get("train", self.root)
        self.class_names = sub_folders(classes_root)
        require(
            len(self.class_names) >= 2,
            f"{classes_root} (from `data.root`) has {len(self.class_names)} class sub-folders; "
            "image classification needs at least 2 (one sub-folder per class).",
        )
        if self.splits:
            check_same_classes(self.splits, self.class_names)

    def info(self) -> SourceInfo:
        return SourceInfo(num_classes=len(self.class_names), channels=self.channels)

    def prepare(self) -> None:
        return None

    @staticmethod
    def decode_file(path: str | Path, channels: int, size: int | None) -> Tensor:
        """One image file -> uint8 (channels, size, size); size None: its own size.

        High-bit-depth pixels are scaled to 8 bits first (`to_eight_bits`): PIL's `convert`
        clips them, and 16-bit PNGs of 10,000-50,000 decoded to all-255 images."""
        from PIL import Image, UnidentifiedImageError
        from torchvision.transforms.v2 import functional as F

        try:
            with Image.open(path) as image:
                image = to_eight_bits(image, path).convert("L" if channels == 1 else "RGB")
                tensor = F.pil_to_tensor(image)
        except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as error:
            # ValueError: a mode PIL cannot convert (a LAB TIFF to gray); a bomb: > 178 Mpx
            raise PosttrainError(f"Cannot read image file {path}: {error}.") from error
        if size is None or tuple(tensor.shape[-2:]) == (size, size):
            return tensor
        return F.resize(tensor, [size, size], antialias=True)

    def image_files(self, folder: Path, skipped: Counter[str]) -> list[ListedFile]:
        """Image files anywhere under `folder` (`walk_images`), each real file once."""
        files = walk_images(folder, self.EXTENSIONS, skipped)
        # With split folders, removing it from one split alone is refused too (every split
        # folder holds the same classes): say what does work.
        remedy = (
            f"add its images, or remove the class folder `{folder.name}` from every split "
            f"folder ({', '.join(f.name + '/' for f in self.splits.values())})"
            if self.splits
            else "remove it or add its images"
        )
        require(
            bool(files),
            f"Class folder {folder} (under `data.root`) holds no images "
            f"({', '.join(self.EXTENSIONS)}); {remedy}.",
        )
        return once_each(files, folder)

    def list_classes(self, folder: Path) -> tuple[list[ListedFile], list[int]]:
        """`folder/<class>/<images>` for this source's classes: files and labels (by name)."""
        files: list[ListedFile] = []
        labels: list[int] = []
        skipped: Counter[str] = Counter()
        for label, name in enumerate(self.class_names):
            found = self.image_files(folder / name, skipped)
            files += found
            labels += [label] * len(found)
        if skipped:
            log.warning(
                "%s: %d files in the class folders are not read, by extension: %s (images "
                "are read from %s files)",
                folder,
                sum(skipped.values()),
                ", ".join(f"{ext} {n}" for ext, n in skipped.most_common(6)),
                ", ".join(self.EXTENSIONS),
            )
        return files, labels

    def list_folders(self, folders: dict[str, Path]) -> dict[str, LabelledImages]:
        """Every folder's images, listed as one `ImageFiles` (decoded in one pass: one size
        for all, one cache entry); one real file under two class or split folders is refused."""
        found = {split: self.list_classes(folder) for split, folder in folders.items()}
        check_one_place_each([f for files, _ in found.values() for f in files])
        listed = {s: ([f.path for f in files], labels) for s, (files, labels) in found.items()}
        files = ImageFiles(
            [path for paths, _ in listed.values() for path in paths],
            self.decode_file,
            self.channels,
            self.size,
            self.cache_dir,
            name="imagefolder",
            root=self.root,
        )
        read, start = {}, 0
        for split, (paths, labels) in listed.items():
            rows = ImageRows(files, torch.arange(start, start + len(paths)))
            read[split] = LabelledImages(rows, torch.tensor(labels, dtype=torch.long))
            start += len(paths)
        return read

    def load(self) -> SourceData:
        return self.load_listed().decoded()

    def load_listed(self) -> SourceData:
        if not self.splits:
            log.info(
                "data.root=%s: one folder of classes (%d); val and test are held out by "
                "`data.val_fraction`/`data.test_fraction`",
                self.root,
                len(self.class_names),
            )
            return SourceData(self.list_folders({"all": self.root})["all"], None, self.class_names)
        read = self.list_folders(self.splits)
        held = [s for s in ("val", "test") if s not in read]
        log.info(
            "data.root=%s: split folders %s (%s images)%s",
            self.root,
            ", ".join(f"{f.name}/" for f in self.splits.values()),
            ", ".join(f"{split} {len(data)}" for split, data in read.items()),
            f"; {' and '.join(held)} held out of train/ by fraction" if held else "",
        )
        return SourceData(read["train"], read.get("test"), self.class_names, val=read.get("val"))


class OmniglotSource:
    """Omniglot (Lake et al.): 1,623 handwritten characters of 50 alphabets, 20 images each.

    Read from the extracted `omniglot-py/images_{background,evaluation}/<alphabet>/
    <character>/*.png` (downloaded through torchvision if absent), at `size` x `size` (28).
    `split` names the protocol that assigns characters to meta-train/val/test (see
    `omniglot_splits.py`): `vinyals` (the papers' split over all 50 alphabets) or `lake`
    (background vs evaluation alphabets). The loaded data carries that assignment as
    `class_splits`, by character, so the episodic DataModule never splits rotations apart.
    """

    FOLDER = "omniglot-py"
    PARTS: ClassVar[dict[str, bool]] = {"images_background": True, "images_evaluation": False}

    def __init__(
        self,
        root: str | None,
        download: bool = True,
        size: int = 28,
        split: str = "lake",
        cache_dir: str | None = None,
    ) -> None:
        from posttrain.data.omniglot_splits import PROTOCOLS

        require(root is not None, "Config key `data.root` must name a folder for Omniglot.")
        require_count("data.options.size", size, 1)
        require_choice("data.split", split, PROTOCOLS)
        self.root, self.download, self.size, self.split = (
            Path(str(root)).expanduser(),
            download,
            size,
            split,
        )
        self.cache_dir = cache_dir

    def info(self) -> SourceInfo:
        return SourceInfo(num_classes=1623, channels=1)

    def prepare(self) -> None:
        missing = [p for p in self.PARTS if not (self.root / self.FOLDER / p).is_dir()]
        if not missing:
            return
        require(
            self.download,
            f"Omniglot is not in {self.root / self.FOLDER} (missing {', '.join(missing)}) and "
            "`data.download` is false. Set `data.download=true` (needs internet) or point "
            "`data.root` at the folder holding `omniglot-py/`.",
        )
        from torchvision import datasets

        try:
            for background in self.PARTS.values():
                datasets.Omniglot(str(self.root), background=background, download=True)
        except Exception as error:  # network failures come in many types
            raise PosttrainError(
                f"Downloading Omniglot into `data.root`={self.root} failed ({error}). Check the "
                "internet connection or place the extracted `omniglot-py/` folder there."
            ) from error

    def character_folders(self, part: str) -> list[Path]:
        folder = self.root / self.FOLDER / part
        characters = [folder / a / c for a in sub_folders(folder) for c in sub_folders(folder / a)]
        require(bool(characters), f"Omniglot folder {folder} holds no character folders.")
        return characters

    def list_characters(self, characters: list[Path], first_label: int = 0) -> LabelledImages:
        """Every drawing of `characters`, labelled first_label, first_label + 1, ..., listed
        as one `ImageFiles` (decoded once into the cache, keyed by this listing: `cache.py`)."""
        files: list[str] = []
        labels: list[int] = []
        for offset, character in enumerate(characters):
            found = sorted(
                e.path
                for e in os.scandir(character)
                if e.name.endswith(".png") and not e.name.startswith(".")  # as glob does
            )
            require(
                bool(found),
                f"Omniglot character folder {character} holds no .png images; every character "
                "has 20 drawings. Re-extract `omniglot-py/` (or delete it and set "
                "`data.download=true`).",
            )
            files += found
            labels += [first_label + offset] * len(found)
        listed = ImageFiles(
            files,
            ImageFolderSource.decode_file,
            1,
            self.size,
            self.cache_dir,
            name=f"omniglot-{self.split}",
            root=self.root / self.FOLDER,
        )
        rows = ImageRows(listed, torch.arange(len(files)))
        return LabelledImages(rows, torch.tensor(labels, dtype=torch.long))

    @staticmethod
    def name_of(character: Path) -> str:
        return f"{character.parent.name}/{character.name}"

    def check_lake_halves(self, halves: dict[str, list[Path]]) -> None:
        """Each half holds exactly its alphabets' characters: a partial extraction (or a
        half with alphabets removed) ran as `lake` on fewer classes, reported as the protocol."""
        from posttrain.data.omniglot_splits import lake_characters

        for part, expected in lake_characters().items():
            found = {self.name_of(c) for c in halves[part]}
            absent, other = sorted(expected - found), sorted(found - expected)
            problems = [
                f"it lacks {len(absent)} of its {len(expected)} characters (e.g. "
                f"{', '.join(absent[:3])})"
            ] * bool(absent) + [
                f"it holds {len(other)} characters of no alphabet of that half (e.g. "
                f"{', '.join(other[:3])})"
            ] * bool(other)
            require(
                not problems,
                f"Omniglot folder {self.root / self.FOLDER / part} is not the `lake` protocol's "
                f"{part}: {'; '.join(problems)}. The protocol is the 30 background alphabets "
                "(964 characters) against the 20 evaluation alphabets (659): re-extract both "
                "halves (or delete `omniglot-py/` and set `data.download=true`).",
            )

    def load_lake(self) -> SourceData:
        """Background alphabets: the training pool; evaluation alphabets: the test pool."""
        background = self.character_folders("images_background")
        evaluation = self.character_folders("images_evaluation")
        self.check_lake_halves({"images_background": background, "images_evaluation": evaluation})
        both = self.list_characters(background + evaluation)  # one pass, one cache entry
        first_test = int((both.labels < len(background)).sum())
        train = LabelledImages(both.images[:first_test], both.labels[:first_test])
        test = LabelledImages(both.images[first_test:], both.labels[first_test:])
        names = [self.name_of(c) for c in background + evaluation]
        splits = {
            "train": list(range(len(background))),
            "test": list(range(len(background), len(names))),
        }
        log.info(
            "Omniglot split `lake`: %d background characters (meta-train, and meta-val drawn "
            "by character), %d evaluation characters (meta-test)",
            len(background),
            len(evaluation),
        )
        return SourceData(train, test, names, class_splits=splits)

    def load_vinyals(self) -> SourceData:
        """The characters the split files name, found in either half, in one pool."""
        from posttrain.data.omniglot_splits import vinyals_characters

        wanted = vinyals_characters()
        found = {self.name_of(c): c for part in self.PARTS for c in self.character_folders(part)}
        listed = [c for characters in wanted.values() for c in characters]
        absent = [c for c in listed if c not in found]
        require(
            not absent,
            f"Omniglot in {self.root / self.FOLDER} lacks {len(absent)} of the {len(listed)} "
            f"characters of the `vinyals` split (e.g. {', '.join(absent[:3])}): the folder is "
            "incomplete. Re-extract both halves, or use `data.split=lake`.",
        )
        names = sorted(listed)
        label = {name: index for index, name in enumerate(names)}
        pool = self.list_characters([found[n] for n in names], 0)
        splits = {s: [label[c] for c in characters] for s, characters in wanted.items()}
        log.info(
            "Omniglot split `vinyals`: %s characters (meta-train/val/test, all 50 alphabets)",
            "/".join(str(len(c)) for c in wanted.values()),
        )
        return SourceData(pool, None, names, class_splits=splits)

    def load(self) -> SourceData:
        return self.load_listed().decoded()

    def load_listed(self) -> SourceData:
        self.prepare()
        return self.load_vinyals() if self.split == "vinyals" else self.load_lake()


SOURCES: dict[str, type] = {
    "digits": DigitsSource,
    "fake": FakeSource,
    "cifar": CifarSource,
    "imagefolder": ImageFolderSource,
    "omniglot": OmniglotSource,
}


def make_source(name: str, root: str | None, download: bool, options: dict[str, Any]) -> Source:
    """Build the source called `name`, turning bad options into an error that names them."""
    require_choice("data.dataset", name, SOURCES)
    require_bool("data.download", download)  # `download=no` is a truthy string: it downloaded
    source_class = SOURCES[name]
    require_known_options(
        source_class, {"root": root, "download": download, **options}, "data.options"
    )
    return source_class(root=root, download=download, **options)
