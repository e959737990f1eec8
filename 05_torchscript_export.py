"""05 · TorchScript, and what replaces it — torch.export, AOTInductor and torch.compile.

What you will learn (each section runs real code and prints the measured figure):
  1. TorchScript: trace vs script, and the branch that tracing silently bakes in
  2. Inspecting, freezing and saving TorchScript; loading it in a process without your code
  3. torch.export: a .pt2 ExportedProgram with a dynamic batch, and what makes export fail
  4. AOTInductor: compile the exported program ahead of time into a package
  5. torch.compile: a speed-up inside the same process, not a file to deploy
  6. Side by side: parity and latency of all six; which one should I use?

Run it:   python 05_torchscript_export.py [--device cpu|cuda] [--out-dir DIR] [--seed N]
Takes:    about 30 s on a 2-core CPU, most of it the C++ compiles of AOTInductor and
          torch.compile (needs gcc/clang; without one, those two are skipped with a message).
Next:     06_transfer_learning.py, loading what fits into a changed model.

TorchScript (torch.jit.trace / torch.jit.script) is deprecated: torch 2.10+ warns on every
call and the official tutorial was removed. Many deployed systems still load TorchScript .pt
files, so you should be able to read and keep them running; new work should use torch.export
(a portable graph, .pt2), AOTInductor (that graph compiled to a shared library) or
torch.compile (in-process speed), as this script shows on one trained model.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
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
from common.data import make_image_classification, make_loaders
from common.models import SmallCNN
from common.run import Run, format_bytes, make_parser
from common.timing import benchmark
from common.training import fit

matplotlib.use("Agg")  # write PNG files, never open a window

# Every torch.jit call warns: "`torch.jit.script` is deprecated. Please switch to
# `torch.compile` or `torch.export`." (a FutureWarning on torch 2.14; torch 2.10-2.12 raise
# it as a DeprecationWarning). Section 1 shows the warning once; after that this pattern
# filters exactly that message, in those two categories, nothing else. On Python 3.14+
# torch.jit.script also warns that it is not supported there at all: one more reason to move.
JIT_DEPRECATION = r"`torch\.jit\.[\w.]+` is deprecated"
JIT_WARNING_CATEGORIES = (FutureWarning, DeprecationWarning)

# ############################################################################################
# Reusable pieces: copy these into your own code.
# ############################################################################################


class SignGate(nn.Module):
    """Data-dependent control flow: the branch depends on the input's VALUES."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.sum() > 0):
            return x * 2
        return x - 1


class SignGateCond(nn.Module):
    """The export-friendly form: ``torch.cond`` keeps both branches in the graph."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cond(x.sum() > 0, lambda x: x * 2, lambda x: x - 1, (x,))


def keep_compiler_caches_in(folder: Path) -> None:
    """Make Inductor (torch.compile, AOTInductor) write its caches inside ``folder``.

    By default they go to /tmp/torchinductor_<user>. TORCHINDUCTOR_CACHE_DIR moves the kernel
    cache; precompiled headers have their own location, so we switch them off.
    """
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
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
def quiet_torch_logs() -> Iterator[str]:
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


def check_in_fresh_process(run: Run, model: nn.Module, example: torch.Tensor,
                           script_path: Path, program_path: Path) -> dict:
    """Load both files in ``python -I`` (isolated: neither this folder nor PYTHONPATH is on
    sys.path, so the model's source cannot be imported) and compare with eager outputs."""
    expected_path = run.path("expected_outputs.pt")
    bigger = torch.cat([example, example, example[:1]]).cpu()
    with torch.no_grad():
        torch.save(model.cpu()(bigger), expected_path)
    model.to(run.device)
    completed = subprocess.run(
        [sys.executable, "-I", "-c", FRESH_PROCESS_CHECK, str(script_path), str(program_path),
         str(run.out_dir / "example_input.pt"), str(expected_path)],
        capture_output=True, text=True, cwd=run.out_dir, check=False,
    )
    expected_path.unlink()
    if completed.returncode != 0:
        raise RuntimeError(f"fresh-process load failed:\n{completed.stderr[-2000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


# Child-process code for check_in_fresh_process: only torch is importable.
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


# ############################################################################################
# The lessons, in order.
# ############################################################################################

# %% 1. TorchScript: trace vs script
# torch.jit.trace RUNS the model once on an example and records the tensor operations that
# happened. Python control flow is not recorded: an `if` on a tensor's value is evaluated
# once, with the example, and the taken branch is baked in. You get a TracerWarning
# ("Converting a tensor to a Python boolean might cause the trace to be incorrect") and a
# model that is silently wrong for inputs that would take the other branch.
# torch.jit.script COMPILES the Python source (a subset of Python) and keeps the control flow.
# Tracing works for straight-line models (most CNNs); scripting for models with branches.


def lesson_1_trace_vs_script(run: Run) -> None:
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
    run.record("tracer_warning_shown", "TracerWarning" in shown)
    run.record("deprecation_warning_shown",
               any(c.__name__ in shown for c in JIT_WARNING_CATEGORIES))
    run.record("trace_vs_eager_other_branch_diff", trace_wrong)
    run.record("script_vs_eager_other_branch_diff", script_wrong)


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


def lesson_2_torchscript_files(run: Run, model: nn.Module) -> dict:
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
    run.record("torchscript_graph_nodes", graph_nodes)
    run.record("torchscript_frozen_graph_nodes", frozen_nodes)
    run.record("torchscript_frozen_batchnorm_folded", folded)
    return {"scripted": scripted, "frozen": frozen, "path": script_path}


# %% 3. torch.export: a portable graph (.pt2)
# torch.export.export(model, args, dynamic_shapes=...) captures the whole model as one graph
# of ATen operations (an ExportedProgram) or fails loudly; there are no silent fallbacks as in
# tracing. torch.export.save writes a .pt2 file; torch.export.load(...).module() gives back a
# callable module, with no need for your source code (checked below in a fresh process,
# together with section 2's TorchScript file). Non-strict mode (strict=False, the default in
# current releases) runs your Python normally and traces the tensor operations;
# strict=True captures through TorchDynamo and rejects more Python. Data-dependent control
# flow fails ("Could not guard on data-dependent expression"); torch.cond is the fix, as in 04.
# "Non-strict" means: export runs your forward() as ordinary Python with fake tensors and
# records the tensor operations; strict mode reads the Python bytecode with TorchDynamo.
# A .pt2 is DEVICE-SPECIFIC: torch.export.load puts each weight back on the device it was
# saved from (there is no map_location), and the graph may hold device constants. A program
# exported on a GPU fails on a CPU-only machine, so move it before saving:
#     program = torch.export.passes.move_to_device_pass(program, "cpu")
# (the same pass takes "cuda:0" or a {"cuda:0": "cpu"} mapping).


def lesson_3_torch_export(run: Run, model: nn.Module, example: torch.Tensor,
                          script_path: Path):
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
    reloaded = saved.module()
    with torch.no_grad():
        diff = max_abs_diff(reloaded(example[:3].cpu()), model(example[:3]))
    print(f"  saved after move_to_device_pass(program, 'cpu'): weights on {devices}; "
          f"torch.export.load(...).module() at batch 3: max |diff| = {diff:.3g}")
    run.record("exported_program_devices", ", ".join(devices))
    fresh = check_in_fresh_process(run, model, example, script_path, path)
    print(f"  fresh process (python -I; could import common: {fresh['common_importable']}), "
          f"batch 9: TorchScript max |diff| = {fresh['torchscript']:.3g}, .pt2 max |diff| = "
          f"{fresh['exported_program']:.3g}")
    run.record("fresh_process_torchscript_max_abs_diff", fresh["torchscript"])
    run.record("fresh_process_exported_max_abs_diff", fresh["exported_program"])
    run.record("fresh_process_could_import_common", fresh["common_importable"])

    try:
        with quiet_torch_logs():  # export dumps the partial graph; the error says enough
            torch.export.export(SignGate(), (torch.rand(4, 8),))
        python_if_fails = False
    except Exception as err:
        python_if_fails = True
        reason = re.search(r"Could not guard on data-dependent expression.*", str(err))
        print(f"  a Python `if` on values: {type(err).__name__}: "
              f"{(reason.group(0) if reason else str(err).splitlines()[0])[:80]}")
    cond_program = torch.export.export(SignGateCond(), (torch.rand(4, 8),))
    negative = -torch.rand(4, 8)
    cond_diff = max_abs_diff(cond_program.module()(negative), SignGate()(negative))
    print(f"  with torch.cond it exports, and the other branch is right: max |diff| = {cond_diff}")
    run.record("exported_reload_max_abs_diff", diff)
    run.record("export_python_if_fails", python_if_fails)
    run.record("export_torch_cond_max_abs_diff", cond_diff)
    return program


# %% 4. AOTInductor: compile ahead of time
# torch._inductor.aoti_compile_and_package(exported_program, package_path=...) compiles the
# graph with Inductor into a shared library plus weights, packed into one .pt2 package. Load it
# in Python with torch._inductor.aoti_load_package(path), or in C++ (no Python at all) with
# torch::inductor::AOTIModelPackageLoader. The compile takes tens of seconds on a CPU and needs
# a C++ compiler; where there is none, install one (build-essential, Xcode command-line tools,
# MSVC) or ship the .pt2 ExportedProgram from section 3 instead.


def lesson_4_aoti(run: Run, program, model: nn.Module, example: torch.Tensor):
    run.section("4. AOTInductor: compile ahead of time")
    if not has_cpp_compiler():
        print("  SKIPPED (no C++ compiler found): AOTInductor would compile the exported "
              "program into a shared library; section 3's .pt2 still deploys")
        run.record("aoti_built", False)
        return None
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
    run.record("aoti_built", True)
    run.record("aoti_compile_seconds", round(timing.median_ms / 1000, 2))
    run.record("aoti_max_abs_diff", diff)
    return compiled


# %% 5. torch.compile: speed inside the same process
# torch.compile(model) returns a wrapper that compiles on the first call (and again for new
# shapes, until it marks them dynamic). Nothing is written that you could deploy: the compiled
# code lives in this process (and in a cache). Use it to speed up training or a Python server;
# use torch.export / AOTInductor to ship a file. Its state_dict gains an "_orig_mod." prefix
# (07 shows how to strip it).


def lesson_5_compile(run: Run, model: nn.Module, example: torch.Tensor):
    run.section("5. torch.compile: speed inside the same process")
    if not has_cpp_compiler():
        print("  SKIPPED (no C/C++ compiler found): torch.compile generates C++ for the CPU, "
              "and on CUDA Triton builds a small C launcher per kernel")
        run.record("compile_first_call_seconds", 0.0)
        return None
    compiled = torch.compile(model)
    with torch.no_grad():
        first = benchmark(lambda: compiled(example), warmup=0, repeats=1, device=run.device)
        diff = max_abs_diff(compiled(example), model(example))
    print(f"  first call (compiles): {first.median_ms / 1000:.1f} s; max |diff| = {diff:.3g}")
    print(f"  compiled.state_dict() keys start with: {next(iter(compiled.state_dict()))!r}")
    run.record("compile_first_call_seconds", round(first.median_ms / 1000, 2))
    return compiled


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


def lesson_6_side_by_side(run: Run, model: nn.Module, candidates: dict) -> None:
    run.section("6. Side by side, and which one should I use?")
    batch = torch.randn(32, 1, 16, 16, device=run.device)
    with torch.no_grad():
        expected = model(batch)
    rows = []
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
        run.record(f"{key}_max_abs_diff", diff)
        run.record(f"{key}_median_ms", round(timing.median_ms, 4))

    figure, axes = plt.subplots(figsize=(7, 4))
    positions = np.arange(len(rows))
    axes.barh(positions, [t.median_ms for _, t in rows],
              xerr=[[0] * len(rows), [t.p90_ms - t.median_ms for _, t in rows]], capsize=3)
    axes.set_yticks(positions, [name for name, _ in rows])
    axes.invert_yaxis()
    axes.set(xlabel="latency, ms (median; bar to p90)",
             title=f"SmallCNN, batch 32, {run.device}, {torch.get_num_threads()} threads")
    path = run.path("latency.png")
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    run.artifact("latency_chart", path)


def main(argv: list[str] | None = None) -> dict:
    """Run every lesson in order and return the summary (also written to summary.json)."""
    parser = make_parser(__file__, __doc__.splitlines()[0])
    run = Run.start(__file__, parser, argv)
    keep_compiler_caches_in(run.out_dir / "inductor_cache")

    loaders = make_loaders(make_image_classification(768, seed=run.seed), seed=run.seed)
    model = SmallCNN().to(run.device)
    accuracy = fit(model, *loaders, run.device, epochs=2)["accuracy"]
    model.eval()
    print(f"trained SmallCNN for 2 epochs: validation accuracy {accuracy:.3f}")
    example = next(iter(loaders[1]))[0][:4].to(run.device)
    example_path = run.path("example_input.pt")
    torch.save(example.cpu(), example_path)
    run.artifact("example_input", example_path)

    lesson_1_trace_vs_script(run)
    scripted = lesson_2_torchscript_files(run, model)
    program = lesson_3_torch_export(run, model, example, scripted["path"])
    aoti = lesson_4_aoti(run, program, model, example)
    compiled = lesson_5_compile(run, model, example)
    with jit_deprecation_filtered():
        lesson_6_side_by_side(run, model, {
            "eager": model,
            "torchscript (scripted)": scripted["scripted"],
            "torchscript_frozen": scripted["frozen"],
            "torch.export (.pt2)": move_to_device_pass(  # the file holds CPU weights
                torch.export.load(run.out_dir / "exported_program.pt2"), run.device).module(),
            "aoti (AOTInductor)": aoti,
            "torch.compile": compiled,
        })
    return run.finish(
        recap=[
            "trace records one run (branches baked in); script compiles the source; both are "
            "deprecated, keep them only for existing deployments",
            "torch.export -> .pt2 loads without your source; AOTInductor compiles it into a "
            "package for Python or C++",
            "torch.compile speeds up the same process; it is not a deployment format",
        ],
        try_it="load outputs/05_torchscript_export/exported_program.pt2 with "
               "torch.export.load(...).module() in a Python shell; then run "
               "06_transfer_learning.py",
    )


if __name__ == "__main__":
    main()
