"""01 · Saving and loading basics — save, reload and move any PyTorch model safely and exactly.

What you will learn (each section runs real code and prints the measured figure):
  1.  What a state_dict holds: parameters, buffers, and the optimizer's state and param_groups
  2.  Method 1, pickling the whole model: what the file holds, and safe_globals instead of
      weights_only=False
  2b. Why a pickled model breaks when its class moves
  3.  Method 2, the state_dict (recommended): save, rebuild, load, eval(), identical outputs
  4.  Method 3, a general training checkpoint, and resuming from it exactly
  4b. Several models in one file
  5.  Pitfall: state_dict() returns references
  5b. Pitfall: a view saves its whole storage
  5c. Pitfall: strict=False still checks shapes
  6.  Devices: map_location, a CUDA checkpoint on a CPU-only machine
  6b. Optimizer state follows the parameters it manages
  7.  Security: weights_only=True, a malicious pickle, and the torch versions to avoid
  7b. Allow-listing your own types
  8.  safetensors: the format that cannot run code
  9.  Big checkpoints: mmap=True + the meta device + assign=True, in fresh processes
  9b. Two traps of meta + assign=True: the optimizer, and non-persistent buffers
  10. File sizes: fp32 vs fp16/bf16, weights only vs weights + Adam state
  11. train() vs eval(), no_grad vs inference_mode
  12. Bad input: clear errors for missing, truncated, foreign and mismatched files
  13. Files you did not write: --inspect, exactly the globals a file needs, convert it once
  13b. A whole pickled model you trust: convert it to safetensors in a child process
  13c. Tied weights: safetensors' save_model / load_model where save_file refuses
  13d. Sharded safetensors with a model.safetensors.index.json
  13e. TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD, and TORCH_FORCE_WEIGHTS_ONLY_LOAD
  13f. Non-persistent buffers: why they are not in the state_dict

Run it:   python 01_basic_save_load.py [--device cpu|cuda] [--out-dir DIR] [--seed N]
          python 01_basic_save_load.py --inspect PATH   describes any checkpoint (torch.save
          zip or legacy, .safetensors, a sharded folder or its index.json, a DCP folder)
          without running code from it, writes nothing, and exits 0 (loads as it is),
          1 (needs globals: it prints them and the safe_globals line) or 2 (unreadable).
          As a notebook: run the cells top to bottom from the project folder (jupytext,
          VS Code, PyCharm); flags go in the LESSON_ARGS environment variable.
Takes:    about 11 s on a 2-core CPU (three child processes; two load a ~270 MB file).
Next:     02_checkpoint_manager.py, checkpoints that survive crashes and resume bit-exactly.

Files it writes (in --out-dir): the files each section names as it writes them (a whole
pickled model, a state_dict, a training checkpoint, a two-model checkpoint, a file tagged
cuda:0, a safetensors file), security/ (a malicious checkpoint, kept so you can inspect it
yourself; never load it with weights_only=False), bad_input/ (the six bad files of section
12), foreign/ (section 13's downloaded-style files and what they were converted into) and
summary.json. The big checkpoint of section 9 and the other throw-away files live
in scratch folders that are removed when their section ends.

The reusable pieces below (load_checkpoint, check_state_dict_fits, load_weights) are what a
reader copies into a project: a loader whose every failure is one line naming the file and
the cause, and that never changes the model unless the whole checkpoint fits. Then
save/load_sharded_safetensors, and inspect_checkpoint with its InspectingUnpickler: the
--inspect command, for files whose origin you do not control.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import pickle
import re
import subprocess
import sys
import types
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from common.compare import max_abs_diff
from common.data import make_image_classification, make_loaders
from common.models import MLP, SmallCNN
from common.run import Run, format_bytes, in_notebook, lesson_argv, make_parser, script_file
from common.timing import benchmark
from common.training import (
    capture_rng_state,
    restore_rng_state,
    train_demo_model,
    train_one_epoch,
)

HERE = script_file(globals(), "01_basic_save_load.py")  # a notebook kernel has no __file__

# ############################################################################################
# Reusable pieces: copy these into your own code.
# ############################################################################################


class CheckpointLoadError(RuntimeError):
    """A checkpoint could not be loaded; the message names the file and the cause."""


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with errors a person can act on.

    torch's errors for a file that is not a checkpoint are arbitrary: the unpickler reads the
    first bytes as opcodes, so the error depends on them (a text starting with "h" gives
    ``KeyError`` with the code of its 2nd character, "hello" gives ``KeyError: 101``; many
    letters give ``IndexError``, "U" or "X" ``EOFError``, most others ``UnpicklingError``); an
    empty file gives a bare ``EOFError``, a truncated one a zip-reader error. This wrapper
    names the file and says what is wrong. It only reads; it never modifies or deletes anything.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointLoadError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointLoadError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise CheckpointLoadError(f"{path}: the file is empty (0 bytes); was the save interrupted?")
    with path.open("rb") as handle:
        starts_like_zip = handle.read(4) == b"PK\x03\x04"
    if starts_like_zip and not zipfile.is_zipfile(path):
        # torch.save writes a zip archive whose directory sits at the END of the file, so a
        # file cut short (full disk, killed process, partial download) loses it first.
        raise CheckpointLoadError(
            f"{path}: truncated or corrupted: it starts like a torch.save archive but its end "
            f"is missing ({path.stat().st_size} bytes on disk); was the save or copy interrupted?"
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except RuntimeError as err:
        if "central directory" in str(err) or "PytorchStreamReader" in str(err):
            raise CheckpointLoadError(
                f"{path}: truncated or corrupted (the zip archive torch.save writes is incomplete; "
                f"{path.stat().st_size} bytes on disk)"
            ) from err
        raise CheckpointLoadError(f"{path}: {first_line(err)}") from err
    except Exception as err:  # UnpicklingError, KeyError, EOFError, ... from a foreign file
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if unsafe:
            raise CheckpointLoadError(
                f"{path}: refused by weights_only=True: it references {unsafe.group(1)}, which "
                "can run code when unpickled; load it only if you trust where it came from"
            ) from err
        raise CheckpointLoadError(
            f"{path}: not a PyTorch checkpoint (torch.load failed with "
            f"{type(err).__name__}: {first_line(err)})"
        ) from err


def check_state_dict_fits(model: nn.Module, state_dict: Mapping[str, Any], source: str) -> None:
    """Raise ``CheckpointLoadError`` if ``model.load_state_dict(state_dict)`` would fail.

    Call it before ``model.load_state_dict``: nothing is copied into ``model`` unless
    everything fits, so a failed load leaves it exactly as it was. The trial load runs on a
    twin of the model whose tensors live on the ``meta`` device (shapes only, no memory), with
    ``assign=True``, so the module's OWN loading code decides: migrations in
    ``_load_from_state_dict`` (see 03 section 7), ``get_extra_state``/``set_extra_state``,
    load hooks. Whatever a strict ``load_state_dict`` accepts passes; the error lists the
    missing, unexpected and mis-shaped keys.
    """
    memo: dict[int, Any] = {}  # deepcopy's memo: each real tensor maps to a meta stand-in
    for tensor in [*model.parameters(), *model.buffers()]:
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = (nn.Parameter(meta, requires_grad=tensor.requires_grad)
                            if isinstance(tensor, nn.Parameter) else meta)
    twin = copy.deepcopy(model, memo)
    try:
        twin.load_state_dict(state_dict, strict=True, assign=True)
        return
    except RuntimeError as err:
        torch_error = err
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = [
        f"{k} {tuple(state_dict[k].shape)} != model {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and isinstance(state_dict[k], torch.Tensor)
        and isinstance(expected[k], torch.Tensor)
        and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    problems = [
        f"{label} ({len(keys)}): {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
        for label, keys in (("missing", missing), ("unexpected", unexpected),
                            ("mis-shaped", misshaped))
        if keys
    ] or [" ".join(str(torch_error).split())[:300]]
    raise CheckpointLoadError(
        f"{source}: does not fit {type(model).__name__}; " + "; ".join(problems)
    ) from torch_error


def load_weights(model: nn.Module, path: str | Path, map_location: Any = "cpu") -> nn.Module:
    """Load a state_dict file (or a checkpoint dict with a ``"model"`` key) into ``model``.

    Every failure is a ``CheckpointLoadError`` naming the file and the cause. The steps are
    the three ways a load goes wrong, in order: the file (missing, empty, truncated, not a
    checkpoint, refused by weights_only), its content (not a state_dict), and the fit (keys
    and shapes, checked on a meta twin before anything is copied into ``model``).
    """
    loaded = load_checkpoint(path, map_location)
    state_dict = loaded.get("model", loaded) if isinstance(loaded, dict) else loaded
    if not isinstance(state_dict, Mapping) or not all(  # "_extra_state" may hold anything
        isinstance(v, torch.Tensor) or str(k).endswith("_extra_state")
        for k, v in state_dict.items()
    ):
        raise CheckpointLoadError(f"{path}: holds a {type(loaded).__name__}, not a state_dict")
    check_state_dict_fits(model, state_dict, str(path))
    model.load_state_dict(state_dict)
    return model


def first_line(err: BaseException) -> str:
    """The one line of an exception message that matters (ANSI colour codes removed).

    torch's messages often run to a dozen lines of advice; a log line or a CLI error wants
    the first, which says what happened.
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()
    return text.splitlines()[0] if text else type(err).__name__


def save_sharded_safetensors(state_dict: Mapping[str, torch.Tensor], folder: str | Path,
                             max_shard_bytes: int = 5_000_000_000) -> Path:
    """Write ``state_dict`` as Hugging Face's sharded layout; return the index file's path.

    Shards ``model-00001-of-0000N.safetensors`` (a new one when the next tensor would pass
    ``max_shard_bytes``) and ``model.safetensors.index.json``:
    ``{"metadata": {"total_size": bytes}, "weight_map": {tensor name: shard file}}``.
    """
    # Tensors go into shards in state_dict order, so a layer's weights stay together and a
    # loader that streams shards sees them in the order the model declares them.
    folder = Path(folder)
    shards: list[dict[str, torch.Tensor]] = [{}]
    for name, tensor in state_dict.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and sum(t.numel() * t.element_size() for t in shards[-1].values()
                              ) + size > max_shard_bytes:
            shards.append({})
        shards[-1][name] = tensor.detach().cpu().contiguous()
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / file)
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in state_dict.values())
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                indent=2) + "\n")
    return index


def load_sharded_safetensors(index: str | Path) -> dict[str, torch.Tensor]:
    """Read a sharded safetensors checkpoint through its index file, checked.

    Every shard the index names must be a plain file name in the index's folder (an index is
    data, and "../x" would reach elsewhere), and every tensor it lists must be in its shard.
    """
    index = Path(index)
    weight_map = json.loads(index.read_text())["weight_map"]
    state: dict[str, torch.Tensor] = {}
    for file in sorted(set(weight_map.values())):
        if not isinstance(file, str) or Path(file).name != file or file in (".", ".."):
            raise CheckpointLoadError(f"{index}: refuses the shard name {file!r}: only plain "
                                      "file names in the index's folder")
        state.update(load_file(index.parent / file))
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise CheckpointLoadError(f"{index}: {len(missing)} tensors are missing from their "
                                  f"shards: {', '.join(missing[:4])}")
    return {name: state[name] for name in weight_map}


# ---- Inspecting a file you did not write (`python 01_basic_save_load.py --inspect PATH`) ----

# Why an inspector at all: torch.load(weights_only=True) refuses a file at the FIRST global
# it does not allow, so fixing a download one "Unsupported global" at a time, by allowing
# whatever the error names next, ends with an allow-list nobody reviewed. Listing every
# global up front, and flagging the dangerous ones, lets a person decide once.
# Globals that hand a pickle the power to run code or touch the system: allowing one of
# them in safe_globals is allowing the file to do anything.
CAN_RUN_CODE = re.compile(
    r"^(builtins\.(exec|eval|compile|__import__|getattr|setattr|open|breakpoint|input)"
    r"|(os|posix|nt|subprocess|shutil|sys|runpy|importlib|pickle|marshal|ctypes|socket|"
    r"code|pty|webbrowser|multiprocessing)(\.|$))")


class _Stub:
    """What the inspecting unpickler builds instead of calling a global: a record of the
    global's name and the arguments and state the pickle gave it. Nothing is imported."""

    global_name = "?"

    def __new__(cls, *args: Any) -> _Stub:  # REDUCE calls cls(*args), NEWOBJ cls.__new__
        stub = super().__new__(cls)
        stub.args, stub.state, stub.items = args, None, {}
        return stub

    def __setstate__(self, state: Any) -> None:  # pickle's BUILD
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.global_name}>"

    def __setitem__(self, key: Any, value: Any) -> None:  # SETITEM(S) on a dict subclass
        self.items[key] = value

    def append(self, value: Any) -> None:  # APPEND(S) on a list subclass
        self.items[len(self.items)] = value

    def extend(self, values: Any) -> None:
        for value in values:
            self.append(value)


class _DtypeStub(_Stub):
    """The stub of ``numpy.dtype``: also notes the dtype code it was called with."""

    codes: set[str] = set()

    def __new__(cls, *args: Any) -> _Stub:
        if args and isinstance(args[0], str):
            cls.codes.add(args[0])
        return super().__new__(cls, *args)


class InspectingUnpickler(pickle.Unpickler):
    """Reads a torch.save pickle without running anything from it.

    ``find_class`` (the only way a pickle reaches code) returns a fresh _Stub subclass named
    after the global instead of importing it, and records the name; storages (torch.save's
    "persistent ids") become plain tuples. So the structure, the tensors' shapes and dtypes
    and every global the file references come out, and no code of the file ever runs.
    """

    def __init__(self, handle: Any) -> None:
        super().__init__(handle)
        self.globals: list[str] = []
        self.dtype_codes: set[str] = set()  # arguments of numpy.dtype(...), see below

    def find_class(self, module: str, name: str) -> type:
        # Protocol 2 pickles (torch.save's) may use Python 2's module names.
        module = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)
        full = f"{module}.{name}"
        if full not in self.globals:
            self.globals.append(full)
        if full == "numpy.dtype":  # records its argument ("f8"): see numpy_dtype_classes
            return type(name, (_DtypeStub,), {"global_name": full, "codes": self.dtype_codes})
        return type(name, (_Stub,), {"global_name": full})

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and pid and pid[0] == "module":  # legacy: a module class
            return pid[1]
        return ("storage", *pid[1:]) if isinstance(pid, tuple) else ("storage", pid)


def numpy_dtype_classes(unpickler: InspectingUnpickler) -> list[str]:
    """The NumPy 2 dtype classes a file needs besides ``numpy.dtype`` itself.

    ``numpy.dtype("f8")`` returns an instance of ``numpy.dtypes.Float64DType``, and
    weights_only=True refuses to build it unless that class is allowed too; the class never
    appears in the pickle, so get_unsafe_globals_in_checkpoint cannot list it. (Parsing the
    dtype string is data parsing: nothing of the file runs.)
    """
    import numpy as np

    return sorted({f"numpy.dtypes.{type(np.dtype(code)).__name__}"
                   for code in unpickler.dtype_codes if re.fullmatch(r"[<>|=]?[a-zA-Z]\d*", code)})


def _tensor_info(stub: _Stub) -> tuple[tuple, str] | None:
    """(shape, dtype) of a stub that torch.load would turn into a tensor, else None.

    How torch.save pickles a tensor: a call ``torch._utils._rebuild_tensor_v2(storage,
    offset, size, stride, requires_grad, hooks)``, where ``storage`` is a persistent id
    ``("storage", torch.FloatStorage, key, location, numel)`` naming a separate record (the
    file ``archive/data/<key>`` in the zip). A Parameter wraps that in
    ``torch._utils._rebuild_parameter(tensor, requires_grad, hooks)``. So the shape is the
    third argument, and the dtype is in the storage class's name: no byte of data is read.
    """
    if stub.global_name.endswith("_rebuild_parameter") and stub.args:
        inner = stub.args[0]
        return _tensor_info(inner) if isinstance(inner, _Stub) else None
    if not stub.global_name.startswith("torch._utils._rebuild_tensor") or len(stub.args) < 3:
        return None
    storage, shape = stub.args[0], stub.args[2]
    kind = storage[1] if isinstance(storage, tuple) and len(storage) > 1 else None
    name = kind.global_name.rsplit(".", 1)[-1] if isinstance(kind, type) else "?"
    return tuple(shape), STORAGE_DTYPES.get(name.removesuffix("Storage"), name)


def _walk(obj: Any, prefix: str, tensors: list, entries: list) -> None:
    """Collect ``(name, shape, dtype)`` of tensors and ``(name, summary)`` of other values.

    Names are the dotted paths a reader would type: ``state_dict.backbone.0.weight`` for a
    tensor inside a Lightning checkpoint's "state_dict". A pickled module keeps its tensors
    in ``_parameters`` / ``_buffers`` of each sub-module; those levels are left out of the
    names, so they read like the module's own state_dict keys.
    """
    if isinstance(obj, _Stub):
        info = _tensor_info(obj)
        if info is not None:
            tensors.append((prefix, *info))
            return
        if obj.items:  # an OrderedDict or another dict/list subclass
            for key, value in obj.items.items():
                _walk(value, f"{prefix}.{key}" if prefix else str(key), tensors, entries)
            return
        if isinstance(obj.state, dict) and "_parameters" in obj.state:  # a pickled nn.Module
            if "." not in prefix:  # the top module only, not each sub-module
                entries.append((prefix, f"a pickled {obj.global_name}"))
            for part in ("_parameters", "_buffers", "_modules"):
                _walk(obj.state.get(part) or {}, prefix, tensors, entries)
            return
        detail = obj.state if obj.state is not None else obj.args
        entries.append((prefix, f"{obj.global_name} {_short(detail)}"))
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _walk(value, f"{prefix}.{key}" if prefix else str(key), tensors, entries)
    elif isinstance(obj, (list, tuple)) and any(isinstance(v, (_Stub, dict)) for v in obj):
        for index, value in enumerate(obj):
            _walk(value, f"{prefix}.{index}" if prefix else str(index), tensors, entries)
    else:
        entries.append((prefix, _short(obj)))


def _short(value: Any) -> str:
    """A value as one short line: a stub as ``<its global>``, class reprs as their names,
    anything longer than 70 characters cut (a pickle can carry megabytes of text)."""
    text = repr(value) if not isinstance(value, _Stub) else f"<{value.global_name}>"
    text = re.sub(r"<class '[^']*\.(\w+)'>", r"\1", text)
    return text if len(text) <= 70 else text[:67] + "..."


@dataclasses.dataclass
class Inspection:
    """What --inspect found: the format, tensors, other entries, globals, and a verdict.

    ``status``: 0 = loads with ``weights_only=True`` as it is; 1 = needs globals allowed
    (``needs``; ``dangerous`` are those that can run code); 2 = not readable (``problem``).
    """

    path: Path
    kind: str = "unknown"
    reader: str = "torch.load(path, map_location=\"cpu\", weights_only=True)"
    tensors: list = dataclasses.field(default_factory=list)
    entries: list = dataclasses.field(default_factory=list)
    globals: list = dataclasses.field(default_factory=list)
    needs: list = dataclasses.field(default_factory=list)
    dangerous: list = dataclasses.field(default_factory=list)
    problem: str = ""
    status: int = 0


def inspect_checkpoint(path: str | Path) -> Inspection:
    """Describe any checkpoint file or folder WITHOUT running code from it (see Inspection).

    torch.save zip files and legacy (pre-1.6, non-zip) torch.save files, .safetensors
    files, a sharded safetensors folder or its model.safetensors.index.json, and a DCP
    folder (.metadata). Never raises for a bad input: the problem goes in the result.
    """
    report = Inspection(Path(path))
    try:
        _inspect_into(report)
    except Exception as err:  # any unreadable input: one line, never a traceback
        report.status, report.problem = 2, report.problem or f"{type(err).__name__}: " \
                                                              f"{first_line(err)}"
    report.dangerous = [name for name in report.needs if CAN_RUN_CODE.match(name)]
    return report


def _inspect_into(report: Inspection) -> None:
    """Tell the format by its first bytes (never by the file name, which anyone can choose).

    ``PK\x03\x04`` starts a zip archive (torch.save since 1.6); a safetensors file starts
    with the length of its JSON header as 8 little-endian bytes (a small number, less than
    the file's size); ``\x80`` starts a pickle of protocol 2 or more (legacy torch.save).
    """
    path = report.path
    if path.is_dir():
        if (path / ".metadata").is_file():
            return _inspect_dcp(report)
        index = sorted(path.glob("*.safetensors.index.json"))
        if index:
            report.path = index[0]
            return _inspect_sharded(report)
        raise ValueError("a folder with neither a DCP .metadata file nor a "
                         "*.safetensors.index.json")
    if not path.is_file():
        raise FileNotFoundError("no such file or folder")
    if path.name.endswith(".index.json"):
        return _inspect_sharded(report)
    size = path.stat().st_size
    if size == 0:
        raise ValueError("the file is empty (0 bytes); was the save interrupted?")
    with path.open("rb") as handle:
        head = handle.read(8)
    if head[:4] == b"PK\x03\x04":
        return _inspect_torch_zip(report)
    if int.from_bytes(head, "little") + 8 < size and head[:1] != b"\x80":
        return _inspect_safetensors(report)  # an 8-byte header length, then JSON
    if head[:1] == b"\x80":  # a pickle (protocol 2+): the legacy torch.save format
        return _inspect_legacy(report)
    hint = "; the name says ONNX: read it with onnx.load (04)" if path.suffix == ".onnx" else ""
    raise ValueError(f"not a checkpoint format this knows (starts with {head[:4]!r}){hint}")


def _inspect_torch_zip(report: Inspection) -> None:
    """A torch.save archive: ``<name>/data.pkl`` holds the pickle, ``<name>/data/<key>``
    the raw storages. The pickle is read with the inspecting unpickler; the verdict comes
    from torch's own get_unsafe_globals_in_checkpoint, and a file that passes it is opened
    once with weights_only=True (mmap: the data is mapped, not read) to prove it loads."""
    report.kind = "torch.save zip archive"
    if not zipfile.is_zipfile(report.path):
        raise ValueError("truncated or corrupted: it starts like a torch.save archive but its "
                         "end (the zip directory) is missing")
    with zipfile.ZipFile(report.path) as archive:
        names = archive.namelist()
        # Three kinds of zip end in .pt or .pt2, and only one is a checkpoint. A TorchScript
        # archive (constants.pkl, code/) and a torch.export / AOTInductor package
        # (archive_format) hold programs: say which loader opens them, instead of the
        # obscure error torch.load would give. Decided by the members, never by the name.
        if any(n.endswith("/archive_format") for n in names):
            raise ValueError("a .pt2 package (torch.export.save or AOTInductor), not a "
                             "checkpoint: open it with torch.export.load or "
                             "torch._inductor.aoti_load_package (05 sections 3-4)")
        if any(n.endswith("/constants.pkl") for n in names):
            raise ValueError("a TorchScript archive (torch.jit.save), not a torch.save "
                             "checkpoint: open it with torch.jit.load (05 section 2)")
        pickles = [n for n in names if n.endswith("/data.pkl")]
        if not pickles:
            raise ValueError("a zip file, but not a torch.save archive (no data.pkl)")
        with archive.open(min(pickles, key=len)) as handle:
            unpickler = InspectingUnpickler(handle)
            _walk(unpickler.load(), "", report.tensors, report.entries)
    report.globals = unpickler.globals
    # The library's own check: the globals weights_only=True would refuse.
    report.needs = torch.serialization.get_unsafe_globals_in_checkpoint(report.path)
    if report.needs:
        report.needs += numpy_dtype_classes(unpickler)
        report.status = 1
        return
    torch.load(report.path, map_location="cpu", weights_only=True, mmap=True)  # no data read


def _inspect_legacy(report: Inspection) -> None:
    """The pre-zip format: magic number, protocol, system info, then the object's pickle.

    get_unsafe_globals_in_checkpoint only takes zip files (a ValueError here), so the
    globals come from the inspecting unpickler and are compared with weights_only's list.
    """
    report.kind = "legacy torch.save file (pre-zip, before torch 1.6)"
    with report.path.open("rb") as handle:
        unpickler = InspectingUnpickler(handle)
        if unpickler.load() != 0x1950A86A20F9469CFC6C:  # torch's legacy magic number
            raise ValueError("a pickle, but not a torch.save file (no torch magic number)")
        unpickler.load(), unpickler.load()  # protocol version, system info
        _walk(unpickler.load(), "", report.tensors, report.entries)
    report.globals = unpickler.globals
    from torch._weights_only_unpickler import _get_allowed_globals  # its allow-list

    # weights_only's allow-list (torch keeps it in a private module: there is no public
    # function for it) plus whatever this process has allowed with add_safe_globals.
    allowed = set(_get_allowed_globals()) | {
        f"{obj.__module__}.{obj.__qualname__}" for obj in
        torch.serialization.get_safe_globals() if hasattr(obj, "__qualname__")}
    report.needs = [name for name in report.globals if name not in allowed]
    if report.needs:
        report.needs += numpy_dtype_classes(unpickler)
        report.status = 1
        return
    torch.load(report.path, map_location="cpu", weights_only=True)


def _inspect_safetensors(report: Inspection) -> None:
    report.kind = "safetensors (no code possible: a JSON header and raw tensor bytes)"
    report.reader = "safetensors.torch.load_file(path)"
    with safe_open(report.path, framework="pt") as handle:
        for name in handle.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
            view = handle.get_slice(name)
            code = view.get_dtype()
            report.tensors.append((name, tuple(view.get_shape()),
                                   SAFETENSORS_DTYPES.get(code, code.lower())))
        report.entries = sorted((handle.metadata() or {}).items())


def _inspect_sharded(report: Inspection) -> None:
    """A model.safetensors.index.json and the shard files it names (in its folder)."""
    # The index and the shard names come from whoever published the files: each shard must
    # be a plain name in the index's folder, and the shards must hold exactly the tensors
    # the index lists (a tensor in no shard is a broken download, not a smaller model).
    report.kind = "sharded safetensors (an index file and its shards)"
    report.reader = "each shard with safetensors.torch.load_file (see 01 section 13d)"
    index = json.loads(report.path.read_text())
    weight_map = index["weight_map"]
    folder = report.path.parent
    for shard in sorted(set(weight_map.values())):
        if Path(shard).name != shard or shard in (".", ".."):
            raise ValueError(f"the index names {shard!r}, not a plain file name in {folder}")
        if not (folder / shard).is_file():
            raise ValueError(f"the index names {shard}, which is missing")
        part = Inspection(folder / shard)
        _inspect_safetensors(part)
        report.tensors += part.tensors
    listed = {name for name, *_ in report.tensors}
    if listed != set(weight_map):
        raise ValueError(f"the index and the shards disagree on {len(listed ^ set(weight_map))}"
                         " tensor names")
    report.entries = sorted((index.get("metadata") or {}).items())


def _inspect_dcp(report: Inspection) -> None:
    """A torch.distributed.checkpoint folder. Its .metadata file is a PLAIN pickle, which
    DCP's own reader loads with pickle.load: a hostile folder runs code there. So the
    inspecting unpickler reads it first; only DCP's, torch's and pathlib's names pass."""
    report.kind = "torch.distributed.checkpoint (DCP) folder"
    report.reader = ("torch.distributed.checkpoint.load (its .metadata references only "
                     "DCP's, torch's and pathlib's names)")
    with (report.path / ".metadata").open("rb") as handle:
        unpickler = InspectingUnpickler(handle)
        unpickler.load()
    report.globals = unpickler.globals
    report.needs = [name for name in report.globals if not (
        name.startswith("torch.distributed.checkpoint.") or name in DCP_GLOBALS
        or isinstance(getattr(torch, name.removeprefix("torch."), None), torch.dtype))]
    if report.needs:
        report.status = 1
        return
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    # Only now, with every name the pickle uses checked, is DCP's own reader called: it
    # unpickles .metadata with the plain pickle module (no weights_only there).
    for name, item in FileSystemReader(report.path).read_metadata().state_dict_metadata.items():
        if isinstance(item, TensorStorageMetadata):
            dtype = str(item.properties.dtype).removeprefix("torch.")
            report.tensors.append((name, tuple(item.size), dtype))
        else:
            report.entries.append((name, "a non-tensor value (pickled bytes)"))


DCP_GLOBALS = {"torch.Size", "torch.serialization._get_layout", "pathlib.PosixPath",
               "pathlib.WindowsPath", "collections.OrderedDict"}


def safe_globals_line(names: list[str]) -> str:
    # torch.serialization.safe_globals([...]) takes the objects themselves (an import is
    # needed) or (object, "name as the file spells it") pairs: the pair form is how a file
    # that names a module which has since moved (numpy.core -> numpy._core) is allowed.
    """The line that allows exactly ``names`` for one load (NumPy 1's numpy.core.* names
    need the tuple form under NumPy 2, which renamed the module numpy._core)."""
    items = []
    for name in names:
        module, _, attribute = name.rpartition(".")
        if module.startswith("numpy.core"):
            items.append(f"({module.replace('numpy.core', 'numpy._core')}.{attribute}, "
                         f"{name!r})")
        else:
            items.append(name)
    modules = sorted({name.split(".")[0] for name in names})
    return (f"import {', '.join(modules)}\n"
            "with torch.serialization.safe_globals([" + ", ".join(items) + "]):\n"
            "    torch.load(path, map_location=\"cpu\", weights_only=True)")


def print_inspection(report: Inspection, limit: int = 40) -> None:
    """The report, as --inspect prints it (one line when the input is not readable).

    Read it top down: what the file is, its tensors (name, shape, dtype) and their total
    size, the other entries (an epoch, hyper-parameters, library versions: what a pickle
    can carry besides tensors), every global the pickle references, and the verdict. A
    global in the verdict is a function or class that torch.load would CALL while loading;
    the question for each is "can calling it with arguments of the file's choosing do harm?"
    For a class that only stores values (argparse.Namespace, NumPy's dtype) the answer is
    no; for os.system, exec or getattr it is yes, and then no allow-list makes it safe.
    """
    if report.status == 2:
        print(f"{report.path}: not readable as a checkpoint: {report.problem}")
        return
    print(f"{report.path}: {report.kind}")
    for name, shape, dtype in report.tensors[:limit]:
        print(f"  tensor {name:<40} {str(list(shape)):<18} {dtype}")
    total = sum(math.prod(shape) * getattr(getattr(torch, dtype, None), "itemsize", 0)
                for _, shape, dtype in report.tensors)
    if len(report.tensors) > limit:
        print(f"  ... and {len(report.tensors) - limit} more tensors")
    print(f"  {len(report.tensors)} tensors, {total / 1e6:.2f} MB")
    for name, summary in report.entries[:limit]:
        print(f"  entry  {name:<40} {summary}")
    if report.globals:
        print(f"  globals the pickle references: {', '.join(report.globals)}")
    if report.status == 0:
        print(f"verdict: loads as it is with {report.reader}")
    elif report.status == 1:
        print(f"verdict: weights_only=True refuses it; it needs {', '.join(report.needs)}")
        if report.dangerous:
            print(f"WARNING: {', '.join(report.dangerous)} can run code: do NOT allow them; "
                  "this file may be malicious. Load it only if you trust where it came from")
        else:
            print("to allow exactly these, for this one load:\n" + safe_globals_line(report.needs))



# Storage class names (legacy and zip pickles) and safetensors' dtype codes -> torch names.
STORAGE_DTYPES = {"Float": "float32", "Double": "float64", "Half": "float16",
                  "BFloat16": "bfloat16", "Long": "int64", "Int": "int32", "Short": "int16",
                  "Char": "int8", "Byte": "uint8", "Bool": "bool", "ComplexFloat": "complex64",
                  "ComplexDouble": "complex128"}
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                      "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
                      "U8": "uint8", "BOOL": "bool"}


class MaliciousPayload:
    """A pickle payload that runs code on ``torch.load(..., weights_only=False)``.

    ``__reduce__`` tells pickle "to rebuild me, call ``exec(source)``". Here the code only writes
    a marker file, so you can see that it ran; a real attacker's code would do anything you can.
    """

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('the payload ran')",))


@dataclasses.dataclass
class TrainingConfig:
    """A custom type inside a checkpoint: weights_only=True refuses it until allow-listed."""

    learning_rate: float = 1e-3
    epochs: int = 3


_SAVE_AS_CUDA = False


@contextlib.contextmanager
def saved_as_if_on_cuda() -> Iterator[None]:
    """Inside this block, ``torch.save`` labels every storage ``cuda:0`` as a GPU run would.

    torch.save records each storage's device as a string tag chosen by the "location taggers"
    of ``torch.serialization.register_package``. A checkpoint written on a GPU differs from a CPU
    one only in that tag, so this lets a CPU-only machine produce the exact file a reader gets
    from a GPU box. Only for the demonstration; real GPU runs need no such thing.
    """
    global _SAVE_AS_CUDA
    if not getattr(saved_as_if_on_cuda, "registered", False):
        torch.serialization.register_package(
            1, lambda storage: "cuda:0" if _SAVE_AS_CUDA else None, lambda storage, loc: None
        )
        saved_as_if_on_cuda.registered = True  # type: ignore[attr-defined]
    _SAVE_AS_CUDA = True
    try:
        yield
    finally:
        _SAVE_AS_CUDA = False


# Child-process code for section 9. It builds the model itself, so it needs only torch.
BIG_LOAD_CHILD = r"""
import json, sys, time
import torch
from torch import nn

mode, path, width, depth = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])


def reset_peak():
    # Linux: writing "5" to clear_refs resets the peak (VmHWM) to the current RSS, so the
    # peak that `import torch` itself reached does not hide the load's.
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def peak_bytes():
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def build():
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])

reset_peak()
baseline = peak_bytes()
start = time.perf_counter()
if mode == "naive":
    model = build()  # 1st copy: freshly initialised weights
    state_dict = torch.load(path, map_location="cpu", weights_only=True)  # 2nd copy, in RAM
    model.load_state_dict(state_dict)  # copies the 2nd into the 1st
else:
    with torch.device("meta"):  # shapes only: no memory, no random init
        model = build()
    state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    model.load_state_dict(state_dict, assign=True)  # the parameters ARE the mapped tensors
load_seconds = time.perf_counter() - start
with torch.no_grad():  # use every weight, so the mmap path really reads the whole file
    output = model(torch.ones(1, width))
print(json.dumps({"load_seconds": load_seconds,
                  "load_and_forward_seconds": time.perf_counter() - start,
                  "peak_bytes": peak_bytes(), "baseline_bytes": baseline,
                  "output_sum": float(output.double().sum())}))
"""


# ############################################################################################
# The lessons, in order. In a notebook each cell runs its lesson (the `if in_notebook():`
# lines); `python 01_basic_save_load.py` runs them all through main() at the bottom.
# ############################################################################################

# %% Setup
# The flags (--device, --out-dir, --seed) and one small model trained for two epochs, for the
# lessons that need trained weights; `inputs` is one validation batch to compare outputs on.
# In a notebook the flags come from the LESSON_ARGS environment variable (none: defaults).


def build_parser() -> argparse.ArgumentParser:
    """The shared flags, and --inspect."""
    parser = make_parser(HERE, __doc__.splitlines()[0])
    parser.add_argument("--inspect", metavar="PATH", type=Path, default=None,
                        help="describe a checkpoint file or folder without running code from "
                             "it, and exit: 0 loads as it is, 1 needs globals, 2 unreadable")
    return parser


def setup(argv: list[str] | None = None) -> tuple[Run, nn.Module, tuple, torch.Tensor]:
    """Start the run and train the demo model; return run, model, loaders and a batch."""
    run = Run.start(HERE, build_parser(), argv)
    model, loaders, accuracy = train_demo_model(run.device, run.seed)
    print(f"trained SmallCNN for 2 epochs: validation accuracy {accuracy:.3f}")
    run.record("trained_val_accuracy", accuracy)
    return run, model, loaders, next(iter(loaders[1]))[0].to(run.device)


if in_notebook():
    run, model, loaders, inputs = setup()


# %% 1. What is a state_dict?
# A state_dict is a plain dict (an OrderedDict) from names to tensors. It is what you save.
# - model.state_dict() holds the PARAMETERS (learned by the optimizer: conv and linear weights,
#   BatchNorm's weight/bias) and the BUFFERS (state that is not learned but matters:
#   BatchNorm's running_mean, running_var and num_batches_tracked). Forget the buffers and a
#   reloaded model normalises with the wrong statistics.
# - optimizer.state_dict() holds "state" (per parameter, keyed by its position 0, 1, 2 ...:
#   Adam's step, exp_avg, exp_avg_sq) and "param_groups" (lr, betas, weight_decay, and which
#   positions belong to the group). Loading matches parameters BY POSITION: an optimizer state
#   fits only an optimizer built over the same parameters in the same order. An optimizer
#   built from model.named_parameters() (torch 2.6+) also stores the names, as
#   param_groups[i]["param_names"]: readable, but load_state_dict still matches by position.
# Docs: https://pytorch.org/tutorials/beginner/saving_loading_models.html#what-is-a-state-dict


def lesson_1_what_is_a_state_dict(run: Run) -> dict:
    """List a SmallCNN's state_dict (parameters vs buffers) and an Adam state_dict.

    What to look for: 16 entries, of which 6 are buffers (two BatchNorm layers, three each);
    Adam's state exists only after its first step(), one entry per parameter, keyed 0, 1, 2.
    """
    run.section("1. What is a state_dict?")
    model = SmallCNN().to(run.device)
    parameter_names = {name for name, _ in model.named_parameters()}
    state_dict = model.state_dict()
    for name, tensor in state_dict.items():
        kind = "parameter" if name in parameter_names else "buffer   "
        print(f"  {kind}  {name:<32} {str(tuple(tensor.shape)):<16} {tensor.dtype}")
    n_buffers = len(state_dict) - len(parameter_names)
    print(f"  -> {len(state_dict)} entries: "
          f"{len(parameter_names)} parameters + {n_buffers} buffers")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(8, 1, 16, 16, device=run.device)).sum().backward()
    optimizer.step()  # Adam creates its per-parameter state on the first step
    optimizer_state = optimizer.state_dict()
    group = optimizer_state["param_groups"][0]
    print(f"  optimizer.state_dict() keys: {list(optimizer_state)}")
    print(f"  state[0] (the 1st parameter) holds: {list(optimizer_state['state'][0])}")
    print(f"  param_groups[0]: lr={group['lr']}, betas={group['betas']}, "
          f"params={group['params'][:4]}... (positions, not names)")
    named = torch.optim.Adam(model.named_parameters(), lr=1e-3).state_dict()["param_groups"][0]
    print(f"  built from named_parameters(): params={named['params'][:2]}..., "
          f"param_names={named['param_names'][:2]}... (loading still goes by position)")
    return {"state_dict_entries": len(state_dict), "parameter_tensors": len(parameter_names),
            "buffer_tensors": n_buffers, "optimizer_state_entries": len(optimizer_state["state"])}


if in_notebook():
    run.record_all(lesson_1_what_is_a_state_dict(run))


# %% 2. Method 1: pickle the whole model (and why not to)
# torch.save(model, path) pickles the object. Pickle does not store your class's code: it
# stores its import path ("common.models.SmallCNN") and the object's attributes; on load it
# imports that path, creates an EMPTY instance (your __init__ never runs) and fills in the
# attributes. weights_only=True refuses such a file, because it asks to import classes.
# You need not switch to weights_only=False (the mechanism that can run arbitrary code,
# section 7): allow exactly the classes the file names, with
# torch.serialization.safe_globals([SmallCNN, nn.Conv2d, ...]). get_unsafe_globals_in_checkpoint
# lists them without loading anything.


def unsupported_global(err: BaseException) -> str:
    """The ``Unsupported global: ...`` part of a weights_only refusal."""
    match = re.search(r"Unsupported global: GLOBAL \S+", str(err))
    return match.group(0) if match else first_line(err)


def lesson_2_pickle_whole_model(run: Run, model: nn.Module, inputs: torch.Tensor) -> dict:
    """Pickle the trained model; load it back with weights_only=False, then allow-listed.

    Both loads give identical outputs; only the second one could not have run foreign code,
    because it accepts exactly the ten classes listed and nothing else.
    """
    run.section("2. Method 1: pickle the whole model (and why not to)")
    path = run.path("whole_model.pt")
    torch.save(model, path)
    run.artifact("whole_model", path)
    referenced = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    print(f"  the file references {len(referenced)} classes by import path, e.g. "
          f"{[g for g in referenced if 'common' in g]}")
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        print(f"  weights_only=True refuses it: {unsupported_global(err)}")
    # We wrote this file ourselves seconds ago, so weights_only=False is acceptable HERE ONLY.
    reloaded = torch.load(path, map_location=run.device, weights_only=False).eval()
    allowed = [SmallCNN, nn.Sequential, nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d,
               nn.AdaptiveAvgPool2d, nn.Flatten, nn.Dropout, nn.Linear]
    with torch.serialization.safe_globals(allowed):  # safer: weights_only stays True
        allow_listed = torch.load(path, map_location=run.device, weights_only=True).eval()
    with torch.no_grad():
        diff = max_abs_diff(model.eval()(inputs), reloaded(inputs))
        safe_diff = max_abs_diff(model(inputs), allow_listed(inputs))
    print(f"  reloaded with weights_only=False: outputs max |diff| = {diff}")
    print(f"  weights_only=True inside safe_globals([{len(allowed)} classes]): outputs "
          f"max |diff| = {safe_diff}")
    return {"pickled_model_globals": len(referenced), "pickled_model_reload_max_abs_diff": diff,
            "pickled_model_safe_globals_max_abs_diff": safe_diff}


if in_notebook():
    run.record_all(lesson_2_pickle_whole_model(run, model, inputs))


# %% 2b. Why a pickled model breaks when the code moves
# Because the file holds an import path, it breaks when you rename the module, move the class,
# or load it in a project without that code: "ModuleNotFoundError: No module named ..." or
# "Can't get attribute 'Net' on <module ...>". Below, a class lives in a module called
# my_old_project; we pickle an instance, then "move" the module (drop it from sys.modules,
# which is what renaming the file does to the next process). Use whole-model pickles only for
# files you made and will load with the same code; share state_dicts.


def lesson_2b_pickle_breaks(run: Run) -> dict:
    """Pickle an instance of a class in a module, remove the module, load: it fails."""
    run.section("2b. Why a pickled model breaks when the code moves")
    module = types.ModuleType("my_old_project")
    sys.modules["my_old_project"] = module

    class Net(nn.Linear):
        pass

    Net.__module__, Net.__qualname__ = "my_old_project", "Net"
    module.Net = Net
    with run.scratch("old_project") as folder:
        torch.save(Net(4, 2), folder / "whole_model_old_project.pt")
        del sys.modules["my_old_project"]
        try:  # our own file, so weights_only=False only shows the import failure
            torch.load(folder / "whole_model_old_project.pt", map_location="cpu",
                       weights_only=False)
            breaks = False
        except ModuleNotFoundError as err:
            breaks = True
            print(f"  after the module moved: {type(err).__name__}: {err}")
    return {"pickled_model_breaks_when_class_moves": breaks}


if in_notebook():
    run.record_all(lesson_2b_pickle_breaks(run))


# %% 3. Method 2: save the state_dict (recommended)
# Save only the tensors; rebuild the model from code; load the tensors into it:
#     torch.save(model.state_dict(), path)
#     model = SmallCNN(); model.load_state_dict(torch.load(path, map_location="cpu",
#                                                          weights_only=True))
#     model.eval()   # ALWAYS before inference: Dropout off, BatchNorm uses running statistics
# The file holds only tensors and names, loads with weights_only=True, and survives any
# refactor that keeps the parameter names. load_state_dict is strict by default: every key
# must match, which is what you want (section 5c shows strict=False).


def lesson_3_state_dict(run: Run, model: nn.Module, inputs: torch.Tensor) -> dict:
    """Save the trained model's state_dict, rebuild, load, compare outputs.

    load_state_dict returns its report (missing and unexpected keys, both empty here); the
    outputs of the original and the rebuilt model agree to the bit, in eval() mode.
    """
    run.section("3. Method 2: save the state_dict (recommended)")
    path = run.path("model_state_dict.pt")
    torch.save(model.state_dict(), path)
    run.artifact("model_state_dict", path)
    rebuilt = SmallCNN().to(run.device)
    result = rebuilt.load_state_dict(torch.load(path, map_location=run.device, weights_only=True))
    print(f"  load_state_dict returned {result}")
    model.eval()
    rebuilt.eval()
    with torch.no_grad():
        diff = max_abs_diff(model(inputs), rebuilt(inputs))
    print(f"  outputs of original vs rebuilt model: max |diff| = {diff}")
    return {"state_dict_reload_max_abs_diff": diff}


if in_notebook():
    run.record_all(lesson_3_state_dict(run, model, inputs))


# %% 4. Method 3: a general checkpoint, and resuming from it
# To resume training you need more than weights: the optimizer's state (Adam's moments), the
# scheduler's position, the epoch, and, for an exact resume, the random generators (Dropout
# masks, the data loader's shuffle order). Save a plain dict with keys that say what they hold.
# The key set is the one the whole collection uses (common/__init__.py): "epoch" is the NEXT
# epoch to run, so `for epoch in range(checkpoint["epoch"], epochs)` neither repeats nor skips;
# "rng" holds every generator (common.training.capture_rng_state: Python's, NumPy's, torch's,
# each GPU's and the loader's; 02 shows it line by line).
# Below: 3 epochs straight through, saving after epoch 2; then fresh objects (another seed,
# to prove everything comes from the file) resume from that checkpoint and finish.


def build_for_resume(run: Run, seed: int) -> tuple:
    """Model, optimizer, scheduler and train loader for section 4, initialised from ``seed``."""
    torch.manual_seed(seed)
    model = SmallCNN().to(run.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    train_loader, _ = make_loaders(make_image_classification(512, seed=run.seed), seed=run.seed)
    return model, optimizer, scheduler, train_loader


def lesson_4_general_checkpoint(run: Run) -> dict:
    """Train 3 epochs saving at epoch 2; resume fresh objects from it; compare weights.

    The resumed objects start from ANOTHER seed, so a max |diff| of 0.0 at the end proves
    that every piece of state came from the file: weights, momentum, the scheduler's
    learning rate (halved each epoch) and the shuffle order of the third epoch.
    """
    run.section("4. Method 3: a general checkpoint, and resuming from it")
    epochs, save_after = 3, 2
    model, optimizer, scheduler, loader = build_for_resume(run, run.seed)
    path = run.path(f"checkpoint_epoch{save_after:03d}.pt")
    for epoch in range(epochs):
        loss = train_one_epoch(model, loader, optimizer, run.device, scheduler)
        if epoch + 1 == save_after:
            torch.save({"epoch": epoch + 1, "model": model.state_dict(),  # epoch: the NEXT one
                        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "metrics": {"train_loss": loss},
                        "rng": capture_rng_state(loader.generator)}, path)
            run.artifact("checkpoint", path)
    resumed, optimizer2, scheduler2, loader2 = build_for_resume(run, run.seed + 100)
    checkpoint = torch.load(path, map_location=run.device, weights_only=True)
    resumed.load_state_dict(checkpoint["model"])
    optimizer2.load_state_dict(checkpoint["optimizer"])
    scheduler2.load_state_dict(checkpoint["scheduler"])
    restore_rng_state(checkpoint["rng"], loader2.generator)
    print(f"  resuming at epoch {checkpoint['epoch']} "
          f"(saved train_loss {checkpoint['metrics']['train_loss']:.4f}, "
          f"lr now {scheduler2.get_last_lr()[0]:.4f})")
    for _ in range(checkpoint["epoch"], epochs):
        train_one_epoch(resumed, loader2, optimizer2, run.device, scheduler2)
    diff = max_abs_diff(model.state_dict(), resumed.state_dict())
    print(f"  straight run vs save-at-epoch-2-then-resume, final weights: max |diff| = {diff}")
    return {"resume_max_abs_diff": diff}


if in_notebook():
    run.record_all(lesson_4_general_checkpoint(run))


# %% 4b. Several models in one file
# A GAN, an encoder-decoder, a teacher and a student: several models (and their optimizers) go
# into ONE dict, one key per object, and load back key by key. Nothing new is needed; the
# point is that a checkpoint is just a dict, so its keys should say what each entry is.


def lesson_4b_several_models(run: Run) -> dict:
    """Save a generator, a discriminator and an optimizer in one file; load them back."""
    run.section("4b. Several models in one file")
    generator, discriminator = MLP(8, 32, 8), MLP(8, 32, 1)
    path = run.path("gan_checkpoint.pt")
    torch.save({"generator": generator.state_dict(), "discriminator": discriminator.state_dict(),
                "generator_optimizer": torch.optim.Adam(generator.parameters()).state_dict()},
               path)
    run.artifact("multi_model_checkpoint", path)
    both = torch.load(path, map_location="cpu", weights_only=True)
    generator2, discriminator2 = MLP(8, 32, 8), MLP(8, 32, 1)
    generator2.load_state_dict(both["generator"])
    discriminator2.load_state_dict(both["discriminator"])
    diff = max(max_abs_diff(generator.state_dict(), generator2.state_dict()),
               max_abs_diff(discriminator.state_dict(), discriminator2.state_dict()))
    print(f"  two models from one file {sorted(both)}: max |diff| = {diff}")
    return {"multi_model_max_abs_diff": diff}


if in_notebook():
    run.record_all(lesson_4b_several_models(run))


# %% 5. Pitfall: state_dict() returns references
# model.state_dict() returns REFERENCES to the live tensors, not a copy. Keeping
# `best = model.state_dict()` and training on silently turns "best" into "latest", and the
# file you save as "best" later holds the last weights. Snapshot with
# copy.deepcopy(model.state_dict()) (or {k: v.clone() for k, v in ...}).


def float_entries(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """The floating-point entries only (skips integer buffers such as num_batches_tracked)."""
    return {k: v for k, v in state_dict.items() if v.is_floating_point()}


def lesson_5_references(run: Run, loaders: tuple) -> dict:
    """Keep a "best" by reference and by deepcopy, train on, compare with the weights now.

    A difference of exactly 0.0 for the reference is the bug: the "best" weights ARE the
    current ones, because they are the same tensors.
    """
    run.section("5. Pitfall: state_dict() returns references")
    model = SmallCNN().to(run.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    train_one_epoch(model, loaders[0], optimizer, run.device)
    best_by_reference = model.state_dict()
    best_by_copy = copy.deepcopy(model.state_dict())
    train_one_epoch(model, loaders[0], optimizer, run.device)  # training goes on
    stale = max_abs_diff(float_entries(best_by_reference), float_entries(model.state_dict()))
    kept = max_abs_diff(float_entries(best_by_copy), float_entries(model.state_dict()))
    print(f"  'best' kept by reference vs current weights: max |diff| = {stale} "
          "(it silently followed training)")
    print(f"  'best' kept by deepcopy  vs current weights: max |diff| = {kept:.4g}")
    return {"snapshot_by_reference_diff_from_current": stale,
            "snapshot_by_deepcopy_diff_from_current": kept}


if in_notebook():
    run.record_all(lesson_5_references(run, loaders))


# %% 5b. Pitfall: a view saves its whole storage
# torch.save keeps views sharing storage (so two views of one tensor still share after a
# load), which means saving a 10-element slice of a 1M-element tensor writes all 1M elements.
# .clone() the slice first, and the file holds just the slice.


def lesson_5b_views(run: Run) -> dict:
    """Save 10 floats as a view of 1M floats, and as a clone; compare the file sizes.

    4 MB against under 2 KB: the view's file holds the whole storage it points into.
    """
    run.section("5b. Pitfall: a view saves its whole storage")
    big = torch.randn(1_000_000)
    with run.scratch("pitfall_views") as folder:
        torch.save(big[:10], folder / "view.pt")
        torch.save(big[:10].clone(), folder / "clone.pt")
        view_bytes = (folder / "view.pt").stat().st_size
        clone_bytes = (folder / "clone.pt").stat().st_size
    print(f"  10 floats saved as a view: {format_bytes(view_bytes)}; "
          f"cloned first: {format_bytes(clone_bytes)}")
    return {"view_file_bytes": view_bytes, "cloned_view_file_bytes": clone_bytes}


if in_notebook():
    run.record_all(lesson_5b_views(run))


# %% 5c. Pitfall: strict=False still checks shapes
# load_state_dict(strict=False) only forgives MISSING or UNEXPECTED keys. A key present in
# both with different shapes is still an error ("size mismatch for head.1.weight"), which is
# what a reader meets when loading a 4-class checkpoint into a 10-class model.
# 06_transfer_learning.py shows how to load what fits by filtering on shape first.


def lesson_5c_strict_false(run: Run) -> dict:
    """Load a 4-class SmallCNN's state_dict into a 10-class one with strict=False."""
    run.section("5c. Pitfall: strict=False still checks shapes")
    try:
        SmallCNN(num_classes=10).load_state_dict(SmallCNN(num_classes=4).state_dict(),
                                                 strict=False)
        raises = False
    except RuntimeError as err:
        raises = True
        print(f"  strict=False still raises: {str(err).splitlines()[1].strip()}")
    return {"strict_false_shape_mismatch_raises": raises}


if in_notebook():
    run.record_all(lesson_5c_strict_false(run))


# %% 6. Devices: map_location, and GPU checkpoints on CPU machines
# torch.save records each tensor's device. torch.load puts it back there unless map_location
# says otherwise, so a checkpoint saved on a GPU fails on a CPU-only machine with:
#   "Attempting to deserialize object on a CUDA device but torch.cuda.is_available() is False"
# map_location accepts "cpu", "cuda", "cuda:1", a torch.device, a dict {"cuda:1": "cuda:0"}
# (remap saved devices), or a function (storage, saved_location) -> storage. Below, one file
# whose every storage is tagged cuda:0 (on a machine without a GPU we write the exact bytes a
# GPU run would, see saved_as_if_on_cuda) goes through each form.


def lesson_6_devices(run: Run) -> dict:
    """Write a cuda:0 checkpoint; load it without and with each form of map_location.

    Every form that names the CPU brings the tensors to the CPU; without map_location a
    CPU-only machine cannot load the file at all. The loaded values equal the saved ones.
    """
    run.section("6. Devices: map_location, and GPU checkpoints on CPU machines")
    cuda, model = torch.cuda.is_available(), SmallCNN()
    gpu_path = run.path("saved_on_cuda.pt")
    if cuda:
        torch.save({k: v.cuda() for k, v in model.state_dict().items()}, gpu_path)
        print("  SKIPPED (CUDA present): the CPU-only error; this machine can load it as is")
    else:
        with saved_as_if_on_cuda():  # the exact file a GPU run writes; see the helper above
            torch.save(model.state_dict(), gpu_path)
        try:
            torch.load(gpu_path, map_location=None, weights_only=True)
        except RuntimeError as err:
            print(f"  without map_location: {first_line(err)[:100]}...")
    run.artifact("cuda_checkpoint", gpu_path)
    forms = [("'cpu'", "cpu"), ("torch.device('cpu')", torch.device("cpu")),
             ("{'cuda:0': 'cpu'}", {"cuda:0": "cpu"}),
             ("lambda storage, loc: storage", lambda storage, loc: storage)]
    if cuda:
        forms.append(("None (as saved)", None))
    else:
        print("  SKIPPED (no CUDA): map_location=None would restore the tensors on cuda:0, "
              "and 'cuda:1' or {'cuda:0': 'cuda:1'} would move them to that GPU")
    for label, location in forms:
        loaded = torch.load(gpu_path, map_location=location, weights_only=True)
        print(f"  map_location={label:<30} -> tensors on {next(iter(loaded.values())).device}")
    on_cpu = torch.load(gpu_path, map_location="cpu", weights_only=True)
    diff = max_abs_diff(on_cpu, model.state_dict())
    print(f"  with map_location='cpu': max |diff| vs the saved weights = {diff}")
    return {"cuda_checkpoint_on_cpu_max_abs_diff": diff}


if in_notebook():
    run.record_all(lesson_6_devices(run))


# %% 6b. Optimizer state follows the parameters
# optimizer.load_state_dict() casts the saved state to the device of the parameters it manages
# AT THAT MOMENT. So: model.to(device) first, then build the optimizer, then load its state.
# Moving the model afterwards leaves Adam's moments behind on the CPU, and the next step()
# fails with "Expected all tensors to be on the same device".


def lesson_6b_optimizer_device(run: Run) -> dict:
    """Load CPU-saved Adam state into an optimizer over a model already on the device.

    Adam's moments end up on the model's device because the model moved BEFORE the load.
    """
    run.section("6b. Optimizer state follows the parameters")
    source = SmallCNN()
    source_optimizer = torch.optim.Adam(source.parameters())
    source(torch.randn(4, 1, 16, 16)).sum().backward()
    source_optimizer.step()
    saved_optimizer = source_optimizer.state_dict()  # its state tensors are on the CPU
    target = SmallCNN().to(run.device)  # 1. move the model
    optimizer = torch.optim.Adam(target.parameters())  # 2. build the optimizer
    optimizer.load_state_dict(saved_optimizer)  # 3. load: state is cast to the params' device
    state_device = optimizer.state_dict()["state"][0]["exp_avg"].device
    print(f"  model on {run.device}; Adam state loaded after the move lives on {state_device}")
    if not torch.cuda.is_available():
        print("  SKIPPED (no CUDA): loading optimizer state before model.cuda() leaves Adam's "
              "moments on the CPU and step() fails")
        return {"optimizer_state_device": str(state_device)}
    wrong = SmallCNN()
    wrong_optimizer = torch.optim.Adam(wrong.parameters())
    wrong_optimizer.load_state_dict(saved_optimizer)
    wrong.cuda()  # too late: the moments stay on the CPU
    wrong(torch.randn(4, 1, 16, 16, device="cuda")).sum().backward()
    try:
        wrong_optimizer.step()
    except RuntimeError as err:
        print(f"  wrong order (load, then move the model): {first_line(err)[:90]}")
    return {"optimizer_state_device": str(state_device)}


if in_notebook():
    run.record_all(lesson_6b_optimizer_device(run))


# %% 7. Security: weights_only=True and a malicious pickle
# A .pt file is a zip with a pickle inside, and unpickling can call any importable function.
# A crafted checkpoint runs its payload the moment you torch.load(..., weights_only=False).
# Since torch 2.6 weights_only=True is the default: the unpickler accepts only tensors,
# primitive types and containers, and refuses anything else with "Unsupported global".
# We always pass weights_only explicitly, so the code means the same on any torch version.
# torch.serialization.get_unsafe_globals_in_checkpoint(path) lists what a file would import,
# WITHOUT running it: inspect an unknown file with it first.
# weights_only=True is a defence, not a proof, and it has had holes: CVE-2025-32434 (remote
# code execution through weights_only=True, torch < 2.6) and GHSA-63cw-57p8-fm3p (published
# January 2026: the weights_only unpickler could corrupt memory, torch <= 2.9.1, fixed in
# 2.10.0). So: torch >= 2.10 (this collection's requirements.txt refuses older), and for
# files from people you do not trust, safetensors (section 8), which has no code path at all.


def lesson_7_security(run: Run) -> dict:
    """Write a checkpoint whose payload creates a file; inspect it; load it both ways.

    The inspection names builtins.exec without running it; weights_only=True refuses the
    file and no marker file appears; weights_only=False runs the payload on the spot.
    """
    run.section("7. Security: weights_only=True and a malicious pickle")
    folder = run.folder("security")
    marker, evil_path = folder / "PAYLOAD_RAN.txt", folder / "innocent_looking_model.pt"
    torch.save({"weight": torch.ones(2, 2), "payload": MaliciousPayload(marker)}, evil_path)
    run.artifact("malicious_checkpoint", evil_path)
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(evil_path)
    print(f"  get_unsafe_globals_in_checkpoint (runs nothing): {unsafe}")
    version = tuple(int(part) for part in re.findall(r"\d+", torch.__version__)[:2])
    print(f"  torch {torch.__version__}: "
          f"{'has' if version >= (2, 10) else 'LACKS'} the fix for GHSA-63cw-57p8-fm3p "
          "(weights_only unpickler, fixed in 2.10.0)")
    marker.unlink(missing_ok=True)
    try:
        torch.load(evil_path, map_location="cpu", weights_only=True)
    except Exception as err:
        print(f"  weights_only=True refused it: {unsupported_global(err)}")
    ran_safe = marker.exists()
    print(f"  payload ran under weights_only=True?  {ran_safe}")
    # DANGER, on purpose: this is what loading an untrusted file with weights_only=False does.
    torch.load(evil_path, map_location="cpu", weights_only=False)
    ran_unsafe = marker.exists()
    print(f"  payload ran under weights_only=False? {ran_unsafe} ({marker.name} now exists)")
    marker.unlink(missing_ok=True)
    return {"unsafe_globals_found": ", ".join(unsafe),
            "payload_ran_with_weights_only_true": ran_safe,
            "payload_ran_with_weights_only_false": ran_unsafe}


if in_notebook():
    run.record_all(lesson_7_security(run))


# %% 7b. Allow-listing your own types
# Your own types inside a checkpoint (a config dataclass) are refused by weights_only=True too.
# Allow them by name for one load with
#   with torch.serialization.safe_globals([TrainingConfig]): torch.load(..., weights_only=True)
# or process-wide with torch.serialization.add_safe_globals([TrainingConfig]). Simplest of
# all: store configs as plain dicts, dataclasses.asdict(config), and nothing needs allowing.


def lesson_7b_allow_listing(run: Run) -> dict:
    """A checkpoint holding a dataclass: refused, then loaded inside safe_globals."""
    run.section("7b. Allow-listing your own types")
    config_path = run.folder("security") / "checkpoint_with_config.pt"
    torch.save({"model": SmallCNN().state_dict(), "config": TrainingConfig()}, config_path)
    try:
        torch.load(config_path, map_location="cpu", weights_only=True)
    except Exception as err:
        print(f"  a checkpoint holding a dataclass: {unsupported_global(err)}")
    with torch.serialization.safe_globals([TrainingConfig]):
        loaded = torch.load(config_path, map_location="cpu", weights_only=True)
    print(f"  inside safe_globals([TrainingConfig]) it loads: {loaded['config']}")
    return {"safe_globals_loaded_config": isinstance(loaded["config"], TrainingConfig)}


if in_notebook():
    run.record_all(lesson_7b_allow_listing(run))


# %% 8. safetensors: a format that cannot run code
# safetensors (Hugging Face) stores a JSON header (names, dtypes, shapes, offsets, and your
# own string metadata) followed by raw tensor bytes. There is no pickle, so there is nothing
# to execute; loading can be zero-copy. Limits: tensors only (no optimizer dict nesting),
# metadata values must be strings, and tensors sharing memory (tied weights) are refused by
# save_file (use safetensors.torch.save_model for tied weights).
# API: save_file(state_dict, path, metadata={...}); load_file(path, device="cpu");
#      with safe_open(path, framework="pt") as f: f.metadata(), f.get_tensor(name)


def lesson_8_safetensors(run: Run) -> dict:
    """Save one state_dict both ways; compare content, metadata, size and load time.

    The sizes are close (both are raw tensor bytes plus a small header); the load times are
    of the same order here, and safetensors' real advantage is that loading it runs no code.
    """
    run.section("8. safetensors: a format that cannot run code")
    state_dict = MLP(256, 1024, 10).state_dict()
    pt_path, st_path = run.path("mlp_state_dict.pt"), run.path("mlp.safetensors")
    torch.save(state_dict, pt_path)
    save_file(state_dict, st_path, metadata={"epoch": "3", "architecture": "MLP(256, 1024, 10)"})
    run.artifact("safetensors_model", st_path)
    loaded = load_file(st_path, device="cpu")
    with safe_open(st_path, framework="pt") as handle:
        metadata = handle.metadata()
    diff = max_abs_diff(state_dict, loaded)
    print(f"  reloaded: max |diff| = {diff}; metadata = {metadata}")
    pt_bytes, st_bytes = pt_path.stat().st_size, st_path.stat().st_size
    print(f"  size: torch.save {format_bytes(pt_bytes)} vs safetensors {format_bytes(st_bytes)}")
    torch_time = benchmark(lambda: torch.load(pt_path, map_location="cpu", weights_only=True),
                           warmup=2, repeats=15)
    st_time = benchmark(lambda: load_file(st_path, device="cpu"), warmup=2, repeats=15)
    print(f"  load time ({torch.get_num_threads()} threads): torch.load {torch_time}  vs  "
          f"safetensors load_file {st_time}")
    return {"safetensors_max_abs_diff": diff, "torch_save_bytes": pt_bytes,
            "safetensors_bytes": st_bytes,
            "torch_load_median_ms": round(torch_time.median_ms, 3),
            "safetensors_load_median_ms": round(st_time.median_ms, 3),
            "safetensors_metadata_round_trip": metadata.get("epoch") == "3"}


if in_notebook():
    run.record_all(lesson_8_safetensors(run))


# %% 9. Big checkpoints: mmap, the meta device and assign=True
# The naive load holds the model TWICE: the freshly initialised model (random init that you
# throw away, which also costs time) plus the loaded state_dict, then copies one into the other.
# For big models:
#   with torch.device("meta"): model = Model()          # shapes only, no memory, no init
#   state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
#   model.load_state_dict(state_dict, assign=True)       # parameters become the mapped tensors
# mmap=True maps the file instead of reading it: pages come in from disk as they are used and
# the OS can drop them again. assign=True makes the loaded tensors the parameters instead of
# copying into meta tensors (which have no memory to copy into).
# Peak memory is per process, so each path runs in its own fresh Python process (BIG_LOAD_CHILD
# above), which reports its peak resident memory above what importing torch cost.


def load_in_child(mode: str, path: Path, width: int, depth: int) -> dict:
    """Run BIG_LOAD_CHILD in a fresh interpreter and return the figures it printed."""
    completed = subprocess.run(
        [sys.executable, "-c", BIG_LOAD_CHILD, mode, str(path), str(width), str(depth)],
        capture_output=True, text=True, cwd=path.parent, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"the {mode} child process failed:\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def lesson_9_big_checkpoints(run: Run) -> dict:
    """A ~270 MB state_dict loaded naively and with meta + mmap + assign, peak RSS each.

    Expect the naive path to peak near twice the file size (the initialised model plus the
    loaded copy) and the mmap path near once (the pages the forward pass touched), with the
    same output from both.
    """
    run.section("9. Big checkpoints: mmap, the meta device and assign=True")
    if not Path("/proc/self/clear_refs").exists():
        print("  SKIPPED (not Linux): peak-memory figures need /proc; the recipe above still holds")
        return {}
    width, depth = 4096, 4
    big = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])
    with torch.no_grad():
        expected = float(big(torch.ones(1, width)).double().sum())
    with run.scratch("big_checkpoint") as folder:  # a few hundred MB: not worth keeping
        path = folder / "big_model_state_dict.pt"
        torch.save(big.state_dict(), path)
        del big
        file_bytes = path.stat().st_size
        print(f"  saved a {depth} x Linear({width}, {width}) state_dict: "
              f"{format_bytes(file_bytes)}")
        results = {mode: load_in_child(mode, path, width, depth) for mode in ("naive", "mmap")}
    figures = {"big_checkpoint_bytes": file_bytes}
    for mode, result in results.items():
        above = result["peak_bytes"] - result["baseline_bytes"]
        print(f"  {mode:>5}: torch.load + load_state_dict {result['load_seconds']:.3f} s, "
              f"+ first forward {result['load_and_forward_seconds']:.3f} s; peak RSS "
              f"{format_bytes(above)} above the {format_bytes(result['baseline_bytes'])} of a "
              "process that imported torch")
        figures |= {f"{mode}_load_seconds": round(result["load_seconds"], 4),
                    f"{mode}_load_and_forward_seconds":
                        round(result["load_and_forward_seconds"], 4),
                    f"{mode}_peak_rss_above_baseline_bytes": above}
    # mmap's load returns almost at once: pages are read when first used (the forward pass).
    figures["big_checkpoint_output_diff"] = max(abs(r["output_sum"] - expected)
                                                for r in results.values())
    print("  both give the saved model's output: max |diff| of output sums = "
          f"{figures['big_checkpoint_output_diff']}")
    return figures


if in_notebook():
    run.record_all(lesson_9_big_checkpoints(run))


# %% 9b. Two traps of meta + assign=True
# (1) assign=True REPLACES the parameters with the loaded tensors, so an optimizer built
#     before the load holds the old (meta) parameters and would never update the model:
#     build the optimizer AFTER load_state_dict.
# (2) A buffer registered with register_buffer(name, tensor, persistent=False) is state you
#     do not want saved (a cache, a lookup table recomputed from other settings): it is left
#     out of state_dict(). Built on the meta device, nothing ever gives it values, so after
#     the load it is still a meta tensor and the first forward fails. Recompute such buffers
#     after loading (here: the module's own reset method); list them with
#     [name for name, b in model.named_buffers() if b.is_meta].


class ScaledLinear(nn.Module):
    """A Linear with a non-persistent buffer: ``scale`` is derived, so it is not saved."""

    def __init__(self, features: int = 4) -> None:
        super().__init__()
        self.linear = nn.Linear(features, features)
        self.register_buffer("scale", torch.empty(features), persistent=False)
        self.reset_scale()

    def reset_scale(self) -> None:
        """(Re)compute the derived buffer, on the device the weights live on."""
        self.scale = torch.full_like(self.scale, 2.0, device=self.linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.scale


def lesson_9b_meta_traps(run: Run) -> dict:
    """Build on meta, load with assign=True: an early optimizer and a meta buffer."""
    run.section("9b. Two traps of meta + assign=True")
    source = ScaledLinear()
    print(f"  state_dict keys: {list(source.state_dict())} (no 'scale': persistent=False)")
    with torch.device("meta"):
        model = ScaledLinear()
    too_early = torch.optim.SGD(model.parameters(), lr=0.1)  # built BEFORE the load: wrong
    model.load_state_dict(source.state_dict(), assign=True)
    after = torch.optim.SGD(model.parameters(), lr=0.1)  # built after the load: right
    print(f"  optimizer built before the load holds the model's weight: "
          f"{too_early.param_groups[0]['params'][0] is model.linear.weight}; built after: "
          f"{after.param_groups[0]['params'][0] is model.linear.weight}")
    still_meta = [name for name, buffer in model.named_buffers() if buffer.is_meta]
    print(f"  buffers still on the meta device after the load: {still_meta}")
    model.reset_scale()
    inputs = torch.randn(2, 4)
    diff = max_abs_diff(model(inputs), source(inputs))
    print(f"  after model.reset_scale(): outputs vs the source model max |diff| = {diff}")
    return {"meta_buffers_left_after_assign": len(still_meta), "meta_reset_max_abs_diff": diff}


if in_notebook():
    run.record_all(lesson_9b_meta_traps(run))


# %% 10. File sizes: precision and optimizer state
# A float32 weight is 4 bytes; float16 and bfloat16 are 2. Halving the dtype halves the file
# (bfloat16 keeps float32's range, float16 keeps more mantissa). Convert FLOATING tensors only:
# v.half() on every entry would also turn integer buffers (BatchNorm's num_batches_tracked,
# token ids, masks) into floats that no longer load into the model. Adam keeps two moments per
# parameter, so a checkpoint with its state is about 3x the weights alone: ship weights only,
# keep optimizer state for resuming.


def lesson_10_file_sizes(run: Run) -> dict:
    """The same MLP saved in fp32, fp16, bf16, and fp32 with its Adam state.

    The ratios are what matter: 0.50x for half precision, 3.00x with Adam's two moments.
    """
    run.section("10. File sizes: precision and optimizer state")
    model = MLP(256, 1024, 10)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 256)).sum().backward()
    optimizer.step()
    state_dict = model.state_dict()
    payloads = {
        "fp32": state_dict,
        "fp16": {k: v.half() if v.is_floating_point() else v for k, v in state_dict.items()},
        "bf16": {k: v.bfloat16() if v.is_floating_point() else v for k, v in state_dict.items()},
        "fp32_with_adam": {"model": state_dict, "optimizer": optimizer.state_dict()},
    }
    sizes = {}
    with run.scratch("sizes") as folder:
        for label, payload in payloads.items():
            torch.save(payload, folder / f"{label}.pt")
            sizes[label] = (folder / f"{label}.pt").stat().st_size
            print(f"  {label:<15} {format_bytes(sizes[label]):>10}  "
                  f"({sizes[label] / sizes['fp32']:.2f}x fp32 weights)")
    return {f"{label}_bytes": size for label, size in sizes.items()}


if in_notebook():
    run.record_all(lesson_10_file_sizes(run))


# %% 11. train() vs eval(), no_grad vs inference_mode
# train() and eval() switch module behaviour, not gradients: in train mode Dropout zeroes
# random activations and BatchNorm normalises with the batch's statistics AND updates its
# running statistics, so even a forward pass in train mode changes the model's buffers. The
# same batch twice in train() differs only through Dropout (a new random mask each call);
# train() vs eval() differs through both.
# Call model.eval() before validation, export or inference; model.train() before training.
# torch.no_grad() and torch.inference_mode() switch off autograd (less memory, faster);
# inference_mode goes further, and its tensors can never enter autograd later.


def lesson_11_train_vs_eval(run: Run, model: nn.Module, inputs: torch.Tensor) -> dict:
    """The same batch twice in train() and in eval(); then no_grad vs inference_mode.

    In eval() the same input gives the same output (0.0); in train() it does not, and the
    BatchNorm buffers moved although no optimizer ran: a forward pass in train() is a write.
    """
    run.section("11. train() vs eval(), no_grad vs inference_mode")
    model = copy.deepcopy(model)  # we mutate BatchNorm buffers below; leave the caller's alone
    with torch.no_grad():
        model.train()
        running_mean = model.backbone[1].running_mean.clone()
        train_diff = max_abs_diff(model(inputs), model(inputs))
        bn_changed = max_abs_diff(running_mean, model.backbone[1].running_mean)
        model.eval()
        eval_diff = max_abs_diff(model(inputs), model(inputs))
        train_vs_eval = max_abs_diff(model.train()(inputs), model.eval()(inputs))
    print(f"  same input twice in train(): max |diff| = {train_diff:.4g} (Dropout's random mask; "
          "BatchNorm's batch statistics are the same for the same batch)")
    print(f"  same input twice in eval():  max |diff| = {eval_diff}")
    print(f"  train() vs eval() outputs:   max |diff| = {train_vs_eval:.4g}")
    print(f"  BatchNorm running_mean moved by {bn_changed:.4g} during train-mode forwards")
    with torch.inference_mode():
        frozen = model(inputs)
    with torch.no_grad():
        plain = model(inputs)
    print(f"  requires_grad: no_grad {plain.requires_grad}, inference_mode "
          f"{frozen.requires_grad}; is_inference(): {plain.is_inference()}, "
          f"{frozen.is_inference()}")
    try:
        (frozen * torch.ones_like(frozen, requires_grad=True)).sum().backward()
    except RuntimeError as err:
        print(f"  an inference tensor used in autograd: {first_line(err)}")
    return {"train_mode_repeat_diff": train_diff, "eval_mode_repeat_diff": eval_diff,
            "train_vs_eval_diff": train_vs_eval, "batchnorm_running_mean_change": bn_changed}


if in_notebook():
    run.record_all(lesson_11_train_vs_eval(run, model, inputs))


# %% 12. Bad input: clear errors, nothing destroyed
# torch.load's own errors for bad files say little, and for a file that is not a checkpoint
# they are arbitrary: the unpickler reads its first bytes as opcodes, so "hello" gives
# "KeyError: 101", other texts IndexError, EOFError or UnpicklingError. An empty file gives a
# bare EOFError, a truncated one "failed finding central directory", and
# load_state_dict reports mismatches only after a long traceback. load_weights() above turns
# each into one line naming the file and the cause, and checks keys and shapes BEFORE copying,
# so a failed load leaves the model untouched. It only reads files, never writes or deletes.


def write_bad_inputs(folder: Path, good: Path) -> list[Path]:
    """Six files a loader meets in real life, written into ``folder`` (one is missing).

    A missing path, a half-written file (a crash during the save or the copy), a text file
    with a .pt name, another model's weights, the same model with another head size, and a
    pickle with a payload.
    """
    (folder / "truncated.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (folder / "notes.pt").write_text("hello, I am not a checkpoint\n")
    torch.save(MLP().state_dict(), folder / "mlp_weights.pt")
    torch.save(SmallCNN(num_classes=10).state_dict(), folder / "ten_class_cnn.pt")
    torch.save({"model": MaliciousPayload(folder / "PAYLOAD_RAN.txt")}, folder / "malicious.pt")
    return [folder / name for name in ("missing.pt", "truncated.pt", "notes.pt",
                                       "mlp_weights.pt", "ten_class_cnn.pt", "malicious.pt")]


def lesson_12_bad_input(run: Run, state_dict_path: Path) -> dict:
    """Load six bad files into a trained SmallCNN with load_weights; the model stays as is.

    Each error is one line that names the file; after all six failures the model's weights
    are exactly those it had before (max |diff| 0.0), and the malicious payload never ran.
    """
    run.section("12. Bad input: clear errors, nothing destroyed")
    folder = run.folder("bad_input")
    cases = write_bad_inputs(folder, state_dict_path)
    model = SmallCNN()
    model.load_state_dict(torch.load(state_dict_path, map_location="cpu", weights_only=True))
    before = copy.deepcopy(model.state_dict())
    clear = 0
    for path in cases:
        try:
            load_weights(model, path)
            print(f"  {path.name}: loaded?!")
        except CheckpointLoadError as err:
            clear += str(path) in str(err)
            print(f"  CheckpointLoadError: {str(err).replace(str(folder) + os.sep, '')}")
    unchanged = max_abs_diff(before, model.state_dict())
    print(f"  {clear}/{len(cases)} errors name the file; the model after all failed loads: "
          f"max |diff| = {unchanged}; payload ran: {(folder / 'PAYLOAD_RAN.txt').exists()}")
    run.artifact("bad_input_examples", folder)
    return {"bad_input_cases": len(cases), "bad_input_clear_errors": clear,
            "failed_loads_model_max_abs_diff": unchanged}


if in_notebook():
    run.record_all(lesson_12_bad_input(run, run.out_dir / "model_state_dict.pt"))


# %% 13. Files you did not write: inspect first, allow exactly what is needed, convert once
# Downloaded checkpoints hit weights_only=True (the default since torch 2.6) with errors like
# "Unsupported global: GLOBAL argparse.Namespace" or "...numpy.core.multiarray._reconstruct".
# Do not answer with weights_only=False: first LOOK at the file without running it:
#   python 01_basic_save_load.py --inspect PATH
# prints every tensor, the other entries, every global the pickle references (reading it
# with an unpickler whose find_class never imports anything) and a verdict; its exit status
# is 0 (loads as it is), 1 (needs globals: it prints the safe_globals line that allows
# exactly those, or a WARNING when one can run code, like os.system) or 2 (unreadable).
# Below, a Lightning-style checkpoint: hyper-parameters as an argparse.Namespace, a NumPy
# scalar and array beside the state_dict. We inspect it, load it once with exactly the
# globals it needs, and convert it into a clean state_dict (safetensors) + a JSON config,
# which later loads need nothing for. Two NumPy details: under NumPy 2, numpy.dtype("f8") is
# an instance of numpy.dtypes.Float64DType, which must be allowed too (the inspector adds
# it; get_unsafe_globals_in_checkpoint cannot see it); and a file written under NumPy 1
# names numpy.core.multiarray._reconstruct, a module NumPy 2 renamed: allow it with the
# tuple form (numpy._core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct").


def lightning_style_checkpoint(path: Path) -> None:
    """What PyTorch Lightning and many research repos save: more than weights.

    The weights under "state_dict", counters, the hyper-parameters as the argparse
    Namespace the training script parsed, a NumPy float from a metric, a NumPy array.
    """
    torch.save({"state_dict": SmallCNN().state_dict(), "epoch": 7, "global_step": 420,
                "hyper_parameters": argparse.Namespace(lr=0.01, width=16, optimizer="sgd"),
                "best_score": np.float64(0.8123), "class_counts": np.array([90, 110, 95, 105]),
                "pytorch-lightning_version": "2.5.0"}, path)


def lesson_13_foreign_checkpoint(run: Run) -> dict:
    """Inspect a Lightning-style file, load it with exactly its globals, convert it clean."""
    run.section("13. Files you did not write: inspect first, allow exactly what is needed, "
                "convert once")
    folder = run.folder("foreign")
    path = folder / "lightning_style.ckpt"
    lightning_style_checkpoint(path)
    report = inspect_checkpoint(path)
    print_inspection(report, limit=2)
    # Allow exactly what the inspection listed, for this one load (a context manager, not
    # add_safe_globals, which would allow them for every later load of the process too).
    allowed = [np._core.multiarray._reconstruct, np._core.multiarray.scalar, np.dtype,
               np.ndarray, argparse.Namespace, *{type(np.dtype("f8")), type(np.dtype("i8"))}]
    with torch.serialization.safe_globals(allowed):  # these, for this one load only
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    # The conversion: tensors into safetensors, everything else into plain JSON types. After
    # it, no load of this model ever needs an allow-list again.
    config = {**vars(loaded["hyper_parameters"]), "epoch": loaded["epoch"],
              "best_score": float(loaded["best_score"]),
              "class_counts": loaded["class_counts"].tolist()}
    save_file(loaded["state_dict"], folder / "converted.safetensors")
    (folder / "converted_config.json").write_text(json.dumps(config, indent=2) + "\n")
    clean = inspect_checkpoint(folder / "converted.safetensors")
    diff = max_abs_diff(loaded["state_dict"], load_file(folder / "converted.safetensors"))
    print(f"  converted: converted.safetensors ({len(clean.tensors)} tensors, verdict "
          f"{clean.status}, max |diff| {diff}) + converted_config.json: {config}")
    run.artifact("foreign_checkpoints", folder)
    return {"foreign_inspect_status": report.status, "foreign_needs": ", ".join(report.needs),
            "foreign_converted_max_abs_diff": diff, "foreign_converted_status": clean.status}


if in_notebook():
    run.record_all(lesson_13_foreign_checkpoint(run))


# %% 13b. A whole pickled model you trust: convert it in a child process
# Some files are whole pickled models (torch.save(model)): loading one means unpickling its
# classes, so weights_only=True refuses it. If you trust the file, convert it ONCE, in a
# separate process: the child unpickles it (weights_only=False, its classes importable) and
# writes safetensors with safetensors.torch.save_model; your own process only ever reads
# the safetensors file. If the pickle was hostile, the damage stays in a process you can
# also sandbox (a container, a user without your credentials).


CONVERT_CHILD = r"""
import sys
import torch
from safetensors.torch import save_model

source, target = sys.argv[1], sys.argv[2]
model = torch.load(source, map_location="cpu", weights_only=False)  # trusted file, child only
save_model(model, target)
print(f"converted {type(model).__name__}")
"""


def lesson_13b_convert_in_child(run: Run, model: nn.Module) -> dict:
    """torch.save(model) -> a child converts it -> this process loads safetensors."""
    run.section("13b. A whole pickled model you trust: convert it in a child process")
    folder = run.folder("foreign")
    pickled, converted = folder / "whole_model.pt", folder / "whole_model.safetensors"
    torch.save(model, pickled)
    print(f"  --inspect says: needs {len(inspect_checkpoint(pickled).needs)} globals "
          "(the model's classes)")
    # The child must be able to import the model's classes (the pickle names
    # common.models.SmallCNN), hence the project folder on its PYTHONPATH. Nothing but the
    # safetensors file comes back: not one object of the pickle enters this process.
    child = subprocess.run(
        [sys.executable, "-c", CONVERT_CHILD, str(pickled), str(converted)],
        capture_output=True, text=True, timeout=300, check=False, cwd=HERE.parent,
        env={**os.environ, "PYTHONPATH": str(HERE.parent)})
    if child.returncode != 0:
        raise RuntimeError(f"the conversion child failed: {child.stderr.strip()[-300:]}")
    rebuilt = SmallCNN()  # on the CPU, where the child put the weights
    load_model(rebuilt, converted)
    diff = max_abs_diff({k: v.cpu() for k, v in model.state_dict().items()},
                        rebuilt.state_dict())
    print(f"  child: {child.stdout.strip()}; this process loaded {converted.name} into a new "
          f"SmallCNN: max |diff| = {diff}")
    return {"child_conversion_max_abs_diff": diff}


if in_notebook():
    run.record_all(lesson_13b_convert_in_child(run, model))


# %% 13c. Tied weights: save_model where save_file refuses
# A language model often ties its output layer to its embedding (one tensor, two names).
# safetensors stores each tensor once and has no aliases, so save_file refuses a
# state_dict with shared memory ("Some tensors share memory ..."). save_model / load_model
# handle it: they save one name of each shared group and re-tie on load (the module's own
# code ties them again in __init__). torch.save keeps the sharing by itself.


class TiedLM(nn.Module):
    """An embedding and an output layer that share one weight tensor."""

    def __init__(self, vocabulary: int = 50, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width)
        self.head = nn.Linear(width, vocabulary, bias=False)
        self.head.weight = self.embed.weight  # tied: the same Parameter

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens))


def lesson_13c_tied_weights(run: Run) -> dict:
    """save_file refuses a tied state_dict; save_model writes one copy; load_model re-ties."""
    run.section("13c. Tied weights: save_model where save_file refuses")
    model, path = TiedLM(), run.path("foreign/tied.safetensors")
    try:
        save_file(model.state_dict(), path)
        refused = False
    except RuntimeError as err:
        refused = "share memory" in str(err)
        print(f"  save_file: {' '.join(str(err).split())[:100]}...")
    save_model(model, path)
    rebuilt = TiedLM()
    load_model(rebuilt, path)
    tokens = torch.arange(10)
    diff = max_abs_diff(model(tokens), rebuilt(tokens))
    with safe_open(path, framework="pt") as handle:
        names = list(handle.keys())  # noqa: SIM118 - safe_open has keys(), not iteration
    print(f"  save_model stored {names} ({format_bytes(path.stat().st_size)}); after load_model"
          f" head.weight is embed.weight: {rebuilt.head.weight is rebuilt.embed.weight}; "
          f"outputs max |diff| = {diff}")
    return {"tied_save_file_refused": refused, "tied_tensors_stored": len(names),
            "tied_round_trip_max_abs_diff": diff}


if in_notebook():
    run.record_all(lesson_13c_tied_weights(run))


# %% 13d. Sharded safetensors with an index file
# Big models ship as shards: model-00001-of-00003.safetensors, ... and
# model.safetensors.index.json, whose "weight_map" says which file holds each tensor
# (Hugging Face's documented layout; huggingface_hub's save_torch_state_dict and
# transformers write it). save_sharded_safetensors / load_sharded_safetensors above do it
# with the safetensors API alone. The index is data from the internet too: a shard name
# like "../x" is refused, and a tensor missing from the shards is an error, not a silence.


def lesson_13d_sharded(run: Run) -> dict:
    """Shard an MLP's state_dict at 1 MB, read it back, inspect the folder."""
    run.section("13d. Sharded safetensors with an index file")
    state = MLP(256, 1024, 10).state_dict()
    with run.scratch("demo_sharded") as folder:
        index = save_sharded_safetensors(state, folder, max_shard_bytes=1_000_000)
        shards = sorted(p.name for p in folder.glob("*.safetensors"))
        loaded = load_sharded_safetensors(index)
        report = inspect_checkpoint(folder)
    diff = max_abs_diff(state, loaded)
    print(f"  {len(shards)} shards: {', '.join(shards)} + {index.name}")
    print(f"  loaded back {len(loaded)} tensors: max |diff| = {diff}; --inspect on the "
          f"folder: {report.kind}, {len(report.tensors)} tensors, exit status {report.status}")
    return {"sharded_files": len(shards), "sharded_max_abs_diff": diff,
            "sharded_inspect_status": report.status}


if in_notebook():
    run.record_all(lesson_13d_sharded(run))


# %% 13e. TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD, and its safe twin
# TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 makes every torch.load that does NOT pass weights_only
# (often one deep inside a library) run with weights_only=False, for the whole process:
# every file any of them opens can then run code. It exists to keep old code running; the
# safe answer is the allow-list of section 13. Its twin TORCH_FORCE_WEIGHTS_ONLY_LOAD=1
# forces weights_only=True on EVERY load, even one that passes weights_only=False: set it in
# services that must never unpickle code. torch.load reads both variables on every call.
# Below: with the safe twin set, an explicit weights_only=False load of a malicious file is
# refused and its payload does not run.


def lesson_13e_force_weights_only(run: Run) -> dict:
    """TORCH_FORCE_WEIGHTS_ONLY_LOAD=1 overrides an explicit weights_only=False."""
    run.section("13e. TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD, and its safe twin")
    folder = run.folder("foreign")
    marker, evil = folder / "PAYLOAD_RAN.txt", folder / "malicious_13e.pt"
    torch.save({"model": MaliciousPayload(marker)}, evil)
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        torch.load(evil, map_location="cpu", weights_only=False)  # forced to True
        refused = False
    except pickle.UnpicklingError as err:
        refused = "Unsupported global" in str(err)
    finally:
        if previous is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous
    print(f"  TORCH_FORCE_WEIGHTS_ONLY_LOAD=1, torch.load(weights_only=False) of a malicious "
          f"file: refused {refused}; payload ran: {marker.exists()}")
    return {"force_weights_only_refused": refused, "force_weights_only_payload_ran":
            marker.exists()}


if in_notebook():
    run.record_all(lesson_13e_force_weights_only(run))


# %% 13f. Non-persistent buffers: in the module, not in the state_dict
# register_buffer(name, tensor, persistent=False) makes a buffer that moves with .to() and is
# used in forward, but is NOT saved: a rotary-embedding table, a causal mask, a constant
# derived from the config. Your code must rebuild it (in __init__), which is why it is not
# in a downloaded state_dict, why load_state_dict does not ask for it, and why after a
# meta-device load it stays on meta until recomputed (section 9b).


class Scaled(nn.Module):
    """A persistent running statistic and a non-persistent constant table."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.register_buffer("calls", torch.zeros(()))  # persistent: saved
        self.register_buffer("table", torch.linspace(0, 1, 4), persistent=False)  # rebuilt

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.linear(inputs) * self.table


def lesson_13f_non_persistent(run: Run) -> dict:
    """Which buffers a state_dict holds, and that a rebuilt module computes the same."""
    run.section("13f. Non-persistent buffers: in the module, not in the state_dict")
    module = Scaled()
    module(torch.ones(1, 4))
    buffers = [name for name, _ in module.named_buffers()]
    saved = list(module.state_dict())
    rebuilt = Scaled()
    rebuilt.load_state_dict(module.state_dict())  # strict: "table" is not expected
    diff = max_abs_diff(module(torch.ones(1, 4)), rebuilt(torch.ones(1, 4)))
    print(f"  named_buffers: {buffers}; state_dict keys: {saved}; a rebuilt module after "
          f"load_state_dict: max |diff| = {diff}")
    return {"non_persistent_buffer_in_state_dict": "table" in saved,
            "non_persistent_rebuilt_max_abs_diff": diff}


if in_notebook():
    run.record_all(lesson_13f_non_persistent(run))


# %% Summary
# What the run measured, the files it wrote (also in summary.json), and what to try next.
RECAP = [
    "save model.state_dict(), rebuild the model in code, load_state_dict, then eval()",
    "a resumable checkpoint is a dict: model, optimizer, scheduler, epoch (next), rng",
    "always torch.load(..., map_location=..., weights_only=True); inspect unknown files "
    "with get_unsafe_globals_in_checkpoint; prefer safetensors to share weights",
    "big models: meta device + mmap=True + assign=True hold the weights once, not twice",
    "a file you did not write: --inspect it, allow exactly its globals once, convert it to "
    "safetensors + JSON; never TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD",
]
TRY_IT = ("change SmallCNN's width in lesson 3's rebuild and read the error from "
          "load_weights; then run 02_checkpoint_manager.py")

if in_notebook():
    summary = run.finish(RECAP, TRY_IT)


def main(argv: list[str] | None = None) -> dict:
    """Run every lesson in order and return the summary (also written to summary.json);
    with --inspect PATH, describe that file instead and exit with its verdict (0, 1, 2)."""
    target = build_parser().parse_args(lesson_argv(argv)).inspect
    if target is not None:  # no out-dir, no training: only reads PATH
        report = inspect_checkpoint(target)
        print_inspection(report)
        raise SystemExit(report.status)
    run, model, loaders, inputs = setup(argv)
    run.record_all(lesson_1_what_is_a_state_dict(run))
    run.record_all(lesson_2_pickle_whole_model(run, model, inputs))
    run.record_all(lesson_2b_pickle_breaks(run))
    run.record_all(lesson_3_state_dict(run, model, inputs))
    run.record_all(lesson_4_general_checkpoint(run))
    run.record_all(lesson_4b_several_models(run))
    run.record_all(lesson_5_references(run, loaders))
    run.record_all(lesson_5b_views(run))
    run.record_all(lesson_5c_strict_false(run))
    run.record_all(lesson_6_devices(run))
    run.record_all(lesson_6b_optimizer_device(run))
    run.record_all(lesson_7_security(run))
    run.record_all(lesson_7b_allow_listing(run))
    run.record_all(lesson_8_safetensors(run))
    run.record_all(lesson_9_big_checkpoints(run))
    run.record_all(lesson_9b_meta_traps(run))
    run.record_all(lesson_10_file_sizes(run))
    run.record_all(lesson_11_train_vs_eval(run, model, inputs))
    run.record_all(lesson_12_bad_input(run, run.out_dir / "model_state_dict.pt"))
    run.record_all(lesson_13_foreign_checkpoint(run))
    run.record_all(lesson_13b_convert_in_child(run, model))
    run.record_all(lesson_13c_tied_weights(run))
    run.record_all(lesson_13d_sharded(run))
    run.record_all(lesson_13e_force_weights_only(run))
    run.record_all(lesson_13f_non_persistent(run))
    return run.finish(RECAP, TRY_IT)


if __name__ == "__main__" and not in_notebook():
    main()
