"""Run folder names that two runs started in the same second never share.

Hydra names run and sweep folders by the second they start (`${now:...}`), so two runs
started together wrote into one folder, the second overwriting the first's metrics and
checkpoints. `${run_id:}` adds a suffix unique to the process (its pid, plus a random byte
for processes on different machines sharing a filesystem), fixed for the process's life so
every interpolation of the folder agrees. Standard library and OmegaConf only: `--help`
stays fast.
"""

from __future__ import annotations

import os
import secrets

from omegaconf import OmegaConf

RUN_ID = f"{os.getpid() % 0x10000:04x}{secrets.token_hex(1)}"


def register_resolvers() -> None:
    """`${run_id:}` in `conf/hydra/default.yaml`; safe to call more than once."""
    if not OmegaConf.has_resolver("run_id"):
        OmegaConf.register_new_resolver("run_id", lambda: RUN_ID)
