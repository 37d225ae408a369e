"""Every option of every config group composes with the defaults and resolves."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import CONF

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")
OPTIONS = [(group, f.stem) for group in GROUPS for f in sorted((CONF / group).glob("*.yaml"))]


def test_all_required_groups_exist() -> None:
    required = {"data", "model", "method", "reg", "trainer", "logger", "callbacks", "paths"}
    assert required | {"experiment"} <= set(GROUPS) | {"hydra"}
    assert (CONF / "hydra" / "default.yaml").is_file()


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_resolves(make_config, group: str, option: str) -> None:
    cfg = make_config(f"{group}={option}")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert {"data", "model", "method", "trainer", "seed"} <= set(resolved)


def test_every_option_file_opens_with_a_comment() -> None:
    for group, option in OPTIONS:
        first = (CONF / group / f"{option}.yaml").read_text().splitlines()[0]
        assert first.startswith("#"), f"conf/{group}/{option}.yaml should open with a comment"


def test_eval_config_composes(make_config, tmp_path: Path) -> None:
    cfg = make_config(f"ckpt_path={tmp_path / 'x.ckpt'}", name="eval")
    assert cfg.ckpt_path.endswith("x.ckpt")
    assert cfg.task_name == "eval"
