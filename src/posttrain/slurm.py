"""What a SLURM job of `hydra/launcher=slurm` asks for, from the trainer settings.

submitit needs numbers: tasks per node (Lightning's DDP runs one SLURM task per device) and
GPUs per node. `trainer.devices` may be a count or a list of device ids, and a CPU job (CPU
DDP processes included) must ask for no GPUs: a GPU request on a CPU-only partition is
refused by SLURM, and on a GPU partition it holds GPUs the job never uses. The resolvers are
registered before Hydra composes; `CheckSlurmRequest` resolves them when the sweep starts, so
a setting SLURM cannot be asked for is one paragraph before anything is submitted, and so is a
sweep whose jobs need different requests (the launcher submits one request for all of them).
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
            check_one_request(config)
        except Exception as error:
            user_error = find_user_error(error)
            if user_error is None:
                raise
            print(f"\nposttrain: error: {user_error}\n", file=sys.stderr)
            raise SystemExit(2) from None


REQUEST_KEYS = ("nodes", "tasks_per_node", "gpus_per_node")


def request(launcher: DictConfig) -> dict[str, Any]:
    return {key: launcher[key] for key in REQUEST_KEYS}


def check_one_request(config: DictConfig) -> None:
    """Refuse a basic sweep whose jobs need different SLURM requests.

    hydra-submitit-launcher submits every job of a sweep as one job array with the request
    resolved from the sweep's config, so `-m trainer=ddp trainer.devices=2,4` gave the
    4-device job 2 tasks and 2 GPUs per node (Lightning then stops on the node: its device
    count does not match SLURM's tasks), and `trainer.accelerator=cpu,gpu` held GPUs for the
    CPU job. Each job's request is resolved from its own config (Hydra's per-job compose).
    """
    from posttrain.report import basic_sweep_jobs

    submitted = request(config.hydra.launcher)
    for job in basic_sweep_jobs(config) or []:
        needed = request(job_config(config, job).hydra.launcher)
        if needed != submitted:
            raise PosttrainError(
                f"`hydra/launcher=slurm` asks SLURM once for all jobs of a sweep (one job "
                f"array, {describe(submitted)}), but the job `{' '.join(job)}` needs "
                f"{describe(needed)}: it would run with the sweep's request. A sweep over "
                "what the request reads (`trainer.devices`, `trainer.num_nodes`, "
                "`trainer.accelerator`, the `trainer` group) must be one command per "
                "request, e.g. `python train.py -m hydra/launcher=slurm trainer=ddp "
                "trainer.devices=4 seed=0,1,2`."
            )


def job_config(config: DictConfig, job: list[str]) -> DictConfig:
    """The config of one job of the sweep: its swept values set on a copy of the sweep's
    config, which holds the others (a 1000-seed sweep must not compose 1000 times), or
    Hydra's compose when it sweeps a config group (`trainer=ddp,cpu`) or adds or deletes a
    key."""
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf, open_dict

    groups, fixed = set(config.hydra.runtime.choices), set(config.hydra.overrides.task)
    pairs = [override.split("=", 1) for override in job if override not in fixed]
    if any(len(pair) != 2 or pair[0] in groups or pair[0][:1] in "+~/" for pair in pairs):
        return GlobalHydra.instance().config_loader().load_sweep_config(config, list(job))
    copy = config.copy()
    with open_dict(copy):
        for key, value in pairs:
            OmegaConf.update(copy, key, yaml_value(value), merge=False)
    return copy


def yaml_value(text: str) -> Any:
    """An override's value as Hydra reads it (`4` an int, `[0,1]` a list, `cpu` a string)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_override(f"key={text}").value()


def describe(asked: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in asked.items())
