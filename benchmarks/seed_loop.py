"""The seed's hand-written training loop (../shared/seed/), the reference posttrain must match.

Verbatim in substance: torchvision model with a new `fc`, CrossEntropyLoss, SGD(lr=0.001,
momentum=0.9), zero_grad / forward / backward / step, `loss.item()` every step. Two inputs:

- `--pipeline pil`: the seed's own pipeline, torchvision `CIFAR10` decoding every image to PIL
  and running `ToTensor` + `Normalize` per sample in a `DataLoader`;
- `--pipeline memory`: the same images decoded once into one normalized float tensor and
  sliced per batch: the fastest a hand-written loop gets, so the overhead ratio is honest.

Times the steps after `--warmup` exactly as `benchmarks.probe.BenchProbe` does inside
`python train.py`, and prints one JSON line.

    python -m benchmarks.seed_loop --root <folder holding cifar-10-batches-py> --steps 40
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from typing import ClassVar

import torch
import torchvision
from torch import Tensor, nn
from torchvision import transforms
from torchvision.datasets import CIFAR10

from benchmarks.common import memory_mib


class GeneratedCIFAR10(CIFAR10):
    """torchvision's CIFAR10 reading a generated copy: the official checksums cannot match,
    so files are only required to exist (md5 None)."""

    train_list: ClassVar = [[name, None] for name, _ in CIFAR10.train_list]
    test_list: ClassVar = [[name, None] for name, _ in CIFAR10.test_list]
    meta: ClassVar = {**CIFAR10.meta, "md5": None}


def seed_transform(augment: bool) -> transforms.Compose:
    """The seed's per-sample transforms (at CIFAR's native 32x32), optionally with crop+flip."""
    steps = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
    return transforms.Compose(
        [
            *(steps if augment else []),
            transforms.ToTensor(),
            transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        ]
    )


def pil_batches(
    root: str, batch_size: int, augment: bool = False, workers: int = 0
) -> Iterator[tuple]:
    """The seed's DataLoader (no workers, as written), epoch after epoch."""
    dataset = GeneratedCIFAR10(root, transform=seed_transform(augment))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=workers
    )
    while True:
        yield from loader


def memory_batches(root: str, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """All images normalized once, then shuffled slices of one tensor."""
    dataset = GeneratedCIFAR10(root)
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).float().div(255)
    mean, std = images.mean((0, 2, 3), keepdim=True), images.std((0, 2, 3), keepdim=True)
    images, labels = (images - mean) / std, torch.tensor(dataset.targets)
    while True:
        for index in torch.randperm(len(images)).split(batch_size):
            yield images[index], labels[index]


def seed_model(arch: str, classes: int = 10) -> nn.Module:
    """The seed's `models.resnet50()` with a new `fc`; other archs from posttrain's builder."""
    if arch.startswith("resnet"):
        model = getattr(torchvision.models, arch)()
        model.fc = nn.Linear(model.fc.in_features, classes)
        return model
    from posttrain.models import build_classifier

    return build_classifier(arch, num_classes=classes, in_channels=3)


def timed_training(model: nn.Module, batches: Iterator, warmup: int, steps: int) -> dict:
    """The seed's loop body; the clock runs over `steps` steps after `warmup` steps."""
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    model.train()
    running_loss, images, start, first_step_wall = 0.0, 0, 0.0, 0.0
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        inputs, labels = next(batches)
        first_step_wall = first_step_wall or time.time()
        optimizer.zero_grad()
        loss = criterion(model(inputs), labels)
        loss.backward()
        optimizer.step()
        running_loss += loss.item()
        images += len(inputs) if step >= warmup else 0
    seconds = time.perf_counter() - start
    return {
        "timed_steps": steps,
        "timed_images": images,
        "seconds": seconds,
        "images_per_s": images / seconds,
        "first_step_wall": first_step_wall,
        "peak_rss_mib": memory_mib()["peak"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--pipeline", choices=("pil", "memory"), default="memory")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    if args.pipeline == "pil":
        batches = pil_batches(args.root, args.batch_size)
    else:
        batches = memory_batches(args.root, args.batch_size)
    result = timed_training(seed_model(args.arch), batches, args.warmup, args.steps)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
