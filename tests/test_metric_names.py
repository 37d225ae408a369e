"""Metric names are one list (`posttrain.methods.metrics.METRICS`), documented once."""

from __future__ import annotations

from posttrain.methods.metrics import METRICS, documented_metric
from tests.conftest import ROOT


def metrics_table() -> list[str]:
    """The README's metric table, as rendered from `METRICS`."""
    rows = [f"| `{name}` | {description} |" for name, description in METRICS.items()]
    return ["| name | meaning |", "|---|---|", *rows]


def test_readme_metric_table_is_the_list() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "\n".join(metrics_table()) in readme, "\n" + "\n".join(metrics_table())


def test_the_old_epoch_loss_name_is_not_documented() -> None:
    assert documented_metric("train/loss") and not documented_metric("train/loss_epoch")
    assert documented_metric("test/parity/acc") and not documented_metric("test/acc/extra/x")
