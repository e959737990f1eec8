"""Mutation testing of the copyable safety-critical functions: do the tests notice a bug?

    python tests/mutation.py                      # every target below (tens of minutes)
    python tests/mutation.py --only atomic_write  # targets whose name contains a word
    python tests/mutation.py --list               # the mutants, without running anything

Why not mutmut? mutmut 3 imports the code it mutates by module name, and its trampolines
record which tests reach a function under that name; our scripts' names start with a digit
and the tests load them by path (tests/conftest.py load_script), so mutmut finds no test for
any mutant. This runner is small and does the same job for named functions:

1. Copy the project (tracked files only) to a temporary folder: the checkout is never touched
   and no mutant file is left in it.
2. Parse each target function (TARGETS: script, qualified name, the tests that guard it) and
   list its mutation sites: a comparison turned around (== !=, < >=, in / not in, is / is not),
   and/or swapped, a `not` dropped, True/False flipped, an integer n made n + 1, a statement
   that is a call removed (an os.fsync, an os.replace, a check), a `raise` removed, a returned
   value replaced by None.
3. For each mutant, write the script with ONLY that function replaced (the rest of the file
   stays byte-identical), run the target's tests with pytest -x in a forked child of a process
   that has already imported torch (a mutant costs the tests, not the imports), and count it
   KILLED when a test fails (or errors, or runs past the timeout), SURVIVED when all pass.
4. Print every survivor with its line, so it can be read: a real gap (add a test) or an
   equivalent mutant (the code means the same).

A baseline run of each target's tests (no mutant) must pass first. Not part of .ci/run.
"""

from __future__ import annotations

import argparse
import ast
import copy
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOSTILE = "tests/test_hostile_inputs.py"
# Slow tests left out of every selection (tens of seconds each; the others cover their code).
SLOW = ("not two_writer_processes and not two_processes_registering and not torchrun"
        " and not kill_9 and not sigterm_mid_epoch and not stateful_loader")


def select(words: str) -> str:
    """A pytest -k expression: tests named by any of ``words``, the slow ones left out."""
    return f"({words}) and {SLOW}"


@dataclass(frozen=True)
class Target:
    script: str  # the file, relative to the project root
    function: str  # "name" or "Class.method"
    tests: tuple[str, ...]  # pytest arguments: files, and -k expressions
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or f"{self.script.split('_')[0]} {self.function}"


T02 = ("tests/test_02_checkpoint_manager.py", "tests/test_02_crash_points.py",
       "tests/test_02_durability.py", HOSTILE)
T01 = ("tests/test_01_basic_save_load.py", "tests/test_inspect_fuzz.py")
# Keep this list short and honest: each entry names the tests that really reach the function.
TARGETS = [
    Target("02_checkpoint_manager.py", "atomic_write",
           (*T02, "-k", select("atomic_write or durab or switch or midway or killed_mid_write"
                               " or manifest_round_trip or umask or tampered or truncated"))),
    Target("02_checkpoint_manager.py", "plain_file_name",
           (*T02, "-k", select("manifest or symlink or resume or hostile"))),
    Target("02_checkpoint_manager.py", "WriterLock.acquire",
           (*T02, "-k", select("lock or second_manager or pending or interrupted or async"))),
    Target("02_checkpoint_manager.py", "Manifest.read",
           (*T02, "-k", select("manifest or damaged or latest or monitor or hostile"))),
    Target("02_checkpoint_manager.py", "Manifest.entry",
           (*T02, "-k", select("manifest or damaged or latest or monitor or hostile"))),
    Target("02_checkpoint_manager.py", "Manifest.recover",
           (*T02, "-k", select("orphan or recover or every_filesystem_step or interrupt"))),
    Target("02_checkpoint_manager.py", "Retention.split",
           (*T02, "-k", select("retention or best or nan or inf or resaving"))),
    Target("02_checkpoint_manager.py", "verify_file",
           (*T02, "-k", select("tampered or checksum or truncated or bare_sha256 or intact"
                               " or damaged or verified"))),
    Target("02_checkpoint_manager.py", "load_verified",
           (*T02, "-k", select("tampered or checksum or truncated or intact or damaged"
                               " or verified or swap"))),
    Target("02_checkpoint_manager.py", "check_resume_state",
           (*T02, "-k", select("resume"))),
    Target("01_basic_save_load.py", "_judge", (*T01, "-k", "inspect or attack or advice")),
    Target("01_basic_save_load.py", "PickleRecords._global",
           (*T01, "-k", "inspect or attack or advice or fuzz")),
    Target("03_model_versioning.py", "verify_version",
           ("tests/test_03_model_versioning.py", "tests/test_03_crash_points.py", HOSTILE, "-k",
            select("verify or tamper or hostile or fingerprint or swap"))),
    Target("03_model_versioning.py", "ModelRegistry.folder",
           (HOSTILE, "tests/test_03_crash_points.py", "-k", select("registry or outside"))),
]

SWAP_COMPARE = {ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Lt: ast.GtE, ast.GtE: ast.Lt,
                ast.Gt: ast.LtE, ast.LtE: ast.Gt, ast.In: ast.NotIn, ast.NotIn: ast.In,
                ast.Is: ast.IsNot, ast.IsNot: ast.Is}


class Mutator(ast.NodeTransformer):
    """Counts mutation sites in visiting order; applies the one numbered ``which`` (if any)."""

    def __init__(self, which: int | None = None) -> None:
        self.which, self.count, self.applied = which, 0, ""

    def _site(self, description: str, node: ast.AST) -> bool:
        hit = self.count == self.which
        if hit:
            self.applied = f"line {getattr(node, 'lineno', '?')}: {description}"
        self.count += 1
        return hit

    def visit_Compare(self, node: ast.Compare) -> ast.AST:
        self.generic_visit(node)
        for index, op in enumerate(node.ops):
            if type(op) in SWAP_COMPARE and self._site(
                    f"{type(op).__name__} -> {SWAP_COMPARE[type(op)].__name__}", node):
                node.ops[index] = SWAP_COMPARE[type(op)]()
        return node

    def visit_BoolOp(self, node: ast.BoolOp) -> ast.AST:
        self.generic_visit(node)
        other = ast.Or if isinstance(node.op, ast.And) else ast.And
        if self._site(f"{type(node.op).__name__} -> {other.__name__}", node):
            node.op = other()
        return node

    def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.op, ast.Not) and self._site("`not` dropped", node):
            return node.operand
        return node

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        if isinstance(node.value, bool):
            if self._site(f"{node.value} -> {not node.value}", node):
                return ast.copy_location(ast.Constant(not node.value), node)
        elif isinstance(node.value, int) and self._site(f"{node.value} -> {node.value + 1}",
                                                        node):
            return ast.copy_location(ast.Constant(node.value + 1), node)
        return node

    def visit_Expr(self, node: ast.Expr) -> ast.AST:
        if isinstance(node.value, ast.Call) and self._site(
                f"call removed: {ast.unparse(node)[:60]}", node):
            return ast.copy_location(ast.Pass(), node)
        self.generic_visit(node)
        return node

    def visit_Raise(self, node: ast.Raise) -> ast.AST:
        if self._site("raise removed", node):
            return ast.copy_location(ast.Pass(), node)
        return node

    def visit_Return(self, node: ast.Return) -> ast.AST:
        self.generic_visit(node)
        if node.value is not None and not (isinstance(node.value, ast.Constant)
                                           and node.value.value is None):
            if self._site("returns None", node):
                node.value = None
        return node


def find_function(tree: ast.Module, qualified: str) -> ast.FunctionDef:
    """The function ``qualified`` names; a SystemExit naming it when it no longer exists."""
    scope: list[ast.stmt] = tree.body
    *classes, name = qualified.split(".")
    for class_name in classes:
        scope = next((n.body for n in scope if isinstance(n, ast.ClassDef)
                      and n.name == class_name), [])
    found = next((n for n in scope if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
                  and n.name == name), None)
    if found is None:
        raise SystemExit(f"mutation target {qualified} not found: update TARGETS")
    return found


def mutant_source(source: str, qualified: str, which: int | None) -> tuple[str, int, str]:
    """The script with mutant ``which`` of one function (None: count the sites only)."""
    function = find_function(ast.parse(source), qualified)
    docstring = ast.get_docstring(function) is not None
    body = function.body[1:] if docstring else function.body  # the docstring is not mutated
    mutator = Mutator(which)
    mutated = copy.deepcopy(function)
    mutated.body[len(function.body) - len(body):] = [mutator.visit(stmt) for stmt in
                                                     copy.deepcopy(body)]
    if which is None:
        return source, mutator.count, ""
    ast.fix_missing_locations(mutated)
    first = min([function.lineno] + [d.lineno for d in function.decorator_list])
    lines = source.splitlines(keepends=True)
    indent = " " * function.col_offset
    new = "".join(indent + line + "\n" for line in ast.unparse(mutated).splitlines())
    return "".join(lines[:first - 1]) + new + "".join(lines[function.end_lineno:]), \
        mutator.count, mutator.applied


def copy_project(destination: Path) -> None:
    """The tracked files of the checkout (with the working tree's edits), nothing else."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    for relative in listed:
        source = ROOT / relative
        if source.is_file():
            (destination / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / relative)


def run_tests(project: Path, tests: tuple[str, ...], timeout: int) -> str:
    """Run pytest -x on ``tests`` in a forked child; "passed", "failed" or "timeout"."""
    pid = os.fork()
    if pid == 0:  # the child: quiet, in the copy, then pytest
        try:
            os.chdir(project)
            sys.path.insert(0, str(project))
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            signal.alarm(timeout)
            import pytest

            code = pytest.main(["-x", "-q", "-p", "no:cacheprovider", *tests])
        except BaseException:  # noqa: BLE001 - anything here means "not passed"
            code = 99
        os._exit(int(code))
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGALRM:
        return "timeout"
    code = os.waitstatus_to_exitcode(status)
    return "passed" if code == 0 else "no tests" if code == 5 else "failed"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="", help="targets whose label contains this word")
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per test run")
    args = parser.parse_args()
    targets = [t for t in TARGETS if args.only in t.label]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch  # noqa: F401 - imported once, before forking: each mutant skips it

    totals = {"killed": 0, "survived": 0}
    with tempfile.TemporaryDirectory(prefix="mutation-") as folder:
        project = Path(folder)
        copy_project(project)
        for target in targets:
            path = project / target.script
            original = path.read_text()
            _, sites, _ = mutant_source(original, target.function, None)
            print(f"== {target.label}: {sites} mutants; tests {' '.join(target.tests)}")
            if args.list:
                for which in range(sites):
                    print(f"   {mutant_source(original, target.function, which)[2]}")
                continue
            started = time.perf_counter()
            baseline = run_tests(project, target.tests, args.timeout)
            print(f"   baseline (no mutant): {baseline} in {time.perf_counter() - started:.0f} s",
                  flush=True)
            if baseline != "passed":
                print("   fix the tests first; target skipped")
                continue
            killed, survivors = 0, []
            for which in range(sites):
                source, _, applied = mutant_source(original, target.function, which)
                path.write_text(source)
                outcome = run_tests(project, target.tests, args.timeout)
                print(f"   {'SURVIVED' if outcome == 'passed' else 'killed  '} {applied}"
                      f" ({outcome})", flush=True)
                if outcome == "passed":
                    survivors.append(applied)
                else:
                    killed += 1
            path.write_text(original)
            totals["killed"] += killed
            totals["survived"] += len(survivors)
            print(f"   killed {killed}/{sites} in {time.perf_counter() - started:.0f} s")
    total = totals["killed"] + totals["survived"]
    if total:
        print(f"kill ratio {totals['killed']}/{total} = {totals['killed'] / total:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
