"""03's registry against crashes, hostile folders and hostile records, tested by class.

- A register is killed (SIGKILL) before EACH filesystem call it makes, found by wrapping
  those calls, and interrupted (KeyboardInterrupt) at each in turn; afterwards a process
  that did not run it sees the previous or the new registry exactly, and registers again.
- Whatever the registry folder holds (symlinks out of it, FIFOs, directories where files
  belong), nothing outside it is created, written or deleted; every refusal is one error.
- Hostile JSON values in registry.json and metadata.json (hypothesis) only ever give the
  script's own IntegrityError.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import resource
import shutil
import signal
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

from common.models import MLP
from tests.conftest import load_script, open_descriptors
from tests.threads import own_threads

lesson = load_script("03_model_versioning")
TINY = {"class": "MLP", "kwargs": {"in_features": 4, "hidden": 4, "num_classes": 2,
                                   "dropout": 0.0}}
STEPS = ("open", "write", "fsync", "replace", "rename", "unlink", "mkdir", "rmdir")


@pytest.fixture(autouse=True)
def no_git(monkeypatch):
    """git rev-parse is a subprocess per register; the commit is not what these tests test."""
    monkeypatch.setattr(lesson, "git_commit", lambda folder: None)


def tiny_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return MLP(**TINY["kwargs"])


def register(registry, seed: int):
    return registry.register("m", tiny_model(seed), architecture=TINY, hyperparameters={},
                             history=[], data_fingerprint="x", seed=seed)


def weight_bytes(state_dict) -> dict[str, bytes]:
    return {key: value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
            for key, value in state_dict.items()}


def tree(folder: Path) -> dict[str, bytes | str]:
    """Every entry under ``folder`` (not following links): file bytes, or its kind."""
    found = {}
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        found[name] = (f"link->{os.readlink(path)}" if path.is_symlink() else "dir"
                       if path.is_dir() else path.read_bytes() if path.is_file() else "other")
    return found


class FaultInjector:
    """Wraps ``os.<step>`` for each step in STEPS; runs ``action`` before call number ``at``.

    The registry's every filesystem effect goes through these functions (shutil.rmtree and
    Path.mkdir call them too), so calling ``action`` before the k-th call, for k = 1, 2, ...,
    visits every instant at which a crash can leave a different state on disk.
    """

    def __init__(self, at: int, action) -> None:
        self.at, self.action, self.calls = at, action, 0
        self.original = {name: getattr(os, name) for name in STEPS}
        self.threads = own_threads()
        self.own: set[threading.Thread] = set()

    def _wrap(self, function):
        def wrapper(*args, **kwargs):
            if threading.current_thread() in self.own:
                self.calls += 1
                if self.calls == self.at:
                    self.action()
            return function(*args, **kwargs)
        return wrapper

    def __enter__(self) -> FaultInjector:
        # The session's own threads call these functions too while a test runs: only this
        # thread and the threads it starts are counted and interrupted (tests/threads.py).
        self.own = self.threads.__enter__()
        for name, function in self.original.items():
            setattr(os, name, self._wrap(function))
        return self

    def __exit__(self, *exc_info) -> None:
        self.threads.__exit__(*exc_info)
        for name, function in self.original.items():
            setattr(os, name, function)


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def interrupt() -> None:
    raise KeyboardInterrupt


def wait_for(pid: int, timeout: float = 120.0) -> int:
    """waitpid with a deadline, so a hung child fails the test instead of hanging it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.002)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"child {pid} hung for {timeout} s")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A registry holding 1.0, and the weights that 1.0 and the next register (1.1) hold."""
    root = tmp_path_factory.mktemp("crash") / "base"
    register(lesson.ModelRegistry(root, code_folder=root), 0)
    return root, weight_bytes(tiny_model(0).state_dict()), weight_bytes(tiny_model(1).state_dict())


def check_state(root: Path, old: dict, new: dict) -> tuple[str, list[str]]:
    """Open the registry afresh: it is the previous state or the new one, bit for bit, and a
    following register works; returns which state it was, and what recovery said."""
    registry = lesson.ModelRegistry(root, code_folder=root)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        versions = registry.versions("m")
        assert versions in (["1.0"], ["1.0", "1.1"]), versions
        for version, expected in zip(versions, (old, new), strict=False):
            assert weight_bytes(registry.load("m", version).model.state_dict()) == expected
        again = register(registry, 1)  # the same weights again: 1.1, new or found
        assert again.metadata["version"] == "1.1" and registry.versions("m") == ["1.0", "1.1"]
        assert weight_bytes(registry.load("m", "1.1").model.state_dict()) == new
    left = [p.name for p in (root / "m").iterdir() if p.name.startswith(".")
            or p.name.endswith(".partial")]
    assert left == [".lock"], left  # no staging, no temporary, nothing set aside
    assert all(issubclass(w.category, lesson.RegistryWarning) for w in said)
    return ("new" if len(versions) == 2 else "previous"), [str(w.message) for w in said]


def test_a_register_killed_at_every_filesystem_step_loses_nothing(base, tmp_path):
    source, old, new = base
    states, messages, point = [], [], 0
    while True:
        point += 1
        root = tmp_path / f"kill{point}"
        shutil.copytree(source, root)
        pid = os.fork()
        if pid == 0:  # the child: register 1.1 and die before call number `point`
            code = 3
            try:
                with FaultInjector(point, kill_self):
                    register(lesson.ModelRegistry(root, code_folder=root), 1)
                code = 0
            finally:
                os._exit(code)
        status = wait_for(pid)
        if os.WIFEXITED(status):  # it ran to the end: every step before it was a crash point
            assert os.WEXITSTATUS(status) == 0
            assert check_state(root, old, new)[0] == "new"
            break
        assert os.WTERMSIG(status) == signal.SIGKILL
        state, said = check_state(root, old, new)
        states.append(state)
        messages += said
    crash_points = point - 1
    print(f"\n  SIGKILL before each of {crash_points} filesystem calls of a register: "
          f"{states.count('previous')} left the previous state, {states.count('new')} the new "
          f"one; recovery said: {sorted({m.split(': ')[1].split(' ')[0] for m in messages})}")
    assert crash_points >= 20 and "previous" in states and "new" in states
    assert any("adopted 1.1" in m for m in messages)  # killed between rename and index
    assert any(".incoming, left by" in m for m in messages)  # killed inside the staging
    assert any(".partial, left by" in m for m in messages)  # killed inside the index write


def test_a_register_interrupted_at_every_filesystem_step_loses_nothing(base, tmp_path):
    source, old, new = base
    states, point = [], 0
    while True:
        point += 1
        root = tmp_path / f"interrupt{point}"
        shutil.copytree(source, root)
        before = open_descriptors(tmp_path)
        interrupted = False
        with FaultInjector(point, interrupt):
            try:
                register(lesson.ModelRegistry(root, code_folder=root), 1)
            except KeyboardInterrupt:
                interrupted = True
        assert open_descriptors(tmp_path) == before  # nothing leaked: the lock was released
        states.append(check_state(root, old, new)[0])
        if not interrupted:
            break
    print(f"\n  KeyboardInterrupt before each of {point - 1} filesystem calls, then going on "
          f"in the same process: {states.count('previous')} previous, "
          f"{states.count('new') - 1} new states, every following register worked")
    assert point - 1 >= 20 and "previous" in states


# ---- a hostile folder: nothing outside it is created, written or deleted ---------------------

def hostile_cases(root: Path, outside: Path) -> dict:
    """Each case puts one hostile entry into a registry holding 1.0 and 1.1."""
    model = root / "m"

    def link(name: str, target: Path) -> None:
        path = model / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        path.symlink_to(target)

    return {
        "lock -> outside file": lambda: link(".lock", outside / "sentinel.txt"),
        "lock -> missing outside file": lambda: link(".lock", outside / "created.txt"),
        "lock is a FIFO": lambda: ((model / ".lock").unlink(), os.mkfifo(model / ".lock")),
        "lock is a folder": lambda: ((model / ".lock").unlink(), (model / ".lock").mkdir()),
        "registry.json -> outside": lambda: link("registry.json", outside / "sentinel.txt"),
        "registry.json is a FIFO": lambda: ((model / "registry.json").unlink(),
                                            os.mkfifo(model / "registry.json")),
        "version folder -> outside": lambda: link("1.1", outside / "folder"),
        "unindexed version -> outside": lambda: link("7.0", outside / "folder"),
        "staging -> outside": lambda: link(".2.0.0123456789ab.incoming", outside / "folder"),
        "index temporary -> outside": lambda: link("registry.json.0123456789ab.partial",
                                                   outside / "sentinel.txt"),
        "model folder -> outside": lambda: (shutil.rmtree(model), model.symlink_to(
            outside / "folder")),
        "metadata.json -> outside": lambda: link("1.1/metadata.json", outside / "sentinel.txt"),
        "weights are a FIFO": lambda: ((model / "1.1" / "model.safetensors").unlink(),
                                       os.mkfifo(model / "1.1" / "model.safetensors")),
    }


@contextlib.contextmanager
def no_hang(seconds: int = 60):
    """Turn a blocked open (a FIFO read without O_NONBLOCK) into a failure, not a hang."""
    def alarm(*_):
        raise AssertionError(f"blocked for {seconds} s")
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile") / "registry"
    registry = lesson.ModelRegistry(root, code_folder=root)
    register(registry, 0)
    register(registry, 1)
    return root


@pytest.mark.parametrize("case", list(hostile_cases(Path("r"), Path("o"))))
def test_nothing_outside_the_registry_changes_whatever_the_folder_holds(two_versions, tmp_path,
                                                                        case):
    root, outside = tmp_path / "registry", tmp_path / "outside"
    shutil.copytree(two_versions, root)
    shutil.copytree(root / "m" / "1.1", outside / "folder")  # a link's target would verify
    (outside / "sentinel.txt").write_text("precious")
    hostile_cases(root, outside)[case]()
    before = tree(outside)
    registry = lesson.ModelRegistry(root, code_folder=root, lock_timeout=5)
    errors = []
    with no_hang(), warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        for attempt in (lambda: registry.versions("m"), lambda: registry.load("m", "1.1"),
                        lambda: register(registry, 2),
                        lambda: registry.set_alias("m", "production", "1.0")):
            try:
                attempt()
            except lesson.IntegrityError as err:
                errors.append(str(err))
            assert tree(outside) == before, case
        assert lesson.verify_cli(str(root / "m" / "1.1")) in (0, 1)
    assert tree(outside) == before and (outside / "sentinel.txt").read_text() == "precious"
    assert all(str(root) in e and "\n" not in e for e in errors), errors
    repairs = [str(w.message) for w in said if issubclass(w.category, lesson.RegistryWarning)]
    assert errors or any(re.search(r"(set 7\.0 aside|removed) ", m) for m in repairs), case
    if case.startswith("lock ->"):
        assert any("refuses the lock file (a symlink" in e for e in errors), errors


# ---- a swapped folder, look-alike versions, and an architecture record that asks for 14 GB ---

def test_a_version_folder_swapped_for_another_version_is_refused(two_versions, tmp_path, capsys):
    root = tmp_path / "registry"
    shutil.copytree(two_versions, root)
    shutil.rmtree(root / "m" / "1.0")
    shutil.copytree(root / "m" / "1.1", root / "m" / "1.0")  # nothing forged: a real copy
    registry = lesson.ModelRegistry(root, code_folder=root)
    with pytest.raises(lesson.IntegrityError, match=r"registry\.json records m 1\.0 .*replaced"):
        registry.load("m", "1.0")
    assert lesson.verify_cli(str(root / "m" / "1.0")) == 1
    printed = capsys.readouterr().out
    assert printed.startswith("FAILED: ") and "the folder was replaced" in printed
    assert lesson.verify_cli(str(root / "m" / "1.1")) == 0  # the original still verifies
    assert "matches registry.json" in capsys.readouterr().out


@pytest.mark.parametrize("look_alike", ["１.０", "٠١.٠", "1.٠"])
def test_versions_and_aliases_are_ascii_digits_only(two_versions, tmp_path, look_alike):
    root = tmp_path / "registry"
    shutil.copytree(two_versions, root)
    registry = lesson.ModelRegistry(root, code_folder=root)
    with pytest.raises(lesson.IntegrityError, match="not a version number"):
        registry.folder("m", look_alike)
    with pytest.raises(lesson.IntegrityError, match="ASCII"):
        registry.set_alias("m", look_alike, "1.0")
    shutil.copytree(root / "m" / "1.0", root / "m" / look_alike)  # on disk: never adopted
    assert registry.versions("m") == ["1.0", "1.1"]
    index_path = root / "m" / "registry.json"
    index = json.loads(index_path.read_text())
    index["versions"][look_alike] = index["versions"]["1.0"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(lesson.IntegrityError, match="not a version number"):
        registry.versions("m")


def forge_huge_architecture(two_versions: Path, folder: Path, kwargs: dict | None = None,
                            name: str = "Linear", model: nn.Module | None = None) -> None:
    """A self-consistent version whose record names nn.Linear(60000, 60000): 14.4 GB (or
    another torch.nn class ``name`` with ``kwargs``, holding the weights of ``model``)."""
    metadata = json.loads((two_versions / "m" / "1.0" / "metadata.json").read_text())
    metadata["architecture"] = {"module": "torch.nn", "class": name, "kwargs": kwargs or {
        "in_features": 60000, "out_features": 60000}}
    lesson.VersionedModel(model or nn.Linear(3, 2), metadata).save(folder, card=lambda m: "")


def in_limited_child(work) -> dict:
    """``work()`` run in a forked child whose memory is capped at 2 GB more than now, so a
    regression fails instead of swapping; returns what ``work`` returned (a dict; on an
    exception, its type and message) and how much the peak RSS grew, in MB."""
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:
        result = {}
        try:
            os.close(reader)
            size = int(re.search(r"VmSize:\s+(\d+)", Path("/proc/self/status").read_text())[1])
            limit = size * 1024 + 2 * 2**30
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            with contextlib.suppress(OSError):
                Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS
            start = int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text())[1])
            try:
                result.update(work())
            except BaseException as err:  # noqa: BLE001 - the test reports the type
                result.update(error=type(err).__name__, message=str(err))
            peak = int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text())[1])
            result["peak_growth_mb"] = (peak - start) / 1024
        finally:
            os.write(writer, json.dumps(result).encode())
            os._exit(0)
    os.close(writer)
    wait_for(pid)
    with os.fdopen(reader) as handle:
        return json.loads(handle.read())


def test_a_huge_architecture_record_is_refused_before_anything_is_allocated(two_versions,
                                                                            tmp_path):
    forge_huge_architecture(two_versions, tmp_path / "forged")

    def work():
        lesson.VersionedModel.load(tmp_path / "forged", lesson.build_from_record)
        return {"error": "none"}

    result = in_limited_child(work)
    print(f"\n  nn.Linear(60000, 60000) record: {result.get('error')}, peak RSS grew by "
          f"{result.get('peak_growth_mb', float('nan')):.1f} MB (the layer is 14,400 MB)")
    assert result["error"] == "IntegrityError", result
    assert "field 'architecture' does not describe the weights" in result["message"]
    assert result["peak_growth_mb"] < 500
    with pytest.raises(ValueError, match="does not rebuild this model"):
        lesson.ModelRegistry(tmp_path / "r").register(
            "m", nn.Linear(3, 2), architecture={"class": "Linear", "kwargs": {
                "in_features": 60000, "out_features": 60000}},
            hyperparameters={}, history=[], data_fingerprint="x", seed=0)


@pytest.mark.parametrize("key, value", [("device", "cpu"), ("dtype", "float64")])
def test_a_record_never_chooses_the_device_or_dtype(two_versions, tmp_path, key, value):
    # {"device": "cpu"} would build the layer in real memory, past the meta device: refused
    # by its key, before anything is built (Linear(3, 2) itself would load fine).
    kwargs = {"in_features": 3, "out_features": 2, key: value}
    forge_huge_architecture(two_versions, tmp_path / "forged", kwargs)
    with pytest.raises(lesson.IntegrityError, match=f"kwargs '{key}': the loader chooses"):
        lesson.VersionedModel.load(tmp_path / "forged", lesson.build_from_record)
    with pytest.raises(ValueError, match=f"kwargs '{key}'"):
        lesson.ModelRegistry(tmp_path / "r").register(
            "m", nn.Linear(3, 2), architecture={"class": "Linear", "kwargs": kwargs},
            hyperparameters={}, history=[], data_fingerprint="x", seed=0)


def test_a_count_in_the_record_stops_the_meta_build_early(two_versions, tmp_path):
    # num_layers=3,000,000 costs nothing per layer on meta, but its Python loop ran > 60 s.
    kwargs = {"input_size": 1, "hidden_size": 1, "num_layers": 3_000_000}
    forge_huge_architecture(two_versions, tmp_path / "forged", kwargs, "LSTM", nn.LSTM(1, 1))

    def work():
        lesson.VersionedModel.load(tmp_path / "forged", lesson.build_from_record)
        return {"error": "none"}

    result = in_limited_child(work)  # without the limit: killed by the ceiling, or hung
    print(f"\n  LSTM(num_layers=3,000,000) record: {result.get('message')}")
    assert result["error"] == "IntegrityError", result
    assert re.search(r"makes more than \d+ parameters and buffers", result["message"])


def oversized(weights: Path, how: str) -> str:
    """Grow ``weights`` to 8 GiB (sparse: no disk) in one of three ways; the field to blame."""
    data = weights.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header, body = json.loads(data[8:8 + size]), data[8 + size:]
    last = max((key for key in header if key != "__metadata__"),
               key=lambda key: header[key]["data_offsets"][-1])
    if how == "header length":
        weights.write_bytes((2**40).to_bytes(8, "little") + data[8:])
    elif how != "grown":
        if how == "lying data_offsets":  # the last tensor ends at 8 GiB, says the header
            header[last]["data_offsets"][-1] = 8 * 2**30
        else:  # a tensor renamed: not the tensors metadata.json records
            header[last + "_"] = header.pop(last)
        text = json.dumps(header).encode()
        weights.write_bytes(len(text).to_bytes(8, "little") + text + body)
    os.truncate(weights, 8 * 2**30)
    return {"header length": "header length", "renamed tensor": "tensors"}.get(
        how, "data_offsets")


@pytest.mark.parametrize("how", ["grown", "header length", "lying data_offsets",
                                 "renamed tensor"])
def test_an_oversized_weights_file_is_refused_before_it_is_read(two_versions, tmp_path, how):
    root = tmp_path / "registry"
    shutil.copytree(two_versions, root)
    weights = root / "m" / "1.1" / "model.safetensors"
    field = oversized(weights, how)
    registry = lesson.ModelRegistry(root, code_folder=root)

    def work():
        out = {}
        with pytest.raises(lesson.IntegrityError) as raised:
            registry.load("m", "1.1")
        out["load"] = str(raised.value)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            out["verify_rc"] = lesson.verify_cli(str(weights))
        out["verify"] = printed.getvalue()
        index_path = root / "m" / "registry.json"  # and as an unindexed folder, recovered:
        index = json.loads(index_path.read_text())
        del index["versions"]["1.1"]
        index_path.write_text(json.dumps(index))
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            out["versions"] = registry.versions("m")
        out["said"] = [str(w.message) for w in said]
        out["again"] = register(registry, 1).metadata["version"]
        return out

    result = in_limited_child(work)
    assert "error" not in result, result
    for said in (result["load"], result["verify"]):
        assert str(weights) in said and f"field {field}" in said, said
    assert result["verify_rc"] == 1 and result["verify"].startswith("FAILED: ")
    assert result["versions"] == ["1.0"] and "set 1.1 aside" in result["said"][0]
    assert result["again"] == "1.1" and result["peak_growth_mb"] < 500, result


def test_verify_checks_the_file_it_is_given(two_versions, tmp_path, capsys):
    # A path to a file the checks never read (another name, or none) is not an OK.
    root = tmp_path / "registry"
    shutil.copytree(two_versions, root)
    folder = root / "m" / "1.0"
    (folder / "evil.safetensors").write_bytes(b"garbage")
    expected = {"evil.safetensors": "metadata.json names 'model.safetensors' (field "
                "'weights_file')", "nonexistent.safetensors": "no such file"}
    for name, cause in expected.items():
        assert lesson.verify_cli(str(folder / name)) == 1, name
        printed = capsys.readouterr().out
        assert printed.startswith(f"FAILED: {folder / name}: ") and cause in printed, printed
    assert lesson.verify_cli(str(folder / "model.safetensors")) == 0
    assert capsys.readouterr().out.startswith("OK: ")


# ---- an unindexed folder that does not verify is set aside, and said so ----------------------

def test_an_unindexed_folder_that_does_not_verify_is_set_aside(two_versions, tmp_path):
    root = tmp_path / "registry"
    shutil.copytree(two_versions, root)
    index_path = root / "m" / "registry.json"
    index = json.loads(index_path.read_text())
    del index["versions"]["1.1"]  # as if the register died after its rename
    index_path.write_text(json.dumps(index))
    weights = root / "m" / "1.1" / "model.safetensors"
    damaged = weights.read_bytes()[:-1] + b"\x00"  # and the folder is damaged
    weights.write_bytes(damaged)
    registry = lesson.ModelRegistry(root, code_folder=root)
    with pytest.warns(lesson.RegistryWarning, match=r"set 1\.1 aside as \.set-aside\.1\.1\.") \
            as said:
        assert registry.versions("m") == ["1.0"]
    assert "tampered weights" in str(said[0].message)
    aside = [p for p in (root / "m").iterdir() if p.name.startswith(".set-aside.1.1.")]
    assert len(aside) == 1 and (aside[0] / "model.safetensors").read_bytes() == damaged
    assert register(registry, 1).metadata["version"] == "1.1"  # the registry is not stuck


# ---- hostile records: a FIFO, a folder, 100,000 levels, 10**400; then a fuzzer --------------

def deep(levels: int) -> str:
    return "[" * levels + "]" * levels


@pytest.mark.parametrize("target", ["registry.json", "1.0/metadata.json",
                                    "1.0/model.safetensors"])
@pytest.mark.parametrize("kind", ["fifo", "folder", "nested 100,000 deep", "10**400"])
def test_a_hostile_record_file_is_one_integrity_error(two_versions, tmp_path, target, kind):
    root = tmp_path / "registry"
    shutil.copytree(two_versions, root)
    path = root / "m" / target
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "10**400":
        path.write_text('{"versions": {"1.0": {"content": 1' + "0" * 400 + "}}, \"aliases\": {}}")
    else:
        path.write_text(deep(100_000))
    registry = lesson.ModelRegistry(root, code_folder=root)
    with no_hang(), pytest.raises(lesson.IntegrityError) as raised:
        registry.load("m", "1.0")
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)


HOSTILE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
    | st.sampled_from([10**400, -1, 2**63, 1e308, "1.0", "１.０", "../x", "0" * 64, []]),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8)


def field_paths(value, prefix=()):
    """Every path to a value inside a JSON record (the record itself is the empty path)."""
    yield prefix
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(
        value, list) else ()
    for key, child in items:
        yield from field_paths(child, (*prefix, key))


def replaced(record, path, value):
    if not path:
        return value
    copy = json.loads(json.dumps(record))
    holder = copy
    for key in path[:-1]:
        holder = holder[key]
    holder[path[-1]] = value
    return copy


FUZZ = settings(max_examples=100, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


def test_hostile_json_values_in_the_records_are_only_integrity_errors(two_versions, tmp_path):
    root = tmp_path / "registry"
    shutil.copytree(two_versions, root)
    model = root / "m"
    index_text = (model / "registry.json").read_text()
    index = json.loads(index_text)
    metadata = json.loads((model / "1.0" / "metadata.json").read_text())
    weights = load_file(model / "1.0" / "model.safetensors")
    counts = {"index": 0, "metadata": 0, "refused": 0, "accepted": 0}
    registry = lesson.ModelRegistry(root, code_folder=root)

    def outcome(call) -> None:
        try:
            call()
            counts["accepted"] += 1
        except lesson.IntegrityError as err:
            assert "\n" not in str(err)
            counts["refused"] += 1

    @FUZZ
    @given(st.sampled_from(list(field_paths(index))), HOSTILE)
    def fuzz_index(path, value):
        counts["index"] += 1
        (model / "registry.json").write_text(json.dumps(replaced(index, path, value)))
        outcome(lambda: registry.versions("m"))
        outcome(lambda: registry.aliases("m"))

    @FUZZ
    @given(st.sampled_from(list(field_paths(metadata))), HOSTILE)
    def fuzz_metadata(path, value):
        counts["metadata"] += 1
        text = json.dumps(replaced(metadata, path, value), indent=2) + "\n"
        (model / "1.0" / "metadata.json").write_text(text)
        # The attacker rewrites the weights' header too, so the hostile values get past
        # the metadata hash and reach everything that reads them.
        mutated = replaced(metadata, path, value)
        fingerprints = mutated.get("fingerprints") if isinstance(mutated, dict) else None
        fingerprint = fingerprints.get("content") if isinstance(fingerprints, dict) else None
        sha = hashlib.sha256(text.encode()).hexdigest()
        (model / "1.0" / "model.safetensors").unlink()
        save_file(weights, model / "1.0" / "model.safetensors",
                  metadata={"content_fingerprint": str(fingerprint), "metadata_sha256": sha})
        outcome(lambda: lesson.VersionedModel.load(model / "1.0", lesson.build_from_record))

    fuzz_index()
    (model / "registry.json").write_text(index_text)
    fuzz_metadata()
    print(f"\n  hostile JSON values: {counts['index']} registry.json and {counts['metadata']} "
          f"metadata.json examples, {counts['refused']} IntegrityErrors, {counts['accepted']} "
          "accepted, nothing else raised")
    assert counts["index"] >= 100 and counts["metadata"] >= 100 and counts["refused"] > 50
