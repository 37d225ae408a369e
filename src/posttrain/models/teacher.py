"""The frozen teacher of `method=distill`: any posttrain classifier checkpoint, rebuilt from
the config it stores.

The teacher lives outside the student's module tree on purpose (a plain object, not an
`nn.Module` attribute): it is then in no `state_dict` (the student's checkpoint neither stores
it nor needs its file later, for `eval.py` or as `model.pretrained`), in no `parameters()` (so
never in the optimizer), and Lightning's `train()`/`to()` never reach it, so it stays in eval
mode and is moved to the student's device explicitly (`follow`). It runs inside the student's
training step, so the step's autocast (`trainer.precision=*-mixed`) applies to it as well.

Its input is the student's batch as the teacher was trained to see it: back to pixels with
the student's normalization, resized to the teacher's `data.image_size`, normalized with the
statistics the teacher's checkpoint carries.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from posttrain.errors import PosttrainError, require

log = logging.getLogger("posttrain")

KEY = "method.teacher"
# Methods whose checkpoint holds one classifier over the data's classes (a distilled student
# can teach in turn); episodic and multi-task checkpoints predict something else.
CLASSIFIER_METHODS = (
    "posttrain.methods.supervised.SupervisedClassifier",
    "posttrain.methods.distill.Distillation",
)
Stats = tuple[Tensor, Tensor]  # per-channel mean and std of model inputs


@dataclass
class InputAdapter:
    """Student batch -> teacher input. Identity where sizes and statistics agree."""

    student_stats: Stats
    teacher_stats: Stats
    size: tuple[int, int]  # the teacher's trained input size

    def __post_init__(self) -> None:
        pairs = zip(self.student_stats, self.teacher_stats, strict=True)
        self.same_stats = all(torch.equal(a, b) for a, b in pairs)

    def __call__(self, x: Tensor) -> Tensor:
        resize = tuple(x.shape[-2:]) != self.size
        if self.same_stats and not resize:
            return x
        pixels = x * column(self.student_stats[1], x) + column(self.student_stats[0], x)
        if resize:
            pixels = F.interpolate(
                pixels, size=self.size, mode="bilinear", align_corners=False, antialias=True
            )
        mean, std = (column(s, x) for s in self.teacher_stats)
        return (pixels - mean) / std


def column(values: Tensor, like: Tensor) -> Tensor:
    """Per-channel values shaped (C, 1, 1) on `like`'s device and dtype."""
    return values.to(device=like.device, dtype=like.dtype).view(-1, 1, 1)


class Teacher:
    """A frozen classifier in eval mode that turns student batches into teacher logits."""

    def __init__(
        self,
        network: nn.Module,
        stats: Stats | None,
        size: int | None,
        source: str,
        digest: str = "",
    ) -> None:
        self.network = network.eval().requires_grad_(False)
        self.stats, self.size, self.source = stats, size, source
        self.digest = digest  # the file's sha256: what a resume checks it distills from
        self.adapter: InputAdapter | None = None

    def adapt_to(self, student_stats: Stats, native_size: tuple[int, int]) -> None:
        """How student batches become teacher inputs; `native_size`: the data's own image
        size, which a teacher trained with `data.image_size=null` saw."""
        size = (self.size, self.size) if self.size is not None else native_size
        teacher_stats = self.stats if self.stats is not None else student_stats
        self.adapter = InputAdapter(student_stats, teacher_stats, size)

    def own_input(self, images: Tensor) -> Tensor:
        """uint8 images prepared the teacher's own way (its size, its statistics), as its
        training run fed them: the reference the adapter is measured against."""
        from posttrain.data.transforms import normalize, to_model_input

        assert self.adapter is not None, "adapt_to sets the teacher's statistics"
        return normalize(to_model_input(images, self.size), self.adapter.teacher_stats)

    def follow(self, reference: Tensor) -> None:
        """Onto the device of `reference` (a student parameter)."""
        self.network.to(device=reference.device)

    @torch.no_grad()
    def logits(self, x: Tensor) -> Tensor:
        """Teacher logits for a student batch; never part of the autograd graph."""
        return self.network(self.adapter(x) if self.adapter is not None else x)

    def describe(self) -> str:
        size = f"{self.size}x{self.size}" if self.size is not None else "native size"
        count = sum(p.numel() for p in self.network.parameters())
        return f"teacher {self.source}: {count:,} frozen parameters, input {size}"


# How far below its own accuracy the teacher may fall through the student's inputs before the
# run warns: a few images of a small validation split, not a teacher that lost its sight.
ADAPTER_TOLERANCE = 0.02


@torch.no_grad()
def accuracy_on_student_inputs(
    teacher: Teacher, datamodule: Any, batches: int, device: torch.device
) -> dict[str, float]:
    """The teacher's accuracy on the first `batches` validation batches of the student's data
    (the same split: `check_same_split`), through the student's inputs and the adapter (what
    it teaches from) and through its own preparation of the same pixels (what it can do).

    Feeding the teacher its own preparation during training would need the student's raw
    batch and a replay of each random augmentation at the teacher's size; the teacher sees
    the student's (augmented, mixed) view instead, so the loss of the round trip (a teacher
    of native 8x8 digits lost 11 points through 16x16 student batches) is measured here.

    Under DDP each process's loader holds its share of the split; the counts are summed
    over the processes (every one measures at fit start), so the accuracy is the whole
    split's on every rank: rank 0's share alone read 0.9861 where the split gave 0.9930.
    """
    from posttrain.data.datamodule import by_rank

    correct, own, seen = 0, 0, 0
    for images, labels in itertools.islice(datamodule.val_dataloader(), batches):
        images, labels = images.to(device), labels.to(device)
        student_view = datamodule.normalize(datamodule.to_model_input(images))
        correct += int((teacher.logits(student_view).argmax(-1) == labels).sum())
        own += int((teacher.network(teacher.own_input(images)).argmax(-1) == labels).sum())
        seen += len(labels)
    correct, own, seen = (
        sum(counts) for counts in zip(*by_rank((correct, own, seen)), strict=True)
    )
    return {"teacher/val_acc": correct / seen, "teacher/val_acc_own_input": own / seen}


def adapter_warning(accuracy: dict[str, float], teacher: Teacher) -> str | None:
    """A loud line when the student's inputs cost the teacher more than `ADAPTER_TOLERANCE`."""
    through, own = accuracy["teacher/val_acc"], accuracy["teacher/val_acc_own_input"]
    if through >= own - ADAPTER_TOLERANCE:
        return None
    size = f"{teacher.size}x{teacher.size}" if teacher.size is not None else "native size"
    return (
        f"the teacher is {100 * through:.1f}% accurate on the student's validation images as "
        f"the student's batches reach it (resized to its {size}, renormalized) but "
        f"{100 * own:.1f}% on the same images prepared its own way: it teaches from inputs it "
        "reads worse. Train the teacher at the student's `data.image_size` (or the student at "
        "the teacher's) to remove the gap."
    )


def method_target(config: dict[str, Any]) -> str:
    method = config.get("method")
    return str(method.get("_target_", "")) if isinstance(method, dict) else ""


def network_weights(checkpoint: dict[str, Any], path: Path) -> dict[str, Tensor]:
    """The classifier's tensors (`model.*` of the method's state dict, prefix removed)."""
    state = checkpoint.get("state_dict")
    require(
        isinstance(state, dict) and "model.head.weight" in state,
        f"Config key `{KEY}`: {path} holds no classifier weights (`state_dict` with "
        "`model.head.weight`); point it at a run's `checkpoints/best.ckpt` or `last.ckpt`.",
    )
    return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}


def first_conv_channels(weights: dict[str, Tensor]) -> int:
    """Input channels of the first convolution (state dicts keep registration order)."""
    return next(v.shape[1] for k, v in weights.items() if k.startswith("features.") and v.ndim == 4)


def check_compatible(
    weights: dict[str, Tensor], path: Path, num_classes: int, in_channels: int
) -> None:
    """The teacher predicts this data's classes from images of this data's channel count."""
    classes, channels = weights["head.weight"].shape[0], first_conv_channels(weights)
    require(
        classes == num_classes and channels == in_channels,
        f"Config key `{KEY}`: {path} was trained on {classes} classes of {channels}-channel "
        f"images, but this run's data has {num_classes} classes of {in_channels}-channel "
        "images. A teacher must predict the student's classes from the same kind of images: "
        "use a teacher trained on this data (or set `data.*` to the teacher's data).",
    )


def check_same_split(trained: dict[str, Any], student: dict[str, Any], path: Path) -> None:
    """The teacher was trained on this run's dataset, classes and validation/test split: a
    teacher of other classes teaches other meanings under the same indices, one of another
    split has trained on the student's validation or test images. More of the training split
    (`data.samples_per_class`), another `data.image_size` or model: allowed."""
    from posttrain.data.splits import split_difference

    differs = split_difference(trained, student)
    if differs is None:
        return
    key, theirs, ours = differs
    raise PosttrainError(
        f"Config key `{KEY}`: {path} was trained with `{key}={theirs}`, this run has "
        f"`{key}={ours}`. A teacher must come from this run's dataset, classes and "
        "validation/test split (`data.dataset`, `data.options`, `data.classes`, `data.seed`, "
        "`data.val_fraction`, `data.test_fraction`; `data.root` for image folders): otherwise "
        "it predicts other classes or has trained on the student's validation or test images. "
        "It may differ in `data.samples_per_class` (trained on more of the training split), "
        f"`data.image_size` and `model`. Train the teacher with `{key}={ours}`, or set "
        f"`{key}={theirs}` here."
    )


def check_same_images(checkpoint: dict[str, Any], listing: dict[str, Any], path: Path) -> None:
    """The teacher's split was drawn from the images the student's is drawn from: the same
    config over an image folder whose files changed since draws another split
    (`posttrain.data.splits.data_listing`)."""
    from posttrain.data.splits import listing_change, stored_listing

    change = listing_change(stored_listing(checkpoint), listing)
    require(
        change is None,
        f"Config key `{KEY}`: {path} was trained before the data changed: {change}. Its "
        "validation and test splits were drawn from the images then, so it may have trained "
        "on this run's validation or test images. Train the teacher on the data as it is "
        "now (or restore the files as they were).",
    )


def build_network(config: dict[str, Any], weights: dict[str, Tensor], path: Path) -> nn.Module:
    """The teacher's `model` config, without its own start weights (the checkpoint has them).

    Built on a forked random generator: its (overwritten) initial weights would otherwise
    shift every later draw, so a distilled run and the same seed trained alone would see
    other batch orders and augmentations, and compare worse than they need to.
    """
    from hydra.utils import instantiate

    model = {**config["model"], "pretrained": None, "pretrained_head": False, "compile": False}
    with torch.random.fork_rng(devices=[]):  # the student's seeded draws stay as without it
        network = instantiate(
            model,
            num_classes=weights["head.weight"].shape[0],
            in_channels=first_conv_channels(weights),
        )
    try:
        network.load_state_dict(weights)
    except RuntimeError as error:
        raise PosttrainError(
            f"Config key `{KEY}`: the weights in {path} do not fit the model its own config "
            f"describes ({str(error).splitlines()[0]}); the file may come from another version "
            "of the run. Use a checkpoint written by the run it came from."
        ) from error
    return network


def input_stats(checkpoint: dict[str, Any]) -> Stats | None:
    """The normalization the teacher trained with (its DataModule's state in the checkpoint)."""
    from posttrain.data.datamodule import ImageClassificationDataModule

    state = checkpoint.get(ImageClassificationDataModule.__qualname__) or {}
    if "mean" not in state or "std" not in state:
        return None
    return torch.tensor(state["mean"]), torch.tensor(state["std"])


def check_same_teacher(saved: Any, path: str | Path) -> None:
    """A resumed student distills from the teacher its run started with (`saved`: what its
    checkpoint recorded, None in checkpoints written before it did). Refused before any work
    (the folder keeps its record) when the file at `method.teacher` is gone or now holds other
    contents."""
    from posttrain.checkpoints import file_sha256

    if not isinstance(saved, dict):
        return
    file = Path(str(path)).expanduser()
    require(
        file.is_file(),
        f"Config key `{KEY}`: {file} does not exist (or is not a file), and this run started "
        f"distilling from it (sha256 {str(saved.get('sha256'))[:12]}...). Put the teacher's "
        "file back at that path to resume, or start a new run with another teacher.",
    )
    now = file_sha256(file)
    require(
        now == saved.get("sha256"),
        f"Config key `{KEY}`: {file} is not the teacher this run started with: the run read "
        f"{saved.get('file')} with sha256 {str(saved.get('sha256'))[:12]}..., the file now "
        f"has {now[:12]}... (a teacher run trained on or re-run in its folder rewrites its "
        "checkpoints under the same names). The resumed student would learn from another "
        "teacher from here on, and its numbers would describe neither. Put the original "
        "teacher's file back at that path to resume, or start a new run to distill from "
        "this one.",
    )


def load_teacher(
    path: str | Path,
    num_classes: int,
    in_channels: int,
    data: dict[str, Any],
    listing: dict[str, Any] | None = None,
) -> Teacher:
    """Read, check and rebuild the teacher of `method.teacher`; each refusal one paragraph.
    `data`: the student's `data.*` settings (`ImageClassificationDataModule.settings`);
    `listing`: the images its splits were drawn from (`ImageClassificationDataModule.listing`)."""
    from posttrain.checkpoints import file_sha256, load_checkpoint, stored_config

    file = Path(str(path)).expanduser()
    checkpoint = load_checkpoint(file, key=KEY)
    config = stored_config(checkpoint, file, key=KEY)
    target = method_target(config)
    trained_with = target.rsplit(".", 1)[-1] or "an unknown method"
    require(
        target in CLASSIFIER_METHODS,
        f"Config key `{KEY}`: {file} was trained with `{trained_with}` "
        f"(episodic or multi-task: its outputs are not one distribution over the data's "
        "classes). A teacher is the checkpoint of a `method=supervised`, `finetune` or "
        "`distill` run.",
    )
    check_same_split(config.get("data") or {}, data, file)
    if listing is not None:
        check_same_images(checkpoint, listing, file)
    weights = network_weights(checkpoint, file)
    check_compatible(weights, file, num_classes, in_channels)
    network = build_network(config, weights, file)
    size = (config.get("data") or {}).get("image_size")
    arch = config["model"].get("arch", "model")
    source = f"{arch} from {file}"
    teacher = Teacher(network, input_stats(checkpoint), size, source, file_sha256(file))
    if teacher.stats is None:
        log.warning("%s carries no normalization statistics: the student's are used", file)
    return teacher


__all__ = [
    "InputAdapter",
    "Teacher",
    "accuracy_on_student_inputs",
    "check_same_teacher",
    "load_teacher",
]
