"""Decoded-image cache for the file-backed sources (ImageFolder, Omniglot).

Decoding is the slow part of a start (Omniglot: 32,460 PNGs; a CIFAR JPEG folder: 50,000
files), so the decoded, resized uint8 tensor (N, C, H, W) of a file listing is stored once in
`paths.cache_dir` and read back on the next start. An entry is keyed by

- the listing: every file's path, byte size and mtime (ns), in load order, so a
  changed, touched, added, removed or renamed file gives another key;
- the decode options: channels, requested size (or "the data's own"), and `FORMAT`, which
  names the decode/resize recipe (bump it when `decode_file` changes).

File name: `<name>-<hash of name, root, options>-<hash of listing>.pt`. Writing an entry
removes the older entries with the same first two parts (same data and options, an older
listing), so editing a dataset does not pile up stale copies; other options keep theirs.

Entries are written atomically (`write_atomically`: staged, fsynced, renamed) and read with
`torch.load(weights_only=True)`; an entry that does not load or does not match its listing
(count, channels, dtype) is logged, ignored and rebuilt. A cache folder that cannot be
written only costs the next start a decode: never a crash.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger("posttrain")

FORMAT = "pil-convert/pil_to_tensor/resize-bilinear-antialias/v1"
# When images differ in size and `data.options.size` is not set, they are resized to this.
DEFAULT_SIZE = 64


def _digest(payload: object, length: int) -> str:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def listing_of(files: Sequence[str | Path]) -> list[tuple[str, int, int]]:
    """(path, bytes, mtime in ns) of every file, in order: what an entry depends on. Paths
    as listed under the source's root (whose resolved path is part of the entry's name)."""
    rows = []
    for path in files:
        stat = os.stat(path)
        rows.append((str(path), stat.st_size, stat.st_mtime_ns))
    return rows


def entry_path(
    cache_dir: Path,
    name: str,
    root: Path,
    options: dict[str, object],
    listing: list[tuple[str, int, int]],
) -> Path:
    family = _digest({"name": name, "root": str(root.resolve()), "format": FORMAT, **options}, 12)
    return cache_dir / f"{name}-{family}-{_digest(listing, 20)}.pt"


def _read_entry(path: Path, count: int, channels: int) -> Tensor | None:
    """The cached images, or None (logged) when the entry is missing, corrupt or inconsistent."""
    if not path.is_file():
        return None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a corrupt file fails in many ways (zip, pickle, EOF, ...)
        log.warning("Decoded-image cache entry %s is unreadable (%s); rebuilding it", path, error)
        return None
    images = loaded.get("images") if isinstance(loaded, dict) else None
    if not (
        isinstance(images, Tensor)
        and images.dtype == torch.uint8
        and images.ndim == 4
        and images.shape[0] == count
        and images.shape[1] == channels
    ):
        log.warning(
            "Decoded-image cache entry %s does not hold %d uint8 images of %d channel(s); "
            "rebuilding it",
            path,
            count,
            channels,
        )
        return None
    return images


def _write_entry(path: Path, images: Tensor) -> None:
    """Store `images` atomically and drop the entries this one supersedes; never raises."""
    from posttrain.checkpoints import write_atomically

    buffer = io.BytesIO()
    torch.save({"images": images.contiguous()}, buffer)
    try:
        write_atomically(buffer.getvalue(), path)
    except OSError as error:
        log.warning(
            "Could not write the decoded-image cache entry %s (%s); the next start decodes "
            "again. Set `paths.cache_dir` to a writable folder (or null to disable the cache).",
            path,
            error,
        )
        return
    family = path.name.rsplit("-", 1)[0]
    for stale in path.parent.glob(f"{family}-*.pt"):
        if stale != path:
            stale.unlink(missing_ok=True)


def _decode_all(
    files: Sequence[str | Path],
    decode: Callable[[str | Path, int, int | None], Tensor],
    channels: int,
    size: int | None,
) -> tuple[Tensor, str]:
    """Every file decoded, stacked; with `size` None, at the images' own size when they all
    share one (one pass: resized to DEFAULT_SIZE as soon as a second size shows up)."""
    from torchvision.transforms.v2 import functional as F

    if size is not None:
        return torch.stack([decode(p, channels, size) for p in files]), f"{size}x{size} (set)"
    images: list[Tensor] = []
    shared: tuple[int, int] | None = None
    target: int | None = None
    for path in files:
        image = decode(path, channels, target)
        if target is None:
            shape = (image.shape[-2], image.shape[-1])
            if shared is None:
                shared = shape
            elif shape != shared:
                log.info(
                    "Images differ in size (%s is %dx%d, %s %dx%d): all resized to %dx%d "
                    "(set `data.options.size` to choose)",
                    files[0],
                    shared[1],
                    shared[0],
                    path,
                    shape[1],
                    shape[0],
                    DEFAULT_SIZE,
                    DEFAULT_SIZE,
                )
                target = DEFAULT_SIZE
                size_pair = [DEFAULT_SIZE, DEFAULT_SIZE]
                images = [F.resize(x, size_pair, antialias=True) for x in images]
                image = F.resize(image, size_pair, antialias=True)
        images.append(image)
    stacked = torch.stack(images)
    height, width = stacked.shape[-2:]
    how = "default, sizes differ" if target is not None else "the images' own size"
    return stacked, f"{width}x{height} ({how})"


def decoded_images(
    files: Sequence[str | Path],
    decode: Callable[[str | Path, int, int | None], Tensor],
    channels: int,
    size: int | None,
    cache_dir: str | Path | None,
    name: str,
    root: Path,
) -> Tensor:
    """uint8 (len(files), channels, H, W): from the cache entry of this listing and these
    options if there is a valid one, else decoded with `decode(path, channels, size)` (size
    None: no resize) and stored. `name` and `root` only label and group entries."""
    start = time.perf_counter()
    if cache_dir is None:
        images, how = _decode_all(files, decode, channels, size)
        log.info(
            "%s: decoded %d images at %s in %.1fs (no cache: `paths.cache_dir` is null)",
            name,
            len(files),
            how,
            time.perf_counter() - start,
        )
        return images
    options = {"channels": channels, "size": size}
    path = entry_path(Path(str(cache_dir)), name, root, options, listing_of(files))
    images = _read_entry(path, len(files), channels)
    if images is not None:
        log.info(
            "%s: decoded-image cache hit, %d images at %dx%d read from %s in %.1fs",
            name,
            len(files),
            images.shape[-1],
            images.shape[-2],
            path,
            time.perf_counter() - start,
        )
        return images
    images, how = _decode_all(files, decode, channels, size)
    decoded = time.perf_counter() - start
    _write_entry(path, images)
    log.info(
        "%s: decoded-image cache miss, decoded %d images at %s in %.1fs, stored in %s",
        name,
        len(files),
        how,
        decoded,
        path,
    )
    return images
