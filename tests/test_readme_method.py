"""The README's "Adding a method" example is real: its module and yaml, as written there,
train a few steps, log the shared metrics, and get the capability check for free."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf, open_dict

from posttrain.errors import PosttrainError
from posttrain.train import train
from tests.conftest import ROOT, compose_config

FAST = ["trainer.max_epochs=3", "logger=none", "trainer.accelerator=cpu", "model.width=8"]


def readme_blocks(language: str) -> list[str]:
    section = (ROOT / "README.md").read_text().split("## Adding a method", 1)[1]
    section = section.split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.DOTALL)


@pytest.fixture
def focal_method(monkeypatch: pytest.MonkeyPatch) -> dict:
    (code,) = readme_blocks("python")
    module = types.ModuleType("my_methods")
    exec(compile(code, "README.md:my_methods.py", "exec"), module.__dict__)
    monkeypatch.setitem(sys.modules, "my_methods", module)
    (config,) = readme_blocks("yaml")
    return yaml.safe_load(config)


def with_method(tmp_path: Path, method: dict, *overrides: str):
    cfg = compose_config(tmp_path / "run", [*FAST, *overrides])
    with open_dict(cfg):
        cfg.method = OmegaConf.create(method)
    return cfg


def test_the_example_method_trains_with_the_shared_core(tmp_path: Path, focal_method) -> None:
    metrics = train(with_method(tmp_path, focal_method, "reg=[l2,dropout]"))
    assert metrics["test/acc"] > 0.5  # 3 epochs on digits: far above the 0.1 of chance
    assert metrics["train/penalty"] > 0 and "val/acc_best" in metrics
    assert "test/f1_macro" in metrics and "val/acc_gap" in metrics


def test_the_example_method_refuses_what_it_does_not_offer(tmp_path: Path, focal_method) -> None:
    for regularizer in ("label_smoothing", "mixup"):
        with pytest.raises(PosttrainError, match="method=focal"):
            train(with_method(tmp_path, focal_method, f"reg={regularizer}"))


def test_the_example_is_as_short_as_the_readme_says() -> None:
    (code,) = readme_blocks("python")
    lines = [line for line in code.splitlines() if line.strip()]
    assert f"is {len(lines)} lines" in (ROOT / "README.md").read_text()
