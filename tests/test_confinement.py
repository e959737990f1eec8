"""Tests touch nothing outside their tmp_path: the test sources name no machine path, and the
guard of tests/confinement.py really refuses a write outside (in the test and in a child)."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

import pytest
import safetensors.torch
import torch

from tests.confinement import Confinement, activate, confined, confined_popen
from tests.conftest import ROOT

# A folder of the machine, at the start of a string or after a quote, space, "=" or "(": the
# string names it as a path (r"\S*truncated\.pt", "models/*.json" or "a/tmp" do not match).
SYSTEM_PATH = re.compile(
    r"(?:^|(?<=[\s'\"=(,]))(?:/(?:etc|root|home|var|usr|tmp|opt|srv|boot|bin|sbin|lib|lib64|mnt"
    r"|media|run|dev)(?:/|$|(?=[\s'\")]))|~/)")
PATH_TEXT = re.compile(r"[^\s'\"),;]*")
# Calls that reach outside tmp_path without naming a path: the home folder, the shared temp
# folder (tempfile without dir=), the current folder moved for the whole process.
SYSTEM_CALLS = {"home", "expanduser", "gettempdir", "mkstemp", "mkdtemp", "NamedTemporaryFile",
                "TemporaryDirectory", "TemporaryFile", "SpooledTemporaryFile", "chdir"}


def docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring constants (prose, not code) of a module, class or function."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def system_paths_in(source: str, filename: str) -> list[str]:
    """Every string in ``source`` (code strings for ``python -c`` and f-string parts too,
    docstrings aside) that names a folder of the machine, and every call that reaches one."""
    tree = ast.parse(source)
    prose = docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                and id(node) not in prose):
            for match in SYSTEM_PATH.finditer(node.value):
                text = PATH_TEXT.match(node.value, match.start())[0]
                found.append(f"{filename}:{node.lineno}: {text}")
        if isinstance(node, ast.Call):
            name = getattr(node.func, "attr", getattr(node.func, "id", ""))
            has_dir = any(keyword.arg == "dir" for keyword in node.keywords)
            into_tmp = any("tmp_path" in ast.unparse(arg) for arg in node.args)  # chdir(tmp_path)
            if name in SYSTEM_CALLS and not has_dir and not into_tmp:
                found.append(f"{filename}:{node.lineno}: {name}()")
    return found


def test_the_scan_finds_what_it_is_for_and_nothing_else():
    # "@" stands for "/" so that the scan of this file does not find its own examples.
    hostile = '''
x = "@etc@passwd"; y = f"@tmp@fixed_{name}"; z = Path("@root@.ssh")
code = "open('@var@log@x', 'w')"; home = Path.home(); t = tempfile.mkdtemp()
cwd = os.chdir(somewhere); h = "~@.cache@x"; d = open("@dev@sda", "wb")
'''.replace("@", "/")
    found = sorted(line.split(": ", 1)[1] for line in system_paths_in(hostile, "t.py"))
    assert found == sorted(hit.replace("@", "/") for hit in [
        "@etc@passwd", "@tmp@fixed_", "@root@.ssh", "@var@log@x", "home()", "mkdtemp()",
        "chdir()", "~@.cache@x", "@dev@sda"])
    harmless = '''
"""A docstring may say @etc@passwd."""
exe = sys.executable; p = tmp_path / "etc" / "passwd"; m = r"exited: \\S*truncated\\.pt"
g = "models@*.json"; a = "a@tmp@b"; t = tempfile.mkdtemp(dir=tmp_path); s = "usr"
fd = f"@proc@self@fd@{number}"
'''.replace("@", "/")
    assert system_paths_in(harmless, "t.py") == []


def chdir_line() -> int:
    """The line of zygote.py's os.chdir(request["cwd"])."""
    lines = (ROOT / "tests" / "zygote.py").read_text().splitlines()
    return 1 + lines.index('    os.chdir(request["cwd"])')


def test_no_test_names_a_path_outside_its_tmp_path():
    # mutation.py is a developer tool run by hand, not a test: it copies the project into a
    # temporary folder of its own (tempfile's default) and runs the tests there. zygote.py's
    # one os.chdir is subprocess's cwd argument, applied in the forked child.
    found = [hit for path in sorted((ROOT / "tests").rglob("*.py"))
             if path.name != "mutation.py"
             for hit in system_paths_in(path.read_text(), path.name)
             if hit != f"zygote.py:{chdir_line()}: chdir()"]
    assert found == [], "tests must create what they attack under tmp_path:\n" + "\n".join(found)


def test_the_guard_refuses_writes_outside_and_fails_the_test(tmp_path, monkeypatch):
    """The guard of test_hostile_inputs.py, on a folder inside this test's tmp_path."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (outside / "precious").write_text("keep me")
    (allowed / "link").symlink_to(outside / "precious")
    confinement = Confinement(allowed, tmp_path / "children.log")
    monkeypatch.setattr(subprocess.Popen, "__init__",
                        confined_popen(subprocess.Popen.__init__, confinement))
    child = ("import os, sys\nfrom pathlib import Path\nfor act in (\n"
             "    lambda: Path(sys.argv[1], 'made').write_text('x'),\n"
             "    lambda: os.remove(Path(sys.argv[1], 'precious'))):\n"
             "    try: act()\n    except PermissionError: pass\n")
    activate(confinement)
    try:
        (allowed / "fine.txt").write_text("inside is allowed")
        attempts = [lambda: (outside / "new.txt").write_text("x"),
                    lambda: os.remove(outside / "precious"),
                    lambda: os.replace(allowed / "fine.txt", outside / "moved.txt"),
                    lambda: (outside / "folder").mkdir(),
                    lambda: (allowed / "link").write_text("through a symlink"),
                    lambda: os.open(outside / "raw", os.O_CREAT | os.O_WRONLY)]
        for attempt in attempts:
            with pytest.raises(PermissionError, match="confined test: refused"):
                attempt()
        completed = subprocess.run([sys.executable, "-c", child, str(outside)],
                                   capture_output=True, text=True, timeout=60, check=False)
    finally:
        activate(None)
    assert completed.returncode == 0, completed.stderr
    assert sorted(p.name for p in outside.iterdir()) == ["precious"]
    assert (outside / "precious").read_text() == "keep me"
    assert len(confinement.refused) == len(attempts)
    children = confinement.log.read_text().splitlines()
    assert len(children) == 2 and all("outside" in line for line in children), children


def test_the_fixture_fails_a_test_that_reached_out_even_if_it_swallowed_the_error(
        tmp_path, monkeypatch):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    fixture = confined(allowed, monkeypatch)  # what conftest's confined_writes runs
    next(fixture)
    torch.save({"w": torch.ones(1)}, allowed / "fine.pt")
    try:
        torch.save({"w": torch.ones(1)}, outside / "model.pt")  # C++ opens this file
    except PermissionError:
        pass  # code under test that swallows the error does not hide it
    for write in (lambda: torch.serialization.save({"w": torch.ones(1)}, outside / "b.pt"),
                  lambda: safetensors.torch.save_file({"w": torch.ones(1)},
                                                      outside / "c.safetensors")):
        with pytest.raises(PermissionError):  # torch's C++ and safetensors' Rust writers
            write()
    with pytest.raises(AssertionError, match=r"(?s)reached outside .*torch\.save .*model\.pt"
                       r".*b\.pt.*save_file .*c\.safetensors"):
        next(fixture)
    assert list(outside.iterdir()) == []
