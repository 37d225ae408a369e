"""Every `experiment=` recipe that can run offline trains a few steps in the suite, as
shipped (only sizes shrunk). Recipes trained elsewhere are listed with their test, so a new
recipe without a test fails here."""

from __future__ import annotations

from pathlib import Path

import pytest

from posttrain.train import train
from tests.conftest import CONF, compose_config

FAST = ["trainer.fast_dev_run=true", "logger=none", "trainer.accelerator=cpu"]
TRAINED_ELSEWHERE = {
    "digits_pretrain": "tests/test_finetune.py::pretrained_digits",
    "digits_transfer": "tests/test_finetune.py::test_reinit_top_layers_restarts_only_the_top",
    "cifar10_resnet50_finetune": "tests/test_finetune.py::test_cifar10_resnet50_recipe_runs_...",
    "digits_protonet": "tests/test_meta.py::test_cli_meta_trains_a_few_steps",
    "digits_maml": "tests/test_meta.py::test_cli_meta_trains_a_few_steps",
    "digits_multitask": "tests/test_multitask.py::test_cli_trains_and_writes_per_task_metrics",
}
TRAINED_HERE = ("digits_lowdata", "digits_resnet18", "omniglot_protonet", "omniglot_maml")


def test_every_recipe_is_trained_by_some_test() -> None:
    recipes = {path.stem for path in (CONF / "experiment").glob("*.yaml")}
    assert recipes == set(TRAINED_ELSEWHERE) | set(TRAINED_HERE)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", TRAINED_HERE)
def test_recipe_trains_a_few_steps(recipe: str, tmp_path: Path, request) -> None:
    overrides = [f"experiment={recipe}", *FAST]
    if recipe.startswith("omniglot"):  # two drawings per character: 1 shot + 1 query
        root = request.getfixturevalue("omniglot_all_characters")
        overrides += [f"data.root={root}", "data.download=false", "data.queries=1"]
    metrics = train(compose_config(tmp_path / "run", overrides))
    assert metrics["global_step"] == 1 and 0.0 <= metrics["test/acc"] <= 1.0
