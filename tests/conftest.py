"""Shared test plumbing: import numbered scripts by path, run them end to end once per session."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SCRIPTS = sorted(path.stem for path in ROOT.glob("[0-9][0-9]_*.py"))
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def load_script(stem: str) -> ModuleType:
    """Import ``NN_name.py`` as a module (its name starts with a digit, so ``import`` cannot)."""
    name = f"lesson_{stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / f"{stem}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look classes up here
    spec.loader.exec_module(module)
    return module


@dataclass
class ScriptRun:
    """One finished subprocess run of a script."""

    returncode: int
    stdout: str
    stderr: str
    out_dir: Path
    cwd: Path

    @property
    def summary(self) -> dict:
        return json.loads((self.out_dir / "summary.json").read_text())

    @property
    def metrics(self) -> dict:
        return self.summary["metrics"]


def run_script(stem: str, out_dir: Path, cwd: Path, *args: str, timeout: int = 900) -> ScriptRun:
    """Run ``python NN_name.py --out-dir out_dir *args`` from ``cwd`` and capture everything."""
    completed = subprocess.run(
        [sys.executable, str(ROOT / f"{stem}.py"), "--out-dir", str(out_dir), *args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False,
    )
    return ScriptRun(completed.returncode, completed.stdout, completed.stderr, out_dir, cwd)


@pytest.fixture(scope="session", autouse=True)
def shared_compiler_cache(tmp_path_factory):
    """One Inductor cache for the whole session: 05 compiles the same model as a script and
    as a notebook, and the second compile then takes seconds, not tens of seconds."""
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path_factory.mktemp("inductor_cache"))
    yield
    if previous is None:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def default_run(tmp_path_factory):
    """``default_run(stem, device)``: the script's default run, executed once per session."""
    cache: dict[tuple[str, str], ScriptRun] = {}

    def get(stem: str, device: str = "cpu") -> ScriptRun:
        if (stem, device) not in cache:
            out_dir = tmp_path_factory.mktemp(f"{stem}_{device}_out")
            cwd = tmp_path_factory.mktemp(f"{stem}_{device}_cwd")
            cache[stem, device] = run_script(stem, out_dir, cwd, "--device", device)
        return cache[stem, device]

    return get
