"""benchmarks.fewshot: the digits mode runs end to end (slow) and writes a result file with
every method x ways x shots row; its README table shows the papers' numbers beside the
measured ones; the Omniglot mode's plan and budget are what its documentation says."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from benchmarks import fewshot
from benchmarks.common import RESULTS

TINY = [
    "data.train_episodes=8",
    "data.val_episodes=2",
    "data.test_episodes=12",
    "data.queries=2",
    "data.meta_batch_size=2",
    "data.image_size=16",
    "model.hidden=8",
    "trainer.num_sanity_val_steps=0",
]


@pytest.mark.slow
def test_digits_mode_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The smallest plan that still has every method, ProtoNet scored at two ways from one
    model, and a MAML ways left untrained (each training run and eval.py call is a process)."""
    committed = RESULTS / "fewshot.json"
    before = committed.read_bytes() if committed.is_file() else None
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # MAML's small ops on a loaded CPU
    argv = ["--budget-minutes", "0.1", "--ways", "5,10", "--shots", "1", "--maml-ways", "5",
            "--extra", *TINY, "--sweep-dir", str(tmp_path / "runs"),
            "--results-dir", str(tmp_path / "results")]  # fmt: skip
    fewshot.main(argv)

    result = json.loads((tmp_path / "results" / "fewshot.json").read_text())
    assert (committed.read_bytes() if committed.is_file() else None) == before
    assert result["command"] == "python -m benchmarks.fewshot " + " ".join(argv)
    assert result["data"] == "digits" and result["budget_minutes"] == 0.1
    # 3 training runs (ProtoNet 1-shot; MAML and FOMAML 5-way 1-shot) share 6 s.
    assert result["training_runs"] == 3 and result["max_time_per_run"] == "00:00:00:02"
    keys = {(r["method"], r["ways"], r["shots"]) for r in result["rows"]}
    assert keys == {("protonet", 5, 1), ("protonet", 10, 1), ("maml", 5, 1), ("fomaml", 5, 1)}
    assert len(result["rows"]) == len(keys)
    for row in result["rows"]:
        assert 0.0 <= row["test_acc"] <= 1.0, row
        assert row["ci95"] > 0, row
        assert row["test_episodes"] == 12, row
        assert row["episodes_seen"] > 0 and row["steps"] > 0, row
        assert row["wall_seconds"] > 0, row
        if row["train_test_acc"] is not None:  # eval.py and the run's own test agree
            assert math.isclose(row["test_acc"], row["train_test_acc"], abs_tol=1e-6), row
        # the budget reached the run: Lightning's max_time, as the result file says
        job = OmegaConf.load(Path(row["run"]) / ".hydra" / "config.yaml")
        assert job.trainer.max_time == "00:00:00:02"
        assert job.data.val_fraction == 0.3 and job.data.test_fraction == 0.3
        first_order = job.method.get("first_order")
        assert row["method"] == {None: "protonet", False: "maml", True: "fomaml"}[first_order]
    # ProtoNet: one model, scored at 5 and 10 ways; MAML: one model per ways it trained.
    protonet = [r for r in result["rows"] if r["method"] == "protonet"]
    assert len({r["run"] for r in protonet}) == 1
    assert all(r["train_ways"] == 5 for r in protonet)
    maml = [r for r in result["rows"] if r["method"] != "protonet"]
    assert len({r["run"] for r in maml}) == 2
    assert all(r["train_ways"] == r["ways"] for r in maml)
    assert {(p["method"], p["ways"], p["shots"]) for p in result["papers"]} == {
        (m, w, k) for m in fewshot.METHODS for w in (5, 20) for k in (1, 5)
    }
    table = fewshot.markdown_table(result)
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(lines) == 1 + 6  # header + methods x ways
    assert table.count("not run") == 2  # MAML and FOMAML at 10 ways, said so


def hand_built() -> dict:
    row = {"test_episodes": 600, "steps": 1000, "train_test_acc": None, "run": "x"}
    return {
        "data": "omniglot",
        "methods": ["protonet", "maml"],
        "ways": [5, 20],
        "shots": [1],
        "budget_minutes": 60.0,
        "max_time_per_run": "00:00:10:00",
        "rows": [
            {
                **row,
                "method": "protonet",
                "ways": 5,
                "shots": 1,
                "test_acc": 0.9612,
                "ci95": 0.0041,
                "train_ways": 60,
                "episodes_seen": 4000,
                "wall_seconds": 598.2,
            },
            {
                **row,
                "method": "protonet",
                "ways": 20,
                "shots": 1,
                "test_acc": 0.8876,
                "ci95": 0.0033,
                "train_ways": 60,
                "episodes_seen": 4000,
                "wall_seconds": 598.2,
            },
            {
                **row,
                "method": "maml",
                "ways": 5,
                "shots": 1,
                "test_acc": 0.9130,
                "ci95": 0.0082,
                "train_ways": 5,
                "episodes_seen": 32000,
                "wall_seconds": 601.0,
            },
        ],
        "papers": fewshot.paper_rows(),
    }


def test_table_shows_papers_beside_measured() -> None:
    table = fewshot.markdown_table(hand_built())
    lines = {line.split("|")[1].strip() + line.split("|")[2].strip(): line for line in
             table.splitlines() if line.startswith("| ") and "---" not in line}  # fmt: skip
    assert "| 96.1 ± 0.4 | 98.8 (Snell et al. 2017) | 4,000 | 10.0 min |" in lines["ProtoNet5"]
    assert "| 88.8 ± 0.3 | 96.0 (Snell et al. 2017) |" in lines["ProtoNet20"]
    assert "| 91.3 ± 0.8 | 98.7 (Finn et al. 2017) | 32,000 | 10.0 min |" in lines["MAML5"]
    # MAML was not trained at 20-way: the row says so and the paper's number still shows.
    assert "| not run | 95.8 (Finn et al. 2017) |" in lines["MAML20"]
    assert "Not run: MAML 20-way 1-shot" in table
    assert "60 min of meta-training" in table and "00:00:10:00" in table


def test_table_on_digits_says_papers_are_omniglot() -> None:
    result = {**hand_built(), "data": "digits", "budget_minutes": None}
    table = fewshot.markdown_table(result)
    assert "test acc % ± 95% CI (digits)" in table and "paper (Omniglot)" in table
    assert "The papers' numbers are Omniglot's" in table
    assert "No time budget" in table


def test_budget_and_plan() -> None:
    assert fewshot.max_time(6 / 10 * 60 / 60) == "00:00:00:01"  # at least one second
    assert fewshot.max_time(90) == "00:00:01:30"
    assert fewshot.max_time(2 * 86400 + 3 * 3600 + 4 * 60 + 5) == "02:03:04:05"
    plan = fewshot.training_plan("omniglot", list(fewshot.METHODS), [5, 20], [1, 5])
    assert [(name, jobs) for name, _, jobs, _ in plan] == [
        ("protonet", 2), ("maml_5way", 4), ("maml_20way", 4)
    ]  # fmt: skip
    # Finn et al.'s 20-way recipe only where it belongs
    assert "method.inner_lr=0.1" in plan[2][3] and "method.inner_lr=0.1" not in plan[1][3]
    assert "method.first_order=false,true" in plan[1][3]


def test_omniglot_needs_a_root() -> None:
    with pytest.raises(SystemExit):
        fewshot.main(["--data", "omniglot"])
