"""02 atomic_write: the order that makes a write durable, seen by spying on the os calls.

A crash test cannot see a missing fsync (the page cache survives a SIGKILL; only a power cut
loses it), so these tests record the calls instead: the temporary file's bytes are flushed
and fsynced BEFORE os.replace switches the name, and the folder is fsynced AFTER it. They are
the tests that catch the mutants `handle.flush()`, `os.fsync(...)` or `fsync_directory(...)`
removed (tests/mutation.py).
"""

from __future__ import annotations

import os
import stat
import threading
import zlib

from tests.conftest import load_script

manager = load_script("02_checkpoint_manager")


def record_calls(monkeypatch) -> list[tuple[str, str]]:
    """Wrap os.fsync and os.replace; each call is logged as (call, what it was given)."""
    calls: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace
    test = threading.current_thread()  # the session's background threads call them too

    def spy_fsync(descriptor: int) -> None:
        if threading.current_thread() is test:
            kind = "folder" if stat.S_ISDIR(os.fstat(descriptor).st_mode) else "file"
            size = os.fstat(descriptor).st_size
            calls.append(("fsync", f"{kind}:{size}"))
        fsync(descriptor)

    def spy_replace(source, destination) -> None:
        if threading.current_thread() is test:
            calls.append(("replace", os.path.basename(destination)))
        replace(source, destination)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)
    return calls


def test_atomic_write_flushes_and_fsyncs_the_file_before_the_switch_and_the_folder_after(
        tmp_path, monkeypatch):
    calls = record_calls(monkeypatch)
    payload = b"twelve bytes"  # small: it stays in the file object's buffer until a flush
    digest = manager.atomic_write(tmp_path / "x.bin", lambda handle: handle.write(payload))
    # The file's fsync sees all its bytes (flush came first), then the switch, then the folder.
    assert calls == [("fsync", f"file:{len(payload)}"), ("replace", "x.bin"),
                     ("fsync", f"folder:{os.stat(tmp_path).st_size}")]
    # The checksum is of what was written, not of an empty, still-buffered file.
    assert digest == f"crc32:{zlib.crc32(payload):08x}"
    assert (tmp_path / "x.bin").read_bytes() == payload
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_a_failed_write_never_switches_and_leaves_no_temporary(tmp_path, monkeypatch):
    (tmp_path / "x.bin").write_bytes(b"old")
    calls = record_calls(monkeypatch)

    def fail(handle) -> None:
        handle.write(b"half")
        raise OSError("disk full")

    try:
        manager.atomic_write(tmp_path / "x.bin", fail)
    except OSError as error:
        assert "disk full" in str(error)
    else:
        raise AssertionError("the write's error was swallowed")
    assert calls == []  # no fsync of half a file, no switch
    assert (tmp_path / "x.bin").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]
