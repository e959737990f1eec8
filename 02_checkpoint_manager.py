"""02 · A checkpoint manager that never loses a run — keep the right checkpoints, survive crashes.

What you will learn (each section runs real code and prints the measured figure):
  1. Train with CheckpointManager: keep the last N and the best K, readable file names
  2. The manifest: list, inspect, load_latest, load_best, load by step
  3. Crash safety: atomic writes, so a crash mid-save damages nothing
  4. Damaged checkpoints are detected (CRC32 checksums), reported, and skipped
  5. Bit-exact resume: train straight through vs crash + resume, max |diff| of the weights
  5b. Mid-epoch resume: torchdata's StatefulDataLoader, what it does underneath, a pitfall
  5c. Preemption: a child run gets SIGTERM mid-epoch, saves, exits 143; resume; a timeline
  5d. The learning rate after a resume: two scheduler mistakes, measured
  6. Asynchronous saving: how long a save stalls the training loop, sync vs async
  7. Training curves with the kept checkpoints marked
  8. How fast is a save? A raw write + fsync as the reference, torch.save, safetensors, DCP,
     the manager sync and async; loads with and without mmap; a bar chart

Run it:   python 02_checkpoint_manager.py [--out-dir D] [--epochs N] [--save-every-steps K]
              [--save-every-seconds S] [--resume | --resume-from STEP|FILE] [--train-only]
              [--step-delay S] [--io-mb MB]
          --resume continues the run in D from its newest valid checkpoint, --resume-from from
          the one at that step (or file); kill the process at any instant (even SIGKILL, even
          mid-epoch) and re-run with --resume: the final weights are bit-identical to an
          uninterrupted run with the same seed, whatever K. On SIGTERM or SIGUSR1 it saves after
          the current step and exits with status 128 + the signal (143 for SIGTERM).
          --train-only runs section 1 alone; --step-delay slows each step, to try it by hand.
          As a notebook: open it in Jupyter (jupytext), VS Code or PyCharm and run the cells
          top to bottom from the project folder; flags go in the LESSON_ARGS variable.
Takes:    about 15 s on a 2-core CPU (--train-only: 2 s).
Next:     03_model_versioning.py, versions, fingerprints and integrity checks.

Files it writes (in --out-dir): checkpoints/ (the kept checkpoints, manifest.json and the
writer.lock file), final_model.pt (the trained weights, written atomically too),
training_curves.png, preemption_timeline.png, io_speed.png and summary.json. The
demonstrations of sections 3-6 and 8 work in scratch folders that are removed when they
finish.

How the options map to PyTorch Lightning's ModelCheckpoint:
  monitor="val_loss", mode="min"|"max"   same names, same meaning
  save_top_k=K                           same for K >= 1; K=0 differs: Lightning then keeps
                                         no checkpoint by metric (and -1 keeps all), here
                                         the best is ALWAYS kept
  keep_last=N                            save_last=True keeps one "last.ckpt"; here the N newest
  filename="...{step}...{value}..."      like filename="{epoch}-{val_loss:.2f}"
  --save-every-steps / -seconds          every_n_train_steps / train_time_interval
Where this class goes further: a manifest with a checksum per file, fsync'd atomic writes for
checkpoints AND the manifest, journaled deletions, damaged files skipped on load, complete RNG
and data-order state for a bit-exact resume, and one save in flight in a background thread
(Lightning's AsyncCheckpointIO and torch.distributed.checkpoint.async_save do the latter too;
Orbax's CheckpointManager has the retention and async parts, for JAX). And what none of
them promise for a folder that other processes touch: a writer lock, plain-file-name checks
on everything read from the manifest, and NaN metrics that can never become "best".
The class is a few small pieces, each readable on its own: WriterLock (the lock, never
following a link), Manifest (the index, its journal and the recovery after a crash, every
record validated), Retention (which files to keep), BackgroundWriter (the async save and
its staging buffer), CheckpointReader (list and verified loads) and CheckpointManager,
which puts them together. A save is killed at every one of its filesystem calls in
tests/test_02_crash_points.py: a new process then loads the previous or the new state.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import errno
import fcntl
import hashlib
import json
import math
import os
import random
import re
import reprlib
import secrets
import signal
import stat
import subprocess
import sys
import threading
import time
import warnings
import zlib
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from common.compare import bit_identical, max_abs_diff
from common.data import make_image_classification, make_loaders
from common.devices import deterministic_kernels, seed_everything
from common.models import MLP, SmallCNN
from common.run import Run, first_line, format_bytes, in_notebook, make_parser, script_file
from common.timing import benchmark, benchmark_interleaved
from common.training import evaluate
from common.verdict import speed_word

# torchdata 0.11 calls an API that torch 2.14 deprecated, on every loader; not our concern.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)
matplotlib.use("Agg")  # write PNG files, never open a window: works on servers and in CI
HERE = script_file(globals(), "02_checkpoint_manager.py")  # a notebook kernel has no __file__

# ############################################################################################
# Reusable pieces: copy these into your own code.
# ############################################################################################


class CheckpointWarning(UserWarning):
    """A checkpoint was damaged or missing and was skipped."""


class CheckpointError(RuntimeError):
    """A checkpoint folder or file cannot be used; the message names the file and the cause."""


class MonitorMismatch(CheckpointError, ValueError):
    """The folder's manifest was written for another monitor or mode (a ValueError too, as
    it was before it became a CheckpointError)."""


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


CHECKSUMS = ("crc32", "sha256")


def file_checksum(path: Path, algorithm: str = "crc32") -> str:
    """``"crc32:<8 hex>"`` or ``"sha256:<64 hex>"`` of a file, read in 1 MiB blocks.

    Both catch damage (a truncated copy, a flipped bit, a sync tool that wrote half a file):
    CRC32 misses a random corruption once in 4 billion, and zlib computes it about twice as
    fast as hashlib's SHA-256. SHA-256 also resists a DELIBERATE change, but only if the digest
    is kept where whoever changes the file cannot change it too; a manifest in the same folder
    is not such a place (03's SHA-256 fingerprints are meant to be compared with a copy kept
    elsewhere: a release note, a deployment config).
    zlib and hashlib release the GIL on large blocks, so this can run beside other work.
    """
    if algorithm not in CHECKSUMS:
        raise ValueError(f"checksum must be one of {CHECKSUMS}, not {algorithm!r}")
    digest, crc = hashlib.sha256(), 0
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            if algorithm == "crc32":
                crc = zlib.crc32(block, crc)
            else:
                digest.update(block)
    return f"crc32:{crc:08x}" if algorithm == "crc32" else f"sha256:{digest.hexdigest()}"


TEMPORARY_SUFFIX = ".partial"
# What create_unique() makes of a name: "<name>.<12 hex>.partial"; group 1 is the name.
TEMPORARY_NAME = re.compile(r"(.+)\.[0-9a-f]{12}\.partial")


def create_unique(path: Path) -> tuple[int, Path]:
    """Create ``<path>.<random>.partial`` exclusively (mode 0666 minus the umask); return the
    open descriptor and its path."""
    while True:
        temporary = path.with_name(f"{path.name}.{secrets.token_hex(6)}{TEMPORARY_SUFFIX}")
        try:
            return os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), temporary
        except FileExistsError:  # 2**48 names: only ever a collision, never a loop
            continue


def atomic_write(path: Path, write: Callable[[Any], None], checksum: str = "crc32") -> str:
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
    Returns the :func:`file_checksum` of what was written. It is computed from the file (still
    in the page cache) in a second thread WHILE fsync waits for the disk: it costs nothing extra
    as long as it is quicker than the fsync, which CRC32 is and SHA-256 often is not.
    """
    path = Path(path)
    descriptor, temporary = create_unique(path)
    try:
        with os.fdopen(descriptor, "wb") as handle, ThreadPoolExecutor(max_workers=1) as pool:
            write(handle)
            handle.flush()
            hashing = pool.submit(file_checksum, temporary, checksum)
            os.fsync(handle.fileno())
            digest = hashing.result()
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
    return digest


def atomic_torch_save(obj: Any, path: Path) -> str:
    """``torch.save`` through :func:`atomic_write`; returns the file's CRC32."""
    return atomic_write(path, lambda handle: torch.save(obj, handle))


def plain_file_name(name: object, directory: Path, source: Path) -> str:
    """Return ``name`` if it is a plain file name inside ``directory``; else raise.

    Names read from a manifest are data, and data can be hostile: ``"../../home/u/data.db"``
    or ``"/etc/passwd"`` would make a delete or a load reach outside the folder. A plain name
    has no separators, is not ``.``/``..``, fits a file system's 255-byte name limit (a
    longer one fails every call with ENAMETOOLONG), and is not a symlink that resolves
    elsewhere.
    """
    if (not isinstance(name, str) or not name or name in (".", "..")
            or Path(name).name != name or "/" in name or "\\" in name or "\0" in name
            or len(name.encode(errors="surrogateescape")) > 255):
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


def open_regular(path: Path, flags: int = os.O_RDONLY, mode: int = 0o666) -> int:
    """``os.open`` that never follows a symlink, never blocks, and accepts only a plain file.

    A hostile folder can hold a symlink where a file is expected (``writer.lock`` pointing
    at a file elsewhere, which a write would change), a directory, or a FIFO (an ordinary
    open of a FIFO waits forever for a writer). ``O_NOFOLLOW`` refuses the symlink,
    ``O_NONBLOCK`` returns at once for a FIFO, and ``fstat`` on the OPEN descriptor (not on
    the name, which could be swapped in between) refuses anything but a regular file. Opened
    for WRITING it must also have one link: a hard link is another name of an outside file,
    which a write would change. Reading a hard-linked file changes nothing, and backups made
    with ``cp -al`` or ``rsync --link-dest`` are hard links, so reads accept them.
    Raises ``CheckpointError``.
    """
    try:
        descriptor = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK, mode)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise CheckpointError(f"{path}: is a symlink; refusing to follow it (nothing was "
                                  "read or written)") from None
        if err.errno in (errno.EISDIR, errno.ENXIO):
            raise CheckpointError(f"{path}: not a regular file; nothing was read") from None
        raise
    status = os.fstat(descriptor)
    writing = flags & (os.O_WRONLY | os.O_RDWR)
    if not stat.S_ISREG(status.st_mode) or (writing and status.st_nlink > 1):
        os.close(descriptor)
        kind = "has another name (a hard link)" if stat.S_ISREG(status.st_mode) else (
            "is not a regular file (a directory, a FIFO or a device)")
        raise CheckpointError(f"{path}: {kind}; refusing to use it, nothing was read or written")
    return descriptor


class WriterLock:
    """A cross-process lock on a folder (``fcntl.flock`` on a lock file inside it).

    On a local file system, flock locks belong to an open file, so they also separate two
    managers in ONE process, and the kernel releases them when a process dies: a SIGKILLed
    writer never leaves the folder locked. On NFS, Linux emulates flock with fcntl byte-range
    locks, which belong to a PROCESS: two managers of one process then share the lock.
    ``timeout`` seconds of waiting, then a clear error. The lock file is
    opened with :func:`open_regular`: a symlink or a hard link planted in its place is
    refused, so taking the lock never writes outside the folder.
    """

    def __init__(self, path: Path, timeout: float = 60.0) -> None:
        self.path, self.timeout = Path(path), timeout
        self._descriptor: int | None = None

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock; return False (non-blocking) or raise (after ``timeout``) if held.

        Opening never truncates what the holder wrote into the file (its pid, which the
        error message shows). We poll with LOCK_NB instead of a blocking flock() so that the
        wait has a deadline: a hung writer on a network file system must not hang every job
        that opens the folder.
        """
        try:
            descriptor = open_regular(self.path, os.O_RDWR | os.O_CREAT)
        except OSError:  # a read-only folder: a reader may still load from it
            if blocking:
                raise
            return False
        try:  # whatever interrupts us (Ctrl-C included) closes the file: no lock leaks
            if not self._flock(descriptor, blocking):
                os.close(descriptor)
                return False
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, f"pid {os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(descriptor)
            raise
        self._descriptor = descriptor
        return True

    def _flock(self, descriptor: int, blocking: bool) -> bool:
        """flock with a deadline: True when taken, False (non-blocking) when held, else an
        error after ``timeout`` seconds naming the holder's pid."""
        deadline = time.monotonic() + (self.timeout if blocking else 0.0)
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.01)
                elif not blocking:
                    return False
                else:
                    holder = os.pread(descriptor, 100, 0).decode(errors="replace").strip()
                    raise CheckpointError(
                        f"{self.path}: another process ({holder or 'unknown'}) holds this "
                        f"folder's writer lock; waited {self.timeout:.0f} s. Use another "
                        "folder, or stop it") from None

    def release(self) -> None:
        """Drop the lock (closing the file would drop it too; explicit is clearer)."""
        if self._descriptor is not None:
            fcntl.flock(self._descriptor, fcntl.LOCK_UN)
            os.close(self._descriptor)
            self._descriptor = None

    def __enter__(self) -> WriterLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def snapshot_to_cpu(obj: Any, reuse: Any = None) -> Any:
    """A deep copy of ``obj`` with every tensor copied to the CPU, containers kept as they are.

    An async save must write the state AS IT WAS when save() was called; the training loop
    goes on changing the live tensors in place. Copying (not just referencing) is what makes
    the background write safe. A state_dict is an ``OrderedDict`` whose ``_metadata``
    attribute holds the module versions that ``load_state_dict`` passes to migrations (03
    section 7): it is copied too, and so are namedtuples.
    ``reuse`` is the previous snapshot, once its write has finished: a tensor of the same
    shape and dtype at the same place is copied INTO (no new memory: fresh pages cost the
    kernel a fault and a zero-fill each, often more than the copy itself), which is what
    DCP's ``cache_staged_state_dict`` does too. For CUDA tensors the buffers are pinned,
    so the device-to-host copy runs at full speed.
    """
    if isinstance(obj, torch.Tensor):
        if (isinstance(reuse, torch.Tensor) and reuse.shape == obj.shape
                and reuse.dtype == obj.dtype and reuse.layout == obj.layout == torch.strided):
            return reuse.copy_(obj.detach())
        if obj.device.type == "cuda" and obj.layout == torch.strided:
            return torch.empty_like(obj, device="cpu", pin_memory=True).copy_(obj.detach())
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        previous = reuse if isinstance(reuse, dict) else {}
        items = [(key, snapshot_to_cpu(value, previous.get(key))) for key, value in obj.items()]
        copied = OrderedDict(items) if isinstance(obj, OrderedDict) else dict(items)
        if hasattr(obj, "_metadata"):
            copied._metadata = copy.deepcopy(obj._metadata)  # type: ignore[attr-defined]
        return copied
    previous = reuse if isinstance(reuse, (list, tuple)) and len(reuse) == len(obj) else (
        [None] * len(obj) if isinstance(obj, (list, tuple)) else None)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple
        return type(obj)(*(snapshot_to_cpu(v, p) for v, p in zip(obj, previous, strict=True)))
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot_to_cpu(v, p) for v, p in zip(obj, previous, strict=True))
    return obj  # ints, floats, strings, None: immutable


def capture_rng_state(loader_generator: torch.Generator | None = None) -> dict:
    """Every random generator a training step draws from, in a weights_only-safe form.

    Python's ``random``, NumPy's global generator (stored as plain ints, because
    weights_only=True refuses a NumPy array unless the loader allow-lists NumPy's types with
    torch.serialization.safe_globals), torch's CPU generator, every CUDA device's,
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


class Preempted(Exception):
    """Raised by a training loop after it saved a checkpoint because a signal asked it to stop.

    ``signal_number`` is the signal that arrived; exit with ``128 + signal_number`` (the shell's
    convention for "ended by that signal", 143 for SIGTERM). What a scheduler makes of that
    status depends on its configuration: a Kubernetes Job counts it toward ``backoffLimit``
    unless a podFailurePolicy says otherwise, and SLURM decides PREEMPTED from its own records.
    """

    def __init__(self, signal_number: int, message: str) -> None:
        super().__init__(message)
        self.signal_number = signal_number


class PreemptionFlag:
    """Turn SIGTERM and SIGUSR1 into a flag that the training loop checks between steps.

    Schedulers warn before they kill: Kubernetes, spot/preemptible VMs and SLURM send SIGTERM
    and SIGKILL a grace period later (SLURM can also send SIGUSR1 early with
    ``#SBATCH --signal=USR1@120``). The handler ONLY records the signal: Python runs handlers
    between bytecodes of the main thread, so a handler that saved a checkpoint itself could
    run in the middle of an optimizer step, or of another save, and write a half-updated
    state. The loop finishes the step, saves, and exits. A second signal while it saves only
    sets the flag again. Use it as a context manager (the previous handlers come back at
    the end); signal handlers can only be installed from the main thread.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)) -> None:
        self.signals = signals
        self.received: int | None = None  # the first signal that arrived
        self._previous: dict[int, Any] = {}

    def _handler(self, signal_number: int, frame: Any) -> None:
        if self.received is None:
            self.received = signal_number

    @property
    def requested(self) -> bool:
        return self.received is not None

    def __enter__(self) -> PreemptionFlag:
        for number in self.signals:
            self._previous[number] = signal.signal(number, self._handler)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous.clear()


def resume_data_stream(loader: Any, data_state: dict | None,
                       loader_generator_state: torch.Tensor) -> Any:
    """The iterator that continues the epoch a checkpoint interrupted, batch for batch.

    ``loader`` is a torchdata ``StatefulDataLoader`` with its own ``generator``;
    ``data_state`` is what ``loader.state_dict()`` returned mid-epoch (``None`` at an epoch
    end), ``loader_generator_state`` is ``loader.generator.get_state()`` at the same moment.
    At an epoch end only the generator matters: the next epoch's shuffle is drawn from it.
    Mid-epoch, ``load_state_dict`` makes the new iterator skip what was consumed (by the
    sampler's index, not by loading and dropping batches). Then the generator is put back:
    with ``num_workers=0``, torchdata 0.11 leaves it in another state than the original run
    after rebuilding the iterator, which changes the NEXT epoch's order (with workers it does
    not; putting it back is right in both cases, the test suite checks both).
    """
    if data_state is None:
        loader.generator.set_state(loader_generator_state.cpu())
        return iter(loader)
    loader.load_state_dict(data_state)
    batches = iter(loader)
    loader.generator.set_state(loader_generator_state.cpu())
    return batches


MISMATCH = "checksum does not match the manifest (the bytes changed after saving)"


@dataclasses.dataclass
class CheckpointEntry:
    """One line of the manifest: what a checkpoint file holds and how to verify it.

    ``seq`` numbers the writes of the folder: the highest is the LATEST checkpoint, whatever
    its step, so a run resumed from an older step is not overtaken by the branch it abandoned.
    It is also part of the file name, so a save never reuses the name of an earlier one.
    """

    file: str
    step: int
    epoch: int
    metrics: dict[str, float]
    timestamp: str
    bytes: int
    checksum: str  # "crc32:..." or "sha256:...", see file_checksum()
    seq: int = 0
    position: int = 0  # batches done inside epoch ``epoch`` (0: saved at an epoch end)
    writer: str = ""  # which manager wrote it: only its writer replaces it at the same step


@dataclasses.dataclass
class LoadedCheckpoint:
    """What the ``load_*`` methods return: the checkpoint dict and its manifest entry."""

    state: dict
    entry: CheckpointEntry
    path: Path


def descriptor_checksum(descriptor: int, algorithm: str, size: int) -> str:
    """:func:`file_checksum` of the first ``size`` bytes of an OPEN file, read with
    ``os.pread`` (which leaves the file offset alone, so another reader can share it).

    Checksumming the open descriptor rather than the path is what ties the check to the
    bytes that torch.load reads from the same descriptor: a rename in between cannot
    substitute another file.
    """
    digest, crc, offset = hashlib.sha256(), 0, 0
    while offset < size:
        block = os.pread(descriptor, min(1 << 20, size - offset), offset)
        if not block:
            break
        offset += len(block)
        if algorithm == "crc32":
            crc = zlib.crc32(block, crc)
        else:
            digest.update(block)
    return f"crc32:{crc:08x}" if algorithm == "crc32" else f"sha256:{digest.hexdigest()}"


def verify_file(path: Path, entry: CheckpointEntry, check_hash: bool = True) -> str | None:
    """``None`` if ``path`` matches ``entry`` (size, then checksum), else what is wrong."""
    try:
        descriptor = open_regular(path)
    except FileNotFoundError:
        return "the file is missing"
    except CheckpointError as err:  # a symlink or a FIFO in its place: a problem, not a crash
        return str(err).partition(": ")[2]
    try:
        size = os.fstat(descriptor).st_size
        if size != entry.bytes:
            return f"size {size} bytes, the manifest says {entry.bytes}"
        algorithm = entry.checksum.partition(":")[0]
        if check_hash and descriptor_checksum(descriptor, algorithm, size) != entry.checksum:
            return MISMATCH
        return None
    finally:
        os.close(descriptor)


def file_identity(descriptor: int) -> tuple[int, int, int, int]:
    """What changes when a file is written: inode, size, mtime and ctime (ns)."""
    info = os.fstat(descriptor)
    return info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns


def load_verified(path: Path, entry: CheckpointEntry, map_location: Any) -> tuple[Any, str]:
    """Load one checkpoint and check it; return ``(state, "")`` or ``(None, problem)``.

    The file is opened ONCE; the checksum (a second thread, ``os.pread``) and ``torch.load``
    read that open descriptor at the same time, so verifying costs about the slower of the
    two, not their sum (section 8 prints the verified load next to torch.load). Holding the
    descriptor means a rename cannot substitute another file. A write INTO the file (``cp``
    onto it, ``rsync --inplace``) could still show the two readers two versions, so the
    file's identity (inode, size, mtime, ctime) is read before and after: a file written
    while it was read is a problem like damage, never returned. (A write changes mtime and
    ctime, and nobody can set ctime back; the kernel's clock ticks are a few ms, so only a
    write in the same tick as the file's previous write would go unseen.) Reading the file
    into memory first and loading from that buffer also closes this, but halved the load's
    speed here (a second copy of every byte). A file that cannot be opened as a plain file
    (a symlink, a FIFO) is a problem like damage: the next candidate is tried. A load
    error on a file whose checksum matches is not damage: it is raised as CheckpointError.
    """
    try:
        descriptor = open_regular(path)
    except FileNotFoundError:
        return None, "the file is missing"
    except CheckpointError as err:
        return None, str(err).partition(": ")[2]
    try:
        before = file_identity(descriptor)
        if before[1] != entry.bytes:
            return None, f"size {before[1]} bytes, the manifest says {entry.bytes}"
        with ThreadPoolExecutor(max_workers=1) as pool, \
                os.fdopen(os.dup(descriptor), "rb") as handle:
            checksum = pool.submit(descriptor_checksum, descriptor,
                                   entry.checksum.partition(":")[0], entry.bytes)
            try:
                state, error = torch.load(handle, map_location=map_location,
                                          weights_only=True), None
            except Exception as err:  # judged below, once the checksum is known
                state, error = None, err
            digest = checksum.result()
        changed = file_identity(descriptor) != before
    finally:
        os.close(descriptor)
    if changed:
        return None, "the file was written while it was read (in place: cp, rsync --inplace)"
    if digest != entry.checksum:
        return None, MISMATCH
    if error is not None:  # the bytes are exactly those saved: not damage, say so loudly
        lines = [line.strip() for line in
                 re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines() if line.strip()]
        reason = next((line for line in lines if "Unsupported global" in line),
                      lines[0] if lines else "")
        raise CheckpointError(
            f"{path}: intact (its checksum matches the manifest) but torch.load failed: "
            f"{type(error).__name__}: {reason}") from error
    return state, ""


def json_nesting(text: str) -> int:
    """How deeply ``text``'s JSON arrays and objects nest, counted WITHOUT parsing it.

    ``json.loads`` recurses once per level: 100,000 nested brackets raise RecursionError
    (or worse). Counting first lets a reader refuse such a file with its own error.

    One pass over the characters that matter (brackets, quotes, backslashes), with two bits
    of state: inside a string or not, and the position an escape skips. A regex that matches
    whole strings instead backtracks: each of 50,000 unterminated ``"\\`` restarts a scan to
    the end of the file, quadratic, minutes for 100 kB. An unterminated string only makes
    the count smaller, and such a file is not valid JSON anyway (json.loads refuses it).
    """
    depth = deepest = 0
    in_string, escaped_at = False, -1
    for match in re.finditer(r'[\[\]{}"\\]', text):
        char, where = match.group(), match.start()
        if where == escaped_at:  # the character after a backslash is never syntax
            continue
        if in_string:
            if char == "\\":
                escaped_at = where + 1
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


ENTRY_FIELDS = {"file": str, "step": int, "epoch": int, "metrics": dict, "timestamp": str,
                "bytes": int, "checksum": str, "seq": int, "position": int,
                "writer": str}
CHECKSUM_TEXT = re.compile(r"crc32:[0-9a-f]{8}|sha256:[0-9a-f]{64}")


def typed_record(item: dict, where: str, fail: Callable[[str, str], Exception]) -> dict:
    """A manifest record's fields checked for type and range, its metrics made floats."""
    for field, value in item.items():
        kind = ENTRY_FIELDS[field]
        if kind is int and not (type(value) is int and 0 <= value < 2**63):
            raise fail(f"{where}.{field}", f"{reprlib.repr(value)} is not an integer in "
                       "[0, 2**63)")
        if kind is not int and not isinstance(value, kind):
            raise fail(f"{where}.{field}", f"{reprlib.repr(value)} is not a {kind.__name__}")
    # Types first, one field at a time, so the error names it: an int where a string is
    # expected would otherwise fail later as a TypeError deep in a format string or a
    # sort, and bytes=10**400 as an OverflowError. bool is an int in Python: refused.
    for key, value in item["metrics"].items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise fail(f"{where}.metrics.{key}", f"{reprlib.repr(value)} is not a number")
        if isinstance(value, int) and not -2**1023 < value < 2**1023:  # float() overflows
            raise fail(f"{where}.metrics.{key}", f"{reprlib.repr(value)} is out of the float "
                       "range")
    return item | {"metrics": {key: float(value) for key, value in item["metrics"].items()}}


class Manifest:
    """``manifest.json``: the index of a checkpoint folder, and its journal of deletions.

    Reading needs no lock: the file is only ever replaced atomically, so a reader sees one
    complete version. It is data from disk, so it is checked before use: a regular file
    (not a symlink, directory or FIFO), at most ``MAX_BYTES``, JSON nested at most
    ``MAX_DEPTH`` deep, written for this monitor and mode; every record has exactly the
    known fields, the integers in [0, 2**63), the metrics numbers within float range, the
    checksum in its format, and plain file names that are not the folder's own (manifest,
    lock, temporaries); metric NAMES and timestamps are free text. Any failure is ONE
    ``CheckpointError`` naming the file and the field (the monitor mismatch: a
    ``MonitorMismatch``, also a ``ValueError``).
    """

    # 4 MiB holds ~13,000 entries of ~300 bytes: far more than any retention keeps.
    MAX_BYTES, MAX_DEPTH = 4 << 20, 8

    def __init__(self, path: Path, monitor: str, mode: str, reserved: tuple = ()) -> None:
        self.path, self.monitor, self.mode = Path(path), monitor, mode
        self.reserved = reserved  # other names of the folder's own (the writer's lock)

    def fail(self, field: str, problem: str) -> CheckpointError:
        """The error for ``field`` ("" for the whole file)."""
        return CheckpointError(f"{self.path}: {field + ': ' if field else ''}{problem}; it was "
                               "left untouched, and so were the checkpoints beside it")

    def read(self) -> tuple[list[CheckpointEntry], list[str], list[str]]:
        """The entries (sorted by write order), the pending deletions, and the names being
        written (journaled before their file appears; see ``recover``)."""
        # lexists, not exists: a dangling symlink in its place must be refused below, not
        # taken for "no manifest yet" (the next write would then replace the link).
        if not os.path.lexists(self.path):
            return [], [], []
        # One bounded read of a regular file: a FIFO, a directory or a 50 GB file planted
        # in its place is refused before json sees a byte.
        with os.fdopen(open_regular(self.path), "rb") as handle:
            raw = handle.read(self.MAX_BYTES + 1)
        if len(raw) > self.MAX_BYTES:
            raise self.fail("", f"larger than {self.MAX_BYTES} bytes")
        try:
            text = raw.decode()
            if json_nesting(text) > self.MAX_DEPTH:
                raise self.fail("", f"JSON nested deeper than {self.MAX_DEPTH}")
            data = json.loads(text)
        except ValueError as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise self.fail("", f"not a valid manifest ({type(err).__name__}: "
                            f"{err})") from None
        if not isinstance(data, dict):
            raise self.fail("(top level)", f"a JSON {type(data).__name__}, not an object")
        if (data.get("monitor"), data.get("mode")) != (self.monitor, self.mode):
            raise MonitorMismatch(
                f"{self.path}: this run monitors {reprlib.repr(data.get('monitor'))} "
                f"({reprlib.repr(data.get('mode'))}), not {self.monitor!r} ({self.mode}); "
                "open it with the same monitor and mode, or use another directory")
        records = data.get("checkpoints")
        pending, writing = data.get("deleting", []), data.get("writing", [])
        if not isinstance(records, list):
            raise self.fail("checkpoints", f"{reprlib.repr(records)} is not a list")
        for field, names in (("deleting", pending), ("writing", writing)):
            if not isinstance(names, list):
                raise self.fail(field, f"{reprlib.repr(names)} is not a list")
            for index, name in enumerate(names):  # a hostile path is the first thing refused
                self.name(f"{field}[{index}]", name)
        entries = [self.entry(index, item) for index, item in enumerate(records)]
        if len({e.seq for e in entries}) < len(entries):  # a manifest written before "seq"
            entries = [dataclasses.replace(e, seq=i) for i, e in enumerate(entries, start=1)]
        # A journal never names a checkpoint the manifest vouches for (a save journals a NEW
        # name, retention a name it has just dropped), and "writing" only names that a save
        # makes (-seq<N>): recovery deletes what the journals name, so a journal that broke
        # either rule would delete a live checkpoint or a file of the user's.
        live = {e.file for e in entries}
        for field, names in (("deleting", pending), ("writing", writing)):
            for index, name in enumerate(names):
                if name in live:
                    raise self.fail(f"{field}[{index}]", f"{reprlib.repr(name)} is a checkpoint "
                                    "this manifest lists; a journal never names one")
                if field == "writing" and not SEQUENCED_NAME.fullmatch(name):
                    raise self.fail(f"{field}[{index}]", f"{reprlib.repr(name)} is not a name a "
                                    "save makes (<template>-seq<N>)")
        return sorted(entries, key=lambda e: e.seq), list(pending), list(writing)

    def entry(self, index: int, item: object) -> CheckpointEntry:
        """One record, checked field by field (older ones had a bare "sha256": upgraded)."""
        where = f"checkpoints[{index}]"
        if not isinstance(item, dict):
            raise self.fail(where, f"{reprlib.repr(item)} is not an object")
        if "sha256" in item and "checksum" not in item and isinstance(item["sha256"], str):
            item = {key: value for key, value in item.items() if key != "sha256"} | {
                "checksum": f"sha256:{item['sha256']}"}
        required = {"file", "step", "epoch", "metrics", "timestamp", "bytes", "checksum"}
        for field in sorted((required - set(item)) | (set(item) - set(ENTRY_FIELDS))):
            raise self.fail(f"{where}.{field}", "missing" if field in required else "unknown")
        item = typed_record(item, where, self.fail)
        if self.monitor not in item["metrics"]:
            raise self.fail(f"{where}.metrics", f"has no {self.monitor!r}")
        if not CHECKSUM_TEXT.fullmatch(item["checksum"]):
            raise self.fail(f"{where}.checksum", f"unknown checksum "
                            f"{reprlib.repr(item['checksum'])} (crc32:<8 hex> or "
                            "sha256:<64 hex> expected)")
        self.name(f"{where}.file", item["file"])
        return CheckpointEntry(**item)

    def name(self, field: str, value: object) -> str:
        """A file name the manifest gives: plain (:func:`plain_file_name`), and not one of
        the folder's own files: journaling ``writer.lock`` for deletion would unlink the lock
        while it is held, and a record for the manifest or a temporary makes no sense."""
        if isinstance(value, str) and (value in (self.path.name, *self.reserved)
                                       or value.endswith(TEMPORARY_SUFFIX)):
            raise self.fail(field, f"{reprlib.repr(value)} is the folder's own file, not a "
                            "checkpoint")
        try:
            return plain_file_name(value, self.path.parent, self.path)
        except CheckpointError as err:  # the same words, with the field named
            raise self.fail(field, str(err).partition(": ")[2]) from None

    def finish_deletions(self) -> list[CheckpointEntry]:
        """Under the writer lock: delete the files journaled as "deleting" (re-read: under
        the lock the file is the truth), write the manifest without them; the entries."""
        entries, pending, writing = self.read()
        self.delete(pending)
        if pending:
            self.write(entries, writing=writing)
        return entries

    def recover(self) -> list[CheckpointEntry]:
        """Under the writer lock (no save is running): finish journaled deletions, delete
        the files journaled as "writing" that no entry names (a crash came before the
        manifest switched to them), and the temporaries of those files and of the manifest.

        Only what the journal accounts for is deleted: a folder whose manifest is missing
        (deleted by hand, never copied) keeps every file, and so does a file of the user's
        that merely looks like a checkpoint. Every orphan a crash can leave IS journaled,
        because a save writes its name into the manifest before the file exists.
        Unlinking a symlink removes the link, never what it points to."""
        entries, pending, writing = self.read()
        orphans = [name for name in writing if name not in {e.file for e in entries}]
        owners = {self.path.name, *orphans}
        self.delete(pending + orphans)
        self.delete([name for name in os.listdir(self.path.parent)
                     if (match := TEMPORARY_NAME.fullmatch(name)) and match[1] in owners],
                    check=False)
        if pending or writing:
            self.write(entries)
        return entries

    def delete(self, names: list[str], check: bool = True) -> None:
        """Unlink files of this folder (names checked again), then make that durable."""
        for name in names:
            if check:
                self.name("deleting", name)
            try:
                os.unlink(self.path.parent / name)
            except FileNotFoundError:
                continue
            except OSError as err:  # a directory planted under a journaled name, say
                raise self.fail("", f"cannot delete {name!r}: {err.strerror}") from None
        if names:
            fsync_directory(self.path.parent)

    def write(self, entries: list[CheckpointEntry], deleting: list[str] = (),
              writing: list[str] = ()) -> None:
        """Replace the manifest atomically; ``deleting`` journals files about to go,
        ``writing`` the file a save is about to create (a write-ahead journal).

        Indented, so ``cat manifest.json`` is readable. A NaN metric (a mid-epoch save has
        no validation loss) is written as the bare word ``NaN``: not strict JSON, but what
        Python's json module writes and reads back, so it round-trips here; a tool that
        insists on strict JSON needs ``parse_constant``.
        """
        data = {"monitor": self.monitor, "mode": self.mode,
                "checkpoints": [dataclasses.asdict(entry) for entry in entries],
                "deleting": list(deleting),  # re-tried by the next writer after a crash
                "writing": list(writing)}  # deleted by the next writer unless an entry names it
        text = json.dumps(data, indent=2) + "\n"
        atomic_write(self.path, lambda handle: handle.write(text.encode()))


@dataclasses.dataclass
class Retention:
    """Which checkpoints to keep: the newest ``keep_last`` writes (the latest among them)
    and the ``save_top_k`` best FINITE ones by ``monitor``/``mode``; the best is always
    kept, even with ``save_top_k=0``. A NaN or inf metric ranks last, never best."""

    monitor: str
    mode: str = "min"
    save_top_k: int = 2
    keep_last: int = 2

    def __post_init__(self) -> None:
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', not {self.mode!r}")
        if self.save_top_k < 0 or self.keep_last < 1:
            raise ValueError("save_top_k must be >= 0 and keep_last >= 1 (the latest is kept)")

    def ranked(self, entries: list[CheckpointEntry]) -> list[CheckpointEntry]:
        """Best to worst, non-finite last; ties keep write order (the earlier first)."""
        sign = -1.0 if self.mode == "max" else 1.0

        def key(entry: CheckpointEntry) -> tuple[bool, float]:
            value = entry.metrics[self.monitor]
            return (not math.isfinite(value), sign * value if math.isfinite(value) else 0.0)

        return sorted(entries, key=key)

    def finite_ranked(self, entries: list[CheckpointEntry]) -> list[CheckpointEntry]:
        """The candidates for "best": finite metrics only, best first."""
        return [e for e in self.ranked(entries) if math.isfinite(e.metrics[self.monitor])]

    def split(self, entries: list[CheckpointEntry]) -> tuple[list[CheckpointEntry], list[str]]:
        """``(entries kept, in write order; names of the files to delete)``."""
        keep = {e.file for e in entries[-self.keep_last:]}
        keep |= {e.file for e in self.finite_ranked(entries)[: max(self.save_top_k, 1)]}
        return ([e for e in entries if e.file in keep],
                [e.file for e in entries if e.file not in keep])


class BackgroundWriter:
    """One background thread with at most one job in flight, and the async snapshot buffer.

    ``wait()`` forgets the job only once it is DONE: a KeyboardInterrupt that lands while
    waiting leaves it in flight, so the next ``snapshot_and_submit`` waits again instead of
    copying into the buffer the thread is still writing to disk. A KeyboardInterrupt can also
    land INSIDE ``executor.submit``, after the job is queued but before its Future is kept:
    then nothing can wait for it, so the buffer's own flag (set by the job when it ends, run
    or not) decides, and a buffer whose flag is still down is left to that job; the next
    snapshot takes fresh memory.
    """

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1)
        self._in_flight: Future | None = None
        self.staging: Any = None  # the last snapshot; its memory is reused by the next one
        self._staging_free = threading.Event()  # down while a job may still read ``staging``
        self._staging_free.set()

    def submit(self, work: Callable[..., Any], *args: Any) -> None:
        """Run ``work(*args)`` in the thread, after the job before it (one in flight)."""
        self.wait()
        self._in_flight = self._executor.submit(work, *args)

    def snapshot_and_submit(self, state: Any, work: Callable[..., Any], *args: Any) -> None:
        """Copy ``state`` to the CPU (into the previous snapshot's memory), then write it."""
        self.wait()  # the buffer is free only once the write of its last copy has finished
        reuse = self.staging if self._staging_free.is_set() else None
        self.staging = snapshot_to_cpu(state, reuse=reuse)
        staging, free = self.staging, threading.Event()  # down BEFORE the job can exist
        self._staging_free = free

        def job() -> Any:
            try:
                return work(staging, *args)
            finally:
                free.set()

        self._in_flight = self._executor.submit(job)

    @property
    def busy(self) -> bool:
        """Whether a job may still run (``wait()`` has not seen it finish)."""
        return self._in_flight is not None

    def wait(self) -> None:
        """Block until the job in flight is finished; re-raise its error, if any."""
        in_flight = self._in_flight
        if in_flight is None:
            return
        try:
            in_flight.result()
        finally:
            if in_flight.done():
                self._in_flight = None

    def close(self) -> None:
        """Wait for the job in flight, then stop the thread (also if the job failed)."""
        try:
            self.wait()
        finally:
            self._executor.shutdown(wait=True)


def manifest_table(entries: list[CheckpointEntry], monitor: str, best: CheckpointEntry | None,
                   latest: CheckpointEntry | None) -> str:
    """The manifest as a table, one row per checkpoint, with best and latest marked."""
    rows = [f"  {'file':<50} {'step':>6} {'epoch':>5} {monitor:>9} "
            f"{'size':>10}  checksum        flags"]
    for e in entries:
        flags = " ".join(f for f, on in (("best", e == best), ("latest", e == latest)) if on)
        rows.append(f"  {e.file:<50} {e.step:>6} {e.epoch:>5} {e.metrics[monitor]:>9.4f} "
                    f"{e.bytes / 1e6:>7.2f} MB  {e.checksum[:14]}  {flags}")
    return "\n".join(rows)


def with_sequence(name: str, seq: int) -> str:
    """``"epoch003-step000042-val_loss0.2500.pt"`` -> ``"...-val_loss0.2500-seq7.pt"``."""
    suffix = Path(name).suffix if re.fullmatch(r"\.[A-Za-z][A-Za-z0-9]*", Path(name).suffix) \
        else ""
    return f"{name[: len(name) - len(suffix)]}-seq{seq}{suffix}"


# The names with_sequence() makes. Recovery deletes only journaled names; --resume refuses a
# folder holding such files but no manifest (it would otherwise start over beside them).
SEQUENCED_NAME = re.compile(r".+-seq[0-9]+(\.[A-Za-z][A-Za-z0-9]*)?")


class CheckpointReader:
    """The reading half of :class:`CheckpointManager`: list, best, latest, verify, load.

    Every method re-reads the manifest (cheap: a few kB of JSON), so a job that only
    evaluates sees what the trainer wrote since it opened the folder, and never caches a
    list that another process's retention has since changed. A candidate that fails its
    check (missing, not a plain file, wrong size, wrong checksum) is skipped with a
    CheckpointWarning and the next one is tried; a file that verifies but does not load
    raises, and so does a manifest that cannot be read.

    It reads ``directory``, ``manifest``, ``retention`` and ``entries`` and calls ``wait()``,
    which the manager sets up; every load verifies the file against the manifest first.
    """

    directory: Path
    manifest: Manifest
    retention: Retention
    monitor: str
    entries: list[CheckpointEntry]

    def wait(self) -> None:
        """Nothing is ever in flight for a reader (the manager waits for its save)."""

    @property
    def manifest_path(self) -> Path:
        return self.manifest.path

    def list(self) -> list[CheckpointEntry]:
        """The checkpoints the manifest records, oldest write first (after this manager's
        save in flight; re-read, so it shows what other processes wrote too)."""
        self.wait()
        self.entries = self.manifest.read()[0]
        return list(self.entries)

    @property
    def best(self) -> CheckpointEntry | None:
        """The best checkpoint with a finite metric, or None if there is none."""
        finite = self.retention.finite_ranked(self.list())
        return finite[0] if finite else None

    @property
    def latest(self) -> CheckpointEntry | None:
        """The most recently written checkpoint (highest ``seq``), whatever its step."""
        entries = self.list()
        return entries[-1] if entries else None

    def inspect(self) -> str:
        """A table of the manifest, one row per checkpoint, with best and latest marked."""
        return manifest_table(self.list(), self.monitor, self.best, self.latest)

    def verify(self, entry: CheckpointEntry, check_hash: bool = True) -> str | None:
        """``None`` if the file matches its manifest entry, else what is wrong with it
        (``check_hash=False``: only the cheap checks, that it exists and its size)."""
        plain_file_name(entry.file, self.directory, self.manifest_path)
        return verify_file(self.directory / entry.file, entry, check_hash)

    def _load_first_good(self, candidates: list[CheckpointEntry],
                         map_location: Any) -> LoadedCheckpoint | None:
        for entry in candidates:
            path = self.directory / entry.file
            state, problem = load_verified(path, entry, map_location)
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
        return self._load_first_good(self.retention.finite_ranked(self.list()), map_location)

    def load(self, which: int | str, map_location: Any = "cpu") -> LoadedCheckpoint:
        """The checkpoint saved at step ``which`` (an int; the newest write if several
        writers saved that step) or in file ``which`` (a name from the manifest); an error if
        there is none or it is damaged."""
        entries = self.list()
        matches = [e for e in entries if (e.file == which if isinstance(which, str)
                                          else e.step == which)]
        if not matches:
            raise KeyError(f"{self.directory}: no checkpoint {which!r} in the manifest; kept: "
                           f"steps {[e.step for e in entries]}, files {[e.file for e in entries]}")
        loaded = self._load_first_good(matches[::-1], map_location)
        if loaded is None:
            raise CheckpointError(f"{self.directory / matches[-1].file}: damaged (see the "
                                  "warning)")
        return loaded


class CheckpointManager(CheckpointReader):
    """Keep the last N and the best K checkpoints of a run, atomically, with a verified manifest.

    ``manager.save(state, step=..., epoch=..., metrics={...})`` writes ``state`` (a checkpoint
    dict, see common/__init__.py for the keys) and applies the :class:`Retention` policy;
    ``load_latest()`` / ``load_best()`` / ``load(step)`` return the newest good match.

    Guarantees, and what each one prevents:
    - A crash at any instant loses nothing. Each save writes a NEW file name (the write's
      ``seq`` is in it) atomically, then switches the :class:`Manifest` to it, and only then
      retires old files through the manifest's journal: no file the manifest vouches for is
      ever overwritten. The new file's name is journaled in the manifest BEFORE the file
      exists, so whatever a crash leaves (a temporary, a file no entry names yet, a
      journaled deletion) the next writer's recovery removes or finishes; it deletes
      nothing the journal does not account for (a folder without its manifest keeps every
      file): a file the journal does not name is never touched.
    - One :class:`WriterLock` (``writer.lock``) per folder: each save holds it and re-reads
      the manifest under it, so two processes lose no entry. Retention applies to the
      folder's COMBINED entries (one run's policy may retire another's older files); a
      step saved again replaces only this manager's own entry (each records its writer).
      Nothing is deleted without first being journaled. EVERY manager, a reader's too,
      takes the lock once in ``__init__`` WITHOUT waiting, to finish what a crashed writer
      left; if a writer holds it, that step is skipped, so opening a folder
      to evaluate never waits for a save in flight (it may delete what a crashed writer
      journaled).
    - A hostile folder is refused with one ``CheckpointError``: names outside the folder,
      symlinked or hard-linked lock and manifest files, FIFOs, malformed records.
    - A non-finite monitored metric never ranks best; only DAMAGE (missing file, wrong size
      or checksum) is skipped, with a ``CheckpointWarning``; an intact file that does not
      load raises. "Latest" is the most recent write (``seq``), not the highest step.

    With ``async_save=True``, ``save`` snapshots the state to the CPU and writes it in a
    :class:`BackgroundWriter`; ``wait()`` (or leaving a ``with`` block) waits for it.
    """

    MANIFEST = "manifest.json"
    LOCK = "writer.lock"

    def __init__(
        self, directory: str | Path, *, monitor: str = "val_loss", mode: str = "min",
        save_top_k: int = 2, keep_last: int = 2,
        filename: str = "epoch{epoch:03d}-step{step:06d}-{monitor}{value:.4f}.pt",
        async_save: bool = False, serialize: Callable[[Any, Any], None] = torch.save,
        lock_timeout: float = 60.0, checksum: str = "crc32",
    ) -> None:
        self.retention = Retention(monitor, mode, save_top_k, keep_last)
        if checksum not in CHECKSUMS:
            raise ValueError(f"checksum must be one of {CHECKSUMS}, not {checksum!r}")
        self.monitor, self.mode, self.checksum = monitor, mode, checksum
        self.filename, self.async_save = filename, async_save
        self.serialize = serialize  # torch.save; tests pass a writer that fails half-way
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.manifest = Manifest(self.directory / self.MANIFEST, monitor, mode, (self.LOCK,))
        self._background = BackgroundWriter()  # async saves, and deletions after sync ones
        self._lock = threading.Lock()  # this manager's caller against its background thread
        self._writer_lock = WriterLock(self.directory / self.LOCK, lock_timeout)
        self.writer = f"{os.getpid()}-{secrets.token_hex(4)}"  # this manager, in its entries
        self.entries: list[CheckpointEntry] = self.manifest.read()[0]
        # Recovery needs the lock (a temporary may belong to a save running right now in
        # another process); try once, without waiting: a reader must never hang here.
        if self._writer_lock.acquire(blocking=False):  # nobody is writing: recover now
            try:
                self.entries = self.manifest.recover()
            finally:
                self._writer_lock.release()

    def _name(self, fields: dict, seq: int) -> str:
        """The file name for a save: the template, made safe, then "-seq<N>" before the
        suffix; checked to be a plain name in the folder."""
        value = float(fields["metrics"][self.monitor])
        name = with_sequence(safe_file_part(self.filename.format(
            epoch=fields["epoch"], step=fields["step"], monitor=self.monitor, value=value)), seq)
        return plain_file_name(name, self.directory, self.directory)

    def save(self, state: dict, *, step: int, epoch: int, metrics: dict[str, float],
             position: int = 0) -> Path:
        """Write a checkpoint and apply the retention policy; return the file's path.

        ``epoch`` counts the epochs completed, ``position`` the batches done in the next one
        (a checkpoint saved mid-epoch); the manifest records both, and ``step``. In async
        mode the previous save is waited for first (its error surfaces here), the state is
        copied to the CPU and written in the background; the path returned is the one the
        write will use unless another process saves into the folder meanwhile.
        """
        if self.monitor not in metrics:
            raise KeyError(f"metrics must include the monitored {self.monitor!r}: got "
                           f"{sorted(metrics)}")
        fields = {"step": step, "epoch": epoch, "position": position,
                  "metrics": {key: float(value) for key, value in metrics.items()}}
        self._background.wait()
        # The write number this save will most likely get (the manifest decides under the
        # lock); building the name now also refuses a bad template before anything runs.
        seq = max((e.seq for e in self.entries), default=0) + 1
        name = self._name(fields, seq)
        if not self.async_save:
            return self._write(state, fields, seq)
        self._background.snapshot_and_submit(state, self._write, fields, seq)
        return self.directory / name

    def wait(self) -> None:
        """Block until the save in flight (if any) is on disk; re-raise its error, if any."""
        self._background.wait()

    def close(self) -> None:
        """Wait for the last save, then stop the background thread."""
        self._background.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _write(self, state: dict, fields: dict, seq: int) -> Path:
        """Under both locks: re-read the manifest (another writer's entries are kept), write
        the file under a name no entry uses, switch the manifest, retire the replaced."""
        # Where a crash can land, and why each place is safe:
        # - before the journal's replace: only the manifest's temporary; recovery removes it.
        # - before os.replace: a "*.partial" temporary of the journaled name; removed.
        # - after the replace, before the manifest's: a complete file that no entry names
        #   (an orphan), journaled as "writing". The manifest still vouches for the old
        #   files, whose bytes nothing touched, because the new name is new; recovery
        #   removes the orphan.
        # - after the manifest's replace: the new entry is live and the files to retire are
        #   journaled in "deleting"; recovery (or the background thread) deletes them and
        #   writes the manifest once more without the journal.
        # So a reader finds the previous state or the new one, never a mix: the test suite
        # checks it by killing a save at every one of its filesystem calls.
        with self._lock, self._writer_lock:
            entries, pending, writing = self.manifest.read()
            if writing:  # a writer died mid-save since this manager opened: clean up first
                entries, pending = self.manifest.recover(), []
            # The next write number, also when another writer saved since save() guessed it;
            # a hostile or old manifest could already name that file: then count on.
            seq = max([seq] + [e.seq + 1 for e in entries])
            # A name that exists on disk (a stray file, a checkpoint of a manifest restored
            # from an older backup) is skipped too: os.replace would destroy it, and recovery
            # after a crash here would delete it as the journaled orphan.
            while ((name := self._name(fields, seq)) in {e.file for e in entries}
                   or os.path.lexists(self.directory / name)):
                seq += 1
            path = self.directory / name
            # Write-ahead: the name is journaled BEFORE the file exists, so whatever a crash
            # leaves (a temporary, a complete file no entry names) recovery can account for.
            self.manifest.write(entries, deleting=pending, writing=[name])
            try:
                checksum = atomic_write(path, lambda handle: self.serialize(state, handle),
                                        self.checksum)
            except Exception:  # the temporary is gone (atomic_write): so is the journal line
                self.manifest.write(entries, deleting=pending)
                raise
            entry = CheckpointEntry(
                file=name, **fields, bytes=path.stat().st_size, checksum=checksum, seq=seq,
                writer=self.writer,
                timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
            # A step this manager saved again replaces its old entry; another writer's entry
            # at the same step (a second process, an earlier run) is kept: replacing it
            # would silently drop that process's checkpoint. Retention then decides.
            replaced = [e.file for e in entries
                        if e.step == entry.step and e.writer == self.writer]
            kept, dropped = self.retention.split(
                [e for e in entries if e.file not in replaced] + [entry])
            dropped = list(dict.fromkeys(dropped + replaced + pending))
            self.manifest.write(kept, deleting=dropped)  # the switch, and the journal
            self.entries = kept
            if dropped and self.async_save:  # already in the background thread
                self.entries = self.manifest.finish_deletions()
            elif dropped:  # freeing a big file's blocks takes time (~20 ms per 100 MB)
                self._background.submit(self._finish_deletions)
            return path

    def _finish_deletions(self) -> None:
        with self._lock, self._writer_lock:
            self.entries = self.manifest.finish_deletions()


# ############################################################################################
# The lessons, in order. In a notebook each cell runs its lesson (the `if in_notebook():`
# lines); `python 02_checkpoint_manager.py` runs them all through main() at the bottom.
# ############################################################################################

# The training loop every section uses. The checkpoint dict uses the collection's key set
# (common/__init__.py): "epoch" is the epoch to run next, "data" says how far into it the
# data stream is (0 batches at an epoch end), "rng" holds every generator. It is ordinary
# training code; what makes it resumable at ANY step is WHAT it puts in the checkpoint and
# the order in which it restores it (model, optimizer, scheduler, scaler, generators, data).


STEPS_PER_EPOCH = 6  # 384 training images in batches of 64 (tests check it)


class SimulatedCrash(RuntimeError):
    """Raised by ``train(crash_at_step=...)`` to stand in for a killed process."""


@dataclasses.dataclass
class SaveSchedule:
    """When ``train`` writes a checkpoint besides every epoch end (Lightning's
    ``every_n_train_steps`` and ``train_time_interval``): every ``steps`` optimizer steps
    and/or every ``seconds`` of wall-clock time; ``None`` turns either off."""

    steps: int | None = None
    seconds: float | None = None

    def due(self, step: int, last_save: float) -> bool:
        return bool((self.steps and step % self.steps == 0)
                    or (self.seconds and time.monotonic() - last_save >= self.seconds))


class Training:
    """SmallCNN, its optimizer, scheduler, scaler and data, trained with a CheckpointManager.

    ``Training(directory, epochs=..., seed=..., device=...)`` builds everything exactly as a
    fresh run would; ``resume(...)`` then overwrites the state of each object from a
    checkpoint (rebuilding the objects and loading their state, instead of pickling the
    objects, keeps the checkpoint loadable with weights_only=True); ``run()`` trains;
    ``manager.close()`` stops its background thread (``train()`` below does all three).
    """

    def __init__(self, directory: Path, *, epochs: int, seed: int, device: torch.device,
                 saves: SaveSchedule | None = None, async_save: bool = True,
                 num_workers: int = 0, log: Callable[[str], None] = print) -> None:
        seed_everything(seed)
        self.epochs, self.seed, self.device, self.log = epochs, seed, device, log
        self.model = SmallCNN().to(device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, epochs)
        # Mixed precision on CUDA needs a GradScaler, whose scale factor is state too.
        self.scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
        # A small, noisy task: validation loss bottoms out early, so "best" != "latest".
        # torchdata's StatefulDataLoader is a DataLoader whose position inside an epoch is
        # state (state_dict / load_state_dict), like the model's weights.
        self.train_loader, self.val_loader = make_loaders(
            make_image_classification(512, noise=2.0, seed=seed), seed=seed,
            num_workers=num_workers, train_loader_class=StatefulDataLoader)
        self.saves = saves or SaveSchedule()
        self.manager = CheckpointManager(directory, monitor="val_loss", mode="min",
                                         save_top_k=2, keep_last=2, async_save=async_save)
        # Where the run stands: the epoch to run next (0-based), optimizer steps so far,
        # per-epoch history, and inside the epoch the data position and running loss.
        self.epoch, self.step, self.history = 0, 0, []
        self.data: dict = self.fresh_epoch()
        self.resumed_loader_state: torch.Tensor | None = None
        self.resumed_from: CheckpointEntry | None = None
        self.resumed_path: Path | None = None

    @staticmethod
    def fresh_epoch() -> dict:
        return {"position": 0, "loss_sum": 0.0, "seen": 0, "step_losses": [], "loader": None}

    def resume(self, which: bool | int | str) -> LoadedCheckpoint | None:
        """Load the latest good checkpoint (``True``), or the one at step/file ``which``.

        A checksum only proves that the bytes are the ones saved: a checkpoint from another
        model, another device, or a hand-edited one verifies just as well, and half-restoring
        it would leave a run that is neither the old one nor a fresh one.

        The state is checked (check_resume_state) BEFORE anything is changed, and every
        load_state_dict call that still refuses it becomes one CheckpointError naming the
        file and the field, never a traceback halfway through restoring.
        """
        loaded = load_for_resume(self.manager, which, self.log)
        if loaded is None:
            return None
        state, path = loaded.state, loaded.path
        check_resume_state(state, path, self)
        # The order matters for the optimizer only: its state is cast to the device of the
        # parameters it manages NOW, so the model is already on its device.
        for field, restore in (
                ("model", self.model.load_state_dict),
                ("optimizer", self.optimizer.load_state_dict),
                ("scheduler", self.scheduler.load_state_dict),
                ("scaler", self.scaler.load_state_dict),
                ("rng", restore_rng_state)):  # the loader's generator: see run()
            try:
                restore(state[field])
            except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as err:
                raise CheckpointError(f"{path}: field {field!r} does not fit this run: "
                                      f"{first_line(err)}") from None
        self.epoch, self.step, self.history = state["epoch"], state["step"], state["history"]
        self.data = state.get("data") or self.fresh_epoch()  # absent: saved at an epoch end
        self.resumed_loader_state = state["rng"]["loader"]
        self.resumed_from, self.resumed_path = loaded.entry, path
        self.log(f"  resumed from {loaded.path.name}: epoch {self.epoch + 1}, "
                 f"{self.data['position']} batch(es) of it done, step {self.step}")
        return loaded

    def run(self, stop: PreemptionFlag | None = None, crash_at_step: int | None = None,
            step_delay: float = 0.0) -> None:
        """Train to ``epochs``; save at epoch ends, when ``saves`` says so, and on a signal.

        ``self.epoch`` is the epoch to run next, so the loop neither repeats nor skips one
        after a resume; inside it, the data stream continues after the batch the checkpoint
        was written after. ``crash_at_step`` raises SimulatedCrash after that step's
        checkpoint (if any); ``step_delay`` seconds of sleep per step make a demo run slow
        enough to interrupt by hand.
        """
        # Why the checks sit where they do:
        # - A save happens AFTER a step and before the next one, never inside one: the
        #   weights, the optimizer moments, the generators and the data position then all
        #   describe the same instant, which is what makes the resume exact.
        # - The last batch of an epoch is not saved as "mid-epoch": the epoch-end checkpoint
        #   (scheduler stepped, validation measured) follows right away.
        # - The flag is polled once per step, so a signal costs at most one step of delay;
        #   the grace period of a scheduler (30 s and more) is far longer than a step here.
        #   A step that takes minutes needs a finer poll, or a shorter step.
        # - manager.wait() before raising: with async saving, the checkpoint is still being
        #   written in the background thread; exiting first would lose it.
        last_save = time.monotonic()
        while self.epoch < self.epochs:
            if self.resumed_loader_state is not None:  # the first epoch after a resume
                try:
                    batches = resume_data_stream(self.train_loader, self.data["loader"],
                                                 self.resumed_loader_state)
                except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as err:
                    raise CheckpointError(f"{self.resumed_path}: field 'data.loader' does not "
                                          f"fit this loader: {first_line(err)}") from None
                self.resumed_loader_state = None
            else:
                batches = iter(self.train_loader)
            self.model.train()
            for batch in batches:
                self.train_one_step(batch)
                if step_delay:  # a slowed demo run says where it is, to be interrupted by hand
                    self.log(f"  step {self.step} (epoch {self.epoch + 1}, batch "
                             f"{self.data['position']})")
                time.sleep(step_delay)
                stopping = stop is not None and stop.requested
                mid_epoch = self.data["position"] < len(self.train_loader)
                if mid_epoch and (stopping or self.saves.due(self.step, last_save)):
                    self.save_mid_epoch()
                    last_save = time.monotonic()
                if mid_epoch and crash_at_step == self.step:
                    self.manager.wait()
                    raise SimulatedCrash(f"simulated crash after step {self.step}")
                if mid_epoch and stopping:
                    self.manager.wait()  # the checkpoint is on disk before the process ends
                    raise Preempted(stop.received, self.preempted_message(stop))
            self.end_epoch()
            self.epoch += 1
            last_save = time.monotonic()
            if crash_at_step == self.step:
                self.manager.wait()
                raise SimulatedCrash(f"simulated crash after epoch {self.epoch}")
            if stop is not None and stop.requested:  # came during the last step or evaluation
                self.manager.wait()
                raise Preempted(stop.received, self.preempted_message(stop))
        self.manager.wait()  # the last checkpoint is on disk when run() returns

    def train_one_step(self, batch: tuple) -> None:
        """One optimizer step (mixed precision when the scaler is on); count it.

        The running loss of the epoch is kept as a sum and a count (not a mean of means),
        and the per-step losses as a list: both go into a mid-epoch checkpoint, so the
        epoch's train_loss after a resume is the same float as without one.
        """
        inputs, targets = batch[0].to(self.device), batch[1].to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, enabled=self.scaler.is_enabled()):
            loss = torch.nn.functional.cross_entropy(self.model(inputs), targets)
        self.scaler.scale(loss).backward()  # without AMP the scaler passes it all through
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        self.data["position"] += 1
        self.data["loss_sum"] += loss.item() * len(targets)
        self.data["seen"] += len(targets)
        self.data["step_losses"].append(loss.item())

    def end_epoch(self) -> None:
        """Step the scheduler, evaluate, log, save the epoch-end checkpoint."""
        self.scheduler.step()
        val = evaluate(self.model, self.val_loader, self.device)
        train_loss = self.data["loss_sum"] / max(self.data["seen"], 1)
        self.history = self.history + [{
            "epoch": self.epoch + 1, "step": self.step, "train_loss": train_loss,
            "val_loss": val["loss"], "val_accuracy": val["accuracy"],
            "step_losses": self.data["step_losses"]}]
        self.data = self.fresh_epoch()
        path = self.save(epoch=self.epoch + 1, data=None,
                         metrics={"val_loss": val["loss"], "train_loss": train_loss})
        self.log(f"  epoch {self.epoch + 1:>2}/{self.epochs}: train_loss {train_loss:.4f}  "
                 f"val_loss {val['loss']:.4f}  val_acc {val['accuracy']:.3f}  -> {path.name}")

    def save_mid_epoch(self) -> None:
        """A checkpoint after this step. It has no validation loss (evaluating here would draw
        from the random generators and change the run): val_loss is NaN, which the manager
        never ranks as best, while keep_last keeps it for resuming."""
        self.data["loader"] = self.train_loader.state_dict()
        path = self.save(epoch=self.epoch, data=self.data, metrics={
            "val_loss": math.nan, "train_loss": self.data["loss_sum"] / self.data["seen"]})
        self.log(f"  step {self.step} (epoch {self.epoch + 1}, batch "
                 f"{self.data['position']}): saved {path.name}")

    def save(self, epoch: int, data: dict | None, metrics: dict) -> Path:
        """Everything that decides the next step, under the collection's checkpoint keys."""
        # "epoch" is the epoch to run next; "data" (mid-epoch only) is how far into it the
        # stream is; "history" holds every finished epoch with its step losses, so a resumed
        # run can draw its whole curve; "rng" is every generator, the loader's included.
        state = {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "epoch": epoch, "step": self.step, "history": self.history,
            "metrics": {"step": self.step, **metrics},
            "rng": capture_rng_state(self.train_loader.generator),
            "config": {"model": "SmallCNN", "epochs": self.epochs, "seed": self.seed,
                       "device": self.device.type, "amp": self.scaler.is_enabled()},
        }
        if data is not None:
            state["data"] = copy.deepcopy(data)  # the live dict goes on changing
        return self.manager.save(state, step=self.step, epoch=epoch, metrics=metrics,
                                 position=data["position"] if data else 0)

    def preempted_message(self, stop: PreemptionFlag) -> str:
        return (f"preempted by {signal.Signals(stop.received).name}: checkpoint saved after "
                f"step {self.step} in {self.manager.directory}; re-run with --resume")


def check_resume_state(state: object, path: Path, training: Training) -> None:
    """Refuse a checkpoint that does not fit ``training`` with ONE CheckpointError naming
    the file and the field: its type, keys, tensor shapes, generator sizes, data position,
    and the device and mixed-precision mode it was saved with (a CPU checkpoint holds an
    empty scaler state that a CUDA run cannot load; a CUDA one resumed on the CPU would
    silently drop mixed precision). The checksum proved the bytes are the ones saved, not
    that they make sense for this run."""
    def fail(field: str, problem: str) -> CheckpointError:
        return CheckpointError(f"{path}: field {field!r}: {problem}; nothing was changed")

    def integer(field: str, value: object, low: int, high: int) -> None:
        if type(value) is not int or not low <= value <= high:
            raise fail(field, f"{reprlib.repr(value)} is not an integer in [{low}, {high}]")

    # The checks go from the outside in: the container, each key's type, the numbers that
    # drive the loop (epoch, step), the mode the run was saved in, then what the objects
    # would load (the model's tensor shapes, the generators, the data position). Each one
    # names the field, so "error: state vector is the wrong size" becomes "field
    # 'rng.python': not random.getstate()'s ...", which says what to look at.
    if not isinstance(state, dict):
        raise fail("(the checkpoint)", f"a {type(state).__name__}, not a dict")
    for key, kind in (("model", dict), ("optimizer", dict), ("scheduler", dict),
                      ("scaler", dict), ("epoch", int), ("step", int), ("history", list),
                      ("rng", dict), ("config", dict)):
        if not isinstance(state.get(key), kind):
            raise fail(key, f"{reprlib.repr(state.get(key))} is not a {kind.__name__}")
    integer("epoch", state["epoch"], 0, 10**6)
    integer("step", state["step"], 0, 2**62)
    if not all(isinstance(epoch, dict) for epoch in state["history"]) \
            or len(state["history"]) != state["epoch"]:
        raise fail("history", f"not a list of {state['epoch']} dicts, one per finished epoch")
    amp = state["config"].get("amp", bool(state["scaler"]))  # older: a non-empty scaler
    saved_on = state["config"].get("device", "cuda" if amp else "cpu")
    if (saved_on, amp) != (training.device.type, training.scaler.is_enabled()):
        raise fail("config.device/amp", f"saved on {saved_on} with mixed precision "
                   f"{'on' if amp else 'off'}, this run is on {training.device.type} with it "
                   f"{'on' if training.scaler.is_enabled() else 'off'}; resume with "
                   f"--device {saved_on} (a switch changes the numerics of every step)")
    # Shapes and dtypes before load_state_dict: its error lists every mismatch over many
    # lines, and a wrong dtype would load silently (it is cast on copy).
    expected = training.model.state_dict()
    if set(state["model"]) != set(expected):  # key=repr: a hostile key need not be a str
        differ = sorted(set(state["model"]) ^ set(expected), key=repr)[:3]
        raise fail("model", f"keys differ: {reprlib.repr(differ)}")
    for key, tensor in state["model"].items():
        if not (isinstance(tensor, torch.Tensor) and tensor.shape == expected[key].shape
                and tensor.dtype == expected[key].dtype):
            raise fail(f"model.{key}", f"{reprlib.repr(tensor)} is not a {expected[key].dtype} "
                       f"tensor of shape {tuple(expected[key].shape)}")
    check_rng_state(state["rng"], fail, training.train_loader.generator)
    check_optimizer_state(state["optimizer"], fail, training.optimizer)
    check_like("scheduler", state["scheduler"], training.scheduler.state_dict(), fail)
    # Types are not enough for a scheduler: T_max = 0 loads and divides by zero at the
    # epoch's end, a NaN eta_min turns every weight into NaN. Its numbers must be finite,
    # its period at least 1 and its epoch count at least -1 (the value before the first step).
    for key, value in state["scheduler"].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and (
                not math.isfinite(value) or (key == "T_max" and value < 1)
                or (key == "last_epoch" and value < -1)):
            raise fail(f"scheduler.{key}", f"{reprlib.repr(value)} is out of range")
    # Mid-epoch, the position says how many batches of the epoch are done: 0 or the whole
    # epoch would be an epoch-end checkpoint (saved without "data"), more is impossible.
    # The loader's own count of batches handed out must agree, or the epoch would run a
    # different number of batches than the position claims (a bogus {} ran all of them).
    data = state.get("data")
    if data is not None:
        if not isinstance(data, dict) or not isinstance(data.get("loader"), dict):
            raise fail("data", "not a dict with the loader's state")
        position = data.get("position")
        integer("data.position", position, 1, len(training.train_loader) - 1)
        if set(data["loader"]) != set(training.train_loader.state_dict()) \
                or data["loader"].get("_num_yielded") != position:
            raise fail("data.loader", f"not the loader state of a stream {position} batches in")
        losses = data.get("step_losses")
        if not (isinstance(losses, list) and len(losses) == position
                and all(type(loss) is float for loss in losses)):
            raise fail("data.step_losses", f"not a list of {position} floats")
        integer("data.seen", data.get("seen"), 1, 2**62)
        if type(data.get("loss_sum")) is not float:
            raise fail("data.loss_sum", f"{reprlib.repr(data.get('loss_sum'))} is not a float")


def check_like(field: str, saved: object, live: object,
               fail: Callable[[str, str], Exception]) -> None:
    """``saved`` has the structure of ``live`` (a state_dict() of this run): a dict with the
    same keys, each value of the same kind (an int where live has a float is fine); nested
    dicts are compared the same way. ``load_state_dict`` copies such values blindly, so a
    string learning rate would fail only at the first step, with a traceback."""
    if isinstance(live, dict):
        if not isinstance(saved, dict) or set(saved) != set(live):
            raise fail(field, f"not a dict with the keys {sorted(live, key=repr)}")
        for key in live:
            check_like(f"{field}.{key}", saved[key], live[key], fail)
    elif isinstance(live, bool):
        if not isinstance(saved, bool):
            raise fail(field, f"{reprlib.repr(saved)} is not a bool")
    elif isinstance(live, (int, float)):
        kinds = int if isinstance(live, int) else (int, float)
        if isinstance(saved, bool) or not isinstance(saved, kinds):
            raise fail(field, f"{reprlib.repr(saved)} is not a {type(live).__name__}")
    elif isinstance(live, (list, tuple)):
        if not isinstance(saved, (list, tuple)) or len(saved) != len(live):
            raise fail(field, f"not a list of {len(live)}")
        for index, (item, reference) in enumerate(zip(saved, live, strict=True)):
            check_like(f"{field}[{index}]", item, reference, fail)


def check_optimizer_state(saved: dict, fail: Callable[[str, str], Exception],
                          optimizer: torch.optim.Optimizer) -> None:
    """The optimizer's param_groups like this run's (numbers as numbers), and each per-
    parameter tensor (a momentum buffer, Adam's averages) of its parameter's shape: a wrong
    shape loads without a word and fails, or broadcasts, at the first step."""
    live = optimizer.state_dict()
    check_like("optimizer.param_groups", saved.get("param_groups"), live["param_groups"], fail)
    shapes = {index: param.shape for group, ids in zip(optimizer.param_groups,
                                                       live["param_groups"], strict=True)
              for index, param in zip(ids["params"], group["params"], strict=True)}
    # load_state_dict pairs saved ids with parameters by the ORDER of "params": a permuted
    # list passes the key and type checks and puts a buffer on the wrong parameter.
    for index, (group, reference) in enumerate(zip(saved["param_groups"], live["param_groups"],
                                                   strict=True)):
        if group["params"] != reference["params"]:
            raise fail(f"optimizer.param_groups.{index}.params",
                       f"{reprlib.repr(group['params'])}, not this run's {reference['params']}")
    states = saved.get("state")
    if not isinstance(states, dict) or not set(states) <= set(shapes):
        raise fail("optimizer.state", f"not a dict keyed by the parameter ids {sorted(shapes)}")
    for index, values in states.items():
        for key, value in (values.items() if isinstance(values, dict) else [(None, None)]):
            if key == "step" or (isinstance(value, torch.Tensor)
                                 and value.layout == torch.strided
                                 and value.dtype.is_floating_point
                                 and value.shape == shapes[index]):
                continue
            raise fail(f"optimizer.state.{index}.{key}", f"{reprlib.repr(value)} is not a "
                       f"dense floating tensor of shape {tuple(shapes[index])}")


def check_rng_state(rng: dict, fail: Callable[[str, str], Exception],
                    loader_generator: torch.Generator) -> None:
    """The generator states of :func:`capture_rng_state`, checked for type and size (a
    wrong size would otherwise fail inside setstate with "state vector is the wrong
    size", naming neither the file nor the generator)."""
    # Python's Mersenne Twister state is 624 words plus its index (625 ints), NumPy's the
    # same 624 words with the index apart; torch's generators are uint8 tensors whose size
    # is fixed per generator type, so the live generators give the expected shapes.
    python, numpy_state = rng.get("python"), rng.get("numpy")
    if not (isinstance(python, (tuple, list)) and len(python) == 3
            and isinstance(python[1], (tuple, list)) and len(python[1]) == 625
            and all(type(v) is int and 0 <= v < 2**32 for v in python[1])):
        raise fail("rng.python", "not random.getstate()'s (version, 625 ints, gauss)")
    if not (isinstance(numpy_state, (tuple, list)) and len(numpy_state) == 5
            and isinstance(numpy_state[1], list) and len(numpy_state[1]) == 624
            and all(type(v) is int and 0 <= v < 2**32 for v in numpy_state[1])
            and type(numpy_state[2]) is int and 0 <= numpy_state[2] <= 624):
        raise fail("rng.numpy", "not NumPy's (name, 624 ints, position, has_gauss, gauss)")
    for key, reference in (("torch", torch.get_rng_state()),
                           ("loader", loader_generator.get_state())):
        value = rng.get(key)
        if not (isinstance(value, torch.Tensor) and value.dtype == reference.dtype
                and value.shape == reference.shape):
            raise fail(f"rng.{key}", f"{reprlib.repr(value)} is not a {reference.dtype} "
                       f"tensor of shape {tuple(reference.shape)}")


def load_for_resume(manager: CheckpointManager, which: bool | int | str,
                    log: Callable[[str], None]) -> LoadedCheckpoint | None:
    """The checkpoint to resume from: the latest good one (``which=True``, ``None`` if the
    folder has none yet), or exactly the one at step / in file ``which`` (else an error)."""
    if not manager.manifest_path.exists():
        strays = sorted(n for n in os.listdir(manager.directory) if SEQUENCED_NAME.fullmatch(n))
        if strays:  # the manifest was lost: starting over would bury these, not resume them
            raise CheckpointError(
                f"{manager.manifest_path}: missing, yet the folder holds {len(strays)} "
                f"checkpoint-like file(s) ({reprlib.repr(strays)}); nothing was deleted. "
                "Restore the manifest, or move the folder aside to start a new run")
    if which is not True:
        return manager.load(which, map_location="cpu")
    loaded = manager.load_latest(map_location="cpu")
    if loaded is None and manager.list():
        # Starting over here would mix a new run into the old one's folder: refuse.
        raise CheckpointError(
            f"{manager.directory}: --resume found {len(manager.list())} checkpoint(s) but "
            "none is intact (see the warnings above); nothing was deleted. Move the folder "
            "aside to start a new run")
    if loaded is None:
        log(f"  --resume: no checkpoint in {manager.directory} yet; starting from scratch")
    return loaded


def train(directory: Path, *, epochs: int, seed: int, device: torch.device,
          resume: bool | int | str = False, saves: SaveSchedule | None = None,
          stop: PreemptionFlag | None = None, crash_at_step: int | None = None,
          step_delay: float = 0.0, async_save: bool = True, num_workers: int = 0,
          log: Callable[[str], None] = print) -> Training:
    """Build a Training, resume it if asked, run it, and return it (model, manager, history,
    ``resumed_from``). The manager is closed when this returns or raises."""
    # warn_only: an op with no deterministic CUDA kernel warns instead of stopping training
    with deterministic_kernels(device, warn_only=True):
        training = Training(directory, epochs=epochs, seed=seed, device=device, saves=saves,
                            async_save=async_save, num_workers=num_workers, log=log)
        try:
            if resume is not False:
                training.resume(resume)
            training.run(stop=stop, crash_at_step=crash_at_step, step_delay=step_delay)
        finally:
            training.manager.close()
    return training


# %% Setup
# The flags (--epochs, --resume, ...) and the out-dir. In a notebook the flags come from the
# LESSON_ARGS environment variable (none: the defaults), since a kernel has no command line.


def number(kind: type, minimum: float, strictly: bool = True) -> Callable[[str], Any]:
    """An argparse ``type`` that refuses values below ``minimum`` (or equal, ``strictly``):
    the error then comes from parse_args, before the out-dir exists or anything runs."""
    def parse(text: str) -> Any:
        value = kind(text)
        if value < minimum or (strictly and value == minimum):
            raise argparse.ArgumentTypeError(
                f"must be {'greater than' if strictly else 'at least'} {minimum}, not {text}")
        return value
    return parse


def setup(argv: list[str] | None = None) -> Run:
    """Parse the flags, seed everything, create the out-dir, print the header."""
    parser = make_parser(HERE, __doc__.splitlines()[0])
    parser.add_argument("--epochs", type=number(int, 1, strictly=False), default=8,
                        help="epochs of the main run")
    parser.add_argument("--io-mb", type=number(int, 1, strictly=False), default=64,
                        help="size of the state that section 8 saves and loads, in MB")
    parser.add_argument("--save-every-steps", type=number(int, 0), default=None, metavar="K",
                        help="also save a checkpoint every K optimizer steps (mid-epoch too)")
    parser.add_argument("--save-every-seconds", type=number(float, 0), default=None,
                        metavar="S",
                        help="also save a checkpoint when S seconds passed since the last one")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--resume", action="store_true",
                       help="continue the run in --out-dir from its newest valid checkpoint")
    where.add_argument("--resume-from", metavar="STEP|FILE", default=None,
                       help="continue from the checkpoint at this step (or with this file "
                            "name) in the manifest, abandoning the checkpoints after it")
    parser.add_argument("--train-only", action="store_true",
                        help="run section 1 only (train, save, resume), none of the demos")
    parser.add_argument("--step-delay", type=number(float, 0, strictly=False), default=0.0,
                        metavar="S",
                        help="sleep S seconds after every step: a run slow enough to "
                             "interrupt by hand (kill -TERM, kill -9) and resume")
    return Run.start(HERE, parser, argv)


if in_notebook():
    run = setup()


# %% 1. Train with a CheckpointManager
# A run saves a checkpoint every epoch; the policy decides which to keep: the newest
# keep_last=2 (to resume) and the best save_top_k=2 by val_loss (to ship). The latest and the
# best are always kept. File names carry epoch, step and the metric, so `ls` tells the story.
# With --resume the run continues from its newest valid checkpoint, --resume-from STEP from
# an older one (the checkpoints written after it are abandoned: the new writes become
# "latest"); without either, a previous run's folder is moved aside (never deleted), so a
# forgotten flag costs nothing. --save-every-steps K / --save-every-seconds S add
# checkpoints between epoch ends (section 5b), and SIGTERM / SIGUSR1 save one and stop the
# run (section 5c).


def resume_target(args: Any) -> bool | int | str:
    """--resume -> True, --resume-from 12 -> 12 (a step), --resume-from NAME -> the file."""
    if args.resume_from is not None:
        return int(args.resume_from) if args.resume_from.isdigit() else args.resume_from
    return bool(args.resume)


def lesson_1_train(run: Run) -> tuple[CheckpointManager, list, dict]:
    """Train with the manager (flags: --epochs, --resume, --resume-from, --save-every-*);
    return it, the per-epoch history and the figures."""
    run.section("1. Train with a CheckpointManager")
    args, directory = run.args, run.out_dir / "checkpoints"
    resume = resume_target(args)
    if resume is False and (directory / CheckpointManager.MANIFEST).exists():
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        previous = run.out_dir / f"checkpoints.previous-{stamp}"
        directory.rename(previous)
        print(f"  a previous run was in {directory.name}/: moved to {previous.name}/ "
              "(use --resume to continue a run instead; delete it when you no longer need it)")
    with PreemptionFlag() as stop:  # SIGTERM / SIGUSR1: save after this step, then exit
        training = train(
            directory, epochs=args.epochs, seed=run.seed, device=run.device, resume=resume,
            saves=SaveSchedule(args.save_every_steps, args.save_every_seconds), stop=stop,
            step_delay=args.step_delay)
    model, manager, history = training.model, training.manager, training.history
    final_path = run.out_dir / "final_model.pt"
    atomic_torch_save(model.state_dict(), final_path)
    run.artifact("final_model", final_path)
    run.artifact("checkpoints", directory)
    run.artifact("manifest", directory / CheckpointManager.MANIFEST)
    best = manager.best
    print(f"  kept {len(manager.list())} checkpoints after {len(history)} epochs; best val_loss "
          f"{best.metrics['val_loss']:.4f} at step {best.step} (epoch {best.epoch})")
    return manager, history, {
        "epochs": args.epochs,
        "resumed_from_step": training.resumed_from.step if training.resumed_from else 0,
        "checkpoints_kept": len(manager.list()), "best_val_loss": best.metrics["val_loss"],
        "best_step": best.step, "final_val_accuracy": history[-1]["val_accuracy"]}


if in_notebook():
    manager, history, figures = lesson_1_train(run)
    run.record_all(figures)


# %% 2. The manifest: list, inspect, load
# manifest.json records, for every kept checkpoint: step, epoch, metrics, timestamp, size,
# checksum and a write sequence number. It is the index: load_latest/load_best/load(step) read
# it instead of parsing file names, and the checksum lets a load prove that the bytes are the ones
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
# finishes. Each save also gets a name no earlier save used (the write's number ends it,
# "-seq7.pt"): a crash between the file's rename and the manifest's can then never leave the
# manifest vouching for bytes that changed, and the file no entry names yet is removed by
# the next writer (tests/test_02_crash_points.py kills a save at every filesystem step).
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

    "Unchanged" compares the checksum of every listed file before and after; "partial files
    left" counts temporaries after the failed write cleaned up after itself (0 expected).
    tests/test_02_checkpoint_manager.py also kills a real process with SIGKILL mid-write.
    """
    run.section("3. Crash safety: atomic writes")
    with run.scratch("demo_crash") as directory:
        state = {"model": SmallCNN().state_dict()}
        manager = CheckpointManager(directory, save_top_k=5, keep_last=5)
        for step in (1, 2, 3):
            manager.save(state, step=step, epoch=step, metrics={"val_loss": 1.0 / step})
        before = {e.file: e.checksum for e in manager.list()}
        manager.serialize = failing_writer
        try:
            manager.save(state, step=4, epoch=4, metrics={"val_loss": 0.1})
        except OSError as err:
            print(f"  the 4th save failed: {err}")
        reopened = CheckpointManager(directory)
        listed = reopened.list()  # counted here, while the scratch folder still exists
        intact = all(reopened.verify(e) is None for e in listed)
        same = {e.file: e.checksum for e in listed} == before
        partial = sorted(p.name for p in directory.iterdir() if p.name.endswith(".partial"))
    print(f"  after the crash: manifest lists {len(listed)} checkpoints, all verify: "
          f"{intact}, unchanged: {same}; partial files left: {partial}")
    return {"crash_earlier_checkpoints_intact": intact and same,
            "crash_checkpoints_listed_after": len(listed),
            "crash_partial_files_left": len(partial)}


if in_notebook():
    run.record_all(lesson_3_crash_safety(run))


# %% 4. Damaged checkpoints are detected and skipped
# Files get damaged after they are written too: a copy cut short, a disk error, a sync tool.
# The manager compares each file's size and CRC32 with the manifest (the CRC runs in a second
# thread while torch.load reads the file); a mismatch is reported as a CheckpointWarning and
# the next candidate is tried, so load_latest() falls back to the newest GOOD checkpoint
# instead of crashing the resume. Only damage is skipped. A file whose checksum matches but
# whose torch.load fails (a weights_only refusal after someone added a custom object, an
# out-of-memory) raises CheckpointError:
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
# On the CPU too, "the same" includes the number of intra-op threads: a reduction split over
# 2 threads adds in another order than over 1. This project's tests saw it: the 8-epoch run
# with OMP_NUM_THREADS=1 and with 2 threads differ by max |diff| 8.3e-7. Resume with the
# thread count you trained with (torch.get_num_threads() is in summary.json's environment).
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
        straight = train(demo / "straight", epochs=4, seed=run.seed, device=run.device,
                         log=quiet).model
        try:
            train(demo / "interrupted", epochs=4, seed=run.seed, device=run.device,
                  crash_at_step=2 * STEPS_PER_EPOCH, log=quiet)
        except SimulatedCrash as crash:
            print(f"  {crash}; resuming from {demo.name}/interrupted")
        resumed = train(demo / "interrupted", epochs=4, seed=run.seed, device=run.device,
                        resume=True).model
    diff = max_abs_diff(straight.state_dict(), resumed.state_dict())
    identical = bit_identical(straight.state_dict(), resumed.state_dict())
    print(f"  straight vs crash+resume, final weights: max |diff| = {diff}; bit-identical "
          f"(every byte compared): {identical}")
    return {"resume_max_abs_diff": diff, "resume_bit_identical": identical}


if in_notebook():
    run.record_all(lesson_5_resume(run))


# %% 5b. Mid-epoch resume: where the data stream stands
# Real jobs save every N steps (--save-every-steps K) or every T seconds
# (--save-every-seconds S), not only at epoch ends, so a checkpoint often lands in the middle
# of an epoch. Resuming there exactly needs one more piece of state: how far into the epoch's
# shuffled order the run was. torchdata's StatefulDataLoader (a drop-in DataLoader) has it
# as state_dict() / load_state_dict(); the checkpoint keeps it under "data", with the
# epoch's running loss. Underneath it is small: the sampler's generator state at the epoch's
# start (from which the same permutation is drawn again) and the number of samples already
# yielded (which are skipped by index, without loading them). Below, that is re-done by hand.
# The pitfall we measured: with num_workers=0, torchdata 0.11 leaves the loader's generator
# in another state after the resumed iterator is built, so the NEXT epoch's order differs
# and the run drifts. resume_data_stream() puts the generator back (a no-op with workers).
# Mid-epoch checkpoints carry val_loss = NaN (no evaluation mid-epoch: it would draw from
# the generators), so they are never "best"; retention keeps them as the newest.


def hand_made_resume(seed: int) -> tuple[bool, bool, bool]:
    """Consume 2 batches of a 20-sample StatefulDataLoader and resume it three ways.

    Returns: (the remaining order equals randperm(generator at the epoch start)[8:],
    the next epoch's order is right without putting the generator back, and with it).
    """
    def loader() -> StatefulDataLoader:
        return StatefulDataLoader(torch.utils.data.TensorDataset(torch.arange(20)),
                                  batch_size=4, shuffle=True,
                                  generator=torch.Generator().manual_seed(seed))
    reference = loader()
    order = [batch[0].tolist() for _ in range(2) for batch in reference]
    original, cut = loader(), []
    batches = iter(original)
    cut += [next(batches)[0].tolist(), next(batches)[0].tolist()]
    state, generator = original.state_dict(), original.generator.get_state()
    by_hand = torch.Generator()  # the sampler's state: generator at epoch start + yielded
    by_hand.set_state(state["_sampler_iter_state"]["sampler_iter_state"]["generator"])
    rest = torch.randperm(20, generator=by_hand)[8:].tolist()
    results = []
    for put_back in (False, True):
        resumed = loader()
        if put_back:
            batches = resume_data_stream(resumed, state, generator)
        else:
            resumed.load_state_dict(state)
            batches = iter(resumed)
        again = cut + [b[0].tolist() for b in batches] + [b[0].tolist() for b in resumed]
        results.append(again == order)
    return sum(order[2:5], []) == rest, results[0], results[1]


def lesson_5b_mid_epoch(run: Run) -> dict:
    """Straight vs saves every 4 steps + a crash after step 9 (mid-epoch 2) + resume."""
    run.section("5b. Mid-epoch resume: where the data stream stands")
    quiet = lambda line: None  # noqa: E731
    with run.scratch("demo_mid_epoch") as demo:
        straight = train(demo / "straight", epochs=3, seed=run.seed, device=run.device,
                         log=quiet).model
        try:
            train(demo / "cut", epochs=3, seed=run.seed, device=run.device, crash_at_step=9,
                  saves=SaveSchedule(steps=4), log=quiet)
        except SimulatedCrash as crash:
            print(f"  saving every 4 steps, {crash} (epoch 2 has {STEPS_PER_EPOCH} steps)")
        data = CheckpointManager(demo / "cut").load_latest().state["data"]
        resumed = train(demo / "cut", epochs=3, seed=run.seed, device=run.device,
                        resume=True, saves=SaveSchedule(steps=4), log=quiet)
    entry = resumed.resumed_from
    diff = max_abs_diff(straight.state_dict(), resumed.model.state_dict())
    print(f"  resumed from step {entry.step}: epoch {entry.epoch + 1}, batch {entry.position} "
          f"done; checkpoint 'data' keys: {sorted(data)}")
    print(f"  straight vs mid-epoch crash + resume, final weights: max |diff| = {diff}")
    by_hand, without_fix, with_fix = hand_made_resume(run.seed)
    print(f"  the loader's remaining order = randperm(generator at epoch start)[8:]: {by_hand}")
    print(f"  next epoch's order right after a resume: without putting the generator back "
          f"{without_fix}, with it {with_fix}")
    return {"mid_epoch_resume_step": entry.step, "mid_epoch_resume_position": entry.position,
            "mid_epoch_resume_max_abs_diff": diff, "hand_made_order_matches": by_hand,
            "next_epoch_order_right_without_fix": without_fix,
            "next_epoch_order_right_with_fix": with_fix}


if in_notebook():
    run.record_all(lesson_5b_mid_epoch(run))


# %% 5c. Preemption: SIGTERM, a checkpoint, exit, resume
# Clusters and clouds stop jobs with a warning: SIGTERM, then SIGKILL after a grace period
# (Kubernetes: 30 s by default; spot VMs: about 30 s to 2 min; SLURM: KillWait, and
# `#SBATCH --signal=USR1@120` sends SIGUSR1 two minutes early). PreemptionFlag turns the
# signal into a flag; the loop finishes the step, writes a checkpoint (waiting for an async
# save in flight first), and exits with status 128 + the signal (143 for SIGTERM; the shell's
# convention: how a scheduler counts it depends on its configuration, e.g. a Kubernetes Job
# counts it toward backoffLimit unless a podFailurePolicy says otherwise, and SLURM decides
# PREEMPTED from its own records). Here a real child process trains, slowed to 0.05 s per
# step and printing each step; this process sends it SIGTERM when it prints batch 2 of epoch
# 2, so the signal lands mid-epoch (the output says where it landed), then resumes the run
# from the child's checkpoint and compares with a straight run. If nothing
# handles SIGTERM, Python dies at once with no checkpoint: that is the default.


def lesson_5c_preemption(run: Run) -> dict:
    """A child run gets SIGTERM mid-epoch; it saves and exits; resume; compare; draw."""
    run.section("5c. Preemption: SIGTERM, a checkpoint, exit, resume")
    with run.scratch("demo_preemption") as demo:
        child = subprocess.Popen(
            [sys.executable, str(HERE), "--train-only", "--epochs", "4", "--step-delay", "0.05",
             "--device", run.device.type, "--seed", str(run.seed), "--out-dir",
             str(demo / "job")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        for line in child.stdout:  # wait until a step of epoch 2 printed its line
            if "(epoch 2, batch 2)" in line:
                break
        sent = time.monotonic()
        child.send_signal(signal.SIGTERM)
        child.wait(timeout=60)
        seconds = time.monotonic() - sent
        said = child.stderr.read().strip().splitlines()[-1:] or ["nothing"]
        if child.returncode != 128 + signal.SIGTERM:
            raise RuntimeError(f"the child run failed ({child.returncode}): {said[0]}")
        print(f"  SIGTERM sent once the child printed epoch 2, batch 2 -> exit status "
              f"{child.returncode} in {seconds:.1f} s; "
              f"it said: {said[0].split(': ', 1)[-1].replace(str(demo), demo.name)}")
        resumed = train(demo / "job" / "checkpoints", epochs=4, seed=run.seed,
                        device=run.device, resume=True, log=quiet_print)
        straight = train(demo / "straight", epochs=4, seed=run.seed, device=run.device,
                         log=quiet_print)
    entry = resumed.resumed_from
    diff = max_abs_diff(straight.model.state_dict(), resumed.model.state_dict())
    print(f"  the SIGTERM checkpoint: step {entry.step}, epoch {entry.epoch + 1} batch "
          f"{entry.position} (mid-epoch: {entry.position > 0}); resumed vs straight: "
          f"max |diff| = {diff}")
    plot_timeline(run, straight.history, resumed.history, entry)
    return {"preemption_exit_status": child.returncode,
            "preemption_seconds_to_exit": round(seconds, 2),
            "preemption_checkpoint_step": entry.step,
            "preemption_checkpoint_mid_epoch": entry.position > 0,
            "preemption_resume_max_abs_diff": diff}


def quiet_print(line: str) -> None:
    """Only the "resumed from ..." line of a demo run."""
    if "resumed from" in line:
        print(line)


def plot_timeline(run: Run, straight: list[dict], resumed: list[dict],
                  entry: CheckpointEntry) -> None:
    """Loss per step of the resumed run over the straight one, with the events marked."""
    losses = [loss for epoch in resumed for loss in epoch["step_losses"]]
    reference = [loss for epoch in straight for loss in epoch["step_losses"]]
    steps = range(1, len(losses) + 1)
    figure, axes = plt.subplots(figsize=(8, 4))
    axes.plot(steps, reference, color="lightgray", linewidth=6, label="straight run")
    axes.plot(steps[:entry.step], losses[:entry.step], color="tab:blue",
              label="before SIGTERM (the child)")
    axes.plot(steps[entry.step - 1:], losses[entry.step - 1:], color="tab:orange",
              label="after --resume (this process)")
    for epoch in resumed:
        axes.axvline(epoch["step"], color="gray", linestyle=":", linewidth=1)
    axes.axvline(entry.step, color="red", label=f"SIGTERM, saved at step {entry.step}")
    where = "mid-epoch" if entry.position > 0 else "at an epoch end"  # where it landed
    axes.set(xlabel="optimizer step (dotted: epoch ends, each saved)",
             ylabel="training loss", title=f"Preempted {where} and resumed: no seam")
    axes.legend()
    run.save_figure(figure, "preemption_timeline.png", "preemption_timeline")


if in_notebook():
    run.record_all(lesson_5c_preemption(run))


# %% 5d. The learning rate after a resume
# A scheduler is state too, and two mistakes survive every test that only checks that
# training "continues": not saving scheduler.state_dict(), and building a scheduler after
# loading the optimizer. A "chainable" scheduler (StepLR, CosineAnnealingLR) computes the
# next lr from the current one, so it looks right at the resume and drifts at its next
# step; a closed-form one (LambdaLR) sets lr = base_lr * lambda(0) when it is BUILT, over
# the lr the optimizer just loaded, and load_state_dict does not put it back before the next
# scheduler.step(): a whole epoch runs with the wrong rate. The right order, used by train():
# build model, optimizer AND scheduler as a fresh run would, then load each one's state.
# Below: lr 1.0 halved per epoch (LambdaLR) or cosine over 10 epochs, resumed after 5.


SCHEDULERS = {
    "LambdaLR(0.5 ** epoch)": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 0.5**e),
    "CosineAnnealingLR(T_max=10)": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 10),
}


def lr_after_resume(make: Callable, order: str) -> tuple[float, float, float, float]:
    """(lr during the first resumed epoch, after one more step) resumed ``order``-wise, and
    the same two figures of the uninterrupted run."""
    def optimizer() -> torch.optim.Optimizer:
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    original = optimizer()
    scheduler = make(original)
    for _ in range(5):
        original.step()
        scheduler.step()
    saved = {"optimizer": original.state_dict(), "scheduler": scheduler.state_dict()}
    expected = original.param_groups[0]["lr"]
    original.step()
    scheduler.step()
    expected_next = original.param_groups[0]["lr"]
    resumed = optimizer()
    if order == "build all, then load all (right)":
        rebuilt = make(resumed)
        resumed.load_state_dict(saved["optimizer"])
        rebuilt.load_state_dict(saved["scheduler"])
    else:
        resumed.load_state_dict(saved["optimizer"])
        rebuilt = make(resumed)
        if order == "load optimizer, then build + load scheduler":
            rebuilt.load_state_dict(saved["scheduler"])
    during = resumed.param_groups[0]["lr"]
    resumed.step()
    rebuilt.step()
    return during, resumed.param_groups[0]["lr"], expected, expected_next


def lesson_5d_learning_rate(run: Run) -> dict:
    """The lr after a resume, for two schedulers and three ways of resuming them."""
    run.section("5d. The learning rate after a resume")
    orders = ("build all, then load all (right)", "load optimizer, then build + load "
              "scheduler", "scheduler state not saved")
    print(f"  {'scheduler':<28} {'resumed how':<45} {'lr, epoch 6':>11} {'epoch 7':>9}")
    wrong, figures = 0, {}
    for name, make in SCHEDULERS.items():
        for order in orders:
            during, after, expected, expected_next = lr_after_resume(make, order)
            ok = (during, after) == (expected, expected_next)
            wrong += not ok
            print(f"  {name:<28} {order:<45} {during:>11.5f} {after:>9.5f}"
                  f"{'' if ok else f'  (should be {expected:.5f} {expected_next:.5f})'}")
            if name.startswith("LambdaLR") and order != orders[1]:
                figures[f"lambda_lr_{'right' if order == orders[0] else 'not_saved'}"] = during
    return figures | {"lr_resume_cases_wrong": wrong, "lr_resume_cases": 6}


if in_notebook():
    run.record_all(lesson_5d_learning_rate(run))


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
            timings[label] = benchmark(save, warmup=1, repeats=3, device=run.device,
                                       setup=manager.wait)
            written[label] = manager.load_latest().state
            size = format_bytes(manager.latest.bytes)
        print(f"  {label:>5} save stall: {timings[label]}  ({size} per checkpoint)")
    same = max_abs_diff(written["sync"]["model"], written["async"]["model"])
    print(f"  the async file holds {'the same' if same == 0.0 else 'other'} weights as the "
          f"sync one: max |diff| = {same}")
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


# %% 8. How fast is a save? Each format against a raw write
# "How long does a checkpoint take?" has one honest reference point: how fast THIS machine
# writes the same number of bytes with a plain write() + fsync. Each saver below is charged
# until its bytes are on disk (fsync), because a save that returns when the bytes are only in
# the page cache (the kernel's memory copy of the file) is lost on a power cut or a node
# failure. The state is a stack of Linear layers, --io-mb megabytes (default 64), on the CPU:
# this measures the disk path; on a GPU a save adds the device-to-host copy.
# What to look for:
# - torch.save + fsync streams each tensor's memory straight into the zip file, with no extra
#   copy, so it can keep up with the raw write (on the machine this was written on the two
#   traded places from run to run); the line under the table compares them on THIS run.
# - DCP (torch.distributed.checkpoint) with thread_count=2 writes two files at once (file
#   writes release the GIL). Whether that helps depends on the machine and its disk: the runs
#   this was written on measured 2 threads anywhere from 15% slower to 3% faster than 1. The
#   line under the table says what THIS run measured. DCP is the format 07 uses for sharded
#   models.
# - A virtual disk (cloud VMs, CI runners) can be several times slower on space it has never
#   written than on space it reuses. That is why every saver runs in interleaved rounds and
#   the first two rounds are not timed; if one row still looks odd (safetensors' save_file is
#   the usual one: it writes a new temporary file and renames it over the old one, so each
#   save allocates new space; torch.save overwrites the file in place), run the script again.
# - The manager adds the atomic rename, the manifest and a checksum, and stays close to
#   torch.save: the CRC32 of the new file is computed in a second thread WHILE fsync waits for
#   the disk (zlib's CRC32 ran at ~4 GB/s on the machine this was written on, SHA-256 at
#   ~1.8 GB/s: SHA-256 outlasted the fsync and showed up in the total), and the old file that
#   retention drops is deleted in the background thread (freeing its blocks took ~20 ms per
#   100 MB there). On load, the CRC32 runs beside torch.load, so verifying costs little.
# - The async stall is only the copy into CPU memory, and that memory is reused from the
#   previous save (fresh memory costs a page fault per 4 KB page, often more than the copy).
# - Loads read from the page cache (the file was just written), so they run at memory speed;
#   the first load after a reboot reads the disk and is slower. mmap=True returns at once
#   because it reads nothing yet: the first forward pays for the pages it touches.
#   safetensors' load_file maps the file too, so compare it WITH its first forward.


def io_model(megabytes: int) -> torch.nn.Sequential:
    """Linear(4096, 4096) layers, 67 MB each in fp32 (the size of one weight matrix of a 7B
    language model), about ``megabytes`` MB in all; one narrower layer below 67 MB."""
    if megabytes < 67:
        return torch.nn.Sequential(torch.nn.Linear(4096, max(1, megabytes * 10**6 // 16384)))
    return torch.nn.Sequential(*(torch.nn.Linear(4096, 4096)
                                 for _ in range(round(megabytes / 67.1))))


def raw_write(state: dict, path: Path) -> None:
    """The reference: the tensors' bytes written as they are, no format at all, then fsync."""
    with path.open("wb") as handle:
        for tensor in state.values():
            handle.write(tensor.numpy().data)
        handle.flush()
        os.fsync(handle.fileno())


def plain_save(save: Callable[[Any, Path], None], state: dict, path: Path) -> None:
    """Any saver that takes a path (torch.save, safetensors' save_file), then fsync."""
    save(state, path)
    with path.open("rb") as handle:  # fsync needs a descriptor of the file, any mode
        os.fsync(handle.fileno())


def dcp_save(state: dict, folder: Path, threads: int) -> None:
    """torch.distributed.checkpoint in one process (no_dist=True); it fsyncs its files."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # "Detected an existing checkpoint ... overwriting"
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, storage_writer=dcp.FileSystemWriter(folder, thread_count=threads),
                 no_dist=True)


def save_operations(state: dict, folder: Path, managers: dict) -> dict:
    """The savers of the table, each writing ``state`` into ``folder``."""
    from safetensors.torch import save_file

    steps = iter(range(1, 10_000))
    return {
        "raw write + fsync (reference)": lambda: raw_write(state, folder / "raw.bin"),
        "torch.save + fsync": lambda: plain_save(torch.save, state, folder / "plain.pt"),
        "safetensors save_file + fsync": lambda: plain_save(save_file, state,
                                                            folder / "plain.safetensors"),
        "DCP, 1 writer thread": lambda: dcp_save(state, folder / "dcp1", 1),
        "DCP, 2 writer threads": lambda: dcp_save(state, folder / "dcp2", 2),
        "manager.save (sync)": lambda: managers["sync"].save(
            state, step=next(steps), epoch=1, metrics={"val_loss": 1.0}),
        "manager.save (async stall)": lambda: managers["async"].save(
            state, step=next(steps), epoch=1, metrics={"val_loss": 1.0}),
    }


def load_operations(model: torch.nn.Module, folder: Path, managers: dict) -> dict:
    """The loaders of the table, each reading what save_operations wrote."""
    from safetensors.torch import load_file

    probe = torch.randn(1, 4096)

    def first_forward(state: dict) -> None:
        model.load_state_dict(state, assign=True)  # the tensors ARE the loaded ones
        with torch.no_grad():
            model(probe)

    def torch_load(mmap: bool = False) -> dict:
        return torch.load(folder / "plain.pt", map_location="cpu", weights_only=True,
                          mmap=mmap)

    return {
        "torch.load": torch_load,
        "torch.load(mmap=True)": lambda: torch_load(mmap=True),
        "torch.load(mmap=True) + first forward": lambda: first_forward(torch_load(mmap=True)),
        "safetensors load_file + first forward": lambda: first_forward(
            load_file(folder / "plain.safetensors")),
        "manager.load_latest (verified)": managers["sync"].load_latest,
    }


def lesson_8_io_speed(run: Run, megabytes: int) -> dict:
    """Time each saver and loader on the same state; print the table, draw the bars."""
    run.section("8. How fast is a save? Each format against a raw write")
    model = io_model(megabytes)
    state = model.state_dict()
    size = sum(t.numel() * t.element_size() for t in state.values())
    with run.scratch("demo_io") as folder, \
            CheckpointManager(folder / "sync", keep_last=1, save_top_k=0) as sync, \
            CheckpointManager(folder / "async", keep_last=1, save_top_k=0,
                              async_save=True) as background:
        managers = {"sync": sync, "async": background}
        # Rounds that call every saver once (common.timing.benchmark_interleaved): a disk
        # that drifts (a fresh virtual disk is slow until its space has been written once)
        # then slows every saver alike, not just whichever ran first.
        saves = benchmark_interleaved(
            save_operations(state, folder, managers), warmup=2, repeats=4,
            setup={"manager.save (async stall)": background.wait})
        background.wait()  # its write must not overlap the loads
        loads = benchmark_interleaved(load_operations(model, folder, managers))
        saves = {label: timing.median_ms for label, timing in saves.items()}
        loads = {label: timing.median_ms for label, timing in loads.items()}
    print(f"  {format_bytes(size)} of tensors; median of 4 rounds (loads: 3) after the "
          "warm-up; GB/s = size / time")
    print(f"  {'operation':<40} {'median':>10} {'GB/s':>7}")
    for label, ms in {**saves, **loads}.items():
        print(f"  {label:<40} {ms:>7.1f} ms {size / ms / 1e6:>7.2f}")
    figures = io_ratios(saves, loads)
    print(f"  manager.save speed / torch.save's:     {figures['manager_save_vs_torch_save']}\n"
          f"  verified load speed / torch.load's:    {figures['manager_load_vs_torch_load']}\n"
          f"  async stall / sync manager.save:       {figures['async_stall_vs_sync']}")
    raw, plain = saves["raw write + fsync (reference)"], saves["torch.save + fsync"]
    print(f"  torch.save + fsync is {speed_word(plain, raw)} the raw write: {plain:.1f} vs "
          f"{raw:.1f} ms")
    one, two = saves["DCP, 1 writer thread"], saves["DCP, 2 writer threads"]
    print(f"  DCP, 2 writer threads vs 1: {size / two / 1e6:.2f} vs {size / one / 1e6:.2f} "
          f"GB/s: {threads_verdict(one, two)}")
    plot_io_speed(run, size, saves, loads)
    return figures | {"io_state_bytes": size} | {
        "io_gbps_" + re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_"):
        round(size / ms / 1e6, 3) for label, ms in {**saves, **loads}.items()}


def threads_verdict(one_thread_ms: float, two_threads_ms: float) -> str:
    """What a second DCP writer thread did here, worded from the two median times."""
    word = speed_word(two_threads_ms, one_thread_ms)
    meaning = {"faster than": "a second thread helps on this disk",
               "about as fast as": "a second thread makes no difference here (within 10%)",
               "slower than": "a second thread does not help here, it slows the save"}[word]
    return f"2 threads are {word} 1: {meaning}"


def io_ratios(saves: dict[str, float], loads: dict[str, float]) -> dict[str, float]:
    """The manager against plain torch: speed ratios (1.0 = as fast) and the stall share."""
    return {
        "manager_save_vs_torch_save": round(saves["torch.save + fsync"]
                                            / saves["manager.save (sync)"], 3),
        "manager_load_vs_torch_load": round(loads["torch.load"]
                                            / loads["manager.load_latest (verified)"], 3),
        "async_stall_vs_sync": round(saves["manager.save (async stall)"]
                                     / saves["manager.save (sync)"], 3)}


def plot_io_speed(run: Run, size: int, saves: dict, loads: dict) -> None:
    """Two bar charts, GB/s of every save and every load, the raw write marked."""
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), constrained_layout=True)
    for axes, timings, title in ((top, saves, "saving (until fsync returns)"),
                                 (bottom, loads, "loading (page cache warm)")):
        labels = list(timings)[::-1]
        bars = axes.barh(labels, [size / timings[label] / 1e6 for label in labels],
                         color="tab:blue")
        axes.bar_label(bars, fmt="%.2f", padding=3)
        axes.set(xlabel="GB/s (higher is faster)", title=title)
        axes.margins(x=0.15)
    top.axvline(size / saves["raw write + fsync (reference)"] / 1e6, color="black",
                linestyle="--", label="raw write + fsync")
    top.legend(loc="upper right")
    run.save_figure(figure, "io_speed.png", "io_speed_chart")


if in_notebook():
    run.record_all(lesson_8_io_speed(run, run.args.io_mb))


# %% Summary
# What the run measured, the files it wrote (also in summary.json), and what to try next.
RECAP = [
    "write checkpoints atomically: temp file, fsync, os.replace, fsync the folder",
    "keep a manifest with a checksum per file; verify while loading, skip only damage",
    "one writer lock per folder; plain file names only; NaN never ranks as best",
    "a bit-exact resume restores optimizer, scheduler, scaler, RNGs and data order",
    "mid-epoch: save the loader's position (StatefulDataLoader) and put its generator back",
    "on SIGTERM only set a flag; finish the step, save, exit 143; --resume continues",
    "build optimizer AND scheduler first, then load both: else the lr is wrong after resume",
    "async saving stalls training only for the CPU snapshot; one save in flight",
]
TRY_IT = ("run it with --train-only --save-every-steps 5 --step-delay 0.2, kill it (kill -9 "
          "or kill -TERM) mid-epoch, and re-run with --resume; then run 03_model_versioning.py")

if in_notebook():
    summary = run.finish(RECAP, TRY_IT)


def main(argv: list[str] | None = None) -> dict:
    """Run every lesson in order and return the summary (also written to summary.json)."""
    run = setup(argv)
    try:
        manager, history, figures = lesson_1_train(run)
    except (CheckpointError, ValueError, KeyError) as err:  # one line for the CLI, no traceback
        message = str(err.args[0]) if err.args else type(err).__name__
        raise SystemExit(f"error: {(message.splitlines() or [''])[0]}") from None
    except Preempted as preempted:  # the checkpoint is on disk; say so, exit 128 + signal
        print(f"{HERE}: {preempted}", file=sys.stderr, flush=True)
        raise SystemExit(128 + preempted.signal_number) from None
    run.record_all(figures)
    if run.args.train_only:
        return run.finish(RECAP, TRY_IT)
    run.record_all(lesson_2_manifest(run, manager))
    run.record_all(lesson_3_crash_safety(run))
    run.record_all(lesson_4_damaged(run))
    run.record_all(lesson_5_resume(run))
    run.record_all(lesson_5b_mid_epoch(run))
    run.record_all(lesson_5c_preemption(run))
    run.record_all(lesson_5d_learning_rate(run))
    run.record_all(lesson_6_async(run))
    lesson_7_plot(run, manager, history)
    run.record_all(lesson_8_io_speed(run, run.args.io_mb))
    return run.finish(RECAP, TRY_IT)


if __name__ == "__main__" and not in_notebook():
    main()
