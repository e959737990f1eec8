"""Unit tests of 02's CheckpointManager, plus kill -9 / --resume runs of the script."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import zlib

import pytest
import torch

from common.compare import bit_identical, max_abs_diff
from common.models import SmallCNN
from tests.conftest import ROOT, load_script

lesson = load_script("02_checkpoint_manager")
CheckpointManager = lesson.CheckpointManager


def save_all(manager, values, monitor="val_loss"):
    for step, value in enumerate(values, start=1):
        manager.save({"step": step, "w": torch.full((3,), float(step))}, step=step, epoch=step,
                     metrics={monitor: value})
    manager.wait()


def files_on_disk(directory):
    return sorted(p.name for p in directory.glob("*.pt"))


def test_retention_min_mode_keeps_last_n_and_best_k(tmp_path):
    manager = CheckpointManager(tmp_path, monitor="val_loss", mode="min", save_top_k=2,
                                keep_last=2)
    save_all(manager, [5.0, 1.0, 4.0, 2.0, 3.0, 6.0])
    assert [e.step for e in manager.list()] == [2, 4, 5, 6]
    assert files_on_disk(tmp_path) == sorted(e.file for e in manager.list())
    assert manager.best.step == 2 and manager.latest.step == 6


def test_retention_max_mode(tmp_path):
    manager = CheckpointManager(tmp_path, monitor="accuracy", mode="max", save_top_k=1,
                                keep_last=1)
    save_all(manager, [0.1, 0.9, 0.5, 0.8, 0.2], monitor="accuracy")
    assert [e.step for e in manager.list()] == [2, 5]
    assert manager.best.metrics["accuracy"] == 0.9
    assert len(files_on_disk(tmp_path)) == 2


def test_best_is_tracked_and_always_kept(tmp_path):
    manager = CheckpointManager(tmp_path, save_top_k=0, keep_last=1)
    save_all(manager, [3.0, 1.0, 2.0, 2.5])
    assert manager.best.step == 2
    assert {e.step for e in manager.list()} == {2, 4}
    manager.save({"w": torch.zeros(1)}, step=5, epoch=5, metrics={"val_loss": 0.5})
    assert manager.best.step == 5 and [e.step for e in manager.list()] == [5]


def test_file_names_carry_step_and_metric(tmp_path):
    manager = CheckpointManager(tmp_path)
    path = manager.save({"w": torch.ones(1)}, step=42, epoch=3, metrics={"val_loss": 0.25})
    assert path.name == "epoch003-step000042-val_loss0.2500.pt"


def test_manifest_round_trip(tmp_path):
    manager = CheckpointManager(tmp_path, save_top_k=3, keep_last=3)
    save_all(manager, [0.5, 0.4, 0.3])
    reopened = CheckpointManager(tmp_path)
    assert reopened.list() == manager.list()
    data = json.loads((tmp_path / "manifest.json").read_text())
    entry = data["checkpoints"][0]
    assert set(entry) == {"file", "step", "epoch", "metrics", "timestamp", "bytes",
                          "checksum", "seq"}
    assert entry["bytes"] == (tmp_path / entry["file"]).stat().st_size
    written = (tmp_path / entry["file"]).read_bytes()
    assert entry["checksum"] == f"crc32:{zlib.crc32(written):08x}"
    assert reopened.load(2).state["step"] == 2
    assert reopened.load_best().entry.step == 3


def test_a_writer_that_fails_midway_leaves_everything_intact(tmp_path):
    manager = CheckpointManager(tmp_path, save_top_k=5, keep_last=5)
    save_all(manager, [0.5, 0.4])
    manifest_before = (tmp_path / "manifest.json").read_bytes()
    files_before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    manager.serialize = lesson.failing_writer
    with pytest.raises(OSError, match="simulated"):
        manager.save({"w": torch.ones(1)}, step=3, epoch=3, metrics={"val_loss": 0.1})
    assert (tmp_path / "manifest.json").read_bytes() == manifest_before
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files_before
    assert [e.step for e in CheckpointManager(tmp_path).list()] == [1, 2]


def test_a_process_killed_mid_write_leaves_everything_intact(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from tests.conftest import load_script
        lesson = load_script("02_checkpoint_manager")
        manager = lesson.CheckpointManager({str(tmp_path)!r}, save_top_k=5, keep_last=5)
        for step in (1, 2):
            manager.save({{"w": torch.full((1000,), step)}}, step=step, epoch=step,
                         metrics={{"val_loss": 1.0 / step}})
        def dying_writer(obj, handle):
            torch.save(obj, handle)
            handle.seek(handle.tell() // 2)
            handle.truncate()
            handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        manager.serialize = dying_writer
        manager.save({{"w": torch.zeros(1000)}}, step=3, epoch=3, metrics={{"val_loss": 0.1}})
    """)
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                               timeout=120, check=False)
    assert completed.returncode == -signal.SIGKILL, completed.stderr
    leftovers = sorted(p.name for p in tmp_path.glob("*.partial"))
    assert leftovers  # the kill really happened mid-write...
    reopened = CheckpointManager(tmp_path)
    assert [e.step for e in reopened.list()] == [1, 2]  # ...yet the manifest is intact,
    assert all(reopened.verify(e) is None for e in reopened.list())  # so are the files,
    assert not list(tmp_path.glob("*.partial"))  # and the next manager cleans up
    assert reopened.load_latest().state["w"][0] == 2


def test_truncated_newest_checkpoint_is_skipped_with_a_warning(tmp_path):
    manager = CheckpointManager(tmp_path, save_top_k=3, keep_last=3)
    save_all(manager, [0.3, 0.2, 0.1])
    newest = tmp_path / manager.latest.file
    newest.write_bytes(newest.read_bytes()[:100])
    with pytest.warns(lesson.CheckpointWarning, match="skipping damaged checkpoint .*step000003"):
        loaded = manager.load_latest()
    assert loaded.entry.step == 2 and loaded.state["step"] == 2


def test_tampered_bytes_of_the_same_size_are_detected(tmp_path):
    manager = CheckpointManager(tmp_path, save_top_k=3, keep_last=3)
    save_all(manager, [0.3, 0.2])
    path = tmp_path / manager.best.file
    data = bytearray(path.read_bytes())
    data[-200] ^= 0xFF
    path.write_bytes(bytes(data))
    assert "checksum does not match" in manager.verify(manager.best)
    with pytest.warns(lesson.CheckpointWarning, match="checksum does not match"):
        assert manager.load_best().entry.step == 1
    with pytest.warns(lesson.CheckpointWarning), pytest.raises(RuntimeError, match="damaged"):
        manager.load(2)


@pytest.mark.parametrize("algorithm", ["crc32", "sha256"])
def test_both_checksums_detect_a_flipped_bit(tmp_path, algorithm):
    manager = CheckpointManager(tmp_path, save_top_k=3, keep_last=3, checksum=algorithm)
    save_all(manager, [0.3, 0.2])
    path = tmp_path / manager.best.file
    expected = (f"crc32:{zlib.crc32(path.read_bytes()):08x}" if algorithm == "crc32"
                else f"sha256:{hashlib.sha256(path.read_bytes()).hexdigest()}")
    assert manager.best.checksum == expected
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.warns(lesson.CheckpointWarning, match="checksum does not match"):
        assert manager.load_best().entry.step == 1
    with pytest.raises(ValueError, match="checksum must be one of"):
        CheckpointManager(tmp_path / "other", checksum="md5")


def test_a_manifest_with_bare_sha256_fields_still_verifies(tmp_path):
    """Folders written before the checksum field ("sha256": hex) load, and stay verified."""
    manager = CheckpointManager(tmp_path, save_top_k=3, keep_last=3)
    save_all(manager, [0.3, 0.2])
    data = json.loads((tmp_path / "manifest.json").read_text())
    for entry in data["checkpoints"]:
        del entry["checksum"], entry["seq"]
        entry["sha256"] = hashlib.sha256((tmp_path / entry["file"]).read_bytes()).hexdigest()
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    reopened = CheckpointManager(tmp_path)
    assert reopened.load_latest().entry.step == 2
    newest = tmp_path / reopened.latest.file
    newest.write_bytes(newest.read_bytes()[:-1] + b"?")
    with pytest.warns(lesson.CheckpointWarning, match="checksum does not match"):
        assert reopened.load_latest().entry.step == 1
    del data["checkpoints"][0]["sha256"]
    data["checkpoints"][0]["checksum"] = "md5:00"
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(lesson.CheckpointError, match="unknown checksum"):
        CheckpointManager(tmp_path).load(1)


def test_no_checkpoint_and_unknown_step(tmp_path):
    manager = CheckpointManager(tmp_path)
    assert manager.load_latest() is None and manager.load_best() is None
    with pytest.raises(KeyError, match="no checkpoint at step 7"):
        manager.load(7)


def test_bad_arguments_and_missing_metric(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        CheckpointManager(tmp_path, mode="avg")
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)
    with pytest.raises(KeyError, match="val_loss"):
        CheckpointManager(tmp_path).save({}, step=1, epoch=1, metrics={"loss": 1.0})


def test_corrupt_manifest_is_a_clear_error_and_left_alone(tmp_path):
    save_all(CheckpointManager(tmp_path), [0.5])
    manifest = tmp_path / "manifest.json"
    manifest.write_text("{not json")
    with pytest.raises(RuntimeError, match="manifest.json: not a valid manifest"):
        CheckpointManager(tmp_path)
    assert manifest.read_text() == "{not json"
    assert len(files_on_disk(tmp_path)) == 1


def test_interrupted_deletions_are_finished_on_open(tmp_path):
    manager = CheckpointManager(tmp_path, save_top_k=5, keep_last=5)
    save_all(manager, [0.5, 0.4])
    doomed = manager.list()[0].file
    data = json.loads((tmp_path / "manifest.json").read_text())
    data["checkpoints"] = data["checkpoints"][1:]
    data["deleting"] = [doomed]  # as if a crash struck between manifest write and deletion
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    reopened = CheckpointManager(tmp_path)
    assert not (tmp_path / doomed).exists()
    assert json.loads((tmp_path / "manifest.json").read_text())["deleting"] == []
    assert [e.step for e in reopened.list()] == [2]


def test_async_save_writes_the_state_as_it_was_when_saved(tmp_path):
    model = SmallCNN()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    with CheckpointManager(tmp_path / "async", async_save=True) as async_manager:
        async_manager.save({"model": model.state_dict()}, step=1, epoch=1,
                           metrics={"val_loss": 1.0})
        with torch.no_grad():  # training goes on while the background write may still run
            for parameter in model.parameters():
                parameter.add_(1.0)
    sync_manager = CheckpointManager(tmp_path / "sync")
    sync_manager.save({"model": expected}, step=1, epoch=1, metrics={"val_loss": 1.0})
    written_async = async_manager.load_latest().state["model"]
    written_sync = sync_manager.load_latest().state["model"]
    assert max_abs_diff(written_async, expected) == 0.0
    assert max_abs_diff(written_async, written_sync) == 0.0


def test_async_snapshots_reuse_their_memory_and_every_file_holds_its_own_step(tmp_path):
    weights = torch.zeros(64, 64)
    with CheckpointManager(tmp_path, async_save=True, keep_last=3) as manager:
        for step in (1, 2, 3):
            weights.fill_(step)  # the live tensor changes after every save
            manager.save({"w": weights, "extra": [torch.ones(2) * step], "step": step},
                         step=step, epoch=step, metrics={"val_loss": 1.0 / step})
            staged = manager._staging["w"]
            if step == 1:
                first_buffer = staged.data_ptr()
            assert staged.data_ptr() == first_buffer  # copied into, not re-allocated
            weights.fill_(-1.0)
    for step in (1, 2, 3):
        state = manager.load(step).state
        assert torch.equal(state["w"], torch.full((64, 64), float(step)))
        assert torch.equal(state["extra"][0], torch.ones(2) * step) and state["step"] == step
    # A tensor whose shape changed gets a new buffer instead of a wrong copy.
    changed = lesson.snapshot_to_cpu({"w": torch.ones(3)}, reuse={"w": torch.zeros(4)})
    assert torch.equal(changed["w"], torch.ones(3))


def test_async_errors_surface_on_wait(tmp_path):
    manager = CheckpointManager(tmp_path, async_save=True, serialize=lesson.failing_writer)
    manager.save({"w": torch.ones(1)}, step=1, epoch=1, metrics={"val_loss": 1.0})
    with pytest.raises(OSError, match="simulated"):
        manager.close()
    assert manager.list() == [] and not list(tmp_path.glob("*.partial"))


def test_resume_is_bit_exact(tmp_path):
    quiet = lambda line: None  # noqa: E731
    device = torch.device("cpu")
    straight, _, _ = lesson.train(tmp_path / "a", epochs=3, seed=1, device=device, log=quiet)
    with pytest.raises(lesson.SimulatedCrash):
        lesson.train(tmp_path / "b", epochs=3, seed=1, device=device, crash_after_epoch=1,
                     log=quiet)
    resumed, _, history = lesson.train(tmp_path / "b", epochs=3, seed=1, device=device,
                                       resume=True, log=quiet)
    assert max_abs_diff(straight.state_dict(), resumed.state_dict()) == 0.0
    assert [h["epoch"] for h in history] == [1, 2, 3]


def test_kill_9_at_any_point_then_resume_is_bit_identical(default_run, tmp_path):
    reference = default_run("02_checkpoint_manager")
    assert reference.returncode == 0, reference.stderr[-2000:]
    out_dir = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, str(ROOT / "02_checkpoint_manager.py"), "--device", "cpu",
               "--out-dir", str(out_dir), "--resume"]
    manifest = out_dir / "checkpoints" / "manifest.json"
    outputs = []
    # Kill when the run has recorded 2, then 5 checkpoints' worth of progress, plus a delay
    # that moves the kill to a different instant of the epoch each time.
    for epochs_done, delay in ((2, 0.0), (5, 0.05)):
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, env=env)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            try:
                latest = max(e["epoch"] for e in json.loads(manifest.read_text())["checkpoints"])
            except (OSError, ValueError, KeyError):
                latest = 0
            if latest >= epochs_done:
                break
            time.sleep(0.01)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        outputs.append(process.communicate(timeout=60)[0])
        assert process.returncode == -signal.SIGKILL, outputs[-1][-2000:]
    assert "starting from scratch" in outputs[0]
    assert "resumed from" in outputs[1]
    final = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert final.returncode == 0, final.stderr[-2000:]
    assert "resumed from" in final.stdout
    expected = torch.load(reference.out_dir / "final_model.pt", map_location="cpu",
                          weights_only=True)
    got = torch.load(out_dir / "final_model.pt", map_location="cpu", weights_only=True)
    assert bit_identical(expected, got)


def test_resaving_a_step_with_another_metric_replaces_its_file(tmp_path):
    manager = CheckpointManager(tmp_path, save_top_k=5, keep_last=5)
    save_all(manager, [0.5, 0.4])
    manager.save({"w": torch.ones(1)}, step=2, epoch=2, metrics={"val_loss": 0.3})
    assert [e.step for e in manager.list()] == [1, 2]
    assert files_on_disk(tmp_path) == sorted(e.file for e in manager.list())
    assert manager.list()[-1].metrics["val_loss"] == 0.3


def test_reopening_with_another_monitor_is_a_clear_error(tmp_path):
    save_all(CheckpointManager(tmp_path), [0.5])
    with pytest.raises(ValueError, match="monitors 'val_loss'"):
        CheckpointManager(tmp_path, monitor="accuracy", mode="max")
