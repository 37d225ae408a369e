"""Reading checkpoints safely: `weights_only=True` always, errors that name the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from posttrain.errors import PosttrainError, require

CONFIG_KEY = "posttrain_config"


def load_checkpoint(path: str | Path, key: str) -> dict[str, Any]:
    """Load a checkpoint or state dict without running any pickled code.

    `key` is the config key that named the file, so the error can point back at it.
    """
    import torch

    file = Path(str(path))
    require(file.is_file(), f"Config key `{key}`: checkpoint file {file} does not exist.")
    try:
        loaded = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # a corrupt file surfaces as any of a dozen error types
        if "weights only load failed" in str(error).lower():
            raise PosttrainError(
                f"Config key `{key}`: {file} was refused: it holds objects that only a full "
                "unpickle could rebuild (which may run arbitrary code). posttrain only loads "
                "tensors and plain containers (`weights_only=True`); re-save it as a state dict."
            ) from error
        raise PosttrainError(
            f"Config key `{key}`: {file} is not a readable PyTorch checkpoint "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
            "Point it at a .ckpt/.pt file written by posttrain or torch.save."
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
