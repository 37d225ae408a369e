"""TensorBoard's HPARAMS tab shows what a person compares between runs.

Real composed configs, tiny real fits, then the event files and hparams.yaml they wrote, and
the columns TensorBoard's own hparams backend builds from them (what the browser tab shows).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from posttrain.runs import flat_hparams, hydra_choices_and_overrides
from posttrain.train import train
from tests.conftest import compose_config, run_cli

TINY = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.num_sanity_val_steps=0",
]
GROUPS = {"data", "model", "method", "optimizer", "scheduler", "reg"}


def fit(output_dir: Path, *overrides: str) -> Path:
    """Train a tiny run of the real config; returns its TensorBoard folder."""
    train(compose_config(output_dir, [*overrides, *TINY]))
    return output_dir / "tensorboard"


def logged_hparams(tensorboard_dir: Path) -> dict[str, Any]:
    """The hparams of the run's session, as TensorBoard reads them from the event files."""
    events = EventAccumulator(str(tensorboard_dir))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in content
    start = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/session_start_info"]
    ).session_start_info
    return {key: getattr(value, value.WhichOneof("kind")) for key, value in start.hparams.items()}


def hparams_tab(logdir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(columns, session groups) as TensorBoard's hparams backend serves them to the tab."""
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams.hparams_plugin import HParamsPlugin
    from werkzeug.test import Client

    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(logdir))
    context = base_plugin.TBContext(
        logdir=str(logdir), multiplexer=multiplexer, data_provider=provider
    )
    apps = HParamsPlugin(context).get_plugin_apps()
    request = {"experimentName": "", "hparamsLimit": 1000, "includeMetrics": True}
    experiment = Client(apps["/experiment"]).post("/", json=request).get_json()
    columns = [{"hparam": info["name"]} for info in experiment["hparamInfos"]]
    columns += [{"metric": info["name"]} for info in experiment["metricInfos"]]
    groups = Client(apps["/session_groups"]).post(
        "/",
        json={
            "experimentName": "",
            "allowedStatuses": ["STATUS_SUCCESS", "STATUS_UNKNOWN"],
            "colParams": columns,
            "startIndex": 0,
            "sliceSize": 100,
            "includeMetrics": True,
        },
    )
    return experiment["hparamInfos"], groups.get_json()["sessionGroups"]


def test_logged_hparams_are_the_compared_knobs(tmp_path: Path) -> None:
    tensorboard_dir = fit(tmp_path / "run", "reg=l2", "reg.l2.weight=0.001")
    logged = logged_hparams(tensorboard_dir)

    assert logged["reg.l2.weight"] == pytest.approx(0.001)
    assert logged["reg"] == "l2" and logged["reg.l2.include_1d"] == "false"
    assert set(logged) >= GROUPS, GROUPS - set(logged)
    assert logged["optimizer.name"] == "adamw" and logged["model.arch"] == "small_cnn"
    assert {"seed", "optimizer.lr", "data.batch_size", "trainer.max_epochs"} <= set(logged)
    assert not [key for key in logged if "_target_" in key]
    wiring = ("callbacks.", "logger.", "paths.", "hydra.", "method.optimizer.")
    assert not [key for key in logged if key.startswith(wiring)]
    assert not {key for key in logged if key.startswith("trainer.")} - {
        "trainer.max_epochs",
        "trainer.precision",
    }
    # hparams.yaml holds the same columns, in order: what the command line set comes first.
    saved = yaml.safe_load((tensorboard_dir / "hparams.yaml").read_text())
    assert saved == pytest.approx(logged)
    assert list(saved)[:3] == ["reg", "reg.l2.weight", "trainer.max_epochs"]


def test_hparams_tab_leads_with_the_swept_knob(tmp_path: Path) -> None:
    """An L2 sweep beside a `reg=none` run: every run's keys are columns, the swept one first."""
    outputs = tmp_path / "outputs"
    fit(outputs / "baseline")
    for weight in ("1e-5", "1e-4"):
        fit(outputs / "sweep" / f"weight={weight}", "reg=l2", f"reg.l2.weight={weight}")

    columns, groups = hparams_tab(outputs / "sweep")
    assert columns[0]["name"] == "reg.l2.weight" and columns[0]["differs"]
    assert not [c for c in columns[1:] if c.get("differs")]
    assert len(groups) == 2
    for group in groups:
        values = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
        assert {"val/acc_best", "test/acc"} <= set(values), values
        assert 0.0 <= values["test/acc"] <= 1.0

    columns, groups = hparams_tab(outputs)
    names = [column["name"] for column in columns]
    assert {"reg", "reg.l2.weight", "reg.l2.include_1d"} <= set(names)
    assert names[:2] == ["reg", "reg.l2.weight"]  # the keys that differ lead
    assert not [name for name in names if "_target_" in name or name.startswith("callbacks.")]
    assert len(groups) == 3


def test_list_choices_read_as_typed_and_no_hydra_still_works(tmp_path: Path) -> None:
    cfg = compose_config(tmp_path, ["reg=[dropout,l2]", "reg.dropout.p=0.3"])
    config = OmegaConf.to_container(cfg, resolve=True)
    hparams = flat_hparams(config, *hydra_choices_and_overrides())  # type: ignore[arg-type]
    assert list(hparams)[:2] == ["reg", "reg.dropout.p"]
    assert hparams["reg"] == "dropout,l2" and hparams["reg.dropout.p"] == 0.3

    HydraConfig.instance().cfg = None  # as in a plain Python session
    assert hydra_choices_and_overrides() == ({}, [])
    evaluated = flat_hparams({"seed": 1, "trained": config}, {}, [])  # type: ignore[dict-item]
    assert evaluated["reg"] == "dropout,l2" and evaluated["reg.l2.weight"] == 0.0001
    assert evaluated["model.arch"] == "small_cnn" and "model" not in evaluated


@pytest.mark.slow
def test_a_sweep_over_a_wiring_key_shows_it_in_hparams(tmp_path: Path) -> None:
    """Observed: `-m trainer.limit_train_batches=1,4` logged the same HPARAMS columns for both
    jobs (batch limits are not a column of a single run) beside different metrics, so the
    tab could not say what made them differ. A key the sweep varies is always a column."""
    sweep = tmp_path / "sweep"
    result = run_cli(
        "train.py", "-m", "debug=limit", "trainer.limit_train_batches=1,4",
        "trainer.limit_val_batches=1", f"hydra.sweep.dir={sweep}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(job for job in sweep.iterdir() if job.is_dir())
    logged = [logged_hparams(job / "tensorboard") for job in jobs]
    assert [hparams.get("trainer.limit_train_batches") for hparams in logged] == [1, 4]
    columns, groups = hparams_tab(sweep)
    assert columns[0]["name"] == "trainer.limit_train_batches" and columns[0]["differs"]
    assert "trainer.limit_val_batches" not in {column["name"] for column in columns}
    assert len(groups) == 2
