"""Every script runs as a notebook: jupytext turns its `# %%` cells into a notebook, and a
Jupyter kernel started in the project folder executes them top to bottom
(tests/notebook_run.py, started by conftest's ScriptRuns)."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import SCRIPTS

NUMBERED = re.compile(r"^\d+[a-z]?\. ")


def cell_output(cell) -> str:
    parts = []
    for output in cell.get("outputs", []):
        parts.append(output.get("text", ""))
        parts.extend(str(value) for value in output.get("data", {}).values())
    return "".join(parts)


@pytest.mark.parametrize("stem", SCRIPTS)
def test_script_runs_as_a_notebook(notebook_run, stem):
    run = notebook_run(stem)
    assert run.returncode == 0, run.stderr[-4000:]  # names the failing cell, with its traceback
    numbered = [cell for cell in run.notebook.cells
                if NUMBERED.match(cell.get("metadata", {}).get("title", ""))]
    assert numbered, "no numbered lesson cells"
    silent = [cell.metadata["title"] for cell in numbered if not cell_output(cell).strip()]
    assert silent == []
    for cell in numbered:  # each cell shows its own section's banner
        number = cell.metadata["title"].split(".")[0]
        assert f"======== {number}." in cell_output(cell), cell.metadata["title"]
    summary = json.loads((run.out_dir / "summary.json").read_text())
    assert summary["script"] == stem and summary["metrics"]
    assert summary["environment"]["device"] == "cpu"
    # The run wrote its files into run.out_dir: no temporary (*.partial) may be left there.
    assert sorted(str(p.relative_to(run.out_dir)) for p in run.out_dir.rglob("*.partial")) == []
