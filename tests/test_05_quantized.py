"""05 §5b-5i, quantized weights with torchao: read from the shared default run of 05, plus a
second process that imports only torch and torchao and reproduces the script's int8 outputs
and accuracy, and a hostile fp32 .pt2 whose pickle torch.export.load runs (§5e's warning)."""

from __future__ import annotations

import io
import json
import sys
import zipfile

import pytest
import torch

from tests import zygote

SCRIPT = "05_torchscript_export"

# A reader's own loader: no script, no common/, only torch and torchao (python -I keeps the
# project folder off sys.path). It rebuilds 5b's architecture by hand, loads the int8
# state_dict with weights_only=True and assign=True, and the safetensors copy through
# torchao's unflatten, and compares both with the outputs and the accuracy the script saved.
READER = r"""
import json, sys
import torch
import torchao  # registers Int8Tensor for weights_only=True
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

state_dict_path, safetensors_path, reference_path = sys.argv[1:4]
reference = torch.load(reference_path, map_location="cpu", weights_only=True)


def plain_model():
    return nn.Sequential(nn.Flatten(), nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512),
                         nn.ReLU(), nn.Linear(512, 4)).eval()


def compare(state_dict):
    model = plain_model()
    model.load_state_dict(state_dict, assign=True)
    with torch.no_grad():
        outputs = model(reference["inputs"])
    return {"weight": type(model[1].weight).__name__,
            "max_abs_diff": float((outputs - reference["outputs"]).abs().max()),
            "bitwise_equal": outputs.numpy().tobytes() == reference["outputs"].numpy().tobytes(),
            "accuracy": float((outputs.argmax(1) == reference["labels"]).float().mean())}


results = {"torch_pickle": compare(
    torch.load(state_dict_path, map_location="cpu", weights_only=True))}
with safe_open(safetensors_path, framework="pt") as file:
    rebuilt, leftover = unflatten_tensor_state_dict(load_file(safetensors_path), file.metadata())
results["safetensors"] = compare(rebuilt) | {"leftover": len(leftover)}
results["batch"] = len(reference["inputs"])
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def run05(default_run):
    run = default_run(SCRIPT)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def test_int8_state_dict_is_about_a_quarter_of_fp32(run05):
    artifacts = run05.summary["artifacts"]
    int8 = (run05.out_dir / artifacts["int8_state_dict"]).stat().st_size
    fp32 = (run05.out_dir / artifacts["mlp_fp32_state_dict"]).stat().st_size
    assert run05.metrics["int8_size_ratio"] == pytest.approx(int8 / fp32, abs=1e-3)
    assert run05.metrics["int8_size_ratio"] < 0.35
    assert run05.metrics["int8_state_dict_bytes"] == int8


def test_accuracy_is_measured_on_the_validation_set_and_int8_keeps_it(run05):
    metrics = run05.metrics
    for name in ("fp32_accuracy", "int8_accuracy"):
        assert 0.5 < metrics[name] <= 1.0, (name, metrics[name])  # 4 classes: chance is 0.25
    assert abs(metrics["int8_accuracy"] - metrics["fp32_accuracy"]) <= 0.02
    assert 0 < metrics["int8_max_abs_diff"] < 0.2  # quantized, so not identical; not broken


def test_reload_needs_torchao_and_assign_and_is_then_exact(run05):
    metrics = run05.metrics
    assert metrics["int8_reload_max_abs_diff"] == 0.0
    assert metrics["int8_quantize_first_max_abs_diff"] == 0.0
    assert metrics["int8_quantize_first_in_place"] is True  # a plain load, not assign=True
    assert metrics["int8_weight_grad_after_backward"] is False  # §5g: inference only
    assert metrics["int8_load_without_assign_fails"] is True
    assert metrics["int8_load_without_torchao_refused"] is True


def test_safetensors_plain_save_fails_and_torchao_route_reloads_exactly(run05):
    metrics = run05.metrics
    assert metrics["int8_safetensors_plain_fails"] is True
    assert metrics["int8_safetensors_reload_max_abs_diff"] == 0.0
    assert metrics["int8_safetensors_leftover_keys"] == 0
    assert metrics["int8_safetensors_bytes"] < 0.35 * metrics["fp32_state_dict_bytes"]


def test_inspector_names_the_torchao_class_and_export_keeps_outputs(run05):
    metrics = run05.metrics
    assert "torchao.quantization.Int8Tensor" in metrics["int8_inspect_torchao_globals"]
    assert metrics["int8_export_max_abs_diff"] == 0.0
    assert metrics["int8_pt2_pickled_weights"] == 3  # the three Linear weights
    assert "Int8DynamicActivationInt8WeightConfig" in metrics["torchao_other_configs_ran"]


def test_side_by_side_table_has_the_int8_rows(run05):
    metrics = run05.metrics
    for row in ("mlp_fp32", "mlp_int8"):
        assert metrics[f"{row}_median_ms"] > 0
    assert 0 < metrics["mlp_int8_max_abs_diff"] < 0.2
    assert metrics["mlp_int8_over_fp32_latency"] == pytest.approx(
        metrics["mlp_int8_median_ms"] / metrics["mlp_fp32_median_ms"], rel=0.01)


def test_a_process_with_only_torch_and_torchao_reproduces_the_int8_outputs(run05, tmp_path):
    artifacts = run05.summary["artifacts"]
    completed = zygote.run(
        [sys.executable, "-I", "-c", READER,
         *(str(run05.out_dir / artifacts[name])
           for name in ("int8_state_dict", "int8_safetensors", "int8_reference"))],
        capture_output=True, text=True, cwd=tmp_path, timeout=300, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(completed.stdout.strip().splitlines()[-1])
    assert results["batch"] >= 100  # the whole validation set
    for route in ("torch_pickle", "safetensors"):
        assert results[route]["weight"] == "Int8Tensor", route
        assert results[route]["max_abs_diff"] == 0.0 and results[route]["bitwise_equal"], route
        assert results[route]["accuracy"] == pytest.approx(run05.metrics["int8_accuracy"]), route
    assert results["safetensors"]["leftover"] == 0


class _CreatesMarker:
    """A pickle payload: unpickling it calls open(path, "w"), creating a file (a harmless
    stand-in for os.system); the path is under the test's tmp_path."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_torch_export_load_runs_a_pickle_from_an_fp32_pt2(tmp_path):
    """§5e: any .pt2 is as dangerous as a pickle, not only one with quantized weights. An fp32
    program (no use_pickle weights) whose sample inputs are replaced by a payload: loading it
    runs the payload (torch/_export/serde/serialize.py retries with weights_only=False)."""
    model = torch.nn.Linear(4, 2)
    program = torch.export.export(model, (torch.randn(1, 4),))
    honest, hostile = tmp_path / "honest.pt2", tmp_path / "hostile.pt2"
    marker = tmp_path / "payload_ran"
    torch.export.save(program, honest)
    payload = io.BytesIO()
    torch.save(_CreatesMarker(marker), payload)
    with zipfile.ZipFile(honest) as source, zipfile.ZipFile(hostile, "w") as target:
        names = source.namelist()
        config = next(name for name in names if name.endswith("model_weights_config.json"))
        weights = json.loads(source.read(config))["config"]
        swapped = [name for name in names if name.endswith("data/sample_inputs/model.pt")]
        for name in names:
            target.writestr(name, payload.getvalue() if name in swapped else source.read(name))
    assert len(swapped) == 1 and weights
    assert not any(entry.get("use_pickle") for entry in weights.values())  # plain fp32 file
    try:
        torch.export.load(hostile)
    except Exception:  # the payload returns a file object, not sample inputs: may raise after
        pass
    assert marker.exists()  # the pickle ran inside torch.export.load
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        ["honest.pt2", "hostile.pt2", "payload_ran"])
