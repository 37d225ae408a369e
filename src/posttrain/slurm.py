"""What a SLURM job of `hydra/launcher=slurm` asks for, from the trainer settings.

submitit needs numbers: tasks per node (Lightning's DDP runs one SLURM task per device) and
GPUs per node. `trainer.devices` may be a count or a list of device ids, and a CPU job (CPU
DDP processes included) must ask for no GPUs: a GPU request on a CPU-only partition is
refused by SLURM, and on a GPU partition it holds GPUs the job never uses. The resolvers are
registered before Hydra composes; `CheckSlurmRequest` resolves them when the sweep starts, so
a setting SLURM cannot be asked for is one paragraph before anything is submitted.
"""

from __future__ import annotations

import sys
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig

from posttrain.errors import PosttrainError

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
        raise PosttrainError(
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


class CheckSlurmRequest(Callback):
    """Hydra callback: resolve a SLURM sweep's request (tasks and GPUs per node) before any
    job is submitted; an unresolvable one exits with posttrain's paragraph, not the
    resolver's traceback from inside the launcher."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        launcher = config.hydra.launcher
        if "tasks_per_node" not in launcher:  # not the SLURM launcher
            return
        from posttrain.runs import find_user_error

        try:
            for key in ("tasks_per_node", "gpus_per_node"):
                launcher[key]  # resolves the interpolation
        except Exception as error:
            user_error = find_user_error(error)
            if user_error is None:
                raise
            print(f"\nposttrain: error: {user_error}\n", file=sys.stderr)
            raise SystemExit(2) from None
