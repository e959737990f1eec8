"""02's CheckpointManager killed at EVERY filesystem step of a save, as SQLite tests crash safety.

A child process (os.fork: no interpreter start-up) wraps the calls a save makes that change
the disk (open, write, pwrite, ftruncate, fsync, close, replace, rename, unlink, mkdir,
sendfile, copy_file_range, and the write/flush of every file object it writes through) and
kills itself with SIGKILL just before call number N; N runs over every step in turn (an open
to read changes nothing on disk, so it is not a step). After
each kill a new manager, in this process, runs the next writer's recovery and must load the
state from before the save or the one it wrote, bit for bit, never anything else, with the
files on disk equal to the manifest's entries. A KeyboardInterrupt at each step is injected
too, and the run goes on in-process: then nothing torn may verify either.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import shutil
import signal
import threading
import warnings

import pytest
import torch

from tests.conftest import load_script, open_descriptors
from tests.threads import own_threads

lesson = load_script("02_checkpoint_manager")
CheckpointManager = lesson.CheckpointManager
STEP_CALLS = ("open", "write", "pwrite", "ftruncate", "fsync", "replace", "rename", "unlink",
              "mkdir", "rmdir", "link", "symlink", "sendfile", "copy_file_range")
CHANGING = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC
FIXED_FILES = {"manifest.json", "writer.lock"}


class CountingFile:
    """A file object whose write() and flush() count as steps (torch.save writes via it)."""

    def __init__(self, handle, step):
        self._handle, self._step = handle, step

    def write(self, data):
        self._step("file.write")
        return self._handle.write(data)

    def flush(self):
        self._step("file.flush")
        return self._handle.flush()

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return self._handle.__exit__(*exc_info)


@contextlib.contextmanager
def faults(at, action):
    """Count every filesystem step; call ``action()`` just before step number ``at``."""
    originals = {name: getattr(os, name) for name in STEP_CALLS + ("fdopen",) if
                 hasattr(os, name)}
    count = [0]
    counting = threading.Lock()

    def step(name):
        if threading.current_thread() not in own:
            return
        with counting:
            count[0] += 1
            hit = count[0] == at
        if hit:
            action()

    def wrap(name):
        def wrapper(*args, **kwargs):
            if name != "open" or (args[1] if len(args) > 1 else kwargs["flags"]) & CHANGING:
                step(name)  # opening to read changes nothing on disk: not a step
            return originals[name](*args, **kwargs)
        return wrapper

    def fdopen(descriptor, mode="r", *args, **kwargs):
        handle = originals["fdopen"](descriptor, mode, *args, **kwargs)
        return CountingFile(handle, step) if "w" in mode or "a" in mode else handle

    # The session's own threads call these functions too while a test runs: only this
    # thread and the threads it starts count (tests/threads.py).
    with own_threads() as own:
        for name in originals:
            setattr(os, name, fdopen if name == "fdopen" else wrap(name))
        try:
            yield count
        finally:
            for name, original in originals.items():
                setattr(os, name, original)


def state(tag, step):
    """A tiny checkpoint whose bytes say which save wrote it."""
    return {"tag": tag, "step": step,
            "w": torch.randn(64, generator=torch.Generator().manual_seed(tag))}


def same(loaded, expected):
    """Bit-exact: the same tag and step, and the same bytes of the same dtype."""
    return (loaded["tag"] == expected["tag"] and loaded["step"] == expected["step"]
            and loaded["w"].dtype == expected["w"].dtype
            and loaded["w"].view(torch.int32).equal(expected["w"].view(torch.int32)))


# The save to enumerate: step 3 saved again under the SAME name (a mid-epoch save has
# val_loss NaN; a resumed run repeats the step), which must not overwrite the bytes the
# manifest vouches for; with keep_last=1 and save_top_k=1 it also retires two files, the
# old step 3 (replaced) and step 1 (dropped by retention), so a kill lands between them too.
SCENARIOS = {
    "same name": ([(1, 0.5, 1), (2, 0.4, 2), (3, math.nan, 3)], (3, math.nan, 4)),
}


def prepare(folder, scenario):
    saved, new = SCENARIOS[scenario]
    manager = CheckpointManager(folder, save_top_k=2, keep_last=2)
    for step, value, tag in saved:
        manager.save(state(tag, step), step=step, epoch=1, metrics={"val_loss": value})
    manager.close()
    step, value, tag = new
    return state(saved[-1][2], saved[-1][0]), state(tag, step), {
        tag: state(tag, step) for step, _, tag in saved + [new]}


def save_new(folder, scenario, async_save):
    step, value, tag = SCENARIOS[scenario][1]
    manager = CheckpointManager(folder, save_top_k=1, keep_last=1, async_save=async_save)
    try:
        manager.save(state(tag, step), step=step, epoch=1, metrics={"val_loss": value})
    finally:
        manager.close()


def check(folder, before, after, known):
    """The next writer's view: previous or new state, exactly; every entry intact; no
    file on disk that the manifest does not name. Returns "before" or "after"."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", lesson.CheckpointWarning)  # nothing torn is listed
        manager = CheckpointManager(folder, save_top_k=1, keep_last=1)
        entries = manager.list()
        for entry in entries:
            loaded = manager.load(entry.file).state
            assert same(loaded, known[loaded["tag"]]) and loaded["step"] == entry.step
        latest = manager.load_latest().state
    manager.close()
    assert sorted(os.listdir(folder)) == sorted({e.file for e in entries} | FIXED_FILES)
    assert same(latest, before) or same(latest, after), latest["tag"]
    return "after" if same(latest, after) else "before"


def count_steps(template, work, scenario, async_save):
    folder = work / "count"
    shutil.copytree(template, folder)
    with faults(0, lambda: None) as count:
        save_new(folder, scenario, async_save)
    shutil.rmtree(folder)
    return count[0]


def killed_child(folder, scenario, async_save, at):
    """Fork; the child saves and SIGKILLs itself before step ``at``. Returns its status."""
    gc.freeze()  # the child's garbage collector then leaves the parent's objects alone:
    pid = os.fork()  # far fewer copy-on-write page faults, a much cheaper child
    if pid == 0:  # the child: never returns into pytest
        try:
            kill = os.kill
            with faults(at, lambda: kill(os.getpid(), signal.SIGKILL)):
                save_new(folder, scenario, async_save)
            os._exit(0)
        except BaseException:  # noqa: BLE001 - any escape from the child is a failure
            os._exit(3)
    gc.unfreeze()
    return os.waitpid(pid, 0)[1]


@pytest.mark.parametrize(("scenario", "async_save"), [
    ("same name", False), ("same name", True)], ids=["sync", "async"])
def test_a_kill_at_every_filesystem_step_loses_nothing(tmp_path, scenario, async_save):
    template = tmp_path / "template"
    before, after, known = prepare(template, scenario)
    steps = count_steps(template, tmp_path, scenario, async_save)
    outcomes = []
    for at in range(1, steps + 1):
        folder = tmp_path / f"kill{at}"
        shutil.copytree(template, folder)
        status = killed_child(folder, scenario, async_save, at)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (at, status)
        outcomes.append(check(folder, before, after, known))
        shutil.rmtree(folder)
    print(f"\n  {scenario}, {'async' if async_save else 'sync'}: SIGKILL at each of {steps} "
          f"filesystem steps: {outcomes.count('before')} left the previous state, "
          f"{outcomes.count('after')} the new one, 0 anything else")
    assert steps >= 20 and "before" in outcomes and "after" in outcomes


# Sync only: a real KeyboardInterrupt lands in the main thread, and an async save's steps run
# in the background thread (its main-thread case, an interrupt inside wait(), has its own
# test below).
@pytest.mark.parametrize("async_save", [False], ids=["sync"])
def test_a_keyboard_interrupt_at_every_step_then_going_on_loses_nothing(tmp_path, async_save):
    template = tmp_path / "template"
    before, after, known = prepare(template, "same name")
    steps = count_steps(template, tmp_path, "same name", async_save)

    def interrupt():
        raise KeyboardInterrupt

    for at in range(1, steps + 1):
        folder = tmp_path / f"interrupt{at}"
        shutil.copytree(template, folder)
        try:
            with faults(at, interrupt):
                save_new(folder, "same name", async_save)
        except BaseException as err:  # noqa: BLE001 - torch.save's __exit__ may replace it
            assert isinstance(err, KeyboardInterrupt) or isinstance(
                err.__context__, KeyboardInterrupt), repr(err)
        check(folder, before, after, known)
        # ...and the run goes on: the next save in this process lands and verifies.
        with CheckpointManager(folder, save_top_k=1, keep_last=1) as manager:
            manager.save(state(9, 5), step=5, epoch=1, metrics={"val_loss": 0.1})
        assert check(folder, state(9, 5), state(9, 5), {**known, 9: state(9, 5)}) == "after"
        shutil.rmtree(folder)
    print(f"\n  {'async' if async_save else 'sync'}: KeyboardInterrupt at each of {steps} "
          "steps, then one more save: all intact")


def test_an_interrupt_inside_wait_never_lets_the_next_save_reuse_the_buffer(tmp_path):
    """The torn-checkpoint case: Ctrl-C while wait() blocks on an async write, then save().

    The Ctrl-C is raised where the signal's handler would raise it, inside Future.result()
    (a real SIGINT from a timer thread proved unreliable under load: nothing interrupted the
    main thread's wait). The write of step 1 is held until the next save() waits for it. A
    manager that forgot it after the interrupt fails the busy check; one that also reused the
    buffer that write still reads would leave step 2's weights in step 1's file (checked at
    the end)."""
    release = threading.Event()

    def slow_writer(obj, handle):
        release.wait(5)  # a fixed manager releases it at once; a broken one waits this long
        torch.save(obj, handle)

    weights = torch.full((4096,), 1.0)
    manager = CheckpointManager(tmp_path, async_save=True, keep_last=3, serialize=slow_writer)
    manager.save({"w": weights}, step=1, epoch=1, metrics={"val_loss": 0.5})
    writing = manager._background._in_flight

    class CtrlCOnce:
        """The Future of step 1's write, whose first result() is interrupted by Ctrl-C."""

        interrupted = False

        def result(self, timeout=None):
            if not self.interrupted:
                self.interrupted = True
                raise KeyboardInterrupt
            release.set()  # the next save waits for the write: now let it finish
            return writing.result(timeout)

        def done(self):
            return writing.done()

    manager._background._in_flight = CtrlCOnce()
    with pytest.raises(KeyboardInterrupt):
        manager.wait()
    assert manager._background.busy and not writing.done()  # step 1 is still being written
    weights.fill_(2.0)
    manager.save({"w": weights}, step=2, epoch=2, metrics={"val_loss": 0.4})
    manager.close()
    assert torch.equal(manager.load(1).state["w"], torch.full((4096,), 1.0))
    assert torch.equal(manager.load(2).state["w"], torch.full((4096,), 2.0))


def test_an_interrupt_inside_submit_never_lets_the_next_save_reuse_the_buffer(tmp_path):
    """Ctrl-C inside executor.submit, after the job is queued and before its Future is kept:
    the job still runs, so the next snapshot must not copy into the buffer it writes."""
    def slow_writer(obj, handle):
        threading.Event().wait(0.3)  # a slow disk: the write is still going on below
        torch.save(obj, handle)

    weights = torch.full((100_000,), 1.0)
    manager = CheckpointManager(tmp_path, async_save=True, keep_last=3, serialize=slow_writer)
    executor = manager._background._executor
    original = executor._adjust_thread_count

    def interrupted():  # the work item is already in the queue when this runs
        executor._adjust_thread_count = original
        original()
        raise KeyboardInterrupt

    executor._adjust_thread_count = interrupted
    with pytest.raises(KeyboardInterrupt):
        manager.save({"w": weights}, step=1, epoch=1, metrics={"val_loss": 0.5})
    weights.fill_(2.0)
    manager.save({"w": weights}, step=2, epoch=2, metrics={"val_loss": 0.4})
    manager.close()
    assert torch.equal(manager.load(1).state["w"], torch.full((100_000,), 1.0))
    assert torch.equal(manager.load(2).state["w"], torch.full((100_000,), 2.0))


def test_a_folder_without_its_manifest_keeps_every_file_and_resume_refuses(tmp_path):
    """Only what the journal accounts for is deleted: a lost manifest loses no checkpoint,
    nor a user's file that looks like one; --resume says so in one line instead of
    starting over."""
    folder = tmp_path / "checkpoints"
    with CheckpointManager(folder) as manager:
        for step in (1, 2):
            manager.save(state(step, step), step=step, epoch=1, metrics={"val_loss": 1 / step})
    (folder / "manifest.json").unlink()
    (folder / "my-notes-seq1.txt").write_text("precious")
    files = sorted(os.listdir(folder))
    CheckpointManager(folder).close()  # opened, recovery ran: nothing goes
    assert sorted(os.listdir(folder)) == files and len(files) == 4
    with pytest.raises(lesson.CheckpointError) as refused:
        lesson.load_for_resume(CheckpointManager(folder), True, print)
    message = str(refused.value)
    assert message.startswith(str(folder / "manifest.json")) and "\n" not in message
    assert sorted(os.listdir(folder)) == files


def test_a_quadratic_manifest_is_refused_promptly(tmp_path):
    """'\"\\' repeated: every quote starts a string that a backtracking scan runs to the
    end of the file; the scan must stay linear (SIGALRM only guards against a hang)."""
    (tmp_path / "manifest.json").write_text('"\\' * 100_000)  # 200 kB: minutes if quadratic
    refused_within(120, tmp_path, "manifest.json: not a valid")


def refused_within(seconds, folder, match):
    """``CheckpointManager(folder)`` raises CheckpointError matching ``match``; SIGALRM
    turns a hang into a failure after ``seconds`` (a guard, not a time assertion)."""
    def hung(*_):
        raise TimeoutError(f"CheckpointManager({folder}) still busy after {seconds} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        with pytest.raises(lesson.CheckpointError, match=match):
            CheckpointManager(folder)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_file_overwritten_in_place_during_a_load_is_never_returned(tmp_path, monkeypatch):
    """``cp`` onto a checkpoint while it loads: the checksum and torch.load may see two
    versions, so the load is refused (the file changed while it was read), never returned.
    The overwrite lands just before torch.load reads."""
    folder = tmp_path / "checkpoints"
    with CheckpointManager(folder) as manager:
        path = manager.save(state(1, 1), step=1, epoch=1, metrics={"val_loss": 0.5})
    with CheckpointManager(tmp_path / "elsewhere") as manager:  # the same name and layout
        other = manager.save(state(2, 1), step=1, epoch=1, metrics={"val_loss": 0.5})
    assert other.stat().st_size == path.stat().st_size
    real_load = torch.load

    def overwritten_first(*args, **kwargs):
        monkeypatch.setattr(torch, "load", real_load)
        with path.open("r+b") as handle:  # in place: the same inode, new bytes
            handle.write(other.read_bytes())
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", overwritten_first)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lesson.CheckpointWarning)
        loaded = CheckpointManager(folder).load_latest()
    assert loaded is None  # the only candidate changed under the load: nothing unverified


def test_a_write_between_the_checksum_and_torch_load_is_never_returned(tmp_path, monkeypatch):
    """The worst order: the checksum reads the old bytes (and matches), THEN the file is
    written in place, THEN torch.load reads the new ones. Only the identity check sees it."""
    import threading

    folder = tmp_path / "checkpoints"
    with CheckpointManager(folder) as manager:
        path = manager.save(state(1, 1), step=1, epoch=1, metrics={"val_loss": 0.5})
    with CheckpointManager(tmp_path / "elsewhere") as manager:
        other = manager.save(state(2, 1), step=1, epoch=1, metrics={"val_loss": 0.5})
    os.utime(path, ns=(10**18, 10**18))  # an old mtime: the overwrite's then surely differs
    checked = threading.Event()
    real_checksum, real_load = lesson.descriptor_checksum, torch.load

    def checksum_then_overwrite(*args):
        digest = real_checksum(*args)
        with path.open("r+b") as handle:  # in place: the same inode, new bytes
            handle.write(other.read_bytes())
        checked.set()
        return digest

    def load_after_the_overwrite(*args, **kwargs):
        checked.wait(60)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(lesson, "descriptor_checksum", checksum_then_overwrite)
    monkeypatch.setattr(torch, "load", load_after_the_overwrite)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lesson.CheckpointWarning)
        loaded = CheckpointManager(folder).load_latest()
    assert checked.is_set() and loaded is None


@pytest.mark.parametrize("plant", ["symlink", "FIFO", "hard link"])
def test_a_candidate_that_is_not_a_plain_file_is_skipped_not_raised(tmp_path, plant):
    """A symlink or a FIFO where the latest checkpoint was: skipped with a warning like any
    damage, the one before it loads; a hard link (a cp -al backup) is read as it is."""
    with CheckpointManager(tmp_path, keep_last=2) as manager:
        manager.save(state(1, 1), step=1, epoch=1, metrics={"val_loss": 0.5})
        latest = manager.save(state(2, 2), step=2, epoch=1, metrics={"val_loss": 0.6})
    if plant == "hard link":
        os.link(latest, tmp_path / "backup.pt")
    else:
        latest.unlink()
        if plant == "symlink":
            latest.symlink_to(next(tmp_path.glob("*-seq1.pt")))
        else:
            os.mkfifo(latest)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", lesson.CheckpointWarning)
        loaded = CheckpointManager(tmp_path).load_latest()
    expected = state(2, 2) if plant == "hard link" else state(1, 1)
    assert loaded is not None and same(loaded.state, expected)
    assert len(caught) == (0 if plant == "hard link" else 1)


def test_two_writers_saving_the_same_step_keep_each_others_entries(tmp_path):
    """Two processes (here two managers) share a folder and step numbers: neither replaces
    the other's entry; a manager saving a step again replaces only its own."""
    first, second = CheckpointManager(tmp_path, keep_last=5), CheckpointManager(tmp_path,
                                                                                keep_last=5)
    first.save(state(1, 1), step=1, epoch=1, metrics={"val_loss": 0.5})
    second.save(state(2, 1), step=1, epoch=1, metrics={"val_loss": 0.6})
    assert len(first.list()) == 2
    assert sorted(same(first.load(e.file).state, state(tag, 1)) for e, tag in
                  zip(first.list(), (1, 2), strict=True)) == [True, True]
    second.save(state(3, 1), step=1, epoch=1, metrics={"val_loss": 0.7})  # its own again
    first.close()
    second.close()
    tags = [first.load(e.file).state["tag"] for e in first.list()]
    assert tags == [1, 3] and same(first.load(1).state, state(3, 1))  # load(step): newest


def test_atomic_write_switches_inodes_instead_of_rewriting_the_file(tmp_path):
    """os.replace gives the name a NEW file; a reader holding the old one keeps its bytes.
    Copying into place (or writing in place) would change the bytes under the reader."""
    path = tmp_path / "data.bin"
    lesson.atomic_write(path, lambda handle: handle.write(b"old" * 1000))
    with path.open("rb") as reader:
        inode = os.fstat(reader.fileno()).st_ino
        lesson.atomic_write(path, lambda handle: handle.write(b"new" * 1000))
        assert reader.read() == b"old" * 1000
    assert path.stat().st_ino != inode and path.read_bytes() == b"new" * 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.bin"]


# ---- a hostile folder: every odd value is one CheckpointError, nothing outside changes -----

def outside_snapshot(root, folder):
    """Every file under ``root`` outside ``folder``, with its bytes (symlinks as targets)."""
    return {str(p): (os.readlink(p) if p.is_symlink() else p.read_bytes())
            for p in root.rglob("*") if folder not in p.parents and p != folder
            and (p.is_symlink() or p.is_file())}


@pytest.mark.parametrize("plant", ["lock symlink", "lock hard link", "manifest symlink",
                                   "partial symlink", "orphan symlink"])
def test_nothing_outside_the_folder_is_created_written_or_deleted(tmp_path, plant):
    folder = tmp_path / "run" / "checkpoints"
    with CheckpointManager(folder) as manager:
        manager.save(state(1, 1), step=1, epoch=1, metrics={"val_loss": 0.5})
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("precious")
    missing = tmp_path / "not-there.txt"  # a link to a missing file must not create it
    target = {"lock symlink": missing, "lock hard link": sentinel}.get(plant, sentinel)
    name = {"lock symlink": "writer.lock", "lock hard link": "writer.lock",
            "manifest symlink": "manifest.json",
            "partial symlink": "epoch009-step000009-val_loss0.1000-seq9.pt.0a1b2c3d4e5f.partial",
            "orphan symlink": "epoch009-step000009-val_loss0.1000-seq9.pt"}[plant]
    if plant in ("partial symlink", "orphan symlink"):  # journaled, as a crashed save leaves it
        manifest = folder / "manifest.json"
        manifest.write_text(manifest.read_text().replace(
            '"writing": []', '"writing": ["epoch009-step000009-val_loss0.1000-seq9.pt"]'))
    (folder / name).unlink(missing_ok=True)
    if plant == "lock hard link":
        os.link(sentinel, folder / name)
    else:
        (folder / name).symlink_to(target)
    before = outside_snapshot(tmp_path, folder)
    try:
        with CheckpointManager(folder) as manager:  # recovery runs here...
            manager.save(state(2, 2), step=2, epoch=1, metrics={"val_loss": 0.4})  # ...a save
            assert same(manager.load_latest().state, state(2, 2))
        refused = ""
    except lesson.CheckpointError as err:
        refused = str(err)
    assert outside_snapshot(tmp_path, folder) == before and not missing.exists()
    if plant.startswith(("lock", "manifest")):  # refused, with one line naming the file
        assert refused.startswith(str(folder / name)) and "\n" not in refused
    elif plant == "orphan symlink":  # a journaled name that leads outside: hostile, refused
        assert refused.startswith(str(folder / "manifest.json")) and "\n" not in refused
    else:  # recovery removed the link itself, never what it points to
        assert refused == "" and not (folder / name).is_symlink()


def deep(depth):
    return "[" * depth + "]" * depth


HOSTILE_RECORDS = {
    "checksum an int": ("checkpoints[0].checksum", lambda d: d["checkpoints"][0].update(
        checksum=12345)),
    "seq a string": ("checkpoints[0].seq", lambda d: d["checkpoints"][0].update(seq="7")),
    "metrics a list": ("checkpoints[0].metrics", lambda d: d["checkpoints"][0].update(
        metrics=[1.0])),
    "bytes 10**400": ("checkpoints[0].bytes", lambda d: d["checkpoints"][0].update(
        bytes=10**400)),
    "step a bool": ("checkpoints[0].step", lambda d: d["checkpoints"][0].update(step=True)),
    "step negative": ("checkpoints[0].step", lambda d: d["checkpoints"][0].update(step=-1)),
    "file None": ("checkpoints[0].file", lambda d: d["checkpoints"][0].update(file=None)),
    "metric a string": ("checkpoints[0].metrics.val_loss", lambda d: d["checkpoints"][0][
        "metrics"].update(val_loss="0.5")),
    "no monitored metric": ("checkpoints[0].metrics", lambda d: d["checkpoints"][0].update(
        metrics={})),
    "an unknown field": ("checkpoints[0].extra", lambda d: d["checkpoints"][0].update(
        extra=1)),
    "a missing field": ("checkpoints[0].checksum", lambda d: d["checkpoints"][0].pop(
        "checksum")),
    "entry a string": ("checkpoints[0]", lambda d: d.update(checkpoints=["x"])),
    "checkpoints a dict": ("checkpoints", lambda d: d.update(checkpoints={})),
    "deleting a string": ("deleting", lambda d: d.update(deleting="x.pt")),
    "nested 100,000 deep": ("nested deeper", lambda d: d.update(checkpoints=deep(100_000))),
    "metric 10**400": ("checkpoints[0].metrics.val_loss", lambda d: d["checkpoints"][0][
        "metrics"].update(val_loss=10**400)),
    "file 300 chars": ("checkpoints[0].file", lambda d: d["checkpoints"][0].update(
        file="x" * 300)),
    "deleting 300 chars": ("deleting[0]", lambda d: d.update(deleting=["x" * 300])),
    "file the manifest": ("checkpoints[0].file", lambda d: d["checkpoints"][0].update(
        file="manifest.json")),
    "file the lock": ("checkpoints[0].file", lambda d: d["checkpoints"][0].update(
        file="writer.lock")),
    "deleting the lock": ("deleting[0]", lambda d: d.update(deleting=["writer.lock"])),
    "writing a temporary": ("writing[0]", lambda d: d.update(writing=["a.pt.partial"])),
}


@pytest.mark.parametrize("case", list(HOSTILE_RECORDS))
def test_every_hostile_manifest_value_is_one_error_naming_file_and_field(tmp_path, case):
    import json

    with CheckpointManager(tmp_path) as manager:
        manager.save(state(1, 1), step=1, epoch=1, metrics={"val_loss": 0.5})
    field, change = HOSTILE_RECORDS[case]
    data = json.loads((tmp_path / "manifest.json").read_text())
    change(data)
    text = json.dumps(data)
    if case.startswith("nested"):
        text = text.replace(json.dumps(deep(100_000)), deep(100_000))
    (tmp_path / "manifest.json").write_text(text)
    files = sorted(os.listdir(tmp_path))
    with pytest.raises(lesson.CheckpointError) as refused:
        CheckpointManager(tmp_path)
    message = str(refused.value)
    assert message.startswith(f"{tmp_path / 'manifest.json'}: ") and field in message
    assert "\n" not in message and sorted(os.listdir(tmp_path)) == files


def test_a_directory_journaled_for_deletion_and_another_monitor_are_one_error(tmp_path):
    import json

    with CheckpointManager(tmp_path) as manager:
        manager.save(state(1, 1), step=1, epoch=1, metrics={"val_loss": 0.5})
    (tmp_path / "sub").mkdir()
    data = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps(data | {"deleting": ["sub"]}))
    with pytest.raises(lesson.CheckpointError, match="manifest.json: cannot delete 'sub'"):
        CheckpointManager(tmp_path)
    assert (tmp_path / "sub").is_dir()
    with pytest.raises(lesson.CheckpointError) as refused:  # and still a ValueError
        CheckpointManager(tmp_path, monitor="accuracy", mode="max")
    assert isinstance(refused.value, ValueError)


def test_fuzzed_manifest_values_only_ever_raise_checkpoint_error(tmp_path):
    """Any JSON value in any field of a record (or the journals): the constructor, inspect,
    best and load_latest either work or raise CheckpointError, never anything raw."""
    import json

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    with CheckpointManager(tmp_path, keep_last=3) as manager:
        for step in (1, 2, 3):
            manager.save(state(step, step), step=step, epoch=1, metrics={"val_loss": 1 / step})
    base = json.loads((tmp_path / "manifest.json").read_text())
    originals = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.suffix == ".pt"}
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 10**400),
                        st.floats(), st.text(max_size=300))
    values = st.recursive(scalars, lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
        max_leaves=6)
    fields = [*base["checkpoints"][0], "metrics.val_loss", "metrics.other", "deleting",
              "writing", "monitor"]
    examples = []

    @settings(max_examples=150, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(fields), values, st.integers(0, 2))
    def attack(field, value, index):
        data = json.loads(json.dumps(base))
        record = data["checkpoints"][index]
        if field.startswith("metrics."):
            record["metrics"][field.removeprefix("metrics.")] = value
        elif field in ("deleting", "writing", "monitor"):
            data[field] = value
        else:
            record[field] = value
        (tmp_path / "manifest.json").write_text(json.dumps(data))
        examples.append(field)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", lesson.CheckpointWarning)
                with CheckpointManager(tmp_path) as reader:
                    reader.inspect()
                    _ = reader.best
                    reader.load_latest()
        except lesson.CheckpointError:
            pass
        finally:  # put back what recovery may have deleted, for the next example
            for name, content in originals.items():
                if not (tmp_path / name).exists():
                    (tmp_path / name).write_bytes(content)

    attack()
    print(f"\n  {len(examples)} fuzzed manifests: only CheckpointError came out")
    assert len(examples) >= 100


@pytest.mark.parametrize("kind", ["directory", "FIFO", "binary"])
def test_a_manifest_that_is_not_a_json_file_is_refused_without_blocking(tmp_path, kind):
    manifest = tmp_path / "manifest.json"
    if kind == "directory":
        manifest.mkdir()
    elif kind == "FIFO":
        os.mkfifo(manifest)
    else:
        manifest.write_bytes(b"\xff\xfe{")
    refused_within(20, tmp_path, "manifest.json: ")  # a blocking open() would hang here


# ---- --resume checks the state it loaded before using it --------------------------------

@pytest.fixture(scope="module")
def mid_epoch_state(tmp_path_factory):
    """A real mid-epoch checkpoint of the lesson's training loop (after step 3 of 6)."""
    folder = tmp_path_factory.mktemp("good") / "checkpoints"
    with pytest.raises(lesson.SimulatedCrash):
        lesson.train(folder, epochs=1, seed=0, device=torch.device("cpu"),
                     saves=lesson.SaveSchedule(steps=3), crash_at_step=3, log=lambda _: None)
    return CheckpointManager(folder).load_latest().state


def forge(state, case):
    import copy

    state = copy.deepcopy(state)
    if case == "a list":
        return "(the checkpoint)", [state]
    changes = {
        "epoch a string": ("epoch", lambda s: s.update(epoch="1")),
        "a tensor of the wrong shape": ("model.head.1.weight", lambda s: s["model"].update(
            {"head.1.weight": torch.zeros(3, 3)})),
        "a missing key": ("optimizer", lambda s: s.pop("optimizer")),
        "torch RNG state too short": ("rng.torch", lambda s: s["rng"].update(
            torch=s["rng"]["torch"][:-8])),
        "NumPy state too short": ("rng.numpy", lambda s: s["rng"]["numpy"][1].pop()),
        "python state wrong": ("rng.python", lambda s: s["rng"].update(python=[3, [1], None])),
        "data position past the epoch": ("data.position", lambda s: s["data"].update(
            position=99)),
        "data position a string": ("data.position", lambda s: s["data"].update(position="3")),
        "saved with CUDA mixed precision": ("config.device/amp", lambda s: s["config"].update(
            device="cuda", amp=True)),
        "optimizer groups wrong": ("optimizer.param_groups", lambda s: s["optimizer"].update(
            param_groups=[])),
        "a model key an int": ("model", lambda s: s["model"].update(
            {0: s["model"].pop(next(iter(s["model"])))})),
        "a momentum buffer of the wrong shape": ("optimizer.state.0.momentum_buffer",
                                                 lambda s: s["optimizer"]["state"][0].update(
                                                     momentum_buffer=torch.zeros(3))),
        "lr a string": ("optimizer.param_groups[0].lr", lambda s: s["optimizer"][
            "param_groups"][0].update(lr="x")),
        "scheduler last_epoch a string": ("scheduler.last_epoch", lambda s: s[
            "scheduler"].update(last_epoch="x")),
        "history longer than epoch": ("history", lambda s: s.update(history=[{}])),
        "loader state empty": ("data.loader", lambda s: s["data"].update(loader={})),
        "loader count beyond the position": ("data.loader", lambda s: s["data"]["loader"].update(
            _num_yielded=10**9)),
        "seen negative": ("data.seen", lambda s: s["data"].update(seen=-5)),
        "step losses strings": ("data.step_losses", lambda s: s["data"].update(
            step_losses=["x"] * 3)),
    }
    field, change = changes[case]
    change(state)
    return field, state


@pytest.mark.parametrize("case", [
    "a list", "epoch a string", "a tensor of the wrong shape", "a missing key",
    "torch RNG state too short", "NumPy state too short", "python state wrong",
    "data position past the epoch", "data position a string",
    "saved with CUDA mixed precision", "optimizer groups wrong", "a model key an int",
    "a momentum buffer of the wrong shape", "lr a string", "scheduler last_epoch a string",
    "history longer than epoch", "loader state empty", "loader count beyond the position",
    "seen negative", "step losses strings"])
def test_resume_refuses_a_state_that_does_not_fit_with_one_line(tmp_path, mid_epoch_state,
                                                                 case):
    field, forged = forge(mid_epoch_state, case)
    folder = tmp_path / "checkpoints"
    with CheckpointManager(folder) as manager:  # CRC-matching: the manifest vouches for it
        path = manager.save(forged, step=3, epoch=0, metrics={"val_loss": math.nan},
                            position=3)
    with pytest.raises(SystemExit) as exited:
        lesson.main(["--device", "cpu", "--out-dir", str(tmp_path), "--resume", "--train-only"])
    message = exited.value.code
    assert isinstance(message, str) and message.startswith(f"error: {path}: field ")
    assert f"'{field}'" in message and "\n" not in message and "Traceback" not in message


@pytest.mark.parametrize("damage", ["missing", "symlink", "FIFO", "grown", "flipped"])
def test_verify_names_every_problem_and_leaks_no_descriptor(tmp_path, damage):
    """verify() is what --verify and the damaged-file fallback ask: None only for a file that
    is exactly the one the manifest vouches for; every other case is a reason, and no open
    descriptor is left behind (the verify runs on every candidate of every load)."""
    with CheckpointManager(tmp_path / "c") as manager:
        path = manager.save(state(1, 1), step=1, epoch=1, metrics={"val_loss": 0.5})
        entry = manager.list()[0]
        assert manager.verify(entry) is None
        before = open_descriptors(tmp_path)
        if damage == "missing":
            path.unlink()
        elif damage == "symlink":
            path.unlink()
            (path.parent / "beside.pt").write_bytes(b"x")  # inside: a link out is refused
            path.symlink_to(path.parent / "beside.pt")
        elif damage == "FIFO":
            path.unlink()
            os.mkfifo(path)
        elif damage == "grown":
            with path.open("ab") as handle:
                handle.write(b"\0")
        else:
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 1
            path.write_bytes(bytes(data))
        problem = manager.verify(entry)
        assert isinstance(problem, str) and problem, damage
        assert open_descriptors(tmp_path) == before


@pytest.mark.parametrize("journal", ["deleting", "writing"])
def test_a_journal_that_names_a_live_checkpoint_or_a_users_file_deletes_nothing(tmp_path,
                                                                                journal):
    """Recovery deletes what the journals name: a manifest whose journal names a checkpoint
    it also lists (or, for "writing", a file no save makes) is refused, and nothing goes."""
    with CheckpointManager(tmp_path) as manager:
        latest = manager.save(state(1, 1), step=1, epoch=1, metrics={"val_loss": 0.5})
    (tmp_path / "NOTES.txt").write_text("mine")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    for names in ([latest.name], ["NOTES.txt"]) if journal == "writing" else ([latest.name],):
        manifest[journal] = names
        (tmp_path / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(lesson.CheckpointError, match=journal):
            CheckpointManager(tmp_path)
        assert latest.exists() and (tmp_path / "NOTES.txt").read_text() == "mine"


def test_a_save_never_takes_the_name_of_a_file_already_on_disk(tmp_path):
    """A stray file with the very name the next save would use (a checkpoint left beside a
    manifest restored from a backup) is neither overwritten nor deleted."""
    with CheckpointManager(tmp_path) as manager:
        manager.save(state(1, 1), step=1, epoch=1, metrics={"val_loss": 0.5})
        stray = tmp_path / manager._name({"step": 2, "epoch": 1, "metrics": {"val_loss": 0.4}},
                                         2)
        stray.write_bytes(b"someone's file")
        path = manager.save(state(2, 1), step=2, epoch=1, metrics={"val_loss": 0.4})
    assert path != stray and stray.read_bytes() == b"someone's file"
