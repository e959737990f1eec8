"""04 · ONNX export — export a trained model with today's exporter and prove it right and fast.

What you will learn (each section runs real code and prints the measured figure):
  1.  Export with torch.onnx.export(dynamo=True): eval(), dynamic_shapes, names, example input
  2.  Validate: onnx.checker, and what to read in the graph (dims, opset, operators, weights)
  3.  Parity with ONNX Runtime at batch sizes and image sizes the export never saw
  3b. The file runs in a process that has neither PyTorch's model code nor this project
  3c. A second, independent runtime: the ONNX reference implementation
  3d. When ONNX output differs: verify_onnx_program and the first diverging node
  4.  Speed: PyTorch eager vs ONNX Runtime at three batch sizes
  4b. ONNX Runtime's graph optimisation levels, and saving the optimised graph
  5.  Big models: the 2 GB protobuf limit and external data files
  6a. Failure: data-dependent control flow, and torch.cond
  6b. Failure: exporting in train() mode
  6c. Failure: a dynamic dimension the exporter quietly makes static
  6d. Failure: an example batch of 1, and the legacy exporter

Run it:   python 04_onnx_export.py [--device cpu|cuda] [--out-dir DIR] [--seed N]
          As a notebook: run the cells top to bottom from the project folder (jupytext,
          VS Code, PyCharm); flags go in the LESSON_ARGS environment variable.
Takes:    about 17 s on a 2-core CPU (each export takes about a second; section 3d's
          value-by-value verification under half a second).
Next:     05_torchscript_export.py, TorchScript and its successors torch.export and AOTInductor.

Files it writes (in --out-dir): model.onnx (one file, weights inside), model.optimized.onnx
(the graph after ORT's EXTENDED optimisations), external_data/ (model.onnx plus
model.onnx.data), latency.png and summary.json. The failure demonstrations of section 6 work
in scratch folders that are removed when they finish.

Since torch 2.9, torch.onnx.export uses the dynamo exporter by default: it captures the model
with torch.export in non-strict mode (your forward() runs as ordinary Python on fake tensors
while the tensor operations are recorded; strict mode would read the bytecode with
TorchDynamo), then translates the graph with onnxscript (pip install onnxscript). We still
pass dynamo=True, and every other argument whose default changed (external_data, optimize),
so a call reads the same on any torch from 2.10 on. On torch 2.14:
external_data defaults to True (a plain export writes model.onnx AND model.onnx.data) and
optimize=True (onnxscript's graph optimiser runs after export) has been the default since 2.7.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import io
import logging
import shutil
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.onnx.verification
from onnx.reference import ReferenceEvaluator
from onnxscript import ir
from torch import nn
from torch.export import Dim

from common.compare import max_abs_diff
from common.models import SignGate, SignGateCond
from common.run import Run, first_line, format_bytes, in_notebook, make_parser, script_file
from common.timing import benchmark
from common.training import train_demo_model

matplotlib.use("Agg")  # write PNG files, never open a window
HERE = script_file(globals(), "04_onnx_export.py")  # a notebook kernel has no __file__

# ############################################################################################
# Reusable pieces: copy these into your own code.
# ############################################################################################


def export_onnx(model: nn.Module, example: tuple, path: Path, dynamic_shapes: dict | None,
                input_names: list[str], output_names: list[str],
                external_data: bool = False) -> torch.onnx.ONNXProgram:
    """Export ``model`` (already in eval mode) to ``path`` with the dynamo exporter.

    ``external_data=False`` keeps the weights inside the .onnx file (one file to ship; only
    possible under 2 GB); True (torch 2.14's DEFAULT) writes them to ``<path>.data`` beside
    it. Pass it explicitly either way: the default has changed between releases. Returns the
    ONNXProgram: the ONNX model in memory plus the ExportedProgram it came from, which the
    verification tools of section 3d compare with each other.
    """
    return torch.onnx.export(
        model, example, path,
        dynamo=True,  # the torch.export-based exporter (the default since torch 2.9)
        dynamic_shapes=dynamic_shapes,  # keyed by forward()'s argument names
        input_names=input_names, output_names=output_names,
        external_data=external_data,
        optimize=True,  # run onnxscript's graph optimiser (the default since torch 2.7)
        verbose=False,  # no progress lines on the console
    )


def graph_dims(values) -> dict[str, list]:
    """``{name: [dim, ...]}`` for graph inputs/outputs; symbolic dims show as their names.

    An ONNX dimension is either a number (dim_value: fixed) or a name (dim_param: dynamic).
    A number where you declared a Dim is the exporter telling you it specialised that axis.
    """
    return {value.name: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            for value in values}


def describe_onnx(path: Path) -> dict:
    """What a reader should check in an exported graph: I/O dims, opset, operators, weights.

    The opset decides which runtimes can run the file (each runtime supports a range); the
    operator counts show what the optimiser did (BatchNormalization folded into Conv,
    Dropout gone); the initializer bytes are the weights, which should match the model.
    """
    model = onnx.load(path)  # also loads external data that sits beside the file
    return {
        "inputs": graph_dims(model.graph.input),
        "outputs": graph_dims(model.graph.output),
        "opset": max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
        "operators": Counter(node.op_type for node in model.graph.node),
        "initializers": len(model.graph.initializer),
        "initializer_bytes": sum(onnx.numpy_helper.to_array(t).nbytes
                                 for t in model.graph.initializer),
    }


def ort_session(path: Path, device: torch.device, threads: int,
                level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                optimized_path: Path | None = None) -> ort.InferenceSession:
    """An ONNX Runtime session with a fixed thread count (for fair timings) and providers.

    The CUDA execution provider is used only where the installed onnxruntime has it
    (the onnxruntime-gpu package); otherwise the CPU provider runs the model. Providers are
    a preference list: ORT assigns each node to the first provider that supports it, so the
    CPU provider stays in the list as the fallback. ExecutionMode.ORT_SEQUENTIAL (ORT's
    default, spelled out here) runs one node at a time, which is what a fair comparison with
    PyTorch's eager mode needs; inter_op_num_threads only sizes the pool that ORT_PARALLEL
    uses to run independent nodes at once, so it does not matter in this mode.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = level
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), sess_options=options, providers=providers)


# ############################################################################################
# The lessons, in order. In a notebook each cell runs its lesson (the `if in_notebook():`
# lines); `python 04_onnx_export.py` runs them all through main() at the bottom.
# ############################################################################################

INPUT, OUTPUT = "images", "logits"  # the names the ONNX graph gives its input and output


class FlattenClassifier(nn.Module):
    """A model that only works for 16x16 images: Flatten feeds a Linear(256, ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16 * 16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


@contextlib.contextmanager
def captured_output():
    """Collect what a failing export prints (graph dumps) instead of flooding the console."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        yield buffer


# %% Setup
# The flags, and a SmallCNN trained for three epochs on the run's device. It is exported from
# the CPU: an ONNX file does not depend on the device it was exported on, and the CPU copy
# is what the lessons compare ONNX Runtime against. In a notebook the flags come from the
# LESSON_ARGS environment variable (none: the defaults).


def setup(argv: list[str] | None = None) -> tuple[Run, nn.Module]:
    """Start the run and train the model; return the run and the model (CPU, eval mode)."""
    run = Run.start(HERE, make_parser(HERE, __doc__.splitlines()[0]), argv)
    model, _, accuracy = train_demo_model(run.device, run.seed, epochs=3)
    print(f"trained SmallCNN for 3 epochs: validation accuracy {accuracy:.3f}")
    run.record("trained_val_accuracy", accuracy)
    return run, model.to("cpu").eval()


if in_notebook():
    run, model = setup()


# %% 1. Export with the dynamo exporter
# Call model.eval() first: export records ONE behaviour, and you want inference's (Dropout off,
# BatchNorm on running statistics). Choose the example input with care: its shapes are the
# ones export traces; a dimension is dynamic only if you say so in dynamic_shapes, keyed by the
# forward() argument name ("x"), with a torch.export.Dim per dynamic axis. Each Dim you declare
# is its own symbol: height and width below are both 16 in the example and stay independent.
# Under torch.export a dim nobody declared is static (the example's size, fixed), and two
# declared Dims never merge; "duck sizing", one symbol for equal-sized dims, is torch.compile's
# dynamic-shape behaviour, not export's.
# Pitfall, the 0/1 specialisation: torch.export treats a declared dim whose example size is 0
# or 1 as that constant and raises (section 6d). torch.onnx.export traces with
# backed_size_oblivious=True, which reasons about such a size as a generic one, so it still
# exports the dim as dynamic; with example sizes >= 2 neither question arises. SmallCNN ends
# in AdaptiveAvgPool2d, so height and width can be dynamic too.


def lesson_1_export(run: Run, model: nn.Module) -> tuple[Path, torch.onnx.ONNXProgram, dict]:
    """Export with a dynamic batch, height and width; time the export.

    About a second for a small model: the exporter traces the model with torch.export,
    translates each ATen operator with onnxscript, then optimises the ONNX graph. The
    returned ONNXProgram is kept for section 3d's verification.
    """
    run.section("1. Export with the dynamo exporter")
    model.eval()
    example = (torch.randn(4, 1, 16, 16),)  # batch 4 (not 1!), 16x16 images
    dynamic = {"x": {0: Dim("batch", min=1, max=4096), 2: Dim("height", min=8, max=512),
                     3: Dim("width", min=8, max=512)}}
    path = run.path("model.onnx")
    started = time.perf_counter()
    onnx_program = export_onnx(model, example, path, dynamic, [INPUT], [OUTPUT])
    seconds = time.perf_counter() - started
    print(f"  torch.onnx.export(dynamo=True) took {seconds:.2f} s")
    run.artifact("onnx_model", path)
    return path, onnx_program, {"export_seconds": round(seconds, 3)}


if in_notebook():
    path, onnx_program, figures = lesson_1_export(run, model)
    run.record_all(figures)


# %% 2. Validate the graph
# onnx.checker.check_model(full_check=True) validates the graph against the ONNX spec and runs
# shape inference. Then read the graph: inputs and outputs must show SYMBOLIC dims ("batch")
# where you asked for dynamic ones (a number there means the exporter specialised it), the
# opset (your runtime must support it), the operator counts (BatchNormalization usually gets
# folded into Conv; Dropout disappears in eval), and the initializers (the weights).


def lesson_2_validate(run: Run, path: Path) -> dict:
    """Check the model against the ONNX spec and print what a reviewer should read."""
    run.section("2. Validate the graph")
    onnx.checker.check_model(onnx.load(path), full_check=True)
    info = describe_onnx(path)
    print("  onnx.checker.check_model(full_check=True): passed")
    print(f"  inputs:  {info['inputs']}")
    print(f"  outputs: {info['outputs']}")
    print(f"  opset {info['opset']}; operators {dict(info['operators'])}")
    print(f"  {info['initializers']} initializers, {format_bytes(info['initializer_bytes'])}")
    dims = info["inputs"][INPUT]
    return {"onnx_checker_passed": True, "onnx_opset": info["opset"],
            "onnx_input_dims": str(dims),
            "onnx_dynamic_axes": sum(isinstance(d, str) for d in dims)}


if in_notebook():
    run.record_all(lesson_2_validate(run, path))


# %% 3. Parity with ONNX Runtime
# An export is right only if the runtime computes what PyTorch computes, at shapes the export
# never saw. Compare with torch.testing.assert_close's float32 tolerances (rtol 1.3e-6,
# atol 1e-5): ONNX Runtime fuses and reorders float operations, so the last bits differ; a
# real bug shows up as a difference many orders of magnitude larger.


def lesson_3_parity(run: Run, model: nn.Module, path: Path) -> dict:
    """Seven batch/image sizes, six of them never seen by the export: ORT vs PyTorch.

    assert_close raises if any size disagrees beyond float32 tolerance, so the run itself
    is the test; the printed max |diff| values show how far below the tolerance they are.
    """
    run.section("3. Parity with ONNX Runtime")
    session = ort_session(path, torch.device("cpu"), torch.get_num_threads())
    print(f"  session inputs {[i.name for i in session.get_inputs()]}, providers "
          f"{session.get_providers()}")
    worst = 0.0
    for batch, size in [(1, 16), (3, 16), (4, 16), (64, 16), (257, 16), (5, 24), (2, 40)]:
        images = torch.randn(batch, 1, size, size)
        with torch.no_grad():
            expected = model(images)
        got = torch.from_numpy(session.run([OUTPUT], {INPUT: images.numpy()})[0])
        torch.testing.assert_close(got, expected)  # float32 defaults: rtol 1.3e-6, atol 1e-5
        diff = max_abs_diff(got, expected)
        worst = max(worst, diff)
        seen = "seen" if (batch, size) == (4, 16) else "never seen"
        print(f"  batch {batch:>3}, {size}x{size} ({seen:>10}): max |diff| = {diff:.3g}")
    return {"onnx_max_abs_diff": worst}


if in_notebook():
    run.record_all(lesson_3_parity(run, model, path))


# %% 3b. The file runs without your code
# The point of ONNX is that the consumer needs neither PyTorch nor your model's source. Prove
# it: a fresh interpreter started with `python -I` (isolated: neither this folder nor
# PYTHONPATH is on sys.path, so common/ cannot be imported) loads the .onnx with onnxruntime
# and numpy alone and runs it at two batch sizes.

FRESH_ORT_CHECK = """
import sys, numpy as np, onnxruntime as ort
s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])
for b in (1, 7):
    out = s.run(None, {'images': np.zeros((b, 1, 16, 16), np.float32)})[0]
    assert out.shape == (b, 4), out.shape
print('ok')
"""


def lesson_3b_fresh_process(run: Run, path: Path) -> dict:
    """Run the .onnx with onnxruntime alone, in a new process that cannot import common/."""
    run.section("3b. The file runs without your code")
    completed = subprocess.run([sys.executable, "-I", "-c", FRESH_ORT_CHECK, str(path)],
                               cwd=run.out_dir, capture_output=True, text=True, check=False)
    fresh = completed.returncode == 0 and completed.stdout.strip() == "ok"
    print(f"  runs in a fresh process with only onnxruntime and numpy: {fresh}")
    return {"onnx_runs_without_project_code": fresh}


if in_notebook():
    run.record_all(lesson_3b_fresh_process(run, path))


# %% 3c. A second, independent runtime: the ONNX reference implementation
# onnx.reference.ReferenceEvaluator runs a model with numpy, one operator at a time, written
# from the ONNX specification: slow, but it shares neither ONNX Runtime's kernels nor its graph
# rewrites. When ORT and PyTorch disagree, it tells you which side departs from the spec: an
# ORT kernel or optimisation (the reference agrees with PyTorch), or the export (the reference
# agrees with ORT). Compared here at 5x1x24x20, a shape the export never saw.


def lesson_3c_reference_runtime(run: Run, model: nn.Module, path: Path) -> dict:
    """Run model.onnx in ReferenceEvaluator and in ORT; compare both with PyTorch."""
    run.section("3c. A second, independent runtime: the ONNX reference implementation")
    images = {INPUT: torch.randn(5, 1, 24, 20).numpy()}
    graph = onnx.load(path)
    reference = ReferenceEvaluator(graph)
    session = ort_session(path, torch.device("cpu"), torch.get_num_threads())
    by_reference = torch.from_numpy(reference.run([OUTPUT], images)[0])
    by_ort = torch.from_numpy(session.run([OUTPUT], images)[0])
    with torch.no_grad():
        expected = model(torch.from_numpy(images[INPUT]))
    diffs = {"reference_vs_ort_max_abs_diff": max_abs_diff(by_reference, by_ort),
             "reference_vs_torch_max_abs_diff": max_abs_diff(by_reference, expected),
             "ort_vs_torch_max_abs_diff": max_abs_diff(by_ort, expected)}
    slow, fast = (benchmark(lambda runtime=runtime: runtime.run([OUTPUT], images), warmup=1,
                            repeats=5) for runtime in (reference, session))
    print(f"  {len(graph.graph.node)} nodes at 5x1x24x20: ReferenceEvaluator median "
          f"{slow.median_ms:.2f} ms, ONNX Runtime median {fast.median_ms:.3f} ms")
    for name, diff in diffs.items():
        print(f"  {name.removesuffix('_max_abs_diff').replace('_', ' '):<18} max |diff| = "
              f"{diff:.3g}")
    return diffs | {"reference_evaluator_median_ms": round(slow.median_ms, 3),
                    "reference_ort_median_ms": round(fast.median_ms, 4)}


if in_notebook():
    run.record_all(lesson_3c_reference_runtime(run, model, path))


# %% 3d. When ONNX output differs: find the first diverging node
# The first thing to try is the exporter's own check: torch.onnx.export(..., verify=True,
# report=True, artifacts_dir=DIR) runs the ONNX model in ORT against the ExportedProgram and
# compares the OUTPUTS only (it calls verify_onnx_program without intermediates). It writes
# onnx_export_<time>_success.md, or ..._accuracy.md when an output's max |diff| reaches 5e-3
# or its relative diff 0.1 (torch 2.14's thresholds), with the max difference of every
# output, but not where inside the graph it began. The same check
# is an API on the ONNXProgram that export returns: torch.onnx.verification.
# verify_onnx_program(onnx_program, args=...) gives one VerificationInfo (max_abs_diff,
# max_rel_diff, histograms) per output, in a fraction of a second. When an output is wrong,
# compare_intermediates=True finds WHERE, and first_diverging_node (below; copyable, it uses
# nothing from common/) reads its per-value results in graph order and returns the first
# value past the tolerance and the ONNX node that produced it.
# To show it, we plant a fault in the in-memory ONNX model, as a broken conversion or a bad
# quantisation would: the second Conv's weights times 1.05. Then we put the weights back.


def first_diverging_node(onnx_program: torch.onnx.ONNXProgram, args: tuple,
                         atol: float = 1e-4) -> tuple:
    """The first value inside the ONNX graph that departs from PyTorch's, and its node.

    torch.onnx.verification.verify_onnx_program(..., compare_intermediates=True) runs the
    ExportedProgram node by node and ONNX Runtime up to each ONNX value of the same name, in
    graph order. Everything after the first bad value inherits its error, so that value's
    producer is the node to look at. Returns (VerificationInfo, node) or (None, None) when
    every value agrees within ``atol``. It runs ORT once per value.

    Pitfall: for each value, torch 2.14's ONNXProgram.compute_values() calls release()
    before and after its ORT run, and release() calls gc.collect(): two full collections of
    this whole process per value, whose cost grows with the objects it holds (measured here
    for SmallCNN in a fresh process: 16 collections, 4.1 s of 4.2 s; 0.1 s in all with the
    freeze). gc.freeze() moves every object alive now out of the collector's sight, so each
    collection only looks at what the check creates. gc.unfreeze() hands them back, unless
    the caller had frozen objects itself (a pre-fork server does): it would thaw those too.
    """
    verification_log = logging.getLogger("torch.onnx._internal.exporter._verification")
    level = verification_log.level
    verification_log.setLevel(logging.ERROR)  # it warns for every value past 0.01; we report
    frozen_by_caller = gc.get_freeze_count() > 0
    gc.freeze()
    try:
        infos = torch.onnx.verification.verify_onnx_program(onnx_program, args=args,
                                                             compare_intermediates=True)
    finally:
        if not frozen_by_caller:
            gc.unfreeze()
        verification_log.setLevel(level)
    producers = {value.name: node for node in onnx_program.model.graph
                 for value in node.outputs}
    for info in infos:
        if info.max_abs_diff > atol:
            return info, producers.get(info.name)
    return None, None


def lesson_3d_find_divergence(run: Run, onnx_program: torch.onnx.ONNXProgram) -> dict:
    """Verify the clean export's output; plant a fault; name the node where it shows first."""
    run.section("3d. When ONNX output differs: find the first diverging node")
    example = (torch.randn(4, 1, 16, 16),)
    clean = torch.onnx.verification.verify_onnx_program(onnx_program, args=example)
    print(f"  verify_onnx_program, as exported: output {clean[0].name!r} max |diff| = "
          f"{clean[0].max_abs_diff:.3g}")
    convs = [node for node in onnx_program.model.graph if node.op_type == "Conv"]
    weight = convs[1].inputs[1]  # an initializer: Conv(input, weight, bias)
    original = weight.const_value
    weight.const_value = ir.tensor(original.numpy() * 1.05, name=original.name)
    try:
        started = time.perf_counter()
        info, node = first_diverging_node(onnx_program, example)
        seconds = time.perf_counter() - started
    finally:
        weight.const_value = original  # the program is as exported again
    print(f"  planted: {weight.name} x 1.05 (consumed by {convs[1].name})")
    print(f"  compare_intermediates ({seconds:.1f} s): first value past 1e-4 is {info.name!r}, "
          f"max |diff| = {info.max_abs_diff:.3g}, produced by {node.op_type} node "
          f"{node.name} <- {[value.name for value in node.inputs]}")
    return {"verify_output_max_abs_diff": clean[0].max_abs_diff,
            "first_diverging_op": node.op_type,
            "first_diverging_node_is_planted": node is convs[1]}


if in_notebook():
    run.record_all(lesson_3d_find_divergence(run, onnx_program))


# %% 4. Speed: eager PyTorch vs ONNX Runtime
# Same model, same inputs, same thread count, measured side by side with common.timing's
# benchmark (warm-up, repeats, median and p90), at three batch sizes. Small batches show the
# per-call overhead (Python and the dispatcher for PyTorch), big ones the kernels.
# On CUDA, the ORT timings below go through numpy arrays in host memory, so they include the
# copies to and from the GPU; PyTorch's do not (its tensors stay on the GPU). To time ORT on the
# GPU alone, bind device buffers with session.io_binding().


def lesson_4_speed(run: Run, model: nn.Module, path: Path) -> dict:
    """Median latency of eager PyTorch and of ORT at batch 1, 32 and 256; a chart.

    ORT usually wins most at batch 1, where PyTorch's per-operator overhead dominates; the
    gap narrows as the kernels' own work grows. Your model and machine decide: measure.
    """
    run.section("4. Speed: eager PyTorch vs ONNX Runtime")
    threads, device = torch.get_num_threads(), run.device
    if device.type == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        print("  SKIPPED (no CUDA execution provider in this onnxruntime build): ORT on the "
              "GPU; ORT runs on the CPU below, PyTorch on the GPU")
    session = ort_session(path, device, threads)
    eager_model = copy.deepcopy(model).to(device).eval()
    print(f"  {threads} threads for both; PyTorch on {device}, ORT on {session.get_providers()[0]}")
    print(f"  {'batch':>5}  {'eager median (p90) ms':>22}  {'ORT median (p90) ms':>20}  speed-up")
    rows, figures = [], {}
    for batch in (1, 32, 256):
        images = torch.randn(batch, 1, 16, 16)
        on_device, as_numpy = images.to(device), images.numpy()

        def eager(on_device=on_device):
            with torch.inference_mode():
                return eager_model(on_device)

        eager_time = benchmark(eager, warmup=5, repeats=30, device=device)
        ort_time = benchmark(lambda as_numpy=as_numpy: session.run([OUTPUT], {INPUT: as_numpy}),
                             warmup=5, repeats=30)
        rows.append((f"batch {batch}", eager_time, ort_time))
        print(f"  {batch:>5}  {eager_time.median_ms:>12.3f} ({eager_time.p90_ms:>7.3f})  "
              f"{ort_time.median_ms:>10.3f} ({ort_time.p90_ms:>7.3f})  "
              f"{eager_time.median_ms / ort_time.median_ms:>6.2f}x")
        figures |= {f"eager_batch{batch}_median_ms": round(eager_time.median_ms, 4),
                    f"ort_batch{batch}_median_ms": round(ort_time.median_ms, 4)}
    ort_label = f"ONNX Runtime ({session.get_providers()[0].removesuffix('ExecutionProvider')})"
    save_latency_chart(run, rows, (f"PyTorch eager ({device})", ort_label), threads)
    return figures


def save_latency_chart(run: Run, rows: list, labels: tuple[str, str], threads: int) -> None:
    """Grouped bars (median, whisker to p90) for (label, timing_a, timing_b) rows."""
    figure, axes = plt.subplots(figsize=(7, 4))
    positions = np.arange(len(rows))
    for offset, label, index in ((-0.2, labels[0], 1), (0.2, labels[1], 2)):
        medians = [row[index].median_ms for row in rows]
        errors = [row[index].p90_ms - row[index].median_ms for row in rows]
        axes.bar(positions + offset, medians, width=0.4, yerr=[[0] * len(rows), errors],
                 label=label, capsize=3)
    axes.set_xticks(positions, [row[0] for row in rows])
    axes.set(ylabel="latency, ms (median; bar to p90)", yscale="log",
             title=f"SmallCNN inference latency, {threads} threads")
    axes.legend()
    run.save_figure(figure, "latency.png", "latency_chart")


if in_notebook():
    run.record_all(lesson_4_speed(run, model, path))


# %% 4b. ONNX Runtime's graph optimisation levels
# ONNX Runtime rewrites the graph when the session is created: ORT_DISABLE_ALL, ORT_ENABLE_BASIC
# (constant folding, redundant nodes), ORT_ENABLE_EXTENDED (fusions), ORT_ENABLE_LAYOUT (plus
# layout optimisations, e.g. NCHWc on CPUs), ORT_ENABLE_ALL (everything). Setting
# SessionOptions.optimized_model_filepath saves the optimised graph, so a server can skip that
# work at start-up. Save it at EXTENDED or lower: the layout choices fit one kind of CPU.


def lesson_4b_optimisation_levels(run: Run, path: Path) -> dict:
    """Batch-32 latency at each optimisation level; save the EXTENDED graph.

    The node count of the saved graph, against the exported one, shows the fusions.
    """
    run.section("4b. ONNX Runtime's graph optimisation levels")
    threads = torch.get_num_threads()
    images = np.random.default_rng(0).standard_normal((32, 1, 16, 16), dtype=np.float32)
    optimized_path = run.path("model.optimized.onnx")
    figures = {}
    print(f"  batch 32, {threads} threads:")
    for name in ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED",
                 "ORT_ENABLE_LAYOUT", "ORT_ENABLE_ALL"):
        session = ort_session(path, torch.device("cpu"), threads,
                              getattr(ort.GraphOptimizationLevel, name),
                              optimized_path if name == "ORT_ENABLE_EXTENDED" else None)
        timing = benchmark(lambda s=session: s.run([OUTPUT], {INPUT: images}),
                           warmup=5, repeats=30)
        print(f"    {name:<20} {timing}")
        figures[f"{name.lower()}_median_ms"] = round(timing.median_ms, 4)
    optimized_ops = sum(describe_onnx(optimized_path)["operators"].values())
    print(f"  saved the EXTENDED-optimised graph: {optimized_ops} nodes vs "
          f"{sum(describe_onnx(path)['operators'].values())} exported")
    run.artifact("onnx_optimized_model", optimized_path)
    return figures


if in_notebook():
    run.record_all(lesson_4b_optimisation_levels(run, path))


# %% 5. Big models: the 2 GB limit and external data
# An .onnx file is one protobuf message, and protobuf cannot serialise more than 2 GB. Bigger
# models keep their weights in a separate file that the graph references by name and offset:
# torch.onnx.export(..., external_data=True) writes model.onnx (the graph, small) plus
# model.onnx.data (the weights). On torch 2.14 that is the DEFAULT; pass external_data=False
# for a single file, and ONNXProgram.save switches to external data by itself anyway once the
# weights pass 1536 MB (its _LARGE_MODEL_THRESHOLD), safely below the 2 GB limit.
# onnx.load and ONNX Runtime find the data file by its RELATIVE name next to the .onnx file,
# so ship and move both together; a lone .onnx fails.
# For an existing ModelProto: onnx.save_model(model, path, save_as_external_data=True,
# all_tensors_to_one_file=True, location="weights.bin"). Check >2 GB models by path:
# onnx.checker.check_model("model.onnx") (a loaded ModelProto would exceed the limit).


def lesson_5_external_data(run: Run, model: nn.Module) -> dict:
    """Export with external data; run it; copy the .onnx alone and watch it fail."""
    run.section("5. Big models: the 2 GB limit and external data")
    folder = run.folder("external_data")
    path = folder / "model.onnx"
    export_onnx(model.eval(), (torch.randn(4, 1, 16, 16),), path,
                {"x": {0: Dim("batch", min=1, max=4096)}}, [INPUT], [OUTPUT], external_data=True)
    data_files = [p for p in folder.iterdir() if p != path]
    for file in [path, *data_files]:
        print(f"  {file.name:<18} {format_bytes(file.stat().st_size):>10}")
    onnx.checker.check_model(str(path), full_check=True)  # by path: works beyond 2 GB
    session = ort_session(path, torch.device("cpu"), torch.get_num_threads())
    images = torch.randn(6, 1, 16, 16)
    with torch.no_grad():
        diff = max_abs_diff(torch.from_numpy(session.run([OUTPUT], {INPUT: images.numpy()})[0]),
                            model(images))
    print(f"  reloaded with its data file: max |diff| = {diff:.3g}")
    with run.scratch("external_data_moved") as moved:
        shutil.copy(path, moved / "model.onnx")  # the .onnx alone, without its .data file
        try:
            ort_session(moved / "model.onnx", torch.device("cpu"), 1)
            lonely_fails = False
        except Exception as err:  # onnxruntime raises its own exception types
            lonely_fails = True
            print(f"  the .onnx copied without its data file: {first_line(err)[:110]}")
    run.artifact("onnx_external_data_model", path)
    return {"external_data_files": len(data_files), "external_data_max_abs_diff": diff,
            "onnx_without_data_file_fails": lonely_fails}


if in_notebook():
    run.record_all(lesson_5_external_data(run, model))


# %% 6a. Failure: data-dependent control flow
# `if x.sum() > 0:` needs a VALUE while export only has shapes, so it fails ("Could not guard
# on data-dependent expression"). Rewrite with torch.cond(pred, true_fn, false_fn, operands):
# both branches go into the graph (an ONNX If node) and the runtime picks one per input.
# (Shape-dependent `if`s are fine: shapes are known at export time, and the branch is fixed
# for that shape.)

BATCH = {"x": {0: Dim("batch", min=1, max=4096)}}  # a dynamic batch, for section 6's exports


def lesson_6a_control_flow(run: Run) -> dict:
    """Export SignGate (fails), then SignGateCond (exports); check both branches in ORT."""
    run.section("6a. Failure: data-dependent control flow")
    with run.scratch("failures_control_flow") as folder:
        try:
            with captured_output():
                export_onnx(SignGate().eval(), (torch.randn(4, 8),), folder / "gate.onnx",
                            BATCH, ["x"], ["y"])
            fails = False
        except Exception as err:
            fails = True
            print(f"  Python `if` on values: {type(err).__name__}: "
                  f"{first_line(err, 'Could not guard')[:90]}")
        cond_model = SignGateCond().eval()
        cond_path = folder / "gate_cond.onnx"
        export_onnx(cond_model, (torch.randn(4, 8),), cond_path, BATCH, ["x"], ["y"])
        session = ort_session(cond_path, torch.device("cpu"), 1)
        cond_diff = max(max_abs_diff(torch.from_numpy(session.run(["y"], {"x": x.numpy()})[0]),
                                     cond_model(x))
                        for x in (torch.rand(3, 8), -torch.rand(3, 8)))
        operators = dict(describe_onnx(cond_path)["operators"])
    agree = "match" if cond_diff < 1e-5 else "DO NOT match"  # float32 rounding is ~1e-7
    print(f"  torch.cond exports ({operators}); both branches {agree} PyTorch: "
          f"max |diff| = {cond_diff:.3g}")
    return {"control_flow_export_fails": fails, "torch_cond_max_abs_diff": cond_diff}


if in_notebook():
    run.record_all(lesson_6a_control_flow(run))


# %% 6b. Failure: exporting in train() mode
# Forgetting eval(): the exporter warns ("Exporting a model while it is in training mode")
# and writes a Dropout node with training_mode=True into the file. ONNX Runtime's default
# optimisations happen to delete Dropout nodes, so parity against model.eval() looks fine; a
# runtime that honours the node (ORT_DISABLE_ALL below, other engines) drops random
# activations, and the same input gives different outputs run to run. BatchNorm changes
# silently and NO runtime shows it: the file holds inference BatchNorm (running statistics,
# here folded into the Convs; no BatchNormalization with training_mode, no updated
# statistics among the outputs), so it never computes what train-mode BatchNorm computes.


def lesson_6b_train_mode(run: Run, model: nn.Module) -> dict:
    """Export a copy of the model left in train(); compare default ORT and ORT_DISABLE_ALL."""
    run.section("6b. Failure: exporting in train() mode")
    training_model = copy.deepcopy(model).train()
    images = torch.randn(8, 1, 16, 16).numpy()
    with run.scratch("failures_train_mode") as folder:
        with warnings.catch_warnings(record=True) as caught, captured_output():
            warnings.simplefilter("always")
            path = folder / "train_mode.onnx"
            export_onnx(training_model, (torch.randn(4, 1, 16, 16),), path, BATCH, [INPUT],
                        [OUTPUT])
        default = ort_session(path, torch.device("cpu"), 1).run([OUTPUT], {INPUT: images})[0]
        plain = ort_session(path, torch.device("cpu"), 1,
                            ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        repeat = max_abs_diff(*(torch.from_numpy(plain.run([OUTPUT], {INPUT: images})[0])
                                for _ in range(2)))
        operators = describe_onnx(path)["operators"]
        dropout_nodes = operators.get("Dropout", 0)
    warned = [str(w.message) for w in caught if "training mode" in str(w.message)]
    batch_statistics = batch_statistics_copy(model)
    with torch.no_grad():
        vs_eval = max_abs_diff(torch.from_numpy(default), model.eval()(torch.from_numpy(images)))
        vs_train_bn = max_abs_diff(torch.from_numpy(default),
                                   batch_statistics(torch.from_numpy(images)))
    print(f"  exported in train(): warning {warned[0][:70] if warned else 'none'!r}...")
    hidden = "hides them" if vs_eval < 1e-4 else "does not hide them"
    print(f"  the file holds {dropout_nodes} Dropout node(s); default ORT {hidden}: vs "
          f"model.eval() max |diff| = {vs_eval:.3g}")
    runs = "runs" if repeat > 0 else "does not run"
    print(f"  with ORT_DISABLE_ALL the Dropout {runs}: same input twice, max |diff| = "
          f"{repeat:.3g}")
    closer = "running" if vs_eval < vs_train_bn else "batch"  # which BatchNorm the file holds
    print(f"  BatchNorm: {operators.get('BatchNormalization', 0)} BatchNormalization node(s); "
          f"the file's output vs train()-mode BatchNorm (Dropout off) max |diff| = "
          f"{vs_train_bn:.3g}, vs eval() {vs_eval:.3g}: it uses the {closer} statistics")
    return {"train_mode_export_warned": bool(warned), "train_mode_parity_max_abs_diff": vs_eval,
            "train_mode_vs_batch_statistics_max_abs_diff": vs_train_bn,
            "train_mode_dropout_nodes": dropout_nodes,
            "train_mode_unoptimised_repeat_diff": repeat}


def batch_statistics_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose BatchNorm layers compute train()-mode batch statistics and
    whose Dropout is off: what train-mode BatchNorm alone would output."""
    copied = copy.deepcopy(model).train()
    for module in copied.modules():
        if isinstance(module, nn.Dropout):
            module.eval()
    return copied


if in_notebook():
    run.record_all(lesson_6b_train_mode(run, model))


# %% 6c. Failure: a dynamic dimension the model cannot vary
# Flatten + Linear(256) needs 16x16 images, yet height is declared dynamic. torch.export says
# so ("You marked height as dynamic but your code specialized it to be a constant (16)");
# torch.onnx.export instead quietly writes a STATIC dim, and ONNX Runtime then rejects any
# other height. Read the graph's input dims (section 2) and test unseen shapes (section 3).


def lesson_6c_static_dim(run: Run) -> dict:
    """Declare height dynamic on FlattenClassifier: torch.export vs torch.onnx.export."""
    run.section("6c. Failure: a dynamic dimension the model cannot vary")
    flat = FlattenClassifier().eval()
    declared = {"x": {0: Dim("batch", min=1, max=4096), 2: Dim("height", min=8, max=512)}}
    try:
        torch.export.export(flat, (torch.randn(4, 1, 16, 16),), dynamic_shapes=declared)
    except Exception as err:
        print(f"  torch.export: {first_line(err, 'You marked')[:100]}")
    with run.scratch("failures_static_dim") as folder, captured_output():
        path = folder / "flatten.onnx"
        export_onnx(flat, (torch.randn(4, 1, 16, 16),), path, declared, [INPUT], [OUTPUT])
        dims = describe_onnx(path)["inputs"][INPUT]
        try:
            ort_session(path, torch.device("cpu"), 1).run(
                [OUTPUT], {INPUT: np.zeros((2, 1, 24, 16), dtype=np.float32)})
            other_height_error = ""
        except Exception as err:  # onnxruntime's own exception types
            other_height_error = first_line(err)
    print(f"  torch.onnx.export wrote input dims {dims}: height is "
          f"{'still dynamic' if isinstance(dims[2], str) else 'STATIC'}")
    print(f"  ORT with height 24: {other_height_error[:100]}")
    return {"specialised_dim_is_static": isinstance(dims[2], int),
            "specialised_dim_other_size_fails": bool(other_height_error)}


if in_notebook():
    run.record_all(lesson_6c_static_dim(run))


# %% 6d. Failure: an example batch of 1
# The 0/1 specialisation: with an example batch of 1, torch.export pins the batch to 1 and
# refuses the dynamic Dim. torch.onnx.export traces with backed_size_oblivious=True, so the
# same example still gives a dynamic batch; we print what it wrote. Either way: example sizes
# >= 2 mean the question never arises.
# Legacy exporter: torch.onnx.export(..., dynamo=False, dynamic_axes={"images": {0: "batch"}})
# is the deprecated TorchScript-based path. To migrate, drop dynamic_axes for dynamic_shapes
# (keyed by forward()'s argument names, torch.export.Dim values) and keep input_names.


def lesson_6d_batch_of_one(run: Run, model: nn.Module) -> dict:
    """Export with a batch-1 example: torch.export refuses, torch.onnx.export writes dims."""
    run.section("6d. Failure: an example batch of 1")
    one = (torch.randn(1, 1, 16, 16),)
    try:
        torch.export.export(model.eval(), one, dynamic_shapes=BATCH)
        specialised = False
    except Exception as err:
        specialised = True
        print(f"  torch.export with an example batch of 1: {first_line(err, 'You marked')[:90]}")
    with run.scratch("failures_batch1") as folder, captured_output():
        path = folder / "batch1.onnx"
        export_onnx(model.eval(), one, path, BATCH, [INPUT], [OUTPUT])
        dims = describe_onnx(path)["inputs"][INPUT]
    print(f"  torch.onnx.export with the same example wrote input dims {dims}")
    return {"example_batch_1_specialised_by_torch_export": specialised,
            "example_batch_1_onnx_input_dims": str(dims)}


if in_notebook():
    run.record_all(lesson_6d_batch_of_one(run, model))


# %% Summary
# What the run measured, the files it wrote (also in summary.json), and what to try next.
RECAP = [
    "eval(), then torch.onnx.export(model, args, path, dynamo=True, dynamic_shapes=...)"
    " with example sizes >= 2",
    "check_model(full_check=True), then READ the input dims: a number where you "
    "wanted a name means the exporter specialised it",
    "prove parity in ONNX Runtime at unseen shapes; time both with the same threads",
    "outputs differ? verify_onnx_program(compare_intermediates=True) names the first "
    "diverging node; onnx.reference.ReferenceEvaluator is a second, independent runtime",
    "external_data=True (torch 2.14's default; automatic past 1536 MB) writes a .data "
    "file: ship it with the .onnx; external_data=False gives one file under 2 GB",
]
TRY_IT = ("in lesson 1, drop 'height' from dynamic_shapes and see section 2's input dims "
          "and section 3's parity fail at 24x24; then run 05_torchscript_export.py")

if in_notebook():
    summary = run.finish(RECAP, TRY_IT)


def main(argv: list[str] | None = None) -> dict:
    """Run every lesson in order and return the summary (also written to summary.json)."""
    run, model = setup(argv)
    path, onnx_program, figures = lesson_1_export(run, model)
    run.record_all(figures)
    run.record_all(lesson_2_validate(run, path))
    run.record_all(lesson_3_parity(run, model, path))
    run.record_all(lesson_3b_fresh_process(run, path))
    run.record_all(lesson_3c_reference_runtime(run, model, path))
    run.record_all(lesson_3d_find_divergence(run, onnx_program))
    run.record_all(lesson_4_speed(run, model, path))
    run.record_all(lesson_4b_optimisation_levels(run, path))
    run.record_all(lesson_5_external_data(run, model))
    run.record_all(lesson_6a_control_flow(run))
    run.record_all(lesson_6b_train_mode(run, model))
    run.record_all(lesson_6c_static_dim(run))
    run.record_all(lesson_6d_batch_of_one(run, model))
    return run.finish(RECAP, TRY_IT)


if __name__ == "__main__" and not in_notebook():
    main()
