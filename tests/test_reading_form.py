"""The reading form of the scripts: copy-clean reusable pieces, enough prose, short lessons,
one checkpoint vocabulary. These read the source; the end-to-end tests run it."""

from __future__ import annotations

import ast
import io
import re
import subprocess
import sys
import tokenize

import pytest

from tests.conftest import ROOT, SCRIPTS

BANNER = re.compile(r"^# ?#{10,}")


def source(stem: str) -> str:
    return (ROOT / f"{stem}.py").read_text()


def reusable_region(text: str) -> str:
    """The lines between the "Reusable pieces" banner and the next banner."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# Reusable pieces"))
    end = next(i for i in range(start + 2, len(lines)) if BANNER.match(lines[i]))
    return "\n".join(lines[start + 2:end])


def non_common_imports(text: str) -> str:
    tree = ast.parse(text)
    kept = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
            and not (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("common"))]
    return "\n".join(ast.get_source_segment(text, node) for node in kept)


@pytest.mark.parametrize("stem", SCRIPTS)
def test_reusable_pieces_copy_without_common_or_lesson_constants(stem, tmp_path):
    """The region plus the script's third-party imports has no undefined name (ruff F821)."""
    text = source(stem)
    piece = non_common_imports(text) + "\n\n\n" + reusable_region(text) + "\n"
    assert "common" not in non_common_imports(text)
    completed = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--isolated", "--select", "F821",
         "--stdin-filename", f"{stem}_pieces.py", "-"],
        input=piece, capture_output=True, text=True, cwd=tmp_path, check=False)
    assert completed.returncode == 0, completed.stdout


def prose_share(text: str) -> float:
    """Comment and docstring lines over non-blank lines."""
    tree = ast.parse(text)
    prose = {token.start[0] for token in tokenize.generate_tokens(io.StringIO(text).readline)
             if token.type == tokenize.COMMENT and not re.match(r"#\s*%%\s*$", token.string)}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body \
                and isinstance(node.body[0], ast.Expr) \
                and isinstance(node.body[0].value, ast.Constant) \
                and isinstance(node.body[0].value.value, str):
            prose.update(range(node.body[0].lineno, node.body[0].end_lineno + 1))
    return len(prose) / max(1, sum(1 for line in text.splitlines() if line.strip()))


@pytest.mark.parametrize("stem", SCRIPTS)
def test_at_least_35_percent_of_each_script_is_prose(stem):
    assert prose_share(source(stem)) >= 0.35


@pytest.mark.parametrize("stem", SCRIPTS)
def test_no_lesson_body_over_40_lines(stem):
    tree = ast.parse(source(stem))
    long = {node.name: node.end_lineno - node.lineno + 1 for node in tree.body
            if isinstance(node, ast.FunctionDef) and node.name.startswith("lesson")
            and node.end_lineno - node.lineno + 1 > 40}
    assert long == {}


@pytest.mark.parametrize("stem", SCRIPTS)
def test_every_numbered_cell_runs_its_lesson_in_a_notebook(stem):
    """Each "# %% N." cell defines a lesson and calls it under `if in_notebook():`."""
    cells = re.split(r"^# %% ", source(stem), flags=re.MULTILINE)[1:]
    numbered = [cell for cell in cells if re.match(r"\d+[a-z]?\. ", cell)]
    assert numbered
    for cell in numbered:
        assert "if in_notebook():" in cell, cell.splitlines()[0]
    assert 'if __name__ == "__main__" and not in_notebook():' in source(stem)


def test_nobody_says_optim_for_optimizer():
    for stem in SCRIPTS:
        assert not re.search(r"""["']optim["']""", source(stem)), stem
