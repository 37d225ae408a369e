"""What a SLURM job of `hydra/launcher=slurm` asks for, from the trainer settings.

submitit needs numbers: tasks per node (Lightning's DDP runs one SLURM task per device) and
GPUs per node. `trainer.devices` may be a count or a list of device ids, and a CPU job (CPU
DDP processes included) must ask for no GPUs: a GPU request on a CPU-only partition is
refused by SLURM, and on a GPU partition it holds GPUs the job never uses. Standard library
and OmegaConf only (these are OmegaConf resolvers, registered before Hydra composes).
"""

from __future__ import annotations

from typing import Any

from omegaconf import ListConfig

GPU_ACCELERATORS = ("gpu", "cuda", "auto")  # `auto` uses the GPUs a job is given


def device_count(devices: Any) -> int:
    """`${device_count:${trainer.devices}}`: SLURM tasks per node, one per device."""
    if isinstance(devices, list | tuple | ListConfig):
        count = len(devices)
    elif isinstance(devices, str) and "," in devices:  # device ids, Lightning's "0,1"
        count = len([part for part in devices.split(",") if part.strip()])
    elif isinstance(devices, str) and devices.strip().isdigit():
        count = int(devices)
    elif isinstance(devices, int) and not isinstance(devices, bool):
        count = devices
    else:
        count = 0
    if count < 1:
        raise ValueError(
            f"`trainer.devices`={devices!r} does not say how many devices a node of a "
            "`hydra/launcher=slurm` job gets, and SLURM must be asked for a number. Set "
            "`trainer.devices` to the count per node (e.g. trainer.devices=4)."
        )
    return count


def gpu_count(accelerator: str, devices: Any) -> int:
    """`${gpu_count:${trainer.accelerator},${trainer.devices}}`: GPUs per node, 0 unless the
    trainer runs on GPUs."""
    count = device_count(devices)
    return count if str(accelerator).lower() in GPU_ACCELERATORS else 0
