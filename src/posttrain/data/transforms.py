"""Batch-level image transforms shared by every DataModule: uint8 -> sized float -> normalized."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F


def to_model_input(images: Tensor, image_size: int | None) -> Tensor:
    """uint8 (..., C, H, W) -> float in [0, 1], resized to `image_size` (bilinear, antialiased)."""
    x = images.float().div(255)
    if image_size is None or tuple(x.shape[-2:]) == (image_size, image_size):
        return x
    leading = x.shape[:-3]
    flat = x.reshape(-1, *x.shape[-3:])
    flat = F.interpolate(
        flat, size=image_size, mode="bilinear", align_corners=False, antialias=True
    )
    return flat.reshape(*leading, *flat.shape[-3:])


def channel_stats(
    images: Tensor, image_size: int | None, generator: torch.Generator, sample: int = 2048
) -> tuple[Tensor, Tensor]:
    """Per-channel mean/std of model inputs (after resizing), from a seeded sample."""
    chosen = torch.randperm(len(images), generator=generator)[:sample]
    pixels = to_model_input(images[chosen], image_size).transpose(0, 1).flatten(1)
    return pixels.mean(1), pixels.std(1).clamp_min(1e-3)


def normalize(x: Tensor, stats: tuple[Tensor, Tensor]) -> Tensor:
    """Standardize channel-wise; `x` is (..., C, H, W)."""
    mean, std = (s.to(x.device).view(-1, 1, 1) for s in stats)
    return (x - mean) / std
