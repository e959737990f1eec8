"""Shared test plumbing: import numbered scripts by path, run them end to end once per session."""

from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import nbformat
import pytest
import torch

from tests import zygote
from tests.confinement import confined

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SCRIPTS = sorted(path.stem for path in ROOT.glob("[0-9][0-9]_*.py"))
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Whole-script runs (end to end, and as notebooks) start when the session starts, in the
# background, two at a time: the first test that needs one waits for that one only, and the
# tests that need none (most unit tests) run meanwhile; collection puts the tests that need
# a whole-script run last. Each background run gets ONE intra-op thread (OMP_NUM_THREADS=1):
# two 2-thread runs on 2 cores fight over them (measured here: 01, 04, 05 and 06 took 61 s
# two at a time with 2 threads each, 50 s with 1 each, 81 s one after the other). Every run
# is still a complete default run in its own process; only its thread count differs.
PARALLEL_RUNS = max(1, min(2, os.cpu_count() or 1))


# The tests in this process get one intra-op thread too, for the same reason: beside two
# background runs, torch's default (a thread per core) only adds threads that wait on each
# other; and so do the processes the tests start (the variable is inherited). Results within
# a process do not depend on the count; the comparisons with a script's run are made between
# runs that all have one thread (run_env).
if PARALLEL_RUNS > 1:
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"


def run_env() -> dict[str, str]:
    """The environment of a background run: this one (the shared compiler cache, and one
    intra-op thread where PARALLEL_RUNS > 1, set above)."""
    return dict(os.environ)
RUN_FIXTURES = ("default_run", "notebook_run")
# The notebook test checks the form (every cell runs and shows its banner), not the figures,
# which the end-to-end tests check on the default run: a smaller I/O benchmark keeps it quick.
# 07's notebook uses the session's S3 server (--s3-endpoint, ScriptRuns.s3_server): that is
# the run tests/test_07_s3.py checks the given-endpoint mode and the second client on.
NOTEBOOK_ARGS = {"02_checkpoint_manager": "--io-mb 16 --epochs 3"}
S3_NOTEBOOK = "07_distributed_training"


def expected_seconds(stem: str) -> float:
    """The "Takes: about N s" of a script's docstring: the longest runs start first."""
    found = re.search(r"^Takes:\s+about (\d+) s", (ROOT / f"{stem}.py").read_text(), re.M)
    return float(found[1]) if found else 0.0


def longest_first(runs) -> list[tuple[str, str]]:
    """(stem, device) pairs, the longest script first (then by name: a stable order)."""
    return sorted(runs, key=lambda key: (-expected_seconds(key[0]), key))


def stems_needed(items, fixture: str) -> set[tuple[str, str]]:
    """(stem, device) pairs the collected tests will ask ``fixture`` for.

    A test parametrized by ``stem`` (and ``device``) names its own; otherwise a test named
    ``test_NN_...`` or living in ``test_NN_*.py`` needs script NN on the CPU, and a test in
    test_end_to_end.py that names no script (the shared vocabulary) needs them all. A guess
    that misses only costs time: the fixture then runs the script when it is asked for.
    """
    needed = set()
    for item in items:
        if fixture not in getattr(item, "fixturenames", ()):
            continue
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "stem" in params:
            needed.add((params["stem"], params.get("device", "cpu")))
            continue
        number = re.match(r"test_(\d\d)_", item.name) or re.match(
            r"test_(\d\d)_", Path(str(item.fspath)).name)
        needed |= {(stem, "cpu") for stem in SCRIPTS
                   if number is None or stem.startswith(number[1])}
    return needed


NEEDED = pytest.StashKey[dict]()
WORK_MODULES = pytest.StashKey[set]()
# Long tests whose work is other processes (torchrun, kill -9 sequences: mostly waiting) hand
# that work to @background_work at import; the session starts it at once in a lane of its
# own, beside the script runs, and the test takes the result (background_result fixture):
# the minutes it waits then overlap the unit tests instead of following them.
BACKGROUND_WORK: dict[str, Callable[[Path], object]] = {}


def background_work(function: Callable[[Path], object]) -> Callable[[Path], object]:
    """Register ``function(folder)`` to run in the background from the session's start."""
    BACKGROUND_WORK[f"{function.__module__}.{function.__name__}"] = function
    return function


def waits_for_a_run(item) -> bool:
    """Whether a test waits for background work (a whole-script run, a @background_work)."""
    return any(f in getattr(item, "fixturenames", ()) for f in (*RUN_FIXTURES,
                                                                "background_result"))


@pytest.hookimpl(trylast=True)  # after -k/-m deselection: start only the runs still needed
def pytest_collection_modifyitems(session, config, items):
    """Remember which whole-script runs the session needs; run their tests last."""
    config.stash[NEEDED] = {fixture: stems_needed(items, fixture) for fixture in RUN_FIXTURES}
    config.stash[WORK_MODULES] = {item.module.__name__ for item in items
                                  if "background_result" in getattr(item, "fixturenames", ())}
    items.sort(key=waits_for_a_run)


def pytest_itemcollected(item):
    """A test marked ``@pytest.mark.cuda("what it checks")`` is skipped without CUDA, and
    ``pytest -rs`` lists it as "needs CUDA: what it checks" (a GPU machine runs it)."""
    marker = item.get_closest_marker("cuda")
    if marker is not None and not torch.cuda.is_available():
        what = marker.args[0] if marker.args else item.name
        item.add_marker(pytest.mark.skip(reason=f"needs CUDA: {what}"))


# Test modules whose tests cannot write or delete outside their tmp_path (tests/confinement.py):
# they feed the code under test paths that point at the machine's files.
CONFINED_MODULES = {"test_hostile_inputs.py", "test_02_crash_points.py", "test_03_crash_points.py",
                    "test_02_durability.py", "test_inspect_fuzz.py"}


@pytest.fixture(autouse=True)
def frozen_survivors():
    """Before each test, freeze what the session holds (gc.freeze; it only splices lists).

    The session keeps torch, onnx, executorch, the scripts and their caches alive to the end,
    and each of Python's full collections would walk all of them again: measured in a suite
    run, this process spent 12.5 s in 58 of them. Frozen, they are skipped, and a collection
    walks only what the running test made. Reference counting still frees what a test drops,
    but not its reference cycles (a caught exception's traceback and frames, a module and its
    hooks): frozen, they would stay for the session. So first collect the young generations,
    where most of them still are; it walks only objects made since the last freeze. Measured
    on test_02_crash_points, test_inspect_fuzz and test_hostile_inputs together: 70,000 such
    objects kept and peak RSS 1059 MB with the freeze alone, 27,000 and 1013 MB with this
    collection too (1017 MB with no freeze), for 0.3 s more in collections (a full one before
    each freeze cost as much as the freeze saved).
    """
    gc.collect(1)
    gc.freeze()
    yield


@pytest.fixture(scope="session", autouse=True)
def hypothesis_home(tmp_path_factory):
    """Hypothesis keeps its example database and caches under pytest's tmp, not a
    .hypothesis/ folder in the checkout (the current folder, by default)."""
    import hypothesis.configuration

    home = tmp_path_factory.mktemp("hypothesis")
    hypothesis.configuration.set_hypothesis_home_dir(home)
    yield home
    hypothesis.configuration.set_hypothesis_home_dir(None)


@pytest.fixture(autouse=True)
def confined_writes(request):
    """In a CONFINED_MODULES test: refuse, and fail on, any write outside its tmp_path."""
    if Path(str(request.node.fspath)).name not in CONFINED_MODULES:
        yield None
        return
    session_caches = [os.environ[name] for name in ("TORCHINDUCTOR_CACHE_DIR",)
                      if name in os.environ]  # pytest_sessionstart's, under pytest's tmp
    session_caches.append(str(request.getfixturevalue("hypothesis_home")))
    yield from confined(request.getfixturevalue("tmp_path"),
                        request.getfixturevalue("monkeypatch"), tuple(session_caches))


def open_descriptors(folder) -> list[str]:
    """This process's open descriptors on files under ``folder``: only these count in a leak
    check, as the session's background threads open and close descriptors of their own."""
    folder, found = os.path.realpath(folder), []
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # closed since listdir
            continue
        if target.startswith(folder + os.sep):
            found.append(target)
    return sorted(found)


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


# The process groups of the runs still going: ScriptRuns.close() kills them at session end,
# when no test is left to read their results (a collection error, -x, Ctrl-C, --cache-show).
LIVE_RUNS: set[subprocess.Popen] = set()


def run_captured(command: list[str], *, cwd, timeout: int, env: dict[str, str] | None,
                 pass_fds: tuple[int, ...] = ()) -> subprocess.CompletedProcess:
    """subprocess.run(command, capture_output=True, text=True), in a process group of its own
    (the script's children too: a Jupyter kernel, compile workers) that close() can kill."""
    with subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True,
                          pass_fds=pass_fds) as process:
        LIVE_RUNS.add(process)
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except BaseException:
            kill_group(process)
            process.communicate()
            raise
        finally:
            LIVE_RUNS.discard(process)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the run's whole process group (its session leader's pid is the group's id)."""
    with contextlib.suppress(OSError):  # already gone
        os.killpg(process.pid, signal.SIGKILL)


def run_script(stem: str, out_dir: Path, cwd: Path, *args: str, timeout: int = 900,
               env: dict[str, str] | None = None) -> ScriptRun:
    """Run ``python NN_name.py --out-dir out_dir *args`` from ``cwd`` and capture everything."""
    completed = run_captured(
        [sys.executable, str(ROOT / f"{stem}.py"), "--out-dir", str(out_dir), *args],
        cwd=cwd, timeout=timeout, env=env)
    return ScriptRun(completed.returncode, completed.stdout, completed.stderr, out_dir, cwd)


@dataclass
class NotebookRun:
    """One script executed as a notebook (tests/notebook_run.py) in its own process."""

    returncode: int
    stderr: str
    notebook: object  # the executed nbformat notebook; None if it could not be written
    out_dir: Path

    @property
    def summary(self) -> dict:
        return json.loads((self.out_dir / "summary.json").read_text())


class ScriptRuns:
    """Whole-script runs of this session, ``PARALLEL_RUNS`` at a time in the background."""

    def __init__(self, tmp_path_factory) -> None:
        self.tmp_path_factory = tmp_path_factory
        self.pool = concurrent.futures.ThreadPoolExecutor(
            PARALLEL_RUNS, thread_name_prefix="script-runs")  # tests/confinement.py skips them
        self.futures: dict[tuple[str, str, str], concurrent.futures.Future] = {}
        self.s3 = None
        self.s3_problem: str | None = None
        self.work_pool = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="script-runs-work")
        self.work_futures: dict[str, concurrent.futures.Future] = {}

    def work(self, function: Callable[[Path], object]) -> concurrent.futures.Future:
        """Start ``function`` (registered with background_work) once, in its own folder."""
        key = f"{function.__module__}.{function.__name__}"
        if key not in self.work_futures:
            folder = self.tmp_path_factory.mktemp(function.__name__[:30])
            self.work_futures[key] = self.work_pool.submit(function, folder)
        return self.work_futures[key]

    def s3_server(self):
        """The session's S3 server (SeaweedFS on free loopback ports), started on first use;
        None where weed or s3fs is missing or the server did not start (07 then starts its
        own, or prints SKIPPED; ``s3_problem`` says why). A failed start is not retried."""
        from common.s3server import missing_requirement, start_s3_server

        if self.s3 is None and self.s3_problem is None:
            self.s3_problem = missing_requirement()
            if self.s3_problem is None:
                try:
                    self.s3 = start_s3_server("ckpt",
                                              root=str(self.tmp_path_factory.mktemp("weed")))
                except (RuntimeError, OSError) as err:
                    self.s3_problem = f"the session's S3 server did not start: {err}"
        return self.s3

    def submit(self, fixture: str, stem: str, device: str = "cpu") -> concurrent.futures.Future:
        """Start a run (once); its folders (and a server it needs) are made here, in the main
        thread."""
        key = (fixture, stem, device)
        if key not in self.futures:
            folder = self.tmp_path_factory.mktemp(f"{stem}_{device}_{fixture}")
            if fixture == "default_run":
                self.futures[key] = self.pool.submit(run_default, stem, device, folder)
            else:
                args, env = NOTEBOOK_ARGS.get(stem, ""), {}
                server = self.s3_server() if stem == S3_NOTEBOOK else None
                if server is not None:
                    args += f" --s3-endpoint {server.endpoint} --s3-bucket {server.bucket}"
                    env = {"AWS_ACCESS_KEY_ID": server.key, "AWS_SECRET_ACCESS_KEY": server.secret}
                self.futures[key] = self.pool.submit(run_notebook, stem, device, folder, args, env)
        return self.futures[key]

    def close(self) -> None:
        """At session end: cancel the queued runs, kill those still going (no test is left to
        read them), wait for the background work, stop the S3 server."""
        try:
            self.pool.shutdown(wait=False, cancel_futures=True)
            for process in list(LIVE_RUNS):
                kill_group(process)
            self.pool.shutdown(wait=True)
            self.work_pool.shutdown(wait=True, cancel_futures=True)
        finally:
            if self.s3 is not None:
                self.s3.stop()

    def get(self, fixture: str, stem: str, device: str = "cpu"):
        return self.submit(fixture, stem, device).result()


def run_default(stem: str, device: str, folder: Path) -> ScriptRun:
    """The script's default run on ``device``, started from an empty folder of its own."""
    (folder / "cwd").mkdir()
    run = run_script(stem, folder / "out", folder / "cwd", "--device", device, env=run_env())
    # the console, kept beside the out-dir: what a reader of a failed run (or a GPU run's
    # --basetemp folder) looks at first
    (folder / "console.txt").write_text(run.stdout + "\n--- stderr ---\n" + run.stderr)
    return run


def run_notebook(stem: str, device: str, folder: Path, args: str = "",
                 env: dict[str, str] | None = None) -> NotebookRun:
    """The script executed cell by cell in a Jupyter kernel (see tests/notebook_run.py), with
    ``args`` as its flags and ``env`` added to its environment."""
    result = folder / "executed.ipynb"
    shared = zygote.share()  # the kernel is a fork of the session's server (notebook_run.py)
    completed = run_captured(
        [sys.executable, "-m", "tests.notebook_run", stem, str(folder / "out"), str(result),
         f"--device {device} {args}".strip()],
        cwd=ROOT, timeout=900, pass_fds=(shared[0],) if shared else (),
        env={**run_env(), **(env or {}), **({"TESTS_ZYGOTE": shared[1]} if shared else {})})
    notebook = nbformat.read(result, as_version=4) if result.exists() else None
    return NotebookRun(completed.returncode, completed.stderr, notebook, folder / "out")


RUNS = pytest.StashKey[ScriptRuns]()
PREVIOUS_CACHE = pytest.StashKey[object]()


def runs_whole_suite(config) -> bool:
    """Whether this session runs every test: no paths given (pyproject's testpaths) and
    nothing that narrows, reorders or only lists the selection."""
    option = config.option
    narrowing = ("keyword", "markexpr", "deselect", "ignore", "ignore_glob", "collectonly",
                 "lf", "stepwise", "showfixtures", "show_fixtures_per_test", "setuponly",
                 "setupplan", "cacheshow")  # stepwise: --sw-skip/--sw-reset set it too
    return (config.args_source == pytest.Config.ArgsSource.TESTPATHS
            and not any(getattr(option, name, None) for name in narrowing))


def session_runs(config) -> ScriptRuns:
    """The session's ScriptRuns, and its compiler cache, made on first use: a session that
    runs no test (--co, --fixtures) makes no tmp folder (with --basetemp, pytest would
    empty that folder)."""
    if RUNS not in config.stash:
        factory = config._tmp_path_factory  # what the tmp_path_factory fixture returns
        config.stash[PREVIOUS_CACHE] = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(factory.mktemp("inductor_cache"))
        config.stash[RUNS] = ScriptRuns(factory)
    return config.stash[RUNS]


def pytest_sessionstart(session):
    """On a whole-suite run, make the session's compiler cache and its ScriptRuns now and
    start the longest default runs at once, before collection.

    One Inductor cache serves the whole session (TORCHINDUCTOR_CACHE_DIR, which every run
    inherits): 05 compiles the same model as a script and as a notebook, and the second
    compile then takes seconds, not tens of seconds. Collection imports every test module
    (about 6 s here, on one core); a whole-suite run certainly needs the default runs that
    start first, so they start now, on the other core. Any other selection waits for
    collection to say which runs it needs (script_runs).
    """
    config = session.config
    if runs_whole_suite(config):
        runs = session_runs(config)
        for stem, device in longest_first((stem, "cpu") for stem in SCRIPTS)[:PARALLEL_RUNS]:
            runs.submit("default_run", stem, device)


def pytest_sessionfinish(session):
    """Kill the runs still going (and stop the S3 server); restore the cache variable; stop
    the fork server last (background work still going would start another one)."""
    config = session.config
    try:
        if RUNS not in config.stash:
            return
        try:
            config.stash[RUNS].close()
        finally:
            previous = config.stash[PREVIOUS_CACHE]
            if previous is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous
    finally:
        zygote.shutdown()


@pytest.fixture(scope="session", autouse=True)
def script_runs(pytestconfig):
    """Start every whole-script run the session needs: default runs first, longest first
    (those pytest_sessionstart started already are not started again)."""
    runs = session_runs(pytestconfig)
    needed = pytestconfig.stash.get(NEEDED, {})
    modules = pytestconfig.stash.get(WORK_MODULES, set())
    for function in BACKGROUND_WORK.values():  # registered by the modules collected
        if function.__module__ in modules:
            runs.work(function)
    for fixture in RUN_FIXTURES:
        for stem, device in longest_first(needed.get(fixture, ())):
            runs.submit(fixture, stem, device)
    return runs


@pytest.fixture(scope="session")
def default_run(script_runs):
    """``default_run(stem, device)``: the script's default run, executed once per session."""
    return lambda stem, device="cpu": script_runs.get("default_run", stem, device)


@pytest.fixture(scope="session")
def background_result(script_runs):
    """``background_result(function)``: what a @background_work function returned (its
    exception, raised here, if it failed)."""
    return lambda function: script_runs.work(function).result()


@pytest.fixture(scope="session")
def notebook_run(script_runs):
    """``notebook_run(stem)``: the script run as a notebook on the CPU, once per session."""
    return lambda stem: script_runs.get("notebook_run", stem)
