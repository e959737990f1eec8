"""Started by tests/confinement.py for a confined test's child processes (via PYTHONPATH):
refuse and log writes outside the test's tmp_path, as the parent's audit hook does."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "tests_confinement", Path(__file__).resolve().parents[1] / "confinement.py")
_confinement = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_confinement)
_confinement.activate_from_environment()
