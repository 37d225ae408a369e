"""One LightningDataModule for image classification over any source.

Data lives in memory as uint8 tensors; the DataLoader slices whole batches (no per-sample
decode or collate), and `on_after_batch_transfer` turns them into normalized float images
of `image_size` on the training device, applying training-only batch transforms there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from posttrain.data.sources import (
    LabelledImages,
    Source,
    SourceData,
    SourceInfo,
    decode_kept,
    load_listed,
    make_source,
)
from posttrain.data.splits import LISTING_KEY, data_listing, listing_change, stored_listing
from posttrain.data.targets import ClassIds, check_tasks_vary, derive_targets, parse_tasks
from posttrain.data.transforms import channel_stats, normalize, to_model_input
from posttrain.errors import require, require_count, require_fraction

BatchTransform = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


class InMemoryDataset(Dataset):
    """Indexable (image, target) pairs whose `__getitems__` returns a ready batch.

    The target is the label, or a dict of per-task targets when `task_targets` is given.
    """

    def __init__(self, data: LabelledImages, task_targets: dict[str, Tensor] | None = None) -> None:
        self.data, self.task_targets = data, task_targets

    def __len__(self) -> int:
        return len(self.data)

    def targets(self, index: Tensor | int) -> Any:
        if self.task_targets is None:
            return self.data.labels[index]
        return {name: values[index] for name, values in self.task_targets.items()}

    def __getitem__(self, index: int) -> tuple[Tensor, Any]:
        return self.data.images[index], self.targets(index)

    def __getitems__(self, indices: Sequence[int]) -> tuple[Tensor, Any]:
        index = torch.as_tensor(indices)
        return self.data.images[index], self.targets(index)


def keep_batch(batch: Any) -> Any:
    """collate_fn for datasets that already return whole batches."""
    return batch


def process_group() -> tuple[int, int]:
    """(rank, world size) of the running DDP group; (0, 1) outside one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def process_seed(seed: int, rank: int) -> int:
    """The seed of DDP process `rank`'s own random streams: `seed` itself on rank 0 (so a
    single process is unchanged), a 32-bit mix of both elsewhere (numpy's SeedSequence).
    Not `seed + rank` (rank 1 of seed 0 would draw what seed 1 draws), nor `seed + (rank
    << 32)`: torch's CPU generator keeps only the low 32 bits of a seed (the ranks drew
    the same episodes)."""
    import numpy as np

    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def evaluation_generator() -> torch.Generator:
    """A fresh generator of its own for a validation or test loader. Every DataLoader
    iterator draws its workers' base seed from its loader's generator, the seeded global one
    when none is given: each validation then took a draw from the stream dropout and
    augmentation draw from, so `trainer.check_val_every_n_epoch` or `val_check_interval`
    (which a resume may change) moved the training that followed. Evaluation draws nothing
    random, so the seed this gives its workers does not matter."""
    return torch.Generator()


def by_rank(value: Any) -> list[Any]:
    """`value` of every process of the DDP group, in rank order ([value] outside one).

    A collective: every process calls it at the same point (Lightning builds checkpoints on
    every rank and writes rank 0's), so rank 0's file can hold each rank's random state.
    """
    import torch.distributed as dist

    _, world = process_group()
    if world == 1:
        return [value]
    values: list[Any] = [None] * world
    dist.all_gather_object(values, value)
    return values


def evaluation_sampler(dataset: Dataset, split: str, unit: str = "images") -> Sampler | None:
    """Under DDP, each process's share of a validation or test split, every item exactly once.

    Left to Lightning, evaluation loaders get a padding `DistributedSampler`: 359 test
    images were scored as 360 (one counted twice), and 143 validation images as 144, so
    `val/acc_best` and the choice of `best.ckpt` were on padded data. Lightning's
    unrepeated sampler (the one it uses for prediction) gives shares that differ by at most
    one item; Lightning keeps a loader whose sampler is already distributed, and the
    metrics (torchmetrics) reduce uneven shares exactly. Each process needs one item at
    least (DDP syncs buffers on the first evaluation batch), so a smaller split is refused.
    None outside DDP: the plain sequential loader.
    """
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    rank, world = process_group()
    if world == 1:
        return None
    size = len(dataset)  # type: ignore[arg-type]
    require(
        size >= world,
        f"The {split} split has {size} {unit}, fewer than the {world} DDP processes "
        f"(`trainer.devices` x `trainer.num_nodes`): each process evaluates its own share "
        f"and needs one at least. Use fewer processes or a larger {split} split.",
    )
    return UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)


def stratified_split(
    labels: Tensor, fraction: float, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Split indices into (kept, held_out) with `fraction` of every class held out."""
    kept, held = [], []
    for cls in labels.unique():
        members = (labels == cls).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        count = round(fraction * len(members))
        held.append(members[:count])
        kept.append(members[count:])
    return torch.cat(kept).sort().values, torch.cat(held).sort().values


def per_class_subset(labels: Tensor, per_class: int, generator: torch.Generator) -> Tensor:
    """Indices of `per_class` seeded examples of every class (the low-label regime); a class
    with fewer gives all it has (`check_samples_per_class` refuses that case first)."""
    chosen = []
    for cls in labels.unique():
        members = (labels == cls).nonzero().flatten()
        chosen.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    return torch.cat(chosen).sort().values


def check_samples_per_class(labels: Tensor, per_class: int, class_names: list[str]) -> None:
    """Every class has `per_class` training images to keep. Observed: a class of 1 image gave
    5/5/1 training images with `data.samples_per_class=5` and no word, though the setting
    promises K of every class (the low-label comparisons assume it)."""
    classes, counts = labels.unique(return_counts=True)
    short = [(class_names[c], n) for c, n in zip(classes.tolist(), counts.tolist(), strict=True)]
    short = [(name, count) for name, count in short if count < per_class]
    listed = ", ".join(f"{name} ({count})" for name, count in short[:10])
    more = f" and {len(short) - 10} more" if len(short) > 10 else ""
    require(
        not short,
        f"`data.samples_per_class`={per_class} keeps {per_class} training images of every "
        f"class, but {len(short)} class(es) have fewer in the training split (what is left "
        f"once validation and test images are held out): {listed}{more}. Set it "
        f"to at most {int(counts.min())}, or give those classes more images.",
    )


def keep_classes(data: LabelledImages | None, classes: list[int]) -> LabelledImages | None:
    """Only the images of `classes`, relabelled 0..len(classes)-1 in the order given."""
    if data is None:
        return None
    # Sized for the classes too: a part may hold none of them (Omniglot's test pool).
    mapping = torch.full((max(int(data.labels.max()), *classes) + 1,), -1, dtype=torch.long)
    mapping[torch.tensor(classes)] = torch.arange(len(classes))
    kept = mapping[data.labels] >= 0
    return LabelledImages(data.images[kept], mapping[data.labels[kept]])


def check_classes_are_trained(
    held_out: dict[str, LabelledImages], pool: LabelledImages, source: Source
) -> None:
    """Every class of validation and test is one the classifier trains on. Observed:
    Omniglot's `lake` protocol (the source's default) keeps its evaluation alphabets, other
    characters than the background ones, as the test split; a classifier trained on the
    background characters scored near 0 on characters it had never seen, without a word."""
    trained = set(pool.labels.unique().tolist())
    name = type(source).__name__
    for split, data in held_out.items():
        unseen = sorted(set(data.labels.unique().tolist()) - trained)
        require(
            not unseen,
            f"The {split} split of {name} has {len(unseen)} classes that the training split "
            f"does not have (e.g. label {unseen[0] if unseen else ''}): a classifier cannot be "
            "tested on classes it never trains on. Few-shot protocols that keep classes apart "
            "(Omniglot's `data.options.split=lake`) are for episodic methods "
            "(`method=maml`/`protonet` with `data=omniglot`); for one classifier over all "
            "Omniglot characters use `+data.options.split=vinyals` (one pool, split by image).",
        )


class SourceDataModule(L.LightningDataModule):
    """What every DataModule reading one registered source (`self.source`) answers alike,
    including the random state of its training batches (saved with checkpoints)."""

    source: Source
    _train_generator: torch.Generator | None = None
    _pending_random_state: dict[str, Any] | None = None
    _stats: tuple[Tensor, Tensor] | None = None  # per-channel mean/std the inputs are normalized by
    image_size: int | None = None  # the side images are resized to; None keeps the source's
    listing: dict[str, Any] | None = None  # what the splits were drawn from (set up by `setup`)
    dataset: str | None = None  # `data.dataset`
    root: str | None = None  # `data.root`

    def read_listing(self) -> tuple[SourceData, dict[str, Any]]:
        """The source's images as listed (file images not decoded yet) and what they are
        (`data_listing`): cheap enough to tell whether the images changed without setting up."""
        listed = load_listed(self.source)
        return listed, data_listing(listed, {"dataset": self.dataset, "root": self.root})

    def train_generator(self) -> torch.Generator:
        """The generator behind the training batches' order (and loader seeds).

        Its own, not the global one: the global generator's draws at iterator creation
        depend on when Lightning creates iterators, which differs between a run and its
        resumption. Seeded from the run's `seed`; restored exactly on resume.
        """
        if self._train_generator is None:
            seed = int(torch.randint(2**62, (1,)))  # a draw from the seeded global generator
            self._train_generator = torch.Generator().manual_seed(seed)
            self.apply_pending_random_state()
        return self._train_generator

    def random_state(self) -> dict[str, Any]:
        generator = self._train_generator
        return {"train_batches": None if generator is None else generator.get_state()}

    def check_checkpoint_data(self, checkpoint: dict[str, Any], resuming: bool) -> None:
        """A checkpoint's splits (of images, or of classes for episodes) are drawn again from
        the images it was trained with: the config alone does not say so for an image folder
        whose files changed since (`data_listing`). Sets the data up (the fit or test then
        reuses it), so a refusal comes before the run's record is touched. A resume may move
        `data.root`; an evaluation on another root is other data (`eval.py` says so)."""
        self.setup("fit" if resuming else "test")
        assert self.listing is not None, "setup() lists the data"
        change = listing_change(stored_listing(checkpoint), self.listing, root_may_move=resuming)
        require(
            change is None,
            f"Config key `ckpt_path`: the data changed since the checkpoint was written: "
            f"{change}. Its validation and test splits are drawn from the listed images with "
            "`data.seed`, so they would now hold images (or classes) it trained on, and its "
            "numbers would not be true. Restore the files as they were, or start a new run on "
            "the data as it is.",
        )

    def load_random_state(self, state: dict[str, Any]) -> None:
        """Kept until the training loader exists (restore happens before it is built)."""
        self._pending_random_state = state
        self.apply_pending_random_state()

    def apply_pending_random_state(self) -> None:
        state = self._pending_random_state
        if state is not None and self._train_generator is not None:
            if state.get("train_batches") is not None:
                self._train_generator.set_state(state["train_batches"])
            self._pending_random_state = None

    def state_dict(self) -> dict[str, Any]:
        """The random state, the normalization statistics (evaluation and resume use the
        ones the run trained with, however statistics are computed later) and the listing
        the splits were drawn from (`check_checkpoint_data`)."""
        state: dict[str, Any] = {"random_state": self.random_state()}
        if self._stats is not None:
            state.update(mean=self._stats[0].tolist(), std=self._stats[1].tolist())
        if self.listing is not None:
            state[LISTING_KEY] = self.listing
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "random_state" in state_dict:
            self.load_random_state(state_dict["random_state"])

    @property
    def info(self) -> SourceInfo:
        return self.source.info()

    @property
    def in_channels(self) -> int:
        return self.info.channels

    def prepare_data(self) -> None:
        self.source.prepare()

    def training_images(self) -> Tensor:
        """The uint8 training images (N, C, H, W), once `setup` has loaded them."""
        raise NotImplementedError

    def input_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of what the model is fed: the images at `image_size`."""
        sample = to_model_input(self.training_images()[:1], self.image_size)
        channels, height, width = sample.shape[1:]
        return channels, height, width


class ImageClassificationDataModule(SourceDataModule):
    """Seeded train/val/test splits of any registered source, served as in-memory batches."""

    def __init__(
        self,
        dataset: str = "digits",
        root: str | None = None,
        download: bool = False,
        options: dict[str, Any] | None = None,
        image_size: int | None = None,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        samples_per_class: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        classes: list[int] | None = None,
        targets: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        # The config values it was built from (`data.*`), for comparing runs' data
        # (`posttrain.data.splits`): e.g. a distillation teacher's stored config with this run's.
        self.dataset, self.root = dataset, root
        self.settings: dict[str, Any] = {
            "dataset": dataset, "root": root, "options": options, "image_size": image_size,
            "classes": classes, "seed": seed, "val_fraction": val_fraction,
            "test_fraction": test_fraction, "samples_per_class": samples_per_class,
        }  # fmt: skip
        require_count("data.batch_size", batch_size, 1)
        require_count("data.eval_batch_size", eval_batch_size, 1, allow_none=True)
        require_count("data.image_size", image_size, 1, allow_none=True)
        require_count("data.samples_per_class", samples_per_class, 1, allow_none=True)
        require_fraction("data.val_fraction", val_fraction)
        require_fraction("data.test_fraction", test_fraction)
        require_count("data.seed", seed, 0)  # `abc` failed in torch's manual_seed at set-up
        require(
            isinstance(num_workers, int) and num_workers >= 0,
            f"Config key `data.num_workers` must be 0 or more, got {num_workers!r}.",
        )
        self.source = make_source(dataset, root, download, dict(options or {}))
        self.classes = self.check_classes(classes)
        self.tasks = parse_tasks(dict(targets)) if targets else None
        if self.tasks is not None and self.classes is not None:
            check_tasks_vary(self.tasks, self.class_ids(torch.arange(len(self.classes))))
        self.task_targets: dict[str, dict[str, Tensor]] = {}
        self.image_size = image_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.samples_per_class = samples_per_class
        self.num_workers, self.seed = num_workers, seed
        self.train_transforms: list[BatchTransform] = []
        self.splits: dict[str, LabelledImages] = {}
        self.left_out: LabelledImages | None = None  # training rows `samples_per_class` left out
        self._unlabelled: Tensor | None = None
        self.class_names: list[str] = []
        self._stats: tuple[Tensor, Tensor] | None = None

    def check_classes(self, classes: list[int] | None) -> list[int] | None:
        if classes is None:
            return None
        total = self.source.info().num_classes
        chosen = list(classes)
        require(
            len(chosen) >= 2
            and len(set(chosen)) == len(chosen)
            and all(isinstance(c, int) and 0 <= c < total for c in chosen),
            f"Config key `data.classes` must list at least 2 distinct class indices in "
            f"[0, {total - 1}], got {classes!r}.",
        )
        return chosen

    def class_ids(self, labels: Tensor) -> ClassIds:
        """`labels` (kept-class indices) with the source's class ids they stand for, which
        derived targets (`parity`, `large`) are functions of."""
        source_ids = labels if self.classes is None else torch.tensor(self.classes)[labels]
        return ClassIds(labels, source_ids, self.info.num_classes)

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes is not None else self.info.num_classes

    def setup(self, stage: str | None = None) -> None:
        """Splits and subsets are chosen on labels; file images are decoded afterwards, only
        those the splits keep (`data.classes`, `data.samples_per_class` decode less)."""
        if self.splits:
            return
        loaded, self.listing = self.read_listing()
        generator = torch.Generator().manual_seed(self.seed)
        pool, val, test = loaded.train, loaded.val, loaded.test
        class_names = loaded.class_names
        if self.classes is not None:
            pool, val, test = (keep_classes(part, self.classes) for part in (pool, val, test))
            class_names = [class_names[c] for c in self.classes]
        if test is None:
            keep, held = stratified_split(pool.labels, self.test_fraction, generator)
            pool, test = pool.subset(keep), pool.subset(held)
        if val is None:  # the source's own val split (e.g. a val/ folder) is used as it is
            keep, held = stratified_split(pool.labels, self.val_fraction, generator)
            pool, val = pool.subset(keep), pool.subset(held)
        check_classes_are_trained({"val": val, "test": test}, pool, self.source)
        train = pool
        if self.samples_per_class is not None:
            check_samples_per_class(pool.labels, self.samples_per_class, class_names)
            kept = per_class_subset(pool.labels, self.samples_per_class, generator)
            train = pool.subset(kept)
            left_out = torch.ones(len(pool), dtype=torch.bool)
            left_out[kept] = False
            self.left_out = pool.subset(left_out.nonzero().flatten())
        self.splits = {"train": train, "val": val, "test": test}
        self.check_splits_not_empty()
        self.splits = decode_kept(self.splits)  # only now: the files the splits keep
        train = self.splits["train"]
        if self.tasks is not None:
            self.task_targets = {
                split: derive_targets(
                    self.class_ids(data.labels),
                    self.tasks,
                    generator,
                    apply_missing=split == "train",
                )
                for split, data in self.splits.items()
            }
        self.class_names = class_names
        self._stats = channel_stats(train.images, self.image_size, generator)

    def unlabelled_images(self) -> Tensor:
        """The training images `data.samples_per_class` left out, uint8 (N, C, H, W), without
        their labels (a method that uses them cannot read a label by mistake). Decoded on first
        use: most runs never ask. Empty when every training image is labelled."""
        if self._unlabelled is None:
            left_out = self.left_out
            if left_out is None or len(left_out) == 0:
                train = self.splits["train"].images
                self._unlabelled = train.new_empty((0, *train.shape[1:]))
            else:
                self._unlabelled = decode_kept({"left_out": left_out})["left_out"].images
            self.left_out = None  # the labels go with it
        return self._unlabelled

    def check_splits_not_empty(self) -> None:
        """At set-up, before any training: an empty test split used to fail only after the
        whole training had run."""
        for split, data in self.splits.items():
            key = {"train": "data.samples_per_class", "val": "data.val_fraction"}.get(
                split, "data.test_fraction"
            )
            require(
                len(data) > 0,
                f"The {split} split is empty (`{key}` leaves it no images): raise "
                "`data.val_fraction`/`data.test_fraction` above 0 (e.g. 0.1), or use more data.",
            )

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        dataset = InMemoryDataset(self.splits[split], self.task_targets.get(split))
        return DataLoader(
            dataset,
            batch_size=self.batch_size if split == "train" else self.eval_batch_size,
            shuffle=shuffle,
            sampler=None if split == "train" else evaluation_sampler(dataset, split),
            generator=self.train_generator() if split == "train" else evaluation_generator(),
            collate_fn=keep_batch,
            num_workers=self.num_workers,
            # Not persistent: a persistent iterator draws its workers' base seed from the
            # training generator once, at the first epoch, and a resumed run's first epoch
            # drew it again, so every later batch order differed from the uninterrupted run's.
            # A new iterator each epoch draws what `num_workers=0` draws, so the batches are
            # the same for any `data.num_workers` (which a resume may change).
            persistent_workers=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def _is_training(self) -> bool:
        trainer = getattr(self, "trainer", None)
        return bool(trainer is not None and trainer.training)

    def to_model_input(self, images: Tensor) -> Tensor:
        return to_model_input(images, self.image_size)

    def training_images(self) -> Tensor:
        return self.splits["train"].images

    def normalize(self, x: Tensor) -> Tensor:
        assert self._stats is not None, "setup() computes the normalization statistics"
        return normalize(x, self._stats)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> tuple[Tensor, Tensor]:
        images, labels = batch
        if self._is_training():
            return self.training_input(images, labels)
        return self.normalize(self.to_model_input(images)), labels

    def training_input(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """uint8 images -> a training batch: resized, through the `reg=` transforms (which may
        mix the labels), normalized. The one recipe for every training image, labelled or
        not (distillation's transfer set)."""
        x = self.to_model_input(images)
        for transform in self.train_transforms:
            x, labels = transform(x, labels)
        return self.normalize(x), labels

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if "mean" in state_dict:
            self._stats = (torch.tensor(state_dict["mean"]), torch.tensor(state_dict["std"]))
