"""Run plumbing every script's ``main()`` uses: shared flags, out-dir, banners, summary.json.

A run writes only inside its out-dir (default ``outputs/<script stem>/`` beside the script,
git-ignored) and ends by writing ``summary.json``::

    {"script": ..., "seconds": ..., "environment": {...}, "args": {...},
     "metrics": {name: number | string | bool}, "artifacts": {name: path relative to out-dir}}

Tests and tools read that file, never the console prose.

Two ways to run one file (see README, "Layout"):
- as a script, ``python NN_x.py [flags]``: ``main()`` runs the lessons in order;
- as a notebook (jupytext, VS Code, PyCharm, Jupyter: the ``# %%`` cells), top to bottom in a
  kernel started in the project folder: each lesson cell ends with
  ``if in_notebook(): ...`` and so runs its own lesson and shows its output. There is no
  command line in a kernel, so ``Run.start`` parses the flags in the ``LESSON_ARGS``
  environment variable instead (empty: the defaults), and a script names itself with
  :func:`script_file` because a kernel has no ``__file__``.
Importing a script (the tests do) runs nothing: both ways are guarded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shlex
import shutil
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from common.devices import environment, pick_device, seed_everything

Metric = int | float | str | bool


def in_notebook() -> bool:
    """True inside an IPython/Jupyter kernel (where VS Code and PyCharm run cells too).

    Looks only at modules already imported: a plain ``python script.py`` never imports
    IPython, so this costs nothing there.
    """
    ipython = sys.modules.get("IPython")
    return ipython is not None and getattr(ipython, "get_ipython", lambda: None)() is not None


def script_file(namespace: Mapping[str, object], name: str) -> Path:
    """The running script's path: ``__file__`` when there is one, else ``name`` in the
    current folder (a notebook kernel started in the project folder has no ``__file__``)."""
    return Path(str(namespace.get("__file__", name))).resolve()


def first_line(err: BaseException, containing: str = "") -> str:
    """The one line of an error message that matters, for printing a failure as a lesson.

    ANSI colour codes are removed; with ``containing``, the first line that contains it,
    from there on (else the first non-empty line).
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    lines = [line.strip(" -") for line in text.splitlines() if line.strip(" -")]
    for line in lines:
        if containing and containing in line:
            return line[line.index(containing):]
    return lines[0] if lines else type(err).__name__


def lesson_argv(argv: list[str] | None = None) -> list[str] | None:
    """The flags to parse: ``argv`` if given; in a notebook kernel, ``LESSON_ARGS`` split
    like a shell would; else None (argparse then reads ``sys.argv``)."""
    if argv is None and in_notebook():
        return shlex.split(os.environ.get("LESSON_ARGS", ""))
    return argv


def make_parser(script_file: str, description: str) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with the shared flags ``--device``, ``--out-dir`` and ``--seed``.

    Scripts add their own flags to the parser it returns.
    """
    stem = Path(script_file).stem
    parser = argparse.ArgumentParser(
        prog=Path(script_file).name,
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"],
        help="where to run; auto picks CUDA when available",
    )
    parser.add_argument(
        "--out-dir", type=Path, default=Path(script_file).resolve().parent / "outputs" / stem,
        help="folder for every file the run writes (created if missing)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for every random generator")
    return parser


def format_bytes(n_bytes: float) -> str:
    """``1536`` -> ``'1.54 KB'``: sizes for people (powers of 1000, like file browsers)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n_bytes) < 1000 or unit == "GB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.2f} {unit}"
        n_bytes /= 1000
    raise AssertionError("unreachable")


class Run:
    """One execution of a script: its device, out-dir, printed sections and recorded results."""

    def __init__(self, script_file: str, args: argparse.Namespace) -> None:
        self.script = Path(script_file).stem
        self.args = args
        self.device = pick_device(args.device)
        self.out_dir: Path = Path(args.out_dir).resolve()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.seed: int = args.seed
        self.metrics: dict[str, Metric] = {}
        self.artifacts: dict[str, str] = {}
        self._started = time.perf_counter()
        seed_everything(self.seed)
        print(f"{self.script}  |  torch {torch.__version__}  |  device {self.device}"
              f"  |  {torch.get_num_threads()} CPU threads")
        print(f"out-dir: {self.out_dir}")

    @classmethod
    def start(
        cls, script_file: str, parser: argparse.ArgumentParser, argv: list[str] | None = None
    ) -> Run:
        """Parse ``argv``, seed, create the out-dir, print a header.

        ``argv=None`` means ``sys.argv`` in a script, and ``LESSON_ARGS`` in a notebook kernel
        (whose own argv holds the kernel's flags, not the lesson's).
        """
        return cls(script_file, parser.parse_args(lesson_argv(argv)))

    def section(self, title: str) -> None:
        """Print a banner for ``title``; use the same ``N. Heading`` as the ``# %%`` cell."""
        print(f"\n{'=' * 8} {title} {'=' * max(4, 90 - len(title))}", flush=True)

    def path(self, name: str) -> Path:
        """The path of a file called ``name`` inside the out-dir (sub-folders are created)."""
        target = self.out_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def folder(self, name: str) -> Path:
        """A sub-folder of the out-dir, created if missing (its contents are kept)."""
        target = self.out_dir / name
        target.mkdir(parents=True, exist_ok=True)
        return target

    @contextlib.contextmanager
    def scratch(self, name: str) -> Iterator[Path]:
        """A sub-folder for a demonstration's throw-away files: emptied before, removed after.

        Only ever a folder inside the out-dir, so nothing else can be deleted by it.
        """
        target = self.out_dir / name
        if target.resolve().parent != self.out_dir:
            raise ValueError(f"scratch folder {name!r} must be a direct child of the out-dir")
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        try:
            yield target
        finally:
            shutil.rmtree(target, ignore_errors=True)

    def save_figure(self, figure, name: str, artifact: str) -> Path:
        """Save a matplotlib figure as a PNG in the out-dir, close it, record it as an artifact."""
        import matplotlib.pyplot as plt

        path = self.path(name)
        figure.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(figure)
        return self.artifact(artifact, path)

    def record_all(self, metrics: Mapping[str, Metric] | None) -> None:
        """Record every figure a lesson returned (``None``: nothing to record)."""
        for name, value in (metrics or {}).items():
            self.record(name, value)

    def record(self, name: str, value: Metric) -> Metric:
        """Record a metric for summary.json and return it unchanged."""
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"metric {name} is not finite: {value}")
        if not isinstance(value, (int, float, str, bool)):
            raise TypeError(f"metric {name} must be a number, string or bool, not {type(value)}")
        self.metrics[name] = value
        return value

    def artifact(self, name: str, path: Path) -> Path:
        """Record a file a reader may open (it must exist inside the out-dir) and print it."""
        path = Path(path).resolve()
        if not path.exists():
            raise FileNotFoundError(f"artifact {name}: {path} does not exist")
        relative = path.relative_to(self.out_dir)  # raises if a script wrote outside its out-dir
        self.artifacts[name] = relative.as_posix()
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() \
            else path.stat().st_size
        print(f"  wrote {relative} ({format_bytes(size)})")
        return path

    def remote_artifact(self, name: str, url: str) -> str:
        """Record an object-store URL (``s3://...``) a reader may open, and print it."""
        if "://" not in url:
            raise ValueError(f"artifact {name}: {url!r} is not a URL; use artifact()")
        self.artifacts[name] = url
        print(f"  wrote {url}")
        return url

    def finish(self, recap: list[str], try_it: str) -> dict:
        """Write summary.json, print the closing table and recap; return the summary."""
        seconds = round(time.perf_counter() - self._started, 2)
        summary = {
            "script": self.script,
            "seconds": seconds,
            "environment": environment(self.device),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(self.args).items()},
            "metrics": self.metrics,
            "artifacts": self.artifacts,
        }
        summary_path = self.out_dir / "summary.json"
        temporary = summary_path.with_name("summary.json.partial")
        temporary.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(temporary, summary_path)

        self.section("Summary")
        width = max([len(name) for name in self.metrics] + [10])
        for name, value in self.metrics.items():
            shown = f"{value:.6g}" if isinstance(value, float) else str(value)
            print(f"  {name:<{width}}  {shown}")
        print("\nWhat you now know:")
        for line in recap:
            print(f"  - {line}")
        print(f"\nFiles in {self.out_dir}:")
        for name, relative in self.artifacts.items():
            print(f"  {name:<{width}}  {relative}")
        print(f"\nTry it yourself: {try_it}")
        print(f"\nDone in {seconds:.1f} s; machine-readable results: {summary_path}")
        return summary
