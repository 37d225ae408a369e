"""README numbers come from files: every results table in README.md equals its rendering from
the committed `benchmarks/results/<name>.json`, and every result file is shown. Runs no
benchmark; fix a failure with `make readme` (or by re-running the benchmark)."""

from __future__ import annotations

import pytest

from benchmarks import readme
from benchmarks.common import RESULTS

TEXT = readme.README.read_text()
BLOCKS = readme.blocks(TEXT)


def test_readme_has_results_blocks() -> None:
    assert BLOCKS, "README.md has no <!-- results:<name> --> blocks"


def test_markers_are_paired() -> None:
    """An unclosed or misspelled marker would silently leave a hand-typed table in place."""
    opened = TEXT.count("<!-- results:")
    closed = TEXT.count("<!-- /results:")
    assert opened == closed == len(BLOCKS)


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_block_equals_its_json(name: str) -> None:
    assert (RESULTS / f"{name}.json").is_file(), f"results:{name} has no committed JSON"
    assert BLOCKS[name] == readme.render(name), f"README results:{name} is stale: make readme"


def test_no_orphaned_results() -> None:
    assert readme.orphans(TEXT) == [], "result files with no README block"


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_result_records_its_provenance(name: str) -> None:
    """A number without its command, date and machine cannot be checked or reproduced."""
    result = readme.load(name)
    for key in ("command", "date", "machine"):
        assert result.get(key), f"{name}.json lacks {key!r}"
    assert result["command"].startswith("python -m benchmarks.")


def test_make_train_example_is_seed_0_of_the_default_run() -> None:
    """The sample summary under "The two commands" quotes metrics too: they must be the
    default-run benchmark's seed 0, as the README says."""
    example = TEXT.split("`make train` ends with a summary like this", 1)[1].split("```")[1]
    quoted = {
        line.split()[0]: line.split()[1]
        for line in example.splitlines()
        if line.strip().startswith("test/")
    }
    seed0 = next(r for r in readme.load("default_run")["runs"] if r["seed"] == 0)
    assert quoted, "no test/ metrics in the make train example"
    assert quoted == {key: f"{seed0['metrics'][key]:.4f}" for key in quoted}
