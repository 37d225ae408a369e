"""`python -m benchmarks.readme [--check]`: render README.md's results tables from the committed
result files, so no measured number in the README is typed by hand.

README.md marks each rendered block as

    <!-- results:<name> -->
    ... (generated from benchmarks/results/<name>.json) ...
    <!-- /results:<name> -->

and this command replaces every block's content with what the benchmark that wrote
`<name>.json` renders from it: a line naming the command, date and machine, then the table.
The table format lives in that benchmark's module (`markdown_table(result)`), next to the
code that measures it. `--check` only reports blocks that differ, with exit status 1
(tests/test_readme_results.py keeps the committed README equal to the rendered one).
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import shlex
import sys

from benchmarks.common import RESULTS, ROOT

README = ROOT / "README.md"
BLOCK = re.compile(
    r"<!-- results:(?P<name>[\w-]+) -->\n(?P<body>.*?)<!-- /results:(?P=name) -->", re.S
)


def load(name: str) -> dict:
    """The committed result `benchmarks/results/<name>.json`; a clear error if it is missing."""
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        raise SystemExit(
            f"README.md has a results:{name} block but {path.relative_to(ROOT)} does not exist: "
            f"run the benchmark that writes it, or remove the block."
        )
    return json.loads(path.read_text())


def benchmark_module(result: dict) -> str:
    """The module that wrote `result`, read from its recorded command (`python -m benchmarks.X
    ...`): the command is what produced the numbers, so it also picks their table format."""
    words = shlex.split(result["command"])
    return words[words.index("-m") + 1]


def provenance(name: str, result: dict) -> str:
    """The line above each table: the exact command, the commit it reproduces at (a
    benchmark's defaults may change later: `averaging`'s default recipe did), when and where
    it ran, and the file."""
    head = result.get("git_head")
    at = f" at commit {head[:7]}" if head else ""
    return (
        f"Measured with `{result['command']}`{at} on {result['date'][:10]}; machine: "
        f"{result['machine']}. Numbers: `benchmarks/results/{name}.json`."
    )


def render(name: str) -> str:
    """The full content of the `results:<name>` block, rendered from its JSON."""
    result = load(name)
    table = importlib.import_module(benchmark_module(result)).markdown_table(result)
    return f"{provenance(name, result)}\n\n{table}\n"


def blocks(text: str) -> dict[str, str]:
    """name -> current content of every results block in `text` (one block per name)."""
    found: dict[str, str] = {}
    for match in BLOCK.finditer(text):
        if match["name"] in found:
            raise SystemExit(f"README.md has two results:{match['name']} blocks")
        found[match["name"]] = match["body"]
    return found


def rendered(text: str) -> str:
    """`text` with every results block's content replaced by its rendering."""
    return BLOCK.sub(
        lambda m: f"<!-- results:{m['name']} -->\n{render(m['name'])}<!-- /results:{m['name']} -->",
        text,
    )


def orphans(text: str) -> list[str]:
    """Result files no README block shows: measured but never reported."""
    shown = set(blocks(text))
    return sorted(p.stem for p in RESULTS.glob("*.json") if p.stem not in shown)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="report differences, write nothing")
    args = parser.parse_args(argv)
    text = README.read_text()
    new = rendered(text)
    changed = [name for name, body in blocks(text).items() if blocks(new)[name] != body]
    for name in orphans(text):
        print(f"warning: benchmarks/results/{name}.json has no results:{name} block in README.md")
    if args.check:
        print("\n".join(f"out of date: results:{name}" for name in changed) or "README up to date")
        sys.exit(1 if changed else 0)
    README.write_text(new)
    print(f"rendered {len(blocks(new))} block(s); changed: {', '.join(changed) or 'none'}")


if __name__ == "__main__":
    main()
