"""Few-shot episodes: N-way K-shot tasks over disjoint class splits of any labelled source.

Classes, not images, are split into meta-train / meta-val / meta-test (a source with its own
test pool, like Omniglot's evaluation alphabets, gives meta-test its classes). An episode
draws `ways` classes of one split and `shots + queries` images of each; labels inside an
episode are 0..ways-1. Validation and test use a fixed, seeded list of episodes, so numbers
compare from run to run; training episodes come from a seeded stream. Batches are
(support images, support labels, query images, query labels) with a leading meta-batch
dimension, resized and normalized on the device like every other DataModule.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from posttrain.data.datamodule import (
    SourceDataModule,
    by_rank,
    evaluation_generator,
    evaluation_sampler,
    process_group,
    process_seed,
)
from posttrain.data.sources import SOURCES, LabelledImages, SourceData, make_source
from posttrain.data.transforms import channel_stats, normalize, to_model_input
from posttrain.errors import (
    require,
    require_bool,
    require_count,
    require_fraction,
)

Episode = tuple[Tensor, Tensor, Tensor, Tensor]
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}  # stable per-split seeds (str hash is salted)


def with_split(dataset: str, options: dict[str, Any] | None, split: str | None) -> dict:
    """The source options plus `data.split` (a named class protocol) for sources that have
    named protocols (Omniglot); refused for the others, which split by fractions."""
    merged = dict(options or {})
    if split is None:
        return merged
    import inspect

    source_class = SOURCES.get(dataset)
    require(
        source_class is not None and "split" in inspect.signature(source_class).parameters,
        f"Config key `data.split={split}` names a class protocol, which `data.dataset="
        f"{dataset}` does not have (it splits classes by `data.val_fraction`/"
        "`data.test_fraction`); set `data.split=null`.",
    )
    return {**merged, "split": split}


def with_rotations(data: LabelledImages) -> LabelledImages:
    """Each class rotated by 0/90/180/270 degrees becomes 4 classes (the Omniglot protocol)."""
    images = torch.cat([torch.rot90(data.images, k, dims=(-2, -1)) for k in range(4)])
    labels = torch.cat([data.labels * 4 + k for k in range(4)])
    return LabelledImages(images, labels)


def rotated_ids(classes: Tensor) -> Tensor:
    """The ids `with_rotations` gives the four rotations of each of `classes`."""
    return (classes[:, None] * 4 + torch.arange(4)).flatten()


def split_classes(
    classes: Tensor, fractions: tuple[float, float], generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """Shuffle class ids and cut them into (train, val, test) by the val/test fractions."""
    shuffled = classes[torch.randperm(len(classes), generator=generator)]
    n_val, n_test = (round(f * len(classes)) for f in fractions)
    return shuffled[n_val + n_test :], shuffled[:n_val], shuffled[n_val : n_val + n_test]


class ClassPool:
    """The images of a set of classes, indexed per class for fast episode sampling."""

    def __init__(self, data: LabelledImages, classes: Tensor) -> None:
        self.images = data.images
        self.classes = classes.sort().values
        self.members = [(data.labels == c).nonzero().flatten() for c in self.classes]

    def __len__(self) -> int:
        return len(self.classes)

    def sample(self, count: int, generator: torch.Generator) -> Tensor:
        """Up to `count` seeded images of the pool's classes (no copy of the rest)."""
        members = torch.cat(self.members) if self.members else torch.empty(0, dtype=torch.long)
        return self.images[members[torch.randperm(len(members), generator=generator)[:count]]]

    def episode(self, ways: int, shots: int, queries: int, generator: torch.Generator) -> Episode:
        chosen = torch.randperm(len(self.classes), generator=generator)[:ways]
        support, query = [], []
        for position in chosen.tolist():
            members = self.members[position]
            picked = members[torch.randperm(len(members), generator=generator)[: shots + queries]]
            support.append(picked[:shots])
            query.append(picked[shots:])
        support_labels = torch.arange(ways).repeat_interleave(shots)
        query_labels = torch.arange(ways).repeat_interleave(queries)
        return (
            self.images[torch.cat(support)],
            support_labels,
            self.images[torch.cat(query)],
            query_labels,
        )


class EpisodeStream(Dataset):
    """`length` episodes of one split; fixed (seeded by index) or a seeded random stream.

    The random stream is the process's own under DDP (`rank`): seeded alike, every rank drew
    the same training episodes, so N processes trained on N copies of each. Rank 0 (and a
    single process) keeps the seed itself, so single-process runs draw what they always did.
    """

    def __init__(
        self,
        pool: ClassPool,
        shape: tuple[int, int, int],
        length: int,
        seed: int,
        fixed: bool,
        rank: int = 0,
    ) -> None:
        self.pool, self.shape, self.length, self.seed, self.fixed = pool, shape, length, seed, fixed
        self.stream = torch.Generator().manual_seed(process_seed(seed, rank))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Episode:
        generator = (
            torch.Generator().manual_seed(self.seed * 1_000_003 + index)
            if self.fixed
            else self.stream
        )
        return self.pool.episode(*self.shape, generator=generator)


def stack_episodes(episodes: list[Episode]) -> Episode:
    """Collate episodes into a meta-batch: every tensor gains a leading task dimension."""
    return tuple(torch.stack(parts) for parts in zip(*episodes, strict=True))  # type: ignore[return-value]


def too_few_classes_advice(stage: str | None) -> str:
    """What may change: an evaluation tests on its checkpoint's own class split (eval.py
    refuses `data.rotations` and the class fractions), so only the episode shape is left."""
    if stage == "test":
        return (
            "Lower `data.ways`, `data.shots` or `data.queries`: the class split is the "
            "checkpoint's own and cannot change at evaluation."
        )
    return "Lower them, use `data.rotations=true`, or change the class fractions."


class EpisodicDataModule(SourceDataModule):
    """N-way K-shot episodes (`ways`, `shots`, `queries`) from any registered source."""

    def __init__(
        self,
        dataset: str = "digits",
        root: str | None = None,
        download: bool = False,
        options: dict[str, Any] | None = None,
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
        train_ways: int | None = None,
        meta_batch_size: int = 4,
        train_episodes: int = 200,
        val_episodes: int = 100,
        test_episodes: int = 600,
        val_fraction: float = 0.2,
        test_fraction: float = 0.3,
        rotations: bool = False,
        image_size: int | None = None,
        seed: int = 0,
        split: str | None = None,
    ) -> None:
        super().__init__()
        for key, value in [
            ("ways", ways),
            ("shots", shots),
            ("queries", queries),
            ("meta_batch_size", meta_batch_size),
            ("train_episodes", train_episodes),
            ("val_episodes", val_episodes),
            ("test_episodes", test_episodes),
        ]:
            require_count(f"data.{key}", value, 1)
        require_count("data.train_ways", train_ways, 1, allow_none=True)
        require_count("data.image_size", image_size, 1, allow_none=True)
        require_fraction("data.val_fraction", val_fraction)
        require_fraction("data.test_fraction", test_fraction)
        require_count("data.seed", seed, 0)
        require_bool("data.rotations", rotations)  # `rotations=no` is a truthy string: rotated
        self.source = make_source(dataset, root, download, with_split(dataset, options, split))
        self.dataset, self.root = dataset, root
        self.ways, self.shots, self.queries = ways, shots, queries
        self.train_ways = train_ways or ways
        self.meta_batch_size = meta_batch_size
        self.lengths = {"train": train_episodes, "val": val_episodes, "test": test_episodes}
        self.fractions = (val_fraction, test_fraction)
        self.rotations, self.image_size, self.seed = rotations, image_size, seed
        self.pools: dict[str, ClassPool] = {}
        self.train_transforms: list[Any] = []  # stays empty: methods refuse batch transforms
        self._stats: tuple[Tensor, Tensor] | None = None
        self._stored_stats: tuple[Tensor, Tensor] | None = None  # from a checkpoint
        self._stats_from_whole_pool = False  # a checkpoint written before stats were stored
        self._whole_pool: tuple[Tensor, Tensor] | None = None  # (images, generator state)

    @property
    def num_classes(self) -> int:
        """What a model head must predict: the classes of one (training) episode."""
        return self.train_ways

    def setup(self, stage: str | None = None) -> None:
        if not self.pools:
            listed, self.listing = self.read_listing()
            loaded = listed.decoded()
            generator = torch.Generator().manual_seed(self.seed)
            pool = self.build_pools(loaded, generator)
            self._whole_pool = (pool.images, generator.get_state())
            self._stats = self.training_stats(generator)
        self.check_pools(stage)

    def training_stats(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Normalization statistics from meta-training images only: meta-val and meta-test
        classes are the unseen tasks, and their pixels must not shape the input of training.
        (Before, the mean/std came from the whole pool, meta-test classes included.) A
        checkpoint's own statistics win (`load_state_dict`)."""
        if self._stored_stats is not None:
            return self._stored_stats
        if self._stats_from_whole_pool:
            return self.whole_pool_stats()
        sample = self.pools["train"].sample(2048, generator)
        return channel_stats(sample, self.image_size, generator)

    def whole_pool_stats(self) -> tuple[Tensor, Tensor]:
        """The statistics a checkpoint written before they were stored trained with (over the
        whole pool, drawn from the same generator state), so it evaluates and resumes on
        the inputs it was trained on."""
        assert self._whole_pool is not None, "setup() builds the pools first"
        images, state = self._whole_pool
        return channel_stats(images, self.image_size, torch.Generator().set_state(state))

    def training_images(self) -> Tensor:
        assert self._whole_pool is not None, "setup() builds the pools first"
        return self._whole_pool[0]

    def check_pools(self, stage: str | None) -> None:
        """Only the splits this stage uses: evaluating 20-way needs 20 test classes, not 20
        meta-validation classes."""
        used = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}
        for split in used.get(stage or "", tuple(self.pools)):
            split_pool = self.pools[split]
            ways = self.train_ways if split == "train" else self.ways
            smallest = min(len(m) for m in split_pool.members) if len(split_pool) else 0
            require(
                len(split_pool) >= ways and smallest >= self.shots + self.queries,
                f"The meta-{split} split has {len(split_pool)} classes (fewest images per class: "
                f"{smallest}); a {ways}-way episode with `data.shots`+`data.queries`="
                f"{self.shots + self.queries} needs at least {ways} classes with that many "
                f"images. {too_few_classes_advice(stage)}",
            )

    def build_pools(self, loaded: SourceData, generator: torch.Generator) -> LabelledImages:
        """`self.pools` by the source's own class assignment if it has one (Omniglot's named
        protocols), else by class fractions; returns the whole pool, which statistics came
        from before they were meta-training only (`whole_pool_stats`, older checkpoints)."""
        if loaded.class_splits is None:
            return self.fraction_class_splits(loaded, generator)
        pool, ids = self.named_class_splits(loaded, generator)
        self.pools = {split: ClassPool(pool, ids[split]) for split in SPLIT_IDS}
        return pool

    def named_class_splits(
        self, loaded: SourceData, generator: torch.Generator
    ) -> tuple[LabelledImages, dict[str, Tensor]]:
        """The source's classes per split, rotated after splitting, so that all rotations of
        a class (an Omniglot character) land in one split; a missing meta-val is drawn from
        meta-train by class with `data.val_fraction`."""
        assert loaded.class_splits is not None
        pool = loaded.train
        if loaded.test is not None:
            pool = LabelledImages(
                torch.cat([pool.images, loaded.test.images]),
                torch.cat([pool.labels, loaded.test.labels]),
            )
        ids = {k: torch.as_tensor(v, dtype=torch.long) for k, v in loaded.class_splits.items()}
        if "val" not in ids:
            ids["train"], ids["val"], _ = split_classes(
                ids["train"], (self.fractions[0], 0.0), generator
            )
        if self.rotations:
            pool = with_rotations(pool)
            ids = {k: rotated_ids(v) for k, v in ids.items()}
        return pool, ids

    def fraction_class_splits(
        self, loaded: SourceData, generator: torch.Generator
    ) -> LabelledImages:
        """Classes cut into meta-train/val/test by `data.val_fraction`/`data.test_fraction`
        (a source's own test pool gives meta-test its classes), rotated after the cut as the
        named protocols are: a class's four rotations are one shape, in one split."""
        require(
            loaded.val is None
            and (
                loaded.test is None
                or not set(loaded.test.labels.tolist()) & set(loaded.train.labels.tolist())
            ),
            "Episodes split classes, not images, but this data's split folders (train/ and "
            "val/ or test/) hold the same classes. Point `data.root` at one folder of classes.",
        )
        pool, test = loaded.train, loaded.test
        if test is None:
            train_ids, val_ids, test_ids = split_classes(
                pool.labels.unique(), self.fractions, generator
            )
        else:
            train_ids, val_ids, _ = split_classes(
                pool.labels.unique(), (self.fractions[0], 0.0), generator
            )
            test_ids = test.labels.unique()
        ids = {"train": train_ids, "val": val_ids, "test": test_ids}
        if self.rotations:  # after splitting: a class's rotations stay in its split
            pool = with_rotations(pool)
            test = with_rotations(test) if test is not None else None
            ids = {k: rotated_ids(v) for k, v in ids.items()}
        test = pool if test is None else test
        self.pools = {
            "train": ClassPool(pool, ids["train"]),
            "val": ClassPool(pool, ids["val"]),
            "test": ClassPool(test, ids["test"]),
        }
        return pool

    def _loader(self, split: str) -> DataLoader:
        ways = self.train_ways if split == "train" else self.ways
        stream = EpisodeStream(
            self.pools[split],
            (ways, self.shots, self.queries),
            self.lengths[split],
            seed=self.seed * 10 + SPLIT_IDS[split],
            fixed=split != "train",
            rank=process_group()[0],
        )
        generator = evaluation_generator()
        if split == "train":
            # One stream of training episodes per run, however many loaders are asked for (a
            # set-up check builds one before Lightning does; a resume restored the first).
            previous = getattr(self, "train_stream", None)
            if previous is not None:
                stream.stream.set_state(previous.stream.get_state())
            self.train_stream = stream  # before the generator: a pending resume restores both
            generator = self.train_generator()
        sampler = None if split == "train" else evaluation_sampler(stream, split, "episodes")
        return DataLoader(
            stream,
            batch_size=self.meta_batch_size,
            collate_fn=stack_episodes,
            sampler=sampler,
            generator=generator,
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if "mean" in state_dict:
            self._stored_stats = (torch.tensor(state_dict["mean"]), torch.tensor(state_dict["std"]))
        else:  # a checkpoint from before statistics were stored: the ones it trained with
            self._stats_from_whole_pool = True
        if self._whole_pool is not None:  # set up already (Lightning restores after setup)
            self._stats = self._stored_stats or self.whole_pool_stats()

    def random_state(self) -> dict[str, Any]:
        """Also where the training episode stream is, for exact resume: rank 0's as
        `episodes`, and under DDP every rank's as `episodes_by_rank`."""
        stream = getattr(self, "train_stream", None)
        states = by_rank(None if stream is None else stream.stream.get_state())
        ranks = {"episodes_by_rank": states} if len(states) > 1 else {}
        return {**super().random_state(), "episodes": states[0], **ranks}

    def apply_pending_random_state(self) -> None:
        """Each rank continues its own stream; a rank the checkpoint has no state for (it
        ran on fewer processes) keeps its freshly seeded one rather than copy rank 0's."""
        state, stream = self._pending_random_state, getattr(self, "train_stream", None)
        if state is not None and stream is not None:
            rank = process_group()[0]
            states = state.get("episodes_by_rank") or [state.get("episodes")]
            if rank < len(states) and states[rank] is not None:
                stream.stream.set_state(states[rank])
        super().apply_pending_random_state()

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Episode:
        assert self._stats is not None, "setup() computes the normalization statistics"
        support, support_labels, query, query_labels = batch

        def prepare(images: Tensor) -> Tensor:
            return normalize(to_model_input(images, self.image_size), self._stats)

        return prepare(support), support_labels, prepare(query), query_labels
