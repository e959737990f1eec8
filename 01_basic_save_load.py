"""01 · Saving and loading basics — save, reload and move any PyTorch model safely and exactly.

What you will learn (each section runs real code and prints the measured figure):
  1. What a state_dict holds: parameters, buffers, and the optimizer's state and param_groups
  2. Method 1, pickling the whole model, and why it breaks and needs weights_only=False
  3. Method 2, the state_dict (recommended): save, rebuild, load, eval(), identical outputs
  4. Method 3, a general training checkpoint, resuming from it, several models in one file
  5. Pitfalls: state_dict() returns references, views save their whole storage, strict=False
  6. Devices: map_location, a CUDA checkpoint on a CPU-only machine, optimizer state
  7. Security: weights_only=True, a malicious pickle, allow-listing your own types
  8. safetensors: the format that cannot run code
  9. Big checkpoints: mmap=True + the meta device + assign=True, in fresh processes
 10. File sizes: fp32 vs fp16/bf16, weights only vs weights + Adam state
 11. train() vs eval(), no_grad vs inference_mode
 12. Bad input: clear errors for missing, truncated, foreign and mismatched files

Run it:   python 01_basic_save_load.py [--device cpu|cuda] [--out-dir DIR] [--seed N]
Takes:    about 8 s on a 2-core CPU (two child processes load a ~270 MB checkpoint).
Next:     02_checkpoint_manager.py, checkpoints that survive crashes and resume bit-exactly.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import re
import subprocess
import sys
import types
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from common.compare import max_abs_diff
from common.data import make_image_classification, make_loaders
from common.models import MLP, SmallCNN
from common.run import Run, format_bytes, make_parser
from common.timing import benchmark
from common.training import fit, train_one_epoch

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

    Every failure is a ``CheckpointLoadError`` naming the file and the cause.
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
    """The one line of an exception message that matters (ANSI colour codes removed)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()
    return text.splitlines()[0] if text else type(err).__name__


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
# The lessons, in order.
# ############################################################################################

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


def lesson_1_what_is_a_state_dict(run: Run) -> None:
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
    images = torch.randn(8, 1, 16, 16, device=run.device)
    model(images).sum().backward()
    optimizer.step()  # Adam creates its per-parameter state on the first step
    optimizer_state = optimizer.state_dict()
    first = optimizer_state["state"][0]
    print(f"  optimizer.state_dict() keys: {list(optimizer_state)}")
    print(f"  state[0] (the 1st parameter) holds: {list(first)}")
    group = {k: v for k, v in optimizer_state["param_groups"][0].items() if k != "params"}
    print(f"  param_groups[0]: lr={group['lr']}, betas={group['betas']}, "
          f"params={optimizer_state['param_groups'][0]['params'][:4]}... (positions, not names)")
    named = torch.optim.Adam(model.named_parameters(), lr=1e-3).state_dict()["param_groups"][0]
    print(f"  built from named_parameters(): params={named['params'][:2]}..., "
          f"param_names={named['param_names'][:2]}... (loading still goes by position)")
    run.record("state_dict_entries", len(state_dict))
    run.record("parameter_tensors", len(parameter_names))
    run.record("buffer_tensors", n_buffers)
    run.record("optimizer_state_entries", len(optimizer_state["state"]))


# %% 2. Method 1: pickle the whole model (and why not to)
# torch.save(model, path) pickles the object. Pickle does not store your class's code: it
# stores its import path ("common.models.SmallCNN") and the object's attributes; on load it
# imports that path, creates an EMPTY instance (your __init__ never runs) and fills in the
# attributes. So the file breaks when you rename the module, move the class, or load it in a
# project without that code: "ModuleNotFoundError" / "Can't get attribute 'Net' on <module>".
# weights_only=True refuses it, because the file asks to import classes. You need not switch
# to weights_only=False (the mechanism that can run arbitrary code, section 7): allow exactly
# the classes the file names, torch.serialization.safe_globals([SmallCNN, nn.Conv2d, ...]).
# Use whole-model pickles only for files you made; share state_dicts.


def lesson_2_pickle_whole_model(run: Run, model: nn.Module, inputs: torch.Tensor) -> None:
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
    reloaded = torch.load(path, map_location=run.device, weights_only=False)
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        diff = max_abs_diff(model(inputs), reloaded(inputs))
    print(f"  reloaded with weights_only=False: outputs max |diff| = {diff}")
    # Safer: allow exactly the classes the file names, and keep weights_only=True.
    allowed = [SmallCNN, nn.Sequential, nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d,
               nn.AdaptiveAvgPool2d, nn.Flatten, nn.Dropout, nn.Linear]
    with torch.serialization.safe_globals(allowed):
        allow_listed = torch.load(path, map_location=run.device, weights_only=True).eval()
    with torch.no_grad():
        safe_diff = max_abs_diff(model(inputs), allow_listed(inputs))
    print(f"  weights_only=True inside safe_globals([{len(allowed)} classes]): outputs "
          f"max |diff| = {safe_diff}")

    # Why it breaks: define a class in a module, pickle an instance, then "move" the module
    # (we drop it from sys.modules; renaming the file or deleting the class does the same).
    module = types.ModuleType("my_old_project")
    sys.modules["my_old_project"] = module

    class Net(nn.Linear):
        pass

    Net.__module__, Net.__qualname__ = "my_old_project", "Net"
    module.Net = Net
    old_path = run.path("whole_model_old_project.pt")
    torch.save(Net(4, 2), old_path)
    del sys.modules["my_old_project"]
    try:
        torch.load(old_path, map_location="cpu", weights_only=False)
        breaks = False
    except ModuleNotFoundError as err:
        breaks = True
        print(f"  after the module moved: {type(err).__name__}: {err}")
    old_path.unlink()  # only a demonstration; keep the out-dir to files a reader may open
    run.record("pickled_model_globals", len(referenced))
    run.record("pickled_model_reload_max_abs_diff", diff)
    run.record("pickled_model_safe_globals_max_abs_diff", safe_diff)
    run.record("pickled_model_breaks_when_class_moves", breaks)


def unsupported_global(err: BaseException) -> str:
    """The ``Unsupported global: ...`` part of a weights_only refusal."""
    match = re.search(r"Unsupported global: GLOBAL \S+", str(err))
    return match.group(0) if match else first_line(err)


# %% 3. Method 2: save the state_dict (recommended)
# Save only the tensors; rebuild the model from code; load the tensors into it:
#     torch.save(model.state_dict(), path)
#     model = SmallCNN(); model.load_state_dict(torch.load(path, map_location="cpu",
#                                                          weights_only=True))
#     model.eval()   # ALWAYS before inference: Dropout off, BatchNorm uses running statistics
# The file holds only tensors and names, loads with weights_only=True, and survives any
# refactor that keeps the parameter names. load_state_dict is strict by default: every key
# must match, which is what you want (section 5 shows strict=False).


def lesson_3_state_dict(run: Run, model: nn.Module, inputs: torch.Tensor) -> None:
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
    run.record("state_dict_reload_max_abs_diff", diff)


# %% 4. Method 3: a general checkpoint, resuming, several models in one file
# To resume training you need more than weights: the optimizer's state (Adam's moments), the
# scheduler's position, the epoch, and, for an exact resume, the random generators (Dropout
# masks, the data loader's shuffle order). Save a plain dict with keys that say what they hold.
# The key set is the one the whole collection uses (common/__init__.py): "epoch" is the NEXT
# epoch to run, so `for epoch in range(checkpoint["epoch"], epochs)` neither repeats nor skips.
# 02_checkpoint_manager.py turns this into a manager that survives crashes.


def lesson_4_general_checkpoint(run: Run) -> None:
    run.section("4. Method 3: a general checkpoint, resuming, several models in one file")
    epochs, crash_after = 3, 2

    def build(seed: int):
        torch.manual_seed(seed)
        model = SmallCNN().to(run.device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        train_loader, _ = make_loaders(make_image_classification(512, seed=run.seed),
                                       seed=run.seed)
        return model, optimizer, scheduler, train_loader

    # Straight through: 3 epochs, saving a checkpoint after epoch 2 on the way.
    model, optimizer, scheduler, loader = build(run.seed)
    path = run.path(f"checkpoint_epoch{crash_after:03d}.pt")
    for epoch in range(epochs):
        loss = train_one_epoch(model, loader, optimizer, run.device, scheduler)
        if epoch + 1 == crash_after:
            checkpoint = {
                "epoch": epoch + 1,  # the NEXT epoch to run
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "metrics": {"train_loss": loss},
                "rng": {"torch": torch.get_rng_state(), "loader": loader.generator.get_state()},
            }
            if run.device.type == "cuda":
                checkpoint["rng"]["cuda"] = torch.cuda.get_rng_state(run.device)
            torch.save(checkpoint, path)
            run.artifact("checkpoint", path)

    # Resume: fresh objects (another seed, to prove everything comes from the file), then load.
    resumed, optimizer2, scheduler2, loader2 = build(run.seed + 100)
    checkpoint = torch.load(path, map_location=run.device, weights_only=True)
    resumed.load_state_dict(checkpoint["model"])
    optimizer2.load_state_dict(checkpoint["optimizer"])
    scheduler2.load_state_dict(checkpoint["scheduler"])
    torch.set_rng_state(checkpoint["rng"]["torch"].cpu())
    loader2.generator.set_state(checkpoint["rng"]["loader"].cpu())
    if "cuda" in checkpoint["rng"]:
        torch.cuda.set_rng_state(checkpoint["rng"]["cuda"].cpu(), run.device)
    print(f"  resuming at epoch {checkpoint['epoch']} "
          f"(saved train_loss {checkpoint['metrics']['train_loss']:.4f}, "
          f"lr now {scheduler2.get_last_lr()[0]:.4f})")
    for _ in range(checkpoint["epoch"], epochs):
        train_one_epoch(resumed, loader2, optimizer2, run.device, scheduler2)
    diff = max_abs_diff(model.state_dict(), resumed.state_dict())
    print(f"  straight run vs save-at-epoch-2-then-resume, final weights: max |diff| = {diff}")
    run.record("resume_max_abs_diff", diff)

    # Several models (and their optimizers) in one file: one dict, one key per object.
    generator, discriminator = MLP(8, 32, 8), MLP(8, 32, 1)
    multi_path = run.path("gan_checkpoint.pt")
    torch.save({"generator": generator.state_dict(), "discriminator": discriminator.state_dict(),
                "generator_optimizer": torch.optim.Adam(generator.parameters()).state_dict()},
               multi_path)
    run.artifact("multi_model_checkpoint", multi_path)
    both = torch.load(multi_path, map_location="cpu", weights_only=True)
    generator2, discriminator2 = MLP(8, 32, 8), MLP(8, 32, 1)
    generator2.load_state_dict(both["generator"])
    discriminator2.load_state_dict(both["discriminator"])
    multi_diff = max(max_abs_diff(generator.state_dict(), generator2.state_dict()),
                     max_abs_diff(discriminator.state_dict(), discriminator2.state_dict()))
    print(f"  two models from one file {sorted(both)}: max |diff| = {multi_diff}")
    run.record("multi_model_max_abs_diff", multi_diff)


# %% 5. Pitfalls: references, views and strict=False
# (a) model.state_dict() returns REFERENCES to the live tensors, not a copy. Keeping
#     `best = model.state_dict()` and training on silently turns "best" into "latest".
#     Snapshot with copy.deepcopy(model.state_dict()) (or {k: v.clone() ...}).
# (b) torch.save keeps views sharing storage: saving a 10-element slice of a 1M-element
#     tensor writes all 1M elements. .clone() the slice first.
# (c) load_state_dict(strict=False) only forgives MISSING or UNEXPECTED keys. A key present in
#     both with different shapes is still an error ("size mismatch for head.1.weight").
#     06_transfer_learning.py shows how to filter by shape.


def lesson_5_pitfalls(run: Run, loaders: tuple) -> None:
    run.section("5. Pitfalls: references, views and strict=False")
    train_loader, _ = loaders
    model = SmallCNN().to(run.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    train_one_epoch(model, train_loader, optimizer, run.device)
    best_by_reference = model.state_dict()
    best_by_copy = copy.deepcopy(model.state_dict())
    train_one_epoch(model, train_loader, optimizer, run.device)  # training goes on

    def weights(state_dict: dict) -> dict:  # float tensors only: skip num_batches_tracked
        return {k: v for k, v in state_dict.items() if v.is_floating_point()}

    stale = max_abs_diff(weights(best_by_reference), weights(model.state_dict()))
    kept = max_abs_diff(weights(best_by_copy), weights(model.state_dict()))
    print(f"  (a) 'best' kept by reference vs current weights: max |diff| = {stale} "
          "(it silently followed training)")
    print(f"      'best' kept by deepcopy  vs current weights: max |diff| = {kept:.4g}")

    big = torch.randn(1_000_000)
    view_path, clone_path = run.path("pitfall_view.pt"), run.path("pitfall_clone.pt")
    torch.save(big[:10], view_path)
    torch.save(big[:10].clone(), clone_path)
    view_bytes, clone_bytes = view_path.stat().st_size, clone_path.stat().st_size
    print(f"  (b) 10 floats saved as a view: {format_bytes(view_bytes)}; "
          f"cloned first: {format_bytes(clone_bytes)}")
    view_path.unlink(), clone_path.unlink()

    four_classes, ten_classes = SmallCNN(num_classes=4), SmallCNN(num_classes=10)
    try:
        ten_classes.load_state_dict(four_classes.state_dict(), strict=False)
        raises = False
    except RuntimeError as err:
        raises = True
        print(f"  (c) strict=False still raises: {str(err).splitlines()[1].strip()}")
    run.record("snapshot_by_reference_diff_from_current", stale)
    run.record("snapshot_by_deepcopy_diff_from_current", kept)
    run.record("view_file_bytes", view_bytes)
    run.record("cloned_view_file_bytes", clone_bytes)
    run.record("strict_false_shape_mismatch_raises", raises)


# %% 6. Devices: map_location, GPU checkpoints on CPU machines, optimizer state
# torch.save records each tensor's device. torch.load puts it back there unless map_location
# says otherwise, so a checkpoint saved on a GPU fails on a CPU-only machine with:
#   "Attempting to deserialize object on a CUDA device but torch.cuda.is_available() is False"
# map_location accepts "cpu", "cuda", "cuda:1", a torch.device, a dict {"cuda:1": "cuda:0"}
# (remap saved devices), or a function (storage, saved_location) -> storage.
# Optimizer state: optimizer.load_state_dict() casts the saved state to the device of the
# parameters it manages AT THAT MOMENT. So: model.to(device) first, then build the optimizer,
# then load its state. Moving the model afterwards leaves Adam's moments behind on the CPU.


def lesson_6_devices(run: Run) -> None:
    run.section("6. Devices: map_location, GPU checkpoints on CPU machines, optimizer state")
    cuda = torch.cuda.is_available()
    # A checkpoint saved on a GPU: every storage is tagged "cuda:0".
    model = SmallCNN()
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
    # The same cuda:0 file through each form of map_location.
    for label, location in [("'cpu'", "cpu"), ("torch.device('cpu')", torch.device("cpu")),
                            ("{'cuda:0': 'cpu'}", {"cuda:0": "cpu"}),
                            ("lambda storage, loc: storage", lambda storage, loc: storage)]:
        loaded = torch.load(gpu_path, map_location=location, weights_only=True)
        print(f"  map_location={label:<30} -> tensors on {next(iter(loaded.values())).device}")
    if cuda:
        loaded = torch.load(gpu_path, map_location=None, weights_only=True)
        print(f"  map_location=None (as saved)                 -> tensors on "
              f"{next(iter(loaded.values())).device}")
    else:
        print("  SKIPPED (no CUDA): map_location=None would restore the tensors on cuda:0, and "
              "'cuda:1' or {'cuda:0': 'cuda:1'} would move them to that GPU")
    on_cpu = torch.load(gpu_path, map_location="cpu", weights_only=True)
    diff = max_abs_diff(on_cpu, model.state_dict())
    print(f"  with map_location='cpu': loaded on {next(iter(on_cpu.values())).device}, "
          f"max |diff| = {diff}")
    run.record("cuda_checkpoint_on_cpu_max_abs_diff", diff)

    # Optimizer state follows the parameters it sees when its state is loaded.
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
    if cuda:
        wrong = SmallCNN()
        wrong_optimizer = torch.optim.Adam(wrong.parameters())
        wrong_optimizer.load_state_dict(saved_optimizer)
        wrong.cuda()  # too late: the moments stay on the CPU
        wrong(torch.randn(4, 1, 16, 16, device="cuda")).sum().backward()
        try:
            wrong_optimizer.step()
        except RuntimeError as err:
            print(f"  wrong order (load, then move the model): {first_line(err)[:90]}")
    else:
        print("  SKIPPED (no CUDA): loading optimizer state before model.cuda() leaves Adam's "
              "moments on the CPU and step() fails")
    run.record("optimizer_state_device", str(state_device))


# %% 7. Security: weights_only=True, malicious pickles, allow-listing your types
# A .pt file is a zip with a pickle inside, and unpickling can call any importable function.
# A crafted checkpoint runs its payload the moment you torch.load(..., weights_only=False).
# Since torch 2.6 weights_only=True is the default: the unpickler accepts only tensors,
# primitive types and containers, and refuses anything else with "Unsupported global".
# We always pass weights_only explicitly, so the code means the same on any torch version.
# Your own types (a config dataclass) are refused too; allow them by name with
#   with torch.serialization.safe_globals([TrainingConfig]): torch.load(..., weights_only=True)
# or process-wide with torch.serialization.add_safe_globals([TrainingConfig]).
# torch.serialization.get_unsafe_globals_in_checkpoint(path) lists what a file would import,
# WITHOUT running it: inspect an unknown file with it first. (Simplest of all: store configs
# as plain dicts, dataclasses.asdict(config), and nothing needs allow-listing.)
# weights_only=True is a defence, not a proof, and it has had holes: CVE-2025-32434 (remote
# code execution through weights_only=True, torch < 2.6) and GHSA-63cw-57p8-fm3p (published
# January 2026: the weights_only unpickler could corrupt memory, torch <= 2.9.1, fixed in
# 2.10.0). So: torch >= 2.10 (this collection's requirements.txt refuses older), and for
# files from people you do not trust, safetensors (section 8), which has no code path at all.


def lesson_7_security(run: Run) -> None:
    run.section("7. Security: weights_only=True, malicious pickles, allow-listing your types")
    folder = run.path("security/x").parent
    marker = folder / "PAYLOAD_RAN.txt"
    evil_path = folder / "innocent_looking_model.pt"
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

    config_path = folder / "checkpoint_with_config.pt"
    torch.save({"model": SmallCNN().state_dict(), "config": TrainingConfig()}, config_path)
    try:
        torch.load(config_path, map_location="cpu", weights_only=True)
    except Exception as err:
        print(f"  a checkpoint holding a dataclass: {unsupported_global(err)}")
    with torch.serialization.safe_globals([TrainingConfig]):
        loaded = torch.load(config_path, map_location="cpu", weights_only=True)
    print(f"  inside safe_globals([TrainingConfig]) it loads: {loaded['config']}")
    run.record("unsafe_globals_found", ", ".join(unsafe))
    run.record("payload_ran_with_weights_only_true", ran_safe)
    run.record("payload_ran_with_weights_only_false", ran_unsafe)
    run.record("safe_globals_loaded_config", isinstance(loaded["config"], TrainingConfig))


# %% 8. safetensors: a format that cannot run code
# safetensors (Hugging Face) stores a JSON header (names, dtypes, shapes, offsets, and your
# own string metadata) followed by raw tensor bytes. There is no pickle, so there is nothing
# to execute; loading can be zero-copy. Limits: tensors only (no optimizer dict nesting),
# metadata values must be strings, and tensors sharing memory (tied weights) are refused by
# save_file (use safetensors.torch.save_model for tied weights).
# API: save_file(state_dict, path, metadata={...}); load_file(path, device="cpu");
#      with safe_open(path, framework="pt") as f: f.metadata(), f.get_tensor(name)


def lesson_8_safetensors(run: Run) -> None:
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
    print(f"  load time: torch.load {torch_time}  vs  safetensors load_file {st_time}")
    run.record("safetensors_max_abs_diff", diff)
    run.record("torch_save_bytes", pt_bytes)
    run.record("safetensors_bytes", st_bytes)
    run.record("torch_load_median_ms", round(torch_time.median_ms, 3))
    run.record("safetensors_load_median_ms", round(st_time.median_ms, 3))
    run.record("safetensors_metadata_round_trip", metadata.get("epoch") == "3")


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
# Peak memory is per process, so each path runs in its own fresh Python process.


def lesson_9_big_checkpoints(run: Run) -> None:
    run.section("9. Big checkpoints: mmap, the meta device and assign=True")
    width, depth = 4096, 4
    big = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])
    path = run.path("big_model_state_dict.pt")
    torch.save(big.state_dict(), path)
    file_bytes = path.stat().st_size
    print(f"  saved a {depth} x Linear({width}, {width}) state_dict: {format_bytes(file_bytes)}")
    with torch.no_grad():
        expected = float(big(torch.ones(1, width)).double().sum())
    del big
    if not Path("/proc/self/clear_refs").exists():
        print("  SKIPPED (not Linux): peak-memory figures need /proc; the recipe above still holds")
        path.unlink()
        return
    results = {}
    for mode in ("naive", "mmap"):
        completed = subprocess.run(
            [sys.executable, "-c", BIG_LOAD_CHILD, mode, str(path), str(width), str(depth)],
            capture_output=True, text=True, cwd=run.out_dir, check=False,
        )
        if completed.returncode != 0:
            raise RuntimeError(f"the {mode} child process failed:\n{completed.stderr}")
        result = results[mode] = json.loads(completed.stdout.strip().splitlines()[-1])
        print(f"  {mode:>5}: torch.load + load_state_dict {result['load_seconds']:.3f} s, "
              f"+ first forward {result['load_and_forward_seconds']:.3f} s; peak RSS "
              f"{format_bytes(result['peak_bytes'] - result['baseline_bytes'])} above the "
              f"{format_bytes(result['baseline_bytes'])} of a process that imported torch")
    # mmap's load returns almost at once: pages are read when first used (the forward pass).
    diff = max(abs(results[m]["output_sum"] - expected) for m in results)
    print(f"  both give the saved model's output: max |diff| of output sums = {diff}")
    path.unlink()  # a few hundred MB is not worth keeping in the out-dir
    for mode, result in results.items():
        run.record(f"{mode}_load_seconds", round(result["load_seconds"], 4))
        run.record(f"{mode}_load_and_forward_seconds", round(result["load_and_forward_seconds"], 4))
        run.record(f"{mode}_peak_rss_above_baseline_bytes",
                   result["peak_bytes"] - result["baseline_bytes"])
    run.record("big_checkpoint_bytes", file_bytes)
    run.record("big_checkpoint_output_diff", diff)


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


def lesson_9b_meta_traps(run: Run) -> None:
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
    run.record("meta_buffers_left_after_assign", len(still_meta))
    run.record("meta_reset_max_abs_diff", diff)


# %% 10. File sizes: precision and optimizer state
# A float32 weight is 4 bytes; float16 and bfloat16 are 2. Halving the dtype halves the file
# (bfloat16 keeps float32's range, float16 keeps more mantissa). Convert FLOATING tensors only:
# v.half() on every entry would also turn integer buffers (BatchNorm's num_batches_tracked,
# token ids, masks) into floats that no longer load into the model. Adam keeps two moments per
# parameter, so a checkpoint with its state is about 3x the weights alone: ship weights only,
# keep optimizer state for resuming.


def lesson_10_file_sizes(run: Run) -> None:
    run.section("10. File sizes: precision and optimizer state")
    model = MLP(256, 1024, 10)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 256)).sum().backward()
    optimizer.step()
    sizes = {}
    for label, payload in [
        ("fp32", model.state_dict()),
        ("fp16", {k: v.half() if v.is_floating_point() else v
                  for k, v in model.state_dict().items()}),
        ("bf16", {k: v.bfloat16() if v.is_floating_point() else v
                  for k, v in model.state_dict().items()}),
        ("fp32_with_adam", {"model": model.state_dict(), "optimizer": optimizer.state_dict()}),
    ]:
        path = run.path(f"sizes/{label}.pt")
        torch.save(payload, path)
        sizes[label] = path.stat().st_size
        print(f"  {label:<15} {format_bytes(sizes[label]):>10}  "
              f"({sizes[label] / sizes['fp32']:.2f}x fp32 weights)")
        run.record(f"{label}_bytes", sizes[label])
        path.unlink()
    path.parent.rmdir()


# %% 11. train() vs eval(), no_grad vs inference_mode
# train() and eval() switch module behaviour, not gradients: in train mode Dropout zeroes
# random activations and BatchNorm normalises with the batch's statistics AND updates its
# running statistics, so even a forward pass in train mode changes the model's buffers. The
# same batch twice in train() differs only through Dropout (a new random mask each call);
# train() vs eval() differs through both.
# Call model.eval() before validation, export or inference; model.train() before training.
# torch.no_grad() and torch.inference_mode() switch off autograd (less memory, faster);
# inference_mode goes further, and its tensors can never enter autograd later.


def lesson_11_train_vs_eval(run: Run, model: nn.Module, inputs: torch.Tensor) -> None:
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
    weight = torch.ones_like(frozen, requires_grad=True)
    try:
        (frozen * weight).sum().backward()
    except RuntimeError as err:
        print(f"  an inference tensor used in autograd: {first_line(err)}")
    run.record("train_mode_repeat_diff", train_diff)
    run.record("eval_mode_repeat_diff", eval_diff)
    run.record("train_vs_eval_diff", train_vs_eval)
    run.record("batchnorm_running_mean_change", bn_changed)


# %% 12. Bad input: clear errors, nothing destroyed
# torch.load's own errors for bad files say little, and for a file that is not a checkpoint
# they are arbitrary: the unpickler reads its first bytes as opcodes, so "hello" gives
# "KeyError: 101", other texts IndexError, EOFError or UnpicklingError. An empty file gives a
# bare EOFError, a truncated one "failed finding central directory", and
# load_state_dict reports mismatches only after a long traceback. load_weights() above turns
# each into one line naming the file and the cause, and checks keys and shapes BEFORE copying,
# so a failed load leaves the model untouched. It only reads files, never writes or deletes.


def lesson_12_bad_input(run: Run, state_dict_path: Path) -> None:
    run.section("12. Bad input: clear errors, nothing destroyed")
    folder = run.path("bad_input/x").parent
    truncated = folder / "truncated.pt"
    truncated.write_bytes(state_dict_path.read_bytes()[: state_dict_path.stat().st_size // 2])
    text_file = folder / "notes.pt"
    text_file.write_text("hello, I am not a checkpoint\n")
    foreign = folder / "mlp_weights.pt"
    torch.save(MLP().state_dict(), foreign)
    ten_classes = folder / "ten_class_cnn.pt"
    torch.save(SmallCNN(num_classes=10).state_dict(), ten_classes)
    malicious = folder / "malicious.pt"
    torch.save({"model": MaliciousPayload(folder / "PAYLOAD_RAN.txt")}, malicious)
    cases = [folder / "missing.pt", truncated, text_file, foreign, ten_classes, malicious]

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
    run.record("bad_input_cases", len(cases))
    run.record("bad_input_clear_errors", clear)
    run.record("failed_loads_model_max_abs_diff", unchanged)


def main(argv: list[str] | None = None) -> dict:
    """Run every lesson in order and return the summary (also written to summary.json)."""
    parser = make_parser(__file__, __doc__.splitlines()[0])
    run = Run.start(__file__, parser, argv)

    # One small model trained for two epochs serves the lessons that need trained weights.
    loaders = make_loaders(make_image_classification(768, seed=run.seed), seed=run.seed)
    model = SmallCNN().to(run.device)
    accuracy = fit(model, *loaders, run.device, epochs=2)["accuracy"]
    print(f"trained SmallCNN for 2 epochs: validation accuracy {accuracy:.3f}")
    run.record("trained_val_accuracy", accuracy)
    inputs = next(iter(loaders[1]))[0].to(run.device)

    lesson_1_what_is_a_state_dict(run)
    lesson_2_pickle_whole_model(run, model, inputs)
    lesson_3_state_dict(run, model, inputs)
    state_dict_path = run.out_dir / "model_state_dict.pt"
    lesson_4_general_checkpoint(run)
    lesson_5_pitfalls(run, loaders)
    lesson_6_devices(run)
    lesson_7_security(run)
    lesson_8_safetensors(run)
    lesson_9_big_checkpoints(run)
    lesson_9b_meta_traps(run)
    lesson_10_file_sizes(run)
    lesson_11_train_vs_eval(run, model, inputs)
    lesson_12_bad_input(run, state_dict_path)

    return run.finish(
        recap=[
            "save model.state_dict(), rebuild the model in code, load_state_dict, then eval()",
            "a resumable checkpoint is a dict: model, optimizer, scheduler, epoch (next), rng",
            "always torch.load(..., map_location=..., weights_only=True); inspect unknown files "
            "with get_unsafe_globals_in_checkpoint; prefer safetensors to share weights",
            "big models: meta device + mmap=True + assign=True hold the weights once, not twice",
        ],
        try_it="change SmallCNN's width in lesson 3's rebuild and read the error from "
               "load_weights; then run 02_checkpoint_manager.py",
    )


if __name__ == "__main__":
    main()
