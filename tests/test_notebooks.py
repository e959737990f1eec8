"""Every script runs as a notebook: jupytext turns its `# %%` cells into a notebook, and a
Jupyter kernel started in the project folder executes them top to bottom."""

from __future__ import annotations

import json
import os
import re

import jupytext
import pytest
from nbclient import NotebookClient

from tests.conftest import ROOT, SCRIPTS

NUMBERED = re.compile(r"^\d+[a-z]?\. ")
# The notebook test checks the form (every cell runs and shows its banner), not the figures,
# which the end-to-end tests check on the default run: a smaller I/O benchmark keeps it quick.
EXTRA_ARGS = {"02_checkpoint_manager": "--io-mb 16 --epochs 3"}


def cell_output(cell) -> str:
    parts = []
    for output in cell.get("outputs", []):
        parts.append(output.get("text", ""))
        parts.extend(str(value) for value in output.get("data", {}).values())
    return "".join(parts)


@pytest.mark.parametrize("stem", SCRIPTS)
def test_script_runs_as_a_notebook(stem, tmp_path, monkeypatch):
    notebook = jupytext.read(ROOT / f"{stem}.py")
    out_dir = tmp_path / "out"
    # A kernel has no command line: the flags travel in LESSON_ARGS (see common/run.py).
    monkeypatch.setenv("LESSON_ARGS",
                       f"--device cpu --out-dir {out_dir} {EXTRA_ARGS.get(stem, '')}".strip())
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}})
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
    numbered = [cell for cell in notebook.cells
                if NUMBERED.match(cell.get("metadata", {}).get("title", ""))]
    assert numbered, "no numbered lesson cells"
    silent = [cell.metadata["title"] for cell in numbered if not cell_output(cell).strip()]
    assert silent == []
    for cell in numbered:  # each cell shows its own section's banner
        number = cell.metadata["title"].split(".")[0]
        assert f"======== {number}." in cell_output(cell), cell.metadata["title"]
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["script"] == stem and summary["metrics"]
    assert not list(ROOT.glob("outputs/*/summary.json.partial"))
