"""02 · A checkpoint manager that never loses a run — keep the right checkpoints, survive crashes.

What you will learn (each section runs real code and prints the measured figure):
  1. Train with CheckpointManager: keep the last N and the best K, readable file names
  2. The manifest: list, inspect, load_latest, load_best, load by step
  3. Crash safety: atomic writes, so a crash mid-save damages nothing
  4. Damaged checkpoints are detected (SHA-256), reported, and skipped
  5. Bit-exact resume: train straight through vs crash + resume, max |diff| of the weights
  6. Asynchronous saving: how long a save stalls the training loop, sync vs async
  7. Training curves with the kept checkpoints marked

Run it:   python 02_checkpoint_manager.py [--out-dir D] [--epochs N] [--resume]
          --resume continues the run in D from its newest valid checkpoint; kill the process at
          any instant (even SIGKILL) and re-run with --resume: the final weights are bit-identical
          to an uninterrupted run with the same seed.
          As a notebook: open it in Jupyter (jupytext), VS Code or PyCharm and run the cells
          top to bottom from the project folder; flags go in the LESSON_ARGS variable.
Takes:    about 6 s on a 2-core CPU.
Next:     03_model_versioning.py, versions, fingerprints and integrity checks.

Files it writes (in --out-dir): checkpoints/ (the kept checkpoints, manifest.json and the
writer.lock file), final_model.pt (the trained weights, written atomically too),
training_curves.png and summary.json. The demonstrations of sections 3-6 work in scratch
folders that are removed when they finish.

How the options map to PyTorch Lightning's ModelCheckpoint:
  monitor="val_loss", mode="min"|"max"   same names, same meaning
  save_top_k=K                           same for K >= 1; K=0 differs: Lightning then keeps
                                         no checkpoint by metric (and -1 keeps all), here
                                         the best is ALWAYS kept
  keep_last=N                            save_last=True keeps one "last.ckpt"; here the N newest
  filename="...{step}...{value}..."      like filename="{epoch}-{val_loss:.2f}"
Where this class goes further: a manifest with SHA-256 per file, fsync'd atomic writes for
checkpoints AND the manifest, journaled deletions, damaged files skipped on load, complete RNG
and data-order state for a bit-exact resume, and one save in flight in a background thread
(Lightning's AsyncCheckpointIO and torch.distributed.checkpoint.async_save do the latter too;
Orbax's CheckpointManager has the retention and async parts, for JAX). And what none of
them promise for a folder that other processes touch: a writer lock, plain-file-name checks
on everything read from the manifest, and NaN metrics that can never become "best".
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import fcntl
import hashlib
import json
import math
import os
import random
import re
import secrets
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch

from common.compare import bit_identical, max_abs_diff
from common.data import make_image_classification, make_loaders
from common.devices import seed_everything
from common.models import MLP, SmallCNN
from common.run import Run, format_bytes, in_notebook, make_parser, script_file
from common.timing import benchmark
from common.training import evaluate, train_one_epoch

matplotlib.use("Agg")  # write PNG files, never open a window: works on servers and in CI
HERE = script_file(globals(), "02_checkpoint_manager.py")  # a notebook kernel has no __file__

# ############################################################################################
# Reusable pieces: copy these into your own code.
# ############################################################################################


class CheckpointWarning(UserWarning):
    """A checkpoint was damaged or missing and was skipped."""


class CheckpointError(RuntimeError):
    """A checkpoint folder or file cannot be used; the message names the file and the cause."""


def fsync_directory(directory: Path) -> None:
    """Make a rename or delete inside ``directory`` durable (POSIX; a no-op elsewhere).

    ``os.replace`` changes the directory, not the file; until the directory itself is flushed a
    power cut can forget the rename even though the file's bytes are on disk.
    """
    if os.name != "posix":
        return
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def sha256_of(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (constant memory for any size)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


TEMPORARY_SUFFIX = ".partial"


def create_unique(path: Path) -> tuple[int, Path]:
    """Create ``<path>.<random>.partial`` exclusively (mode 0666 minus the umask); return the
    open descriptor and its path."""
    while True:
        temporary = path.with_name(f"{path.name}.{secrets.token_hex(6)}{TEMPORARY_SUFFIX}")
        try:
            return os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), temporary
        except FileExistsError:  # 2**48 names: only ever a collision, never a loop
            continue


def atomic_write(path: Path, write: Callable[[Any], None]) -> str:
    """Write a file so that readers see either the old version or the complete new one.

    ``write(handle)`` fills a temporary file in the SAME folder (``os.replace`` is atomic only
    within one file system); then flush + fsync (bytes on disk), ``os.replace`` (the atomic
    switch), fsync the folder (the switch on disk). A crash at any instant leaves at most a
    ``*.partial`` file, never a half-written ``path``. The temporary name is unique per write
    (a random suffix, created with O_EXCL), so two writers, or a writer and a cleaner, never
    share one. Unlike ``tempfile.mkstemp`` (always mode 0600), the file gets the permissions
    your umask gives any new file, so a team folder stays readable by the team.
    (``torch.save`` is given the open handle: by PATH it would refuse a name whose stem is
    empty, such as ``.partial``; through a handle it writes anywhere.)
    Returns the SHA-256 of what was written. It is computed from the file (still in the page
    cache) in a second thread WHILE fsync waits for the disk, so the hash costs little extra.
    """
    path = Path(path)
    descriptor, temporary = create_unique(path)
    try:
        with os.fdopen(descriptor, "wb") as handle, ThreadPoolExecutor(max_workers=1) as pool:
            write(handle)
            handle.flush()
            hashing = pool.submit(sha256_of, temporary)  # hashlib releases the GIL
            os.fsync(handle.fileno())
            digest = hashing.result()
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
    return digest


def atomic_torch_save(obj: Any, path: Path) -> str:
    """``torch.save`` through :func:`atomic_write`; returns the file's SHA-256."""
    return atomic_write(path, lambda handle: torch.save(obj, handle))


def plain_file_name(name: object, directory: Path, source: Path) -> str:
    """Return ``name`` if it is a plain file name inside ``directory``; else raise.

    Names read from a manifest are data, and data can be hostile: ``"../../home/u/data.db"``
    or ``"/etc/passwd"`` would make a delete or a load reach outside the folder. A plain name
    has no separators, is not ``.``/``..``, and is not a symlink that resolves elsewhere.
    """
    if (not isinstance(name, str) or not name or name in (".", "..")
            or Path(name).name != name or "/" in name or "\\" in name or "\0" in name):
        raise CheckpointError(f"{source}: refuses the file name {name!r}: only plain file "
                              f"names inside {directory} are allowed; nothing was read or "
                              "deleted")
    target = directory / name
    if target.is_symlink() and target.resolve().parent != directory.resolve():
        raise CheckpointError(f"{source}: {name!r} is a symlink to {target.resolve()}, outside "
                              f"{directory}; nothing was read or deleted")
    return name


def safe_file_part(text: str) -> str:
    """``"val/loss"`` -> ``"val-loss"``: a metric name made safe to put in a file name."""
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "-", text).strip(".") or "metric"


class WriterLock:
    """A cross-process lock on a folder (``fcntl.flock`` on a lock file inside it).

    flock locks belong to an open file, so they also separate two managers in ONE process,
    and the kernel releases them when a process dies: a SIGKILLed writer never leaves the
    folder locked. ``timeout`` seconds of waiting, then a clear error.
    """

    def __init__(self, path: Path, timeout: float = 60.0) -> None:
        self.path, self.timeout = Path(path), timeout
        self._handle: Any = None

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock; return False (non-blocking) or raise (after ``timeout``) if held.

        The lock file is opened in append mode, so opening it never truncates what the holder
        wrote into it (its pid, which the error message shows). We poll with LOCK_NB instead
        of a blocking flock() so that the wait has a deadline: a hung writer on a network file
        system must not hang every job that opens the folder.
        """
        try:
            handle = open(self.path, "a+")  # noqa: SIM115 - kept open while the lock is held
        except OSError:  # a read-only folder: a reader may still load from it
            if blocking:
                raise
            return False
        deadline = time.monotonic() + (self.timeout if blocking else 0.0)
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    handle.seek(0)
                    holder = handle.read().strip() or "unknown"
                    handle.close()
                    if not blocking:
                        return False
                    raise CheckpointError(
                        f"{self.path}: another process ({holder}) holds this folder's writer "
                        f"lock; waited {self.timeout:.0f} s. Use another folder, or stop it"
                    ) from None
                time.sleep(0.01)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        self._handle = handle
        return True

    def release(self) -> None:
        """Drop the lock (closing the file would drop it too; explicit is clearer)."""
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> WriterLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def snapshot_to_cpu(obj: Any) -> Any:
    """A deep copy of ``obj`` with every tensor copied to the CPU, containers kept as they are.

    An async save must write the state AS IT WAS when save() was called; the training loop
    goes on changing the live tensors in place. Copying (not just referencing) is what makes
    the background write safe. A state_dict is an ``OrderedDict`` whose ``_metadata``
    attribute holds the module versions that ``load_state_dict`` passes to migrations (03
    section 7): it is copied too, and so are namedtuples.
    """
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        items = [(key, snapshot_to_cpu(value)) for key, value in obj.items()]
        copied = OrderedDict(items) if isinstance(obj, OrderedDict) else dict(items)
        if hasattr(obj, "_metadata"):
            copied._metadata = copy.deepcopy(obj._metadata)  # type: ignore[attr-defined]
        return copied
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple
        return type(obj)(*(snapshot_to_cpu(value) for value in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot_to_cpu(value) for value in obj)
    return obj  # ints, floats, strings, None: immutable


def capture_rng_state(loader_generator: torch.Generator | None = None) -> dict:
    """Every random generator a training step draws from, in a weights_only-safe form.

    Python's ``random``, NumPy's global generator (stored as plain ints, because a NumPy array
    inside a checkpoint needs weights_only=False), torch's CPU generator, every CUDA device's,
    and the DataLoader's own generator, which decides the shuffle order.
    """
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_name, np_keys.tolist(), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if loader_generator is not None:
        state["loader"] = loader_generator.get_state()
    return state


def restore_rng_state(state: dict, loader_generator: torch.Generator | None = None) -> None:
    """Undo :func:`capture_rng_state`: set every generator back to the saved state."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    if loader_generator is not None and "loader" in state:
        loader_generator.set_state(state["loader"].cpu())


@dataclasses.dataclass
class CheckpointEntry:
    """One line of the manifest: what a checkpoint file holds and how to verify it.

    ``seq`` numbers the writes of the folder: the highest is the LATEST checkpoint, whatever
    its step, so a run resumed from an older step is not overtaken by the branch it abandoned.
    """

    file: str
    step: int
    epoch: int
    metrics: dict[str, float]
    timestamp: str
    bytes: int
    sha256: str
    seq: int = 0


@dataclasses.dataclass
class LoadedCheckpoint:
    """What the ``load_*`` methods return: the checkpoint dict and its manifest entry."""

    state: dict
    entry: CheckpointEntry
    path: Path


class CheckpointManager:
    """Keep the last N and the best K checkpoints of a run, atomically, with a verified manifest.

    ``manager.save(state, step=..., epoch=..., metrics={...})`` writes ``state`` (a checkpoint
    dict, see common/__init__.py for the keys) and applies the retention policy;
    ``load_latest()`` / ``load_best()`` / ``load(step)`` return the newest good match.

    Guarantees, and what each one prevents:
    - Every write is atomic (unique temporary file, fsync, ``os.replace``): a crash leaves the
      old files and manifest intact, never half a checkpoint.
    - Writers take a cross-process lock (``writer.lock``) around each save and re-read the
      manifest under it: two processes saving into one folder lose no entry and delete none
      of each other's files; a second writer waits (``lock_timeout`` s, then a clear error).
      Readers never take it, and leftover temporaries are removed only by a lock holder, so
      opening a folder to evaluate never breaks a trainer's save in flight.
    - Names in the manifest must be plain file names in the folder: a hostile manifest
      (``"../../x"``, an absolute path, a symlink out) is refused before anything is read or
      deleted. File names built from metrics are sanitised (``val/loss`` -> ``val-loss``).
    - A non-finite monitored metric (NaN, inf) ranks LAST, never best: a diverged step cannot
      push out the best finite checkpoint.
    - Only DAMAGE (missing file, size or SHA-256 different from the manifest) is skipped, with
      a ``CheckpointWarning``; a file whose hash matches but does not load (a weights_only
      refusal, out of memory) raises ``CheckpointError``: it is your problem, not rot.
    - "Latest" is the most recent write (``seq``), not the highest step.

    With ``async_save=True``, ``save`` snapshots the state to the CPU and writes in a background
    thread; at most one save is in flight; ``wait()`` (or leaving a ``with`` block) waits for it.
    """

    MANIFEST = "manifest.json"
    LOCK = "writer.lock"

    def __init__(
        self,
        directory: str | Path,
        *,
        monitor: str = "val_loss",
        mode: str = "min",
        save_top_k: int = 2,
        keep_last: int = 2,
        filename: str = "epoch{epoch:03d}-step{step:06d}-{monitor}{value:.4f}.pt",
        async_save: bool = False,
        serialize: Callable[[Any, Any], None] = torch.save,
        lock_timeout: float = 60.0,
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', not {mode!r}")
        if save_top_k < 0 or keep_last < 1:
            raise ValueError("save_top_k must be >= 0 and keep_last >= 1 (the latest is kept)")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.monitor, self.mode = monitor, mode
        self.save_top_k, self.keep_last = save_top_k, keep_last
        self.filename, self.async_save = filename, async_save
        self.serialize = serialize  # torch.save; tests pass a writer that fails half-way
        self._executor = ThreadPoolExecutor(max_workers=1) if async_save else None
        self._in_flight: Future | None = None
        self._lock = threading.Lock()
        self._writer_lock = WriterLock(self.directory / self.LOCK, lock_timeout)
        self.entries: list[CheckpointEntry] = self._read_manifest()[0]
        # Housekeeping only if no other process is writing here right now (non-blocking).
        if self._writer_lock.acquire(blocking=False):
            try:
                self._recover()
            finally:
                self._writer_lock.release()

    # ---- the manifest -------------------------------------------------------------------

    @property
    def manifest_path(self) -> Path:
        return self.directory / self.MANIFEST

    def _read_manifest(self) -> tuple[list[CheckpointEntry], list[str]]:
        """The manifest's entries (sorted by write order) and its pending deletions.

        Reading needs no lock: the manifest is only ever replaced atomically, so a reader
        sees one complete version. Everything in it is checked before use: JSON shape, the
        monitor it was written for, and that every file name is a plain name in the folder.
        A manifest from before write sequence numbers existed gets them from its order.
        """
        if not self.manifest_path.exists():
            return [], []
        try:
            data = json.loads(self.manifest_path.read_text())
            entries = [CheckpointEntry(**item) for item in data["checkpoints"]]
            pending = list(data.get("deleting", []))
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(
                f"{self.manifest_path}: not a valid manifest ({type(err).__name__}: {err}); it "
                "was left untouched, and so were the checkpoints beside it"
            ) from err
        if (data.get("monitor"), data.get("mode")) != (self.monitor, self.mode):
            raise ValueError(
                f"{self.manifest_path}: this run monitors {data.get('monitor')!r} "
                f"({data.get('mode')}), not {self.monitor!r} ({self.mode}); open it with the "
                "same monitor and mode, or use another directory")
        for name in [e.file for e in entries] + pending:
            plain_file_name(name, self.directory, self.manifest_path)
        if len({e.seq for e in entries}) < len(entries):  # a manifest written before "seq"
            entries = [dataclasses.replace(e, seq=i) for i, e in enumerate(entries, start=1)]
        return sorted(entries, key=lambda e: e.seq), pending

    def _recover(self) -> None:
        """Under the writer lock: finish interrupted deletions, remove crashed temporaries.

        Only a lock holder may do this: a temporary file in the folder may belong to a save
        that is running right now in another process, and deleting it would break that save.
        Holding the lock proves no save is running.
        """
        entries, pending = self._read_manifest()
        self._delete(pending)  # finish deletions a crash interrupted (see _apply_retention)
        if pending:
            self._write_manifest(entries)
        for leftover in self.directory.glob(f"*{TEMPORARY_SUFFIX}"):  # from a crash mid-write
            leftover.unlink(missing_ok=True)
        self.entries = entries

    def _write_manifest(self, entries: list[CheckpointEntry], deleting: list[str] = ()) -> None:
        data = {
            "monitor": self.monitor, "mode": self.mode,
            "checkpoints": [dataclasses.asdict(entry) for entry in entries],
            "deleting": list(deleting),  # a journal: files to delete, re-tried after a crash
        }
        text = json.dumps(data, indent=2) + "\n"
        atomic_write(self.manifest_path, lambda handle: handle.write(text.encode()))

    # ---- saving -------------------------------------------------------------------------

    def save(self, state: dict, *, step: int, epoch: int, metrics: dict[str, float]) -> Path:
        """Write a checkpoint and apply the retention policy; return the file's path.

        In async mode the previous save is waited for first (one in flight at most, and any
        error it raised surfaces here), the state is copied to the CPU, and the write runs in
        the background. The file name is built from ``filename`` and made safe (a metric
        called "val/loss" would otherwise name a sub-folder).
        """
        if self.monitor not in metrics:
            raise KeyError(f"metrics must include the monitored {self.monitor!r}: got "
                           f"{sorted(metrics)}")
        name = safe_file_part(self.filename.format(
            epoch=epoch, step=step, monitor=self.monitor, value=float(metrics[self.monitor])))
        plain_file_name(name, self.directory, self.directory)
        metrics = {key: float(value) for key, value in metrics.items()}
        if self._executor is None:
            self._write(state, name, step, epoch, metrics)
        else:
            self.wait()
            snapshot = snapshot_to_cpu(state)
            self._in_flight = self._executor.submit(
                self._write, snapshot, name, step, epoch, metrics)
        return self.directory / name

    def wait(self) -> None:
        """Block until the save in flight (if any) is on disk; re-raise its error, if any."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            in_flight.result()

    def close(self) -> None:
        """Wait for the last save, then stop the background thread."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _write(self, state: dict, name: str, step: int, epoch: int, metrics: dict) -> None:
        """Write one checkpoint and update the manifest, all under the writer lock.

        The threading lock orders this manager's own background write against its caller;
        the writer lock orders it against other processes. Under both, the manifest is READ
        AGAIN from disk, so entries another writer added since we last looked are kept, and
        the new entry gets the next write sequence number.
        """
        with self._lock, self._writer_lock:
            path = self.directory / name
            digest = atomic_write(path, lambda handle: self.serialize(state, handle))
            entries, _ = self._read_manifest()  # another writer may have saved meanwhile
            entry = CheckpointEntry(
                file=name, step=step, epoch=epoch, metrics=metrics,
                timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds"),
                bytes=path.stat().st_size, sha256=digest,
                seq=max((e.seq for e in entries), default=0) + 1,
            )
            # A re-saved step (a resumed run repeating one) replaces its old entry; if the
            # metric, and so the file name, changed, the old file goes too.
            replaced = [e.file for e in entries if e.step == step and e.file != name]
            entries = [e for e in entries if e.file != name and e.step != step] + [entry]
            self._apply_retention(entries, also_delete=replaced)

    def _ranked(self, entries: list[CheckpointEntry]) -> list[CheckpointEntry]:
        """Entries from best to worst by the monitored metric; NaN/inf always last.

        Ties keep write order (the earlier first).
        """
        sign = -1.0 if self.mode == "max" else 1.0

        def key(entry: CheckpointEntry) -> tuple[bool, float]:
            value = entry.metrics[self.monitor]
            return (not math.isfinite(value), sign * value if math.isfinite(value) else 0.0)

        return sorted(entries, key=key)

    def _apply_retention(self, entries: list[CheckpointEntry],
                         also_delete: list[str] = ()) -> None:
        """Keep the newest ``keep_last`` writes and the ``save_top_k`` best finite ones.

        At least one best is always kept (so ``save_top_k=0`` still keeps the best), and the
        latest always is, because it is among the newest. Deletion is journaled: the files
        to delete are named in the manifest before they go, so a crash half-way through
        leaves a list that the next writer finishes, never an orphan or a dangling entry.
        """
        keep = {e.file for e in entries[-self.keep_last:]}  # the newest N, the latest included
        finite = [e for e in self._ranked(entries) if math.isfinite(e.metrics[self.monitor])]
        keep |= {e.file for e in finite[: max(self.save_top_k, 1)]}  # the best K, finite only
        kept = [e for e in entries if e.file in keep]
        dropped = [e.file for e in entries if e.file not in keep] + list(also_delete)
        # Durable order: the new file is already on disk; now the manifest (which names the
        # files about to go in "deleting"), then the deletions, then a clean manifest.
        self._write_manifest(kept, deleting=dropped)
        self.entries = kept
        if dropped:
            self._delete(dropped)
            self._write_manifest(kept)

    def _delete(self, names: list[str]) -> None:
        """Delete files of this folder (names checked again), then make that durable."""
        for name in names:
            (self.directory / plain_file_name(name, self.directory, self.manifest_path)
             ).unlink(missing_ok=True)
        if names:
            fsync_directory(self.directory)

    # ---- reading ------------------------------------------------------------------------

    def list(self) -> list[CheckpointEntry]:
        """The checkpoints the manifest records, oldest write first.

        Waits for this manager's save in flight, then re-reads the manifest, so a reader sees
        what other processes wrote since it opened the folder.
        """
        self.wait()
        self.entries = self._read_manifest()[0]
        return list(self.entries)

    @property
    def best(self) -> CheckpointEntry | None:
        """The best checkpoint with a finite metric, or None if there is none."""
        finite = [e for e in self._ranked(self.list()) if math.isfinite(e.metrics[self.monitor])]
        return finite[0] if finite else None

    @property
    def latest(self) -> CheckpointEntry | None:
        """The most recently written checkpoint (highest ``seq``), whatever its step."""
        entries = self.list()
        return entries[-1] if entries else None

    def inspect(self) -> str:
        """A table of the manifest, one row per checkpoint, with best and latest marked."""
        entries = self.list()
        best, latest = self.best, self.latest
        rows = [f"  {'file':<44} {'step':>6} {'epoch':>5} {self.monitor:>9} "
                f"{'size':>10}  sha256        flags"]
        for e in entries:
            flags = " ".join(f for f, on in (("best", e == best), ("latest", e == latest)) if on)
            rows.append(f"  {e.file:<44} {e.step:>6} {e.epoch:>5} "
                        f"{e.metrics[self.monitor]:>9.4f} {e.bytes / 1e6:>7.2f} MB  "
                        f"{e.sha256[:12]}  {flags}")
        return "\n".join(rows)

    def verify(self, entry: CheckpointEntry, check_hash: bool = True) -> str | None:
        """``None`` if the file matches its manifest entry, else what is wrong with it.

        ``check_hash=False`` checks only what is cheap: the name, that it exists, its size.
        """
        path = self.directory / plain_file_name(entry.file, self.directory, self.manifest_path)
        if not path.exists():
            return "the file is missing"
        if path.stat().st_size != entry.bytes:
            return f"size {path.stat().st_size} bytes, the manifest says {entry.bytes}"
        if check_hash and sha256_of(path) != entry.sha256:
            return "SHA-256 does not match the manifest (the bytes changed after saving)"
        return None

    def _load_verified(self, entry: CheckpointEntry, map_location: Any) -> tuple[Any, str]:
        """Read one checkpoint and check it; return ``(state, "")`` or ``(None, problem)``.

        The SHA-256 runs in a second thread WHILE torch.load deserialises (hashlib releases
        the GIL; both read the file from the page cache), so verifying costs about as much
        as the slower of the two instead of their sum. The state is returned only if the
        hash matches; a load error on a file whose hash matches is not damage, and is raised.
        """
        path = self.directory / entry.file
        problem = self.verify(entry, check_hash=False)  # missing file, wrong size: cheap
        if problem is not None:
            return None, problem
        with ThreadPoolExecutor(max_workers=1) as pool:
            digest = pool.submit(sha256_of, path)
            try:
                state, error = torch.load(path, map_location=map_location,
                                          weights_only=True), None
            except Exception as err:  # judged below, once the hash is known
                state, error = None, err
            if digest.result() != entry.sha256:
                return None, "SHA-256 does not match the manifest (the bytes changed after saving)"
        if error is not None:
            # The bytes are exactly those saved, so this is not damage: say so, loudly.
            lines = [line.strip() for line in
                     re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines() if line.strip()]
            reason = next((line for line in lines if "Unsupported global" in line),
                          lines[0] if lines else "")
            raise CheckpointError(
                f"{path}: intact (SHA-256 matches the manifest) but torch.load failed: "
                f"{type(error).__name__}: {reason}") from error
        return state, ""

    def _load_first_good(
        self, candidates: list[CheckpointEntry], map_location: Any
    ) -> LoadedCheckpoint | None:
        for entry in candidates:
            path = self.directory / entry.file
            state, problem = self._load_verified(entry, map_location)
            if not problem:
                return LoadedCheckpoint(state=state, entry=entry, path=path)
            warnings.warn(f"skipping damaged checkpoint {path}: {problem}", CheckpointWarning,
                          stacklevel=3)
        return None

    def load_latest(self, map_location: Any = "cpu") -> LoadedCheckpoint | None:
        """The most recently written checkpoint that verifies, or ``None`` if there is none."""
        return self._load_first_good(self.list()[::-1], map_location)

    def load_best(self, map_location: Any = "cpu") -> LoadedCheckpoint | None:
        """The best checkpoint (by ``monitor``/``mode``, finite metrics only) that verifies."""
        finite = [e for e in self._ranked(self.list()) if math.isfinite(e.metrics[self.monitor])]
        return self._load_first_good(finite, map_location)

    def load(self, step: int, map_location: Any = "cpu") -> LoadedCheckpoint:
        """The checkpoint saved at ``step``; an error if there is none or it is damaged."""
        entries = self.list()
        matches = [e for e in entries if e.step == step]
        if not matches:
            raise KeyError(f"{self.directory}: no checkpoint at step {step}; steps kept: "
                           f"{[e.step for e in entries]}")
        loaded = self._load_first_good(matches, map_location)
        if loaded is None:
            raise CheckpointError(f"{self.directory / matches[0].file}: damaged (see the "
                                  "warning)")
        return loaded


# ############################################################################################
# The lessons, in order. In a notebook each cell runs its lesson (the `if in_notebook():`
# lines); `python 02_checkpoint_manager.py` runs them all through main() at the bottom.
# ############################################################################################

# The training loop every section uses. The checkpoint dict uses the collection's key set
# (common/__init__.py): "epoch" is the NEXT epoch to run, "rng" holds every generator.
# It is ordinary training code; what makes it resumable is WHAT it puts in the checkpoint
# and the order in which it restores it (model, optimizer, scheduler, scaler, generators).


class SimulatedCrash(RuntimeError):
    """Raised by ``train(crash_after_epoch=...)`` to stand in for a killed process."""


def train(
    directory: Path,
    *,
    epochs: int,
    seed: int,
    device: torch.device,
    resume: bool = False,
    crash_after_epoch: int | None = None,
    async_save: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[torch.nn.Module, CheckpointManager, list[dict]]:
    """Train SmallCNN for ``epochs`` with a CheckpointManager in ``directory``.

    With ``resume=True``, continue from the newest valid checkpoint there (from scratch if
    there is none). Returns the model, the (closed) manager and the per-epoch history.
    """
    # Build everything first, exactly as a fresh run would; a resume then overwrites the state
    # of each object. Rebuilding the objects and loading their state (instead of pickling
    # the objects) keeps the checkpoint loadable with weights_only=True.
    seed_everything(seed)
    model = SmallCNN().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    # Mixed precision on CUDA needs a GradScaler, whose scale factor is state to resume too.
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    # A small, noisy task: validation loss bottoms out before the end, so "best" != "latest".
    dataset = make_image_classification(512, noise=2.0, seed=seed)
    train_loader, val_loader = make_loaders(dataset, seed=seed)
    start_epoch, step, history = 0, 0, []
    with CheckpointManager(directory, monitor="val_loss", mode="min", save_top_k=2,
                           keep_last=2, async_save=async_save) as manager:
        if resume:
            loaded = manager.load_latest(map_location=device)
            if loaded is None and manager.list():
                # Starting over here would mix a new run into the old one's folder: refuse.
                raise CheckpointError(
                    f"{directory}: --resume found {len(manager.list())} checkpoint(s) but none "
                    "is intact (see the warnings above); nothing was deleted. Move the folder "
                    "aside to start a new run")
            if loaded is None:
                log(f"  --resume: no checkpoint in {directory} yet; starting from scratch")
            else:
                # The order matters for the optimizer only: its state is cast to the device
                # of the parameters it manages NOW, so the model is already on `device`.
                state = loaded.state
                model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
                scaler.load_state_dict(state["scaler"])
                restore_rng_state(state["rng"], train_loader.generator)
                start_epoch, step, history = state["epoch"], state["step"], state["history"]
                log(f"  resumed from {loaded.path.name}: next epoch {start_epoch}, step {step}")
        # "epoch" in a checkpoint is the NEXT epoch to run, so this loop neither repeats
        # nor skips one after a resume.
        for epoch in range(start_epoch, epochs):
            train_loss = train_one_epoch(model, train_loader, optimizer, device, scheduler,
                                         scaler)
            step += len(train_loader)
            val = evaluate(model, val_loader, device)
            history.append({"epoch": epoch + 1, "step": step, "train_loss": train_loss,
                            "val_loss": val["loss"], "val_accuracy": val["accuracy"]})
            state = {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "epoch": epoch + 1, "step": step, "metrics": history[-1], "history": history,
                "rng": capture_rng_state(train_loader.generator),
                "config": {"model": "SmallCNN", "epochs": epochs, "seed": seed},
            }
            path = manager.save(state, step=step, epoch=epoch + 1,
                                metrics={"val_loss": val["loss"], "train_loss": train_loss})
            log(f"  epoch {epoch + 1:>2}/{epochs}: train_loss {train_loss:.4f}  "
                f"val_loss {val['loss']:.4f}  val_acc {val['accuracy']:.3f}  -> {path.name}")
            if crash_after_epoch == epoch + 1:
                manager.wait()
                raise SimulatedCrash(f"simulated crash after epoch {epoch + 1}")
    return model, manager, history


# %% Setup
# The flags (--epochs, --resume, ...) and the out-dir. In a notebook the flags come from the
# LESSON_ARGS environment variable (none: the defaults), since a kernel has no command line.


def setup(argv: list[str] | None = None) -> Run:
    """Parse the flags, seed everything, create the out-dir, print the header."""
    parser = make_parser(HERE, __doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8, help="epochs of the main run")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out-dir from its newest valid checkpoint")
    run = Run.start(HERE, parser, argv)
    if run.args.epochs < 1:
        parser.error("--epochs must be at least 1")
    return run


if in_notebook():
    run = setup()


# %% 1. Train with a CheckpointManager
# A run saves a checkpoint every epoch; the policy decides which to keep: the newest
# keep_last=2 (to resume) and the best save_top_k=2 by val_loss (to ship). The latest and the
# best are always kept. File names carry epoch, step and the metric, so `ls` tells the story.
# With --resume the run continues from its newest valid checkpoint; without it, a previous
# run's folder is moved aside (never deleted), so a forgotten flag costs nothing.


def lesson_1_train(run: Run, epochs: int, resume: bool) -> tuple[CheckpointManager, list, dict]:
    """Train with the manager; return it, the per-epoch history and the figures."""
    run.section("1. Train with a CheckpointManager")
    directory = run.out_dir / "checkpoints"
    if not resume and (directory / CheckpointManager.MANIFEST).exists():
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        previous = run.out_dir / f"checkpoints.previous-{stamp}"
        directory.rename(previous)
        print(f"  a previous run was in {directory.name}/: moved to {previous.name}/ "
              "(use --resume to continue a run instead; delete it when you no longer need it)")
    latest = CheckpointManager(directory).latest if resume else None
    model, manager, history = train(directory, epochs=epochs, seed=run.seed, device=run.device,
                                    resume=resume)
    final_path = run.out_dir / "final_model.pt"
    atomic_torch_save(model.state_dict(), final_path)
    run.artifact("final_model", final_path)
    run.artifact("checkpoints", directory)
    run.artifact("manifest", directory / CheckpointManager.MANIFEST)
    best = manager.best
    print(f"  kept {len(manager.list())} of {len(history)} checkpoints; best val_loss "
          f"{best.metrics['val_loss']:.4f} at step {best.step} (epoch {best.epoch})")
    return manager, history, {
        "epochs": epochs, "resumed_from_epoch": latest.epoch if latest else 0,
        "checkpoints_kept": len(manager.list()), "best_val_loss": best.metrics["val_loss"],
        "best_step": best.step, "final_val_accuracy": history[-1]["val_accuracy"]}


if in_notebook():
    manager, history, figures = lesson_1_train(run, run.args.epochs, run.args.resume)
    run.record_all(figures)


# %% 2. The manifest: list, inspect, load
# manifest.json records, for every kept checkpoint: step, epoch, metrics, timestamp, size,
# SHA-256 and a write sequence number. It is the index: load_latest/load_best/load(step) read
# it instead of parsing file names, and the hash lets a load prove that the bytes are the ones
# that were saved. "Latest" is the most recent WRITE (the highest seq), not the highest step:
# a run resumed from an older checkpoint must not be overtaken by the branch it abandoned.


def lesson_2_manifest(run: Run, manager: CheckpointManager) -> dict:
    """Print the manifest and load the latest, the best, and one step."""
    run.section("2. The manifest: list, inspect, load")
    print(manager.inspect())
    latest, best = manager.load_latest(), manager.load_best()
    by_step = manager.load(best.entry.step)
    print(f"  load_latest -> {latest.path.name} (epoch {latest.state['epoch']})")
    print(f"  load_best   -> {best.path.name} (val_loss {best.entry.metrics['val_loss']:.4f})")
    print(f"  load({best.entry.step}) -> {by_step.path.name}")
    return {"manifest_entries": len(manager.list())}


if in_notebook():
    run.record_all(lesson_2_manifest(run, manager))


# %% 3. Crash safety: atomic writes
# torch.save(obj, "ckpt.pt") writes in place: a crash (OOM kill, preemption, power cut, full
# disk) half-way leaves a truncated ckpt.pt, and if that name was your only checkpoint, the run
# is gone. atomic_write() writes a uniquely named "ckpt.pt.<random>.partial", fsyncs it, then
# os.replace()s it over the target: the switch is atomic, so readers see the old file or the
# new one, never half. The manifest is written the same way. Retention deletes old files only
# AFTER the new one is durable, through a "deleting" journal in the manifest that a restart
# finishes.
# A second process on the same folder is the other everyday hazard (an evaluation job opening
# the folder while training writes, two jobs launched with one --out-dir). Each save takes a
# cross-process writer lock (fcntl.flock on writer.lock) and re-reads the manifest under it,
# so two writers lose no entry and never delete each other's files; temporaries are unique
# per write, and only a lock holder removes stale ones, so a reader never breaks a save.
# Below, a writer dies half-way through the 4th save: the first three and the manifest survive.


def failing_writer(obj: Any, handle: Any) -> None:
    """A stand-in for a crash mid-save: writes half a checkpoint, then fails."""
    torch.save(obj, handle)
    handle.seek(handle.tell() // 2)
    handle.truncate()
    raise OSError("No space left on device (simulated, half-way through the write)")


def lesson_3_crash_safety(run: Run) -> dict:
    """Three good saves, a 4th that dies half-way; reopen and verify what is left.

    "Unchanged" compares the SHA-256 of every listed file before and after; "partial files
    left" counts temporaries after the failed write cleaned up after itself (0 expected).
    tests/test_02_checkpoint_manager.py also kills a real process with SIGKILL mid-write.
    """
    run.section("3. Crash safety: atomic writes")
    with run.scratch("demo_crash") as directory:
        state = {"model": SmallCNN().state_dict()}
        manager = CheckpointManager(directory, save_top_k=5, keep_last=5)
        for step in (1, 2, 3):
            manager.save(state, step=step, epoch=step, metrics={"val_loss": 1.0 / step})
        before = {e.file: e.sha256 for e in manager.list()}
        manager.serialize = failing_writer
        try:
            manager.save(state, step=4, epoch=4, metrics={"val_loss": 0.1})
        except OSError as err:
            print(f"  the 4th save failed: {err}")
        reopened = CheckpointManager(directory)
        intact = all(reopened.verify(e) is None for e in reopened.list())
        same = {e.file: e.sha256 for e in reopened.list()} == before
        partial = sorted(p.name for p in directory.iterdir() if p.name.endswith(".partial"))
    print(f"  after the crash: manifest lists {len(reopened.list())} checkpoints, all verify: "
          f"{intact}, unchanged: {same}; partial files left: {partial}")
    return {"crash_earlier_checkpoints_intact": intact and same,
            "crash_partial_files_left": len(partial)}


if in_notebook():
    run.record_all(lesson_3_crash_safety(run))


# %% 4. Damaged checkpoints are detected and skipped
# Files get damaged after they are written too: a copy cut short, a disk error, a sync tool.
# Before torch.load, the manager compares size and SHA-256 with the manifest; a mismatch is
# reported as a CheckpointWarning and the next candidate is tried, so load_latest() falls back
# to the newest GOOD checkpoint instead of crashing the resume.
# Only damage is skipped. A file whose hash matches but whose torch.load fails (a weights_only
# refusal after someone added a custom object, an out-of-memory) raises CheckpointError:
# skipping it would silently resume from older weights. If checkpoints exist but none is
# intact, --resume stops with an error instead of starting over in the same folder. Names in
# the manifest must be plain file names inside the folder ("../x" or "/etc/x" is refused
# before anything is read or deleted), and a NaN or inf metric never ranks as best.


def lesson_4_damaged(run: Run) -> dict:
    """Truncate the newest of three checkpoints; load_latest falls back to the one before."""
    run.section("4. Damaged checkpoints are detected and skipped")
    with run.scratch("demo_damaged") as directory:
        manager = CheckpointManager(directory, save_top_k=3, keep_last=3)
        for step in (1, 2, 3):
            manager.save({"model": SmallCNN().state_dict(), "step": step}, step=step,
                         epoch=step, metrics={"val_loss": 1.0 / step})
        newest = directory / manager.latest.file
        newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncate it
        print(f"  truncated the newest checkpoint, {newest.name}, to half its size")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", CheckpointWarning)
            loaded = manager.load_latest()
    for warning in caught:
        print(f"  CheckpointWarning: {str(warning.message).replace(str(directory) + os.sep, '')}")
    print(f"  load_latest fell back to {loaded.path.name} (step {loaded.state['step']})")
    return {"damaged_checkpoint_skipped": len(caught) == 1 and loaded.entry.step == 2}


if in_notebook():
    run.record_all(lesson_4_damaged(run))


# %% 5. Bit-exact resume
# A resume is exact when EVERYTHING that influences the next step is restored: weights,
# optimizer moments, scheduler position, GradScaler scale, the step count, every random
# generator (Dropout masks) and the DataLoader's generator (the shuffle order). Miss one and
# the resumed run drifts, silently. Here: train 4 epochs straight; then train, "crash" after
# epoch 2, resume from the checkpoints and finish. On the CPU the final weights are identical
# to the bit: max |diff| = 0.0 alone would not prove it (0.0 == -0.0), so every byte is
# compared too (common.compare.bit_identical).
# On a GPU, some kernels are non-deterministic (atomic adds in cuDNN/cuBLAS
# backward passes, cuDNN's benchmark-mode algorithm choice), so two runs can differ in the
# last bits even without a crash. torch.use_deterministic_algorithms(True) makes those ops
# pick deterministic algorithms or raise an error where none exists, and
# torch.backends.cudnn.benchmark = False fixes the algorithm choice; together they make runs
# repeatable on the SAME GPU model, driver and torch build, not across different ones.
# (Older torch releases also needed CUBLAS_WORKSPACE_CONFIG=:4096:8 for deterministic cuBLAS;
# torch 2.14 no longer does.)


def lesson_5_resume(run: Run) -> dict:
    """Straight through vs crash after epoch 2 + resume: compare the final weights.

    Both runs use the same seed and the same code; the only difference is that the second
    one stops after epoch 2 and restarts from its checkpoint in a fresh set of objects.
    """
    run.section("5. Bit-exact resume")
    quiet = lambda line: None  # noqa: E731 - the epochs were shown in section 1
    with run.scratch("demo_resume") as demo:
        straight, _, _ = train(demo / "straight", epochs=4, seed=run.seed, device=run.device,
                               log=quiet)
        try:
            train(demo / "interrupted", epochs=4, seed=run.seed, device=run.device,
                  crash_after_epoch=2, log=quiet)
        except SimulatedCrash as crash:
            print(f"  {crash}; resuming from {demo.name}/interrupted")
        resumed, _, _ = train(demo / "interrupted", epochs=4, seed=run.seed,
                              device=run.device, resume=True)
    diff = max_abs_diff(straight.state_dict(), resumed.state_dict())
    identical = bit_identical(straight.state_dict(), resumed.state_dict())
    print(f"  straight vs crash+resume, final weights: max |diff| = {diff}; bit-identical "
          f"(every byte compared): {identical}")
    return {"resume_max_abs_diff": diff, "resume_bit_identical": identical}


if in_notebook():
    run.record_all(lesson_5_resume(run))


# %% 6. Asynchronous saving
# A synchronous save stops training for the whole serialisation + fsync. An async save only
# stops it for the copy to CPU memory (snapshot_to_cpu); the write happens in a background
# thread while the next steps run. Rules that keep it safe: snapshot first (the live tensors
# keep changing), at most one save in flight (else memory grows and order is lost), surface
# background errors, and wait before exiting. We time the stall, the time save() blocks the
# caller, for a 5 M-parameter MLP with its Adam state (the background write is waited for
# outside the timing, as the next epoch's training would cover it).


def lesson_6_async(run: Run) -> dict:
    """Time the stall of save() for a sync and an async manager; compare the files.

    Read the two medians as "how long training stands still per checkpoint". The async
    figure is the cost of snapshot_to_cpu (a memory copy) plus handing the job to the
    thread; the sync figure adds serialisation, the write and the fsync. The gap grows with
    the model and with a slower disk; on a GPU the snapshot is also the device-to-host copy.
    """
    run.section("6. Asynchronous saving")
    model = MLP(512, 2048, 10).to(run.device)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(8, 512, device=run.device)).sum().backward()
    optimizer.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    timings, written = {}, {}
    for label, async_save in (("sync", False), ("async", True)):
        with run.scratch(f"demo_{label}") as directory, CheckpointManager(
                directory, keep_last=1, save_top_k=0, async_save=async_save) as manager:
            steps = iter(range(1, 1000))

            def save(manager=manager, steps=steps) -> None:
                step = next(steps)
                manager.save(state, step=step, epoch=step, metrics={"val_loss": 1.0})
            timings[label] = benchmark(save, warmup=1, repeats=5, device=run.device,
                                       setup=manager.wait)
            written[label] = manager.load_latest().state
            size = format_bytes(manager.latest.bytes)
        print(f"  {label:>5} save stall: {timings[label]}  ({size} per checkpoint)")
    same = max_abs_diff(written["sync"]["model"], written["async"]["model"])
    print(f"  the async file holds the same weights as the sync one: max |diff| = {same}")
    return {"sync_save_stall_ms": round(timings["sync"].median_ms, 3),
            "async_save_stall_ms": round(timings["async"].median_ms, 3),
            "async_vs_sync_max_abs_diff": same}


if in_notebook():
    run.record_all(lesson_6_async(run))


# %% 7. Training curves with the kept checkpoints
# One picture answers "which checkpoints did the policy keep, and was the best one kept?".
# The curves come from the history stored IN the checkpoint, so a resumed run plots every
# epoch, also those trained before the interruption.


def lesson_7_plot(run: Run, manager: CheckpointManager, history: list[dict]) -> None:
    """Train and validation loss per epoch, the kept checkpoints circled, the best starred."""
    run.section("7. Training curves with the kept checkpoints")
    epochs = [h["epoch"] for h in history]
    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    axes.plot(epochs, [h["val_loss"] for h in history], label="validation loss")
    kept, best = manager.list(), manager.best
    axes.scatter([e.epoch for e in kept], [e.metrics["val_loss"] for e in kept], s=60,
                 facecolors="none", edgecolors="black", label="checkpoint kept", zorder=3)
    axes.scatter([best.epoch], [best.metrics["val_loss"]], marker="*", s=250, color="gold",
                 edgecolors="black", label=f"best (step {best.step})", zorder=4)
    axes.set(xlabel="epoch", ylabel="cross-entropy loss",
             title="SmallCNN on synthetic images: kept checkpoints")
    axes.legend()
    run.save_figure(figure, "training_curves.png", "training_curves")


if in_notebook():
    lesson_7_plot(run, manager, history)


# %% Summary
# What the run measured, the files it wrote (also in summary.json), and what to try next.
RECAP = [
    "write checkpoints atomically: temp file, fsync, os.replace, fsync the folder",
    "keep a manifest with SHA-256; verify before loading, skip only what is damaged",
    "one writer lock per folder; plain file names only; NaN never ranks as best",
    "a bit-exact resume restores optimizer, scheduler, scaler, RNGs and data order",
    "async saving stalls training only for the CPU snapshot; one save in flight",
]
TRY_IT = ("kill this script mid-run (Ctrl-C or kill -9) and re-run it with --resume; "
          "then run 03_model_versioning.py")

if in_notebook():
    summary = run.finish(RECAP, TRY_IT)


def main(argv: list[str] | None = None) -> dict:
    """Run every lesson in order and return the summary (also written to summary.json)."""
    run = setup(argv)
    try:
        manager, history, figures = lesson_1_train(run, run.args.epochs, run.args.resume)
    except (CheckpointError, ValueError) as err:  # one clear line for the CLI, no traceback
        raise SystemExit(f"error: {err}") from None
    run.record_all(figures)
    run.record_all(lesson_2_manifest(run, manager))
    run.record_all(lesson_3_crash_safety(run))
    run.record_all(lesson_4_damaged(run))
    run.record_all(lesson_5_resume(run))
    run.record_all(lesson_6_async(run))
    lesson_7_plot(run, manager, history)
    return run.finish(RECAP, TRY_IT)


if __name__ == "__main__" and not in_notebook():
    main()
