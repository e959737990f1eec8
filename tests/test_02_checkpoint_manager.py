"""Unit tests of 02's CheckpointManager, plus kill -9 / --resume runs of the script."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
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
from tests import zygote
from tests.conftest import ROOT, background_work, load_script, run_env

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
    assert path.name == "epoch003-step000042-val_loss0.2500-seq1.pt"  # seq: never reused


def test_manifest_round_trip(tmp_path):
    manager = CheckpointManager(tmp_path, save_top_k=3, keep_last=3)
    save_all(manager, [0.5, 0.4, 0.3])
    reopened = CheckpointManager(tmp_path)
    assert reopened.list() == manager.list()
    data = json.loads((tmp_path / "manifest.json").read_text())
    entry = data["checkpoints"][0]
    assert set(entry) == {"file", "step", "epoch", "metrics", "timestamp", "bytes",
                          "checksum", "seq", "position", "writer"}
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
    completed = zygote.run([sys.executable, "-c", script], capture_output=True, text=True,
                           timeout=120, check=False)
    assert completed.returncode == -signal.SIGKILL, completed.stderr
    leftovers = sorted(p.name for p in tmp_path.glob("*.partial"))
    assert leftovers  # the kill really happened mid-write...
    reopened = CheckpointManager(tmp_path)
    assert [e.step for e in reopened.list()] == [1, 2]  # ...yet the manifest is intact,
    assert all(reopened.verify(e) is None for e in reopened.list())  # so are the files,
    assert not list(tmp_path.glob("*.partial"))  # and the next manager cleans up
    assert reopened.load_latest().state["w"][0] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [e.file for e in reopened.list()] + ["manifest.json", "writer.lock"])
    # tests/test_02_crash_points.py kills a save at EVERY filesystem step (os.replace and the
    # manifest write included), sync and async.


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
    with pytest.raises(KeyError, match="no checkpoint 7 in the manifest"):
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
            staged = manager._background.staging["w"]
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


QUIET = lambda line: None  # noqa: E731
CPU = torch.device("cpu")


def test_resume_is_bit_exact(tmp_path):
    straight = lesson.train(tmp_path / "a", epochs=3, seed=1, device=CPU, log=QUIET)
    with pytest.raises(lesson.SimulatedCrash):
        lesson.train(tmp_path / "b", epochs=3, seed=1, device=CPU,
                     crash_at_step=lesson.STEPS_PER_EPOCH, log=QUIET)
    resumed = lesson.train(tmp_path / "b", epochs=3, seed=1, device=CPU, resume=True,
                           log=QUIET)
    assert resumed.resumed_from.step == lesson.STEPS_PER_EPOCH
    assert bit_identical(straight.model.state_dict(), resumed.model.state_dict())
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert len(straight.train_loader) == lesson.STEPS_PER_EPOCH


@pytest.mark.parametrize(("crash", "every"), [(4, 3), (9, 4), (14, 7)])
def test_mid_epoch_resume_is_bit_exact_and_history_seamless(tmp_path, crash, every):
    straight = lesson.train(tmp_path / "a", epochs=3, seed=2, device=CPU, log=QUIET)
    schedule = lesson.SaveSchedule(steps=every)
    with pytest.raises(lesson.SimulatedCrash):
        lesson.train(tmp_path / "b", epochs=3, seed=2, device=CPU, saves=schedule,
                     crash_at_step=crash, log=QUIET)
    entry = CheckpointManager(tmp_path / "b").latest
    assert entry.step == crash // every * every and entry.position == entry.step % 6 != 0
    assert math.isnan(entry.metrics["val_loss"])  # mid-epoch: no validation loss...
    best = CheckpointManager(tmp_path / "b").best
    assert best is None or math.isfinite(best.metrics["val_loss"])  # ...so never "best"
    assert best is None or best.step != entry.step
    resumed = lesson.train(tmp_path / "b", epochs=3, seed=2, device=CPU, saves=schedule,
                           resume=True, log=QUIET)
    assert bit_identical(straight.model.state_dict(), resumed.model.state_dict())
    assert resumed.history == straight.history  # losses per step and per epoch, exactly


@pytest.mark.parametrize("workers", [0, 2])
def test_stateful_loader_resumes_mid_epoch_in_the_same_order(workers):
    """resume_data_stream continues an epoch and the epochs after it batch for batch."""
    def loader():
        return lesson.StatefulDataLoader(
            torch.utils.data.TensorDataset(torch.arange(40)), batch_size=4, shuffle=True,
            generator=torch.Generator().manual_seed(5), num_workers=workers)

    straight = loader()
    reference = [b[0].tolist() for _ in range(3) for b in straight]
    for epochs_done, cut in ((0, 3), (1, 1), (1, 9)):
        original, order = loader(), []
        for _ in range(epochs_done):
            order += [b[0].tolist() for b in original]
        batches = iter(original)
        order += [next(batches)[0].tolist() for _ in range(cut)]
        state, generator = original.state_dict(), original.generator.get_state()
        del batches
        resumed = loader()
        order += [b[0].tolist() for b in lesson.resume_data_stream(resumed, state, generator)]
        while len(order) < len(reference):
            order += [b[0].tolist() for b in resumed]
        assert order == reference, (epochs_done, cut)


def test_save_schedule_by_steps_and_by_seconds():
    assert [s for s in range(1, 10) if lesson.SaveSchedule(steps=4).due(s, time.monotonic())
            ] == [4, 8]
    assert not lesson.SaveSchedule().due(4, 0.0)
    by_time = lesson.SaveSchedule(seconds=30.0)
    assert not by_time.due(1, time.monotonic()) and by_time.due(1, time.monotonic() - 31)


def test_the_lesson_measures_the_torchdata_generator_pitfall():
    by_hand, without_fix, with_fix = lesson.hand_made_resume(seed=0)
    assert by_hand and with_fix and not without_fix


def test_a_signal_saves_after_the_step_and_resume_is_exact(tmp_path):
    """In-process, a real SIGUSR1 arrives during step 8 (mid-epoch 2) while step saves run
    in the background; the loop saves after the next step and raises Preempted."""
    straight = lesson.train(tmp_path / "a", epochs=3, seed=3, device=CPU, log=QUIET)

    class SignalAtStep8(lesson.SaveSchedule):
        def due(self, step, last_save):
            if step == 8:
                os.kill(os.getpid(), signal.SIGUSR1)
            return super().due(step, last_save)

    with lesson.PreemptionFlag() as flag, pytest.raises(lesson.Preempted) as preempted:
        lesson.train(tmp_path / "b", epochs=3, seed=3, device=CPU, stop=flag,
                     saves=SignalAtStep8(steps=3), log=QUIET)
    assert preempted.value.signal_number == signal.SIGUSR1
    entry = CheckpointManager(tmp_path / "b").latest
    assert (entry.step, entry.epoch, entry.position) == (9, 1, 3)
    resumed = lesson.train(tmp_path / "b", epochs=3, seed=3, device=CPU, resume=True,
                           log=QUIET)
    assert bit_identical(straight.model.state_dict(), resumed.model.state_dict())


def test_preemption_flag_only_records_and_restores_the_handlers():
    before = signal.getsignal(signal.SIGTERM)
    before_usr1 = signal.getsignal(signal.SIGUSR1)
    with lesson.PreemptionFlag() as flag:
        assert not flag.requested
        os.kill(os.getpid(), signal.SIGTERM)  # a real signal to this process
        time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGUSR1)  # a second one: the first is kept
        time.sleep(0.05)
        assert flag.requested and flag.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before
    assert signal.getsignal(signal.SIGUSR1) == before_usr1  # both handlers come back


def test_resume_from_an_older_step_and_the_new_branch_becomes_latest(tmp_path):
    straight = lesson.train(tmp_path / "a", epochs=3, seed=4, device=CPU, log=QUIET)
    lesson.train(tmp_path / "b", epochs=3, seed=4, device=CPU, log=QUIET)
    abandoned = CheckpointManager(tmp_path / "b").list()
    older = min(e.step for e in abandoned)
    assert older < max(e.step for e in abandoned)
    again = lesson.train(tmp_path / "b", epochs=3, seed=4, device=CPU, resume=older, log=QUIET)
    assert again.resumed_from.step == older
    assert bit_identical(straight.model.state_dict(), again.model.state_dict())
    manager = CheckpointManager(tmp_path / "b")
    assert manager.latest.seq > max(e.seq for e in abandoned)  # the new branch's last write
    by_name = lesson.train(tmp_path / "b", epochs=3, seed=4, device=CPU,
                           resume=manager.list()[0].file, log=QUIET)
    assert by_name.resumed_from.file == manager.list()[0].file


def test_the_scheduler_pitfalls_are_measured():
    lambda_lr = lesson.SCHEDULERS["LambdaLR(0.5 ** epoch)"]
    cosine = lesson.SCHEDULERS["CosineAnnealingLR(T_max=10)"]
    right = lesson.lr_after_resume(lambda_lr, "build all, then load all (right)")
    assert right[:2] == right[2:] == (0.03125, 0.015625)
    late = lesson.lr_after_resume(lambda_lr, "load optimizer, then build + load scheduler")
    assert late[0] == 1.0 and late[1] == 0.015625  # a whole epoch at lr 1.0
    assert lesson.lr_after_resume(lambda_lr, "scheduler state not saved")[:2] == (1.0, 0.5)
    unsaved = lesson.lr_after_resume(cosine, "scheduler state not saved")
    assert unsaved[0] == unsaved[2] and unsaved[1] != unsaved[3]  # right now, wrong next


def run_cli(out_dir, *flags, **popen):
    command = [sys.executable, str(ROOT / "02_checkpoint_manager.py"), "--device", "cpu",
               "--out-dir", str(out_dir), "--train-only", *flags]
    # The reference default run's environment: bit-exact needs its thread count too.
    env = {**run_env(), "PYTHONUNBUFFERED": "1"}
    return zygote.popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        text=True, env=env, **popen)


def final_weights(out_dir):
    return torch.load(out_dir / "final_model.pt", map_location="cpu", weights_only=True)


def unfinished_saves(manifest):
    """What a killed save left: temporaries, and checkpoint files the manifest does not name."""
    named = {e["file"] for e in json.loads(manifest.read_text())["checkpoints"]}
    return [p.name for p in manifest.parent.iterdir() if p.name.endswith(".partial")
            or (p.suffix == ".pt" and p.name not in named)]


def kill_9(process, manifest, target: int, pause: float | None) -> str:
    """SIGKILL ``process`` once the manifest names a step >= ``target``: ``pause`` seconds
    later, or (``pause`` None) as soon as a save is in flight (its temporary file exists).
    Returns the process's output; fails if it was not killed (it finished first)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            latest = max(e["step"] for e in json.loads(manifest.read_text())["checkpoints"])
        except (OSError, ValueError, KeyError):
            latest = 0
        if latest >= target:
            break
        time.sleep(0.005)
    if pause is not None:
        time.sleep(pause)  # anywhere in the next steps
    else:
        while (time.monotonic() < deadline and process.poll() is None
               and not list(manifest.parent.glob("*.partial"))):
            time.sleep(0.001)  # poll, but leave the cores to the runs beside this test
    process.send_signal(signal.SIGKILL)
    output = process.communicate(timeout=60)[0]
    assert process.returncode == -signal.SIGKILL, output[-2000:]
    return output


@background_work
def killed_at_random_steps_then_resumed(tmp_path):
    """The kill -9 test's processes, run from the session's start (conftest's
    background_work); returns the out-dir the final, resumed run wrote."""
    out_dir = tmp_path / "killed"
    manifest = out_dir / "checkpoints" / "manifest.json"
    chance = random.Random(1234)
    outputs, mid_save = [], 0
    targets = sorted(chance.sample(range(4, 44), 3))
    pauses = [chance.uniform(0.0, 0.06), chance.uniform(0.0, 0.06), None]  # the last: in a save
    for target, pause in zip(targets, pauses, strict=True):
        process = run_cli(out_dir, "--resume", "--save-every-steps", "3", "--step-delay", "0.01")
        outputs.append(kill_9(process, manifest, target, pause))
        mid_save += bool(unfinished_saves(manifest))
    # A kill sent while a temporary file existed can still arrive after that save finished
    # (this process was not scheduled in between, on a busy machine): then kill in the next
    # save in flight, up to three more times, until one kill lands inside a save.
    for _ in range(3):
        if mid_save:
            break
        process = run_cli(out_dir, "--resume", "--save-every-steps", "3", "--step-delay", "0.01")
        outputs.append(kill_9(process, manifest, 0, None))
        mid_save += bool(unfinished_saves(manifest))
    assert mid_save >= 1  # at least one kill landed inside a save
    assert "starting from scratch" in outputs[0]
    assert all("resumed from" in output for output in outputs[1:])
    final = run_cli(out_dir, "--resume", "--save-every-steps", "5")
    stdout, stderr = final.communicate(timeout=300)
    assert final.returncode == 0, stderr[-2000:]
    assert "resumed from" in stdout
    return out_dir


def test_kill_9_at_random_steps_then_resume_is_bit_identical(default_run, background_result):
    """SIGKILL at random instants, mid-epoch and mid-save, with step saves; then finish
    with another K: the final weights equal the uninterrupted default run's."""
    out_dir = background_result(killed_at_random_steps_then_resumed)
    reference = default_run("02_checkpoint_manager")
    assert reference.returncode == 0, reference.stderr[-2000:]
    assert bit_identical(final_weights(reference.out_dir), final_weights(out_dir))


@background_work
def preempted_by_sigterm_then_resumed(tmp_path):
    """The SIGTERM test's processes, run from the session's start (conftest's
    background_work); returns the out-dir the resumed run wrote."""
    out_dir = tmp_path / "preempted"
    process = run_cli(out_dir, "--step-delay", "0.1")
    for line in process.stdout:
        if "epoch  1/8" in line:
            break
    time.sleep(0.15)  # inside epoch 2
    process.send_signal(signal.SIGTERM)
    time.sleep(0.01)
    process.send_signal(signal.SIGTERM)  # a second SIGTERM while it saves changes nothing
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "preempted by SIGTERM: checkpoint saved after step" in stderr
    assert "Traceback" not in stderr
    entry = CheckpointManager(out_dir / "checkpoints").latest
    assert entry.position > 0 and entry.step % lesson.STEPS_PER_EPOCH != 0  # mid-epoch
    assert not list((out_dir / "checkpoints").glob("*.partial"))
    final = run_cli(out_dir, "--resume")
    stdout, stderr = final.communicate(timeout=300)
    assert final.returncode == 0, stderr[-2000:]
    assert f"resumed from {entry.file}" in stdout
    return out_dir


def test_sigterm_mid_epoch_saves_exits_143_and_resume_is_bit_identical(default_run,
                                                                      background_result):
    out_dir = background_result(preempted_by_sigterm_then_resumed)
    reference = default_run("02_checkpoint_manager")
    assert bit_identical(final_weights(reference.out_dir), final_weights(out_dir))


def test_resume_from_errors_are_one_line(tmp_path):
    lesson.train(tmp_path / "checkpoints", epochs=1, seed=0, device=CPU, log=QUIET)
    with pytest.raises(SystemExit) as exited:
        lesson.main(["--device", "cpu", "--out-dir", str(tmp_path), "--train-only",
                     "--resume-from", "999"])
    message = str(exited.value.code)
    assert message.startswith("error: ") and "no checkpoint 999" in message
    assert "\n" not in message and "Traceback" not in message  # one line
    both = run_cli(tmp_path, "--resume", "--resume-from", "6")
    _, stderr = both.communicate(timeout=120)
    assert both.returncode == 2 and "not allowed with argument" in stderr


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


@pytest.mark.parametrize("flags", [["--save-every-steps", "0"], ["--save-every-seconds", "-1"],
                                   ["--step-delay", "-0.1"], ["--epochs", "0"]])
def test_bad_flag_values_are_refused_before_anything_runs(tmp_path, flags, capsys):
    with pytest.raises(SystemExit) as exited:
        lesson.setup(["--device", "cpu", "--out-dir", str(tmp_path / "out"), *flags])
    assert exited.value.code == 2 and "must be" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before the out-dir was created


def test_deterministic_kernels_are_scoped_to_cuda_runs_and_restored():
    cudnn = torch.backends.cudnn
    before = (torch.are_deterministic_algorithms_enabled(), cudnn.deterministic,
              cudnn.benchmark)
    with lesson.deterministic_kernels(torch.device("cpu")):
        assert (torch.are_deterministic_algorithms_enabled(), cudnn.deterministic,
                cudnn.benchmark) == before  # the CPU kernels used here are deterministic
    with lesson.deterministic_kernels(torch.device("cuda")):  # sets flags only: no GPU needed
        assert torch.are_deterministic_algorithms_enabled() and cudnn.deterministic
        assert not cudnn.benchmark
    assert (torch.are_deterministic_algorithms_enabled(), cudnn.deterministic,
            cudnn.benchmark) == before
