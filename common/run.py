"""Run plumbing every script's ``main()`` uses: shared flags, out-dir, banners, summary.json.

A run writes only inside its out-dir (default ``outputs/<script stem>/`` beside the script,
git-ignored) and ends by writing ``summary.json``::

    {"script": ..., "seconds": ..., "environment": {...}, "args": {...},
     "metrics": {name: number | string | bool}, "artifacts": {name: path relative to out-dir}}

Tests and tools read that file, never the console prose.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

from common.devices import environment, pick_device, seed_everything

Metric = int | float | str | bool


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
    """``1536`` -> ``'1.5 KB'``: sizes for people (powers of 1000, like file browsers)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n_bytes) < 1000 or unit == "GB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.2f} {unit}"
        n_bytes /= 1000
    raise AssertionError("unreachable")


def print_section(title: str) -> None:
    """Print a section banner; ``Run.section`` uses it, and so can worker processes."""
    print(f"\n{'=' * 8} {title} {'=' * max(4, 90 - len(title))}", flush=True)


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
        """Parse ``argv`` (``None``: ``sys.argv``), seed, create the out-dir, print a header."""
        return cls(script_file, parser.parse_args(argv))

    def section(self, title: str) -> None:
        """Print a banner for ``title``; use the same ``N. Heading`` as the ``# %%`` cell."""
        print_section(title)

    def path(self, name: str) -> Path:
        """The path of a file called ``name`` inside the out-dir (sub-folders are created)."""
        target = self.out_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

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
