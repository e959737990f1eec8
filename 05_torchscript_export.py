"""05 · TorchScript, and what replaces it — torch.export, AOTInductor, ExecuTorch, torch.compile.

What you will learn (each section runs real code and prints the measured figure):
  1.  TorchScript: trace vs script, and the branch that tracing silently bakes in
  2.  Inspecting, freezing (BatchNorm folded into Conv, measured) and saving TorchScript
  3.  torch.export: a .pt2 ExportedProgram with a dynamic batch, saved on the CPU
  3b. Both files load in a process that cannot import your code
  3c. What makes torch.export fail (a Python `if` on values), and torch.cond
  4.  AOTInductor: compile the exported program ahead of time; which .pt2 is which
  4b. C++ without Python: a program built here loads TorchScript and the AOTInductor package
  4c. Phones and microcontrollers: ExecuTorch (.pte), its runtime, and its memory plan
  5.  torch.compile: a speed-up inside the same process, not a file to deploy
  5b. Quantized weights with torchao: int8 weight-only (Int8WeightOnlyConfig)
  5c. What int8 costs: file size and validation accuracy against fp32 (latency: section 6)
  5d. Which other torchao configs run here, and the error of each one that does not
  5e. Exporting the quantized model (.pt2), whose quantized weights are pickles
  5f. Loading it with weights_only=True: import torchao first
  5g. load_state_dict(..., assign=True), and why a plain load_state_dict fails
  5h. Quantized weights in safetensors (torchao's flatten/unflatten)
  5i. What 01 --inspect says about a quantized file
  6.  Side by side: parity, file size and latency of all seven, and of 5b's fp32/int8 model

Run it:   python 05_torchscript_export.py [--device cpu|cuda] [--out-dir DIR] [--seed N]
          As a notebook: run the cells top to bottom from the project folder (jupytext,
          VS Code, PyCharm); flags go in the LESSON_ARGS environment variable.
Takes:    about 60 s on a 2-core CPU, most of it C++ compiles: AOTInductor's, torch.compile's
          and the C++ program's (needs g++/clang++; without one, those are skipped with a
          message), and about 10 s for ExecuTorch (import and lowering); about 35 s when run
          again, as a second run copies the AOTInductor package, the C++ program and the
          .pte from inductor_cache/ (build_once).
Next:     06_transfer_learning.py, loading what fits into a changed model.

Files it writes (in --out-dir): example_input.pt (the batch every export traced with),
torchscript_model.pt and torchscript_frozen.pt (TorchScript, as scripted and frozen),
exported_program.pt2 (torch.export, CPU weights), model_aoti.pt2 (the AOTInductor package),
cpp/ (load_model.cpp, its CMakeLists.txt and the built load_model program), model.pte (the
ExecuTorch program), mlp_fp32_state_dict.pt and int8_state_dict.pt (5b's model, fp32 and
int8), int8_reference.pt (a batch and its int8 outputs), int8_exported_program.pt2,
int8_state_dict.safetensors, inductor_cache/ (Inductor's compiled kernels, and a copy of the
C++ program, the AOTInductor package and model.pte keyed by what built them, so a second run
copies them instead of compiling again: deleting it only costs a recompile), latency.png and
summary.json.

TorchScript (torch.jit.trace / torch.jit.script) is deprecated: torch 2.10+ warns on every
call and the official tutorial was removed. Many deployed systems still load TorchScript .pt
files, so you should be able to read and keep them running; new work should use torch.export
(a portable graph, .pt2), AOTInductor (that graph compiled to a shared library) or
torch.compile (in-process speed), as this script shows on one trained model.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import glob
import hashlib
import importlib.metadata
import inspect
import io
import json
import logging
import os
import platform
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn
from torch.export import Dim
from torch.export.passes import move_to_device_pass

from common.compare import max_abs_diff
from common.data import make_image_classification, make_loaders
from common.models import SignGate, SignGateCond
from common.run import Run, first_line, format_bytes, in_notebook, make_parser, script_file
from common.timing import benchmark
from common.training import evaluate, fit, train_demo_model

matplotlib.use("Agg")  # write PNG files, never open a window
HERE = script_file(globals(), "05_torchscript_export.py")  # a notebook kernel has no __file__


# ############################################################################################
# Reusable pieces: copy these into your own code.
# ############################################################################################

# Every torch.jit call warns: "`torch.jit.script` is deprecated. Please switch to
# `torch.compile` or `torch.export`." (a FutureWarning on torch 2.14; torch 2.10-2.12 raise
# it as a DeprecationWarning). On Python 3.14+ torch 2.14 says INSTEAD "`torch.jit.script` is
# not supported in Python 3.14+ and may break" (a FutureWarning too): one more reason to move.
# Section 1 shows the one that arrives, once; after that this pattern filters exactly those
# two messages, in those two categories, nothing else.
JIT_DEPRECATION = r"`torch\.jit\.[\w.]+` is (deprecated|not supported in Python 3\.14\+)"
JIT_WARNING_CATEGORIES = (FutureWarning, DeprecationWarning)


def jit_notice(caught: list) -> str:
    """The category of the first caught TorchScript notice (JIT_DEPRECATION), by name."""
    found = [w.category.__name__ for w in caught
             if re.search(JIT_DEPRECATION, str(w.message))
             and issubclass(w.category, JIT_WARNING_CATEGORIES)]
    return found[0] if found else "no warning"


def keep_compiler_caches_in(folder: Path) -> None:
    """Make Inductor (torch.compile, AOTInductor) write its caches inside ``folder``.

    By default they go to /tmp/torchinductor_<user>. TORCHINDUCTOR_CACHE_DIR moves the kernel
    cache (if you set it yourself, your choice wins: a warm cache makes the next compile
    several times faster). Setting a variable imports nothing, so setup calls this first and
    starts the C++ build at once; switch_off_precompiled_headers() imports Inductor after.
    An empty variable counts as unset: Inductor would make "" the current folder.
    """
    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)


def switch_off_precompiled_headers() -> None:
    """Precompiled headers have their own location, outside the cache folder: switch them
    off. Importing Inductor's config imports torch._dynamo (about 2 s here)."""
    import torch._inductor.config as inductor_config

    inductor_config.cpp_cache_precompile_headers = False
    inductor_config.aot_inductor.precompile_headers = False


def compile_cache(name: str) -> Path:
    """The folder for one kind of build product, inside Inductor's cache folder (here the
    out-dir's inductor_cache/, unless you set TORCHINDUCTOR_CACHE_DIR): see build_once.

    torch._inductor.runtime.cache_dir_utils.cache_dir() returns the variable, made absolute,
    once it is set, as keep_compiler_caches_in makes sure; it is read here directly because
    importing that module first imports the torch._inductor package, and with it
    torch._dynamo (about 2 s), and setup needs this folder before the C++ build can start."""
    return Path(os.path.abspath(os.environ["TORCHINDUCTOR_CACHE_DIR"])) / name


def aoti_cache_key(program: torch.export.ExportedProgram) -> list[str | bytes]:
    """What decides an AOTInductor package: the program (graph and weights, as
    torch.export.save writes them), torch (and the hash of its source), the C++ compiler,
    Inductor's settings, the GPU, CUDA and Triton where there are any, the number of threads
    the CPU kernels are built for, and the CPU they are compiled for (Inductor passes
    -march=native, so a package built on an AVX-512 machine may not run on one without).
    AOTInductor itself caches nothing: Inductor's
    FX graph cache skips ahead-of-time compiles (compile_fx.py: ``and not aot_mode``). The
    settings are taken as that cache takes them (save_config_portable): config.get_hash()
    would hash xpu.cutlass_dir too, the working folder when Inductor's config was imported."""
    from torch._inductor.cpp_builder import get_cpp_compiler

    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    compiler = get_cpp_compiler()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    from torch._inductor.codecache import CacheBase
    from torch._inductor.cpu_vec_isa import pick_vec_isa
    from torch._inductor.utils import parallel_num_threads

    settings = repr(sorted((name, value) for name, value in torch._inductor.config
                           .save_config_portable(ignore_private_configs=False).items()
                           if name != "aot_inductor.metadata"))  # the last compile fills it
    return [buffer.getvalue(), torch.__version__, compiler, version, settings,
            repr(CacheBase.get_system()),  # torch's source hash; GPU, CUDA, Triton if any
            str(parallel_num_threads()),  # CPU kernels are built for this many threads
            platform.machine(), native_cpu(),  # Inductor compiles with -march=native
            str(pick_vec_isa())]  # the vector instruction set Inductor's kernels use


def native_cpu() -> str:
    """The CPU that -march=native compiles for: its model and feature flags on Linux (so a
    package built on an AVX-512 machine is not copied to one without), else what Python
    knows of it."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    wanted = [line for line in lines if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(wanted))  # each distinct line once (one per core)


def has_cpp_compiler() -> bool:
    """Inductor compiles C++ on the CPU (g++, clang++ or MSVC's cl) and, on CUDA, Triton
    compiles a C launcher with the system's C compiler (gcc/cc/clang): g++ brings both."""
    return any(shutil.which(name) for name in ("g++", "c++", "clang++", "cl"))


# A complete C++ program that runs a model without Python: it loads a TorchScript file with
# torch::jit::load and an AOTInductor package with torch::inductor::AOTIModelPackageLoader,
# runs both on one input and writes both outputs. Tensors cross the language border as files:
# torch::jit::pickle_load reads a tensor that Python saved with torch.save, and
# torch::jit::pickle_save writes a tuple that Python reads with torch.load(weights_only=True).
# It includes the three headers it uses, not <torch/script.h>, which adds every ATen operator
# header through <ATen/ATen.h> (g++ -M here: about 3,400 headers to parse instead of 5,000).
CPP_LOADER = r"""// load_model.cpp: run a TorchScript file and an AOTInductor package; no Python.
// Usage: load_model TORCHSCRIPT.pt AOTI_PACKAGE.pt2 INPUT.pt OUTPUT.pt DEVICE
#include <ATen/core/grad_mode.h>                                // at::NoGradGuard
#include <torch/csrc/jit/serialization/import.h>                // torch::jit::load
#include <torch/csrc/jit/serialization/pickle.h>                // pickle_load, pickle_save
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>  // AOTIModelPackageLoader
#include <fstream>
#include <iostream>
#include <iterator>

static std::vector<char> read_bytes(const char* path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw std::runtime_error(std::string("cannot open ") + path);
  return {std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>()};
}

int main(int argc, char* argv[]) {
  if (argc != 6) {
    std::cerr << "usage: load_model TORCHSCRIPT.pt AOTI_PACKAGE.pt2 INPUT.pt OUTPUT.pt DEVICE\n";
    return 2;
  }
  std::string step = "starting";  // named in the error message: which file, doing what
  try {
    at::NoGradGuard no_grad;                     // inference: no autograd bookkeeping
    const c10::Device device(argv[5]);           // "cpu", "cuda" or "cuda:1"
    step = std::string("reading the input tensor ") + argv[3];  // saved with torch.save
    at::Tensor input = torch::jit::pickle_load(read_bytes(argv[3])).toTensor().to(device);

    step = std::string("running the TorchScript file ") + argv[1];
    torch::jit::Module scripted = torch::jit::load(argv[1], device);
    scripted.eval();
    at::Tensor from_script = scripted.forward({input}).toTensor();

    // The package holds code compiled for one device and one torch version: the one that
    // built it (its loader must come from that same libtorch).
    step = std::string("running the AOTInductor package ") + argv[2];
    torch::inductor::AOTIModelPackageLoader package(argv[2]);
    at::Tensor from_package = package.run({input})[0];

    // Python reads this with torch.load(path, weights_only=True): a tuple of two tensors.
    step = std::string("writing ") + argv[4];
    std::vector<char> bytes = torch::jit::pickle_save(
        c10::ivalue::Tuple::create({from_script.cpu(), from_package.cpu()}));
    std::ofstream out(argv[4], std::ios::binary);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    if (!out) throw std::runtime_error("the write failed");
    std::cout << "load_model: input " << input.sizes() << " on " << device << " -> "
              << from_script.sizes() << ", written to " << argv[4] << "\n";
  } catch (const c10::Error& error) {          // torch's errors, without their C++ stack trace
    std::cerr << "load_model: " << step << ": " << error.what_without_backtrace() << "\n";
    return 1;
  } catch (const std::exception& error) {
    std::cerr << "load_model: " << step << ": " << error.what() << "\n";
    return 1;
  }
  return 0;
}
"""

# The same program built with CMake, for a libtorch downloaded from pytorch.org:
#     cmake -B build -DCMAKE_PREFIX_PATH=/path/to/libtorch && cmake --build build
# find_package(Torch) does NOT work with the pip wheel's CUDA build on a machine without the
# CUDA toolkit ("Your installed Caffe2 version uses CUDA but I cannot find the CUDA
# libraries"): for the wheel, use the direct compiler command of cpp_loader_command().
CPP_CMAKE = """cmake_minimum_required(VERSION 3.18)
project(load_model CXX)
find_package(Torch REQUIRED)
add_executable(load_model load_model.cpp)
target_link_libraries(load_model "${TORCH_LIBRARIES}")
set_property(TARGET load_model PROPERTY CXX_STANDARD 20)
"""


def find_cxx_compiler() -> str | None:
    """The first C++ compiler on PATH that takes g++-style flags, or None."""
    return next((path for name in ("g++", "clang++", "c++") if (path := shutil.which(name))),
                None)


def cpp_loader_command(compiler: str, source: Path, binary: Path) -> list[str]:
    """The compiler command that builds ``source`` against the libtorch inside the pip wheel.

    torch.utils.cpp_extension knows the wheel's header and library folders; the headers need
    C++20 on torch 2.14; -D_GLIBCXX_USE_CXX11_ABI must match the wheel (torch._C records it);
    -rpath lets the program find libtorch at run time without LD_LIBRARY_PATH; and on Linux
    --no-as-needed keeps libtorch (and, on a CUDA build, libtorch_cuda, whose kernels register
    themselves when it loads) even though the program names none of their symbols.
    """
    from torch.utils import cpp_extension  # setup imported it, quietly (see there)

    includes = [f"-I{folder}" for folder in cpp_extension.include_paths()]
    libraries = cpp_extension.library_paths()
    keep_all = ["-Wl,--no-as-needed"] if sys.platform.startswith("linux") else []  # GNU ld
    return [compiler, "-std=c++20", "-O1", str(source), "-o", str(binary), *includes,
            *[f"-L{folder}" for folder in libraries], *keep_all,
            "-ltorch", "-ltorch_cpu", "-lc10", *[f"-Wl,-rpath,{folder}" for folder in libraries],
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]


def build_once(cache: Path | None, key: Iterable[str | bytes], target: Path,
               build: Callable[[Path], None]) -> float | None:
    """Make ``target`` by calling ``build(partial)``, or copy the file a previous run kept.

    A compile is a function of its inputs: the same source or program, tool versions and
    settings give the same file. So each result is kept in ``cache`` under the SHA-256 of
    everything that decides it (``key``), with the SHA-256 of its bytes beside it, written
    last; a later run with the same inputs copies it instead of compiling again, if it is
    a regular file (not a link) whose bytes match. Returns the build's seconds, or None when
    it was copied. Every file is written under a unique temporary name (two processes or
    threads may build the same key at once) and renamed when complete: an interrupted build
    never leaves half a file under the final name. A cache that cannot be written is a
    warning; the target is still made. Trust the cache folder as you trust Inductor's own
    cache beside it: code from both runs here.
    """
    digest = hashlib.sha256()
    for part in key:  # length-prefixed: ("ab", "c") and ("a", "bc") differ
        data = part if isinstance(part, bytes) else part.encode()
        digest.update(len(data).to_bytes(8, "little") + data)
    cached = (cache / f"{target.stem}-{digest.hexdigest()[:16]}{target.suffix}"
              if cache is not None else None)
    partial = unique_partial(target)  # keeps the suffix: AOTInductor wants a path ending .pt2
    try:
        if cached is not None and cache_hit(cached):
            shutil.copyfile(cached, partial)
            shutil.copymode(cached, partial)  # a program stays executable
            os.replace(partial, target)
            return None
        started = time.perf_counter()
        build(partial)
        seconds = time.perf_counter() - started
        if cached is not None:
            try:
                keep_in_cache(partial, cached)
            except OSError as err:
                warnings.warn(f"compile cache not written ({cached}): {err}", RuntimeWarning,
                              stacklevel=2)
        os.replace(partial, target)
        return seconds
    finally:
        partial.unlink(missing_ok=True)  # gone already after a rename; a failed build's rest


def unique_partial(path: Path) -> Path:
    """A new, empty, uniquely named file beside ``path`` to write it under (same suffix).

    Its name holds this process's id, and the next build of ``path`` first deletes what a
    process killed mid-build (kill -9, a power cut: no finally runs) left behind
    (remove_dead_partials; not on Windows, where no process can be asked about safely).
    """
    remove_dead_partials(path)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.{os.getpid()}.",
                                    suffix=f".partial{path.suffix}")
    os.close(handle)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(name, 0o666 & ~umask)  # mkstemp makes it 0600; a plain file would get this
    return Path(name)


def remove_dead_partials(path: Path) -> None:
    """Delete the temporaries of ``path`` (unique_partial's, and a writer's own ``.partial``
    beside one) whose process no longer runs; a running builder's stay. Only plain files
    named exactly so (another target's, or a name whose id part is not ASCII digits, is
    left alone), and only where they can be deleted: a failure here never fails a build.
    The ids are this machine's: don't share the folder with builders on another machine
    or in another container (a network drive), whose running builds' files would look dead.
    """
    tail = re.compile(rf"([0-9]+)\.[^.]+{re.escape('.partial' + path.suffix)}(?:\.partial)?",
                      re.ASCII)
    for leftover in path.parent.glob(f".{glob.escape(path.stem)}.*.partial"
                                     f"{glob.escape(path.suffix)}*"):
        owner = tail.fullmatch(leftover.name[len(path.stem) + 2:])
        if owner is None or process_runs(int(owner[1])):
            continue
        with contextlib.suppress(OSError):  # deleted already by another builder; not ours
            if stat.S_ISREG(os.lstat(leftover).st_mode):
                leftover.unlink()


def process_runs(pid: int) -> bool:
    """Whether process ``pid`` exists (signal 0 checks without signalling). Where that
    cannot be asked (pid 0 and below name process groups, not a process; on Windows
    signal 0 is CTRL_C_EVENT and other signals terminate the process), the answer is yes:
    a leftover is kept, not lost."""
    if pid <= 0 or os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process; not a pid
        return True  # (keep the file)
    return True


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks (hashlib.file_digest needs Python 3.11;
    torch 2.14 still runs on 3.10)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_hit(cached: Path) -> bool:
    """Whether ``cached`` is a regular file (not a symlink) whose bytes have the SHA-256 that
    keep_in_cache recorded beside it after writing it (a torn or edited entry is a miss)."""
    record = cached.with_name(cached.name + ".sha256")
    try:
        if not stat.S_ISREG(os.lstat(cached).st_mode) or os.path.islink(record):
            return False
        return record.read_text().strip() == file_sha256(cached)
    except (OSError, UnicodeDecodeError):
        return False


def keep_in_cache(built: Path, cached: Path) -> None:
    """Copy ``built`` to ``cached`` and then its SHA-256 beside it, each flushed to disk and
    renamed into place: a reader never takes a half-copied entry for a whole one."""
    cached.parent.mkdir(parents=True, exist_ok=True)
    record = cached.with_name(cached.name + ".sha256")
    for destination, content in ((cached, built.read_bytes()),
                                 (record, file_sha256(built).encode())):
        spare = unique_partial(destination)
        try:
            with spare.open("wb") as handle:
                handle.write(content)
                handle.flush()
                os.fsync(handle.fileno())
            shutil.copymode(built, spare)
            os.replace(spare, destination)
        finally:
            spare.unlink(missing_ok=True)


def build_cpp_loader(folder: Path, compiler: str, cache: Path | None = None) -> float | None:
    """Write CPP_LOADER (and a CMakeLists.txt) into ``folder`` and compile it.

    Returns the compile's seconds, or None when ``cache`` already held a program built from
    the same source, command, compiler and torch (build_once: then it is copied, not
    rebuilt; the compile is 10-20 s of header parsing). A failure raises with the
    compiler's first error line; its whole output goes to build.log.
    """
    source = folder / "load_model.cpp"
    source.write_text(CPP_LOADER)
    (folder / "CMakeLists.txt").write_text(CPP_CMAKE)
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    recipe = cpp_loader_command(compiler, Path("SOURCE"), Path("BINARY"))  # no folder names

    def compile_to(partial: Path) -> None:
        completed = subprocess.run(cpp_loader_command(compiler, source, partial), cwd=folder,
                                   capture_output=True, text=True, timeout=900, check=False)
        if completed.returncode != 0:
            (folder / "build.log").write_text(completed.stdout + completed.stderr)
            errors = [line for line in completed.stderr.splitlines() if "error" in line]
            raise RuntimeError(f"{compiler} could not build {source}: "
                               f"{(errors or ['no error line'])[0][:300]} (full log: build.log)")

    return build_once(cache, [CPP_LOADER, *recipe, version, torch.__version__],
                      folder / "load_model", compile_to)


def start_in_background(function: Callable[..., float], *args) -> Future:
    """Run ``function(*args)`` in a thread and return its Future at once.

    A compiler is another process, so it runs on another core while Python goes on; the
    thread only waits for it. Python joins the thread at exit: the build is never orphaned.
    """
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    future = pool.submit(function, *args)
    pool.shutdown(wait=False)  # no more work for this pool; the submitted build still runs
    return future


def run_cpp_loader(binary: Path, torchscript: Path, package: Path, inputs: torch.Tensor,
                   device: torch.device | str, folder: Path) -> tuple[torch.Tensor, ...]:
    """Run the built program on ``inputs``; return (TorchScript output, AOTInductor output).

    The input and output files go in ``folder``; errors name the program and carry its
    stderr (a wrong path, a package built for another device, a torch version mismatch).
    """
    input_path, output_path = folder / "input.pt", folder / "output.pt"
    torch.save(inputs.detach().cpu(), input_path)
    completed = subprocess.run(
        [str(binary), str(torchscript), str(package), str(input_path), str(output_path),
         str(device)], capture_output=True, text=True, timeout=300, check=False)
    if completed.returncode != 0:
        message = completed.stderr.strip().splitlines() or ["(no message)"]
        raise RuntimeError(f"{binary} exited with {completed.returncode}: {message[0][:500]}")
    return tuple(torch.load(output_path, map_location="cpu", weights_only=True))


def describe_pt2(path: Path) -> dict:
    """What a .pt2 file is, read from its zip entries without loading it.

    torch.export.save writes an ExportedProgram: the graph as JSON (models/*.json, with the
    schema version and the torch version that wrote it) plus weights, and no compiled code.
    aoti_compile_and_package writes an AOTInductor package: the same weights plus shared
    libraries (*.so) of compiled code, for one device (its *_metadata.json files say which,
    AOTI_DEVICE_KEY) and one torch version.
    """
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        graphs = [name for name in names if "/models/" in name and name.endswith(".json")]
        libraries = [info for info in archive.infolist() if info.filename.endswith(".so")]
        graph = json.loads(archive.read(graphs[0])) if graphs else {}
        built_for = sorted({json.loads(archive.read(name)).get("AOTI_DEVICE_KEY", "")
                            for name in names if name.endswith("_metadata.json")})
    schema = graph.get("schema_version", {})
    return {"kind": "AOTInductor package" if libraries else "ExportedProgram",
            "device": ", ".join(built_for),
            "schema": f"{schema['major']}.{schema['minor']}" if schema else "",
            "torch": graph.get("torch_version", ""), "libraries": len(libraries),
            "library_bytes": sum(info.file_size for info in libraries),
            "bytes": path.stat().st_size}


def export_with_cpu_copy(model: nn.Module, args: tuple,
                         dynamic_shapes: dict | None = None) -> tuple:
    """Export ``model`` twice: ``(program, cpu_program)``.

    ``program`` stays on the device of the model and its inputs: AOTInductor compiles for
    that device. ``cpu_program`` is a second export moved to the CPU, the one to
    torch.export.save (torch.export.load has no map_location) and to lower for ExecuTorch.
    Two exports, because move_to_device_pass changes the program it is given IN PLACE and
    returns that same object: moving the only program to the CPU would leave a GPU run
    compiling a CPU package.
    """
    program = torch.export.export(model, args, dynamic_shapes=dynamic_shapes)
    cpu_program = move_to_device_pass(
        torch.export.export(model, args, dynamic_shapes=dynamic_shapes), "cpu")
    return program, cpu_program


def export_to_executorch(program: torch.export.ExportedProgram, path: Path) -> Path:
    """Lower an ExportedProgram for ExecuTorch's XNNPACK (CPU) backend; write the .pte.

    to_edge_transform_and_lower converts the graph to ExecuTorch's Edge dialect and hands
    every part XNNPACK supports to it (the rest runs on ExecuTorch's portable kernels);
    to_executorch() plans the memory and serialises the program. The program must be on the
    CPU (torch.export.passes.move_to_device_pass). Written under a temporary name, then
    renamed: a reader of ``path`` never sees half a file.
    """
    with quiet_torch_logs():  # torchao logs a deprecation from torch's pytree on import
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import (
            XnnpackPartitioner,
        )
        from executorch.exir import to_edge_transform_and_lower

        lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
        buffer = lowered.to_executorch().buffer
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(buffer)
    os.replace(partial, path)
    return path


def lower_once(program_file: Path, path: Path) -> float | None:
    """export_to_executorch on the program in ``program_file`` (a torch.export.save file),
    through build_once: the .pte is kept under a hash of that file, executorch, torch and
    the recipe (export_to_executorch's source: its partitioner and settings).
    Returns the lowering's seconds, or None when a previous run's .pte was copied."""
    key = [program_file.read_bytes(), torch.__version__, importlib.metadata.version("executorch"),
           inspect.getsource(export_to_executorch)]  # the recipe: partitioner and settings
    return build_once(compile_cache("executorch"), key, path, lambda partial: export_to_executorch(
        torch.export.load(program_file), partial))


def load_pte_method(path: Path, name: str = "forward"):
    """Load one method of a .pte file with ExecuTorch's runtime (its Python binding).

    Raises ImportError where executorch is missing or was built for another torch release.
    The runtime's C++ log lines (XNNPACK probing the CPU) are set aside, not printed.
    """
    with quiet_torch_logs():  # torchao, imported by executorch, logs a pytree deprecation
        from executorch.runtime import Runtime
    with native_stderr_captured():
        return Runtime.get().load_program(path).load_method(name)


def execute_or_explain(method, inputs: list) -> list:
    """``method.execute(inputs)``, with the runtime's own reason in the error if it refuses.

    The Python binding raises only "method->set_inputs() ... failed with error 0x10"; the
    line that says why ("Attempted to resize a bounded tensor ...") was written to stderr by
    the C++ runtime, so it is collected and added to the error.
    """
    with native_stderr_captured() as logged:
        try:
            return method.execute(inputs)
        except RuntimeError as err:
            error = err
    reasons = "; ".join(line.split("] ", 1)[-1] for line in logged)  # drop "[file.cpp:N] "
    raise RuntimeError(f"{error} ({reasons or 'the runtime logged nothing'})") from error


@contextlib.contextmanager
def native_stderr_captured() -> Iterator[list[str]]:
    """Collect what C++ code writes to the process's stderr (file descriptor 2).

    contextlib.redirect_stderr only swaps Python's sys.stderr; a C++ library writes to the
    descriptor itself (ExecuTorch's runtime logs its CPU probing there). The lines are put
    in the yielded list, so the caller can show the one that explains an error.
    """
    sys.stderr.flush()
    lines: list[str] = []
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            lines.extend(capture.read().decode(errors="replace").splitlines())


@contextlib.contextmanager
def jit_deprecation_filtered() -> Iterator[None]:
    """Inside, only the (already explained) TorchScript deprecation warning is hidden."""
    with warnings.catch_warnings():
        for category in JIT_WARNING_CATEGORIES:
            warnings.filterwarnings("ignore", message=JIT_DEPRECATION, category=category)
        yield


@contextlib.contextmanager
def quiet_torch_logs() -> Iterator[None]:
    """Silence torch's own log lines and graph dumps around a demonstration.

    A failing torch.export writes the partial FX graph to stderr and logs "Unable to find
    user code" from torch.fx.experimental.symbolic_shapes; Inductor on a CUDA build without a
    GPU logs "No CUDA runtime is found" from torch.utils.cpp_extension; importing torchao
    (ExecuTorch's dependency) logs a registration deprecation from torch.utils._pytree. The
    lesson prints the line that matters instead. Only these loggers and this block's Python
    stdout/stderr are touched.
    """
    loggers = [logging.getLogger(name) for name in
               ("torch.fx.experimental.symbolic_shapes", "torch.utils.cpp_extension",
                "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


# ############################################################################################
# The lessons, in order. In a notebook each cell runs its lesson (the `if in_notebook():`
# lines); `python 05_torchscript_export.py` runs them all through main() at the bottom.
# ############################################################################################

# %% Setup
# The flags, the Inductor caches moved into the out-dir, and a SmallCNN trained for two
# epochs, in eval() mode. `example` is a batch of 4 validation images: the example every
# export traces with, saved as example_input.pt so that other processes can use it too.
# Setup also starts compiling section 4b's C++ program (cpp/load_model.cpp) in the
# background: the compiler needs only the source, not the model, and its 10-20 s of header
# parsing then overlap with sections 1-4 instead of being waited for. The program is kept in
# the compiler cache folder too (inductor_cache/cpp_loader/), so the next run of this script
# copies it instead of compiling it again, as long as source, compiler and torch are the same.
# In a notebook the flags come from the LESSON_ARGS environment variable (none: defaults).


def setup(argv: list[str] | None = None) -> tuple[Run, nn.Module, torch.Tensor, Future | None]:
    """Start the run and the C++ build, train the model, save the example input."""
    run = Run.start(HERE, make_parser(HERE, __doc__.splitlines()[0]), argv)
    keep_compiler_caches_in(run.out_dir / "inductor_cache")  # first: before anything builds
    compiler = find_cxx_compiler()
    # On a CUDA wheel without a GPU, importing cpp_extension logs "No CUDA runtime is found".
    # Import it here: quiet_torch_logs() redirects the whole process's output, so the build
    # thread must not use it while this thread prints.
    with quiet_torch_logs():
        from torch.utils import cpp_extension  # noqa: F401
    cpp_build = (start_in_background(build_cpp_loader, run.folder("cpp"), compiler,
                                     compile_cache("cpp_loader"))
                 if compiler else None)
    switch_off_precompiled_headers()  # imports Inductor while the compiler runs
    model, loaders, accuracy = train_demo_model(run.device, run.seed)
    model.eval()
    print(f"trained SmallCNN for 2 epochs: validation accuracy {accuracy:.3f}")
    example = next(iter(loaders[1]))[0][:4].to(run.device)
    example_path = run.path("example_input.pt")
    torch.save(example.cpu(), example_path)
    run.artifact("example_input", example_path)
    return run, model, example, cpp_build


if in_notebook():
    run, model, example, cpp_build = setup()


# %% 1. TorchScript: trace vs script
# torch.jit.trace RUNS the model once on an example and records the tensor operations that
# happened. Python control flow is not recorded: an `if` on a tensor's value is evaluated
# once, with the example, and the taken branch is baked in. You get a TracerWarning
# ("Converting a tensor to a Python boolean might cause the trace to be incorrect") and a
# model that is silently wrong for inputs that would take the other branch.
# torch.jit.script COMPILES the Python source (a subset of Python) and keeps the control flow.
# Tracing works for straight-line models (most CNNs); scripting for models with branches.


def lesson_1_trace_vs_script(run: Run) -> dict:
    """Trace and script SignGate on a positive example; run both on a negative input.

    The trace took the "x * 2" branch and keeps taking it: on a negative input its output
    differs from eager by the gap between the two branches. The scripted module matches.
    """
    run.section("1. TorchScript: trace vs script")
    gate = SignGate()
    positive, negative = torch.rand(4, 8) + 0.1, -torch.rand(4, 8) - 0.1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(gate, positive)
        scripted = torch.jit.script(gate)
    shown = {}
    for warning in caught:
        shown.setdefault(warning.category.__name__, str(warning.message).splitlines()[0])
    for category, message in shown.items():
        print(f"  {category}: {message[:110]}")
    notice = jit_notice(caught)
    print(f"  (the {notice} is torch's notice that TorchScript is on its way out; from here on "
          "we filter exactly that message)")
    with torch.no_grad():
        trace_wrong = max_abs_diff(traced(negative), gate(negative))
        script_wrong = max_abs_diff(scripted(negative), gate(negative))
        trace_right = max_abs_diff(traced(positive), gate(positive))
    print(f"  traced on a positive example, run on a negative input: max |diff| vs eager = "
          f"{trace_wrong:.3g}  (baked-in branch)")
    print(f"  traced, positive input: {trace_right}; scripted, negative input: {script_wrong}")
    return {"tracer_warning_shown": "TracerWarning" in shown,
            "deprecation_warning_shown": any(c.__name__ in shown for c in JIT_WARNING_CATEGORIES),
            "trace_vs_eager_other_branch_diff": trace_wrong,
            "script_vs_eager_other_branch_diff": script_wrong}


if in_notebook():
    run.record_all(lesson_1_trace_vs_script(run))


# %% 2. Inspect, freeze and save TorchScript
# .code shows the TorchScript source the compiler understood; .graph the IR. torch.jit.freeze
# (needs eval()) turns parameters into constants, inlines submodules and runs the frozen-graph
# optimisations, among them folding each BatchNorm into the Conv before it: freeze is what
# you deploy, and it saves like any ScriptModule. torch.jit.optimize_for_inference calls
# freeze first and then adds rewrites for THIS machine's build (oneDNN layouts); its docstring
# says serialising its result is not supported, so use it in-process only.
# torch.jit.save writes a zip with code and weights: it loads with torch.jit.load in any
# Python process that has torch, with none of your source code (section 3 checks that in a
# fresh process), or in C++:
#     #include <torch/script.h>
#     torch::jit::Module module = torch::jit::load("torchscript_frozen.pt");
#     module.eval();
#     at::Tensor logits = module.forward({torch::ones({8, 1, 16, 16})}).toTensor();
# (Link against libtorch; see https://pytorch.org/cppdocs/installing.html.)


def lesson_2_torchscript_files(run: Run, model: nn.Module) -> tuple[dict, dict]:
    """Print SignGate's TorchScript code; script, freeze and save the trained model.

    The node counts and the aten::batch_norm counts are read from the graphs themselves, so
    the "(BatchNorm folded into Conv)" label appears only when freeze really folded them.
    """
    run.section("2. Inspect, freeze and save TorchScript")
    with jit_deprecation_filtered():
        gate_code = torch.jit.script(SignGate()).code
        print("  torch.jit.script(SignGate()).code:")
        for line in gate_code.strip().splitlines():
            print(f"    | {line}")
        scripted = torch.jit.script(model.eval())
        frozen = torch.jit.freeze(torch.jit.script(model.eval()))
        script_path, frozen_path = run.path("torchscript_model.pt"), run.path(
            "torchscript_frozen.pt")
        torch.jit.save(scripted, script_path)
        torch.jit.save(frozen, frozen_path)
    run.artifact("torchscript_model", script_path)
    run.artifact("torchscript_frozen_model", frozen_path)

    def batch_norms(graph) -> int:
        return sum(node.kind() == "aten::batch_norm" for node in graph.nodes())

    graph_nodes, frozen_nodes = (len(list(scripted.inlined_graph.nodes())),
                                 len(list(frozen.graph.nodes())))
    before, after = batch_norms(scripted.inlined_graph), batch_norms(frozen.graph)
    folded = before > 0 and after == 0
    print(f"  inlined graph: {graph_nodes} nodes, {before} aten::batch_norm; torch.jit.freeze: "
          f"{frozen_nodes} nodes, {after} aten::batch_norm"
          f"{' (BatchNorm folded into Conv)' if folded else ''}")
    return ({"scripted": scripted, "frozen": frozen, "path": script_path},
            {"torchscript_graph_nodes": graph_nodes, "torchscript_frozen_graph_nodes": frozen_nodes,
             "torchscript_frozen_batchnorm_folded": folded})


if in_notebook():
    torchscript, figures = lesson_2_torchscript_files(run, model)
    run.record_all(figures)


# %% 3. torch.export: a portable graph (.pt2)
# torch.export.export(model, args, dynamic_shapes=...) captures the whole model as one graph
# of ATen operations (an ExportedProgram) or fails loudly; there are no silent fallbacks as in
# tracing. torch.export.save writes a .pt2 file; torch.export.load(...).module() gives back a
# callable module, with no need for your source code. Non-strict mode (strict=False, the
# default in current releases) runs your forward() as ordinary Python with fake tensors and
# records the tensor operations; strict=True reads the Python bytecode with TorchDynamo and
# rejects more Python.
# A .pt2 is DEVICE-SPECIFIC: torch.export.load puts each weight back on the device it was
# saved from (there is no map_location), and the graph may hold device constants. A program
# exported on a GPU fails on a CPU-only machine, so move it before saving:
#     program = torch.export.passes.move_to_device_pass(program, "cpu")
# (the same pass takes "cuda:0" or a {"cuda:0": "cpu"} mapping). Pitfall: the pass changes
# the program IN PLACE and returns the same object. To keep a GPU program for AOTInductor
# (section 4) AND save a CPU one, export twice (export_with_cpu_copy, above).


def lesson_3_torch_export(run: Run, model: nn.Module, example: torch.Tensor) -> tuple:
    """Export with a dynamic batch, save on the CPU, reload, run at another batch size.

    The graph lists ATen operators (batch_norm and dropout included: an ExportedProgram
    keeps the model's own operations; folding is a later compiler's job). The batch is a
    symbol with the range declared in Dim, not a number.
    """
    run.section("3. torch.export: a portable graph (.pt2)")
    dynamic = {"x": {0: Dim("batch", min=1, max=1024)}}
    program, cpu_program = export_with_cpu_copy(model, (example,), dynamic)
    path = run.path("exported_program.pt2")
    # Saved on the CPU, whatever device trained it: the file then loads anywhere.
    torch.export.save(cpu_program, path)
    run.artifact("exported_program", path)
    ops = sorted({str(node.target).split(".")[1] for node in program.graph.nodes
                  if node.op == "call_function" and str(node.target).startswith("aten.")})
    print(f"  graph: {len(program.graph.nodes)} nodes; ATen ops {ops}")
    shape = [n.meta["val"].shape for n in program.graph.nodes if n.op == "placeholder"][-1]
    ranges = ", ".join(f"{symbol} in [{bounds.lower}, {bounds.upper}]"
                       for symbol, bounds in program.range_constraints.items())
    print(f"  input x: {tuple(shape)}; the batch became a symbol with a range "
          f"(program.range_constraints): {ranges}")
    saved = torch.export.load(path)
    devices = program_devices(saved)
    with torch.no_grad():
        diff = max_abs_diff(saved.module()(example[:3].cpu()), model(example[:3]))
    print(f"  saved after move_to_device_pass(program, 'cpu'): weights on {devices}; "
          f"torch.export.load(...).module() at batch 3: max |diff| = {diff:.3g}")
    kept = program_devices(program)
    print(f"  the program kept for AOTInductor: weights on {kept} (a separate object: "
          f"{program is not cpu_program})")
    return program, {"exported_program_devices": ", ".join(devices),
                     "exported_kept_program_devices": ", ".join(kept),
                     "exported_reload_max_abs_diff": diff}


def program_devices(program: torch.export.ExportedProgram) -> list[str]:
    """The devices of an ExportedProgram's weights and constants, sorted."""
    return sorted({str(t.device) for t in [*program.state_dict.values(),
                                           *program.constants.values()]
                   if isinstance(t, torch.Tensor)})


if in_notebook():
    program, figures = lesson_3_torch_export(run, model, example)
    run.record_all(figures)


# %% 3b. Both files load where your code is not
# The promise of a TorchScript file and of a .pt2 is that the consumer needs torch but not
# your model's source. Prove it: a fresh `python -I` (isolated: neither this folder nor
# PYTHONPATH is on sys.path, so common/ cannot be imported) loads both files and runs them at
# batch 9, a size neither saw, against outputs computed here.

FRESH_PROCESS_CHECK = r"""
import json, sys, torch
script_path, program_path, input_path, expected_path = sys.argv[1:5]
example = torch.load(input_path, map_location="cpu", weights_only=True)
expected = torch.load(expected_path, map_location="cpu", weights_only=True)
bigger = torch.cat([example, example, example[:1]])  # another batch size than the example
results = {}
scripted = torch.jit.load(script_path, map_location="cpu")
results["torchscript"] = float((scripted(bigger) - expected).abs().max())
program = torch.export.load(program_path).module()
results["exported_program"] = float((program(bigger) - expected).abs().max())
try:
    import common  # noqa: F401
    results["common_importable"] = True
except ImportError:
    results["common_importable"] = False
print(json.dumps(results))
"""


def lesson_3b_fresh_process(run: Run, model: nn.Module, example: torch.Tensor) -> dict:
    """Run FRESH_PROCESS_CHECK on section 2's and 3's files; report its differences.

    "could import common: False" is the proof that the child really had no project code.
    """
    run.section("3b. Both files load where your code is not")
    bigger = torch.cat([example, example, example[:1]]).cpu()
    with run.scratch("fresh_process") as folder, torch.no_grad():
        torch.save(copy.deepcopy(model).cpu()(bigger), folder / "expected.pt")
        completed = subprocess.run(
            [sys.executable, "-I", "-c", FRESH_PROCESS_CHECK,
             str(run.out_dir / "torchscript_model.pt"), str(run.out_dir / "exported_program.pt2"),
             str(run.out_dir / "example_input.pt"), str(folder / "expected.pt")],
            capture_output=True, text=True, cwd=folder, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"fresh-process load failed:\n{completed.stderr[-2000:]}")
    fresh = json.loads(completed.stdout.strip().splitlines()[-1])
    print(f"  fresh process (python -I; could import common: {fresh['common_importable']}), "
          f"batch 9: TorchScript max |diff| = {fresh['torchscript']:.3g}, .pt2 max |diff| = "
          f"{fresh['exported_program']:.3g}")
    return {"fresh_process_torchscript_max_abs_diff": fresh["torchscript"],
            "fresh_process_exported_max_abs_diff": fresh["exported_program"],
            "fresh_process_could_import_common": fresh["common_importable"]}


if in_notebook():
    run.record_all(lesson_3b_fresh_process(run, model, example))


# %% 3c. What makes torch.export fail, and the fix
# Data-dependent control flow fails ("Could not guard on data-dependent expression"): export
# has shapes, not values, so it cannot know which way `if x.sum() > 0` goes. torch.cond keeps
# both branches in the graph and picks one at run time. torch.export prints the partial graph
# when it fails; quiet_torch_logs() keeps that off the console, and we print the one line.


def lesson_3c_export_failure(run: Run) -> dict:
    """Export SignGate (fails) and SignGateCond (exports); run the latter on both branches."""
    run.section("3c. What makes torch.export fail, and the fix")
    try:
        with quiet_torch_logs():  # export dumps the partial graph; the error says enough
            torch.export.export(SignGate(), (torch.rand(4, 8),))
        python_if_fails = False
    except Exception as err:
        python_if_fails = True
        print(f"  a Python `if` on values: {type(err).__name__}: "
              f"{first_line(err, 'Could not guard on data-dependent expression')[:80]}")
    cond_program = torch.export.export(SignGateCond(), (torch.rand(4, 8),))
    negative = -torch.rand(4, 8)
    cond_diff = max_abs_diff(cond_program.module()(negative), SignGate()(negative))
    right = "right" if cond_diff < 1e-6 else "WRONG"
    print(f"  with torch.cond it exports, and the other branch is {right}: max |diff| = "
          f"{cond_diff}")
    return {"export_python_if_fails": python_if_fails, "export_torch_cond_max_abs_diff": cond_diff}


if in_notebook():
    run.record_all(lesson_3c_export_failure(run))


# %% 4. AOTInductor: compile ahead of time
# torch._inductor.aoti_compile_and_package(exported_program, package_path=...) compiles the
# graph with Inductor into a shared library plus weights, packed into one .pt2 package. Load it
# in Python with torch._inductor.aoti_load_package(path), or in C++ (no Python at all) with
# torch::inductor::AOTIModelPackageLoader (section 4b). The compile takes tens of seconds on a
# CPU and needs a C++ compiler; where there is none, install one (build-essential, Xcode
# command-line tools, MSVC) or ship the .pt2 ExportedProgram from section 3 instead.
# Two files, one extension, different promises:
#   exported_program.pt2 (torch.export.save): a graph of ATen operators as JSON plus the
#     weights. Load with torch.export.load; compile it again, lower it for ExecuTorch (4c), or
#     re-run it eagerly. It records its serialisation schema version (major.minor), and
#     torch.export.load reads only a file whose MAJOR version equals its own. It refuses the
#     rest in two steps: it LOGS the cause as a warning ("Serialized schema version ... does
#     not match our current schema version") and then raises RuntimeError("We ran into an
#     error when deserializing the saved file"). torch's own docs for save and load say
#     "saved files may not be usable in newer versions of PyTorch": keep the code and the
#     torch version that exported it, so you can export again.
#   model_aoti.pt2 (aoti_compile_and_package): compiled code (a .so) plus the weights, for ONE
#     device type and built against ONE torch version's C++ ABI. Load it with the torch that
#     built it (Python or C++); after a torch upgrade, recompile it from the ExportedProgram.
# So keep the ExportedProgram as the thing you archive, and the package as a build product.
# A build product is a function of its inputs, and AOTInductor caches nothing itself (every
# call compiles again), so build_once keeps the package under a hash of the program, torch,
# compiler and Inductor settings (aoti_cache_key): a second run of this script copies it.


def lesson_4_aoti(run: Run, program, model: nn.Module, example: torch.Tensor) -> tuple:
    """Compile the exported program into a package; load it; compare at batch 5.

    The difference is a few 1e-7: Inductor fuses and reorders float operations, so the
    last bits differ from eager; a wrong compile would show up orders of magnitude larger.
    describe_pt2 then reads both .pt2 files' zip entries to show what each one holds.
    """
    run.section("4. AOTInductor: compile ahead of time")
    if not has_cpp_compiler():
        print("  SKIPPED (no C++ compiler found): AOTInductor would compile the exported "
              "program into a shared library; section 3's .pt2 still deploys")
        return None, {"aoti_built": False}
    path = run.path("model_aoti.pt2")
    with quiet_torch_logs():  # a CUDA build without a GPU logs "No CUDA runtime is found"
        seconds = build_once(compile_cache("aoti_packages"), aoti_cache_key(program), path,
                             lambda partial: torch._inductor.aoti_compile_and_package(
                                 program, package_path=str(partial)))
    compiled = torch._inductor.aoti_load_package(str(path))
    with torch.no_grad():
        diff = max_abs_diff(compiled(example[:5]), model(example[:5]))
    how = (f"aoti_compile_and_package: {seconds:.1f} s" if seconds is not None else
           "copied from the compile cache (same program, torch, compiler and Inductor config)")
    print(f"  {how}; package {format_bytes(path.stat().st_size)}; at batch 5 max |diff| = "
          f"{diff:.3g}")
    run.artifact("aoti_package", path)
    for name in ("exported_program.pt2", "model_aoti.pt2"):
        info = describe_pt2(run.out_dir / name)
        holds = (f"{info['libraries']} compiled library ({format_bytes(info['library_bytes'])})"
                 f" for {info['device']}" if info["libraries"] else
                 f"graph JSON, schema {info['schema']}, written by torch {info['torch']}")
        print(f"  {name:<21} {info['kind']:<20} {format_bytes(info['bytes']):>9}: {holds}")
    return compiled, {"aoti_built": True, "aoti_compile_reused": seconds is None,
                      "aoti_compile_seconds": round(seconds or 0.0, 2),
                      "aoti_max_abs_diff": diff,
                      "aoti_package_device": describe_pt2(path)["device"]}


if in_notebook():
    aoti, figures = lesson_4_aoti(run, program, model, example)
    run.record_all(figures)


# %% 4b. C++ without Python: one program loads TorchScript and the AOTInductor package
# CPP_LOADER (at the top of this file, written to cpp/load_model.cpp) is the whole program:
# torch::jit::load opens the frozen TorchScript file, AOTIModelPackageLoader the package, and
# tensors travel between Python and C++ as torch.save files (torch::jit::pickle_load reads
# them; pickle_save writes a tuple that torch.load(weights_only=True) reads back).
# Build it against the libtorch inside the pip wheel, as setup did (cpp_loader_command):
#     TORCH=$(python -c "import torch, os; print(os.path.dirname(torch.__file__))")
#     g++ -std=c++20 load_model.cpp -o load_model -I$TORCH/include \
#         -I$TORCH/include/torch/csrc/api/include -L$TORCH/lib -Wl,--no-as-needed \
#         -ltorch -ltorch_cpu -lc10 -Wl,-rpath,$TORCH/lib -D_GLIBCXX_USE_CXX11_ABI=1
# or with CMake against a libtorch zip from pytorch.org (cpp/CMakeLists.txt):
#     cmake -B build -DCMAKE_PREFIX_PATH=/path/to/libtorch && cmake --build build
# Pitfalls: the headers need C++20 (torch 2.14); find_package(Torch) fails on the pip CUDA
# wheel without the CUDA toolkit; and the libtorch must be the one that built the package.
# The proof: the program runs on this run's files at batch 1 and at batch 9 (the export saw
# 4), and its outputs are compared with eager PyTorch here.


def lesson_4b_cpp(run: Run, cpp_build: Future | None, model: nn.Module,
                  example: torch.Tensor) -> dict:
    """Wait for setup's build, run the C++ program at two batch sizes, compare with eager."""
    run.section("4b. C++ without Python: one program loads TorchScript and the AOTInductor "
                "package")
    if cpp_build is None or not (run.out_dir / "model_aoti.pt2").exists():
        print("  SKIPPED (no C++ compiler found): install g++ >= 10 or clang++ (Debian/Ubuntu: "
              "apt install g++; macOS: xcode-select --install) and run again")
        return {"cpp_built": False}
    try:
        seconds = cpp_build.result()  # waits for the build; raises its error
    except RuntimeError as err:  # e.g. a compiler without C++20: say so, go on with 4c
        print(f"  SKIPPED: {err}")
        return {"cpp_built": False}
    folder = run.out_dir / "cpp"
    run.artifact("cpp_source", folder / "load_model.cpp")
    run.artifact("cpp_loader", folder / "load_model")
    print(f"  built cpp/load_model in {seconds:.1f} s (in the background since setup)"
          if seconds is not None else
          "  cpp/load_model: copied from the compile cache (same source, compiler and torch)")
    worst = 0.0
    with run.scratch("cpp_io") as scratch, torch.no_grad():
        for inputs in (example[:1], torch.cat([example, example, example[:1]])):
            from_script, from_package = run_cpp_loader(
                folder / "load_model", run.out_dir / "torchscript_frozen.pt",
                run.out_dir / "model_aoti.pt2", inputs, run.device, scratch)
            expected = model(inputs).cpu()
            diffs = max_abs_diff(from_script, expected), max_abs_diff(from_package, expected)
            worst = max(worst, *diffs)
            print(f"  batch {len(inputs)}: C++ TorchScript max |diff| = {diffs[0]:.3g}, "
                  f"C++ AOTInductor max |diff| = {diffs[1]:.3g}")
    return {"cpp_built": True, "cpp_build_reused": seconds is None,
            "cpp_build_seconds": round(seconds or 0.0, 2), "cpp_max_abs_diff": worst}


if in_notebook():
    run.record_all(lesson_4b_cpp(run, cpp_build, model, example))


# %% 4c. Phones and microcontrollers: ExecuTorch
# ExecuTorch is PyTorch's on-device runtime (Android, iOS, embedded Linux, microcontrollers);
# it replaces PyTorch Mobile, whose torch.utils.mobile_optimizer.optimize_for_mobile and
# _save_for_lite_interpreter you will still meet in old code (both deprecated with TorchScript).
# Its input is section 3's CPU ExportedProgram, read back from exported_program.pt2:
# to_edge_transform_and_lower(program,
# partitioner=[XnnpackPartitioner()]).to_executorch() gives a program whose .buffer is the
# .pte file; the app loads it with the runtime (C++, Java/Kotlin, Swift; here its Python
# binding, executorch.runtime.Runtime). A PTE file is promised to load in at least the next
# minor ExecuTorch release after the one that wrote it (ExecuTorch's COMPATIBILITY.md).
# Pitfall: ExecuTorch plans all memory ahead of time, for the LARGEST shape it allows, which it
# records per input (method.metadata). Read that bound, do not assume the Dim's max: on
# executorch 1.5.1 this Conv2d program lowered WITH XnnpackPartitioner is planned for batch
# <= min(Dim max, 15) (measured: max 8 -> 8, 12 -> 12, 16 -> 15, 64 -> 15, 1024 -> 15; without
# the partitioner the plan follows the Dim), and a larger batch fails at execute time. Its
# C++ runtime logs to the process's stderr directly; native_stderr_captured() collects those
# lines, and the lesson shows the one that explains the refusal. Lowering is a build like
# AOTInductor's: lower_once keeps model.pte (with build_once) under a hash of the program
# file, executorch and torch, and a second run copies it.


def lesson_4c_executorch(run: Run, program, model: nn.Module, example: torch.Tensor) -> tuple:
    """Lower section 3's program to a .pte, run it at three batch sizes, find its limit."""
    run.section("4c. Phones and microcontrollers: ExecuTorch")
    path = run.path("model.pte")
    try:
        seconds = lower_once(run.out_dir / "exported_program.pt2", path)  # section 3's file
        method = load_pte_method(path)
    except ImportError as err:  # not installed, or built for another torch release
        print(f"  SKIPPED (executorch cannot be imported: {first_line(err)[:80]}); install the "
              "executorch release that pairs with your torch (requirements.txt has it)")
        return None, {"executorch_built": False}
    planned = method.metadata.input_tensor_meta(0).sizes()
    allowed = max(int(bounds.upper) for bounds in program.range_constraints.values())
    how = ("copied from the compile cache (same program, executorch and torch)" if seconds is None
           else f"to_edge_transform_and_lower + to_executorch: {seconds:.1f} s")
    print(f"  {how}; model.pte {format_bytes(path.stat().st_size)}")
    print(f"  memory planned for input {tuple(planned)}: batch <= {planned[0]} "
          f"(the ExportedProgram allows up to {allowed})")
    run.artifact("executorch_program", path)
    cpu_model, worst = copy.deepcopy(model).cpu(), 0.0
    with torch.no_grad():
        for batch in (1, len(example), min(9, planned[0])):
            inputs = torch.cat([example.cpu()] * 3)[:batch]
            diff = max_abs_diff(execute_or_explain(method, [inputs])[0], cpu_model(inputs))
            worst = max(worst, diff)
            print(f"  ExecuTorch runtime, batch {batch}: max |diff| vs eager = {diff:.3g}")
    try:
        execute_or_explain(method, [torch.zeros(planned[0] + 1, *planned[1:])])
        refused, reason = False, "it ran"
    except RuntimeError as err:
        refused, reason = True, str(err).rsplit("(", 1)[-1].rstrip(")")
    print(f"  batch {planned[0] + 1}, one above the plan: refused: {refused}; the runtime "
          f"logged:\n    {reason[:120]}")
    return method, {"executorch_built": True,
                    "executorch_lower_reused": seconds is None,
                    "executorch_lower_seconds": round(seconds or 0.0, 2),
                    "executorch_pte_bytes": path.stat().st_size,
                    "executorch_planned_max_batch": planned[0],
                    "executorch_max_abs_diff": worst,
                    "executorch_beyond_plan_refused": refused}


if in_notebook():
    executorch_method, figures = lesson_4c_executorch(run, program, model, example)
    run.record_all(figures)


# %% 5. torch.compile: speed inside the same process
# torch.compile(model) returns a wrapper that compiles on the first call, for that call's
# shapes: the first call at a NEW batch size compiles again (then with a symbolic batch), a
# second pause of seconds in the middle of serving. So this section compiles at the batch
# size section 6 times, SIDE_BY_SIDE_BATCH. Where the batch varies, torch.compile(model,
# dynamic=True) compiles a symbolic batch from the first call: fewer compiles, not always
# one (SmallCNN compiled three times on torch 2.14: batch 1, 2-15, 16 and up).
# TORCH_LOGS=recompiles names the guard behind each new compile.
# Nothing is written that you could deploy: the compiled code lives in this process (and in
# a cache). Use it to speed up training or a Python server; use torch.export / AOTInductor
# to ship a file. Its state_dict gains an "_orig_mod." prefix (07 shows how to strip it).
SIDE_BY_SIDE_BATCH = 8  # section 6's batch; inside every variant's limits (4c's plan too)


def lesson_5_compile(run: Run, model: nn.Module, example: torch.Tensor) -> tuple:
    """Compile the model; time the first call (the compile) and later ones; compare outputs.

    The first call pays for the compile (seconds); later calls at that size are fast. A
    server that restarts often pays it at every start: one reason to ship AOTInductor instead.
    """
    run.section("5. torch.compile: speed inside the same process")
    if not has_cpp_compiler():
        print("  SKIPPED (no C/C++ compiler found): torch.compile generates C++ for the CPU, "
              "and on CUDA Triton builds a small C launcher per kernel")
        return None, {"compile_first_call_seconds": 0.0}
    compiled = torch.compile(model)
    batch = torch.randn(SIDE_BY_SIDE_BATCH, *example.shape[1:], device=run.device)  # as in 6
    with torch.no_grad():
        first = benchmark(lambda: compiled(batch), warmup=0, repeats=1, device=run.device)
        later = benchmark(lambda: compiled(batch), warmup=2, repeats=20, device=run.device)
        diff = max_abs_diff(compiled(batch), model(batch))
    print(f"  batch {len(batch)}: first call (compiles) {first.median_ms / 1000:.1f} s, later "
          f"calls {later.median_ms:.2f} ms (median of 20); max |diff| = {diff:.3g}")
    print(f"  compiled.state_dict() keys start with: {next(iter(compiled.state_dict()))!r}")
    return compiled, {"compile_first_call_seconds": round(first.median_ms / 1000, 2),
                      "compile_later_call_median_ms": round(later.median_ms, 3)}


if in_notebook():
    compiled, figures = lesson_5_compile(run, model, example)
    run.record_all(figures)


# %% 5b. Quantized weights: int8 with torchao
# How do I save and load a quantized model? torch.ao.quantization is deprecated (its own
# warning says "will be removed in 2.10"); its successor is torchao. quantize_(model, config)
# swaps each nn.Linear's weight, in place, for a tensor subclass: Int8WeightOnlyConfig makes
# an Int8Tensor (int8 `qdata`, and a float `scale` and an int8 `zero_point` per output row).
# At each call it casts qdata to float32 for the matmul, then multiplies by the scales: it
# saves bytes at rest, not arithmetic. SmallCNN's only Linear has 128 weights, so int8 would
# save nothing there: this section trains a Linear-heavy classifier (its weight count is
# printed below) on the same kind of images, noisier (noise 3.0, not 0.8), so that accuracy
# is not 100% and a change would show. set_inductor_config=False: by default quantize_ also changes
# torch._inductor.config for the whole process (coordinate-descent tuning and more).


def linear_classifier() -> nn.Sequential:
    """Sections 5b-5i's model: Flatten, then three Linear layers (256 -> 512 -> 512 -> 4)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512),
                         nn.ReLU(), nn.Linear(512, 4))


def lesson_5b_quantize(run: Run) -> tuple:
    """Train linear_classifier for an epoch; quantize a copy with int8 weight-only.

    Returns the fp32 model, its int8 copy, the validation loader and the figures. The copy
    matters: quantize_ replaces the weights of the model it is given, and the lessons after
    this one compare the two.
    """
    run.section("5b. Quantized weights: int8 with torchao")
    with quiet_torch_logs():  # torchao logs a pytree deprecation on import
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    images = make_image_classification(768, noise=3.0, seed=run.seed)
    _, val_loader = loaders = make_loaders(images, seed=run.seed)
    mlp = linear_classifier().to(run.device)
    fit(mlp, *loaders, run.device, epochs=1)
    mlp.eval()
    int8_mlp = copy.deepcopy(mlp)  # quantize_ changes the model it is given
    quantize_(int8_mlp, Int8WeightOnlyConfig(set_inductor_config=False))
    weight = int8_mlp[1].weight
    inputs = next(iter(val_loader))[0].to(run.device)
    with torch.no_grad():
        diff = max_abs_diff(int8_mlp(inputs), mlp(inputs))
    weights = sum(layer.weight.numel() for layer in mlp if isinstance(layer, nn.Linear))
    print(f"  {weights:,} Linear weights ({sum(p.numel() for p in mlp.parameters()):,} "
          f"parameters with the biases), quantized in place")
    print(f"  layer 1 weight is now {type(weight).__module__}.{type(weight).__name__}: qdata "
          f"{weight.qdata.dtype} {tuple(weight.qdata.shape)}, scale {tuple(weight.scale.shape)}")
    print(f"  outputs against fp32 on {len(inputs)} validation images: max |diff| = {diff:.3g}")
    return mlp, int8_mlp, val_loader, {"int8_max_abs_diff": diff, "mlp_linear_weights": weights}


if in_notebook():
    mlp, int8_mlp, val_loader, figures = lesson_5b_quantize(run)
    run.record_all(figures)


# %% 5c. What int8 costs: file size and accuracy
# The file: torch.save(model.state_dict(), path), exactly as for fp32. The weights shrink to
# a quarter (int8 instead of float32) plus the per-row scales; the biases stay fp32. The
# accuracy is measured on the whole validation set, not only as max |diff|: what matters is
# whether a prediction changes. Latency: section 6's table (rows mlp_fp32 and mlp_int8).
# int8_reference.pt keeps the validation images, their labels and the int8 outputs, so that
# another process can check a load: the same outputs, and the same accuracy.


def lesson_5c_cost(run: Run, mlp: nn.Module, int8_mlp: nn.Module, val_loader) -> dict:
    """Save both state_dicts; compare sizes, accuracy and predictions on the validation set.

    A logit that moves by 0.02 changes nothing unless it changes which class is on top:
    "predictions that changed" counts exactly that, over every validation image.
    """
    run.section("5c. What int8 costs: file size and accuracy")
    fp32_path, int8_path = run.path("mlp_fp32_state_dict.pt"), run.path("int8_state_dict.pt")
    torch.save(mlp.state_dict(), fp32_path)
    torch.save(int8_mlp.state_dict(), int8_path)
    ratio = int8_path.stat().st_size / fp32_path.stat().st_size
    print(f"  state_dict file: fp32 {format_bytes(fp32_path.stat().st_size)} -> int8 "
          f"{format_bytes(int8_path.stat().st_size)} ({ratio:.2f}x)")
    inputs = torch.cat([batch for batch, _ in val_loader]).to(run.device)
    labels = torch.cat([label for _, label in val_loader])
    with torch.no_grad():
        fp32_out, int8_out = mlp(inputs), int8_mlp(inputs)
    accuracy = {name: evaluate(model, val_loader, run.device)["accuracy"]
                for name, model in (("fp32", mlp), ("int8", int8_mlp))}
    changed = int((fp32_out.argmax(1) != int8_out.argmax(1)).sum())
    print(f"  validation accuracy ({len(inputs)} images): fp32 {accuracy['fp32']:.4f}, int8 "
          f"{accuracy['int8']:.4f}; predictions that changed: {changed}")
    reference = run.path("int8_reference.pt")
    torch.save({"inputs": inputs.cpu(), "labels": labels.cpu(), "outputs": int8_out.cpu()},
               reference)
    for name, path in (("mlp_fp32_state_dict", fp32_path), ("int8_state_dict", int8_path),
                       ("int8_reference", reference)):
        run.artifact(name, path)
    return {"int8_size_ratio": round(ratio, 4), "int8_state_dict_bytes": int8_path.stat().st_size,
            "fp32_state_dict_bytes": fp32_path.stat().st_size,
            "fp32_accuracy": accuracy["fp32"], "int8_accuracy": accuracy["int8"],
            "int8_predictions_changed": changed}


if in_notebook():
    run.record_all(lesson_5c_cost(run, mlp, int8_mlp, val_loader))


# %% 5d. Which other torchao configs run here?
# Each config makes its own tensor subclass and needs its own kernels. We try five more on
# this device: a line for each that runs (its weight type, file size against fp32, accuracy),
# and for each that does not, SKIPPED with the reason read from the error measured here and
# the step that raised it. Int4WeightOnlyConfig's default packing calls the mslk kernels (a
# CUDA package, mslk-cuda on PyPI; without it: "Requires mslk >= 1.0.0") and expects
# bfloat16 activations.
# Float8DynamicActivationFloat8WeightConfig asserts a GPU of compute capability 8.9 or newer
# (torchao/float8/inference.py), checked inside quantize_, not when the config is built; each
# SKIPPED line names the step that raised. The CPU's int4 is a prototype,
# PrototypeInt4WeightOnlyConfig (torchao.prototype.quantization.int4): Int4OpaqueTensor,
# packed for the CPU's int4 matmul;
# it needs out_features divisible by 16, so the filter below leaves the 4-class layer fp32
# (for every config here, to compare like with like).
OTHER_CONFIGS = {  # name: (its module, what it would show)
    "Int8DynamicActivationInt8WeightConfig": ("torchao.quantization",
                                              "int8 weights and int8 activations"),
    "Float8WeightOnlyConfig": ("torchao.quantization", "float8 weights"),
    "PrototypeInt4WeightOnlyConfig": ("torchao.prototype.quantization.int4.inference_workflow",
                                      "int4 weights for the CPU, in groups of 128"),
    "Int4WeightOnlyConfig": ("torchao.quantization", "int4 weights in groups of 128"),
    "Float8DynamicActivationFloat8WeightConfig": ("torchao.quantization",
                                                  "float8 weights and activations"),
}
SKIP_REASONS = {"mslk": "needs mslk, CUDA only", "compute capability": "needs a CUDA GPU of "
                "compute capability >= 8.9", "CUDA": "no CUDA"}  # first match in the error


def lesson_5d_other_configs(run: Run, mlp: nn.Module, val_loader) -> dict:
    """Quantize a copy of ``mlp`` with each config; print what ran and what could not.

    A failing config raises while its config object is built, in quantize_, or at the first
    forward; the step and the error are printed, and the next config runs. On a GPU the
    same loop shows the CUDA-only ones.
    """
    run.section("5d. Which other torchao configs run here?")
    import importlib

    fp32_bytes = (run.out_dir / "mlp_fp32_state_dict.pt").stat().st_size
    ran = []
    for name, (module, what) in OTHER_CONFIGS.items():
        candidate, step = copy.deepcopy(mlp), "building the config"
        try:
            config = getattr(importlib.import_module(module), name)(set_inductor_config=False)
            step = "quantize_"
            importlib.import_module("torchao.quantization").quantize_(
                candidate, config, filter_fn=lambda layer, _: isinstance(layer, nn.Linear)
                and layer.out_features % 16 == 0)
            step = "the first forward"
            accuracy = evaluate(candidate, val_loader, run.device)["accuracy"]
        except Exception as err:  # each config fails in its own way: ImportError, Assertion...
            reason = next((why for key, why in SKIP_REASONS.items() if key in str(err)),
                          "fails here")
            print(f"  SKIPPED ({reason}): {name} would show {what}; {step} raised "
                  f"{type(err).__name__}: {first_line(err)[:80]}")
            continue
        buffer = io.BytesIO()
        torch.save(candidate.state_dict(), buffer)
        ran.append(name)
        print(f"  {name:<42} {type(candidate[1].weight).__name__:<16} "
              f"{format_bytes(buffer.tell()):>9} ({buffer.tell() / fp32_bytes:.3f}x fp32)  "
              f"validation accuracy {accuracy:.3f}")
    return {"torchao_other_configs_ran": ",".join(ran)}


if in_notebook():
    run.record_all(lesson_5d_other_configs(run, mlp, val_loader))


# %% 5e. Export a quantized model (.pt2)
# torch.export traces through the tensor subclass: the graph reads each weight's qdata and
# scale and does the int8 -> float32 cast and the matmul in plain ATen operations. The file
# keeps the Int8Tensor weights as pickles ("use_pickle": true in model_weights_config.json):
# that is why loading YOUR file needs torchao. It does not make any .pt2 safe or unsafe:
# torch.export.load runs pickles from wherever the archive says, with weights_only=False -
# weights and constants marked use_pickle, opaque-object constants (pickle.loads), and the
# sample inputs (tried with weights_only=True, then silently retried with False): see
# torch/export/pt2_archive/_package.py and torch/_export/serde/serialize.py. Any .pt2, fp32
# included, is as dangerous as a pickle: load only files you made, or whose hash you checked
# against one you trust (03 section 4). Export it on the CPU, as in section 3.


def lesson_5e_export(run: Run, int8_mlp: nn.Module, val_loader) -> dict:
    """Export the int8 model, save and load the .pt2, compare; count its pickled weights.

    The count, read from the archive's model_weights_config.json, says why this file needs
    torchao to load; it says nothing about whether a file from elsewhere is safe.
    """
    run.section("5e. Export a quantized model (.pt2)")
    cpu_model = copy.deepcopy(int8_mlp).cpu()
    inputs = next(iter(val_loader))[0][:8]
    program = torch.export.export(cpu_model, (inputs,))
    path = run.path("int8_exported_program.pt2")
    torch.export.save(program, path)
    with zipfile.ZipFile(path) as archive:
        config = next(name for name in archive.namelist()
                      if name.endswith("model_weights_config.json"))
        weights = json.loads(archive.read(config))["config"]
    pickled = sorted(name for name, entry in weights.items() if entry.get("use_pickle"))
    with torch.no_grad():
        diff = max_abs_diff(torch.export.load(path).module()(inputs), cpu_model(inputs))
    print(f"  torch.export.export + save: {format_bytes(path.stat().st_size)}; loaded back, "
          f"max |diff| = {diff:.3g}")
    print(f"  weights stored as pickles, so loading needs torchao: {pickled}")
    print("  torch.export.load runs pickles from the archive (weights, constants, sample "
          "inputs):\n  load only .pt2 files you made or whose hash you verified (03 section 4)")
    run.artifact("int8_exported_program", path)
    return {"int8_export_max_abs_diff": diff, "int8_pt2_pickled_weights": len(pickled)}


if in_notebook():
    run.record_all(lesson_5e_export(run, int8_mlp, val_loader))


# %% 5f. weights_only=True: import torchao first
# torch.load(weights_only=True) accepts a tensor subclass only if its class is allow-listed.
# torchao does that itself: importing torchao.quantization (which `import torchao` does) runs
# torch.serialization.add_safe_globals([Int8Tensor, ...]). So: import torchao, then load,
# still with weights_only=True. A process that never imports torchao is refused ("Unsupported
# global: GLOBAL torchao.quantization.Int8Tensor"): measured below in a child that imports
# only torch. main() starts that child right after 5c wrote the file, so that its `import
# torch` (seconds) runs during 5d and 5e; the lesson then reads what it printed.

WITHOUT_TORCHAO = r"""
import json, sys, torch
results = {"torchao_imported": "torchao" in sys.modules}
try:
    torch.load(sys.argv[1], map_location="cpu", weights_only=True)
    results["error"] = ""
except Exception as err:
    results["error"] = next((line.strip() for line in str(err).splitlines()
                             if "Unsupported global" in line), str(err).splitlines()[0])
print(json.dumps(results))
"""


def start_child(args: list[str], cwd: Path) -> subprocess.Popen:
    """Start ``python *args`` now; whoever needs its output calls ``.communicate()`` later.

    For a child whose output is short (a pipe holds 64 KiB before the child would block):
    its imports then run on another core while this process goes on.
    """
    return subprocess.Popen([sys.executable, *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def lesson_5f_weights_only(run: Run, without_torchao: subprocess.Popen) -> dict:
    """Load int8_state_dict.pt here (torchao imported); read the child's attempt without it.

    ``without_torchao``: WITHOUT_TORCHAO started on the same file (start_child, ``-I``).
    """
    run.section("5f. weights_only=True: import torchao first")
    state_dict = torch.load(run.out_dir / "int8_state_dict.pt", map_location=run.device,
                            weights_only=True)
    kinds = sorted({type(tensor).__name__ for tensor in state_dict.values()})
    print(f"  torchao imported: weights_only=True loads it; tensor types {kinds}")
    stdout, stderr = without_torchao.communicate(timeout=300)
    if without_torchao.returncode != 0:
        raise RuntimeError(f"the child without torchao failed:\n{stderr[-2000:]}")
    child = json.loads(stdout.strip().splitlines()[-1])
    print(f"  a process that imports only torch (torchao in sys.modules: "
          f"{child['torchao_imported']}):\n    {child['error'].split('. Please')[0] or 'loaded'}")
    return {"int8_load_without_torchao_refused": "Unsupported global" in child["error"]}


if in_notebook():
    run.record_all(lesson_5f_weights_only(run, start_child(
        ["-I", "-c", WITHOUT_TORCHAO, str(run.out_dir / "int8_state_dict.pt")], run.out_dir)))


# %% 5g. load_state_dict needs assign=True
# Without assign=True, load_state_dict copies each loaded tensor INTO the fresh model's fp32
# Parameter (param.copy_(loaded)), and torchao's copy_ only copies between two tensors of the
# same subclass and layout: the error below. assign=True puts the loaded Int8Tensor in place
# of the Parameter instead. The other way: quantize_ the fresh model first, then a plain
# load_state_dict copies Int8Tensor into Int8Tensor, in place (the weight stays the same
# object). Both reproduce the outputs exactly. For inference only: after assign=True the
# weights are Parameters with requires_grad=True, yet a backward leaves their .grad None
# (measured below) - call model.requires_grad_(False), and fine-tune from the fp32 model.


def load_without_assign(state_dict: dict, device: torch.device) -> str:
    """What a plain ``load_state_dict(state_dict)`` of int8 weights into a fresh fp32 model
    says: "loaded", or the line of its error that matters."""
    fresh = linear_classifier().to(device).eval()
    try:
        fresh.load_state_dict(state_dict)
        return "loaded"
    except RuntimeError as err:
        return first_line(err, "'Parameter' object").rstrip("\",).")


def lesson_5g_assign(run: Run, int8_mlp: nn.Module, reference: Path) -> dict:
    """Load int8_state_dict.pt into a fresh fp32 model without and with assign=True.

    The quantize_-first load runs before the assign=True one: once a loaded Int8Tensor has
    been assigned into a model, a later plain load of the same state_dict replaced the weight
    object instead of copying into it (measured with torch 2.14.1 and torchao 0.18).
    """
    run.section("5g. load_state_dict needs assign=True")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    state_dict = torch.load(run.out_dir / "int8_state_dict.pt", map_location=run.device,
                            weights_only=True)
    batch = torch.load(reference, map_location=run.device, weights_only=True)["inputs"]
    without_assign = load_without_assign(state_dict, run.device)
    print(f"  load_state_dict(state_dict): {without_assign}")
    fresh = linear_classifier().to(run.device).eval()
    quantized_first = linear_classifier().to(run.device).eval()
    quantize_(quantized_first, Int8WeightOnlyConfig(set_inductor_config=False))
    before = quantized_first[1].weight
    quantized_first.load_state_dict(state_dict)  # before assign=True below: see the docstring
    in_place = quantized_first[1].weight is before
    fresh.load_state_dict(state_dict, assign=True)
    with torch.no_grad():
        expected = int8_mlp(batch)
        diff, first_diff = (max_abs_diff(model(batch), expected)
                            for model in (fresh, quantized_first))
    print(f"  load_state_dict(state_dict, assign=True): weight {type(fresh[1].weight).__name__}"
          f", max |diff| = {diff}; quantize_ first, then load: max |diff| = {first_diff}, "
          f"copied into the same weight object: {in_place}")
    fresh(batch).sum().backward()  # runs without an error...
    grad = fresh[1].weight.grad
    print(f"  after assign=True: requires_grad={fresh[1].weight.requires_grad}; after a backward"
          f", the int8 weight's .grad is {'None' if grad is None else 'set'} (bias .grad set: "
          f"{fresh[1].bias.grad is not None}): "
          f"{'inference only' if grad is None else 'gradients reach the int8 weights'}")
    return {"int8_reload_max_abs_diff": diff, "int8_quantize_first_max_abs_diff": first_diff,
            "int8_quantize_first_in_place": in_place,
            "int8_weight_grad_after_backward": fresh[1].weight.grad is not None,
            "int8_load_without_assign_fails": without_assign != "loaded"}


if in_notebook():
    run.record_all(lesson_5g_assign(run, int8_mlp, run.out_dir / "int8_reference.pt"))


# %% 5h. Quantized weights in safetensors
# safetensors stores plain tensors only. Given an Int8Tensor, save_file fails with
# "Attempted to access the data pointer on an invalid python storage" (after a TypedStorage
# deprecation warning from the same call, filtered here). torchao 0.18 has its own route, in
# torchao.prototype.safetensors (a prototype: its names may change): flatten_tensor_state_dict
# splits each subclass into plain tensors ("1._weight_qdata", "1._weight_scale", ...) plus
# JSON metadata naming its class and attributes; unflatten_tensor_state_dict rebuilds them,
# and builds only the classes on its allow-list (ALLOWED_CLASSES in safetensors_utils.py).


def lesson_5h_safetensors(run: Run, int8_mlp: nn.Module, reference: Path) -> dict:
    """save_file fails on Int8Tensor; flatten/unflatten round-trips it exactly.

    The file is an ordinary safetensors file: any safetensors reader lists its plain tensors
    (qdata int8, scale and zero point per row, the fp32 biases) and its metadata, and only
    a reader that wants Int8Tensor back needs torchao.
    """
    run.section("5h. Quantized weights in safetensors")
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    with quiet_torch_logs():  # it imports torchao's MX formats, which log a pytree deprecation
        from torchao.prototype.safetensors import safetensors_support as torchao_safetensors

    path = run.path("int8_state_dict.safetensors")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "TypedStorage is deprecated", UserWarning)
            save_file(int8_mlp.state_dict(), path)  # fails before it creates the file
        plain_error = ""
    except RuntimeError as err:
        plain_error = first_line(err)
    print(f"  save_file(int8 state_dict): {plain_error or 'saved'}")
    tensors, metadata = torchao_safetensors.flatten_tensor_state_dict(int8_mlp.state_dict())
    save_file(tensors, path, metadata=metadata)
    with safe_open(path, framework="pt") as file:
        tensors = load_file(path, device=str(run.device))
        state_dict, leftover = torchao_safetensors.unflatten_tensor_state_dict(
            tensors, file.metadata())
    fresh = linear_classifier().to(run.device).eval()
    fresh.load_state_dict(state_dict, assign=True)
    batch = torch.load(reference, map_location=run.device, weights_only=True)["inputs"]
    with torch.no_grad():
        diff = max_abs_diff(fresh(batch), int8_mlp(batch))
    print(f"  flatten_tensor_state_dict -> save_file: {format_bytes(path.stat().st_size)}, "
          f"keys like {sorted(tensors)[:2]}; unflatten + assign=True: max |diff| = {diff}")
    run.artifact("int8_safetensors", path)
    return {"int8_safetensors_plain_fails": bool(plain_error),
            "int8_safetensors_bytes": path.stat().st_size,
            "int8_safetensors_reload_max_abs_diff": diff,
            "int8_safetensors_leftover_keys": len(leftover)}


if in_notebook():
    run.record_all(lesson_5h_safetensors(run, int8_mlp, run.out_dir / "int8_reference.pt"))


# %% 5i. What 01 --inspect says about a quantized file
# `python 01_basic_save_load.py --inspect FILE` reads a checkpoint's pickle without running
# it and names every global it references. On int8_state_dict.pt it names torchao's class:
# the import a loader needs, found before anything is loaded; it exits with its verdict (01
# §13 explains the codes). main() starts it with 5f's child, so its imports overlap 5d-5h.
INSPECTOR = HERE.with_name("01_basic_save_load.py")


def lesson_5i_inspect(run: Run, inspector: subprocess.Popen) -> dict:
    """Print what 01's inspector (started on int8_state_dict.pt) found: exit code, globals."""
    run.section("5i. What 01 --inspect says about a quantized file")
    stdout, _ = inspector.communicate(timeout=300)
    named = sorted(set(re.findall(r"torchao(?:\.\w+)+", stdout)))
    print(f"  exit code {inspector.returncode}; torchao globals it names: {named}")
    for line in stdout.splitlines():
        if line.lower().startswith("verdict"):
            print(f"  01 says: {line.strip()}")
    return {"int8_inspect_exit_code": inspector.returncode,
            "int8_inspect_torchao_globals": ",".join(named)}


if in_notebook():
    run.record_all(lesson_5i_inspect(run, start_child(
        [str(INSPECTOR), "--inspect", str(run.out_dir / "int8_state_dict.pt")], run.out_dir)))


# %% 6. Side by side, and which one should I use?
# SmallCNN's variants on the same inputs, parity with eager (max |diff|), the file each
# variant deploys, and latency with common.timing.benchmark on one device and thread
# count. The batch is 8, inside every variant's limits (ExecuTorch's memory plan included,
# section 4c). The mlp_ rows are another model, 5b's MLP: their parity is against its fp32
# version, and the line after the table compares int8 with fp32 (int8 weight-only
# dequantizes at every call).
# Which one?
#   - Python server or training loop, want speed:  torch.compile.
#   - Ship a model file to Python without its source:  torch.export -> .pt2.
#   - C++ server, no Python:  AOTInductor package (or TorchScript for existing systems).
#   - Phones and microcontrollers:  ExecuTorch (.pte), which starts from torch.export; it
#     replaces TorchScript's lite interpreter (PyTorch Mobile).
#   - Other runtimes (ONNX Runtime, TensorRT, OpenVINO):  ONNX, see 04.
#   - TorchScript:  only to keep existing deployments running; plan the move to torch.export.


def lesson_6_side_by_side(run: Run, model: nn.Module, candidates: dict) -> dict:
    """Parity, file size and batch-8 latency of every variant that was built; a bar chart.

    ``candidates`` maps a name to (callable, file or None[, the model its parity is measured
    against, if not ``model``]). Freezing and the compilers fold
    BatchNorm and fuse operators, which is where their speed comes from; plain scripting and
    the .pt2 module run the same operators as eager. ExecuTorch runs on the CPU: on a CUDA
    run its time includes the copies of the batch and the result.
    """
    run.section("6. Side by side, and which one should I use?")
    batch = torch.randn(SIDE_BY_SIDE_BATCH, 1, 16, 16, device=run.device)
    with torch.no_grad():
        expected = model(batch)
    rows, figures = [], {}
    print(f"  batch {SIDE_BY_SIDE_BATCH} on {run.device}, {torch.get_num_threads()} threads")
    print(f"  {'variant':<22} {'file':>10}  {'max |diff|':>11}  {'median ms':>10}  {'p90 ms':>8}")
    for name, (module, file, *against) in candidates.items():  # against: 5b's fp32 MLP
        if module is None:
            print(f"  {name:<22} {'':>10}  {'SKIPPED':>11}")
            continue

        def call(module=module):
            with torch.no_grad():
                return module(batch)

        diff = max_abs_diff(call(), against[0](batch) if against else expected)
        timing = benchmark(call, warmup=5, repeats=30, device=run.device)
        rows.append((name, timing))
        size = format_bytes(file.stat().st_size) if file else "-"
        print(f"  {name:<22} {size:>10}  {diff:>11.3g}  {timing.median_ms:>10.3f}  "
              f"{timing.p90_ms:>8.3f}")
        key = name.split(" ")[0].replace("+", "_").replace(".", "_")
        figures |= {f"{key}_max_abs_diff": diff, f"{key}_median_ms": round(timing.median_ms, 4)}
    if {"mlp_fp32_median_ms", "mlp_int8_median_ms"} <= figures.keys():
        ratio = figures["mlp_int8_median_ms"] / figures["mlp_fp32_median_ms"]
        figures["mlp_int8_over_fp32_latency"] = round(ratio, 3)
        print(f"  5b's MLP: int8 {figures['mlp_int8_median_ms']:.3f} ms is {ratio:.2f}x fp32's "
              f"{figures['mlp_fp32_median_ms']:.3f} ms: {'slower' if ratio > 1 else 'faster'}")
    save_latency_chart(run, rows)
    return figures


def save_latency_chart(run: Run, rows: list) -> None:
    """latency.png: one bar per variant, the median, with a whisker to p90."""
    figure, axes = plt.subplots(figsize=(7, 4))
    positions = np.arange(len(rows))
    axes.barh(positions, [t.median_ms for _, t in rows],
              xerr=[[0] * len(rows), [t.p90_ms - t.median_ms for _, t in rows]], capsize=3)
    axes.set_yticks(positions, [name for name, _ in rows])
    axes.invert_yaxis()
    axes.set(xlabel="latency, ms (median; bar to p90)",
             title=f"SmallCNN variants (mlp_: 5b's MLP), batch {SIDE_BY_SIDE_BATCH}, {run.device}, "
                   f"{torch.get_num_threads()} threads")
    run.save_figure(figure, "latency.png", "latency_chart")


def candidates(run: Run, model: nn.Module, torchscript: dict, aoti, executorch_method,
               compiled) -> dict:
    """Every variant built above: name -> (callable or None if skipped, the file it ships)."""
    out = run.out_dir

    def on_executorch(batch: torch.Tensor) -> torch.Tensor:
        return executorch_method.execute([batch.cpu()])[0].to(batch.device)

    return {
        "eager": (model, None),
        "torchscript (scripted)": (torchscript["scripted"], out / "torchscript_model.pt"),
        "torchscript_frozen": (torchscript["frozen"], out / "torchscript_frozen.pt"),
        "torch.export (.pt2)": (move_to_device_pass(  # the file holds CPU weights
            torch.export.load(out / "exported_program.pt2"), run.device).module(),
            out / "exported_program.pt2"),
        "aoti (AOTInductor)": (aoti, out / "model_aoti.pt2"),
        "executorch (.pte)": (on_executorch if executorch_method else None, out / "model.pte"),
        "torch.compile": (compiled, None),
    }


def quantized_candidates(run: Run, mlp: nn.Module, int8_mlp: nn.Module) -> dict:
    """Section 6's rows for 5b's model: name -> (callable, file, the model to compare with).

    The files are the state_dicts 5c saved: what a deployment of each would ship. Their
    parity is against the fp32 MLP, not SmallCNN: the third element says which model.
    """
    return {"mlp_fp32 (5b, fp32)": (mlp, run.out_dir / "mlp_fp32_state_dict.pt", mlp),
            "mlp_int8 (5b, torchao)": (int8_mlp, run.out_dir / "int8_state_dict.pt", mlp)}


if in_notebook():
    with jit_deprecation_filtered():
        run.record_all(lesson_6_side_by_side(
            run, model, candidates(run, model, torchscript, aoti, executorch_method, compiled)
            | quantized_candidates(run, mlp, int8_mlp)))


# %% Summary
# What the run measured, the files it wrote (also in summary.json), and what to try next.
RECAP = [
    "trace records one run (branches baked in); script compiles the source; both are "
    "deprecated, keep them only for existing deployments",
    "torch.export -> .pt2 loads without your source (save it on the CPU); AOTInductor "
    "compiles it into a package for Python or C++ (recompile it after a torch upgrade)",
    "a C++ program loads TorchScript (torch::jit::load) and the package "
    "(AOTIModelPackageLoader): build it with -std=c++20 against the wheel's own libtorch",
    "ExecuTorch (.pte) is the on-device path; read its memory plan's largest input",
    "torch.compile speeds up the same process; it is not a deployment format",
    "torchao int8 weights: torch.save the state_dict as usual; import torchao before "
    "torch.load(weights_only=True), load with assign=True; safetensors via torchao's flatten",
]
TRY_IT = ("run outputs/05_torchscript_export/cpp/load_model on your own input (usage: run it "
          "without arguments); then run 06_transfer_learning.py")

if in_notebook():
    summary = run.finish(RECAP, TRY_IT)


def main(argv: list[str] | None = None) -> dict:
    """Run every lesson in order and return the summary (also written to summary.json)."""
    run, model, example, cpp_build = setup(argv)
    run.record_all(lesson_1_trace_vs_script(run))
    torchscript, figures = lesson_2_torchscript_files(run, model)
    run.record_all(figures)
    program, figures = lesson_3_torch_export(run, model, example)
    run.record_all(figures)
    run.record_all(lesson_3b_fresh_process(run, model, example))
    run.record_all(lesson_3c_export_failure(run))
    aoti, figures = lesson_4_aoti(run, program, model, example)
    run.record_all(figures)
    run.record_all(lesson_4b_cpp(run, cpp_build, model, example))
    executorch_method, figures = lesson_4c_executorch(run, program, model, example)
    run.record_all(figures)
    compiled, figures = lesson_5_compile(run, model, example)
    run.record_all(figures)
    mlp, int8_mlp, val_loader, figures = lesson_5b_quantize(run)
    run.record_all(figures)
    run.record_all(lesson_5c_cost(run, mlp, int8_mlp, val_loader))
    int8_path = run.out_dir / "int8_state_dict.pt"  # 5f's and 5i's children start now
    without_torchao = start_child(["-I", "-c", WITHOUT_TORCHAO, str(int8_path)], run.out_dir)
    inspector = start_child([str(INSPECTOR), "--inspect", str(int8_path)], run.out_dir)
    run.record_all(lesson_5d_other_configs(run, mlp, val_loader))
    run.record_all(lesson_5e_export(run, int8_mlp, val_loader))
    run.record_all(lesson_5f_weights_only(run, without_torchao))
    reference = run.out_dir / "int8_reference.pt"
    run.record_all(lesson_5g_assign(run, int8_mlp, reference))
    run.record_all(lesson_5h_safetensors(run, int8_mlp, reference))
    run.record_all(lesson_5i_inspect(run, inspector))
    with jit_deprecation_filtered():
        run.record_all(lesson_6_side_by_side(
            run, model, candidates(run, model, torchscript, aoti, executorch_method, compiled)
            | quantized_candidates(run, mlp, int8_mlp)))
    return run.finish(RECAP, TRY_IT)


if __name__ == "__main__" and not in_notebook():
    main()
