"""Unit tests of 01's reusable pieces: the checked loader and its errors on bad input."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import sys
import warnings

import pytest
import torch

from common.models import MLP, SmallCNN
from tests import zygote
from tests.conftest import ROOT, load_script

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
    # A {"model": ..., "epoch": 3} checkpoint: its weights (not the fresh model's) end up in it.
    torch.manual_seed(1)
    source = SmallCNN()
    wrapped = tmp_path / "checkpoint.pt"
    torch.save({"model": source.state_dict(), "epoch": 3}, wrapped)
    fresh = SmallCNN()
    assert lesson.max_abs_diff(fresh.state_dict(), source.state_dict()) > 0
    loaded = lesson.load_weights(fresh, wrapped)
    assert loaded is fresh
    assert lesson.max_abs_diff(fresh.state_dict(), source.state_dict()) == 0.0


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


# ---- --inspect: describe any checkpoint without running code from it ---------------------


def inspect(path, capsys) -> tuple[int, str]:
    """Run `01_basic_save_load.py --inspect PATH` in this process: (exit status, output).

    Whatever the input, nothing goes to stderr and no traceback is printed."""
    with pytest.raises(SystemExit) as exited:
        lesson.main(["--inspect", str(path)])
    captured = capsys.readouterr()
    assert captured.err == "" and "Traceback" not in captured.out, captured.err[-2000:]
    return exited.value.code, captured.out


class WritesAFile:
    """A pickle payload that would create ``marker`` if anything ever ran it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_inspect_plain_and_legacy_state_dicts_load_as_they_are(tmp_path, capsys):
    model = SmallCNN()
    torch.save(model.state_dict(), tmp_path / "zip.pt")
    torch.save(model.state_dict(), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    for name, kind in (("zip.pt", "torch.save zip archive"), ("legacy.pt", "legacy torch.save")):
        status, out = inspect(tmp_path / name, capsys)
        assert status == 0, out
        assert kind in out and "tensor backbone.0.weight" in out and "[16, 1, 3, 3]" in out
        assert "16 tensors" in out and "loads as it is" in out


def test_inspect_a_lightning_style_file_names_its_globals_and_the_line_works(tmp_path, capsys):
    path = tmp_path / "lightning.ckpt"
    lesson.lightning_style_checkpoint(path)
    status, out = inspect(path, capsys)
    assert status == 1
    report = lesson.inspect_checkpoint(path)
    assert {"argparse.Namespace", "numpy.dtypes.Float64DType"} <= set(report.needs)
    assert not report.dangerous and "WARNING:" not in out
    assert "entry  epoch" in out and "tensor state_dict.backbone.0.weight" in out
    line = lesson.safe_globals_line(report.needs)
    scope = {"torch": torch, "path": path}
    exec(line.replace("    torch.load", "    loaded = torch.load"), scope)  # the printed advice
    assert scope["loaded"]["epoch"] == 7
    numpy1 = lesson.safe_globals_line(["numpy.core.multiarray._reconstruct"])
    assert "(numpy._core.multiarray._reconstruct, 'numpy.core.multiarray._reconstruct')" in numpy1


@pytest.mark.parametrize("legacy", [False, True])
def test_inspect_a_malicious_pickle_warns_and_runs_nothing(tmp_path, capsys, legacy):
    marker = tmp_path / "PAYLOAD_RAN"
    path = tmp_path / "evil.pt"
    torch.save({"weights": torch.ones(3), "x": WritesAFile(marker)}, path,
               _use_new_zipfile_serialization=not legacy)
    status, out = inspect(path, capsys)
    assert status == 1
    assert "WARNING" in out and "system can run code" in out and "safe_globals([" not in out
    assert "tensor weights" in out
    assert not marker.exists()


def test_inspect_a_whole_pickled_model_lists_its_classes_and_tensors(tmp_path, capsys):
    torch.save(SmallCNN(), tmp_path / "whole.pt", _use_new_zipfile_serialization=False)
    status, out = inspect(tmp_path / "whole.pt", capsys)
    assert status == 1 and "common.models.SmallCNN" in out
    assert "tensor backbone.0.weight" in out and "16 tensors" in out


def test_inspect_safetensors_sharded_and_dcp(tmp_path, capsys):
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    state = MLP(64, 256, 10).state_dict()
    save_file(state, tmp_path / "one.safetensors")
    status, out = inspect(tmp_path / "one.safetensors", capsys)
    assert status == 0 and "safetensors" in out and "float32" in out
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    index = lesson.save_sharded_safetensors(state, sharded, max_shard_bytes=40_000)
    assert len(list(sharded.glob("*.safetensors"))) > 1
    assert lesson.max_abs_diff(lesson.load_sharded_safetensors(index), state) == 0.0
    for target in (sharded, index):
        status, out = inspect(target, capsys)
        assert status == 0 and "sharded safetensors" in out and f"{len(state)} tensors" in out
    with pytest.warns(UserWarning, match="assuming the intent is to save in a single process"):
        dcp.save({"model": state}, checkpoint_id=tmp_path / "dcp", no_dist=True)
    status, out = inspect(tmp_path / "dcp", capsys)
    assert status == 0 and "DCP" in out and "tensor model.net.0.weight" in out


def test_a_hostile_index_or_dcp_metadata_is_refused_and_runs_nothing(tmp_path, capsys):
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, tmp_path / "shard.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "../shard.safetensors"}}))
    status, out = inspect(index, capsys)
    assert status == 2 and "not a plain file name" in out and out.count("\n") == 1
    with pytest.raises(lesson.CheckpointLoadError, match="refuses the shard name"):
        lesson.load_sharded_safetensors(index)
    marker = tmp_path / "PAYLOAD_RAN"
    (tmp_path / "dcp").mkdir()
    with (tmp_path / "dcp" / ".metadata").open("wb") as handle:
        pickle.dump(WritesAFile(marker), handle)  # DCP's own reader would run this
    status, out = inspect(tmp_path / "dcp", capsys)
    assert status == 1 and "WARNING: posix.system can run code" in out and not marker.exists()


@pytest.mark.parametrize(("weight_map", "cause"), [
    (["w"], "not an object"), ({"w": 3}, "not an object"),
    ({"w": "shard.safetensors"}, "shard.safetensors: not a readable safetensors shard")])
def test_load_sharded_safetensors_names_the_file_for_any_bad_index_or_shard(tmp_path,
                                                                            weight_map, cause):
    """A list for a map, a number for a name, a corrupt shard header: one error, no raw
    AttributeError or SafetensorError."""
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, tmp_path / "shard.safetensors")
    data = bytearray((tmp_path / "shard.safetensors").read_bytes())
    data[8:10] = b"[]"  # the JSON header is now a list
    (tmp_path / "shard.safetensors").write_bytes(bytes(data))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(lesson.CheckpointLoadError, match=cause):
        lesson.load_sharded_safetensors(index)


@pytest.mark.parametrize(("content", "cause"), [
    (b"", "empty"), (b"hello, not a checkpoint", "not a checkpoint format"),
    (None, "truncated"), ("missing", "no such file")])
def test_inspect_unreadable_inputs_is_one_line_exit_2(tmp_path, capsys, content, cause):
    path = tmp_path / "bad.pt"
    if content is None:
        torch.save(SmallCNN().state_dict(), path)
        path.write_bytes(path.read_bytes()[:2000])
    elif content != "missing":
        path.write_bytes(content)
    status, out = inspect(path, capsys)
    assert status == 2
    assert out.count("\n") == 1 and str(path) in out and cause in out and "Traceback" not in out


def test_inspect_names_deployment_files_instead_of_failing_obscurely(tmp_path, capsys):
    model = SmallCNN().eval()
    example = (torch.randn(2, 1, 16, 16),)
    torch.export.save(torch.export.export(model, example), tmp_path / "program.pt2")
    status, out = inspect(tmp_path / "program.pt2", capsys)
    assert status == 2 and "a .pt2 package" in out and "torch.export.load" in out
    assert "ONLY if you trust it or verified its hash" in out  # it unpickles parts of it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript is deprecated in torch 2.10+
        torch.jit.save(torch.jit.trace(model, example), tmp_path / "scripted.pt")
    status, out = inspect(tmp_path / "scripted.pt", capsys)
    assert status == 2 and "TorchScript archive" in out and "torch.jit.load" in out


def test_inspect_from_the_command_line_writes_nothing(tmp_path):
    torch.save(SmallCNN().state_dict(), tmp_path / "model.pt")
    out_dir = tmp_path / "would_be_out_dir"
    done = zygote.run([sys.executable, str(ROOT / "01_basic_save_load.py"), "--inspect",
                       str(tmp_path / "model.pt"), "--out-dir", str(out_dir)],
                      capture_output=True, text=True, timeout=120, check=False,
                      cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "loads as it is" in done.stdout and not out_dir.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_the_timing_word_turns_with_the_figures():
    assert lesson.timing_word(0.84, 0.09, "safetensors").startswith("safetensors is 9.3x faster")
    assert lesson.timing_word(0.09, 0.84, "safetensors").startswith("safetensors is 9.3x slower")
    assert lesson.timing_word(1.0, 1.2, "safetensors").startswith("the same order")


def test_an_inference_tensor_enters_autograd_only_where_nothing_is_saved():
    with torch.inference_mode():
        frozen = torch.randn(3)
    outcomes = list(lesson.inference_tensor_in_autograd(frozen).values())
    assert outcomes[0] == "works"
    assert "cannot be saved for backward" in outcomes[1]
    assert "Inplace update to inference tensor" in outcomes[2]
