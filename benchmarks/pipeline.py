"""Input pipeline: the seed's per-sample PIL DataLoader vs posttrain's in-memory batches.

Both serve the same generated CIFAR-10 (real pickle format, 32x32) in batches of 32, ready
for the model (normalized float tensors), with no model attached:

- `seed`: torchvision `CIFAR10` + `ToTensor` + `Normalize` per sample, `DataLoader`
  (`--workers`, 0 as in the seed); `seed + crop/flip` adds `RandomCrop(32, 4)` and
  `RandomHorizontalFlip` per sample;
- `posttrain`: `ImageClassificationDataModule` (uint8 tensor in memory, whole-batch slicing,
  scaling and normalization per batch); `posttrain + crop/flip` adds `reg=augment` with
  `flip=true` (per-image random shift + flip, vectorized over the batch).

Variants alternate within each round; prints images/s and ratios, writes
benchmarks/results/pipeline.json.

    python -m benchmarks.pipeline [--rounds 5] [--batches 200]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

from benchmarks.common import bench_command, generated_cifar, write_result
from benchmarks.seed_loop import pil_batches
from posttrain.data import ImageClassificationDataModule
from posttrain.regularizers.augment import Augment

BatchSource = Callable[[], Iterator]


def posttrain_batches(root: Path, batch_size: int, augment: bool) -> Iterator:
    """Batches exactly as the Trainer receives them (dataloader + `on_after_batch_transfer`)."""
    datamodule = ImageClassificationDataModule(
        dataset="cifar", root=str(root), batch_size=batch_size, test_fraction=0.0
    )
    if augment:
        transform = Augment(policy="basic", flip=True).batch_transform(datamodule.num_classes)
        datamodule.train_transforms.append(transform)
    datamodule.setup("fit")
    datamodule.trainer = SimpleNamespace(training=True)  # train-time transforms apply
    while True:
        for batch in datamodule.train_dataloader():
            yield datamodule.on_after_batch_transfer(batch, 0)


def images_per_s(batches: Iterator, count: int) -> float:
    next(batches)  # first batch: worker start-up and lazy set-up are not throughput
    start, images = time.perf_counter(), 0
    for _ in range(count):
        images += len(next(batches)[0])
    return images / (time.perf_counter() - start)


def variants(root: Path, batch_size: int, workers: int) -> dict[str, BatchSource]:
    return {
        "seed": lambda: pil_batches(str(root), batch_size, workers=workers),
        "posttrain": lambda: posttrain_batches(root, batch_size, augment=False),
        "seed + crop/flip": lambda: pil_batches(str(root), batch_size, True, workers=workers),
        "posttrain + crop/flip": lambda: posttrain_batches(root, batch_size, augment=True),
    }


def markdown_table(result: dict) -> str:
    """The README table: median images/s per pipeline, posttrain's rows with their ratio to
    the seed's pipeline doing the same work."""
    median, ratios = result["median"], result["ratios"]
    ratio_of = {
        "posttrain": ratios["posttrain / seed"],
        "posttrain + crop/flip": ratios["posttrain + crop/flip / seed + crop/flip"],
    }
    lines = ["| pipeline | images/s (median) | × the seed's |", "|---|---|---|"]
    for name, value in median.items():
        ratio = f"{ratio_of[name]:.1f}×" if name in ratio_of else ""
        lines.append(f"| {name} | {value:,.0f} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0, help="the seed DataLoader's workers")
    args = parser.parse_args(argv)
    rounds: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = generated_cifar(Path(tmp), train_images=10_000)
        sources = variants(root, args.batch_size, args.workers)
        for index in range(args.rounds):
            names = list(sources)[index % 2 :] + list(sources)[: index % 2]
            rounds.append({name: images_per_s(sources[name](), args.batches) for name in names})
            print(f"round {index + 1}: " + ", ".join(f"{k} {v:.0f}" for k, v in rounds[-1].items()))
    median = {name: statistics.median(r[name] for r in rounds) for name in rounds[0]}
    ratios = {
        "posttrain / seed": median["posttrain"] / median["seed"],
        "posttrain + crop/flip / seed + crop/flip": (
            median["posttrain + crop/flip"] / median["seed + crop/flip"]
        ),
    }
    print(f"\n{f'pipeline (batch {args.batch_size})':<24} {'images/s (median)':>18}")
    for name, value in median.items():
        print(f"{name:<24} {value:>18.0f}")
    for name, value in ratios.items():
        print(f"{name}: {value:.1f}x")
    payload = {**vars(args), "images_per_s": rounds, "median": median, "ratios": ratios}
    print(f"\nwrote {write_result('pipeline', bench_command('pipeline', argv), payload)}")


if __name__ == "__main__":
    main()
