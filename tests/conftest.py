"""Shared test helpers: compose the real configs, run the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, open_dict

from posttrain.run_names import register_resolvers

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
register_resolvers()  # the run folder names in conf/hydra use `${run_id:}`

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one xdist worker per core: a worker (and the CLI runs it starts) that
    # also spread torch over every core would have the workers thrash each other.
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def read_metrics(run_dir: Path) -> dict:
    """A run folder's record: its metrics.json."""
    return json.loads((run_dir / "metrics.json").read_text())


def compose_config(
    output_dir: Path, overrides: list[str] | tuple[str, ...] = (), name: str = "train"
) -> DictConfig:
    """The composed project config, as `python train.py <overrides>` would see it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose(name, overrides=list(overrides), return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(output_dir)
        cfg.paths.data_dir = str(output_dir / "data")
        del cfg["hydra"]
    return cfg


@pytest.fixture
def make_config(tmp_path: Path):
    def make(*overrides: str, name: str = "train") -> DictConfig:
        return compose_config(tmp_path / "run", overrides, name)

    return make


# Only a hang guard: a test must not fail because the machine is slow or loaded (a CLI run
# that takes 40 s alone took over 300 s with the suite sharing two busy cores).
HANG_TIMEOUT_S = 1800


def add_callbacks(monkeypatch: pytest.MonkeyPatch, *callbacks: object) -> None:
    """Attach probe callbacks to the Trainer that `posttrain.train.train` builds."""
    import posttrain.runs

    build_trainer = posttrain.runs.build_trainer

    def with_probes(cfg: DictConfig, extra_callbacks: list) -> object:
        return build_trainer(cfg, extra_callbacks=[*extra_callbacks, *callbacks])

    monkeypatch.setattr(posttrain.runs, "build_trainer", with_probes)


def run_cli(script: str, *args: str, cwd: Path | None = None, timeout: int = HANG_TIMEOUT_S):
    """Run `python <script> <args>` from the repository root, as a user would."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd or ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class RunProbe(Callback):
    """A callback for CLI runs: `+callbacks.probe._target_=tests.conftest.RunProbe`.

    Writes `probe-rank<r>.json` into the run folder when training ends: the process's world
    size and pid, the optimizer steps taken, and which of the method's parameters changed
    during training, so a subprocess test can check what the run really did.
    """

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_train_end(self, trainer, pl_module) -> None:
        changed = {n: not p.detach().equal(self.start[n]) for n, p in pl_module.named_parameters()}
        report = {
            "world_size": trainer.world_size,
            "pid": os.getpid(),
            "global_step": trainer.global_step,
            "changed": changed,
        }
        folder = Path(trainer.default_root_dir)
        (folder / f"probe-rank{trainer.global_rank}.json").write_text(json.dumps(report))


PROBE = "+callbacks.probe._target_=tests.conftest.RunProbe"


def read_probes(run_dir: Path) -> list[dict]:
    """The RunProbe reports of a run folder, rank 0 first."""
    return [json.loads(p.read_text()) for p in sorted(run_dir.glob("probe-rank*.json"))]


@pytest.fixture(scope="session")
def omniglot_all_characters(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every character the papers' Omniglot split names, two tiny drawings each, in the real
    folder layout (built once per session: 3,246 files)."""
    from tests.fixtures import write_omniglot_characters

    root = tmp_path_factory.mktemp("omniglot")
    write_omniglot_characters(root, drawers=2, size=8)
    return root
