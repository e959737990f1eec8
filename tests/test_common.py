"""Unit tests of common/: devices, data, models, training, timing, comparison, run plumbing."""

from __future__ import annotations

import json

import pytest
import torch

from common.compare import bit_identical, max_abs_diff
from common.data import make_image_classification, make_loaders, make_vector_classification
from common.devices import environment, pick_device, seed_everything
from common.models import MLP, SmallCNN
from common.run import Run, format_bytes, make_parser
from common.timing import benchmark, benchmark_interleaved
from common.training import (
    capture_rng_state,
    evaluate,
    fit,
    restore_rng_state,
    train_one_epoch,
)


def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device("auto").type == expected
    with pytest.raises(SystemExit, match="unknown device"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="cuda"):
            pick_device("cuda")


def test_seed_everything_makes_torch_reproducible():
    seed_everything(3)
    first = torch.randn(5)
    seed_everything(3)
    assert torch.equal(first, torch.randn(5))


def test_environment_reports_the_facts_of_this_machine():
    import os
    import platform
    import sys

    import numpy as np

    threads = torch.get_num_threads()
    torch.set_num_threads((os.cpu_count() or 1) + 1)  # tells torch_threads from cpu_count
    try:
        facts = environment("cpu")
        assert facts["torch_threads"] == torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    assert facts == {
        "torch": torch.__version__, "python": sys.version.split()[0],
        "numpy": np.__version__, "platform": platform.platform(), "device": "cpu",
        "cpu_count": os.cpu_count() or 1, "torch_threads": facts["torch_threads"],
        "cuda_available": torch.cuda.is_available()}  # no "gpu"/"cuda" facts for the CPU


@pytest.mark.cuda("environment('cuda') names the GPU and the CUDA version")
def test_environment_on_a_gpu_names_it():
    facts = environment("cuda")
    assert facts["device"] == "cuda" and facts["cuda_available"] is True
    assert facts["gpu"] == torch.cuda.get_device_name(0) and facts["gpu"]
    assert facts["cuda"] == str(torch.version.cuda) and facts["cuda"] != "None"


def test_datasets_are_deterministic_and_tasks_differ():
    a = make_image_classification(64, seed=1)
    b = make_image_classification(64, seed=1)
    assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    other_task = make_image_classification(64, seed=1, template_seed=5)
    assert not torch.equal(a.tensors[0], other_task.tensors[0])


def test_loaders_shuffle_reproducibly():
    dataset = make_vector_classification(200, seed=0)
    first = [y.tolist() for _, y in make_loaders(dataset, batch_size=50)[0]]
    second = [y.tolist() for _, y in make_loaders(dataset, batch_size=50)[0]]
    assert first == second
    train, val = make_loaders(dataset, val_fraction=0.25)
    assert len(train.dataset) == 150 and len(val.dataset) == 50


@pytest.mark.parametrize("kind", ["vector", "image"])
def test_data_is_learnable(kind):
    seed_everything(0)
    if kind == "vector":
        dataset, model = make_vector_classification(800), MLP()
    else:
        dataset, model = make_image_classification(800), SmallCNN()
    train, val = make_loaders(dataset)
    before = evaluate(model, val, "cpu")["accuracy"]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(4):
        train_one_epoch(model, train, optimizer, "cpu")
    after = evaluate(model, val, "cpu")["accuracy"]
    assert after > 0.8 and after > before + 0.3


def test_small_cnn_has_backbone_head_and_batchnorm_buffers():
    model = SmallCNN(num_classes=7)
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 7)
    assert any("running_mean" in name for name, _ in model.named_buffers())
    assert model.head[-1].out_features == 7
    assert model.backbone(torch.randn(2, 1, 16, 16)).shape == (2, 32)


def test_benchmark_interleaved_calls_in_rounds_and_runs_setup_untimed():
    calls = []
    timings = benchmark_interleaved(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
        warmup=1, repeats=2, setup={"b": lambda: calls.append("setup")})
    assert calls == ["a", "setup", "b"] * 3  # round-robin: a drift hits both alike
    assert {name: t.repeats for name, t in timings.items()} == {"a": 2, "b": 2}
    assert all(t.warmup == 1 and t.min_ms <= t.median_ms <= t.p90_ms for t in timings.values())


def test_benchmark_counts_calls_and_orders_figures():
    calls = []
    timing = benchmark(lambda: calls.append(1), warmup=2, repeats=7)
    assert len(calls) == 9
    assert 0 <= timing.min_ms <= timing.median_ms <= timing.p90_ms
    with pytest.raises(ValueError):
        benchmark(lambda: None, repeats=0)


def test_max_abs_diff():
    a = {"w": torch.zeros(3), "n": torch.tensor(2)}
    b = {"w": torch.tensor([0.0, -0.5, 0.25]), "n": torch.tensor(2)}
    assert max_abs_diff(a, b) == 0.5
    assert max_abs_diff(a, a) == 0.0
    with pytest.raises(KeyError):
        max_abs_diff(a, {"w": torch.zeros(3)})
    with pytest.raises(ValueError):
        max_abs_diff(torch.zeros(3), torch.zeros(4))


def test_bit_identical_sees_what_value_comparisons_hide():
    zero, negative_zero = torch.tensor([0.0]), torch.tensor([-0.0])
    assert max_abs_diff(zero, negative_zero) == 0.0 and torch.equal(zero, negative_zero)
    assert not bit_identical(zero, negative_zero)  # the sign bit differs
    nan = torch.tensor([float("nan")])
    assert not torch.equal(nan, nan) and bit_identical(nan, nan.clone())
    assert not bit_identical(torch.ones(2), torch.ones(2, dtype=torch.float64))
    state_dict = SmallCNN().state_dict()
    assert bit_identical(state_dict, {k: v.clone() for k, v in state_dict.items()})


def test_rng_state_round_trip_restores_every_generator():
    import random

    import numpy as np

    loader_generator = torch.Generator().manual_seed(3)
    state = capture_rng_state(loader_generator)
    first = (random.random(), np.random.rand(), torch.rand(1), torch.rand(1, generator=
             loader_generator))
    restore_rng_state(state, loader_generator)
    again = (random.random(), np.random.rand(), torch.rand(1), torch.rand(1, generator=
             loader_generator))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])
    assert torch.equal(first[3], again[3])
    assert ("cuda" in state) == torch.cuda.is_available()


@pytest.mark.cuda("the rng state holds a 'cuda' entry that restores GPU Dropout's generator")
def test_rng_state_round_trip_restores_the_cuda_generators():
    state = capture_rng_state()
    assert len(state["cuda"]) == torch.cuda.device_count()
    first = torch.rand(4, device="cuda")
    restore_rng_state(torch.load(_round_trip(state), map_location="cpu", weights_only=True))
    assert torch.equal(first, torch.rand(4, device="cuda"))


def _round_trip(state: dict):
    """``state`` through torch.save into memory: what a checkpoint holds and loads back."""
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_format_bytes():
    assert format_bytes(999) == "999 B"
    assert format_bytes(1536) == "1.54 KB"
    assert format_bytes(268_500_000) == "268.50 MB"


def test_run_writes_summary_and_guards_artifacts(tmp_path, capsys):
    parser = make_parser(str(tmp_path / "09_example.py"), "an example")
    run = Run.start(str(tmp_path / "09_example.py"), parser,
                    ["--device", "cpu", "--out-dir", str(tmp_path / "out"), "--seed", "4"])
    run.section("1. A heading")
    path = run.path("nested/file.txt")
    path.write_text("hello")
    run.artifact("file", path)
    run.record("figure", 1.5)
    with pytest.raises(ValueError):
        run.record("bad", float("nan"))
    with pytest.raises(TypeError):
        run.record("bad", [1, 2])
    outside = tmp_path / "outside.txt"
    outside.write_text("x")
    with pytest.raises(ValueError):
        run.artifact("outside", outside)
    summary = run.finish(recap=["a point"], try_it="something")
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert written == json.loads(json.dumps(summary))
    assert written["artifacts"] == {"file": "nested/file.txt"}
    assert written["metrics"] == {"figure": 1.5}
    assert written["args"]["seed"] == 4
    assert "1. A heading" in capsys.readouterr().out


def test_default_out_dir_is_beside_the_script(tmp_path):
    parser = make_parser(str(tmp_path / "09_example.py"), "an example")
    assert parser.parse_args([]).out_dir == tmp_path / "outputs" / "09_example"


def test_fit_trains_and_reports():
    seed_everything(0)
    train, val = make_loaders(make_vector_classification(400))
    figures = fit(MLP(), train, val, "cpu", epochs=3)
    assert set(figures) == {"loss", "accuracy"} and figures["accuracy"] > 0.8
