"""03 · Model versioning — version, fingerprint, document and verify models without a server.

What you will learn (each section runs real code and prints the measured figure):
  1. Fingerprints: a content fingerprint and an architecture signature, and why hashing the
     .pt file is not an identity
  2. A file-based registry: version numbers with rules, metadata, a model card
  3. Aliases (production, staging) that move between versions
  4. Integrity on every load: tampered weights are a clear error naming file and tensors
  5. Diff two versions: hyperparameters, metrics, which tensors changed and by how much
  6. Reproducibility: retrain from a version's recorded config and seed, same fingerprint
  7. Migrating old checkpoints with _version and _load_from_state_dict
  8. Verifying a saved version from the command line (--verify)

Run it:   python 03_model_versioning.py [--device cpu|cuda] [--out-dir DIR] [--seed N]
          python 03_model_versioning.py --verify PATH   (a version folder or its .safetensors)
          As a notebook: run the cells top to bottom from the project folder (jupytext,
          VS Code, PyCharm); flags go in the LESSON_ARGS environment variable.
Takes:    about 5 s on a 2-core CPU.
Next:     04_onnx_export.py, exporting to ONNX and proving parity and speed.

Files it writes (in --out-dir): registry/blob-classifier/ with one folder per version (1.0,
1.1, 2.0: model.safetensors, metadata.json, MODEL_CARD.md), registry.json (versions and
aliases) and a .lock file; summary.json. Sections 1 and 4 work in scratch folders that are
removed when they finish.

What this is not: an authenticity check. Whoever can rewrite a version folder can rewrite
its metadata and fingerprints together; sign the folder (for example with Sigstore) or keep
the registry where only your pipeline can write, when that matters.

The ideas come from MLflow's model registry (versions, and aliases, which replaced its
stages), Hugging Face model cards, and safetensors (weights that cannot run code, with string
metadata in the header). Here they fit in one file, with no server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import hashlib
import json
import math
import os
import platform
import re
import secrets
import shutil
import stat
import subprocess
import sys
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import load_file, save_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from common.compare import max_abs_diff
from common.data import make_loaders, make_vector_classification
from common.devices import seed_everything
from common.models import MLP
from common.run import Run, in_notebook, lesson_argv, make_parser, script_file
from common.training import evaluate, train_one_epoch

HERE = script_file(globals(), "03_model_versioning.py")  # a notebook kernel has no __file__

# ############################################################################################
# Reusable pieces: copy these into your own code.
# ############################################################################################


class IntegrityError(RuntimeError):
    """A saved version does not match what was recorded; the message names file and cause.

    A RuntimeError, so code that already handles load failures catches it too; its own type,
    so code that must treat tampering differently (alert, refuse to deploy) can.
    """


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The raw bytes of a tensor's values, independent of device, strides and storage.

    ``.contiguous()`` lays a transposed or sliced tensor out in row-major order, so two
    tensors with the same values give the same bytes however they were made; viewing the
    memory as uint8 reads the exact bits, so -0.0 and 0.0 (or two NaN payloads) differ.
    """
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def tensor_sha256(tensor: torch.Tensor) -> str:
    """SHA-256 of one tensor: its dtype, shape and value bytes.

    The dtype and shape go into the hash because the bytes alone are ambiguous: 16 zero
    bytes are four float32 zeros, eight float16 zeros, or a 2x2 matrix of float32 zeros.
    """
    digest = hashlib.sha256(f"{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    digest.update(tensor_bytes(tensor))
    return digest.hexdigest()


def content_fingerprint(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over sorted keys, dtypes, shapes and raw bytes: the identity of the weights.

    The same for the same values whatever the file format (.pt, safetensors), the device, the
    key order or the file name; different when any single element, dtype or shape changes.
    Keys are sorted because a state_dict's order is an accident of how the model was built,
    and each key is hashed with its tensor so that two swapped tensors of one shape differ.
    Hashing a pickle or a zip instead would hash the container, not the weights (section 1).
    """
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        digest.update(f"{key}|{tensor_sha256(state_dict[key])}\n".encode())
    return digest.hexdigest()


def architecture_signature(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over sorted keys and shapes only: equal for any two weight sets of one design.

    It answers "will a checkpoint of version A load into the code of version B?": if the
    signatures match, load_state_dict(strict=True) will accept it. dtypes are left out on
    purpose, so a float16 copy of a model keeps its design's signature.
    """
    text = "\n".join(f"{key}|{tuple(state_dict[key].shape)}" for key in sorted(state_dict))
    return hashlib.sha256(text.encode()).hexdigest()


def next_version(existing: list[tuple[str, str]], signature: str) -> str:
    """The version number for new weights with ``signature``, given ``(version, signature)``s.

    Rules: the first version is 1.0; new weights for an architecture already registered bump
    the MINOR number of that architecture's major line (1.0 -> 1.1); a new architecture (its
    keys or shapes changed, so old loading code breaks) starts the next MAJOR line (2.0).
    Examples: [] -> 1.0; [(1.0, A)] + A -> 1.1; [(1.0, A), (1.1, A)] + B -> 2.0;
    [(1.0, A), (2.0, B)] + A -> 1.1 (a fix for the old design keeps its major line). The
    version says what a user needs to know: can my loading code read it?
    """
    if not existing:
        return "1.0"
    parsed = [(tuple(int(p) for p in version.split(".")), sig) for version, sig in existing]
    same_design = [number for number, sig in parsed if sig == signature]
    if same_design:
        major = max(same_design)[0]
        minor = max(number[1] for number, _ in parsed if number[0] == major) + 1
        return f"{major}.{minor}"
    return f"{max(number[0] for number, _ in parsed) + 1}.0"


def git_commit(folder: Path) -> str | None:
    """The current git commit of ``folder``'s repository, or None (no git, not a repository).

    Recorded with every version so that "which code trained this?" has an answer. It does
    not notice uncommitted edits; a careful pipeline refuses to register from a dirty tree
    (``git status --porcelain`` non-empty) or records the diff as well.
    """
    try:
        completed = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True,
                                   text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return completed.stdout.strip() if completed.returncode == 0 else None


def fsync_directory(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (POSIX; see 02 for why)."""
    if os.name == "posix":
        handle = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


def write_new_file(path: Path, data: bytes) -> None:
    """Create ``path``, write ``data`` and fsync it; an existing file or link is an error.

    O_EXCL never opens what is already there (a file, or a symlink pointing anywhere), so
    this can only ever create a new name inside the folder. The file gets the permissions
    the umask gives any new file (mkstemp's 0600 would hide a shared registry from a team).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    descriptor = os.open(path, flags, 0o666)
    try:
        view = memoryview(data)
        while view:  # os.write may write less than asked
            view = view[os.write(descriptor, view):]
        os.fsync(descriptor)  # the bytes are on disk before any rename publishes them
    finally:
        os.close(descriptor)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably (02's atomic_write, for bytes).

    A new file with a random name in the same folder, then ``os.replace``, then fsync the
    folder: readers see the old file or the new one, never a torn one, and two writers never
    share a temporary name. A crash can leave the temporary file; the registry removes it.
    """
    temporary = path.with_name(f"{path.name}.{secrets.token_hex(6)}.partial")
    write_new_file(temporary, data)
    try:
        os.replace(temporary, path)  # replaces a symlink itself, never its target
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    fsync_directory(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    """:func:`write_bytes_atomic` for text (UTF-8)."""
    write_bytes_atomic(path, text.encode())


@contextlib.contextmanager
def open_regular_file(path: Path, what: str) -> Iterator[tuple[BinaryIO, os.stat_result]]:
    """``path`` opened for reading, and its fstat, if it is a regular file; else IntegrityError.

    O_NOFOLLOW refuses a symlink (it could point anywhere), O_NONBLOCK keeps a FIFO from
    hanging the open, and fstat on the OPENED descriptor refuses a directory, FIFO or device.
    Reading from that one descriptor means the bytes checked are the bytes used, even if the
    file is swapped meanwhile.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise IntegrityError(f"{path}: missing {what}") from None
    except OSError as err:
        cause = "a symlink; links are never followed" if err.errno == errno.ELOOP else err
        raise IntegrityError(f"{path}: cannot read the {what} ({cause})") from None
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise IntegrityError(f"{path}: the {what} is not a regular file (a directory, "
                                 "FIFO or device); refused")
        with open(descriptor, "rb", closefd=False) as handle:
            yield handle, info
    finally:
        os.close(descriptor)


def read_regular_file(path: Path, what: str, limit: int | None = None) -> bytes:
    """The bytes of ``path`` if it is a regular file (of at most ``limit`` bytes)."""
    with open_regular_file(path, what) as (handle, info):
        if limit is not None and info.st_size > limit:
            raise IntegrityError(f"{path}: the {what} has {info.st_size} bytes, over the "
                                 f"limit of {limit}")
        return handle.read() if limit is None else handle.read(limit)


def real_folder(path: Path) -> Path:
    """``path`` if it is a directory and not a symlink; else IntegrityError.

    A registry never follows a link out of itself: a version folder or model folder that
    is a symlink could make a write, a rename or a delete land anywhere.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        raise IntegrityError(f"{path}: no such folder") from None
    if not stat.S_ISDIR(mode):
        kind = "a symlink" if stat.S_ISLNK(mode) else "not a folder"
        raise IntegrityError(f"{path}: {kind}; a registry never follows links out of itself")
    return path


@contextlib.contextmanager
def folder_lock(folder: Path, timeout: float = 60.0, blocking: bool = True) -> Iterator[bool]:
    """Hold a cross-process lock on ``folder`` (``fcntl.flock`` on ``folder/.lock``).

    Every read-modify-write of a registry index happens inside it, so two processes that
    register at once get two different version numbers. The kernel drops the lock when a
    process dies, so a crash never leaves it held. The lock file never follows a link:
    O_NOFOLLOW refuses a symlinked ``.lock`` (following one would create or open a file
    anywhere), and O_CREAT only ever creates it inside ``folder``, a real directory.
    Yields True when held. ``blocking=False`` (a reader's housekeeping) yields False
    instead of waiting or failing; otherwise a refusal or ``timeout`` is a clear error.
    """
    if blocking:
        folder.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder)
    real_folder(folder)
    path = folder / ".lock"
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        descriptor = os.open(path, flags, 0o666)
    except OSError as err:
        if blocking:
            cause = "a symlink; locks never follow links" if err.errno == errno.ELOOP else err
            raise IntegrityError(f"{path}: refuses the lock file ({cause}); remove it") from None
        descriptor = None
    if descriptor is None:
        yield False
        return
    try:
        held = stat.S_ISREG(os.fstat(descriptor).st_mode)
        if not held and blocking:
            raise IntegrityError(f"{path}: refuses the lock file (not a regular file)")
        deadline = time.monotonic() + timeout
        while held:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not blocking:
                    held = False
                elif time.monotonic() >= deadline:
                    raise TimeoutError(f"{folder}: locked by another process for over "
                                       f"{timeout:.0f} s; try again later") from None
                else:
                    time.sleep(0.01)
        yield held
    finally:
        os.close(descriptor)  # closing the descriptor drops the lock


VERSION_PATTERN = re.compile(r"[0-9]{1,6}\.[0-9]{1,6}")  # not \d: it takes "１.０" and "٠١.٠"
ALIAS_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")  # ASCII, never a version number
HEX64 = re.compile(r"[0-9a-f]{64}")


def plain_name(name: object, what: str, source: Path | str) -> str:
    """Return ``name`` if it is a plain file or folder name; else raise IntegrityError.

    Names come from files (registry.json, metadata.json) and from callers, and any of them
    can be hostile: ``"../../etc"`` or an absolute path must never become a path we read,
    write or delete.
    """
    if (not isinstance(name, str) or not name or name in (".", "..") or name.startswith(".")
            or Path(name).name != name or "/" in name or "\\" in name or "\0" in name):
        raise IntegrityError(f"{source}: refuses {what} {name!r:.80}: not a plain name (no "
                             "path separators, '..' or leading dot); nothing was read or written")
    return name


def version_name(version: object, source: Path | str) -> str:
    """A version string of the form MAJOR.MINOR (ASCII digits), or IntegrityError."""
    if not isinstance(version, str) or not VERSION_PATTERN.fullmatch(version):
        raise IntegrityError(f"{source}: {version!r:.80} is not a version number (MAJOR.MINOR, "
                             "ASCII digits)")
    return version


class RecordCheck:
    """Type and range checks for one JSON record read from ``path``.

    Everything read from a file is hostile until checked: a list where a dict belongs, a
    string where a number belongs, ``true`` where an int belongs (bool is an int in
    Python), would otherwise surface as a TypeError deep inside a load. Each failure is an
    IntegrityError naming the file and the field.
    """

    def __init__(self, path: Path, label: str) -> None:
        self.path, self.label = path, label

    def fail(self, field: str, problem: str) -> IntegrityError:
        return IntegrityError(f"{self.path}: {self.label}, field {field}: {problem}")

    def typed(self, value: object, kind: type | tuple, field: str) -> object:
        """``value`` if it is a ``kind`` (a bool is not accepted as an int)."""
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise self.fail(field, f"expected {names}, got {type(value).__name__}")
        return value

    def member(self, record: dict, key: str, kind: type | tuple, prefix: str = "") -> object:
        """``record[key]``, present and of type ``kind``."""
        if key not in record:
            raise IntegrityError(f"{self.path}: {self.label}, missing field {prefix + key!r}")
        return self.typed(record[key], kind, repr(prefix + key))

    def text(self, value: object, pattern: re.Pattern, field: str, meaning: str) -> str:
        """A string that fully matches ``pattern``."""
        if not (isinstance(value, str) and pattern.fullmatch(value)):
            raise self.fail(field, f"{value!r:.80} is not {meaning}")
        return value

    def count(self, value: object, field: str, upper: int = 2**62) -> int:
        """An int in [0, upper]: JSON allows 10**400, and a shape or version never needs it."""
        self.typed(value, int, field)
        if not 0 <= value <= upper:
            raise self.fail(field, f"{str(value)[:20]} is out of range [0, {upper}]")
        return value


MAX_RECORD_BYTES = 16 * 2**20  # metadata.json and registry.json: far more than either needs
MAX_RECORD_DEPTH = 32  # nesting levels; a 100,000-deep JSON array is refused, not recursed


def decode_json_record(data: bytes, path: Path, label: str) -> object:
    """Parse JSON ``data`` read from ``path``, refusing a value nested too deep.

    ``json.loads`` recurses once per nesting level, so a file of 100,000 ``[`` raises
    RecursionError; that, a decoding error and too deep a value all become one
    IntegrityError. The depth is then checked without recursion, so nothing downstream
    that walks the value (json.dumps, ==) can hit the recursion limit either.
    """
    try:
        value = json.loads(data.decode("utf-8"))
    except RecursionError:
        raise IntegrityError(f"{path}: {label}, nested too deep") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise IntegrityError(f"{path}: {label}, not valid JSON ({err})") from None
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if depth > MAX_RECORD_DEPTH:
            raise IntegrityError(f"{path}: {label}, nested deeper than {MAX_RECORD_DEPTH}")
        children = item.values() if isinstance(item, dict) else item if isinstance(
            item, list) else ()
        pending.extend((child, depth + 1) for child in children)
    return value


# What metadata.json must hold, and the type of each field, checked on every read:
#   name, version, parent   which model, which version, and the version it was trained from
#   created                 when it was registered (UTC, ISO 8601)
#   architecture            {"module", "class", "kwargs"}: enough to rebuild the model object
#   hyperparameters         the training config, seed and data settings included
#   history, metrics        per-epoch figures, and the final ones
#   environment             torch/python/platform/device, seed, data fingerprint, git commit
#   fingerprints, tensors   the content fingerprint, the signature, a SHA-256 per tensor
#   module_versions         the per-module _version records that safetensors cannot carry
#   weights_file            the name of the weights file in the version folder (a plain name)
REQUIRED_METADATA = {
    "name": str, "version": str, "parent": (str, type(None)), "created": str,
    "architecture": dict, "hyperparameters": dict, "history": list, "metrics": dict,
    "environment": dict, "fingerprints": dict, "tensors": dict, "module_versions": dict,
    "weights_file": str,
}


def check_metadata(metadata: object, path: Path) -> dict:
    """Check every field of a metadata record that code reads; return it, or IntegrityError."""
    check = RecordCheck(path, "bad metadata")
    check.typed(metadata, dict, "(the whole file)")
    for key, kind in REQUIRED_METADATA.items():
        check.member(metadata, key, kind)
    plain_name(metadata["name"], "the name", path)
    plain_name(metadata["weights_file"], "the weights file", path)
    for key in ("version", "parent"):
        if key == "version" or metadata[key] is not None:
            check.text(metadata[key], VERSION_PATTERN, key, "a version number (MAJOR.MINOR)")
    for key in ("content", "signature"):
        check.text(check.member(metadata["fingerprints"], key, str, "fingerprints."),
                   HEX64, f"fingerprints.{key}", "a SHA-256 hex digest")
    architecture = metadata["architecture"]
    check.member(architecture, "class", str, "architecture.")
    check.typed(architecture.get("module", ""), str, "architecture.module")
    check.typed(architecture.get("kwargs", {}), dict, "architecture.kwargs")
    for key, info in metadata["tensors"].items():
        field = f"tensors[{key!r:.60}]."
        check.typed(info, dict, field[:-1])
        if not isinstance(getattr(torch, check.member(info, "dtype", str, field), None),
                          torch.dtype):  # read_weights computes sizes from it
            raise check.fail(field + "dtype", f"{info['dtype']!r:.40} is not a torch dtype")
        for axis, size in enumerate(check.member(info, "shape", list, field)):
            check.count(size, f"{field}shape[{axis}]")
        check.text(check.member(info, "sha256", str, field), HEX64, field + "sha256",
                   "a SHA-256 hex digest")
    for key, number in metadata["module_versions"].items():
        check.count(number, f"module_versions[{key!r:.60}]", 2**31)
    for row, entry in enumerate(metadata["history"]):
        check.typed(entry, dict, f"history[{row}]")
    return metadata


def check_index(index: object, path: Path) -> dict:
    """Check a registry.json record: versions (ASCII MAJOR.MINOR) with hex fingerprints and
    a parent, aliases (ASCII names) pointing at registered versions. IntegrityError if not."""
    check = RecordCheck(path, "not a valid registry index")
    check.typed(index, dict, "(the whole file)")
    versions = check.member(index, "versions", dict)
    for version, info in versions.items():
        field = f"versions[{version!r:.60}]"
        version_name(version, path)
        check.typed(info, dict, field)
        for key in ("content", "signature"):
            check.text(check.member(info, key, str, field + "."), HEX64, f"{field}.{key}",
                       "a SHA-256 hex digest")
        if info.get("parent") is not None:
            check.text(info["parent"], VERSION_PATTERN, f"{field}.parent", "a version number")
    for alias, target in check.member(index, "aliases", dict).items():
        check.text(alias, ALIAS_PATTERN, f"aliases[{alias!r:.60}]", "an ASCII alias name")
        if not isinstance(target, str) or target not in versions:
            raise IntegrityError(f"{path}: alias {alias!r} points at {target!r:.80}, which is "
                                 "not a registered version")
    return index


@dataclasses.dataclass
class VersionedModel:
    """A model plus everything needed to trust, reproduce and explain it.

    ``save(folder)`` writes ``model.safetensors`` (header metadata: name, version, fingerprint),
    ``metadata.json`` (config, history, environment, fingerprints, per-tensor hashes) and
    ``MODEL_CARD.md``. ``load(folder, build)`` rebuilds the model with ``build(architecture)``
    and refuses weights that do not match the recorded fingerprints.
    Why safetensors for the weights: a registry is where files are SHARED, and a shared
    .pt file is a pickle that can run code on load (01 section 7); safetensors holds only
    tensors and a string header. Why a separate metadata.json: nested, typed metadata (the
    history, the config) does not fit safetensors' flat string header, and people read it.
    """

    model: nn.Module
    metadata: dict

    WEIGHTS = "model.safetensors"
    METADATA = "metadata.json"
    CARD = "MODEL_CARD.md"

    @staticmethod
    def describe(state_dict: Mapping[str, torch.Tensor]) -> dict:
        """Fingerprints and per-tensor hashes of a state_dict (the integrity part of metadata).

        The per-tensor hashes cost one more pass over the bytes, and buy the error message
        that names WHICH tensors changed when the content fingerprint does not match.
        """
        return {
            "fingerprints": {"content": content_fingerprint(state_dict),
                             "signature": architecture_signature(state_dict)},
            "tensors": {key: {"dtype": str(value.dtype).removeprefix("torch."),
                              "shape": list(value.shape), "sha256": tensor_sha256(value)}
                        for key, value in sorted(state_dict.items())},
        }

    def save(self, folder: Path, card: Callable[[dict], str] | None = None) -> Path:
        """Write the version into ``folder`` (created; an existing folder is an error).

        The fingerprints and per-tensor hashes in metadata.json are computed HERE, from the
        tensors written, never copied from the caller's metadata. ``card(metadata)`` returns
        the model card's text (default: :func:`model_card`).
        """
        folder = Path(folder)
        if os.path.lexists(folder):
            raise FileExistsError(f"{folder}: a version is already saved there; versions are "
                                  "immutable, register a new one instead")
        folder.parent.mkdir(parents=True, exist_ok=True)
        state_dict = {k: v.detach().cpu().contiguous() for k, v in
                      self.model.state_dict().items()}
        self.metadata = {**self.metadata, **self.describe(state_dict)}
        metadata_text = json.dumps(self.metadata, indent=2) + "\n"
        # The weights' header records the metadata's hash, so an edit to either is detected.
        # (Integrity, not authenticity: whoever can rewrite both files can fake both; sign
        # the folder, e.g. with Sigstore, when that matters.)
        header = {"name": self.metadata["name"], "version": self.metadata["version"],
                  "content_fingerprint": self.metadata["fingerprints"]["content"],
                  "signature": self.metadata["fingerprints"]["signature"],
                  "metadata_sha256": hashlib.sha256(metadata_text.encode()).hexdigest()}
        files = {self.METADATA: metadata_text.encode(),
                 self.WEIGHTS: safetensors_bytes(state_dict, metadata=header),
                 self.CARD: (card or model_card)(self.metadata).encode()}
        # A staging folder with a unique name beside the target: the version appears complete
        # (one rename) or not at all, and two writers never share a staging folder. A crash
        # leaves the staging folder behind; the registry's recovery removes it.
        staging = folder.with_name(f".{folder.name}.{secrets.token_hex(6)}.incoming")
        os.mkdir(staging, 0o777)  # unique name; the umask decides the permissions
        try:
            for name, data in files.items():
                write_new_file(staging / name, data)
            fsync_directory(staging)
            os.rename(staging, folder)  # fails if a non-empty folder appeared meanwhile
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        fsync_directory(folder.parent)
        return folder

    @classmethod
    def load(cls, folder: Path, build: Callable[[dict], nn.Module],
             device: torch.device | str = "cpu", expected: Mapping | None = None
             ) -> VersionedModel:
        """Verify the version in ``folder``, then rebuild and load it. Raises IntegrityError.

        ``expected`` (what an index records: name, version, content) must match too. The
        architecture record is checked on the meta device BEFORE the model is built for
        real, so a record asking for a 60000x60000 layer is refused without allocating it.
        """
        metadata, state_dict = verify_version(folder, expected)
        module_versions = {k: {"version": v} for k, v in metadata["module_versions"].items()}
        problem = check_architecture(build, metadata["architecture"], state_dict,
                                     module_versions)
        if problem:
            raise IntegrityError(f"{Path(folder) / cls.METADATA}: field 'architecture' does "
                                 f"not describe the weights: {problem}")
        # Built for real only now, when its size is known to be the weights' size. (A model
        # materialised from the meta skeleton would leave non-persistent buffers empty.)
        model = build(metadata["architecture"])
        # safetensors keeps tensors only; the module versions that _load_from_state_dict reads
        # (section 7) travel in metadata.json and are put back here.
        state_dict = OrderedDict(state_dict)  # an OrderedDict can carry the _metadata attribute
        state_dict._metadata = module_versions
        model.load_state_dict(state_dict)
        return cls(model.to(device), metadata)


def check_architecture(build: Callable[[dict], nn.Module], architecture: dict,
                       state_dict: Mapping[str, torch.Tensor],
                       module_versions: dict | None = None) -> str | None:
    """Why ``build(architecture)`` cannot take ``state_dict``, or None; nothing is allocated.

    The model is built under ``torch.device("meta")``: its tensors get shapes but no memory,
    so a record naming ``nn.Linear(60000, 60000)`` costs nothing here (for real: 14 GB).
    Loading meta stand-ins of the weights with ``assign=True`` runs the module's own checks
    and migrations (section 7), the ones the real ``load_state_dict`` runs.
    Two ways round the meta device are closed before and during the build. A recorded
    keyword naming a device or dtype (``"device": "cpu"``) would put the tensors in real
    memory: refused. A count (``num_layers=3000000``) makes the build itself run for
    minutes, even on meta: the build stops as soon as it has made more tensors than the
    weights could fill (:func:`tensor_budget`). Capping each int instead would refuse real
    models (a 65,536-wide layer) and still let 65,536 layers through; an allow-list of
    classes would refuse every model of the reader's own. The class's code itself is
    trusted: it is one this process imported (:func:`build_from_record`).
    """
    placed = device_like_keys(architecture.get("kwargs", {}))
    if placed:
        return (f"kwargs {', '.join(placed)[:100]}: the loader chooses where tensors go and "
                "their dtype, never the record")
    stand_ins = OrderedDict((key, torch.empty(value.shape, dtype=value.dtype, device="meta"))
                            for key, value in state_dict.items())
    stand_ins._metadata = module_versions or {}
    try:
        with torch.device("meta"), tensor_budget(2 * len(state_dict) + 16):
            skeleton = build(architecture)
        skeleton.load_state_dict(stand_ins, strict=True, assign=True)
    except Exception as err:  # noqa: BLE001 - any failure here is the record's fault
        return f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
    return None


DEVICE_LIKE = re.compile(r"device|dtype", re.IGNORECASE)


def device_like_keys(kwargs: object) -> list[str]:
    """The keys naming a device or a dtype anywhere in ``kwargs`` (nested dicts included)."""
    found, pending = [], [kwargs]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            found += [repr(key) for key in item if DEVICE_LIKE.search(str(key))]
        pending.extend(item.values() if isinstance(item, dict) else
                       item if isinstance(item, list) else ())
    return found


@contextlib.contextmanager
def tensor_budget(limit: int) -> Iterator[None]:
    """ValueError as soon as modules built in this thread register over ``limit`` tensors.

    Every parameter and buffer a module registers passes through the global registration
    hooks, so the count needs nothing from the module's code. The limit leaves room for
    what a state_dict does not hold: non-persistent buffers, and None for a missing bias.
    """
    thread, made = threading.get_ident(), [0]

    def count(module: nn.Module, name: str, tensor: torch.Tensor | None) -> None:
        if threading.get_ident() == thread:
            made[0] += 1
            if made[0] > limit:
                raise ValueError(f"the build makes more than {limit} parameters and buffers, "
                                 "the most these weights allow")

    handles = [nn.modules.module.register_module_parameter_registration_hook(count),
               nn.modules.module.register_module_buffer_registration_hook(count)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


MAX_HEADER_BYTES = 100_000_000  # the ceiling safetensors itself puts on the JSON header


def read_weights(path: Path, tensors: Mapping[str, dict]) -> tuple[dict, bytes]:
    """The ``__metadata__`` strings and all the bytes of the safetensors file ``path``.

    The format: 8 bytes little-endian header length N, then N bytes of JSON giving each
    tensor's dtype, shape and ``data_offsets`` in the data that follows. All that the header
    can tell is checked BEFORE the body is read, so a file grown to 8 GiB (sparse: no disk)
    costs nothing: N is capped, the tensors' names and shapes must be those metadata.json
    records (``tensors``), and the file must end exactly where the recorded tensors end.
    Then it is read once; those bytes are the ones hashed and deserialized.
    """
    # Why not safetensors.torch.load_file(path): it opens the file by its path once more, so
    # the bytes it reads need not be the bytes that were hashed, and it knows nothing of the
    # shapes metadata.json records. The order below (length, header, names and shapes
    # against the record, end of data, then the body) means that each step reads only what
    # the step before it has bounded.
    check = RecordCheck(path, "not a readable safetensors file")
    with open_regular_file(path, "weights file") as (handle, info):
        size = int.from_bytes(handle.read(8), "little")
        if not 2 <= size <= min(MAX_HEADER_BYTES, info.st_size - 8):
            raise check.fail("header length", f"{size} bytes: past the end of the file "
                             f"({info.st_size} bytes) or over {MAX_HEADER_BYTES}")
        header = check.typed(decode_json_record(handle.read(size), path, check.label), dict,
                             "(the header)")
        entries = {key: check.typed(entry, dict, repr(key)[:60])
                   for key, entry in header.items() if key != "__metadata__"}
        differ = {key for key in entries.keys() | tensors.keys() if key not in tensors
                  or key not in entries or entries[key].get("shape") != tensors[key]["shape"]}
        if differ:
            raise IntegrityError(f"{path}: tampered weights, field tensors: the names or "
                                 f"shapes of {', '.join(sorted(differ))[:200]} differ from "
                                 "metadata.json")
        ends = [0]
        for key, entry in entries.items():
            offsets = check.member(entry, "data_offsets", list, f"{key!r:.60}.")
            ends.append(check.count(offsets[-1] if offsets else -1, f"{key!r:.60}.data_offsets"))
        recorded = sum(math.prod(record["shape"]) * getattr(torch, record["dtype"]).itemsize
                       for record in tensors.values())  # dtypes checked by check_metadata
        if not info.st_size - 8 - size == max(ends) == recorded:
            raise check.fail("data_offsets", f"the file has {info.st_size - 8 - size} bytes "
                             f"of data, the header says {max(ends)}, metadata.json "
                             f"records {recorded}")
        handle.seek(0)
        try:
            data = handle.read()
        except MemoryError:
            raise IntegrityError(f"{path}: {info.st_size} bytes do not fit in memory") from None
    found = header.get("__metadata__")
    return (found if isinstance(found, dict) else {}), data


def read_metadata(folder: Path) -> dict:
    """Read and validate ``metadata.json``; an IntegrityError names the file and the field.

    Validation comes first because everything after it trusts these fields: a missing key
    or a list where a dict belongs would otherwise surface as a KeyError deep inside a load,
    naming neither the file nor the field.
    """
    path = folder / VersionedModel.METADATA
    data = read_regular_file(path, "metadata file", MAX_RECORD_BYTES)
    return check_metadata(decode_json_record(data, path, "bad metadata"), path)


def verify_version(path: str | Path, expected: Mapping | None = None
                   ) -> tuple[dict, dict[str, torch.Tensor]]:
    """Check a saved version (its folder, or the .safetensors inside it) against its record.

    A file path must name the weights file metadata.json records: any other name (a stray
    ``evil.safetensors``, or none at all) would otherwise be answered for a file never read.

    Returns ``(metadata, state_dict)`` when everything matches; otherwise raises IntegrityError
    naming the file and what differs: a missing file, bad metadata, an unreadable weights
    file, weights from another version, edited metadata, or the tensors whose bytes changed.
    ``expected`` holds what an index records for this folder (``name``, ``version``,
    ``content``, and ``source``, the index's path): a folder swapped for a copy of another
    version is self-consistent, and only that comparison catches it.
    The checks run cheapest first: the header's recorded fingerprint (a few bytes) catches a
    swapped file before any tensor is hashed; the recomputed fingerprint catches edits.
    """
    path = Path(path)
    folder = path.parent if path.suffix == ".safetensors" else path
    if not folder.is_dir():
        raise IntegrityError(f"{path}: no such version folder")
    if folder != path and not os.path.lexists(path):
        raise IntegrityError(f"{path}: no such file")
    metadata_path = folder / VersionedModel.METADATA
    metadata_bytes = read_regular_file(metadata_path, "metadata file", MAX_RECORD_BYTES)
    metadata = check_metadata(decode_json_record(metadata_bytes, metadata_path, "bad metadata"),
                              metadata_path)  # parsed from the bytes that are hashed below
    recorded = metadata["fingerprints"]["content"]
    found = {"name": metadata["name"], "version": metadata["version"], "content": recorded}
    wrong = [key for key in ("content", "name", "version")
             if expected and key in expected and expected[key] != found[key]]
    if wrong:
        said = " ".join(str(expected.get(key, "?"))[:16] for key in ("name", "version", "content"))
        raise IntegrityError(
            f"{folder}: holds {found['name']} {found['version']} (content fingerprint "
            f"{recorded[:16]}), but {expected.get('source', 'the index')} records {said}: "
            f"the folder was replaced ({', '.join(wrong)} differ)")
    weights = folder / metadata["weights_file"]
    if folder != path and path.name != weights.name:  # a file the checks would never read
        raise IntegrityError(f"{path}: not the weights file of this version; metadata.json "
                             f"names {weights.name!r:.80} (field 'weights_file')")
    header, data = read_weights(weights, metadata["tensors"])
    if header.get("content_fingerprint") != recorded:
        raise IntegrityError(
            f"{weights}: weights belong to another version (header says version "
            f"{header.get('version')!r:.20}, fingerprint "
            f"{str(header.get('content_fingerprint'))[:12]}; metadata.json records "
            f"{metadata['version']}, {recorded[:12]})")
    metadata_sha256 = hashlib.sha256(metadata_bytes).hexdigest()
    if header.get("metadata_sha256") != metadata_sha256:
        raise IntegrityError(
            f"{metadata_path}: edited after saving (its SHA-256 {metadata_sha256[:12]} != "
            f"{str(header.get('metadata_sha256'))[:12]} recorded in {weights.name}'s header)")
    try:
        state_dict = safetensors_load(data)
    except (SafetensorError, ValueError) as err:
        raise IntegrityError(f"{weights}: not a readable safetensors file ({err})") from None
    actual = VersionedModel.describe(state_dict)
    if actual["fingerprints"]["content"] != recorded:
        expected_tensors = metadata["tensors"]
        changed = sorted(k for k in expected_tensors.keys() & actual["tensors"].keys()
                         if expected_tensors[k] != actual["tensors"][k])
        added = sorted(actual["tensors"].keys() - expected_tensors.keys())
        removed = sorted(expected_tensors.keys() - actual["tensors"].keys())
        details = "; ".join(f"{label}: {', '.join(keys)}" for label, keys in
                            (("changed", changed), ("added", added), ("removed", removed)) if keys)
        found = actual["fingerprints"]["content"]
        raise IntegrityError(
            f"{weights}: tampered weights: content fingerprint {found[:12]} != recorded "
            f"{recorded[:12]} ({details or 'the per-tensor hashes in metadata.json were edited'})")
    return metadata, state_dict


def runtime_environment(device: torch.device | str) -> dict:
    """The software and hardware a version was made with: what a reproduction needs."""
    device = torch.device(device)
    facts = {"torch": torch.__version__, "python": sys.version.split()[0],
             "platform": platform.platform(), "device": str(device)}
    if device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
    return facts


def build_from_record(architecture: dict) -> nn.Module:
    """Rebuild a model from ``{"module", "class", "kwargs"}`` (what register records).

    The class is looked up among modules THIS process has already imported; nothing is
    imported because a file says so (an import runs code), and only nn.Module subclasses
    are accepted. Pass ``ModelRegistry(root, build=...)`` for anything else.
    """
    module = sys.modules.get(str(architecture.get("module")))
    cls = getattr(module, str(architecture.get("class")), None) if module else None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"cannot rebuild {architecture.get('module')}."
                         f"{architecture.get('class')}: import it first, or pass "
                         "ModelRegistry(root, build=...)")
    return cls(**architecture.get("kwargs", {}))


def model_card(metadata: dict) -> str:
    """A short human-readable card, in the spirit of Hugging Face model cards.

    A card answers what a file cannot: what the model is for, what it is NOT for, how it
    was trained and evaluated, and how to reproduce it. Pass your own function as
    ``ModelRegistry(root, card=...)``; this one fits the lesson's toy model.
    """
    env = metadata["environment"]
    # What the card promises depends on where the weights were trained: the CPU kernels are
    # deterministic, so a retrain can match the fingerprint; some GPU kernels are not.
    reproduce = ("Retraining from this config with the same software on the CPU is expected to "
                 "give the same content fingerprint\n(03_model_versioning.py section 6 checks "
                 "that for its own versions)." if env["device"] == "cpu" else
                 "Trained on a GPU, where some kernels are non-deterministic: a retrain is "
                 "expected to match the\nmetrics, not the content fingerprint.")
    rows = "\n".join(f"| {h['epoch']} | {h['train_loss']:.4f} | {h['val_loss']:.4f} | "
                     f"{h['val_accuracy']:.3f} |" for h in metadata["history"])
    return f"""# {metadata['name']} {metadata['version']}

- Parent version: {metadata['parent'] or 'none (trained from scratch)'}
- Created: {metadata['created']}
- Architecture: `{metadata['architecture']['class']}({metadata['architecture']['kwargs']})`
- Content fingerprint: `{metadata['fingerprints']['content']}`
- Architecture signature: `{metadata['fingerprints']['signature'][:16]}`

## Intended use
A teaching model: classifies synthetic Gaussian blobs. Not for real data.

## Training
Hyperparameters: `{json.dumps(metadata['hyperparameters'])}`
Data fingerprint: `{env.get('data_fingerprint', '?')[:16]}`

| epoch | train loss | val loss | val accuracy |
|---|---|---|---|
{rows}

## Reproduce
torch {env['torch']}, Python {env['python']}, {env['platform']}, seed {env['seed']},
git commit {env.get('git_commit') or 'unknown'}, trained on {env['device']}.
{reproduce}
"""


class RegistryWarning(UserWarning):
    """The registry repaired what an interrupted register left: says what it did and why."""


class RegistryStore:
    """One model's folder in a registry: its registry.json, its lock, and crash recovery.

    A register publishes a version in two steps, the version folder's rename and then the
    replace of registry.json, and a process can die between any two system calls. What a
    crash can leave is recognised by name and repaired under the lock by :meth:`recover`:
    a staging folder (``.1.1.<hex>.incoming``) or an index temporary
    (``registry.json.<hex>.partial``) is removed; a version folder without an index entry
    is adopted if it verifies (its rename was the last step that ran) or else set aside as
    ``.set-aside.<version>.<hex>``, never deleted. Each repair is a RegistryWarning.
    Nothing else in the folder is touched, and nothing outside it: every name is checked.
    """

    INDEX = "registry.json"
    LEFTOVER = re.compile(r"\.[0-9]{1,6}\.[0-9]{1,6}\.[0-9a-f]{12}\.incoming"
                          r"|registry\.json\.[0-9a-f]{12}\.partial")

    def __init__(self, folder: Path, name: str, lock_timeout: float = 60.0) -> None:
        self.folder, self.name, self.lock_timeout = folder, name, lock_timeout
        self.path = folder / self.INDEX

    def read(self) -> dict:
        """registry.json, checked field by field; a missing file is an empty registry."""
        if os.path.lexists(self.folder):
            real_folder(self.folder)  # a model folder that is a link leads out of the root
        if not os.path.lexists(self.path):
            return {"name": self.name, "versions": {}, "aliases": {}}
        label = "not a valid registry index"
        data = read_regular_file(self.path, "registry index", MAX_RECORD_BYTES)
        return check_index(decode_json_record(data, self.path, label), self.path)

    def write(self, index: dict) -> None:
        """Replace registry.json atomically (the caller holds the lock)."""
        write_text_atomic(self.path, json.dumps(index, indent=2) + "\n")

    def locked(self, blocking: bool = True) -> contextlib.AbstractContextManager[bool]:
        """The folder's cross-process lock (see :func:`folder_lock`)."""
        return folder_lock(self.folder, self.lock_timeout, blocking)

    def leftovers(self, index: dict) -> list[str]:
        """Names in the folder that an interrupted register left (what recover repairs)."""
        if not os.path.isdir(self.folder):
            return []
        return sorted(name for name in os.listdir(self.folder) if self.LEFTOVER.fullmatch(name)
                      or (VERSION_PATTERN.fullmatch(name) and name not in index["versions"]))

    def current(self) -> dict:
        """The index as a reader should see it: repaired first if that is possible now.

        A reader never waits: if a writer holds the lock (it may be between its two steps)
        or the folder is read-only, it reads the index as it is, which is consistent.
        """
        index = self.read()
        if self.leftovers(index):
            with self.locked(blocking=False) as held:
                if held:
                    index = self.recover()
        return index

    def recover(self) -> dict:
        """Repair what interrupted registers left (the caller holds the lock); the index."""
        index, changes, adopted = self.read(), [], False
        for name in self.leftovers(index):
            path = self.folder / name
            if self.LEFTOVER.fullmatch(name):
                if stat.S_ISDIR(os.lstat(path).st_mode):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)  # a file or a symlink; a link's target is never touched
                changes.append(f"removed {name}, left by an interrupted write")
                continue
            try:
                source = f"{self.path} (no entry yet)"
                metadata, _ = verify_version(real_folder(path), {
                    "name": self.name, "version": name, "source": source})
            except IntegrityError as err:
                aside = self.folder / f".set-aside.{name}.{secrets.token_hex(6)}"
                os.rename(path, aside)
                changes.append(f"set {name} aside as {aside.name}: it has no index entry and "
                               f"does not verify ({err})")
                continue
            index["versions"][name] = {**metadata["fingerprints"], "parent": metadata["parent"]}
            adopted = True
            changes.append(f"adopted {name}: a complete version without an index entry (a "
                           "register was interrupted after publishing it); its record verifies")
        if adopted:
            self.write(index)
        for change in changes:
            warnings.warn(f"{self.folder}: {change}", RegistryWarning, stacklevel=3)
        return index


class ModelRegistry:
    """A registry in a folder: ``<root>/<name>/<version>/`` plus ``<root>/<name>/registry.json``.

    registry.json holds the version list (with fingerprints) and the aliases; it is
    rewritten atomically, under a cross-process lock, and every load checks the folder
    against it. Versions are immutable once written; a crash at any instant loses nothing
    (:class:`RegistryStore` repairs what it leaves on the next read or register).
    ``build(architecture) -> nn.Module`` rebuilds a model from its recorded architecture
    (default: :func:`build_from_record`, the recorded class if this process has imported
    it); ``card(metadata) -> str`` writes its model card (default: :func:`model_card`);
    ``code_folder`` is the git checkout whose commit each version records (default: the
    current folder). Names are plain names, never paths; versions and aliases are ASCII.
    """

    def __init__(self, root: str | Path, build: Callable[[dict], nn.Module] | None = None,
                 card: Callable[[dict], str] | None = None,
                 code_folder: str | Path | None = None, lock_timeout: float = 60.0) -> None:
        self.root = Path(root)
        self.build = build or build_from_record
        self.card = card or model_card
        self.code_folder = Path(code_folder) if code_folder is not None else Path.cwd()
        self.lock_timeout = lock_timeout

    def _store(self, name: str) -> RegistryStore:
        """The store of ``name``, after checking that ``name`` is a plain name."""
        folder = self.root / plain_name(name, "the registry name", self.root)
        return RegistryStore(folder, name, self.lock_timeout)

    def folder(self, name: str, version: str) -> Path:
        """The folder of one version; both parts are checked, so it stays under the root."""
        plain_name(name, "the registry name", self.root)
        return self.root / name / version_name(version, self.root / name)

    def versions(self, name: str) -> list[str]:
        """The registered version numbers of ``name``, in registration order."""
        return list(self._store(name).current()["versions"])

    def aliases(self, name: str) -> dict[str, str]:
        """``{alias: version}`` for ``name``, e.g. ``{"production": "1.1"}``."""
        return dict(self._store(name).current()["aliases"])

    def register(self, name: str, model: nn.Module, *, architecture: dict,
                 hyperparameters: dict, history: list[dict], data_fingerprint: str,
                 seed: int, parent: str | None = None) -> VersionedModel:
        """Save ``model`` as the next version of ``name`` (or return the identical existing one).

        The whole read-choose-write runs under the registry's lock: two processes that
        register at once get two different version numbers. ``architecture`` must rebuild
        ``model`` (checked on the meta device): a version that cannot load is refused here.
        """
        store = self._store(name)
        if parent is not None:
            version_name(parent, "register(parent=...)")
        state_dict = model.state_dict()
        record = {"module": type(model).__module__, **architecture}
        problem = check_architecture(self.build, record, state_dict,
                                     getattr(state_dict, "_metadata", None))
        if problem:
            raise ValueError(f"register({name!r}): architecture={architecture!r:.200} does not "
                             f"rebuild this model: {problem}")
        described = VersionedModel.describe(state_dict)
        device = next(iter(state_dict.values())).device if state_dict else torch.device("cpu")
        env = runtime_environment(device) | {"seed": seed, "data_fingerprint": data_fingerprint,
                                             "git_commit": git_commit(self.code_folder)}
        with store.locked():
            index = store.recover()
            for version, info in index["versions"].items():
                if info["content"] == described["fingerprints"]["content"]:
                    return self.load(name, version)
            version = next_version(
                [(v, info["signature"]) for v, info in index["versions"].items()],
                described["fingerprints"]["signature"])
            metadata = {
                "name": name, "version": version, "parent": parent,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds"),
                "architecture": record, "hyperparameters": hyperparameters,
                "history": history, "metrics": history[-1] if history else {},
                "environment": env,
                "module_versions": {k: v["version"] for k, v in
                                    getattr(state_dict, "_metadata", {}).items()
                                    if "version" in v},
                "weights_file": VersionedModel.WEIGHTS,
            }
            versioned = VersionedModel(model, metadata)
            versioned.save(self.folder(name, version), card=self.card)  # adds fingerprints
            index["versions"][version] = {**versioned.metadata["fingerprints"], "parent": parent}
            store.write(index)
        return versioned

    def set_alias(self, name: str, alias: str, version: str) -> None:
        """Point ``alias`` (e.g. "production") at ``version``; it moves if it existed."""
        store = self._store(name)
        if not (isinstance(alias, str) and ALIAS_PATTERN.fullmatch(alias)):
            raise IntegrityError(f"{store.path}: refuses the alias {alias!r:.80}: an alias is "
                                 "an ASCII name (letter first; letters, digits, _ and -)")
        with store.locked():
            index = store.recover()
            if version not in index["versions"]:
                raise KeyError(f"{name} has no version {version}; versions: "
                               f"{list(index['versions'])}")
            index["aliases"][alias] = version
            store.write(index)

    def resolve(self, name: str, ref: str, index: dict | None = None) -> str:
        """A version number from a version number or an alias (looked up in ``index``)."""
        index = index or self._store(name).current()
        if ref in index["versions"]:
            return ref
        if ref in index["aliases"]:
            return index["aliases"][ref]
        raise KeyError(f"{name}: {ref!r} is neither a version {list(index['versions'])} nor an "
                       f"alias {list(index['aliases'])}")

    def load(self, name: str, ref: str, device: torch.device | str = "cpu") -> VersionedModel:
        """Load version or alias ``ref`` of ``name``, verified against its folder's own
        record AND against registry.json (a folder swapped for another version's copy)."""
        store = self._store(name)
        index = store.current()
        version = self.resolve(name, ref, index)  # the same index read the check uses
        folder = real_folder(self.folder(name, version))
        expected = {"name": name, "version": version, "source": store.path,
                    "content": index["versions"][version]["content"]}
        return VersionedModel.load(folder, self.build, device, expected)


def diff_versions(a: VersionedModel, b: VersionedModel) -> dict:
    """What changed from ``a`` to ``b``: hyperparameters, final metrics and tensors.

    Tensors are split into changed (with the largest element change), unchanged, reshaped,
    added and removed; together they tell a fine-tune (values moved, same keys) from a new
    design (keys or shapes differ), and a frozen layer that moved from one that did not.
    """
    ha, hb = a.metadata["hyperparameters"], b.metadata["hyperparameters"]
    sa, sb = a.model.state_dict(), b.model.state_dict()
    common = sa.keys() & sb.keys()
    same_shape = [k for k in sorted(common) if sa[k].shape == sb[k].shape]
    return {
        "hyperparameters": {k: (ha.get(k), hb.get(k)) for k in sorted(ha.keys() | hb.keys())
                            if ha.get(k) != hb.get(k)},
        "metrics": {k: (a.metadata["metrics"].get(k), b.metadata["metrics"].get(k))
                    for k in ("val_loss", "val_accuracy")},
        "changed": {k: float((sa[k].cpu().double() - sb[k].cpu().double()).abs().max())
                    for k in same_shape if not torch.equal(sa[k].cpu(), sb[k].cpu())},
        "unchanged": [k for k in same_shape if torch.equal(sa[k].cpu(), sb[k].cpu())],
        "reshaped": {k: (list(sa[k].shape), list(sb[k].shape)) for k in sorted(common)
                     if sa[k].shape != sb[k].shape},
        "added": sorted(sb.keys() - sa.keys()),
        "removed": sorted(sa.keys() - sb.keys()),
    }


class RenamedMLP(nn.Module):
    """Version 2 of a model whose parameters were renamed: ``fc1``/``fc2`` became
    ``encoder``/``classifier``. Old checkpoints still load, the way torch's BatchNorm reads
    checkpoints from before it had ``num_batches_tracked``.

    ``_version`` is stored per module in ``state_dict()._metadata`` at save time; on load,
    ``_load_from_state_dict`` receives it as ``local_metadata["version"]`` (None when the
    checkpoint has no record, e.g. it went through safetensors) and renames old keys.
    """

    _version = 2

    def __init__(self, in_features: int = 20, hidden: int = 32, num_classes: int = 4) -> None:
        super().__init__()
        self.encoder = nn.Linear(in_features, hidden)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.relu(self.encoder(x)))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        version = local_metadata.get("version")
        if version is None or version < 2:
            for old, new in (("fc1.", "encoder."), ("fc2.", "classifier.")):
                for key in [k for k in state_dict if k.startswith(prefix + old)]:
                    state_dict[prefix + new + key[len(prefix + old):]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class LegacyMLP(nn.Module):
    """Version 1 of the same model, as an old checkpoint was written by it."""

    def __init__(self, in_features: int = 20, hidden: int = 32, num_classes: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


# ############################################################################################
# The lessons, in order. In a notebook each cell runs its lesson (the `if in_notebook():`
# lines); `python 03_model_versioning.py` runs them all through main() at the bottom.
# ############################################################################################

# The lessons' model and training: an MLP on synthetic blobs, rebuilt from a recorded config.
# Everything random in train_version derives from the config's seed, which is what lets
# section 6 retrain a version bit for bit.


def build_model(architecture: dict) -> nn.Module:
    """Rebuild a model from its recorded architecture (class name + keyword arguments)."""
    classes = {"MLP": MLP}
    if architecture["class"] not in classes:
        raise ValueError(f"unknown architecture class {architecture['class']!r}")
    return classes[architecture["class"]](**architecture["kwargs"])


def train_version(hyperparameters: dict, architecture: dict, device: torch.device,
                  init_state: Mapping[str, torch.Tensor] | None = None):
    """Train an MLP from a recorded config; returns (model, history, data_fingerprint).

    Everything random is derived from ``hyperparameters["seed"]``, so the same config gives
    the same weights on the same software and hardware (bit-for-bit on the CPU).
    """
    seed_everything(hyperparameters["seed"])
    dataset = make_vector_classification(**hyperparameters["data"])
    data_fingerprint = content_fingerprint({"features": dataset.tensors[0],
                                            "labels": dataset.tensors[1]})
    train_loader, val_loader = make_loaders(dataset, batch_size=hyperparameters["batch_size"],
                                            seed=hyperparameters["seed"])
    model = build_model(architecture).to(device)
    if init_state is not None:
        model.load_state_dict(init_state)
    optimizer = torch.optim.Adam(model.parameters(), lr=hyperparameters["lr"])
    history = []
    for epoch in range(1, hyperparameters["epochs"] + 1):
        train_loss = train_one_epoch(model, train_loader, optimizer, device)
        val = evaluate(model, val_loader, device)
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val["loss"],
                        "val_accuracy": val["accuracy"]})
    return model, history, data_fingerprint



NAME = "blob-classifier"
BASE_CONFIG = {"seed": 0, "lr": 3e-3, "epochs": 4, "batch_size": 64,
               "data": {"n_samples": 1024, "n_features": 20, "num_classes": 4, "seed": 0},
               "init_from": None}


# %% Setup
# The flags and the out-dir, and an empty registry for this run. In a notebook the flags come
# from the LESSON_ARGS environment variable (none: the defaults). --verify PATH is a command of
# its own: it checks one saved version and exits (section 8).


def setup(argv: list[str] | None = None) -> tuple[Run, ModelRegistry]:
    """Parse the flags (or run --verify and exit), then start the run with a fresh registry.

    The registry is given the script's own model builder and the checkout to read the git
    commit from; ModelRegistry itself knows nothing about MLP.
    """
    parser = make_parser(HERE, __doc__.splitlines()[0])
    parser.add_argument("--verify", metavar="PATH",
                        help="only verify a saved version (folder or .safetensors), then exit")
    args = parser.parse_args(lesson_argv(argv))
    if args.verify:  # before Run: no header, no out-dir, just the one line
        raise SystemExit(verify_cli(args.verify))
    run = Run(HERE, args)
    registry_root = run.out_dir / "registry"
    shutil.rmtree(registry_root, ignore_errors=True)  # this run's registry starts empty
    return run, ModelRegistry(registry_root, build=build_model, code_folder=HERE.parent)


if in_notebook():
    run, registry = setup()


# %% 1. Fingerprints: what identifies a set of weights?
# Hashing the .pt file is NOT an identity for the weights: torch.save's zip archive contains
# a folder named after the file, the key order, each storage's device tag ("cpu", "cuda:0") and
# module version records, so the same values give different bytes. A content fingerprint
# hashes what matters, sorted keys + dtype + shape + raw bytes, and is the same from a .pt,
# a .safetensors file, the CPU or a GPU. Below, one set of weights is saved four ways.


def lesson_1_fingerprints(run: Run) -> dict:
    """Save the same weights four ways; hash each file and fingerprint each content.

    What to look for: several different file hashes, but ONE content fingerprint, also for
    the tensors on the run's device. The two .pt files of identical weights differ only in
    the folder name inside their zip archives (torch.save names it after the file).
    """
    run.section("1. Fingerprints: what identifies a set of weights?")
    state_dict = MLP(hidden=32).state_dict()
    payloads = {"model.pt": state_dict, "same_weights.pt": state_dict,
                "reordered.pt": dict(reversed(list(state_dict.items())))}
    with run.scratch("fingerprints") as folder:
        for filename, payload in payloads.items():
            torch.save(payload, folder / filename)
        save_file({k: v.contiguous() for k, v in state_dict.items()},
                  folder / "model.safetensors")
        names = [*payloads, "model.safetensors"]
        file_hashes = {name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
                       for name in names}
        fingerprints = {name: content_fingerprint(
            load_file(folder / name) if name.endswith(".safetensors")
            else torch.load(folder / name, map_location="cpu", weights_only=True))
            for name in names}
    on_device = content_fingerprint({k: v.to(run.device) for k, v in state_dict.items()})
    for name, file_hash in file_hashes.items():
        print(f"  {name:<18} file sha256 {file_hash[:12]}   content fingerprint "
              f"{fingerprints[name][:12]}")
    print(f"  {'tensors on ' + str(run.device):<18} {'':<24}   content fingerprint "
          f"{on_device[:12]}")
    distinct = len(set(fingerprints.values()) | {on_device})
    print(f"  {len(set(file_hashes.values()))} different file hashes, {distinct} content "
          "fingerprint(s) for the same weights")
    return {"file_hashes_distinct": len(set(file_hashes.values())),
            "content_fingerprints_distinct": distinct}


if in_notebook():
    run.record_all(lesson_1_fingerprints(run))


# %% 1b. What changes a fingerprint, and what changes a signature
# The content fingerprint must change when ANY value changes, however little: one element
# moved by 1e-6 is another model. The dtype is part of the identity too: the same weights in
# float16 are different numbers. An architecture signature hashes keys + shapes only: equal
# for two trainings of one design, different when the design changes, which is what the
# version rules of section 2 need ("same design" = a minor version, "new design" = major).


def lesson_1b_what_changes(run: Run) -> dict:
    """One element + 1e-6, a cast to float16, a wider layer: which hash moves?

    The fingerprint moves for the first two, the signature only for the third: that split
    is exactly "same design, other weights" versus "other design".
    """
    run.section("1b. What changes a fingerprint, and what changes a signature")
    state_dict = MLP(hidden=32).state_dict()
    changed = {k: v.clone() for k, v in state_dict.items()}
    changed["net.0.weight"][0, 0] += 1e-6
    half = {k: v.half() for k, v in state_dict.items()}
    signature = architecture_signature(state_dict)
    wider = architecture_signature(MLP(hidden=64).state_dict())
    moved = content_fingerprint(changed) != content_fingerprint(state_dict)
    print(f"  one element + 1e-6:  content {content_fingerprint(changed)[:12]} (changed: "
          f"{moved}), signature {architecture_signature(changed)[:12]} (same as "
          f"{signature[:12]})")
    print(f"  cast to float16:     content {content_fingerprint(half)[:12]} (dtype is identity)")
    print(f"  hidden 32 -> 64:     signature {wider[:12]} (a new design)")
    return {"one_element_changes_fingerprint": moved,
            "wider_layer_changes_signature": wider != signature}


if in_notebook():
    run.record_all(lesson_1b_what_changes(run))


# %% 2. A registry: versions, metadata, a model card
# Each registered version is an immutable folder: weights as safetensors (header metadata:
# name, version, fingerprint), metadata.json (config, history, environment, data fingerprint,
# parent, fingerprints, a SHA-256 per tensor) and MODEL_CARD.md for people.
# Version rules: 1.0 first; new weights of the same architecture bump the minor number (1.1);
# a changed architecture starts a new major line (2.0), since old loading code would break.
# Registering weights identical to an existing version returns that version: a registry
# never holds two copies of one model under two numbers.
# The versions are trained on the CPU whatever --device says: CPU training is bit-for-bit
# repeatable, so section 6 can retrain from a record and get the recorded fingerprint back;
# on a GPU, some kernels are not (section 6), and the model card would promise too much.


def lesson_2_registry(run: Run, registry: ModelRegistry) -> tuple[dict, dict]:
    """Register 1.0, a fine-tune 1.1 and a wider 2.0; register 1.1's weights again.

    1.1 starts from 1.0's weights (its record says so in init_from and parent), which is
    how a lineage of fine-tunes stays traceable; 2.0 has another hidden width, so the
    rules give it a new major number. The last registration finds 1.1's fingerprint in the
    index and returns 1.1 instead of creating 1.2.
    """
    run.section("2. A registry: versions, metadata, a model card")
    small = {"class": "MLP", "kwargs": {"in_features": 20, "hidden": 32, "num_classes": 4,
                                        "dropout": 0.1}}
    wide = {"class": "MLP", "kwargs": {**small["kwargs"], "hidden": 64}}
    finetune = {**BASE_CONFIG, "lr": 1e-3, "epochs": 2, "seed": 1, "init_from": "1.0"}
    models = {}
    for version, config, architecture, parent in (("1.0", BASE_CONFIG, small, None),
                                                  ("1.1", finetune, small, "1.0"),
                                                  ("2.0", BASE_CONFIG, wide, "1.1")):
        init = models[parent].model.state_dict() if config["init_from"] else None
        model, history, data_fp = train_version(config, architecture, torch.device("cpu"),
                                                init)
        models[version] = registry.register(
            NAME, model, architecture=architecture, hyperparameters=config, history=history,
            data_fingerprint=data_fp, seed=config["seed"], parent=parent)
    again = registry.register(NAME, models["1.1"].model, architecture=small,
                              hyperparameters=finetune, history=[], data_fingerprint=data_fp,
                              seed=finetune["seed"], parent="1.0")
    for version, versioned in models.items():
        meta = versioned.metadata
        print(f"  {version}: parent {meta['parent']!s:<4} hidden "
              f"{meta['architecture']['kwargs']['hidden']:<3} val_acc "
              f"{meta['metrics']['val_accuracy']:.3f}  fingerprint "
              f"{meta['fingerprints']['content'][:12]}  signature "
              f"{meta['fingerprints']['signature'][:12]}")
    print(f"  registering 1.1's weights again returns version {again.metadata['version']}")
    card = registry.folder(NAME, "1.1") / VersionedModel.CARD
    print("  " + "\n  ".join(card.read_text().splitlines()[:6]))
    run.artifact("registry", registry.root)
    run.artifact("model_card", card)
    return models, {"versions": ", ".join(registry.versions(NAME)),
                    "duplicate_registration_version": again.metadata["version"]}


if in_notebook():
    models, figures = lesson_2_registry(run, registry)
    run.record_all(figures)


# %% 3. Aliases: production and staging
# Deployment code should not hard-code "1.1": it loads an alias, and promoting a model is
# moving the alias (MLflow replaced its fixed stages with such aliases). A rollback is moving
# it back. The alias lives in registry.json, rewritten atomically under the registry's lock,
# and an alias may only point at a version that exists.


def lesson_3_aliases(run: Run, registry: ModelRegistry) -> dict:
    """Point production and staging at versions, promote, and load by alias.

    The serving side only ever says load(NAME, "production"); which version that is, is
    decided in one place, and changing it is one atomic rewrite of registry.json.
    """
    run.section("3. Aliases: production and staging")
    registry.set_alias(NAME, "production", "1.0")
    registry.set_alias(NAME, "staging", "1.1")
    print(f"  aliases: {registry.aliases(NAME)}")
    registry.set_alias(NAME, "production", "1.1")  # promote
    registry.set_alias(NAME, "staging", "2.0")
    print(f"  after promoting 1.1 and staging 2.0: {registry.aliases(NAME)}")
    loaded = registry.load(NAME, "production", run.device)
    print(f"  load('production') -> version {loaded.metadata['version']}")
    return {"production_version": loaded.metadata["version"]}


if in_notebook():
    run.record_all(lesson_3_aliases(run, registry))


# %% 4. Integrity on every load
# VersionedModel.load verifies before it builds: metadata.json well-formed, the safetensors
# header's fingerprint equal to the recorded one (else the file belongs to another version),
# and the fingerprint recomputed from the bytes equal to it (else the weights were changed).
# The per-tensor hashes name exactly which tensors differ.
# The registry is hardened the same way as 02's manager. Every name read from registry.json
# or metadata.json (versions, aliases, the weights file) must be a plain name, so a hostile
# index cannot make a load read "../../secret" or a save write outside the root. Writes are
# atomic and fsync'd, and each register() runs under a cross-process lock, so two jobs that
# register at once get versions 1.0 and 1.1 instead of one erasing the other's folder.
# The fingerprints in metadata.json are computed from the tensors actually written.
# A whole folder replaced by a copy of another version is self-consistent; only registry.json,
# which records each version's fingerprint, catches it, so registry.load checks that too.
# A register killed between publishing its folder and updating registry.json leaves a folder
# without an entry; the next read or register adopts it if it verifies, or sets it aside.


def lesson_4_integrity(run: Run, registry: ModelRegistry) -> dict:
    """Flip one bit in a copy of 1.1's weights; swap in 1.0's weights; swap whole folders.

    The flipped bit still loads with safetensors (the file is well-formed); only the
    recomputed fingerprint notices, and the per-tensor hashes name the tensor. The swapped
    file is caught earlier, by the fingerprint its own header records; the swapped folder
    (a true copy of 1.1 under the name 1.0) only by registry.json's record for 1.0.
    """
    run.section("4. Integrity on every load")
    detected = []
    with run.scratch("tampered_copy") as tampered:
        shutil.copytree(registry.folder(NAME, "1.1"), tampered, dirs_exist_ok=True)
        weights = tampered / VersionedModel.WEIGHTS
        data = bytearray(weights.read_bytes())
        data[-3] ^= 0x01  # flip one bit in the last tensor's bytes; the file still loads
        weights.write_bytes(bytes(data))
        for attempt in ("flipped bit", "another version's weights"):
            if attempt == "another version's weights":
                shutil.copy(registry.folder(NAME, "1.0") / VersionedModel.WEIGHTS, weights)
            try:
                VersionedModel.load(tampered, build_model)
            except IntegrityError as err:
                detected.append(attempt)
                print(f"  IntegrityError: {str(err).replace(str(run.out_dir) + os.sep, '')}")
    with run.scratch("swapped_registry") as copy:
        shutil.copytree(registry.root, copy, dirs_exist_ok=True)
        shutil.rmtree(copy / NAME / "1.0")
        shutil.copytree(copy / NAME / "1.1", copy / NAME / "1.0")  # a real copy: nothing forged
        try:
            ModelRegistry(copy, build=build_model).load(NAME, "1.0")
        except IntegrityError as err:
            detected.append("swapped folder")
            print(f"  IntegrityError: {str(err).replace(str(run.out_dir) + os.sep, '')}")
    return {"tampering_detected": detected == ["flipped bit", "another version's weights",
                                               "swapped folder"]}


if in_notebook():
    run.record_all(lesson_4_integrity(run, registry))


# %% 5. Diff two versions
# Before promoting a version, look at what changed: hyperparameters, metrics, and per tensor
# whether and how much the weights moved. A fine-tune that changed nothing, or a tensor that
# should have been frozen but moved, shows up here; a reshaped tensor means a new design.


def lesson_5_diff(run: Run, models: dict[str, VersionedModel]) -> dict:
    """What changed from 1.0 to 1.1 (a fine-tune) and from 1.1 to 2.0 (a new design).

    A fine-tune moves every tensor a little (max |diff| per tensor, printed); a new design
    shows up as reshaped tensors, which no fine-tune can produce.
    """
    run.section("5. Diff two versions")
    diff = diff_versions(models["1.0"], models["1.1"])
    print(f"  1.0 -> 1.1 hyperparameters: {diff['hyperparameters']}")
    print("  1.0 -> 1.1 metrics: " + ", ".join(f"{k} {a:.4f} -> {b:.4f}"
                                                for k, (a, b) in diff["metrics"].items()))
    for key, change in diff["changed"].items():
        print(f"    {key:<14} changed, max |diff| = {change:.4g}")
    print(f"    unchanged tensors: {diff['unchanged'] or 'none'}")
    major = diff_versions(models["1.1"], models["2.0"])
    print(f"  1.1 -> 2.0 reshaped: {list(major['reshaped'])}")
    return {"diff_tensors_changed": len(diff["changed"]),
            "diff_tensors_reshaped_major": len(major["reshaped"])}


if in_notebook():
    run.record_all(lesson_5_diff(run, models))


# %% 6. Reproducibility: retrain from the record
# A version records everything that made it: config, seed, data fingerprint, environment,
# parent. Retraining from the record (on the same software, on the CPU) must give the same
# content fingerprint; if it does not, something unrecorded influenced training. On GPUs,
# some kernels are non-deterministic (atomic adds in backward passes, cuDNN's algorithm
# search); torch.use_deterministic_algorithms(True) plus torch.backends.cudnn.benchmark =
# False make a rerun repeatable on the same GPU model, driver and torch build (ops with no
# deterministic version then raise an error), but never across different GPUs or versions:
# that is why section 2 trains the versions, and this lesson retrains them, on the CPU.


def lesson_6_reproduce(run: Run, registry: ModelRegistry) -> dict:
    """Retrain 1.0 and 1.1 from their records alone; compare fingerprints.

    The record is all the retraining gets: config, seed, architecture and, for 1.1, the
    parent version to start from. "identical" means every byte of every tensor matches.
    """
    run.section("6. Reproducibility: retrain from the record")
    results = {}
    for version in ("1.0", "1.1"):
        record = registry.load(NAME, version).metadata
        config = record["hyperparameters"]
        init = None
        if config["init_from"]:
            init = registry.load(NAME, config["init_from"]).model.state_dict()
        model, _, data_fp = train_version(config, record["architecture"], torch.device("cpu"),
                                          init_state=init)
        fingerprint = content_fingerprint(model.state_dict())
        results[version] = fingerprint == record["fingerprints"]["content"]
        print(f"  retrained {version} on the CPU from its record: fingerprint {fingerprint[:12]}"
              f" vs recorded {record['fingerprints']['content'][:12]} -> "
              f"{'identical' if results[version] else 'DIFFERENT'}; data fingerprint "
              f"{'matches' if data_fp == record['environment']['data_fingerprint'] else 'differs'}")
    return {"reproduced_fingerprint_matches": all(results.values())}


if in_notebook():
    run.record_all(lesson_6_reproduce(run, registry))


# %% 7. Migrating old checkpoints: _version and _load_from_state_dict
# Renaming parameters breaks every old checkpoint ("Missing key(s): encoder.weight ...
# Unexpected key(s): fc1.weight"). torch's own modules solve this with a class attribute
# `_version`, saved per module in state_dict()._metadata, and an override of
# `_load_from_state_dict` that upgrades old keys. BatchNorm does exactly this for
# num_batches_tracked. RenamedMLP above is the recipe; safetensors drops _metadata, so the
# registry records module versions in metadata.json and restores them on load.


class RenamedWithoutMigration(nn.Module):
    """RenamedMLP's layers without its _load_from_state_dict: what breaks without it."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder, self.classifier = nn.Linear(20, 32), nn.Linear(32, 4)


def lesson_7_migration(run: Run) -> dict:
    """Load a LegacyMLP checkpoint into RenamedMLP, with and without the migration.

    The old checkpoint carries module version 1 (LegacyMLP has no _version, so torch
    records 1); RenamedMLP sees that number in _load_from_state_dict and renames the keys.
    """
    run.section("7. Migrating old checkpoints: _version and _load_from_state_dict")
    legacy = LegacyMLP()
    old_state = legacy.state_dict()
    print(f"  old checkpoint keys: {list(old_state)} (module version "
          f"{old_state._metadata['']['version']})")
    try:
        RenamedWithoutMigration().load_state_dict(old_state)
    except RuntimeError as err:
        print(f"  without migration: {' '.join(str(err).split())[:110]}...")
    migrated = RenamedMLP()
    migrated.load_state_dict(old_state)
    inputs = torch.randn(8, 20)
    diff = max_abs_diff(legacy(inputs), migrated(inputs))
    print(f"  RenamedMLP (version {RenamedMLP._version}) loads it: outputs max |diff| = {diff}")
    new_state = migrated.state_dict()
    print(f"  and saves the new names {list(new_state)} with version "
          f"{new_state._metadata['']['version']}, which load without renaming")
    RenamedMLP().load_state_dict(new_state)
    return {"migration_max_abs_diff": diff}


if in_notebook():
    run.record_all(lesson_7_migration(run))


# %% 8. Verify a saved version from the command line
# `python 03_model_versioning.py --verify PATH` runs the same checks as a load, prints one
# line and exits 0 (OK) or 1 (what is wrong), with no traceback: fit for CI and deploy
# scripts, which should check the exact files they are about to ship.


def index_entry(folder: Path) -> dict | None:
    """What the registry.json beside ``folder`` records for it (None: no registry.json).

    A version folder inside a registry is checked against the index as well: a folder
    replaced by a copy of another version verifies on its own, and only the index says
    which version belongs under this name.
    """
    store = RegistryStore(folder.parent, folder.parent.name)
    if not os.path.lexists(store.path):
        return None
    info = store.read()["versions"].get(folder.name)
    if info is None:
        raise IntegrityError(f"{store.path}: has no version {folder.name!r:.40}")
    return {"name": folder.parent.name, "version": folder.name, "content": info["content"],
            "source": store.path}


def verify_cli(path: str) -> int:
    """The --verify command: one line and an exit code, never a traceback."""
    try:
        folder = Path(path).parent if Path(path).suffix == ".safetensors" else Path(path)
        expected = index_entry(folder)
        metadata, _ = verify_version(path, expected)
    except IntegrityError as err:
        print(f"FAILED: {' '.join(str(err).split())}")
        return 1
    except Exception as err:  # noqa: BLE001 - anything unexpected is still one line
        print(f"FAILED: {path}: {type(err).__name__}: {' '.join(str(err).split())}")
        return 1
    against = "registry.json and its own record" if expected else "its own record"
    print(f"OK: {path}: {metadata['name']} {metadata['version']}, content fingerprint "
          f"{metadata['fingerprints']['content'][:16]} matches {against}")
    return 0


def lesson_8_verify(run: Run, registry: ModelRegistry) -> dict:
    """Run this script's --verify on the production version, in a child process.

    A child process, because that is how CI or a deploy script uses it: the exit code is
    the answer, and the one printed line is the explanation.
    """
    run.section("8. Verify a saved version from the command line")
    folder = registry.folder(NAME, registry.resolve(NAME, "production"))
    print(f"  $ python {HERE.name} --verify {folder}")
    completed = subprocess.run([sys.executable, str(HERE), "--verify", str(folder)],
                               capture_output=True, text=True, check=False)
    print(f"  {completed.stdout.strip()}  (exit {completed.returncode})")
    run.artifact("released_version", folder)
    return {"verify_exit_code": completed.returncode}


if in_notebook():
    run.record_all(lesson_8_verify(run, registry))


# %% Summary
# What the run measured, the files it wrote (also in summary.json), and what to try next.
RECAP = [
    "identify weights by a content fingerprint (keys, dtypes, shapes, bytes), not by "
    "the .pt file's hash; identify designs by an architecture signature",
    "a version = immutable folder: safetensors + metadata.json + model card; aliases "
    "move, versions do not",
    "verify fingerprints on every load; record config + seed + data fingerprint to "
    "reproduce; migrate renamed parameters with _version",
]
TRY_IT = ("edit a number in a version's metadata.json or flip a byte in its "
          "model.safetensors, then run --verify on it; next, 04_onnx_export.py")

if in_notebook():
    summary = run.finish(RECAP, TRY_IT)


def main(argv: list[str] | None = None) -> dict:
    """Run every lesson in order and return the summary (also written to summary.json)."""
    run, registry = setup(argv)
    run.record_all(lesson_1_fingerprints(run))
    run.record_all(lesson_1b_what_changes(run))
    models, figures = lesson_2_registry(run, registry)
    run.record_all(figures)
    run.record_all(lesson_3_aliases(run, registry))
    run.record_all(lesson_4_integrity(run, registry))
    run.record_all(lesson_5_diff(run, models))
    run.record_all(lesson_6_reproduce(run, registry))
    run.record_all(lesson_7_migration(run))
    run.record_all(lesson_8_verify(run, registry))
    return run.finish(RECAP, TRY_IT)


if __name__ == "__main__" and not in_notebook():
    main()
