"""04 · ONNX export — export a trained model with today's exporter and prove it right and fast.

What you will learn (each section runs real code and prints the measured figure):
  1. Export with torch.onnx.export(dynamo=True): eval(), dynamic_shapes, names, example input
  2. Validate: onnx.checker, and what to read in the graph (dims, opset, operators, weights)
  3. Parity with ONNX Runtime at batch sizes and image sizes the export never saw
  4. Speed: PyTorch eager vs ONNX Runtime, and ORT's graph optimisation levels
  5. Big models: the 2 GB protobuf limit and external data files
  6. Failure modes: data-dependent control flow (torch.cond), forgetting eval(), a dynamic
     dimension the exporter quietly makes static, and the legacy exporter

Run it:   python 04_onnx_export.py [--device cpu|cuda] [--out-dir DIR] [--seed N]
Takes:    about 11 s on a 2-core CPU (each export takes about a second).
Next:     05_torchscript_export.py, TorchScript and its successors torch.export and AOTInductor.

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
import io
import shutil
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn
from torch.export import Dim

from common.compare import max_abs_diff
from common.data import make_image_classification, make_loaders
from common.models import SmallCNN
from common.run import Run, format_bytes, make_parser
from common.timing import benchmark
from common.training import fit

matplotlib.use("Agg")  # write PNG files, never open a window

# ############################################################################################
# Reusable pieces: copy these into your own code.
# ############################################################################################


def export_onnx(model: nn.Module, example: tuple, path: Path, dynamic_shapes: dict | None,
                input_names: list[str], output_names: list[str],
                external_data: bool = False) -> Path:
    """Export ``model`` (already in eval mode) to ``path`` with the dynamo exporter.

    ``external_data=False`` keeps the weights inside the .onnx file (one file to ship; only
    possible under 2 GB); True (torch 2.14's DEFAULT) writes them to ``<path>.data`` beside
    it. Pass it explicitly either way: the default has changed between releases.
    """
    torch.onnx.export(
        model, example, path,
        dynamo=True,  # the torch.export-based exporter (the default since torch 2.9)
        dynamic_shapes=dynamic_shapes,  # keyed by forward()'s argument names
        input_names=input_names, output_names=output_names,
        external_data=external_data,
        optimize=True,  # run onnxscript's graph optimiser (the default since torch 2.7)
        verbose=False,  # no progress lines on the console
    )
    return path


def graph_dims(values) -> dict[str, list]:
    """``{name: [dim, ...]}`` for graph inputs/outputs; symbolic dims show as their names."""
    return {value.name: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            for value in values}


def describe_onnx(path: Path) -> dict:
    """What a reader should check in an exported graph: I/O dims, opset, operators, weights."""
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
    (the onnxruntime-gpu package); otherwise the CPU provider runs the model.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = level
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), sess_options=options, providers=providers)


def first_line(err: BaseException, containing: str = "") -> str:
    """The part of an error message that matters: from ``containing`` to the end of its line
    (or the first line when ``containing`` is empty or absent)."""
    lines = [line.strip(" -") for line in str(err).splitlines() if line.strip(" -")]
    for line in lines:
        if containing and containing in line:
            return line[line.index(containing):]
    return lines[0] if lines else type(err).__name__


@contextlib.contextmanager
def captured_output():
    """Collect what a failing export prints (graph dumps) instead of flooding the console."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        yield buffer


class FlattenClassifier(nn.Module):
    """A model that only works for 16x16 images: Flatten feeds a Linear(256, ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16 * 16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class SignGate(nn.Module):
    """Data-dependent control flow in Python: which branch runs depends on the VALUES."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return -x


class SignGateCond(SignGate):
    """The same model with ``torch.cond``: both branches are captured, chosen at run time."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cond(x.sum() > 0, lambda x: self.fc(x), lambda x: -x, (x,))


# ############################################################################################
# The lessons, in order.
# ############################################################################################

INPUT, OUTPUT = "images", "logits"


# %% 1. Export with the dynamo exporter
# Call model.eval() first: export records ONE behaviour, and you want inference's (Dropout off,
# BatchNorm on running statistics). Choose the example input with care: its shapes are the
# ones export traces; a dimension is dynamic only if you say so in dynamic_shapes, keyed by the
# forward() argument name ("x"), with a torch.export.Dim per dynamic axis. Each Dim you declare
# is its own symbol: height and width below are both 16 in the example and stay independent
# ("duck sizing", giving equal-sized dims ONE symbol, applies only to dims nobody declared).
# Pitfall, the 0/1 specialisation: torch.export treats a declared dim whose example size is 0
# or 1 as that constant and raises (section 6(d)). torch.onnx.export traces with
# backed_size_oblivious=True, which reasons about such a size as a generic one, so it still
# exports the dim as dynamic; with example sizes >= 2 neither question arises. SmallCNN ends
# in AdaptiveAvgPool2d, so height and width can be dynamic too.


def lesson_1_export(run: Run, model: nn.Module) -> Path:
    run.section("1. Export with the dynamo exporter")
    model.eval()
    example = (torch.randn(4, 1, 16, 16),)  # batch 4 (not 1!), 16x16 images
    dynamic = {"x": {0: Dim("batch", min=1, max=4096), 2: Dim("height", min=8, max=512),
                     3: Dim("width", min=8, max=512)}}
    path = run.path("model.onnx")
    seconds = benchmark(lambda: export_onnx(model, example, path, dynamic, [INPUT], [OUTPUT]),
                        warmup=0, repeats=1).median_ms / 1000
    print(f"  torch.onnx.export(dynamo=True) took {seconds:.2f} s")
    run.artifact("onnx_model", path)
    run.record("export_seconds", round(seconds, 3))
    return path


# %% 2. Validate the graph
# onnx.checker.check_model(full_check=True) validates the graph against the ONNX spec and runs
# shape inference. Then read the graph: inputs and outputs must show SYMBOLIC dims ("batch")
# where you asked for dynamic ones (a number there means the exporter specialised it), the
# opset (your runtime must support it), the operator counts (BatchNormalization usually gets
# folded into Conv; Dropout disappears in eval), and the initializers (the weights).


def lesson_2_validate(run: Run, path: Path) -> dict:
    run.section("2. Validate the graph")
    onnx.checker.check_model(onnx.load(path), full_check=True)
    info = describe_onnx(path)
    print("  onnx.checker.check_model(full_check=True): passed")
    print(f"  inputs:  {info['inputs']}")
    print(f"  outputs: {info['outputs']}")
    print(f"  opset {info['opset']}; operators {dict(info['operators'])}")
    print(f"  {info['initializers']} initializers, {format_bytes(info['initializer_bytes'])}")
    dims = info["inputs"][INPUT]
    run.record("onnx_checker_passed", True)
    run.record("onnx_opset", info["opset"])
    run.record("onnx_input_dims", str(dims))
    run.record("onnx_dynamic_axes", sum(isinstance(d, str) for d in dims))
    return info


# %% 3. Parity with ONNX Runtime
# An export is right only if the runtime computes what PyTorch computes, at shapes the export
# never saw. Compare with torch.testing.assert_close's float32 tolerances (rtol 1.3e-6,
# atol 1e-5): ONNX Runtime fuses and reorders float operations, so the last bits differ; a
# real bug shows up as a difference many orders of magnitude larger.


def lesson_3_parity(run: Run, model: nn.Module, path: Path) -> float:
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
    run.record("onnx_max_abs_diff", worst)
    return worst


# %% 4. Speed: eager PyTorch vs ONNX Runtime
# Same model, same inputs, same thread count, measured side by side with common.timing's
# benchmark (warm-up, repeats, median and p90). ONNX Runtime applies graph optimisations when
# the session is created: ORT_DISABLE_ALL, ORT_ENABLE_BASIC (constant folding, redundant
# nodes), ORT_ENABLE_EXTENDED (fusions), ORT_ENABLE_LAYOUT (plus layout optimisations, e.g.
# NCHWc on CPUs), ORT_ENABLE_ALL (everything). Setting SessionOptions.optimized_model_filepath
# saves the optimised graph, so a server can skip that work at start-up. Save it at EXTENDED
# or lower: the layout choices fit one kind of CPU.
# On CUDA, the ORT timings below go through numpy arrays in host memory, so they include the
# copies to and from the GPU; PyTorch's do not (its tensors stay on the GPU). To time ORT on the
# GPU alone, bind device buffers with session.io_binding().


def lesson_4_speed(run: Run, model: nn.Module, path: Path) -> None:
    run.section("4. Speed: eager PyTorch vs ONNX Runtime")
    threads = torch.get_num_threads()
    device = run.device
    if device.type == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        print("  SKIPPED (no CUDA execution provider in this onnxruntime build): ORT on the "
              "GPU; ORT runs on the CPU below, PyTorch on the GPU")
    session = ort_session(path, device, threads)
    eager_model = model.to(device).eval()
    print(f"  {threads} threads for both; PyTorch on {device}, ORT on {session.get_providers()[0]}")
    print(f"  {'batch':>5}  {'eager median (p90) ms':>22}  {'ORT median (p90) ms':>20}  speed-up")
    rows = []
    for batch in (1, 32, 256):
        images = torch.randn(batch, 1, 16, 16)
        on_device, as_numpy = images.to(device), images.numpy()

        def eager(on_device=on_device):
            with torch.inference_mode():
                return eager_model(on_device)

        eager_time = benchmark(eager, warmup=5, repeats=30, device=device)
        ort_time = benchmark(lambda as_numpy=as_numpy: session.run([OUTPUT], {INPUT: as_numpy}),
                             warmup=5, repeats=30)
        rows.append((batch, eager_time, ort_time))
        print(f"  {batch:>5}  {eager_time.median_ms:>12.3f} ({eager_time.p90_ms:>7.3f})  "
              f"{ort_time.median_ms:>10.3f} ({ort_time.p90_ms:>7.3f})  "
              f"{eager_time.median_ms / ort_time.median_ms:>6.2f}x")
        run.record(f"eager_batch{batch}_median_ms", round(eager_time.median_ms, 4))
        run.record(f"ort_batch{batch}_median_ms", round(ort_time.median_ms, 4))
    model.to("cpu")

    images = np.random.default_rng(0).standard_normal((32, 1, 16, 16), dtype=np.float32)
    optimized_path = run.path("model.optimized.onnx")
    levels = [("ORT_DISABLE_ALL", None), ("ORT_ENABLE_BASIC", None),
              ("ORT_ENABLE_EXTENDED", optimized_path), ("ORT_ENABLE_LAYOUT", None),
              ("ORT_ENABLE_ALL", None)]
    print("  graph optimisation level (batch 32):")
    for name, save_to in levels:
        level_session = ort_session(path, torch.device("cpu"), threads,
                                    getattr(ort.GraphOptimizationLevel, name), save_to)
        timing = benchmark(lambda s=level_session: s.run([OUTPUT], {INPUT: images}),
                           warmup=5, repeats=30)
        print(f"    {name:<20} {timing}")
        run.record(f"{name.lower()}_median_ms", round(timing.median_ms, 4))
    optimized_ops = sum(describe_onnx(optimized_path)["operators"].values())
    print(f"  saved the EXTENDED-optimised graph: {optimized_ops} nodes vs "
          f"{sum(describe_onnx(path)['operators'].values())} exported")
    run.artifact("onnx_optimized_model", optimized_path)

    figure, axes = plt.subplots(figsize=(7, 4))
    positions = np.arange(len(rows))
    ort_label = f"ONNX Runtime ({session.get_providers()[0].removesuffix('ExecutionProvider')})"
    for offset, label, index in ((-0.2, f"PyTorch eager ({device})", 1), (0.2, ort_label, 2)):
        medians = [row[index].median_ms for row in rows]
        errors = [row[index].p90_ms - row[index].median_ms for row in rows]
        axes.bar(positions + offset, medians, width=0.4, yerr=[[0] * len(rows), errors],
                 label=label, capsize=3)
    axes.set_xticks(positions, [f"batch {row[0]}" for row in rows])
    axes.set(ylabel="latency, ms (median; bar to p90)", yscale="log",
             title=f"SmallCNN inference latency, {threads} threads")
    axes.legend()
    chart = run.path("latency.png")
    figure.savefig(chart, dpi=100, bbox_inches="tight")
    plt.close(figure)
    run.artifact("latency_chart", chart)


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


def lesson_5_external_data(run: Run, model: nn.Module) -> None:
    run.section("5. Big models: the 2 GB limit and external data")
    folder = run.path("external_data/x").parent
    path = folder / "model.onnx"
    export_onnx(model.eval(), (torch.randn(4, 1, 16, 16),), path,
                {"x": {0: Dim("batch", min=1, max=4096)}}, [INPUT], [OUTPUT],
                external_data=True)
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
    lonely = run.path("external_data_moved/model.onnx")
    shutil.copy(path, lonely)  # the .onnx alone, without its .data file
    try:
        ort_session(lonely, torch.device("cpu"), 1)
        lonely_fails = False
    except Exception as err:  # onnxruntime raises its own exception types
        lonely_fails = True
        print(f"  the .onnx copied without its data file: {first_line(err)[:110]}")
    shutil.rmtree(lonely.parent)
    run.artifact("onnx_external_data_model", path)
    run.record("external_data_files", len(data_files))
    run.record("external_data_max_abs_diff", diff)
    run.record("onnx_without_data_file_fails", lonely_fails)


# %% 6. Failure modes and their fixes
# (a) Data-dependent Python control flow: `if x.sum() > 0:` needs a VALUE while export only
#     has shapes, so it fails ("Could not guard on data-dependent expression"). Rewrite with
#     torch.cond(pred, true_fn, false_fn, operands): both branches go into the graph (an ONNX
#     If node) and the runtime picks one per input. (Shape-dependent `if`s are fine: shapes
#     are known at export time, and the branch is fixed for that shape.)
# (b) Forgetting eval(): the exporter warns ("Exporting a model while it is in training
#     mode") and writes a Dropout node with training_mode=True into the file. ONNX Runtime's
#     default optimisations happen to delete Dropout nodes, so parity against model.eval()
#     looks fine; a runtime that honours the node (ORT_DISABLE_ALL below, other engines)
#     drops random activations, and the same input gives different outputs run to run.
# (c) A dimension declared dynamic that the model cannot vary: Flatten + Linear(256) needs
#     16x16 images. torch.export says so ("You marked height as dynamic but your code
#     specialized it to be a constant (16)"); torch.onnx.export may instead quietly write a
#     static dim. Read the graph's input dims (section 2) and test unseen shapes (section 3).
# (d) The 0/1 specialisation: with an example batch of 1, torch.export pins the batch to 1
#     and refuses the dynamic Dim. torch.onnx.export traces with backed_size_oblivious=True,
#     so the same example still gives a dynamic batch; we print what it wrote. Either way:
#     example sizes >= 2 mean the question never arises.
# Legacy exporter: torch.onnx.export(..., dynamo=False, dynamic_axes={"images": {0: "batch"}})
# is the deprecated TorchScript-based path. To migrate, drop dynamic_axes for dynamic_shapes
# (keyed by forward()'s argument names, torch.export.Dim values) and keep input_names.


def lesson_6_failures(run: Run, model: nn.Module) -> None:
    run.section("6. Failure modes and their fixes")
    folder = run.path("failures/x").parent
    batch = {"x": {0: Dim("batch", min=1, max=4096)}}

    # (a) data-dependent control flow
    try:
        with captured_output():
            export_onnx(SignGate().eval(), (torch.randn(4, 8),), folder / "gate.onnx", batch,
                        ["x"], ["y"])
        control_flow_fails = False
    except Exception as err:
        control_flow_fails = True
        print(f"  (a) Python `if` on values: {type(err).__name__}: "
              f"{first_line(err, 'Could not guard')[:90]}")
    cond_model = SignGateCond().eval()
    cond_path = export_onnx(cond_model, (torch.randn(4, 8),), folder / "gate_cond.onnx", batch,
                            ["x"], ["y"])
    session = ort_session(cond_path, torch.device("cpu"), 1)
    cond_diff = 0.0
    for sign in (1.0, -1.0):
        inputs = sign * torch.rand(3, 8)
        with torch.no_grad():
            cond_diff = max(cond_diff, max_abs_diff(
                torch.from_numpy(session.run(["y"], {"x": inputs.numpy()})[0]),
                cond_model(inputs)))
    print(f"      torch.cond exports ({dict(describe_onnx(cond_path)['operators'])}); both "
          f"branches match PyTorch: max |diff| = {cond_diff:.3g}")

    # (b) forgetting eval()
    training_model = SmallCNN()
    training_model.load_state_dict(model.state_dict())
    training_model.train()
    with warnings.catch_warnings(record=True) as caught, captured_output():
        warnings.simplefilter("always")
        train_path = export_onnx(training_model, (torch.randn(4, 1, 16, 16),),
                                 folder / "train_mode.onnx", batch, [INPUT], [OUTPUT])
    warned = [str(w.message) for w in caught if "training mode" in str(w.message)]
    images = torch.randn(8, 1, 16, 16).numpy()
    onnx_out = torch.from_numpy(ort_session(train_path, torch.device("cpu"), 1)
                                .run([OUTPUT], {INPUT: images})[0])
    with torch.no_grad():
        vs_training = max_abs_diff(onnx_out, training_model.eval()(torch.from_numpy(images)))
    plain = ort_session(train_path, torch.device("cpu"), 1,
                        ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    unoptimised_repeat = max_abs_diff(*(torch.from_numpy(plain.run([OUTPUT], {INPUT: images})[0])
                                        for _ in range(2)))
    dropout_nodes = describe_onnx(train_path)["operators"].get("Dropout", 0)
    print(f"  (b) exported in train(): warning {warned[0][:70] if warned else 'none'!r}...")
    print(f"      the file holds {dropout_nodes} Dropout node(s); default ORT removes them: vs "
          f"model.eval() max |diff| = {vs_training:.3g}")
    print(f"      with ORT_DISABLE_ALL the Dropout runs: same input twice, max |diff| = "
          f"{unoptimised_repeat:.3g}")

    # (c) a dynamic dimension that the model cannot vary
    flat = FlattenClassifier().eval()
    declared = {"x": {0: Dim("batch", min=1, max=4096), 2: Dim("height", min=8, max=512)}}
    try:
        torch.export.export(flat, (torch.randn(4, 1, 16, 16),), dynamic_shapes=declared)
    except Exception as err:
        print(f"  (c) torch.export: {first_line(err, 'You marked')[:100]}")
    with captured_output():
        flat_path = export_onnx(flat, (torch.randn(4, 1, 16, 16),), folder / "flatten.onnx",
                                declared, [INPUT], [OUTPUT])
    flat_dims = describe_onnx(flat_path)["inputs"][INPUT]
    print(f"      torch.onnx.export wrote input dims {flat_dims}: height is "
          f"{'still dynamic' if isinstance(flat_dims[2], str) else 'STATIC'}")
    try:
        ort_session(flat_path, torch.device("cpu"), 1).run(
            [OUTPUT], {INPUT: np.zeros((2, 1, 24, 16), dtype=np.float32)})
        other_height_fails = False
    except Exception as err:  # onnxruntime's own exception types
        other_height_fails = True
        print(f"      ORT with height 24: {first_line(err)[:100]}")

    # (d) the 0/1 specialisation
    one = (torch.randn(1, 1, 16, 16),)
    try:
        torch.export.export(model.eval(), one, dynamic_shapes=batch)
        one_specialised = False
    except Exception as err:
        one_specialised = True
        print(f"  (d) example batch of 1, torch.export: {first_line(err, 'You marked')[:90]}")
    with captured_output():
        one_path = export_onnx(model.eval(), one, folder / "batch1.onnx", batch, [INPUT],
                               [OUTPUT])
    one_dims = describe_onnx(one_path)["inputs"][INPUT]
    print(f"      torch.onnx.export with the same example wrote input dims {one_dims}")
    shutil.rmtree(folder)
    run.record("control_flow_export_fails", control_flow_fails)
    run.record("torch_cond_max_abs_diff", cond_diff)
    run.record("train_mode_export_warned", bool(warned))
    run.record("train_mode_parity_max_abs_diff", vs_training)
    run.record("train_mode_dropout_nodes", dropout_nodes)
    run.record("train_mode_unoptimised_repeat_diff", unoptimised_repeat)
    run.record("specialised_dim_is_static", isinstance(flat_dims[2], int))
    run.record("specialised_dim_other_size_fails", other_height_fails)
    run.record("example_batch_1_specialised_by_torch_export", one_specialised)
    run.record("example_batch_1_onnx_input_dims", str(one_dims))


def check_in_fresh_process(path: Path, run: Run) -> bool:
    """Run the .onnx with onnxruntime alone, in a new process that cannot import common/."""
    code = ("import sys, numpy as np, onnxruntime as ort\n"
            "s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n"
            "for b in (1, 7):\n"
            "    out = s.run(None, {'images': np.zeros((b, 1, 16, 16), np.float32)})[0]\n"
            "    assert out.shape == (b, 4), out.shape\n"
            "print('ok')\n")
    completed = subprocess.run([sys.executable, "-I", "-c", code, str(path)], cwd=run.out_dir,
                               capture_output=True, text=True, check=False)
    return completed.returncode == 0 and completed.stdout.strip() == "ok"


def main(argv: list[str] | None = None) -> dict:
    """Run every lesson in order and return the summary (also written to summary.json)."""
    parser = make_parser(__file__, __doc__.splitlines()[0])
    run = Run.start(__file__, parser, argv)

    # Train a SmallCNN for a few epochs on the run's device, then export from the CPU: an
    # ONNX file is device-independent, and the CPU copy is what the lessons compare against.
    loaders = make_loaders(make_image_classification(768, seed=run.seed), seed=run.seed)
    model = SmallCNN().to(run.device)
    accuracy = fit(model, *loaders, run.device, epochs=3)["accuracy"]
    print(f"trained SmallCNN for 3 epochs: validation accuracy {accuracy:.3f}")
    model = model.to("cpu").eval()
    run.record("trained_val_accuracy", accuracy)

    path = lesson_1_export(run, model)
    lesson_2_validate(run, path)
    lesson_3_parity(run, model, path)
    fresh = check_in_fresh_process(path, run)
    print(f"  runs in a fresh process with only onnxruntime and numpy: {fresh}")
    run.record("onnx_runs_without_project_code", fresh)
    lesson_4_speed(run, model, path)
    lesson_5_external_data(run, model)
    lesson_6_failures(run, model)
    return run.finish(
        recap=[
            "eval(), then torch.onnx.export(model, args, path, dynamo=True, dynamic_shapes=...)"
            " with example sizes >= 2",
            "check_model(full_check=True), then READ the input dims: a number where you "
            "wanted a name means the exporter specialised it",
            "prove parity in ONNX Runtime at unseen shapes; time both with the same threads",
            "external_data=True (torch 2.14's default; automatic past 1536 MB) writes a .data "
            "file: ship it with the .onnx; external_data=False gives one file under 2 GB",
        ],
        try_it="in lesson 1, drop 'height' from dynamic_shapes and see section 2's input dims "
               "and section 3's parity fail at 24x24; then run 05_torchscript_export.py",
    )


if __name__ == "__main__":
    main()
