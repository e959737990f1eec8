"""Confine a test's writes to its tmp_path, whatever the code under test does.

The hostile-input tests feed the copyable classes manifests and names that point outside their
folder; a regression in a path check would then write or delete a real file of the machine (the
tests run as root). The ``confined_writes`` fixture refuses such an operation BEFORE it happens
and fails the test:

- In this process, an audit hook (PEP 578) sees every file operation that Python code makes,
  however it is spelled (``open``, ``Path.write_text``, ``os.open``, ``os.replace``,
  ``Path.unlink``, ``shutil.rmtree``, ``mkdir``, ``symlink``, ``chmod``...). While a confined test
  runs, an operation that would create, write, rename, delete or change a path outside the
  test's tmp_path raises PermissionError and is recorded; the fixture fails the test at teardown
  even if the code under test swallowed the error. ``sys.addaudithook`` cannot be removed, so
  the hook is installed once and does nothing while no confined test runs; threads of the
  session's background script runs (conftest's ScriptRuns, named "script-runs") are ignored.
- ``torch.save(obj, path)`` opens its file in C++ and safetensors' ``save_file`` in Rust, which
  no audit hook sees: the fixture wraps ``torch.save``, ``torch.serialization.save`` and
  ``safetensors.torch.save_file`` to check a path argument (a script that imported one of
  them by name before the test, ``from torch import save``, keeps the unwrapped one).
- Python processes the test starts with ``subprocess`` (from the test's thread) get the same
  hook through tests/confined_site/sitecustomize.py (PYTHONPATH) and report to a log file that
  the fixture reads (tests/zygote.py's forks run that sitecustomize too). Their per-user
  cache and config folders (XDG_CACHE_HOME, XDG_CONFIG_HOME, MPLCONFIGDIR: matplotlib creates
  ~/.config/matplotlib and ~/.cache/matplotlib on import) point into a folder beside
  tmp_path. The environment of the test process itself is not changed, so background runs
  started meanwhile are not confined.

Not covered: other C, C++ or Rust code that opens a file by name (in this process or a child),
programs that are not Python, os.mkfifo/os.mknod (no audit event), and a child started with
``python -I``, ``-E`` or ``-S`` (it skips sitecustomize; tests/zygote.py's fork of
``python -I`` skips it too). Reads are never refused. Byte-code caches (``__pycache__``) are
allowed anywhere.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

ALLOWED_ENV = "CONFINED_WRITES_TO"
LOG_ENV = "CONFINED_WRITES_LOG"
SITE = Path(__file__).resolve().parent / "confined_site"
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
# audit event -> positions of (path, dir_fd) pairs it changes (dir_fd None: no dir_fd argument)
CHANGES = {
    "os.remove": [(0, 1)], "os.rmdir": [(0, 1)], "os.mkdir": [(0, 2)],
    "os.rename": [(0, 2), (1, 3)], "os.replace": [(0, 2), (1, 3)],
    "os.link": [(1, 3)], "os.symlink": [(1, 2)], "os.truncate": [(0, None)],
    "os.chmod": [(0, 2)], "os.chown": [(0, 3)], "os.utime": [(0, 3)],
    "os.setxattr": [(0, None)], "os.removexattr": [(0, None)],
    "shutil.rmtree": [(0, 1)], "shutil.copyfile": [(1, None)], "shutil.copytree": [(1, None)],
    "shutil.move": [(0, None), (1, None)],
}


class Confinement:
    """Where writes may go while a confined test runs, and what was refused."""

    def __init__(self, allowed: Path, log: Path | None = None, child: bool = False,
                 also: tuple[str, ...] = ()) -> None:
        self.allowed = os.path.realpath(allowed)
        self.also = tuple(os.path.realpath(path) for path in also)  # e.g. the session's caches
        self.log = log  # a child reports to it; the parent reads it at the end of the test
        self.child = child
        # A child's per-user caches (matplotlib's ~/.config and ~/.cache folders) go here.
        self.home = None if log is None else os.path.realpath(log.with_suffix(".home"))
        self.refused: list[str] = []


_active: Confinement | None = None
_busy = threading.local()  # the hook's own file operations must not re-enter it


def _absolute(path, dir_fd) -> str | None:
    """The real absolute path an operation names (symlinks resolved), or None for a descriptor."""
    if isinstance(path, int) or path is None:
        return None
    path = os.fsdecode(path)
    if not os.path.isabs(path):
        base = os.getcwd() if dir_fd in (None, -1) else os.readlink(f"/proc/self/fd/{dir_fd}")
        path = os.path.join(base, path)
    return os.path.realpath(path)


def _targets(event: str, args: tuple) -> list[str]:
    """The paths an audit event would create, write, rename, delete or change."""
    if event == "open":
        path, mode, flags = args
        writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(
            flags & WRITE_FLAGS)
        found = [_absolute(path, None)] if writes else []
    else:
        found = [_absolute(args[p], None if d is None else args[d]) for p, d in CHANGES[event]]
    return [path for path in found if path is not None]


def _allowed(confinement: Confinement, path: str) -> bool:
    inside = [root for root in (confinement.allowed, confinement.home, *confinement.also)
              if root is not None and (path == root or path.startswith(root + os.sep))]
    # /proc/<this process>/clear_refs resets the process's own peak RSS (the memory tests of
    # tests/test_inspect_fuzz.py measure a bound that way); it touches no file.
    own_clear_refs = path in (f"/proc/{os.getpid()}/clear_refs", "/proc/self/clear_refs")
    return bool(inside) or "__pycache__" in path.split(os.sep) or path == os.devnull or (
        confinement.log is not None and path == os.path.realpath(confinement.log)) or \
        own_clear_refs


def refuse(confinement: Confinement, what: str, path: str) -> None:
    """Record a refused operation (and log it for the parent) and raise PermissionError."""
    message = f"{what} {path!r} (outside {confinement.allowed})"
    confinement.refused.append(message)
    if confinement.child and confinement.log is not None:
        with open(confinement.log, "a") as log:
            log.write(f"pid {os.getpid()}: {message}\n")
    raise PermissionError(f"confined test: refused {message}")


def _hook(event: str, args: tuple) -> None:
    confinement = _active
    if confinement is None or (event != "open" and event not in CHANGES):
        return
    if getattr(_busy, "flag", False) or threading.current_thread().name.startswith(
            "script-runs"):
        return
    _busy.flag = True
    try:
        outside = [p for p in _targets(event, args) if not _allowed(confinement, p)]
        if outside:
            refuse(confinement, event, outside[0])
    finally:
        _busy.flag = False


_installed = False


def activate(confinement: Confinement | None) -> None:
    """Start (or, with None, stop) refusing writes outside ``confinement.allowed``."""
    global _active, _installed
    if not _installed:
        sys.addaudithook(_hook)
        _installed = True
    _active = confinement


def activate_from_environment() -> None:
    """In a child process: confine it as the parent test asked (tests/confined_site)."""
    if os.environ.get(ALLOWED_ENV):
        log = os.environ.get(LOG_ENV)
        allowed, *also = os.environ[ALLOWED_ENV].split(os.pathsep)
        activate(Confinement(Path(allowed), Path(log) if log else None, child=True,
                             also=tuple(also)))


def confined_popen(original, confinement: Confinement):
    """``subprocess.Popen.__init__`` that passes the confinement on to a child, when the
    test's own thread starts it (a background thread's child keeps its environment)."""
    owner = threading.current_thread()

    def init(self, args, *rest, env=None, **kwargs):
        if threading.current_thread() is owner:
            env = dict(os.environ if env is None else env)
            env[ALLOWED_ENV] = os.pathsep.join([confinement.allowed, *confinement.also])
            env[LOG_ENV] = str(confinement.log)
            for name, folder in (("XDG_CONFIG_HOME", "config"), ("XDG_CACHE_HOME", "cache"),
                                 ("MPLCONFIGDIR", "matplotlib")):
                env[name] = os.path.join(confinement.home, folder)
            env["PYTHONPATH"] = os.pathsep.join(
                [str(SITE)] + [p for p in [env.get("PYTHONPATH")] if p])
        original(self, args, *rest, env=env, **kwargs)

    return init


def confined(tmp_path: Path, monkeypatch, also: tuple[str, ...] = ()):
    """Generator for a fixture: confine the test to ``tmp_path`` (and the folders ``also``
    names: the session's own caches); fail the test if it reached out."""
    import torch

    log = tmp_path.parent / f"{tmp_path.name}.confinement.log"
    confinement = Confinement(tmp_path, log, also=also)
    import safetensors.torch
    import torch.serialization

    def guarded(module, name: str, position: int, keyword: str) -> None:
        """Replace ``module.name`` by a wrapper that checks its path argument first."""
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            target = args[position] if len(args) > position else kwargs.get(keyword)
            if isinstance(target, str | os.PathLike) and _active is confinement:
                path = _absolute(target, None)
                if not _allowed(confinement, path):
                    refuse(confinement, f"{module.__name__}.{name}", path)
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    # Writers whose file is opened in C++ or Rust, where the audit hook sees nothing.
    guarded(torch, "save", 1, "f")
    guarded(torch.serialization, "save", 1, "f")
    guarded(safetensors.torch, "save_file", 1, "filename")
    monkeypatch.setattr(subprocess.Popen, "__init__",
                        confined_popen(subprocess.Popen.__init__, confinement))
    activate(confinement)
    try:
        yield confinement
    finally:
        activate(None)
    children = log.read_text().splitlines() if log.exists() else []
    refused = confinement.refused + children
    assert not refused, "the test reached outside its tmp_path:\n" + "\n".join(refused)
