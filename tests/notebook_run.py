"""Run one script as a notebook: ``python -m tests.notebook_run STEM OUT_DIR RESULT FLAGS``.

jupytext turns the script's ``# %%`` cells into a notebook; nbclient runs it in a Jupyter
kernel started in the project folder, with the lesson's flags in LESSON_ARGS (a kernel has no
command line). The executed notebook, outputs and any error included, is written to RESULT
either way; the exit status is 1 when a cell failed. Each notebook gets its own process so
that the tests can run two at a time. Started by the tests with the session's fork server
(tests/zygote.py: TESTS_ZYGOTE and its socket), the kernel is a fork of that server's
torch-importing process, as the tests' own Python children are, instead of a fresh python.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import jupyter_client.launcher
import jupytext
import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from tests import zygote

ROOT = Path(__file__).resolve().parents[1]


def main(stem: str, out_dir: str, result: str, flags: str = "") -> int:
    notebook = jupytext.read(ROOT / f"{stem}.py")
    os.environ["LESSON_ARGS"] = f"--out-dir {out_dir} {flags}".strip()
    os.environ["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    if zygote.attach():  # the pytest session's fork server: the kernel is one of its forks
        jupyter_client.launcher.Popen = zygote.popen  # (tests/zygote.py), not a fresh python
    client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}})
    try:
        client.execute()
        status = 0
    except CellExecutionError as err:  # the cell, its source and the traceback
        print(err, file=sys.stderr)
        status = 1
    nbformat.write(notebook, result)
    return status


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
