"""05 · TorchScript, and what replaces it — torch.export, AOTInductor and torch.compile.

What you will learn (each section runs real code and prints the measured figure):
  1.  TorchScript: trace vs script, and the branch that tracing silently bakes in
  2.  Inspecting, freezing (BatchNorm folded into Conv, measured) and saving TorchScript
  3.  torch.export: a .pt2 ExportedProgram with a dynamic batch, saved on the CPU
  3b. Both files load in a process that cannot import your code
  3c. What makes torch.export fail (a Python `if` on values), and torch.cond
  4.  AOTInductor: compile the exported program ahead of time into a package
  5.  torch.compile: a speed-up inside the same process, not a file to deploy
  6.  Side by side: parity and latency of all six; which one should I use?

Run it:   python 05_torchscript_export.py [--device cpu|cuda] [--out-dir DIR] [--seed N]
          As a notebook: run the cells top to bottom from the project folder (jupytext,
          VS Code, PyCharm); flags go in the LESSON_ARGS environment variable.
Takes:    about 30 s on a 2-core CPU, most of it the C++ compiles of AOTInductor and
          torch.compile (needs gcc/clang; without one, those two are skipped with a message).
Next:     06_transfer_learning.py, loading what fits into a changed model.

Files it writes (in --out-dir): example_input.pt (the batch every export traced with),
torchscript_model.pt and torchscript_frozen.pt (TorchScript, as scripted and frozen),
exported_program.pt2 (torch.export, CPU weights), model_aoti.pt2 (the AOTInductor package),
inductor_cache/ (Inductor's compiled kernels: deleting it only costs a recompile),
latency.png and summary.json.

TorchScript (torch.jit.trace / torch.jit.script) is deprecated: torch 2.10+ warns on every
call and the official tutorial was removed. Many deployed systems still load TorchScript .pt
files, so you should be able to read and keep them running; new work should use torch.export
(a portable graph, .pt2), AOTInductor (that graph compiled to a shared library) or
torch.compile (in-process speed), as this script shows on one trained model.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn
from torch.export import Dim
from torch.export.passes import move_to_device_pass

from common.compare import max_abs_diff
from common.models import SignGate, SignGateCond
from common.run import Run, first_line, format_bytes, in_notebook, make_parser, script_file
from common.timing import benchmark
from common.training import train_demo_model

matplotlib.use("Agg")  # write PNG files, never open a window
HERE = script_file(globals(), "05_torchscript_export.py")  # a notebook kernel has no __file__


# ############################################################################################
# Reusable pieces: copy these into your own code.
# ############################################################################################

# Every torch.jit call warns: "`torch.jit.script` is deprecated. Please switch to
# `torch.compile` or `torch.export`." (a FutureWarning on torch 2.14; torch 2.10-2.12 raise
# it as a DeprecationWarning). Section 1 shows the warning once; after that this pattern
# filters exactly that message, in those two categories, nothing else. On Python 3.14+
# torch.jit.script also warns that it is not supported there at all: one more reason to move.
JIT_DEPRECATION = r"`torch\.jit\.[\w.]+` is deprecated"
JIT_WARNING_CATEGORIES = (FutureWarning, DeprecationWarning)


def keep_compiler_caches_in(folder: Path) -> None:
    """Make Inductor (torch.compile, AOTInductor) write its caches inside ``folder``.

    By default they go to /tmp/torchinductor_<user>. TORCHINDUCTOR_CACHE_DIR moves the kernel
    cache (if you set it yourself, your choice wins: a warm cache makes the next compile
    several times faster); precompiled headers have their own location, so we switch them off.
    """
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(folder))
    import torch._inductor.config as inductor_config

    inductor_config.cpp_cache_precompile_headers = False
    inductor_config.aot_inductor.precompile_headers = False


def has_cpp_compiler() -> bool:
    """Inductor compiles C++ on the CPU (g++, clang++ or MSVC's cl) and, on CUDA, Triton
    compiles a C launcher with the system's C compiler (gcc/cc/clang): g++ brings both."""
    return any(shutil.which(name) for name in ("g++", "c++", "clang++", "cl"))


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
    GPU logs "No CUDA runtime is found" from torch.utils.cpp_extension. The lesson prints the
    one line that matters instead. Only these two loggers and this block's stderr are touched.
    """
    loggers = [logging.getLogger(name) for name in
               ("torch.fx.experimental.symbolic_shapes", "torch.utils.cpp_extension")]
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
# In a notebook the flags come from the LESSON_ARGS environment variable (none: defaults).


def setup(argv: list[str] | None = None) -> tuple[Run, nn.Module, torch.Tensor]:
    """Start the run, train the model, save the example input; return all three."""
    run = Run.start(HERE, make_parser(HERE, __doc__.splitlines()[0]), argv)
    keep_compiler_caches_in(run.out_dir / "inductor_cache")
    model, loaders, accuracy = train_demo_model(run.device, run.seed)
    model.eval()
    print(f"trained SmallCNN for 2 epochs: validation accuracy {accuracy:.3f}")
    example = next(iter(loaders[1]))[0][:4].to(run.device)
    example_path = run.path("example_input.pt")
    torch.save(example.cpu(), example_path)
    run.artifact("example_input", example_path)
    return run, model, example


if in_notebook():
    run, model, example = setup()


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
    print("  (the FutureWarning is torch's deprecation notice for TorchScript; from here on we "
          "filter exactly that message)")
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
# (the same pass takes "cuda:0" or a {"cuda:0": "cpu"} mapping).


def lesson_3_torch_export(run: Run, model: nn.Module, example: torch.Tensor) -> tuple:
    """Export with a dynamic batch, save on the CPU, reload, run at another batch size.

    The graph lists ATen operators (batch_norm and dropout included: an ExportedProgram
    keeps the model's own operations; folding is a later compiler's job). The batch is a
    symbol with the range declared in Dim, not a number.
    """
    run.section("3. torch.export: a portable graph (.pt2)")
    dynamic = {"x": {0: Dim("batch", min=1, max=1024)}}
    program = torch.export.export(model, (example,), dynamic_shapes=dynamic)
    path = run.path("exported_program.pt2")
    # Saved on the CPU, whatever device trained it: the file then loads anywhere.
    torch.export.save(move_to_device_pass(program, "cpu"), path)
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
    devices = sorted({str(t.device) for t in [*saved.state_dict.values(),
                                               *saved.constants.values()]
                      if isinstance(t, torch.Tensor)})
    with torch.no_grad():
        diff = max_abs_diff(saved.module()(example[:3].cpu()), model(example[:3]))
    print(f"  saved after move_to_device_pass(program, 'cpu'): weights on {devices}; "
          f"torch.export.load(...).module() at batch 3: max |diff| = {diff:.3g}")
    return program, {"exported_program_devices": ", ".join(devices),
                     "exported_reload_max_abs_diff": diff}


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
    print(f"  with torch.cond it exports, and the other branch is right: max |diff| = {cond_diff}")
    return {"export_python_if_fails": python_if_fails, "export_torch_cond_max_abs_diff": cond_diff}


if in_notebook():
    run.record_all(lesson_3c_export_failure(run))


# %% 4. AOTInductor: compile ahead of time
# torch._inductor.aoti_compile_and_package(exported_program, package_path=...) compiles the
# graph with Inductor into a shared library plus weights, packed into one .pt2 package. Load it
# in Python with torch._inductor.aoti_load_package(path), or in C++ (no Python at all) with
# torch::inductor::AOTIModelPackageLoader. The compile takes tens of seconds on a CPU and needs
# a C++ compiler; where there is none, install one (build-essential, Xcode command-line tools,
# MSVC) or ship the .pt2 ExportedProgram from section 3 instead. Unlike section 3's file, the
# package is compiled code: it runs only with the torch version and device it was built for.


def lesson_4_aoti(run: Run, program, model: nn.Module, example: torch.Tensor) -> tuple:
    """Compile the exported program into a package; load it; compare at batch 5.

    The difference is a few 1e-7: Inductor fuses and reorders float operations, so the
    last bits differ from eager; a wrong compile would show up orders of magnitude larger.
    """
    run.section("4. AOTInductor: compile ahead of time")
    if not has_cpp_compiler():
        print("  SKIPPED (no C++ compiler found): AOTInductor would compile the exported "
              "program into a shared library; section 3's .pt2 still deploys")
        return None, {"aoti_built": False}
    path = run.path("model_aoti.pt2")
    with quiet_torch_logs():  # a CUDA build without a GPU logs "No CUDA runtime is found"
        timing = benchmark(lambda: torch._inductor.aoti_compile_and_package(
            program, package_path=str(path)), warmup=0, repeats=1)
    compiled = torch._inductor.aoti_load_package(str(path))
    with torch.no_grad():
        diff = max_abs_diff(compiled(example[:5]), model(example[:5]))
    print(f"  aoti_compile_and_package: {timing.median_ms / 1000:.1f} s; package "
          f"{format_bytes(path.stat().st_size)}; at batch 5 max |diff| = {diff:.3g}")
    run.artifact("aoti_package", path)
    return compiled, {"aoti_built": True, "aoti_compile_seconds": round(timing.median_ms / 1000, 2),
                      "aoti_max_abs_diff": diff}


if in_notebook():
    aoti, figures = lesson_4_aoti(run, program, model, example)
    run.record_all(figures)


# %% 5. torch.compile: speed inside the same process
# torch.compile(model) returns a wrapper that compiles on the first call (and again for new
# shapes, until it marks them dynamic). Nothing is written that you could deploy: the compiled
# code lives in this process (and in a cache). Use it to speed up training or a Python server;
# use torch.export / AOTInductor to ship a file. Its state_dict gains an "_orig_mod." prefix
# (07 shows how to strip it).


def lesson_5_compile(run: Run, model: nn.Module, example: torch.Tensor) -> tuple:
    """Compile the model; time the first call (the compile); compare outputs.

    The first call pays for the compile (seconds); later calls are fast. A server that
    restarts often pays it at every start, which is one reason to ship AOTInductor instead.
    """
    run.section("5. torch.compile: speed inside the same process")
    if not has_cpp_compiler():
        print("  SKIPPED (no C/C++ compiler found): torch.compile generates C++ for the CPU, "
              "and on CUDA Triton builds a small C launcher per kernel")
        return None, {"compile_first_call_seconds": 0.0}
    compiled = torch.compile(model)
    with torch.no_grad():
        first = benchmark(lambda: compiled(example), warmup=0, repeats=1, device=run.device)
        diff = max_abs_diff(compiled(example), model(example))
    print(f"  first call (compiles): {first.median_ms / 1000:.1f} s; max |diff| = {diff:.3g}")
    print(f"  compiled.state_dict() keys start with: {next(iter(compiled.state_dict()))!r}")
    return compiled, {"compile_first_call_seconds": round(first.median_ms / 1000, 2)}


if in_notebook():
    compiled, figures = lesson_5_compile(run, model, example)
    run.record_all(figures)


# %% 6. Side by side, and which one should I use?
# Same trained model, same inputs, parity with eager (max |diff|) and latency with
# common.timing.benchmark on one device and thread count.
# Which one?
#   - Python server or training loop, want speed:  torch.compile.
#   - Ship a model file to Python without its source:  torch.export -> .pt2.
#   - C++ server, no Python:  AOTInductor package (or TorchScript for existing systems).
#   - Phones and microcontrollers:  ExecuTorch, which starts from torch.export; it replaces
#     TorchScript's lite interpreter (PyTorch Mobile).
#   - Other runtimes (ONNX Runtime, TensorRT, OpenVINO):  ONNX, see 04.
#   - TorchScript:  only to keep existing deployments running; plan the move to torch.export.


def lesson_6_side_by_side(run: Run, model: nn.Module, candidates: dict) -> dict:
    """Parity and batch-32 latency of every variant that was built; a bar chart.

    Freezing and the compilers fold BatchNorm and fuse operators, which is where their
    speed comes from; plain scripting and the .pt2 module run the same operators as eager.
    """
    run.section("6. Side by side, and which one should I use?")
    batch = torch.randn(32, 1, 16, 16, device=run.device)
    with torch.no_grad():
        expected = model(batch)
    rows, figures = [], {}
    print(f"  batch 32 on {run.device}, {torch.get_num_threads()} threads")
    print(f"  {'variant':<22} {'max |diff|':>11}  {'median ms':>10}  {'p90 ms':>8}")
    for name, module in candidates.items():
        if module is None:
            print(f"  {name:<22} {'SKIPPED':>11}")
            continue

        def call(module=module):
            with torch.no_grad():
                return module(batch)

        diff = max_abs_diff(call(), expected)
        timing = benchmark(call, warmup=5, repeats=30, device=run.device)
        rows.append((name, timing))
        print(f"  {name:<22} {diff:>11.3g}  {timing.median_ms:>10.3f}  {timing.p90_ms:>8.3f}")
        key = name.split(" ")[0].replace("+", "_").replace(".", "_")
        figures |= {f"{key}_max_abs_diff": diff, f"{key}_median_ms": round(timing.median_ms, 4)}
    figure, axes = plt.subplots(figsize=(7, 4))
    positions = np.arange(len(rows))
    axes.barh(positions, [t.median_ms for _, t in rows],
              xerr=[[0] * len(rows), [t.p90_ms - t.median_ms for _, t in rows]], capsize=3)
    axes.set_yticks(positions, [name for name, _ in rows])
    axes.invert_yaxis()
    axes.set(xlabel="latency, ms (median; bar to p90)",
             title=f"SmallCNN, batch 32, {run.device}, {torch.get_num_threads()} threads")
    run.save_figure(figure, "latency.png", "latency_chart")
    return figures


def candidates(run: Run, model: nn.Module, torchscript: dict, aoti, compiled) -> dict:
    """Every variant built above, by name (None: skipped); the .pt2 is loaded from its file."""
    return {
        "eager": model,
        "torchscript (scripted)": torchscript["scripted"],
        "torchscript_frozen": torchscript["frozen"],
        "torch.export (.pt2)": move_to_device_pass(  # the file holds CPU weights
            torch.export.load(run.out_dir / "exported_program.pt2"), run.device).module(),
        "aoti (AOTInductor)": aoti,
        "torch.compile": compiled,
    }


if in_notebook():
    with jit_deprecation_filtered():
        run.record_all(lesson_6_side_by_side(
            run, model, candidates(run, model, torchscript, aoti, compiled)))


# %% Summary
# What the run measured, the files it wrote (also in summary.json), and what to try next.
RECAP = [
    "trace records one run (branches baked in); script compiles the source; both are "
    "deprecated, keep them only for existing deployments",
    "torch.export -> .pt2 loads without your source (save it on the CPU); AOTInductor "
    "compiles it into a package for Python or C++",
    "torch.compile speeds up the same process; it is not a deployment format",
]
TRY_IT = ("load outputs/05_torchscript_export/exported_program.pt2 with "
          "torch.export.load(...).module() in a Python shell; then run 06_transfer_learning.py")

if in_notebook():
    summary = run.finish(RECAP, TRY_IT)


def main(argv: list[str] | None = None) -> dict:
    """Run every lesson in order and return the summary (also written to summary.json)."""
    run, model, example = setup(argv)
    run.record_all(lesson_1_trace_vs_script(run))
    torchscript, figures = lesson_2_torchscript_files(run, model)
    run.record_all(figures)
    program, figures = lesson_3_torch_export(run, model, example)
    run.record_all(figures)
    run.record_all(lesson_3b_fresh_process(run, model, example))
    run.record_all(lesson_3c_export_failure(run))
    aoti, figures = lesson_4_aoti(run, program, model, example)
    run.record_all(figures)
    compiled, figures = lesson_5_compile(run, model, example)
    run.record_all(figures)
    with jit_deprecation_filtered():
        run.record_all(lesson_6_side_by_side(
            run, model, candidates(run, model, torchscript, aoti, compiled)))
    return run.finish(RECAP, TRY_IT)


if __name__ == "__main__" and not in_notebook():
    main()
