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

Subsampling (`data.samples_per_class`, `data.classes`) picks its rows from the listing's
labels, before any decode (`ImageFiles.decoded(keep)`): a valid full entry is sliced (no
decode); without one only the kept files are decoded and stored as a *subset* entry,
`<name>-subset-<hash of name, root, options>-<hash of listing and kept rows>.pt`. Its name
and key differ from the full entry's, so a later full run never reads it as complete; it
serves only a run that keeps exactly those rows of exactly this listing (one subset entry is
kept per data and options: the latest). With the size left to the data (`size` None), the
sizes of all listed files are read from their headers (no decode) so a subset is decoded at
the size a full decode would choose: the same pixels, cache or not. A file a run does not
keep is never decoded, so a broken one goes unnoticed until a run keeps it (that run refuses
it in one paragraph); an empty class folder is refused by every run (labels come from it).

Entries are written atomically (`write_atomically`: staged, fsynced, renamed) and read with
`torch.load(weights_only=True)`; an entry that does not load or does not match its listing
(count, channels, dtype) is logged and ignored (decoded again and rewritten). A cache folder
that cannot be written only costs the next start a decode: never a crash.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger("posttrain")

# v2: 16-bit pixels scaled to 8 bits before `convert` (v1 clipped them at 255).
FORMAT = "16bit-scaled/pil-convert/pil_to_tensor/resize-bilinear-antialias/v2"
# When images differ in size and `data.options.size` is not set, they are resized to this.
DEFAULT_SIZE = 64

# decode(path, channels, size or None for the file's own size) -> uint8 (channels, H, W)
Decoder = Callable[[str | Path, int, int | None], Tensor]


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
    keep: list[int] | None = None,
) -> Path:
    """The full entry of `listing`, or with `keep` (row numbers) the subset entry of those rows."""
    if keep is not None:
        name = f"{name}-subset"
    family = _digest({"name": name, "root": str(root.resolve()), "format": FORMAT, **options}, 12)
    key = listing if keep is None else {"listing": listing, "keep": keep}
    return cache_dir / f"{name}-{family}-{_digest(key, 20)}.pt"


def _read_entry(path: Path, count: int, channels: int) -> Tensor | None:
    """The cached images, or None (logged) when the entry is missing, corrupt or inconsistent."""
    if not path.is_file():
        return None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a corrupt file fails in many ways (zip, pickle, EOF, ...)
        log.warning("Decoded-image cache entry %s is unreadable (%s); ignoring it", path, error)
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
            "ignoring it",
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


def _log_sizes_differ(
    first: str | Path, shared: tuple[int, int], other: str | Path, shape: tuple[int, int]
) -> None:
    log.info(
        "Images differ in size (%s is %dx%d, %s %dx%d): all resized to %dx%d "
        "(set `data.options.size` to choose)",
        first,
        shared[1],
        shared[0],
        other,
        shape[1],
        shape[0],
        DEFAULT_SIZE,
        DEFAULT_SIZE,
    )


def _decode_all(
    files: Sequence[str | Path],
    decode: Decoder,
    channels: int,
    size: int | None,
    why: str = "set",
) -> tuple[Tensor, str]:
    """Every file decoded, stacked; with `size` None, at the images' own size when they all
    share one (one pass: resized to DEFAULT_SIZE as soon as a second size shows up)."""
    from torchvision.transforms.v2 import functional as F

    if size is not None:
        return torch.stack([decode(p, channels, size) for p in files]), f"{size}x{size} ({why})"
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
                _log_sizes_differ(files[0], shared, path, shape)
                target = DEFAULT_SIZE
                size_pair = [DEFAULT_SIZE, DEFAULT_SIZE]
                images = [F.resize(x, size_pair, antialias=True) for x in images]
                image = F.resize(image, size_pair, antialias=True)
        images.append(image)
    stacked = torch.stack(images)
    height, width = stacked.shape[-2:]
    how = "default, sizes differ" if target is not None else "the images' own size"
    return stacked, f"{width}x{height} ({how})"


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (they carry the size); C4, C8 and CC are other segments.
JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
HEADER_BYTES = 1 << 16  # enough for the EXIF block that may precede a JPEG's frame header


def png_shape(head: bytes) -> tuple[int, int] | None:
    """(height, width) from a PNG's IHDR chunk, or None when `head` is not a PNG's start."""
    if not (head.startswith(PNG_SIGNATURE) and head[12:16] == b"IHDR" and len(head) >= 24):
        return None
    width, height = struct.unpack_from(">II", head, 16)
    return height, width


def jpeg_shape(head: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG's frame header, walking the marker segments before it;
    None when `head` is not a JPEG's start or ends before the frame header."""
    if not head.startswith(b"\xff\xd8"):
        return None
    at = 2
    while at + 9 <= len(head) and head[at] == 0xFF:
        marker = head[at + 1]
        if marker in JPEG_FRAMES:
            height, width = struct.unpack_from(">HH", head, at + 5)
            return height, width
        if marker == 0xFF:  # fill byte
            at += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            at += 2
        else:
            at += 2 + struct.unpack_from(">H", head, at + 2)[0]
    return None


def header_shape(path: str | Path) -> tuple[int, int] | None:
    """(height, width) from the file's header, pixels not decoded; None when unreadable (the
    run that keeps such a file refuses it when decoding it). PNG and JPEG are parsed here
    (PIL's lazy open parses a JPEG's tables too: ~10x slower), other formats through PIL."""
    from PIL import Image

    try:
        with open(path, "rb") as handle:
            head = handle.read(HEADER_BYTES)
        shape = png_shape(head) or jpeg_shape(head)
        if shape is not None:
            return shape
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, ValueError, struct.error):
        return None
    return height, width


def _size_a_full_decode_picks(files: Sequence[str | Path]) -> int | None:
    """None when all `files` share one size, else DEFAULT_SIZE (logged): what `_decode_all`
    decides over the whole listing, read from headers only (a JPEG's: ~15 us, a tenth of PIL's
    lazy open, which is most of a small JPEG's decode)."""
    seen: tuple[str | Path, tuple[int, int]] | None = None  # the first file and its size
    for path in files:
        shape = header_shape(path)
        if shape is None:
            continue
        if seen is None:
            seen = (path, shape)
        elif shape != seen[1]:
            _log_sizes_differ(*seen, path, shape)
            return DEFAULT_SIZE
    return None


@dataclass(frozen=True)
class ImageFiles:
    """A source's image files, listed (their labels are known) but not decoded yet, and how
    to decode them: all, or only the rows a run keeps (`decoded`). `name` and `root` only
    label and group cache entries."""

    files: list[str]
    decode: Decoder
    channels: int
    size: int | None
    cache_dir: str | None
    name: str
    root: Path

    def __len__(self) -> int:
        return len(self.files)

    def decoded(self, keep: Tensor | None = None) -> Tensor:
        """uint8 (rows, channels, H, W) of the files at the sorted, distinct row numbers
        `keep` (None: all): sliced from this listing's full cache entry when there is a valid
        one, else from the subset entry of exactly these rows, else decoded and stored."""
        start = time.perf_counter()
        rows = None if keep is None or len(keep) == len(self.files) else keep.tolist()
        if self.cache_dir is None:
            images, how = self._decode(rows)
            log.info(
                "%s: decoded %s images at %s in %.1fs (no cache: `paths.cache_dir` is null)",
                self.name,
                self._count(rows),
                how,
                time.perf_counter() - start,
            )
            return images
        listing = listing_of(self.files)
        path = self._entry(listing)
        cached = _read_entry(path, len(self.files), self.channels)
        if cached is not None:
            self._log_hit(rows, cached, path, start)
            return cached if rows is None else cached[rows]
        if rows is not None:
            path = self._entry(listing, rows)
            cached = _read_entry(path, len(rows), self.channels)
            if cached is not None:
                self._log_hit(rows, cached, path, start)
                return cached
        images, how = self._decode(rows)
        decoded = time.perf_counter() - start
        _write_entry(path, images)
        log.info(
            "%s: decoded-image cache miss, decoded %s images at %s in %.1fs, stored in %s",
            self.name,
            self._count(rows),
            how,
            decoded,
            path,
        )
        return images

    def _entry(self, listing: list[tuple[str, int, int]], rows: list[int] | None = None) -> Path:
        options = {"channels": self.channels, "size": self.size}
        return entry_path(
            Path(str(self.cache_dir)).expanduser(), self.name, self.root, options, listing, rows
        )

    def _decode(self, rows: list[int] | None) -> tuple[Tensor, str]:
        """The files at `rows` (None: all), at the size a decode of all of them would pick."""
        if rows is None:
            return _decode_all(self.files, self.decode, self.channels, self.size)
        kept = [self.files[i] for i in rows]
        if self.size is not None:
            return _decode_all(kept, self.decode, self.channels, self.size)
        size = _size_a_full_decode_picks(self.files)
        return _decode_all(kept, self.decode, self.channels, size, why="default, sizes differ")

    def _count(self, rows: list[int] | None) -> str:
        listed = f"{len(self.files):,}"
        return listed if rows is None else f"{len(rows):,} kept of {listed} listed"

    def _log_hit(self, rows: list[int] | None, images: Tensor, path: Path, start: float) -> None:
        log.info(
            "%s: decoded-image cache hit, %s images at %dx%d read from %s in %.1fs",
            self.name,
            self._count(rows),
            images.shape[-1],
            images.shape[-2],
            path,
            time.perf_counter() - start,
        )
