"""Unit tests of 01's reusable pieces: the checked loader and its errors on bad input."""

from __future__ import annotations

import hashlib

import pytest
import torch

from common.models import MLP, SmallCNN
from tests.conftest import load_script

lesson = load_script("01_basic_save_load")


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def saved(tmp_path):
    model = SmallCNN()
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    return model, path


def test_load_weights_round_trip_and_checkpoint_dict(saved, tmp_path):
    model, path = saved
    target = lesson.load_weights(SmallCNN(), path)
    assert all(torch.equal(a, b) for a, b in
               zip(model.state_dict().values(), target.state_dict().values(), strict=True))
    wrapped = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "epoch": 3}, wrapped)
    lesson.load_weights(SmallCNN(), wrapped)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(lesson.CheckpointLoadError, match=r"missing\.pt: no such file"):
        lesson.load_checkpoint(tmp_path / "missing.pt")
    empty = tmp_path / "empty.pt"
    empty.touch()
    with pytest.raises(lesson.CheckpointLoadError, match=r"empty\.pt: the file is empty"):
        lesson.load_checkpoint(empty)


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_truncated_file_is_named_and_left_intact(saved, tmp_path, fraction):
    _, path = saved
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: int(path.stat().st_size * fraction)])
    before = sha256(truncated)
    with pytest.raises(lesson.CheckpointLoadError, match=r"truncated\.pt: truncated or corrupted"):
        lesson.load_weights(SmallCNN(), truncated)
    assert sha256(truncated) == before


def test_file_that_is_not_a_checkpoint(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(lesson.CheckpointLoadError, match=r"notes\.pt: not a PyTorch checkpoint"):
        lesson.load_checkpoint(text)
    tensor_only = tmp_path / "tensor.pt"
    torch.save(torch.ones(3), tensor_only)
    with pytest.raises(lesson.CheckpointLoadError, match=r"tensor\.pt: holds a Tensor"):
        lesson.load_weights(SmallCNN(), tensor_only)


def test_wrong_architecture_lists_missing_unexpected_and_misshaped(tmp_path, saved):
    _, good = saved
    path = tmp_path / "mixed.pt"
    state_dict = SmallCNN(num_classes=10).state_dict()
    del state_dict["backbone.0.bias"]
    state_dict["extra.weight"] = torch.ones(1)
    torch.save(state_dict, path)
    model = lesson.load_weights(SmallCNN(), good)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lesson.CheckpointLoadError) as raised:
        lesson.load_weights(model, path)
    message = str(raised.value)
    assert str(path) in message
    assert "missing (1): backbone.0.bias" in message
    assert "unexpected (1): extra.weight" in message
    assert "mis-shaped (2): head.1.weight (10, 32) != model (4, 32)" in message
    # Nothing was copied: the model is exactly what it was.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_other_model_family_is_refused(tmp_path):
    path = tmp_path / "mlp.pt"
    torch.save(MLP().state_dict(), path)
    with pytest.raises(lesson.CheckpointLoadError, match="does not fit SmallCNN; missing"):
        lesson.load_weights(SmallCNN(), path)


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "PAYLOAD_RAN.txt"
    path = tmp_path / "evil.pt"
    torch.save({"model": lesson.MaliciousPayload(marker)}, path)
    with pytest.raises(lesson.CheckpointLoadError, match=r"evil\.pt: refused by weights_only"):
        lesson.load_weights(SmallCNN(), path)
    assert not marker.exists()
    # The payload is real: it does run when weights_only is switched off.
    torch.load(path, map_location="cpu", weights_only=False)
    assert marker.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="shows the CPU-only machine's error")
def test_cuda_tagged_checkpoint_needs_map_location_on_cpu(tmp_path):
    path = tmp_path / "gpu.pt"
    state_dict = MLP().state_dict()
    with lesson.saved_as_if_on_cuda():
        torch.save(state_dict, path)
    with pytest.raises(RuntimeError, match="CUDA device"):
        torch.load(path, map_location=None, weights_only=True)
    loaded = lesson.load_checkpoint(path, map_location="cpu")
    assert all(torch.equal(loaded[k], v) for k, v in state_dict.items())
    # Outside the block, saves are tagged cpu again.
    torch.save(state_dict, tmp_path / "cpu.pt")
    torch.load(tmp_path / "cpu.pt", map_location=None, weights_only=True)
