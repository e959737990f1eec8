"""Unit tests of 04's export helpers: checker, dynamic dims, parity, external data, torch.cond."""

from __future__ import annotations

import gc

import numpy as np
import onnx
import pytest
import torch
from torch.export import Dim

from common.compare import max_abs_diff
from common.models import SmallCNN
from tests.conftest import load_script

lesson = load_script("04_onnx_export")
CPU = torch.device("cpu")
DYNAMIC = {"x": {0: Dim("batch", min=1, max=4096), 2: Dim("height", min=8, max=512),
                 3: Dim("width", min=8, max=512)}}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = SmallCNN().eval()
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    program = lesson.export_onnx(model, (torch.randn(4, 1, 16, 16),), path, DYNAMIC,
                                 ["images"], ["logits"])
    return model, path, program


def test_checker_passes_and_dims_are_dynamic(exported):
    _, path, _ = exported
    onnx.checker.check_model(onnx.load(path), full_check=True)
    info = lesson.describe_onnx(path)
    assert info["inputs"] == {"images": ["batch", 1, "height", "width"]}
    assert info["outputs"] == {"logits": ["batch", 4]}
    assert info["initializers"] > 0 and info["initializer_bytes"] > 10_000


@pytest.mark.parametrize(("batch", "size"), [(1, 16), (5, 16), (33, 16), (3, 24), (2, 37)])
def test_parity_at_shapes_the_export_never_saw(exported, batch, size):
    model, path, _ = exported
    session = lesson.ort_session(path, CPU, threads=1)
    images = torch.randn(batch, 1, size, size)
    got = torch.from_numpy(session.run(["logits"], {"images": images.numpy()})[0])
    with torch.no_grad():
        torch.testing.assert_close(got, model(images))


def test_external_data_export_reloads(tmp_path):
    model = SmallCNN().eval()
    path = tmp_path / "big" / "model.onnx"
    path.parent.mkdir()
    lesson.export_onnx(model, (torch.randn(4, 1, 16, 16),), path,
                       {"x": {0: Dim("batch", min=1, max=4096)}}, ["images"], ["logits"],
                       external_data=True)
    data_files = [p for p in path.parent.iterdir() if p != path]
    assert len(data_files) == 1
    assert data_files[0].stat().st_size > path.stat().st_size  # the weights live beside
    onnx.checker.check_model(str(path), full_check=True)
    reloaded = onnx.load(path)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL
               for t in onnx.load(path, load_external_data=False).graph.initializer)
    assert len(reloaded.graph.initializer) > 0
    images = torch.randn(6, 1, 16, 16)
    got = lesson.ort_session(path, CPU, 1).run(["logits"], {"images": images.numpy()})[0]
    with torch.no_grad():
        assert max_abs_diff(torch.from_numpy(got), model(images)) < 1e-5


def test_data_dependent_if_fails_and_torch_cond_exports(tmp_path):
    batch = {"x": {0: Dim("batch", min=1, max=4096)}}
    with pytest.raises(Exception, match="data-dependent"), lesson.captured_output():
        lesson.export_onnx(lesson.SignGate().eval(), (torch.randn(4, 8),), tmp_path / "a.onnx",
                           batch, ["x"], ["y"])
    model = lesson.SignGateCond().eval()
    path = tmp_path / "b.onnx"
    lesson.export_onnx(model, (torch.randn(4, 8),), path, batch, ["x"], ["y"])
    assert lesson.describe_onnx(path)["operators"]["If"] == 1
    session = lesson.ort_session(path, CPU, 1)
    for sign in (1.0, -1.0):
        inputs = sign * torch.rand(5, 8)
        got = torch.from_numpy(session.run(["y"], {"x": inputs.numpy()})[0])
        with torch.no_grad():
            torch.testing.assert_close(got, model(inputs))


def test_a_model_that_needs_16x16_gets_a_static_height(tmp_path):
    path = tmp_path / "flat.onnx"
    with lesson.captured_output():
        lesson.export_onnx(lesson.FlattenClassifier().eval(), (torch.randn(4, 1, 16, 16),),
                           path, {"x": {0: Dim("batch"), 2: Dim("height")}}, ["images"],
                           ["logits"])
    dims = lesson.describe_onnx(path)["inputs"]["images"]
    assert dims[0] == "batch" and dims[2] == 16
    session = lesson.ort_session(path, CPU, 1)
    assert session.run(None, {"images": np.zeros((3, 1, 16, 16), np.float32)})[0].shape == (3, 4)
    with pytest.raises(Exception, match="invalid dimensions"):
        session.run(None, {"images": np.zeros((3, 1, 24, 16), np.float32)})


def test_first_diverging_node_names_the_planted_fault_and_nothing_in_a_clean_export(exported):
    program, example = exported[2], (torch.randn(4, 1, 16, 16),)
    assert lesson.first_diverging_node(program, example) == (None, None)
    conv = next(node for node in program.model.graph if node.op_type == "Conv")
    bias = conv.inputs[2]  # the first layer's bias: every value from there on goes wrong
    original = bias.const_value
    bias.const_value = lesson.ir.tensor(original.numpy() + 0.5, name=bias.name)
    try:
        info, node = lesson.first_diverging_node(program, example)
    finally:
        bias.const_value = original
    assert node is conv and info.name == conv.outputs[0].name
    assert info.max_abs_diff == pytest.approx(0.5, abs=1e-5)


def test_first_diverging_node_leaves_the_collector_as_it_found_it(exported):
    """It freezes the process's objects for the check; it thaws them after only if the
    caller had frozen none (gc.unfreeze() would also thaw a caller's own freeze)."""
    program, example = exported[2], (torch.randn(4, 1, 16, 16),)
    gc.unfreeze()  # this session's fixture froze everything; start from nothing frozen
    lesson.first_diverging_node(program, example)
    assert gc.get_freeze_count() == 0
    gc.freeze()  # a caller's own freeze, as a pre-fork server makes
    frozen = gc.get_freeze_count()
    lesson.first_diverging_node(program, example)
    assert gc.get_freeze_count() >= 0.9 * frozen  # still frozen (a few may have been freed)


def test_reference_evaluator_agrees_with_onnx_runtime_at_an_unseen_shape(exported):
    from onnx.reference import ReferenceEvaluator

    model, path, _ = exported
    images = torch.randn(3, 1, 20, 28)
    by_reference = ReferenceEvaluator(onnx.load(path)).run(None, {"images": images.numpy()})[0]
    by_ort = lesson.ort_session(path, CPU, 1).run(None, {"images": images.numpy()})[0]
    assert np.abs(by_reference - by_ort).max() < 1e-5
    with torch.no_grad():
        assert max_abs_diff(torch.from_numpy(by_reference), model(images)) < 1e-5
