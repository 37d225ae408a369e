"""Recipes run where they are started (issue 13, item 6): the seed's GPU recipe on a machine
without a GPU is one paragraph with exit status 2 and the override that makes it run, never
Lightning's `MisconfigurationException('No supported gpu backend found!')` traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli
from tests.fixtures import write_cifar
from tests.test_finetune import place_torchvision_weights


def test_the_recipe_picks_the_device_it_finds(make_config) -> None:
    """No forced `accelerator: gpu`: Lightning's `auto` takes a GPU where there is one."""
    cfg = make_config("experiment=cifar10_resnet50_finetune")
    assert cfg.trainer.accelerator == "auto" and cfg.trainer.precision == "16-mixed"


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU-only machine")
def test_gpu_recipe_on_a_cpu_machine_is_one_paragraph(tmp_path: Path, monkeypatch) -> None:
    place_torchvision_weights(tmp_path / "torch", "resnet50", monkeypatch)  # offline "imagenet"
    write_cifar(tmp_path / "cifar")
    run = tmp_path / "run"
    result = run_cli(
        "train.py", "experiment=cifar10_resnet50_finetune", f"data.root={tmp_path / 'cifar'}",
        "data.download=false", "logger=none", f"hydra.run.dir={run}",
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "MisconfigurationException" not in result.stderr
    assert "trainer.precision=16-mixed" in result.stderr and "32-true" in result.stderr
    assert json.loads((run / "metrics.json").read_text())["status"] == "failed"
