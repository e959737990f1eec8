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
          without running code it chooses (only a file naming nothing but torch's allow-list
          is then confirmed by torch.load(weights_only=True), memory-capped), writes
          nothing, and exits 0 (loads as it is),
          1 (refused as it is: it lists every global to review) or 2 (unreadable, or
          past a named limit).
          As a notebook: run the cells top to bottom from the project folder (jupytext,
          VS Code, PyCharm); flags go in the LESSON_ARGS environment variable.
Takes:    about 11 s on a 2-core CPU (three child processes; two load a ~134 MB file).
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
the cause, and that never changes the model unless the whole checkpoint fits. Two larger
tools live beside the lesson that teaches them: inspect_checkpoint with its StubUnpickler
(the --inspect command, for files whose origin you do not control) before section 13, and
save/load_sharded_safetensors in section 13d.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import copy
import dataclasses
import json
import keyword
import math
import os
import pickle
import pickletools
import re
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
import types
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn
from torch._utils import IMPORT_MAPPING, NAME_MAPPING  # Python 2 names torch.load maps

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
                "torch.load would call with arguments the file chooses; review what it does "
                "before allowing it (01 --inspect lists every such global)"
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
# to prove everything comes from the file) resume from that checkpoint and finish. On CUDA a
# bit-exact comparison also needs deterministic kernels (Conv2d's backward is not by
# default): the lesson runs inside deterministic_algorithms(), which restores them after.


def build_for_resume(run: Run, seed: int) -> tuple:
    """Model, optimizer, scheduler and train loader for section 4, initialised from ``seed``."""
    torch.manual_seed(seed)
    model = SmallCNN().to(run.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    train_loader, _ = make_loaders(make_image_classification(512, seed=run.seed), seed=run.seed)
    return model, optimizer, scheduler, train_loader


@contextlib.contextmanager
def deterministic_algorithms() -> Iterator[None]:
    """Deterministic kernels inside the block, the previous settings restored after it.

    On a CPU these lessons are bit-exact as they are. On CUDA, Conv2d's backward picks
    cuDNN algorithms that add in a varying order (atomics), so two identical runs can
    differ in the last bits: bit-exact resume there needs cudnn.deterministic=True,
    cudnn.benchmark=False and torch.use_deterministic_algorithms(True), and cuBLAS needs
    CUBLAS_WORKSPACE_CONFIG=":4096:8" (PyTorch's reproducibility notes).
    """
    previous = (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
                os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous[2:4]
        if previous[4] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def lesson_4_general_checkpoint(run: Run) -> dict:
    """Train 3 epochs saving at epoch 2; resume fresh objects from it; compare weights.

    The resumed objects start from ANOTHER seed, so a max |diff| of 0.0 at the end proves
    that every piece of state came from the file: weights, momentum, the scheduler's
    learning rate (halved each epoch) and the shuffle order of the third epoch.
    """
    run.section("4. Method 3: a general checkpoint, and resuming from it")
    with deterministic_algorithms():  # Conv2d's CUDA backward is not, by default
        epochs, save_after = 3, 2
        model, optimizer, scheduler, loader = build_for_resume(run, run.seed)
        path = run.path(f"checkpoint_epoch{save_after:03d}.pt")
        for epoch in range(epochs):
            loss = train_one_epoch(model, loader, optimizer, run.device, scheduler)
            if epoch + 1 == save_after:
                torch.save({"epoch": epoch + 1, "model": model.state_dict(),  # the NEXT epoch
                            "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(),
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
# torch.serialization.get_unsafe_globals_in_checkpoint(path) lists the GLOBAL names of a zip
# file's pickle outside weights_only's allow-list, without running it (it reads only those
# opcodes). For a file you did not write, `--inspect` (section 13) reads all of it.
# weights_only=True is a defence, not a proof, and it has had holes: CVE-2025-32434 (remote
# code execution through weights_only=True, torch < 2.6) and GHSA-63cw-57p8-fm3p (published
# January 2026: the weights_only unpickler could corrupt memory, torch <= 2.9.1, fixed in
# 2.10.0). So: torch >= 2.10 (this collection's requirements.txt refuses older), and for
# files from people you do not trust, safetensors (section 8), which has no code path at all.


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
# Timing it fairly: load_file maps the file and defers reading the bytes until a tensor is
# used, while torch.load (without mmap=True) reads them all at once. Timing the two calls
# alone compares a promise with a delivery, so the lesson times each load together with a
# first use that touches every byte (a sum over every tensor), and the sentence's
# comparison word comes from timing_word, which turns with the figures.


def timing_word(first_ms: float, second_ms: float, second_name: str) -> str:
    """The comparison a sentence may make of two medians, chosen by the figures: within a
    factor of 1.5 is "the same order"; otherwise which one is faster, and by how much."""
    ratio = first_ms / second_ms if second_ms > 0 else math.inf
    if 1 / 1.5 <= ratio <= 1.5:
        return f"the same order (ratio {ratio:.2f})"
    if ratio > 1.5:
        return f"{second_name} is {ratio:.1f}x faster"
    return f"{second_name} is {1 / ratio:.1f}x slower"


def lesson_8_safetensors(run: Run) -> dict:
    """Save one state_dict both ways; compare content, metadata, size and load time.

    The sizes are close (both are raw tensor bytes plus a small header). load_file maps the
    file and defers reading the bytes until a tensor is used, so the load is timed together
    with a first use (a sum over every tensor); safetensors' real advantage is that loading
    it runs no code.
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
    def use(state: dict) -> float:  # touches every byte: the deferred reads happen here
        return sum(float(tensor.sum()) for tensor in state.values())

    torch_time = benchmark(lambda: use(torch.load(pt_path, map_location="cpu",
                                                  weights_only=True)), warmup=2, repeats=15)
    st_time = benchmark(lambda: use(load_file(st_path, device="cpu")), warmup=2, repeats=15)
    print(f"  load + first use ({torch.get_num_threads()} threads): torch.load {torch_time}  "
          f"vs  safetensors load_file {st_time}: "
          f"{timing_word(torch_time.median_ms, st_time.median_ms, 'safetensors')}")
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


def load_in_child(mode: str, path: Path, width: int, depth: int) -> dict:
    """Run BIG_LOAD_CHILD in a fresh interpreter and return the figures it printed."""
    completed = subprocess.run(
        [sys.executable, "-c", BIG_LOAD_CHILD, mode, str(path), str(width), str(depth)],
        capture_output=True, text=True, cwd=path.parent, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"the {mode} child process failed:\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def lesson_9_big_checkpoints(run: Run) -> dict:
    """A ~134 MB state_dict loaded naively and with meta + mmap + assign, peak RSS each.

    Expect the naive path to peak near twice the file size (the initialised model plus the
    loaded copy) and the mmap path near once (the pages the forward pass touched), with the
    same output from both.
    """
    run.section("9. Big checkpoints: mmap, the meta device and assign=True")
    if not Path("/proc/self/clear_refs").exists():
        print("  SKIPPED (not Linux): peak-memory figures need /proc; the recipe above still holds")
        return {}
    width, depth = 4096, 2
    big = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])
    with torch.no_grad():
        expected = float(big(torch.ones(1, width)).double().sum())
    with run.scratch("big_checkpoint") as folder:  # ~134 MB: not worth keeping
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
# inference_mode goes further: its tensors carry no version counter, so autograd may use one
# only where it need not save it for backward. `(frozen + w).sum().backward()` works (an
# addition saves nothing); `frozen * w` (the product saves `frozen` for w's gradient) and an
# in-place update of `frozen` outside inference_mode fail. Both are shown below.


def inference_tensor_in_autograd(frozen: torch.Tensor) -> dict[str, str]:
    """Three uses of a tensor made under inference_mode, each run: "works" or the error.

    ``frozen + w`` saves nothing for backward and works; ``frozen * w`` must save ``frozen``
    (w's gradient is ``frozen``) and fails; so does an in-place update outside the mode.
    """
    weight = torch.ones_like(frozen, requires_grad=True)
    steps = {"add (t + w).sum().backward()": lambda: (frozen + weight).sum().backward(),
             "multiply (t * w).sum().backward()": lambda: (frozen * weight).sum().backward(),
             "in-place t.add_(1) outside inference_mode": lambda: frozen.add_(1)}
    outcomes = {}
    for label, step in steps.items():
        try:
            step()
            outcomes[label] = "works"
        except RuntimeError as err:
            outcomes[label] = first_line(err)[:80]
    return outcomes


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
    autograd = inference_tensor_in_autograd(frozen)
    for label, outcome in autograd.items():
        print(f"  an inference tensor, {label}: {outcome}")
    return {"train_mode_repeat_diff": train_diff, "eval_mode_repeat_diff": eval_diff,
            "train_vs_eval_diff": train_vs_eval, "batchnorm_running_mean_change": bn_changed,
            **{f"inference_tensor_{label.split()[0].replace('-', '_')}_works":
               outcome == "works" for label, outcome in autograd.items()}}


if in_notebook():
    run.record_all(lesson_11_train_vs_eval(run, model, inputs))


# %% 12. Bad input: clear errors, nothing destroyed
# torch.load's own errors for bad files say little, and for a file that is not a checkpoint
# they are arbitrary: the unpickler reads its first bytes as opcodes, so "hello" gives
# "KeyError: 101", other texts IndexError, EOFError or UnpicklingError. An empty file gives a
# bare EOFError, a truncated one a zip-reader error that depends on where the cut falls
# (measured on torch 2.14.1: "failed finding central directory" or "OSError: [Errno 22]
# Invalid argument"; the lesson prints the one it meets), and
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
    try:  # what torch.load itself says about the half file, for comparison
        torch.load(folder / "truncated.pt", map_location="cpu", weights_only=True)
    except Exception as err:
        print(f"  (torch.load's own error for truncated.pt: {type(err).__name__}: "
              f"{first_line(err)[:70]})")
    unchanged = max_abs_diff(before, model.state_dict())
    print(f"  {clear}/{len(cases)} errors name the file; the model after all failed loads: "
          f"max |diff| = {unchanged}; payload ran: {(folder / 'PAYLOAD_RAN.txt').exists()}")
    run.artifact("bad_input_examples", folder)
    return {"bad_input_cases": len(cases), "bad_input_clear_errors": clear,
            "failed_loads_model_max_abs_diff": unchanged}


if in_notebook():
    run.record_all(lesson_12_bad_input(run, run.out_dir / "model_state_dict.pt"))


# %% The inspector behind --inspect (lesson 13 teaches it)
# `python 01_basic_save_load.py --inspect PATH` describes a checkpoint whose origin you do not
# control WITHOUT running code it chooses (a file judged loadable is confirmed by a
# memory-capped torch.load(weights_only=True), which calls only torch's allow-listed
# functions, on the file's arguments). Why an inspector at all: weights_only=True refuses
# a file at the FIRST global it does not allow, so fixing a download one "Unsupported global"
# at a time ends with an allow-list nobody reviewed; listing every global up front lets a
# person decide once. How it reads: every pickle (a zip's data.pkl, a legacy file, a DCP
# folder's .metadata) goes through StubUnpickler, a small pickle machine of its own that
# never imports a module, never resolves a name, never calls anything: a global becomes a
# record of its (module, name), a call becomes a record of what would be called with what.
# Names are compared with an exact allow-list of (module, name) pairs. Every input is
# bounded: each limit below is a named constant, and passing one stops with exit status 2.
#
# What an attacker tries, and the answer to each (tests/test_inspect_fuzz.py has them all):
# - Make the inspector itself run the payload. A pickle.Unpickler whose find_class checks
#   the module and then calls super().find_class follows a dotted name attribute by
#   attribute (module "torch.distributed.checkpoint.filesystem", name "os.system" reaches
#   os.system through the module's own import), and DCP's FileSystemReader.read_metadata is
#   a plain pickle.load. So no byte of the file reaches either: only StubUnpickler reads pickles,
#   and a name is a pair of strings compared for equality, never a path to follow. Only a
#   file judged loadable then goes to torch.load(weights_only=True) to confirm it: that load
#   DOES call the allow-listed globals (bytearray, torch.Size, _rebuild_tensor_v2) with the
#   file's arguments, so it runs with memory capped (see _memory_bound).
# - Hide the call. getattr(__import__("os"), "system")(...) calls the RESULT of a call; INST,
#   OBJ and NEWOBJ_EX are calls that weights_only never executes; EXT codes name globals
#   by a number. Each is recorded and reported as dangerous or unknown, never as harmless.
# - Exhaust memory or time. A 13-byte LONG_BINPUT 2**26 makes the C unpickler allocate a
#   memo of 2**26 slots; shared references make a 719-byte pickle a tree of 2**60 nodes to
#   anyone who walks it naively; a few hundred bytes of bzip2 decompress to gigabytes;
#   160,000 distinct globals cost quadratic time in a list; the same shared tuple used as a
#   dict key is 2**60 values to HASH (311 bytes); an allowed global called on a huge number,
#   bytearray(2**30), allocates it inside torch.load itself. Here the memo is a dict, a
#   structure met twice is named instead of walked again, zip members are checked against
#   MAX_PICKLE_BYTES from the header and again while decompressing, globals live in a dict,
#   a key's expanded size is tracked (MAX_KEY_SIZE), and the confirming torch.load runs
#   with the address space capped (MAX_CONFIRM_BYTES beyond the file's size).
# - Make the ADVICE the payload. The verdict prints globals as code to paste; a module named
#   "argparse;exec(...)" would print an import line that runs it. Only ASCII identifiers are
#   ever printed as advice, and the advice says that importing a module runs its code.
# - Block the reader or read elsewhere. A FIFO named model.safetensors.index.json blocks
#   an open() forever; a symlink in a downloaded folder can point at any file you own.
#   Only regular files are opened (checked by stat, then again on the O_NONBLOCK handle),
#   and a file of a folder must resolve inside that folder: a shard an index names, and
#   each file a DCP .metadata's storage_data points dcp.load at ("../outside/x.distcp").
# - Forge the report. A tensor named "\nverdict: loads as it is" or holding an ANSI escape
#   would print a line of its own; every name and value is escaped (repr-style) first.

MAX_PICKLE_BYTES = 64 * 2**20  # a pickle holds names, shapes and small values; tensor bytes
# live in separate records (real data.pkl files are KBs to a few MB)
MAX_OPCODES = 5_000_000  # pickle instructions read (~2 M for a 100,000-tensor state_dict)
MAX_OBJECTS = 1_000_000  # objects the reader builds: about 100 MB of Python objects at most
MAX_MEMO = 1_000_000  # memo entries; a dict, so LONG_BINPUT 2**26 is one entry, not 2**26
MAX_DEPTH = 100  # nesting of containers and calls; a checkpoint nests a few levels
MAX_GLOBALS = 10_000  # distinct globals (a whole pickled model names ~50), kept in a dict
MAX_LISTED = 10_000  # tensors and entries kept for the report (all are counted)
MAX_SAFETENSORS_HEADER = 100_000_000  # safetensors' own reader refuses more ("header too large")
MAX_INDEX_BYTES = 64 * 2**20  # a model.safetensors.index.json: ~100 bytes per tensor name
MAX_ZIP_DIRECTORY_BYTES = 16 * 2**20  # a zip's central directory: ~100 bytes per member
MAX_TENSOR_DIMENSIONS = 64  # more than any real tensor has
MAX_KEY_SIZE = 10_000  # values inside one dict key or set element: hashing a tuple walks all
# of them, and shared references make a 311-byte tuple of 2**60 values (a real key: a few)
MAX_INT_BYTES = 64  # a 512-bit integer: hashing a bigger one, again for each use as a key,
# costs time no other limit counts (an 8 MB integer: ~6 ms a hash); checkpoints need 64 bits
MAX_SECONDS = 20  # the whole inspection, the confirming load included: dict insertions with
# colliding keys are quadratic, and allowed calls can allocate and free in a loop
MAX_CONFIRM_BYTES = 256 * 2**20  # memory the confirming torch.load may take beyond the
# file's own size: an allowed call like bytearray(2**30) would otherwise allocate a gigabyte

# Storage class names (legacy and zip pickles) and safetensors' dtype codes -> torch names.
STORAGE_DTYPES = {"Float": "float32", "Double": "float64", "Half": "float16",
                  "BFloat16": "bfloat16", "Long": "int64", "Int": "int32", "Short": "int16",
                  "Char": "int8", "Byte": "uint8", "Bool": "bool", "ComplexFloat": "complex64",
                  "ComplexDouble": "complex128"}
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                      "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
                      "U8": "uint8", "BOOL": "bool"}

DTYPE_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8,
               "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1, "complex64": 8,
               "complex128": 16}

# A HEURISTIC of globals known to hand a pickle the power to run code or touch the system.
# It is a deny-list and cannot be complete (cProfile.run, timeit.timeit and many more run code
# too): it only adds a warning. A global missing from it is not harmless, only not on it.
KNOWN_DANGEROUS = re.compile(
    r"^(builtins\.(exec|eval|compile|__import__|getattr|setattr|delattr|open|breakpoint|"
    r"input|globals|locals|vars)$|(os|posix|nt|subprocess|shutil|sys|runpy|importlib|pickle|"
    r"_pickle|marshal|ctypes|socket|code|codeop|pty|webbrowser|multiprocessing|cProfile|"
    r"profile|timeit|pdb|bdb|trace|doctest|torch\.utils\.collect_env|torch\.hub|"
    r"numpy\.testing|torch\.distributed\.checkpoint\.format_utils|torch\.serialization|"
    r"torch\.load|torch\.jit|torch\.package|functools|operator|types|inspect)(\.|$))")


def checked_regular_file(path: str | Path, folder: str | Path | None = None) -> Path:
    """``path`` if it is a regular file (inside ``folder``, symlinks resolved, when given).

    For files you did not write: a FIFO named like a checkpoint blocks a reader forever, a
    device file never ends, and a symlink in a downloaded folder can point at any file of
    yours. ``os.stat`` answers without opening (a FIFO does not block it); raises
    ``CheckpointLoadError`` naming the file and the cause.
    """
    path = Path(path)
    if folder is not None:
        real, root = os.path.realpath(path), os.path.realpath(folder)
        if os.path.commonpath([real, root]) != root:
            raise CheckpointLoadError(f"{path}: resolves to {real}, outside {root}: refused")
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        raise CheckpointLoadError(f"{path}: {err.strerror or err}") from None
    if not stat.S_ISREG(mode):
        raise CheckpointLoadError(f"{path}: not a regular file (a folder, FIFO, socket or "
                                  "device): refused")
    return path


def read_regular_file(path: str | Path, limit: int, folder: str | Path | None = None,
                      part: bool = False) -> bytes:
    """The bytes of a regular file (see checked_regular_file), at most ``limit`` of them.

    Opened with O_NONBLOCK and checked again on the open handle, so a file swapped for a
    FIFO after the check cannot block either. A longer file is an error, or with
    ``part=True`` its first ``limit`` bytes.
    """
    path = checked_regular_file(path, folder)
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(descriptor, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise CheckpointLoadError(f"{path}: not a regular file: refused")
        data = handle.read(limit if part else limit + 1)
    if len(data) > limit:
        raise CheckpointLoadError(f"{path}: larger than the {limit} bytes allowed here")
    return data


class InspectionLimit(ValueError):
    """An input went past one of the MAX_* limits; the message names the limit."""


class Global:
    """A name a pickle references, as (module, name): never imported, never resolved."""

    __slots__ = ("module", "name")

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    @property
    def full(self) -> str:
        """The dotted spelling torch uses in its allow-list and its error messages."""
        return f"{self.module}.{self.name}"


class Call:
    """What a pickle asks to be called (REDUCE, NEWOBJ, NEWOBJ_EX, INST, OBJ), never called:
    ``func`` (a Global, or another Call when the pickle calls a call's result), ``args``,
    and what BUILD, SETITEM(S) and APPEND(S) later give the result."""

    __slots__ = ("func", "args", "state", "items", "opcode")

    def __init__(self, func: Any, args: Any, opcode: str) -> None:
        self.func, self.args, self.opcode = func, args, opcode
        self.state: Any = None
        self.items: dict = {}

    @property
    def name(self) -> str:
        """The called global's full name, or a placeholder when the pickle calls a value."""
        return self.func.full if isinstance(self.func, Global) else "<a call's result>"


class Storage:
    """A persistent id (torch.save's reference to a tensor's bytes in another record)."""

    __slots__ = ("pid",)

    def __init__(self, pid: Any) -> None:
        self.pid = pid


# The opcodes torch's weights_only unpickler executes (torch/_weights_only_unpickler.py,
# load()); any other opcode makes torch.load(weights_only=True) refuse the file outright.
WEIGHTS_ONLY_OPCODES = frozenset(b"c\x81Rbaesu(t\x85\x86\x87N\x88\x89)]}\x8fJKMGXUQhjqr\x8a\x80.")


_NOT_A_CONSTANT = object()


class _OpcodeReader:
    """The byte side of StubUnpickler: reads opcodes and their arguments from ``data``,
    never past its end, and decodes the opcodes that push a plain value (numbers, text,
    bytes, None, booleans): no global, no call, nothing to stub."""

    def __init__(self, data: bytes, start: int) -> None:
        self.data, self.view, self.pos = data, memoryview(data), start

    def opcode(self) -> int:
        """The next opcode byte (a pickle that ends before its STOP is truncated)."""
        if self.pos >= len(self.data):
            raise ValueError("the pickle ends early (no STOP opcode; truncated?)")
        self.pos += 1
        return self.data[self.pos - 1]

    def take(self, count: int) -> bytes:
        """``count`` bytes of argument; a length that points past the end is refused before
        anything is allocated (a BINBYTES8 may claim 2**63 bytes)."""
        if count < 0 or self.pos + count > len(self.data):
            raise ValueError("the pickle ends early (truncated?)")
        self.pos += count
        return bytes(self.view[self.pos - count:self.pos])

    def line(self) -> bytes:
        """A protocol-0 argument: text up to a newline (at most 1 MB of it)."""
        end = self.data.find(b"\n", self.pos, min(len(self.data), self.pos + 1_000_000))
        if end < 0:
            raise ValueError("a text opcode without its newline (truncated?)")
        text, self.pos = bytes(self.view[self.pos:end]), end + 1
        return text

    def number(self, kind: str, width: int) -> int:
        """A little-endian integer argument, ``"s"`` signed or ``"u"`` unsigned."""
        return int.from_bytes(self.take(width), "little", signed=kind == "s")

    def constant(self, op: int) -> Any:  # noqa: C901 - one branch per opcode
        """The value a constant opcode pushes, or _NOT_A_CONSTANT for any other opcode."""
        char = chr(op)
        if char in "NK":  # NONE, BININT1
            return None if char == "N" else self.take(1)[0]
        if op in (0x88, 0x89):  # NEWTRUE, NEWFALSE
            return op == 0x88
        if char in "JM":  # BININT (signed, 4 bytes), BININT2
            return self.number("s", 4) if char == "J" else self.number("u", 2)
        if op in (0x8A, 0x8B):  # LONG1, LONG4: the digits' length, then the digits
            length = self.number("u", 1) if op == 0x8A else self.number("s", 4)
            if length > MAX_INT_BYTES:
                raise InspectionLimit(f"an integer of {length} bytes (over MAX_INT_BYTES = "
                                      f"{MAX_INT_BYTES})")
            return int.from_bytes(self.take(length), "little", signed=True)
        if char == "G":  # BINFLOAT
            return struct.unpack(">d", self.take(8))[0]
        if char in "IL":  # INT, LONG (text; int() refuses more than 4,300 digits)
            text = self.line().rstrip(b"L")
            return {b"00": False, b"01": True}[text] if text in (b"00", b"01") else int(text)
        if char == "F":  # FLOAT (text)
            return float(self.line())
        if char in "XUTCB" or op in (0x8C, 0x8D, 0x8E, 0x96):  # text and bytes, sized
            width = {"X": 4, "U": 1, "T": 4, "C": 1, "B": 4, "\x8c": 1}.get(char, 8)
            raw = self.take(self.number("u", width))
            if char == "X" or op in (0x8C, 0x8D):  # BINUNICODE, SHORT_/BINUNICODE8
                return raw.decode("utf-8", "surrogatepass")
            # SHORT_BINSTRING, BINSTRING are Python 2 str (latin-1); the rest are bytes
            return raw.decode("latin-1") if char in "UT" else raw
        if char == "S":  # STRING (text, quoted)
            text = self.line()
            if len(text) < 2 or text[:1] != text[-1:] or text[:1] not in b"'\"":
                raise ValueError("a STRING opcode without quotes")
            return codecs.escape_decode(text[1:-1])[0].decode("latin-1")
        if char == "V":  # UNICODE (text)
            return self.line().decode("raw-unicode-escape")
        return _NOT_A_CONSTANT


class PickleRecords:
    """The records side of StubUnpickler: each global met, as a Global (linear time: a dict
    keyed by (module, name)); each call, as a Call; every object counted against its limit;
    constructs it cannot follow described in ``unfollowable``; opcodes seen in ``opcodes``.
    """

    def __init__(self) -> None:
        self.globals: dict[tuple[str, str], Global] = {}
        self.unfollowable: list[str] = []
        self.opcodes: set[int] = set()
        self.dtype_codes: set[str] = set()  # arguments of numpy.dtype(...), see below
        self.count = self.objects = 0
        self.depth: dict[int, int] = {}  # id -> nesting depth of tuples, kept alive in `keep`
        self.size: dict[int, int] = {}  # id -> values a tuple expands to (capped), see _hashed
        self.keep: list[Any] = []
        self.end = 0

    def _global(self, module: Any, name: Any) -> Global:
        """The one Global record of (module, name), created on first sight.

        Both must be text (STACK_GLOBAL takes them from the stack, where a pickle can put
        anything). Python 2 names (``__builtin__``, ``copy_reg``) are mapped the way torch's
        own weights_only unpickler maps them, so the pairs compare with its allow-list.
        """
        if not isinstance(module, str) or not isinstance(name, str):
            raise ValueError("a global whose module or name is not text")
        # Protocol 2 pickles (torch.save's) use Python 2's names; torch maps them back.
        module, name = NAME_MAPPING.get((module, name), (IMPORT_MAPPING.get(module, module),
                                                         name))
        record = self.globals.get((module, name))
        if record is None:
            if len(self.globals) >= MAX_GLOBALS:
                raise InspectionLimit(f"more than MAX_GLOBALS = {MAX_GLOBALS} distinct globals")
            record = self.globals[(module, name)] = Global(module, name)
        return record

    def _new(self, value: Any, items: Any = ()) -> Any:
        """Count a built object; a tuple's depth is tracked (hashing nests as deep)."""
        self.objects += 1
        if self.objects > MAX_OBJECTS:
            raise InspectionLimit(f"more than MAX_OBJECTS = {MAX_OBJECTS} objects")
        if items:
            depth = 1 + max((self.depth.get(id(item), 0) for item in items), default=0)
            if depth > MAX_DEPTH:
                raise InspectionLimit(f"nested deeper than MAX_DEPTH = {MAX_DEPTH}")
            if isinstance(value, (tuple, frozenset)):
                self.depth[id(value)] = depth
                self.size[id(value)] = min(MAX_KEY_SIZE + 1, 1 + sum(
                    self.size.get(id(item), 1) for item in items))
                self.keep.append(value)
        return value

    def _hashed(self, values: Any) -> Any:
        """``values`` about to be hashed (dict keys, set elements), once each is known small.

        Hashing a tuple hashes every value inside it, and comparing two equal hashes walks
        both: a tuple built of shared references, (x, x) sixty times over, is 311 bytes of
        pickle and 2**60 values to hash. Its expanded size, tracked as it is built, must stay
        within MAX_KEY_SIZE (a Call, a Global, a Storage hash by identity: one value each).
        """
        for value in values:
            if self.size.get(id(value), 1) > MAX_KEY_SIZE:
                raise InspectionLimit(f"a dict key or set element of more than MAX_KEY_SIZE = "
                                      f"{MAX_KEY_SIZE} values (shared references expand it)")
        return values

    def _call(self, func: Any, args: Any, opcode: str) -> Call:
        """Record a call instead of making it. A call of anything but a plain Global (the
        result of another call, a value) is a construct no allow-list can judge: it goes
        to ``unfollowable``, and the report calls the file dangerous or unknown."""
        if not isinstance(func, Global):
            self.unfollowable.append(f"{opcode} calls something that is not a plain global "
                                     f"(a call's result or a value): {_short(func)}")
        elif func.full == "numpy.dtype" and isinstance(args, tuple) and args \
                and isinstance(args[0], str):
            self.dtype_codes.add(args[0][:8])
        return self._new(Call(func, args, opcode))


class StubUnpickler(PickleRecords):
    """Reads a pickle (protocols 0 to 5) into Global/Call/Storage records; runs nothing.

    A pickle is a program for a small stack machine: push values, look up a global, call it,
    store into the memo. This machine does every step except the dangerous ones: a global
    is recorded, never imported; a call is recorded, never made. Every resource is bounded
    (MAX_OPCODES, MAX_OBJECTS, MAX_MEMO, MAX_DEPTH, MAX_GLOBALS). ``load(data, start)``
    reads one pickle from ``data`` at ``start`` and returns its object; ``end`` is where
    it stopped. ``globals`` maps each (module, name) to its record, first seen first;
    ``unfollowable`` describes constructs it cannot follow (a call of a call's result, an
    extension code); ``opcodes`` is the set of opcodes seen.
    """

    def load(self, data: bytes, start: int = 0) -> Any:  # noqa: C901 - one branch per opcode
        """Run the pickle that starts at ``data[start]`` up to its STOP; return its object."""
        stack: list[Any] = []
        marks: list[list[Any]] = []
        memo: dict[int, Any] = {}
        reader = _OpcodeReader(data, start)
        take, line, number = reader.take, reader.line, reader.number

        def pop_mark() -> list[Any]:
            """The values pushed since the last MARK; the stack below it becomes current."""
            nonlocal stack
            if not marks:
                raise ValueError("an opcode that needs a MARK without one")
            items, stack = stack, marks.pop()
            return items

        def push(value: Any) -> None:
            """Push a value; DUP and GET push without building, so the stack is bounded too."""
            stack.append(value)
            if len(stack) > MAX_OBJECTS:
                raise InspectionLimit(f"more than MAX_OBJECTS = {MAX_OBJECTS} on the stack")

        while True:
            op = reader.opcode()
            self.count += 1
            if self.count > MAX_OPCODES:
                raise InspectionLimit(f"more than MAX_OPCODES = {MAX_OPCODES} instructions")
            self.opcodes.add(op)
            char = chr(op)
            # Constants first (most opcodes of a real pickle): they push a plain value and
            # touch nothing. Then the stack, the structures, the calls and the memo.
            value = reader.constant(op)  # None, a number, a text, bytes: no stub needed
            if value is not _NOT_A_CONSTANT:
                push(self._new(value) if isinstance(value, (str, bytes)) else value)
            elif op in (0x80, 0x95):  # PROTO, FRAME (a length hint only)
                take(1 if op == 0x80 else 8)
            elif char == ".":  # STOP
                self.end = reader.pos
                if not stack:
                    raise ValueError("STOP with an empty stack")
                return stack.pop()
            # MARK opens a group (the arguments of TUPLE, LIST, DICT, APPENDS, SETITEMS,
            # INST, OBJ); groups nest at most MAX_DEPTH deep.
            elif char == "(":  # MARK
                if len(marks) >= MAX_DEPTH:
                    raise InspectionLimit(f"MARKs nested deeper than MAX_DEPTH = {MAX_DEPTH}")
                marks.append(stack)
                stack = []
            elif char == "0":  # POP
                if stack:
                    stack.pop()
                else:
                    pop_mark()
            elif char == "1":  # POP_MARK
                pop_mark()
            elif char == "2":  # DUP
                push(stack[-1])
            elif char in ")]}" or op == 0x8F:  # EMPTY_TUPLE / LIST / DICT / SET
                push(self._new({")": (), "]": [], "}": {}}.get(char, set())
                               if op != 0x8F else set()))
            # Structures: built from the values above a MARK, or from the top 1 to 3 values.
            # A tuple's nesting depth is checked as it is built, since hashing it as a dict key
            # recurses as deep as it nests.
            elif char in "tld" or op == 0x91:  # TUPLE, LIST, DICT, FROZENSET (from a MARK)
                items = pop_mark()
                if char == "d":
                    self._hashed(items[::2])
                    push(self._new(dict(zip(items[::2], items[1::2], strict=False)), items))
                else:
                    kind = {"t": tuple, "l": list}.get(char, frozenset)
                    push(self._new(kind(self._hashed(items) if op == 0x91 else items), items))
            elif op in (0x85, 0x86, 0x87):  # TUPLE1, TUPLE2, TUPLE3
                count = op - 0x84
                if len(stack) < count:
                    raise ValueError("a TUPLE opcode with too few values")
                items = tuple(stack[-count:])
                del stack[-count:]
                push(self._new(items, items))
            # Filling a structure: a list, a set, a dict; or a Call (a list or dict subclass, or
            # any object the pickle appends to), whose items are recorded, not set on anything.
            elif char in "ae" or op == 0x90:  # APPEND, APPENDS, ADDITEMS
                items = [stack.pop()] if char == "a" else pop_mark()
                target = stack[-1]
                if isinstance(target, list) and op != 0x90:
                    target.extend(items)
                elif isinstance(target, set) and op == 0x90:
                    target.update(self._hashed(items))
                elif isinstance(target, Call):  # a list subclass, or .append of any object
                    for item in items:
                        target.items[len(target.items)] = item
                else:
                    raise ValueError(f"cannot append to {type(target).__name__}")
            elif char in "su":  # SETITEM, SETITEMS
                items = stack[-2:] if char == "s" else pop_mark()
                if char == "s":
                    del stack[-2:]
                target = stack[-1]
                if not isinstance(target, (dict, Call)):
                    raise ValueError(f"cannot set items on {type(target).__name__}")
                for key, value in zip(self._hashed(items[::2]), items[1::2], strict=False):
                    (target if isinstance(target, dict) else target.items)[key] = value
            # Globals and calls: the only opcodes with power. A global becomes a Global record
            # (its name is never imported or resolved); INST and OBJ are a global plus a call in
            # one opcode; STACK_GLOBAL takes its module and name from the stack (protocol 4).
            elif char in "cio" or op == 0x93:  # GLOBAL, INST, OBJ, STACK_GLOBAL
                if char in "ci":
                    module = line().decode("utf-8", "surrogateescape")
                    found = self._global(module, line().decode("utf-8", "surrogateescape"))
                elif char == "o":
                    items = pop_mark()
                    if not items:
                        raise ValueError("OBJ without a class")
                    self._new(None)
                    push(self._call(items[0], tuple(items[1:]), "OBJ"))
                    continue
                else:
                    if len(stack) < 2:
                        raise ValueError("STACK_GLOBAL with too few values")
                    name, module = stack.pop(), stack.pop()
                    found = self._global(module, name)
                push(self._call(found, tuple(pop_mark()), "INST") if char == "i" else found)
            elif char == "R" or op in (0x81, 0x92):  # REDUCE, NEWOBJ, NEWOBJ_EX
                kwargs = stack.pop() if op == 0x92 else None
                args, func = stack.pop(), stack.pop()
                call = self._call(func, args, {0x81: "NEWOBJ", 0x92: "NEWOBJ_EX"}.get(op,
                                                                                     "REDUCE"))
                if kwargs:
                    call.state = {"kwargs": kwargs}
                push(call)
            # BUILD would call __setstate__ or update __dict__: the state is recorded on the Call.
            # On anything else (a Global: setattr on a class) it is a construct the inspector
            # cannot follow, reported as such.
            elif char == "b":  # BUILD: __setstate__ or __dict__.update, recorded
                state, target = stack.pop(), stack[-1]
                if not isinstance(target, Call):
                    self.unfollowable.append(f"BUILD on a {type(target).__name__}")
                else:
                    target.state = state
            # A persistent id is how torch.save points at a tensor's bytes in another record
            # (archive/data/<key>): a tuple ("storage", storage class, key, location, numel).
            elif char in "PQ":  # PERSID, BINPERSID: torch.save's reference to a storage
                pid = line().decode("ascii", "replace") if char == "P" else stack.pop()
                push(self._new(Storage(pid)))
            elif op in (0x82, 0x83, 0x84):  # EXT1, EXT2, EXT4: a global by registry code
                code = number("u", {0x82: 1, 0x83: 2, 0x84: 4}[op])
                self.unfollowable.append(f"extension code {code} (EXT{op - 0x81}): a global "
                                         "the pickle names by a number from copyreg's registry")
                push(self._global("copyreg-extension", str(code)))
            # The memo: PUT stores the top value under a key, GET pushes it again (shared
            # references). A dict, bounded by MAX_MEMO entries whatever the keys.
            elif char in "hjg":  # BINGET, LONG_BINGET, GET
                key = take(1)[0] if char == "h" else number("u", 4) if char == "j" else int(
                    line())
                if key not in memo:
                    raise ValueError(f"memo key {key} is read before it is written")
                push(memo[key])
            elif char in "qrp" or op == 0x94:  # BINPUT, LONG_BINPUT, PUT, MEMOIZE
                key = (take(1)[0] if char == "q" else number("u", 4) if char == "r"
                       else int(line()) if char == "p" else len(memo))
                if key not in memo and len(memo) >= MAX_MEMO:
                    raise InspectionLimit(f"more than MAX_MEMO = {MAX_MEMO} memo entries")
                if not stack:
                    raise ValueError("a memo store with an empty stack")
                memo[key] = stack[-1]
            elif op in (0x97, 0x98):  # NEXT_BUFFER, READONLY_BUFFER (protocol 5)
                self.unfollowable.append("an out-of-band buffer (protocol 5), which a file "
                                         "cannot provide")
                if op == 0x97:
                    push(None)
            else:
                raise ValueError(f"an unknown pickle opcode {bytes([op])!r} at byte "
                                 f"{reader.pos - 1}")


OPCODE_NAMES = {op.code.encode("latin-1")[0]: op.name for op in pickletools.opcodes}


def _escape(text: str, limit: int = 120) -> str:
    """Text from a file, printable on one line: control characters, newlines, ANSI escapes
    and lone surrogates are written as repr escapes, so no file can forge a line."""
    text = text[:limit]
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _short(value: Any, limit: int = 70) -> str:
    """A value from a pickle as one short escaped line, without ever calling its repr on a
    structure (shared references make a 719-byte pickle a structure of 2**60 items)."""
    parts: list[str] = []

    def add(item: Any, depth: int) -> None:
        if sum(map(len, parts)) > limit:
            return
        if isinstance(item, (list, tuple, set, frozenset, dict)):
            if depth > 2:
                parts.append("...")
                return
            opening, closing = {list: "[]", tuple: "()", dict: "{}"}.get(type(item), "{}")
            parts.append(opening)
            pairs = item.items() if isinstance(item, dict) else ((None, v) for v in item)
            for index, (key, value) in enumerate(pairs):
                if index and sum(map(len, parts)) > limit:
                    parts.append(", ...")
                    break
                parts.append(", " if index else "")
                if isinstance(item, dict):
                    add(key, depth + 1)
                    parts.append(": ")
                add(value, depth + 1)
            parts.append(closing)
        elif isinstance(item, Global):
            parts.append(_escape(item.full))
        elif isinstance(item, Call):
            parts.append(f"<{_escape(item.name)}(...)>")
        elif isinstance(item, Storage):
            parts.append("<storage>")
        elif isinstance(item, int) and not isinstance(item, bool) and item.bit_length() > 64:
            parts.append(f"<an int of {item.bit_length()} bits>")
        elif isinstance(item, (str, bytes, bytearray)):
            parts.append(_escape(repr(item[:limit]), limit + 10))
        else:
            parts.append(_escape(repr(item)))

    add(value, 0)
    text = "".join(parts)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _shape(value: Any, name: str) -> tuple[int, ...]:
    """A tensor's shape as the pickle gives it, checked: a tuple of at most
    MAX_TENSOR_DIMENSIONS non-negative ints (torch.Size(...) is a call with one)."""
    if isinstance(value, Call) and value.name == "torch.Size" and value.args:
        value = value.args[0]
    if not isinstance(value, (tuple, list)) or len(value) > MAX_TENSOR_DIMENSIONS or not all(
            type(size) is int and 0 <= size < 2**63 for size in value):
        raise ValueError(f"tensor {_escape(name)} has an invalid shape {_short(value)}")
    return tuple(value)


@dataclasses.dataclass
class Inspection:
    """What --inspect found: the format, tensors, other entries, globals, and a verdict.

    ``status``: 0 = loads with ``weights_only=True`` as it is (or, for DCP, its .metadata
    names only DCP's own classes); 1 = refused as it is: ``needs`` the globals to review,
    ``refused_opcodes`` that no allow-list admits, ``dangerous`` what is known or suspected
    to run code; 2 = not readable, or over a limit (``problem``).
    """

    path: Path
    kind: str = "unknown"
    reader: str = "torch.load(path, map_location=\"cpu\", weights_only=True)"
    tensors: list = dataclasses.field(default_factory=list)
    entries: list = dataclasses.field(default_factory=list)
    tensor_count: int = 0
    tensor_bytes: int = 0
    globals: list = dataclasses.field(default_factory=list)
    needs: list = dataclasses.field(default_factory=list)
    refused_opcodes: list = dataclasses.field(default_factory=list)
    dangerous: list = dataclasses.field(default_factory=list)
    problem: str = ""
    status: int = 0
    unpickler: StubUnpickler | None = None
    allowed: frozenset = frozenset()
    identity: tuple = ()  # (device, inode, size, mtime) of the file when the read began

    def add_tensor(self, name: str, shape: tuple, dtype: str) -> None:
        """Count a tensor and its bytes; keep its row while fewer than MAX_LISTED are kept."""
        self.tensor_count += 1
        self.tensor_bytes += math.prod(shape) * DTYPE_BYTES.get(dtype, 0)
        if len(self.tensors) < MAX_LISTED:
            self.tensors.append((name, shape, dtype))

    def add_entry(self, name: str, summary: str) -> None:
        """Keep a non-tensor entry's row while fewer than MAX_LISTED are kept."""
        if len(self.entries) < MAX_LISTED:
            self.entries.append((name, summary))


def _tensor_info(call: Call, name: str) -> tuple[tuple, str] | None:
    """(shape, dtype) of a call that torch.load would turn into a tensor, else None.

    How torch.save pickles a tensor: a call ``torch._utils._rebuild_tensor_v2(storage,
    offset, size, stride, requires_grad, hooks)``, where ``storage`` is a persistent id
    ``("storage", torch.FloatStorage, key, location, numel)`` naming a separate record (the
    file ``archive/data/<key>`` in the zip). A Parameter wraps that in
    ``torch._utils._rebuild_parameter(tensor, requires_grad, hooks)``. So the shape is the
    third argument, and the dtype is in the storage class's name: no byte of data is read.
    """
    args = call.args if isinstance(call.args, tuple) else ()
    if call.name == "torch._utils._rebuild_parameter" and args and isinstance(args[0], Call):
        return _tensor_info(args[0], name)
    if call.name != "torch._utils._rebuild_tensor_v2" or len(args) < 3:
        return None
    pid = args[0].pid if isinstance(args[0], Storage) else None
    kind = pid[1] if isinstance(pid, tuple) and len(pid) > 1 else None
    storage = kind.name if isinstance(kind, Global) else "?"
    dtype = STORAGE_DTYPES.get(storage.removesuffix("Storage"), _escape(storage, 30))
    return _shape(args[2], name), dtype


def _join(prefix: str, key: Any) -> str:
    """The dotted name of a child: escaped, and cut (a key may be megabytes long)."""
    text = _escape(key, 100) if isinstance(key, str) else _short(key, 40)
    return (f"{prefix}.{text}" if prefix else text)[:300]


def _walk(obj: Any, prefix: str, report: Inspection, seen: dict, depth: int = 0) -> None:
    """Collect tensors ``(name, shape, dtype)`` and other entries ``(name, summary)``.

    Names are the dotted paths a reader would type: ``state_dict.backbone.0.weight`` for a
    tensor inside a Lightning checkpoint's "state_dict". A pickled module keeps its tensors
    in ``_parameters`` / ``_buffers`` of each sub-module; those levels are left out of the
    names, so they read like the module's own state_dict keys. A structure met a second time
    (shared references) is named, not walked again: the walk is linear in the pickle.
    """
    if depth > MAX_DEPTH:
        raise InspectionLimit(f"nested deeper than MAX_DEPTH = {MAX_DEPTH} at {prefix!r}")
    if isinstance(obj, Call) and (info := _tensor_info(obj, prefix)) is not None:
        report.add_tensor(prefix, *info)
        return
    if isinstance(obj, (Call, dict, list, tuple, set, frozenset)) and obj:
        if id(obj) in seen:
            report.add_entry(prefix, f"the same object as {seen[id(obj)] or 'the top'}")
            return
        seen[id(obj)] = prefix
    if isinstance(obj, Call):
        if isinstance(obj.state, dict) and "_parameters" in obj.state:  # a pickled nn.Module
            if "." not in prefix:
                report.add_entry(prefix, f"a pickled {_escape(obj.name)}")
            for part in ("_parameters", "_buffers", "_modules"):
                _walk(obj.state.get(part) or {}, prefix, report, seen, depth + 1)
            return
        if not obj.items:
            detail = obj.state if obj.state is not None else obj.args
            report.add_entry(prefix, f"{_escape(obj.name)} {_short(detail)}")
            return
        children = obj.items.items()
    elif isinstance(obj, dict):
        children = obj.items()
    elif isinstance(obj, (list, tuple)) and any(isinstance(v, (Call, dict)) for v in obj):
        children = enumerate(obj)
    else:
        report.add_entry(prefix, _short(obj))
        return
    for key, value in children:
        _walk(value, _join(prefix, key), report, seen, depth + 1)


def checked_member(folder: Path, name: Any, source: str = "the index") -> Path:
    """``folder / name`` for a name that a file (``source``: an index, a .metadata) gave: a
    plain file name, a regular file, resolving inside ``folder``; else ValueError."""
    if not isinstance(name, str) or Path(name).name != name or name in (".", ".."):
        raise ValueError(f"{source} names {_short(name)}, not a plain file name in "
                         f"{_escape(str(folder), 200)}")
    try:
        return checked_regular_file(folder / name, folder)
    except CheckpointLoadError as err:
        raise ValueError(_escape(str(err), 300)) from None


def inspect_checkpoint(path: str | Path) -> Inspection:
    """Describe any checkpoint file or folder WITHOUT running code it chooses (see Inspection).

    Only a file whose globals are all on weights_only's allow-list reaches a real loader:
    torch.load(weights_only=True), which calls those allowed functions with the file's
    arguments, under a memory cap (_memory_bound), to confirm the verdict.

    torch.save zip files and legacy (pre-1.6, non-zip) torch.save files, .safetensors
    files, a sharded safetensors folder or its model.safetensors.index.json, and a DCP
    folder (.metadata). Never raises for a bad input: the problem goes in the result, and
    what the reader saw before it stopped (a dangerous global) still goes in ``dangerous``.
    """
    # Three steps: read (StubUnpickler, bounded; any error or limit is status 2), judge
    # (the globals outside the exact allow-list, the dangers, the opcodes weights_only
    # refuses: status 1 if any), and only for a file judged loadable, confirm it with
    # torch.load(weights_only=True), whose own checks (storages, sizes) must agree.
    report = Inspection(Path(path))
    confirm = None
    with _deadline():
        try:
            confirm = _inspect_into(report)
        except Exception as err:  # any unreadable input: one line, never a traceback
            report.status = 2
            report.problem = _escape(f"{type(err).__name__}: " if not isinstance(
                err, (ValueError, CheckpointLoadError)) else "", 40) + _escape(str(err), 300)
        _judge(report)
        if report.status == 0 and (report.needs or report.refused_opcodes
                                   or report.dangerous):
            report.status = 1
        gpu = [name for name in report.globals if name in CUDA_TENSOR_CLASSES]
        if report.status == 0 and gpu and torch.cuda.is_available():
            # torch.cuda.FloatTensor and kin are on the allow-list, and they allocate GPU
            # memory, which RLIMIT_AS (the confirming load's memory cap) does not bound.
            # (torch.cuda.FloatStorage, which torch <= 1.12 wrote for every GPU tensor, is
            # only a storage-type marker for weights_only: it is never called.)
            report.status, report.problem = 2, (
                f"it names {_escape(gpu[0])}, a constructor that allocates GPU memory of a size "
                "the file chooses, outside the confirming load's memory cap: not confirmed")
        if report.status == 0 and confirm is not None:
            try:  # every byte of the pickle was read above; now torch's own loader confirms
                confirm()
            except Exception as err:
                report.status, report.problem = 2, _escape(first_line(err), 300)
    return report


@contextlib.contextmanager
def _deadline() -> Iterator[None]:
    """MAX_SECONDS for the block, by SIGALRM (main thread only, where Python allows it):
    past it an InspectionLimit is raised wherever the inspection is, and becomes status 2.
    A timer someone else had set (a test's guard) is put back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise InspectionLimit(f"the inspection took over MAX_SECONDS = {MAX_SECONDS} s")

    started = time.monotonic()
    previous_handler = signal.signal(signal.SIGALRM, expire)
    previous_timer, _ = signal.setitimer(signal.ITIMER_REAL, MAX_SECONDS)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_handler)
        if previous_timer:
            left = previous_timer - (time.monotonic() - started)
            signal.setitimer(signal.ITIMER_REAL, max(left, 0.001))


# The advice prints each global's module and name as code (an import line, a list), so a
# name is advice only if it IS a name: a module "argparse;exec(bytes(...))" would otherwise
# print "import argparse;exec(...)", which runs when pasted. Every dotted part of the module
# and the name must be an ASCII identifier and not a keyword; anything else is refused.
def python_name(record: Global) -> bool:
    """Whether ``record``'s module parts and name are plain ASCII Python identifiers."""
    return all(part.isascii() and part.isidentifier() and not keyword.iskeyword(part)
               for part in [*record.module.split("."), record.name])


def _judge(report: Inspection) -> None:
    """Which globals need review (all outside the exact allow-list), which are known or
    suspected to run code, which opcodes weights_only never executes.

    It runs even when the read stopped early, on what was seen before the stop: a file cut
    off by a limit right after naming os.system still has os.system named in its report.
    """
    unpickler = report.unpickler
    if unpickler is None:
        return
    report.globals = [record.full for record in unpickler.globals.values()]
    report.needs = [record.full for key, record in unpickler.globals.items()
                    if key not in report.allowed]
    numpy_classes = numpy_dtype_classes(unpickler) if report.needs else []
    report.needs += [name for name in numpy_classes if name not in report.needs]
    report.dangerous = [
        f"{_escape(record.full)} " + ("is a dotted name (an attribute path); no inspector "
                                      "resolves it, and it can reach anything"
                                      if "." in record.name else "is named by a registry code "
                                      "nobody can check" if record.module == "copyreg-extension"
                                      else "is not a Python name (pasted as advice, it would be "
                                      "code)" if not python_name(record)
                                      else "can run code (it is on the known-dangerous list)")
        for key, record in unpickler.globals.items() if key not in report.allowed and (
            "." in record.name or KNOWN_DANGEROUS.match(record.full)
            or record.module == "copyreg-extension" or not python_name(record))]
    report.dangerous += [_escape(text, 200) for text in unpickler.unfollowable[:10]]
    if report.kind.startswith(("torch.save", "legacy")):
        report.refused_opcodes = sorted({OPCODE_NAMES.get(op, hex(op)) for op in
                                         unpickler.opcodes - WEIGHTS_ONLY_OPCODES})


def _inspect_into(report: Inspection) -> Callable[[], Any] | None:
    """Tell the format by its first bytes (never by the file name, which anyone can choose).

    ``PK\x03\x04`` starts a zip archive (torch.save since 1.6); a safetensors file starts
    with the length of its JSON header as 8 little-endian bytes (a small number, at most
    the file's size), then the header's ``{``; ``\x80`` starts a pickle of protocol 2 or
    more (legacy torch.save).
    Returns the torch.load that confirms a file judged loadable, if there is one.
    """
    path = report.path
    if path.is_dir():
        if os.path.lexists(path / ".metadata"):
            return _inspect_dcp(report)
        index = sorted(path.glob("*.safetensors.index.json"))
        if index:
            report.path = checked_regular_file(index[0], path)
            return _inspect_sharded(report)
        raise ValueError("a folder with neither a DCP .metadata file nor a "
                         "*.safetensors.index.json")
    if not os.path.lexists(path):
        raise ValueError("no such file or folder")
    checked_regular_file(path)
    report.identity = file_identity(os.stat(path))
    if path.name.endswith(".index.json"):
        return _inspect_sharded(report)
    size = path.stat().st_size
    if size == 0:
        raise ValueError("the file is empty (0 bytes); was the save interrupted?")
    head = read_regular_file(path, 9, part=True)
    if head[:4] == b"PK\x03\x04":
        return _inspect_torch_zip(report)
    # safetensors before pickle: its first byte is the header length's low byte, 0x80 for
    # one file in 256 (length % 256 == 128), so a 0x80 alone does not mean a pickle. The
    # JSON header starts with "{" at byte 8; a legacy file has a byte of torch's magic there.
    if len(head) == 9 and int.from_bytes(head[:8], "little") + 8 <= size and head[8:] == b"{":
        return _inspect_safetensors(report)  # an 8-byte header length, then JSON
    if head[:1] == b"\x80":  # a pickle (protocol 2+): the legacy torch.save format
        return _inspect_legacy(report)
    hint = "; the name says ONNX: read it with onnx.load (04)" if path.suffix == ".onnx" else ""
    raise ValueError(f"not a checkpoint format this knows (starts with {head[:4]!r}){hint}")


# Why not torch.serialization.get_unsafe_globals_in_checkpoint, as before: it answers for zip
# files only, compares "module.name" strings (a dotted name is one string like any other),
# and is one more reader of the hostile bytes. The allow-list it uses is the one below.
# The legacy dense CUDA tensor constructors (torch.cuda.FloatTensor...): called with a size,
# each allocates that much GPU memory. (The torch.cuda.sparse ones allocate nothing for a size,
# and the torch.cuda.*Storage names are storage-type markers that weights_only never calls.)
CUDA_TENSOR_CLASSES = frozenset(f"{cls.__module__}.{cls.__name__}" for cls in torch._tensor_classes
                                if cls.__module__ == "torch.cuda")


def _weights_only_allowed() -> frozenset:
    """The exact (module, name) pairs torch.load(weights_only=True) accepts in this process:
    its built-in allow-list (torch keeps it in a private module; there is no public function
    for it) and whatever add_safe_globals / safe_globals allowed."""
    from torch._weights_only_unpickler import _get_allowed_globals

    names = set(_get_allowed_globals())
    for item in torch.serialization.get_safe_globals():
        names.add(item[1] if isinstance(item, tuple) else
                  f"{getattr(item, '__module__', '')}.{getattr(item, '__qualname__', '')}")
    return frozenset(tuple(name.rsplit(".", 1)) for name in names)


def _zip_directory_bytes(path: Path) -> int:
    """The size of a zip's central directory, read from its end record before zipfile
    builds one object per member (zip64 included).

    A zip ends with a 22-byte "end of central directory" record (signature PK\x05\x06;
    the directory's size at offset 12), possibly after a comment of up to 65,535 bytes, so
    the last 65,557 bytes hold it. A zip64 archive stores 0xFFFFFFFF there and the real
    size in a zip64 end record, which the locator PK\x06\x07 just before points to.
    """
    size = path.stat().st_size
    with path.open("rb") as handle:
        handle.seek(max(0, size - 65_557))
        tail = handle.read()
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) - at < 22:
            raise ValueError("truncated or corrupted: it starts like a torch.save archive but "
                             "its end (the zip directory) is missing")
        directory = struct.unpack_from("<I", tail, at + 12)[0]
        locator = tail.rfind(b"PK\x06\x07", 0, at)
        if directory == 0xFFFFFFFF and locator >= 0:  # zip64: the real size is elsewhere
            handle.seek(struct.unpack_from("<Q", tail, locator + 8)[0] + 40)
            directory = struct.unpack("<Q", handle.read(8))[0]
    return directory


def _inspect_torch_zip(report: Inspection) -> Callable[[], Any]:
    """A torch.save archive: ``<name>/data.pkl`` holds the pickle, ``<name>/data/<key>``
    the raw storages. The pickle is read with StubUnpickler, bounded before and while it is
    decompressed; only a file judged loadable is then opened with weights_only=True (mmap:
    the data is mapped, not read) to confirm it."""
    report.kind = "torch.save zip archive"
    if _zip_directory_bytes(report.path) > MAX_ZIP_DIRECTORY_BYTES:
        raise InspectionLimit(f"a zip directory over MAX_ZIP_DIRECTORY_BYTES = "
                              f"{MAX_ZIP_DIRECTORY_BYTES}")
    with zipfile.ZipFile(report.path) as archive:
        names = archive.namelist()
        # Three kinds of zip end in .pt or .pt2, and only one is a checkpoint. A TorchScript
        # archive (constants.pkl, code/) and a torch.export / AOTInductor package
        # (archive_format) hold programs: say which loader opens them, instead of the
        # obscure error torch.load would give. Decided by the members, never by the name.
        # Neither loader is safe for a file from a stranger: torch.export.load unpickles
        # weights and constants saved with pickle by torch.load(weights_only=False), opaque
        # objects by pickle.loads (torch/export/pt2_archive/_package.py), so the advice says so.
        if any(n.endswith("/archive_format") for n in names):
            raise ValueError("a .pt2 package (torch.export.save or AOTInductor), not a "
                             "checkpoint: open it with torch.export.load or "
                             "torch._inductor.aoti_load_package (05 sections 3-4), ONLY if "
                             "you trust it or verified its hash: they unpickle parts of it "
                             "with weights_only=False")
        if any(n.endswith("/constants.pkl") for n in names):
            raise ValueError("a TorchScript archive (torch.jit.save), not a torch.save "
                             "checkpoint: open it with torch.jit.load (05 section 2)")
        pickles = [n for n in names if n.endswith("/data.pkl")]
        if not pickles:
            raise ValueError("a zip file, but not a torch.save archive (no data.pkl)")
        info = archive.getinfo(min(pickles, key=len))
        # torch.save stores members uncompressed. zipfile bounds a deflate stream's output
        # per read, but decompresses a bzip2 or lzma chunk whole: refuse those unread.
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise ValueError(f"data.pkl is compressed with zip method {info.compress_type}; "
                             "torch.save never writes that")
        if info.file_size > MAX_PICKLE_BYTES:  # the header's claim, before reading
            raise InspectionLimit(f"data.pkl claims {info.file_size} bytes, over "
                                  f"MAX_PICKLE_BYTES = {MAX_PICKLE_BYTES}")
        chunks, total = [], 0
        with archive.open(info) as handle:  # and the real size, while streaming
            while chunk := handle.read(1 << 20):
                total += len(chunk)
                if total > MAX_PICKLE_BYTES:
                    raise InspectionLimit(f"data.pkl decompresses past MAX_PICKLE_BYTES = "
                                          f"{MAX_PICKLE_BYTES}")
                chunks.append(chunk)
    report.unpickler, report.allowed = StubUnpickler(), _weights_only_allowed()
    _walk(report.unpickler.load(b"".join(chunks)), "", report, {})
    return lambda: _confirm_load(report.path, mmap=True, identity=report.identity)


def _inspect_legacy(report: Inspection) -> Callable[[], Any]:
    """The pre-zip format: magic number, protocol, system info, then the object's pickle,
    then the storages' raw bytes. The four pickles are read with StubUnpickler.

    The file is not a zip, so nothing says where the pickles end: the first
    MAX_PICKLE_BYTES of it are read, and pickles that run past them are over the limit
    (a legacy file's pickles are small; its size is in the storages that follow them).
    """
    report.kind = "legacy torch.save file (pre-zip, before torch 1.6)"
    data = read_regular_file(report.path, MAX_PICKLE_BYTES, part=True)
    report.unpickler, report.allowed = StubUnpickler(), _weights_only_allowed()
    unpickler, position = report.unpickler, 0
    try:
        for step in ("magic", "protocol", "system", "object"):
            value = unpickler.load(data, position)
            position = unpickler.end
            if step == "magic" and value != 0x1950A86A20F9469CFC6C:  # torch's legacy magic
                raise ValueError("a pickle, but not a torch.save file (no torch magic number)")
    except ValueError as err:
        if len(data) == MAX_PICKLE_BYTES and "ends early" in str(err):
            raise InspectionLimit(f"pickles longer than MAX_PICKLE_BYTES = "
                                  f"{MAX_PICKLE_BYTES}") from None
        raise
    _walk(value, "", report, {})
    return lambda: _confirm_load(report.path, mmap=False, identity=report.identity)


def file_identity(status: os.stat_result) -> tuple:
    """(device, inode, size, modification time): what tells one file's version from another."""
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns


# Swap after the check: the inspector reads the path, and torch.load would open the path
# again; a file replaced in between (a FIFO, another checkpoint) is not the one judged. So
# the confirming load opens the file once (O_NONBLOCK: a FIFO cannot block it), checks on
# that handle that it is still the regular file whose identity the read began with, and
# torch.load reads THAT handle through /proc/self/fd/N (on Linux; elsewhere the handle).
# The limit: the zip and safetensors readers still open by path after the first check, so
# a file swapped away and back with its old inode and time forged is not detected.
def _confirm_load(path: Path, mmap: bool, identity: tuple = ()) -> None:
    """torch.load(weights_only=True) of the file StubUnpickler judged loadable, read from
    one handle checked to be that same file, with memory bounded (see _memory_bound)."""
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(descriptor, "rb") as handle:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode) or (identity and file_identity(status) != identity):
            raise CheckpointLoadError(f"{path}: changed between the inspection and the "
                                      "confirming load: refused")
        pinned = f"/proc/self/fd/{descriptor}"
        # Warnings the file's calls raise (a deprecated sparse or cuda constructor) are not
        # printed: stderr stays empty, and the verdict line is the inspector's alone.
        with warnings.catch_warnings(), _memory_bound(path):
            warnings.simplefilter("ignore")
            if os.path.exists(pinned):
                torch.load(pinned, map_location="cpu", weights_only=True, mmap=mmap)
            else:
                torch.load(handle, map_location="cpu", weights_only=True)


# An allowed global is not a harmless call: weights_only=True allows builtins.bytearray and
# torch.FloatTensor, and a 60-byte pickle calls them on 2**30. Checking every argument of
# every allowed call is a list that never ends, so the confirming load runs with the
# process's address space capped (RLIMIT_AS, Linux and macOS) at what it uses now, plus the
# file's size (mapped or read), plus MAX_CONFIRM_BYTES: past that, an allocation fails and
# the file is refused with exit status 2 instead of taking the machine's memory.
@contextlib.contextmanager
def _memory_bound(path: Path) -> Iterator[None]:
    """Cap this process's address space for the block (where the platform allows it);
    a failed allocation inside it becomes an InspectionLimit naming MAX_CONFIRM_BYTES."""
    try:
        import resource

        pages = int(Path("/proc/self/statm").read_text().split()[0])
    except (ImportError, OSError, ValueError):
        resource = None  # no resource module or no /proc: the load runs uncapped
    if resource is not None:
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = pages * os.sysconf("SC_PAGE_SIZE") + path.stat().st_size + MAX_CONFIRM_BYTES
        cap = min([cap] + [limit for limit in (soft, hard) if limit != resource.RLIM_INFINITY])
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    except (MemoryError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and "allocate" not in str(err):
            raise
        raise InspectionLimit(f"the confirming torch.load needed more than the file's size "
                              f"+ MAX_CONFIRM_BYTES = {MAX_CONFIRM_BYTES} of memory (an "
                              "allowed call with a huge argument)") from None
    finally:
        if resource is not None:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _inspect_safetensors(report: Inspection) -> None:
    """A JSON header (its length first, as 8 little-endian bytes), then raw tensor bytes.
    The length is checked against MAX_SAFETENSORS_HEADER before safetensors reads it."""
    report.kind = "safetensors (no code possible: a JSON header and raw tensor bytes)"
    report.reader = "safetensors.torch.load_file(path)"
    header = int.from_bytes(read_regular_file(report.path, 8, part=True), "little")
    if header > MAX_SAFETENSORS_HEADER:
        raise InspectionLimit(f"a header of {header} bytes, over MAX_SAFETENSORS_HEADER = "
                              f"{MAX_SAFETENSORS_HEADER}")
    with safe_open(report.path, framework="pt") as handle:
        for name in handle.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
            view = handle.get_slice(name)
            code = view.get_dtype()
            report.add_tensor(_escape(name), _shape(tuple(view.get_shape()), name),
                              SAFETENSORS_DTYPES.get(code, _escape(code.lower(), 20)))
        for key, value in sorted((handle.metadata() or {}).items())[:MAX_LISTED]:
            report.add_entry(_escape(key), _short(value))


def _inspect_sharded(report: Inspection) -> None:
    """A model.safetensors.index.json and the shard files it names (in its folder)."""
    # The index and the shard names come from whoever published the files: each shard must
    # be a plain name of a regular file inside the index's folder, and the shards must hold
    # exactly the tensors the index lists (a tensor in no shard is a broken download).
    report.kind = "sharded safetensors (an index file and its shards)"
    report.reader = "load_sharded_safetensors(index) (01 section 13d)"
    index = json.loads(read_regular_file(report.path, MAX_INDEX_BYTES))
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise ValueError("an index without a \"weight_map\" object")
    folder, names = report.path.parent, set()
    for shard in sorted({_short(v) if not isinstance(v, str) else v
                         for v in weight_map.values()}):
        part = Inspection(checked_member(folder, shard))
        _inspect_safetensors(part)
        report.tensor_count += part.tensor_count
        report.tensor_bytes += part.tensor_bytes
        report.tensors += part.tensors[:MAX_LISTED - len(report.tensors)]
        with safe_open(part.path, framework="pt") as handle:
            names.update(handle.keys())
    if names != set(weight_map):
        raise ValueError(f"the index and the shards disagree on {len(names ^ set(weight_map))}"
                         " tensor names")
    metadata = index.get("metadata")
    for key, value in sorted(metadata.items() if isinstance(metadata, dict) else [],
                             key=lambda item: str(item[0]))[:MAX_LISTED]:
        report.add_entry(_escape(str(key)), _short(value))


# The exact (module, name) pairs a DCP .metadata written by torch's own dcp.save uses (read
# from real ones): its dataclasses, torch.Size, the layout helper, dtypes, memory formats.
DCP_GLOBALS = frozenset(
    [("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")]
    + [("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
       ("torch.distributed.checkpoint.planner", "LoadItemType"),
       ("torch.distributed.checkpoint.planner", "WriteItemType"),
       ("torch", "Size"), ("torch.serialization", "_get_layout"),
       ("collections", "OrderedDict"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath")]
    + [("torch", name) for name in ("contiguous_format", "channels_last", "preserve_format",
                                    "channels_last_3d", *STORAGE_DTYPES.values())])


# A DCP folder's .metadata, read by StubUnpickler: a Metadata record whose state holds
# "state_dict_metadata", {key: TensorStorageMetadata(properties, size, chunks) or
# BytesStorageMetadata}. TensorProperties pickles as a tuple (dtype, layout, requires_grad,
# memory-format code, pin_memory) through its __getstate__; the dtype is a Global such as
# torch.float32, and the size a call torch.Size((rows, columns)). Everything the report
# shows is read from those records; none of them is ever turned into a real object.
def _inspect_dcp(report: Inspection) -> None:
    """A torch.distributed.checkpoint folder. Its .metadata file is a PLAIN pickle, which
    DCP's own reader (FileSystemReader.read_metadata) loads with pickle.load: a hostile
    folder runs code there. So only StubUnpickler reads it; the keys, shapes and dtypes
    come from the records, and no byte of it ever reaches DCP's reader."""
    report.kind = "torch.distributed.checkpoint (DCP) folder"
    report.reader = ("torch.distributed.checkpoint.load (its .metadata names only DCP's own "
                     "classes)")
    data = read_regular_file(report.path / ".metadata", MAX_PICKLE_BYTES, report.path)
    report.unpickler, report.allowed = StubUnpickler(), DCP_GLOBALS
    metadata = report.unpickler.load(data)
    if any(key not in DCP_GLOBALS for key in report.unpickler.globals):
        return  # names outside DCP's own: the verdict lists them, whatever the structure
    state = metadata.state if isinstance(metadata, Call) else None
    items = state.get("state_dict_metadata") if isinstance(state, dict) else None
    storage = state.get("storage_data") if isinstance(state, dict) else None
    if not isinstance(items, dict):
        raise ValueError(".metadata does not hold a DCP Metadata with a state_dict_metadata")
    for name, item in list(items.items())[:MAX_OBJECTS]:
        if not isinstance(name, str):
            raise ValueError(f".metadata has a key that is not text: {_short(name)}")
        fields = item.state if isinstance(item, Call) and isinstance(item.state, dict) else {}
        if isinstance(item, Call) and item.name.endswith(".TensorStorageMetadata"):
            properties = fields.get("properties")
            state = properties.state if isinstance(properties, Call) else None
            dtype = state.get("dtype") if isinstance(state, dict) else (  # __getstate__'s tuple
                state[0] if isinstance(state, tuple) and state else None)
            report.add_tensor(_escape(name), _shape(fields.get("size"), name),
                              _escape(dtype.name, 30) if isinstance(dtype, Global) else "?")
        else:
            report.add_entry(_escape(name), "a non-tensor value (pickled bytes)")
    _check_dcp_storage(report.path, storage)
    if report.entries:  # default_planner.py, DefaultLoadPlanner.load_bytes
        report.unpickler.unfollowable.append(
            f"{len(report.entries)} non-tensor values, which dcp.load unpickles with "
            "torch.load(weights_only=False); this inspector does not read them")


# Where dcp.load reads each tensor's bytes: .metadata's storage_data maps every chunk to a
# _StorageInfo(relative_path, offset, length), and FileSystemReader opens folder /
# relative_path. A hostile "../outside/__0_0.distcp" reads another folder's file (any file
# of yours) into the model; so each one must be a plain file name of a regular file inside
# the folder, checked like an index's shards, and offset + length must lie within it.
def _check_dcp_storage(folder: Path, storage: Any) -> None:
    """Every (relative_path, offset, length) of a DCP .metadata's storage_data: a regular
    file inside ``folder``, the byte range within it; else ValueError naming it."""
    if not isinstance(storage, dict):
        raise ValueError(".metadata has no storage_data table (where the tensors' bytes are)")
    sizes: dict[str, int] = {}
    for info in storage.values():
        fields = info.state if isinstance(info, Call) and isinstance(info.state, dict) else {}
        name, offset, length = (fields.get(k) for k in ("relative_path", "offset", "length"))
        if not isinstance(name, str) or name not in sizes:  # never hash a stub (a tuple)
            sizes[name] = checked_member(folder, name, ".metadata").stat().st_size
        if not (type(offset) is int and type(length) is int and offset >= 0 and length >= 0
                and offset + length <= sizes[name]):
            raise ValueError(f".metadata places a tensor at {_short(offset)} + {_short(length)}"
                             f" bytes of {_escape(name)}, past its end ({sizes[name]} bytes)")


def numpy_dtype_classes(unpickler: StubUnpickler) -> list[str]:
    """The NumPy 2 dtype classes a file needs besides ``numpy.dtype`` itself.

    ``numpy.dtype("f8")`` returns an instance of ``numpy.dtypes.Float64DType``, and
    weights_only=True refuses to build it unless that class is allowed too; the class never
    appears in the pickle, so get_unsafe_globals_in_checkpoint cannot list it. (Parsing a
    dtype code like "f8" is data parsing: nothing of the file runs.)
    """
    return sorted({f"numpy.dtypes.{type(np.dtype(code)).__name__}"
                   for code in unpickler.dtype_codes if re.fullmatch(r"[<>|=]?[a-zA-Z]\d*", code)})


def safe_globals_line(names: list[str]) -> str:
    """The lines that allow exactly ``names`` for one load: each full module path imported
    (``import common.models``, not ``import common``), then ``safe_globals([...])``. NumPy
    1's numpy.core.* names use the (object, "name as the file spells it") pair form, since
    NumPy 2 renamed the module numpy._core."""
    items, modules = [], {"torch"}
    for name in names:
        module, _, attribute = name.rpartition(".")
        if module.startswith("numpy.core"):
            module = module.replace("numpy.core", "numpy._core", 1)
            items.append(f"({module}.{attribute}, {name!r})")
        else:
            items.append(name)
        modules.add(module)
    return (f"import {', '.join(sorted(modules))}\n"
            "with torch.serialization.safe_globals([" + ", ".join(items) + "]):\n"
            "    torch.load(path, map_location=\"cpu\", weights_only=True)")


def say(text: str) -> None:
    """Print a line whatever the console's encoding (a file name need not be UTF-8).

    Linux file names are bytes; Python hands a non-UTF-8 one over with lone surrogates
    (b"model\xff.pt" becomes "model\udcff.pt"), which print() cannot encode. The report
    escapes them first, and any character the console cannot show becomes an escape here,
    so a strange name costs a backslash, never the report (and never exit status 2).
    """
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    print(text.encode(encoding, "backslashreplace").decode(encoding, "replace"))


def print_inspection(report: Inspection, limit: int = 40) -> None:
    """The report, as --inspect prints it (one line when the input is not readable).

    Read it top down: what the file is, its tensors (name, shape, dtype) and their total
    size, the other entries (an epoch, hyper-parameters, library versions: what a pickle
    can carry besides tensors), every global the pickle references, and the verdict. Every
    name and value from the file is escaped, so only the inspector writes a "verdict:" line.
    A global in the verdict is a function or class that the load would CALL with arguments
    of the file's choosing: the question for each is "can that do harm?". For a class that
    only stores values (argparse.Namespace) the answer is no; for os.system, exec, getattr,
    cProfile.run it is yes, and no allow-list makes it safe. The WARNING list is a heuristic.
    """
    where = _escape(str(report.path), 300)
    if report.status == 2:
        seen = (f"; before it stopped, it saw: {'; '.join(report.dangerous)[:400]}"
                if report.dangerous else "")
        say(f"{where}: not readable as a checkpoint: {report.problem}{seen}")
        return
    say(f"{where}: {report.kind}")
    for name, shape, dtype in report.tensors[:limit]:
        say(f"  tensor {name:<40} {str(list(shape)):<18} {dtype}")
    if report.tensor_count > limit:
        say(f"  ... and {report.tensor_count - limit} more tensors")
    say(f"  {report.tensor_count} tensors, {report.tensor_bytes / 1e6:.2f} MB")
    for name, summary in report.entries[:limit]:
        say(f"  entry  {name:<40} {summary}")
    if report.globals:
        more = f" ... and {len(report.globals) - limit} more" if len(report.globals) > limit \
            else ""
        say(f"  globals the pickle references: "
            f"{', '.join(_escape(name) for name in report.globals[:limit])}{more}")
    if report.status == 0:
        say(f"verdict: loads as it is with {report.reader}")
        return
    shown = max(limit, 40)  # the verdict lists what needs review, even in a short report
    needs = ", ".join(_escape(name) for name in report.needs[:shown]) + (
        f" ... and {len(report.needs) - shown} more" if len(report.needs) > shown else "")
    if report.kind.startswith("torch.distributed"):
        say(f"verdict: do not dcp.load this folder: its .metadata is a plain pickle (no "
            f"allow-list applies) and names, besides DCP's own classes: {needs or 'none'}")
    else:
        say(f"verdict: weights_only=True refuses it as it is; review each global it needs "
            f"(the load would call it with arguments the file chooses): {needs or 'none'}")
    if report.refused_opcodes:
        say(f"  it also uses opcodes weights_only=True never executes, whatever you allow: "
            f"{', '.join(report.refused_opcodes)}")
    for danger in report.dangerous:
        say(f"WARNING: {danger}: do NOT allow it; this file may be malicious")
    say("(the WARNING list is a heuristic: a global without one may still run code)")
    if not (report.dangerous or report.refused_opcodes
            or report.kind.startswith("torch.distributed")):
        say("if, after reviewing each, you trust them, allow exactly these for this one "
            "load (the import line imports each module, and importing runs that module's "
            "import-time code: review the module list too):\n" + safe_globals_line(report.needs))


# %% 13. Files you did not write: inspect first, allow exactly what is needed, convert once
# Downloaded checkpoints hit weights_only=True (the default since torch 2.6) with errors like
# "Unsupported global: GLOBAL argparse.Namespace" or "...numpy.core.multiarray._reconstruct".
# Do not answer with weights_only=False: first LOOK at the file without running it:
#   python 01_basic_save_load.py --inspect PATH
# prints every tensor, the other entries, every global the pickle references (read by
# StubUnpickler, the cell above: its own bounded pickle machine, which never imports or
# calls anything) and a verdict; its exit status is 0 (loads as it is), 1 (weights_only
# refuses it: every global it needs is listed for review, with a WARNING on those known to
# run code, like os.system, and the safe_globals line only when none is) or 2 (unreadable,
# or past one of the MAX_* limits). The WARNING list is a heuristic: no list of dangerous
# names is complete, so a global without a WARNING is unreviewed, not harmless. The same
# command checks a DCP folder before dcp.load runs its .metadata pickle.
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
# the safetensors file. A child process alone isolates nothing: it runs as you, with your
# environment, files and credentials, so a hostile pickle can do there all it could do
# here. What isolates it is running the child in a container or as an unprivileged user
# without access to your files and network; trust the file first, or do that.


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
# The files themselves come from elsewhere too: load_sharded_safetensors reads only regular
# files (a FIFO named like the index would block the read forever) that resolve inside the
# index's folder (a shard that is a symlink to one of your own files is refused), with
# checked_regular_file and read_regular_file from the inspector's cell.


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

    Every shard the index names must be a plain file name of a regular file inside the
    index's folder, symlinks resolved (an index is data, and "../x" or a link would reach
    elsewhere), and every tensor it lists must be in its shard. Any failure, a corrupt
    shard's included, is one CheckpointLoadError naming the file.
    """
    index = Path(index)
    try:
        weight_map = json.loads(read_regular_file(index, 64 * 2**20))["weight_map"]
    except (ValueError, KeyError, TypeError, RecursionError) as err:
        raise CheckpointLoadError(f"{index}: not an index file ({type(err).__name__})") from None
    # JSON can hold a list or numbers where the format says {tensor name: shard file name}.
    if not isinstance(weight_map, dict) or not all(
            isinstance(value, str) for value in weight_map.values()):
        raise CheckpointLoadError(f"{index}: \"weight_map\" is not an object of tensor name "
                                  "-> shard file name")
    state: dict[str, torch.Tensor] = {}
    for file in sorted(set(weight_map.values())):
        if Path(file).name != file or file in (".", ".."):
            raise CheckpointLoadError(f"{index}: refuses the shard name {file!r}: only plain "
                                      "file names in the index's folder")
        shard = checked_regular_file(index.parent / file, index.parent)
        try:  # safetensors' own errors (a corrupt header) do not say which shard
            state.update(load_file(shard))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointLoadError(f"{shard}: not a readable safetensors shard "
                                      f"({first_line(err)[:200]})") from None
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise CheckpointLoadError(f"{index}: {len(missing)} tensors are missing from their "
                                  f"shards: {', '.join(missing[:4])}")
    return {name: state[name] for name in weight_map}


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
    "with --inspect (section 13); prefer safetensors to share weights",
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
