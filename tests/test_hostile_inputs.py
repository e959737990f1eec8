"""The copyable classes under attack: hostile folders, a second process, odd values.

Each test reproduces one scenario of the hardening issue with real files and processes.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from collections import OrderedDict, namedtuple
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from common.models import MLP, SmallCNN
from tests import zygote
from tests.conftest import ROOT, load_script

manager_lesson = load_script("02_checkpoint_manager")
registry_lesson = load_script("03_model_versioning")
basics_lesson = load_script("01_basic_save_load")
CheckpointManager = manager_lesson.CheckpointManager
CheckpointError = manager_lesson.CheckpointError
SMALL = {"class": "MLP", "kwargs": {"in_features": 20, "hidden": 16, "num_classes": 4,
                                    "dropout": 0.1}}


def save_steps(manager, values, first_step=1):
    for step, value in enumerate(values, start=first_step):
        manager.save({"step": step, "w": torch.full((3,), float(step))}, step=step, epoch=step,
                     metrics={manager.monitor: value})
    manager.wait()


def tamper_manifest(directory, change):
    path = directory / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def temporaries(directory):
    return sorted(p.name for p in directory.rglob("*.partial"))


# ---- 1. a manifest that names files outside the folder --------------------------------------

@pytest.mark.parametrize("field", ["deleting", "file"])
@pytest.mark.parametrize("hostile", ["../sentinel.txt", "ABSOLUTE"])
def test_a_manifest_cannot_reach_outside_its_folder(tmp_path, field, hostile):
    folder = tmp_path / "run" / "checkpoints"
    sentinel = tmp_path / "run" / "sentinel.txt"
    sentinel.parent.mkdir(parents=True)
    sentinel.write_text("precious")
    name = str(sentinel) if hostile == "ABSOLUTE" else hostile
    save_steps(CheckpointManager(folder, save_top_k=3, keep_last=3), [0.5, 0.4])
    files_before = sorted(p.name for p in folder.iterdir())

    def change(data):
        if field == "deleting":
            data["deleting"] = [name]
        else:
            data["checkpoints"][0]["file"] = name

    tamper_manifest(folder, change)
    where = r"(deleting\[0\]|checkpoints\[0\]\.file)"  # the field that names the file
    with pytest.raises(CheckpointError, match=rf"manifest\.json: {where}: refuses the file name"):
        CheckpointManager(folder, save_top_k=3, keep_last=3)
    assert sentinel.read_text() == "precious"  # neither deleted nor read
    assert sorted(p.name for p in folder.iterdir()) == files_before


def test_a_symlink_out_of_the_folder_is_refused(tmp_path):
    folder = tmp_path / "checkpoints"
    manager = CheckpointManager(folder, save_top_k=3, keep_last=3)
    save_steps(manager, [0.5])
    outside = tmp_path / "secret.pt"
    torch.save({"secret": torch.ones(1)}, outside)
    entry = manager.latest
    (folder / entry.file).unlink()
    (folder / entry.file).symlink_to(outside)
    with pytest.raises(CheckpointError, match="symlink"):
        CheckpointManager(folder, save_top_k=3, keep_last=3)
    assert outside.exists()


# ---- 2. a reader opening the folder while a writer writes, and two writers ------------------

def test_a_second_manager_opened_mid_write_does_not_break_the_save(tmp_path):
    opened = []

    def writer_that_gets_company(obj, handle):
        torch.save(obj, handle)
        handle.flush()
        opened.append(CheckpointManager(tmp_path))  # an evaluation job opens the folder now

    manager = CheckpointManager(tmp_path, serialize=writer_that_gets_company)
    path = manager.save({"w": torch.ones(4)}, step=1, epoch=1, metrics={"val_loss": 0.5})
    assert opened and path.exists()
    assert manager.verify(manager.latest) is None
    assert opened[0].load_latest().state["w"].sum() == 4  # the reader sees the new file
    assert temporaries(tmp_path) == []


WRITER = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {root!r})
    from tests.conftest import load_script
    lesson = load_script("02_checkpoint_manager")
    manager = lesson.CheckpointManager({folder!r}, save_top_k=2, keep_last=3)
    first = int(sys.argv[1])
    for step in range(first, first + 12):
        manager.save({{"w": torch.full((20000,), float(step))}}, step=step, epoch=1,
                     metrics={{"val_loss": 1.0 / step}})
""")


@pytest.mark.parametrize("async_save", [False, True])
def test_a_save_keeps_another_writers_pending_deletions(tmp_path, async_save):
    """Writer A journals a deletion and frees the file later, in its background thread; if
    writer B saves in between, B's manifest must keep A's journal, or A's file is orphaned
    (found by the two-writer test below under load, when A's deletion ran after B's save)."""
    manager = CheckpointManager(tmp_path, save_top_k=1, keep_last=1, async_save=async_save)
    save_steps(manager, [0.5])
    orphan = tmp_path / "epoch000-step000099-val_loss0.9000.pt"  # A's file, out of the list
    torch.save({"w": torch.ones(1)}, orphan)
    tamper_manifest(tmp_path, lambda data: data.update(deleting=[orphan.name]))
    save_steps(manager, [0.4], first_step=2)  # B (this manager) saves before A deletes
    manager.close()
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert not orphan.exists() and data["deleting"] == []
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == [e["file"] for e in
                                                              data["checkpoints"]]


def test_two_writer_processes_on_one_folder_lose_nothing(tmp_path):
    code = WRITER.format(root=str(ROOT), folder=str(tmp_path))
    writers = [zygote.popen([sys.executable, "-c", code, str(first)],
                            stderr=subprocess.PIPE, text=True) for first in (1, 101)]
    for writer in writers:
        assert writer.wait(timeout=300) == 0, writer.stderr.read()
    manager = CheckpointManager(tmp_path, save_top_k=2, keep_last=3)
    entries = manager.list()
    assert all(manager.verify(e) is None for e in entries)
    on_disk = sorted(p.name for p in tmp_path.glob("*.pt"))
    assert on_disk == sorted(e.file for e in entries)  # no orphan, no missing file
    assert len(entries) <= 5 and temporaries(tmp_path) == []
    assert manager.best.step == 112  # the best of BOTH writers: val_loss 1/112


# ---- 3. NaN never takes the best slot ------------------------------------------------------

def test_nan_metrics_never_rank_as_best(tmp_path):
    manager = CheckpointManager(tmp_path, save_top_k=1, keep_last=1)
    save_steps(manager, [math.nan, 0.62, math.nan, math.nan, 0.9, math.nan])
    assert [e.step for e in manager.list()] == [2, 6]  # the finite best and the latest
    assert manager.best.step == 2
    assert manager.load_best().state["step"] == 2


def test_max_mode_ranks_inf_last_too(tmp_path):
    manager = CheckpointManager(tmp_path, monitor="acc", mode="max", save_top_k=1, keep_last=1)
    save_steps(manager, [0.3, math.inf, 0.5, math.nan])
    assert manager.best.step == 3


# ---- 4. errors that are not damage surface; --resume never silently starts over -------------

@dataclass
class CustomConfig:
    lr: float = 0.1


def test_an_intact_file_that_fails_to_load_raises_instead_of_being_skipped(tmp_path):
    manager = CheckpointManager(tmp_path, save_top_k=3, keep_last=3)
    save_steps(manager, [0.5])
    manager.save({"config": CustomConfig()}, step=2, epoch=2, metrics={"val_loss": 0.4})
    with pytest.raises(CheckpointError, match=r"intact \(its checksum matches.*Unsupported global"):
        manager.load_latest()


def resume_error(out_dir) -> str:
    """Run 02's main() with --resume in this process; return the message it exits with."""
    with pytest.raises(SystemExit) as exited:
        manager_lesson.main(["--device", "cpu", "--out-dir", str(out_dir), "--resume"])
    assert isinstance(exited.value.code, str)  # a message, so the exit status is 1
    assert "\n" not in exited.value.code and "Traceback" not in exited.value.code  # one line
    return exited.value.code


def test_resume_with_only_damaged_checkpoints_exits_nonzero_and_removes_nothing(tmp_path):
    folder = tmp_path / "checkpoints"
    save_steps(CheckpointManager(folder, save_top_k=2, keep_last=2), [0.5, 0.4])
    for checkpoint in folder.glob("*.pt"):
        checkpoint.write_bytes(checkpoint.read_bytes()[:50])  # both damaged
    before = {p.name: p.read_bytes() for p in folder.glob("*.*") if p.name != "writer.lock"}
    with pytest.warns(manager_lesson.CheckpointWarning):
        message = resume_error(tmp_path)
    assert message.startswith(f"error: {folder}") and "none is intact" in message
    assert {p.name: p.read_bytes() for p in folder.glob("*.*")
            if p.name != "writer.lock"} == before


def test_latest_is_the_most_recent_write_not_the_highest_step(tmp_path):
    manager = CheckpointManager(tmp_path, save_top_k=1, keep_last=2)
    save_steps(manager, [0.1, 0.5, 0.5, 0.5, 0.5])  # steps 1..5; step 1 is the best
    save_steps(manager, [0.6, 0.6], first_step=3)  # resumed from step 2: steps 3, 4 again
    assert manager.latest.step == 4
    assert [e.step for e in manager.list()] == [1, 3, 4]  # the abandoned step 5 is gone
    assert manager.load_latest().state["step"] == 4


# ---- 5. small sharp edges -------------------------------------------------------------------

def test_a_slash_in_the_monitored_metric_is_sanitised(tmp_path):
    manager = CheckpointManager(tmp_path, monitor="val/loss")
    path = manager.save({"w": torch.ones(1)}, step=1, epoch=1, metrics={"val/loss": 0.25})
    assert path.parent == tmp_path and path.name == "epoch001-step000001-val-loss0.2500-seq1.pt"
    assert manager.load_latest().entry.metrics["val/loss"] == 0.25


def test_async_snapshot_keeps_state_dict_metadata_and_namedtuples(tmp_path):
    state_dict = registry_lesson.RenamedMLP().state_dict()
    snapshot = manager_lesson.snapshot_to_cpu({"model": state_dict})
    assert isinstance(snapshot["model"], OrderedDict)
    assert snapshot["model"]._metadata == state_dict._metadata
    Pair = namedtuple("Pair", "first second")
    pair = manager_lesson.snapshot_to_cpu(Pair(torch.ones(2), 3))
    assert isinstance(pair, Pair) and pair.second == 3 and torch.equal(pair.first, torch.ones(2))
    with CheckpointManager(tmp_path, async_save=True) as manager:
        manager.save({"model": state_dict}, step=1, epoch=1, metrics={"val_loss": 1.0})
    loaded = manager.load_latest().state["model"]
    assert loaded._metadata[""]["version"] == registry_lesson.RenamedMLP._version


def register(registry, seed):
    torch.manual_seed(seed)
    return registry.register("m", MLP(hidden=16), architecture=SMALL, hyperparameters={},
                             history=[], data_fingerprint="x", seed=seed)


REGISTER = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {root!r})
    from common.models import MLP
    from tests.conftest import load_script
    lesson = load_script("03_model_versioning")
    torch.manual_seed(int(sys.argv[1]))
    registry = lesson.ModelRegistry({folder!r})
    architecture = {small!r}
    versioned = registry.register("m", MLP(hidden=16), architecture=architecture,
                                  hyperparameters={{}}, history=[], data_fingerprint="x",
                                  seed=int(sys.argv[1]))
    print(versioned.metadata["version"])
""")


def test_two_processes_registering_at_once_get_two_versions(tmp_path):
    code = REGISTER.format(root=str(ROOT), folder=str(tmp_path), small=SMALL)
    processes = [zygote.popen([sys.executable, "-c", code, str(seed)], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for seed in (1, 2)]
    outputs = [p.communicate(timeout=300) for p in processes]
    assert all(p.returncode == 0 for p in processes), outputs
    assert sorted(out.strip() for out, _ in outputs) == ["1.0", "1.1"]
    registry = registry_lesson.ModelRegistry(tmp_path)
    assert registry.versions("m") == ["1.0", "1.1"] or registry.versions("m") == ["1.1", "1.0"]
    for version in ("1.0", "1.1"):
        registry.load("m", version)  # verifies fingerprints, loads
    assert not list(tmp_path.rglob("*.incoming")) and temporaries(tmp_path) == []


@pytest.mark.parametrize("name", ["../escaped", "ABSOLUTE", "a/b", ".."])
def test_registry_names_with_paths_are_refused(tmp_path, name):
    # A hostile absolute name points at a folder this test made under tmp_path, never at
    # a fixed path such as /tmp/absolute: if the check breaks, the damage stays here.
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("precious")
    name = str(outside) if name == "ABSOLUTE" else name
    registry = registry_lesson.ModelRegistry(tmp_path / "registry")
    with pytest.raises(registry_lesson.IntegrityError, match="not a plain name"):
        register_named(registry, name)
    assert sorted(p.name for p in tmp_path.iterdir()) in (["outside"], ["outside", "registry"])
    assert [p.name for p in outside.iterdir()] == ["keep.txt"]  # it survives, untouched
    assert (outside / "keep.txt").read_text() == "precious"
    assert not (tmp_path / "escaped").exists()


def register_named(registry, name):
    return registry.register(name, MLP(hidden=16), architecture=SMALL, hyperparameters={},
                             history=[], data_fingerprint="x", seed=0)


def test_a_hostile_registry_index_or_metadata_is_refused(tmp_path):
    registry = registry_lesson.ModelRegistry(tmp_path / "registry")
    register(registry, 1)
    index_path = tmp_path / "registry" / "m" / "registry.json"
    index = json.loads(index_path.read_text())
    index["aliases"]["production"] = "../../outside"
    index_path.write_text(json.dumps(index))
    with pytest.raises(registry_lesson.IntegrityError, match="not a registered version"):
        registry.load("m", "production")
    index["aliases"] = {}
    index["versions"]["../../outside"] = index["versions"]["1.0"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(registry_lesson.IntegrityError, match="not a version number"):
        registry.versions("m")
    del index["versions"]["../../outside"]
    index_path.write_text(json.dumps(index))
    metadata_path = tmp_path / "registry" / "m" / "1.0" / "metadata.json"
    metadata = json.loads(metadata_path.read_text())
    metadata["weights_file"] = "../../../secret.safetensors"
    metadata_path.write_text(json.dumps(metadata))
    with pytest.raises(registry_lesson.IntegrityError, match="weights file"):
        registry.load("m", "1.0")


def test_registry_takes_any_builder_and_records_the_real_fingerprint(tmp_path):
    class Tiny(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.layer = nn.Linear(3, width)

    registry = registry_lesson.ModelRegistry(
        tmp_path, build=lambda arch: Tiny(**arch["kwargs"]),
        card=lambda metadata: f"# {metadata['name']} card\n")
    model = Tiny(5)
    versioned = registry.register("tiny", model, architecture={"class": "Tiny",
                                                               "kwargs": {"width": 5}},
                                  hyperparameters={}, history=[], data_fingerprint="x", seed=0)
    assert (versioned.metadata["fingerprints"]["content"]
            == registry_lesson.content_fingerprint(model.state_dict()))
    assert registry.load("tiny", "1.0").model.layer.out_features == 5
    card = (tmp_path / "tiny" / "1.0" / "MODEL_CARD.md").read_text()
    assert card == "# tiny card\n"
    assert versioned.metadata["environment"]["device"] == "cpu"


def test_versioned_model_save_recomputes_fingerprints(tmp_path):
    model = MLP(hidden=16)
    metadata = {"name": "m", "version": "1.0", "fingerprints": {"content": "forged",
                                                                 "signature": "forged"}}
    registry_lesson.VersionedModel(model, metadata).save(tmp_path / "v", card=lambda m: "")
    written = json.loads((tmp_path / "v" / "metadata.json").read_text())
    assert written["fingerprints"]["content"] == registry_lesson.content_fingerprint(
        model.state_dict())


# ---- 01: check_state_dict_fits accepts what load_state_dict accepts -------------------------

class WithExtraState(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.calls = 0

    def get_extra_state(self):
        return {"calls": self.calls}

    def set_extra_state(self, state):
        self.calls = state["calls"]


def test_check_state_dict_fits_runs_the_modules_own_migrations(tmp_path):
    legacy = registry_lesson.LegacyMLP().state_dict()  # old key names: fc1, fc2
    migrated = registry_lesson.RenamedMLP()
    before = {k: v.clone() for k, v in migrated.state_dict().items()}
    basics_lesson.check_state_dict_fits(migrated, legacy, "legacy.pt")  # accepted
    assert all(torch.equal(before[k], v) for k, v in migrated.state_dict().items())  # untouched
    source = WithExtraState()
    source.calls = 7
    path = tmp_path / "extra.pt"
    torch.save(source.state_dict(), path)
    target = basics_lesson.load_weights(WithExtraState(), path)
    assert target.calls == 7
    with pytest.raises(basics_lesson.CheckpointLoadError, match="mis-shaped"):
        basics_lesson.check_state_dict_fits(SmallCNN(num_classes=10), SmallCNN().state_dict(),
                                            "four.pt")


def test_resume_into_a_folder_of_another_monitor_or_a_hostile_manifest_is_one_line(tmp_path):
    folder = tmp_path / "checkpoints"
    save_steps(CheckpointManager(folder, monitor="accuracy", mode="max"), [0.5])
    assert resume_error(tmp_path).startswith(f"error: {folder}")
    outside = tmp_path / "precious.txt"  # a hostile absolute path, to a file of this test
    outside.write_text("precious")
    tamper_manifest(folder, lambda data: data.update(monitor="val_loss", mode="min",
                                                     deleting=[str(outside)]))
    assert f"refuses the file name '{outside}'" in resume_error(tmp_path)
    assert outside.read_text() == "precious"


def test_written_files_follow_the_umask_and_a_read_only_folder_still_loads(tmp_path):
    import os
    import stat

    previous = os.umask(0o022)
    try:
        manager = CheckpointManager(tmp_path / "ckpt")
        path = manager.save({"w": torch.ones(2)}, step=1, epoch=1, metrics={"val_loss": 0.5})
        registry = registry_lesson.ModelRegistry(tmp_path / "registry")
        register(registry, 1)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's 0600
    version = tmp_path / "registry" / "m" / "1.0"
    assert stat.S_IMODE(version.stat().st_mode) == 0o755  # not mkdtemp's 0700
    assert stat.S_IMODE((version / "model.safetensors").stat().st_mode) == 0o644
    # A folder where the lock file cannot be created (read-only, or gone): a reader's
    # housekeeping attempt says "not now" instead of failing; a writer gets the OSError.
    lock = manager_lesson.WriterLock(tmp_path / "no-such-folder" / "writer.lock")
    assert lock.acquire(blocking=False) is False
    with pytest.raises(OSError):
        lock.acquire(blocking=True)
