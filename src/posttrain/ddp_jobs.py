"""One Hydra job per DDP process group, even inside a multirun.

Standard library only at import: `python train.py --help` and `--cfg job` load this module
and must not pay for torch.
"""

from __future__ import annotations

import json
import os
import sys

DDP_JOB_ENV = "POSTTRAIN_DDP_JOB_ARGV"
# Set by Lightning's DDP launcher in the launching process; a later job of the same multirun
# would read them as "processes are created externally" and wait for children forever.
LAUNCHER_ENV = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
STARTUP_ENV = {name: os.environ.get(name) for name in LAUNCHER_ENV}


def remember_job_for_ddp_children(output_dir: str) -> None:
    """Record this job's exact overrides and folder for DDP child processes, and undo the
    launcher state an earlier job of the same process left behind.

    Lightning starts ranks 1..N-1 by re-running `sys.argv` with Hydra. In a multirun that
    argv holds the whole sweep (`-m`, `seed=0,1,2`), so each child would start a sweep of its
    own in a new folder. Children inherit the environment; `pin_ddp_child_to_its_job` reads
    this back so each child runs exactly its parent's job, in its folder.
    """
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized() or os.environ.get(DDP_JOB_ENV + "_CHILD"):
        return
    for name, value in STARTUP_ENV.items():  # undo what an earlier job's launcher set
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # an earlier job's process group
        dist.destroy_process_group()
    hydra_cfg = HydraConfig.get()
    argv = [*hydra_cfg.overrides.task, f'hydra.run.dir="{output_dir}"']
    os.environ[DDP_JOB_ENV] = json.dumps(argv)


def pin_ddp_child_to_its_job() -> None:
    """In a DDP child (LOCAL_RANK > 0), replace the re-run argv by the parent job's."""
    rank = os.environ.get("LOCAL_RANK", "0")
    recorded = os.environ.get(DDP_JOB_ENV)
    if rank == "0" or not recorded:
        return
    os.environ[DDP_JOB_ENV + "_CHILD"] = rank
    sys.argv = [
        sys.argv[0],
        *json.loads(recorded),
        "hydra.output_subdir=null",
        f"hydra.job.name=train_ddp_process_{rank}",
    ]
