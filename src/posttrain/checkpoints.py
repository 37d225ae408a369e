"""Checkpoints: read safely, written atomically, carrying every random state for exact resume.

- Reading: `torch.load(weights_only=True)` always; errors name the config key and say what
  the file is (not a checkpoint at all, a truncated one, or one that needs code to unpickle).
- Writing (`AtomicCheckpointIO`): a complete file appears under its name in one `os.replace`
  from the same folder, so a kill at any instant leaves the old or the new file, never a torn
  one (Lightning's default stages the file in TMPDIR, and a move across filesystems is a copy).
- Resuming (`RandomStateInCheckpoint`): Lightning restores weights, optimizer and loops but
  not the random generators; batch order, augmentation, dropout and mixing draw from them.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from posttrain.errors import PosttrainError, require

log = logging.getLogger("posttrain")

CONFIG_KEY = "posttrain_config"
RANDOM_STATE_KEY = "posttrain_random_state"
TEMP_MARK = ".partial-"
# How files written by torch.save start: a zip archive, or a legacy pickle (protocol 2+).
TORCH_FILE_MAGIC = (b"PK\x03\x04", b"\x80")


def is_safetensors(head: bytes) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then the JSON header."""
    return len(head) >= 10 and head[8:10] in (b'{"', b"{}") and head[4:8] == b"\0\0\0\0"


def describe_unreadable(file: Path, error: Exception) -> str:
    """What the file is, for the refusal: not a torch file, truncated, or unsafe to unpickle."""
    with file.open("rb") as handle:
        head = handle.read(10)
    if not head:
        return f"{file} is empty (0 bytes): a copy, download or save that did not complete"
    if is_safetensors(head):
        return (
            f"{file} is a safetensors file, which posttrain does not read; convert it with "
            "`torch.save(safetensors.torch.load_file(path), 'weights.pt')` (a state dict)"
        )
    if not head.startswith(TORCH_FILE_MAGIC):
        return (
            f"{file} is not a PyTorch checkpoint at all (it does not start like a file written "
            "by torch.save: it may be text, an image or another format)"
        )
    if "weights only load failed" in str(error).lower() and "unsupported" in str(error).lower():
        return (
            f"{file} was refused: it holds objects that only a full unpickle could rebuild "
            "(which may run arbitrary code). posttrain only loads tensors and plain containers "
            "(`weights_only=True`); re-save it as a state dict"
        )
    first_line = str(error).splitlines()[0] if str(error) else ""
    return (
        f"{file} is a damaged or truncated PyTorch file ({type(error).__name__}: {first_line}); "
        "if a run was killed while writing it, use the run's other checkpoint"
    )


def file_sha256(path: Path) -> str:
    """A file's sha256, read in 1 MiB chunks (a weights file may be gigabytes)."""
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def plain_data_globals() -> list[Any]:
    """What `weights_only` may rebuild beyond tensors: numpy arrays and scalars (as the
    CIFAR reader allows) and `argparse.Namespace`, plain data that training scripts store
    beside the weights (`"best_acc": numpy.float64(0.9)`, DINO's and DeiT's `"args"`), which
    made a valid weights file unreadable. Names under both numpy 1 (`numpy.core`) and 2."""
    import argparse

    import numpy as np

    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1
        from numpy.core import multiarray  # type: ignore[no-redef]
    allowed: list[Any] = [np.ndarray, np.dtype, argparse.Namespace]
    # numpy 2 builds a scalar's dtype through its class (`numpy.dtypes.Float64DType`); not
    # object arrays (`O`), whose items would be arbitrary objects
    allowed += sorted({type(np.dtype(c)) for c in np.typecodes["All"] if c != "O"}, key=str)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed += [
            (multiarray._reconstruct, f"{module}._reconstruct"),
            (multiarray.scalar, f"{module}.scalar"),
        ]
    return allowed


def load_checkpoint(path: str | Path, key: str) -> dict[str, Any]:
    """Load a checkpoint or state dict without running any pickled code.

    `key` is the config key that named the file, so the error can point back at it.
    """
    import torch

    file = Path(str(path)).expanduser()  # `~/runs/...` from a config file: Lightning expands it too
    require(
        not file.is_dir(),
        f"Config key `{key}`: {file} is a folder, not a checkpoint file; name the file in it, "
        f"e.g. `{key}={file / 'checkpoints' / 'best.ckpt'}`.",
    )
    require(file.is_file(), f"Config key `{key}`: checkpoint file {file} does not exist.")
    try:
        with torch.serialization.safe_globals(plain_data_globals()):
            loaded = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # a corrupt file surfaces as any of a dozen error types
        raise PosttrainError(
            f"Config key `{key}`: {describe_unreadable(file, error)}. Point it at a .ckpt/.pt "
            "file written by posttrain or torch.save."
        ) from error
    require(
        isinstance(loaded, dict),
        f"Config key `{key}`: {file} holds a {type(loaded).__name__}, not a checkpoint dict.",
    )
    return loaded


def stored_config(checkpoint: dict[str, Any], path: str | Path, key: str) -> dict[str, Any]:
    """The run config a posttrain checkpoint carries (data, model, method, ...)."""
    config = checkpoint.get(CONFIG_KEY)
    require(
        isinstance(config, dict),
        f"Config key `{key}`: {path} was not written by a posttrain run (it has no "
        f"`{CONFIG_KEY}` entry), so the model and data to rebuild are unknown.",
    )
    return config


def write_fd(fd: int, payload: bytes | memoryview) -> None:
    view = memoryview(payload)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def link_unnamed(fd: int, name: Path) -> None:
    """Give an `O_TMPFILE` file a name (`linkat` with AT_SYMLINK_FOLLOW: CPython's `os.link`
    does not follow the `/proc/self/fd` link on Linux)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, at_symlink_follow = -100, 0x400
    source = f"/proc/self/fd/{fd}".encode()
    if libc.linkat(at_fdcwd, source, at_fdcwd, os.fsencode(name), at_symlink_follow) != 0:
        raise OSError(ctypes.get_errno(), "linkat failed", str(name))


def stage_unnamed(payload: bytes | memoryview, staged: Path) -> bool:
    """Write to an unnamed file in the folder, named only once complete; False if the
    filesystem cannot (no `O_TMPFILE`, or no naming it). A failed write (a full disk) is
    raised: writing it all again under a name would fail the same way, and leave the name."""
    try:
        fd = os.open(staged.parent, os.O_TMPFILE | os.O_WRONLY, 0o644)
    except (AttributeError, OSError):
        return False
    try:
        write_fd(fd, payload)
        try:
            link_unnamed(fd, staged)
        except OSError:
            return False
        return True
    finally:
        os.close(fd)


def write_atomically(payload: bytes | memoryview, target: Path) -> None:
    """`target` becomes `payload` in one step: written and fsynced beside it, then renamed.

    The bytes go to an unnamed file (`O_TMPFILE`) that gets a name only once complete, so
    even a `kill -9` mid-write leaves nothing behind; where the filesystem lacks it, a named
    `.partial-<pid>-<name>` file is used (removed by `remove_partial_files` on the next start).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = target.parent / f"{TEMP_MARK}{os.getpid()}-{target.name}"
    staged.unlink(missing_ok=True)
    if not stage_unnamed(payload, staged):
        fd = os.open(staged, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)
        try:
            write_fd(fd, payload)
        except BaseException:  # a full disk: the part written must not keep the space
            staged.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
    os.replace(staged, target)
    directory = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power cut
    finally:
        os.close(directory)


def remove_partial_files(folder: Path) -> None:
    """Staged files of writers that were killed (never a complete checkpoint)."""
    for stale in folder.glob(f"{TEMP_MARK}*"):
        pid = stale.name[len(TEMP_MARK) :].split("-", 1)[0]
        if not (pid.isdigit() and Path(f"/proc/{pid}").exists()):
            stale.unlink(missing_ok=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, with the write made atomic in the checkpoint's own folder."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        import torch

        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        write_atomically(buffer.getbuffer(), Path(path))  # a view: no second copy in memory


def collect_random_states() -> dict[str, Any]:
    """The global generators the loop draws from: torch (CPU/CUDA), numpy, python. (The
    DataModules save their own training-batch generators in their `state_dict`.)

    Stored as tensors and plain values only, so `weights_only=True` loads them.
    """
    import random

    import numpy as np
    import torch

    key, keys, position, has_gauss, cached = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "numpy": [key, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
        "python": random.getstate(),
    }


def restore_random_states(states: dict[str, Any]) -> None:
    import random

    import numpy as np
    import torch

    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    key, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((key, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


def seed_process(seed: int) -> None:
    """torch, numpy and python generators from `seed`. Not `L.seed_everything`: its
    `PL_GLOBAL_SEED` seeds the training `DistributedSampler`, which must be the same on
    every rank (else the ranks' shares of the training split would overlap)."""
    import random

    import numpy as np
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


class RandomStateInCheckpoint(Callback):
    """Saves the random states with every checkpoint and restores them on resume, so a
    resumed run draws exactly what the uninterrupted run would have drawn.

    Under DDP each process draws its own augmentation, dropout and mixing randomness: all
    ranks were seeded alike (`seed`), so they flipped, shifted and dropped the same way.
    The model is built before (identical on every rank; DDP broadcasts rank 0's anyway), so
    ranks > 0 are reseeded at set-up; checkpoints keep every rank's states (rank 0's as
    before, all of them under `by_rank`), and each rank resumes its own.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.pending: dict[str, Any] | None = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        from posttrain.data.datamodule import process_seed

        if trainer.global_rank > 0 and stage == "fit":
            seed_process(process_seed(self.seed, trainer.global_rank))

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        from posttrain.data.datamodule import by_rank

        states = by_rank(collect_random_states())
        ranks = {"by_rank": states} if len(states) > 1 else {}
        checkpoint[RANDOM_STATE_KEY] = {**states[0], **ranks}

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """This rank's states; a rank the checkpoint has none for (it ran on fewer
        processes) keeps the ones it was seeded with rather than copy rank 0's."""
        states = checkpoint.get(RANDOM_STATE_KEY)
        rank = trainer.global_rank
        if states is not None and rank > 0:
            by_rank = states.get("by_rank") or []
            states = by_rank[rank] if rank < len(by_rank) else None
        self.pending = states

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Restored here, after everything that set-up draws (model init, splits, loaders)."""
        if self.pending is not None:
            restore_random_states(self.pending)
            self.pending = None


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint that keeps the run's best when resuming into a new folder.

    Lightning forgets the best score when the checkpoint folder changed, so a run resumed
    elsewhere would choose "best" among the resumed epochs only and test that model. Here
    the best checkpoint so far is copied into the new folder and its score kept; if it is
    gone, the run says so loudly.
    """

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.dirpath and Path(self.dirpath).is_dir():
            remove_partial_files(Path(self.dirpath))  # left by a writer killed mid-save

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        old_dir = state_dict.get("dirpath")
        if old_dir and self.dirpath and Path(old_dir) != Path(self.dirpath):
            state_dict = self.adopt(state_dict)
        super().load_state_dict(state_dict)

    def adopt(self, state: dict[str, Any]) -> dict[str, Any]:
        here = {**state, "dirpath": self.dirpath, "last_model_path": ""}
        if self.monitor is None:  # `last.ckpt`: no best to carry, the next epoch rewrites it
            return {**here, "best_model_path": "", "kth_best_model_path": "", "best_k_models": {}}
        best = Path(state.get("best_model_path") or "")
        if not best.is_file():
            log.warning(
                "resuming: the best checkpoint so far (%s) is gone, so `best.ckpt`, "
                "`val/acc_best` and the test use only the epochs from here on",
                best,
            )
            return state
        moved = Path(self.dirpath) / best.name
        if best.resolve() != moved.resolve():
            write_atomically(best.read_bytes(), moved)
        renamed = {str(best): str(moved)}
        return {
            **here,
            "best_model_path": str(moved),
            "kth_best_model_path": renamed.get(state.get("kth_best_model_path") or "", ""),
            "best_k_models": {
                renamed[p]: s for p, s in state["best_k_models"].items() if p in renamed
            },
        }


def resume_path(value: str | None, output_dir: str | Path) -> str | None:
    """`ckpt_path`: a file, or `last` for this run folder's own `checkpoints/last.ckpt`
    (`python train.py ckpt_path=last hydra.run.dir=<run>` continues a run in place)."""
    if value != "last":
        return str(Path(value).expanduser()) if value else value
    last = Path(output_dir) / "checkpoints" / "last.ckpt"
    require(
        last.is_file(),
        f"Config key `ckpt_path=last` resumes the run in `hydra.run.dir`, but {last} does not "
        "exist. Point `hydra.run.dir` at the folder of the run to continue, or give "
        "`ckpt_path` a checkpoint file.",
    )
    return str(last)


# What a soup (`posttrain.soup.SOUP_KEY`) stores about itself: weights, no training state.
SOUP_KEY = "posttrain_soup"


def check_training_state(checkpoint: dict[str, Any], path: str | Path) -> None:
    """A resume continues a run's training, so the file must hold it: a model soup (written
    by `python -m posttrain.soup`) or a weights-only checkpoint has none, and Lightning
    stopped with `KeyError: 'Trying to restore optimizer state but checkpoint contains only
    the model'` after the run had started."""
    if "optimizer_states" in checkpoint and "loops" in checkpoint:
        return
    what = (
        "a model soup (written by `python -m posttrain.soup`): the average of a sweep's weights"
        if SOUP_KEY in checkpoint
        else "no training run's checkpoint (at most weights: `save_weights_only`, a state dict)"
    )
    raise PosttrainError(
        f"Config key `ckpt_path`: {path} is {what}, with no optimizer, scheduler or loop "
        "state, so there is no training to resume. To train on from its weights, start a new "
        "run with `model.pretrained=<file>` (and `model.pretrained_head=true` to keep its "
        "head); to test it, use `python eval.py ckpt_path=<file>`."
    )


def check_resumed_method(checkpoint: dict[str, Any], method: Any) -> None:
    """What only the method knows a resume depends on, before any work (`check_resume`:
    distillation's teacher file). Not for `eval.py`, which needs none of it."""
    check = getattr(method, "check_resume", None)
    if callable(check):
        check(checkpoint)


def check_resumable(checkpoint: dict[str, Any], method: Any, path: str | Path) -> None:
    """The checkpoint's weights fit the model this config builds (same names and shapes),
    so a changed architecture or class count is one paragraph, not a size-mismatch trace."""
    stored = checkpoint.get("state_dict")
    require(
        isinstance(stored, dict),
        f"Config key `ckpt_path`: {path} has no `state_dict`: it is not a training checkpoint "
        "(to start from weights, use `model.pretrained` instead).",
    )
    built = method.state_dict()
    differing = [
        f"{name} is {list(stored[name].shape)} there, {list(tensor.shape)} here"
        for name, tensor in built.items()
        if name in stored and hasattr(stored[name], "shape") and stored[name].shape != tensor.shape
    ]
    missing = sorted(n for n in set(built) - set(stored) if not n.startswith("tracker."))
    require(
        not differing and not missing,
        f"Config key `ckpt_path`: {path} was trained with another model or data than this "
        f"config builds ({'; '.join(differing[:3]) or 'missing: ' + ', '.join(missing[:3])}). "
        "Resume with the run's own config (its `.hydra/config.yaml`): the same `model.*`, "
        "`data.*` and `method.*`; to start a new run from these weights, use "
        "`model.pretrained=<file>` instead.",
    )
