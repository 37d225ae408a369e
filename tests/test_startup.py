"""Commands that only read the config must not pay for torch (a few seconds per call)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from benchmarks.startup import imported_modules
from tests.conftest import HANG_TIMEOUT_S, ROOT


@pytest.mark.parametrize(
    ("script", "args"),
    [("train.py", ["--help"]), ("train.py", ["--cfg", "job"]), ("eval.py", ["--help"])],
)
def test_config_only_commands_do_not_import_torch(script: str, args: list[str]) -> None:
    command = [sys.executable, "-X", "importtime", str(ROOT / script), *args]
    result = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=HANG_TIMEOUT_S
    )
    assert result.returncode == 0, result.stderr[-2000:]
    modules = imported_modules(result.stderr)
    assert "hydra" in modules  # the report was read
    assert not {"torch", "lightning", "torchvision"} & modules
