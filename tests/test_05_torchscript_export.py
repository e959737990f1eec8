"""Unit tests of 05's pieces: trace vs script divergence, torch.export failure and fix."""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import os
import signal
import subprocess
import threading
import warnings
from pathlib import Path

import pytest
import torch

from common.run import Run, make_parser
from tests.conftest import load_script

lesson = load_script("05_torchscript_export")


def test_tracing_bakes_in_one_branch_and_scripting_keeps_both():
    gate = lesson.SignGate()
    positive, negative = torch.rand(3, 8) + 0.1, -torch.rand(3, 8) - 0.1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(gate, positive)
        scripted = torch.jit.script(gate)
    assert any(issubclass(w.category, torch.jit.TracerWarning) for w in caught)
    assert torch.equal(traced(positive), gate(positive))
    assert not torch.allclose(traced(negative), gate(negative))  # silently wrong
    assert torch.equal(traced(negative), negative * 2)  # the positive branch, baked in
    assert torch.equal(scripted(negative), gate(negative))
    assert torch.equal(scripted(positive), gate(positive))


def test_export_rejects_value_dependent_if_and_accepts_torch_cond(capsys):
    with pytest.raises(Exception, match="data-dependent"):
        torch.export.export(lesson.SignGate(), (torch.rand(4, 8),))
    program = torch.export.export(lesson.SignGateCond(), (torch.rand(4, 8),))
    for sign in (1.0, -1.0):
        inputs = sign * (torch.rand(4, 8) + 0.1)
        assert torch.equal(program.module()(inputs), lesson.SignGate()(inputs))


def test_jit_deprecation_filter_is_narrow():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with lesson.jit_deprecation_filtered():
            torch.jit.script(lesson.SignGate())
            warnings.warn("something else is deprecated", FutureWarning, stacklevel=1)
        inside = [str(w.message) for w in caught]
        torch.jit.script(lesson.SignGate())  # outside the block the notice shows again
    assert inside == ["something else is deprecated"]
    assert any("torch.jit.script` is deprecated" in str(w.message) for w in caught[1:])


def test_native_stderr_captured_collects_what_c_code_writes_to_fd_2():
    with lesson.native_stderr_captured() as lines:
        os.write(2, b"from C: first\nfrom C: second\n")
    assert lines == ["from C: first", "from C: second"]
    with lesson.native_stderr_captured() as lines:  # the descriptor was put back and works
        os.write(2, b"again\n")
    assert lines == ["again"]


def eager_reference(out_dir: Path) -> torch.nn.Module:
    """The trained model as eager ATen operations: section 3's ExportedProgram, unlowered."""
    return torch.export.load(out_dir / "exported_program.pt2").module()


def inputs_at(out_dir: Path, batch: int) -> torch.Tensor:
    example = torch.load(out_dir / "example_input.pt", map_location="cpu", weights_only=True)
    return torch.cat([example] * 4)[:batch]


@pytest.mark.skipif(lesson.find_cxx_compiler() is None,
                    reason="no C++ compiler (g++/clang++) on PATH: the C++ loader cannot be built")
def test_cpp_loader_runs_the_scripts_files_at_batch_1_and_above_the_example(default_run,
                                                                             tmp_path):
    run = default_run("05_torchscript_export")
    assert run.returncode == 0, run.stderr[-3000:]
    out, binary = run.out_dir, run.out_dir / "cpp" / "load_model"
    reference = eager_reference(out)
    for batch in (1, 11):  # the export's example had 4
        inputs = inputs_at(out, batch)
        from_script, from_package = lesson.run_cpp_loader(
            binary, out / "torchscript_frozen.pt", out / "model_aoti.pt2", inputs, "cpu", tmp_path)
        expected = reference(inputs)
        assert from_script.shape == from_package.shape == (batch, 4)
        torch.testing.assert_close(from_script, expected, rtol=0, atol=1e-4)
        torch.testing.assert_close(from_package, expected, rtol=0, atol=1e-4)


@pytest.mark.skipif(lesson.find_cxx_compiler() is None,
                    reason="no C++ compiler (g++/clang++) on PATH: the C++ loader cannot be built")
def test_cpp_loader_reports_a_truncated_file_by_name(default_run, tmp_path):
    out = default_run("05_torchscript_export").out_dir
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((out / "torchscript_frozen.pt").read_bytes()[:5000])
    given = [truncated, out / "model_aoti.pt2", out / "torchscript_frozen.pt"]
    before = {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in given}
    # The program's own one-line message: the step, the file, the cause; no C++ stack trace.
    with pytest.raises(RuntimeError, match=r"exited with 1: load_model: running the "
                       r"TorchScript file \S*truncated\.pt: PytorchStreamReader failed"):
        lesson.run_cpp_loader(out / "cpp" / "load_model", truncated, out / "model_aoti.pt2",
                              inputs_at(out, 2), "cpu", tmp_path)
    # run_cpp_loader keeps the first line only: run the program again and read ALL its stderr.
    completed = subprocess.run(
        [str(out / "cpp" / "load_model"), str(truncated), str(out / "model_aoti.pt2"),
         str(tmp_path / "input.pt"), str(tmp_path / "output.pt"), "cpu"],
        capture_output=True, text=True, timeout=300, check=False)
    assert completed.returncode == 1 and completed.stdout == ""
    assert completed.stderr.startswith("load_model: running the TorchScript file ")
    assert completed.stderr.count("\n") == 1 and completed.stderr.endswith("\n"), \
        completed.stderr[:3000]  # one line: no "Exception raised from", no "frame #0"
    assert not (tmp_path / "output.pt").exists()
    after = {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in given}
    assert after == before  # the files it was given, and the original, are untouched


def test_cpp_build_failure_names_the_source_and_leaves_no_binary(tmp_path):
    fake = tmp_path / "fake-g++"  # a "compiler" that fails like a real one
    fake.write_text("#!/bin/sh\necho 'load_model.cpp:1:1: error: C++20 required' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(RuntimeError, match=r"could not build .*load_model\.cpp.*C\+\+20"):
        lesson.build_cpp_loader(tmp_path, str(fake))
    assert not (tmp_path / "load_model").exists()
    assert "C++20 required" in (tmp_path / "build.log").read_text()


def test_build_once_copies_the_same_inputs_and_rebuilds_for_new_ones(tmp_path):
    cache, target, builds = tmp_path / "cache", tmp_path / "out" / "thing.pt2", []
    target.parent.mkdir()

    def build(content):
        def write(partial):
            assert partial.suffix == ".pt2" and partial.parent == target.parent
            builds.append(content)
            partial.write_bytes(content)
        return write

    assert lesson.build_once(cache, ["program", b"v1"], target, build(b"first")) >= 0.0
    assert lesson.build_once(cache, ["program", b"v1"], target, build(b"other")) is None
    assert target.read_bytes() == b"first" and builds == [b"first"]  # copied, not built
    assert lesson.build_once(cache, ["progra", b"mv1"], target, build(b"second")) is not None
    assert target.read_bytes() == b"second"  # another key (length-prefixed parts): built

    def broken(partial):
        partial.write_bytes(b"half")
        raise RuntimeError("compiler crashed")

    entries = sorted(cache.iterdir())
    with pytest.raises(RuntimeError, match="compiler crashed"):
        lesson.build_once(cache, ["new"], target, broken)
    assert target.read_bytes() == b"second"  # the previous result is untouched
    assert sorted(cache.iterdir()) == entries  # nothing kept from the failed build
    assert [p.name for p in target.parent.iterdir()] == ["thing.pt2"]  # no partial left
    assert lesson.build_once(None, ["program", b"v1"], target, build(b"third")) is not None

    def program(partial):  # a compiler's output is executable; its copies must be too
        partial.write_bytes(b"#!/bin/sh\n")
        partial.chmod(0o755)

    other = tmp_path / "out2" / "tool"
    other.parent.mkdir()
    for folder in (target.parent, other.parent):  # built, then copied into a fresh folder
        lesson.build_once(cache, ["tool"], folder / "tool", program)
        assert os.access(folder / "tool", os.X_OK)


@pytest.mark.parametrize("value", [None, "", "relative/cache", "absolute"])
def test_compile_cache_is_inside_the_folder_inductor_uses(tmp_path, monkeypatch, value):
    """The script's build products land in Inductor's cache folder whatever the variable holds:
    unset or empty (the out-dir's), relative (to the working folder) or absolute (yours)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    monkeypatch.chdir(tmp_path)
    if value is None:
        monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    else:
        mine = str(tmp_path / "mine") if value == "absolute" else value
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", mine)
    lesson.keep_compiler_caches_in(tmp_path / "out" / "inductor_cache")
    expected = {"relative/cache": tmp_path / "relative" / "cache",
                "absolute": tmp_path / "mine"}.get(value, tmp_path / "out" / "inductor_cache")
    assert lesson.compile_cache("aoti_packages") == expected / "aoti_packages"
    assert Path(cache_dir()) == expected  # Inductor's own reading of the variable


def test_build_once_never_serves_a_torn_or_linked_entry_and_two_builders_both_land(tmp_path):
    cache, target = tmp_path / "cache", tmp_path / "out" / "thing.pt2"
    target.parent.mkdir()
    assert lesson.build_once(cache, ["k"], target, lambda p: p.write_bytes(b"good" * 1000))
    (entry,) = [p for p in cache.iterdir() if p.suffix == ".pt2"]
    entry.write_bytes(b"good")  # torn (a power cut before the hash was written, an edit)
    assert lesson.build_once(cache, ["k"], target, lambda p: p.write_bytes(b"new")) is not None
    assert target.read_bytes() == b"new" and lesson.cache_hit(entry)  # rebuilt and re-kept
    outside = tmp_path / "outside.pt2"
    outside.write_bytes(b"new")
    entry.unlink()
    entry.symlink_to(outside)  # a link with the right bytes is still not an entry
    assert lesson.build_once(cache, ["k"], target, lambda p: p.write_bytes(b"third")) is not None
    assert target.read_bytes() == b"third" and outside.read_bytes() == b"new"

    both_inside = threading.Barrier(2, timeout=60)

    def slow(partial):  # two threads build one key at once: unique temporary names
        both_inside.wait()
        partial.write_bytes(b"same" * 100_000)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: lesson.build_once(cache, ["t"], target, slow), range(2)))
    assert all(result is not None for result in results)
    assert target.read_bytes() == b"same" * 100_000
    assert [p.name for p in target.parent.iterdir()] == ["thing.pt2"]


def test_a_build_killed_midway_leaves_a_temporary_the_next_build_deletes(tmp_path):
    """kill -9 inside a build leaves its temporary (no finally runs); the next build of the
    same target deletes it, and leaves alone the temporary of a builder still running."""
    target = tmp_path / "out" / "thing.pt2"
    target.parent.mkdir()
    ready_read, ready_write = os.pipe()
    go_read, go_write = os.pipe()

    def builder(then):  # a forked child: builds, writes one byte, then runs ``then``
        def build(partial):
            partial.write_bytes(b"half")
            os.write(ready_write, b"x")
            then()
        pid = os.fork()
        if pid == 0:
            try:
                lesson.build_once(None, ["k"], target, build)
            finally:
                os.write(ready_write, b"!")  # (only read if the build never began)
                os._exit(0)
        assert os.read(ready_read, 1) == b"x"  # its temporary exists now
        return pid

    def temporaries():
        return sorted(p.name for p in target.parent.iterdir() if p.name != "thing.pt2")

    killed = builder(lambda: os.kill(os.getpid(), signal.SIGKILL))
    assert os.WTERMSIG(os.waitpid(killed, 0)[1]) == signal.SIGKILL
    (left,) = temporaries()
    assert left.startswith(f".thing.{killed}.") and ".partial" in left  # the kill's leftover
    running = builder(lambda: os.read(go_read, 1))  # blocks inside its build
    try:
        (mine,) = temporaries()  # this build's start deleted the dead one's
        assert mine.startswith(f".thing.{running}.")
        assert lesson.build_once(None, ["k"], target, lambda p: p.write_bytes(b"whole")) >= 0
        assert temporaries() == [mine]  # a running builder's temporary stays
        os.write(go_write, b"x")
        assert os.waitpid(running, 0)[1] == 0
        assert [p.name for p in target.parent.iterdir()] == ["thing.pt2"]
    finally:
        with contextlib.suppress(ChildProcessError, ProcessLookupError):
            os.kill(running, signal.SIGKILL)
            os.waitpid(running, 0)
        for descriptor in (ready_read, ready_write, go_read, go_write):
            os.close(descriptor)


def test_dead_partials_removal_keeps_what_is_not_a_dead_temporary_and_never_raises(
        tmp_path, monkeypatch):
    """Only plain files named as a temporary of the same target, whose process is gone, go;
    other targets' files, odd names, links, folders and FIFOs stay, and nothing raises."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = gone.pid
    target = tmp_path / "thing.pt2"
    doomed = [f".thing.{dead}.ab_12.partial.pt2", f".thing.{dead}.cd.partial.pt2.partial"]
    kept = [f".thing.{os.getpid()}.ab.partial.pt2",  # this process (any thread) runs
            f".thing.{dead}.x.{os.getpid()}.y.partial.pt2",  # thing.<dead>.x.pt2's, running
            ".thing.\u00b2.ab.partial.pt2",  # isdigit, yet int() raises
            ".thing.\u0661\u0662.ab.partial.pt2",  # Arabic-Indic 12: not ASCII
            f".thing.{10 ** 40}.ab.partial.pt2", ".thing.0.ab.partial.pt2", "thing.pt2"]
    for name in doomed + kept:
        (tmp_path / name).write_bytes(b"x")
    outside = tmp_path / "outside"
    outside.write_bytes(b"mine")
    (tmp_path / f".thing.{dead}.ln.partial.pt2").symlink_to(outside)
    (tmp_path / f".thing.{dead}.dir.partial.pt2").mkdir()
    os.mkfifo(tmp_path / f".thing.{dead}.fifo.partial.pt2")
    before = {p.name for p in tmp_path.iterdir()}
    lesson.remove_dead_partials(target)
    assert {p.name for p in tmp_path.iterdir()} == before - set(doomed)
    assert outside.read_bytes() == b"mine"
    leftover = tmp_path / f".thing.{dead}.ef.partial.pt2"
    leftover.write_bytes(b"x")
    monkeypatch.setattr(Path, "unlink", lambda *a, **k: (_ for _ in ()).throw(
        PermissionError("not ours (a sticky folder)")))
    lesson.remove_dead_partials(target)  # a file it may not delete never fails a build
    assert leftover.exists()


def test_executorch_program_runs_at_batch_1_and_above_the_example(default_run):
    pytest.importorskip("executorch", reason="executorch is in requirements.txt")
    out = default_run("05_torchscript_export").out_dir
    method = lesson.load_pte_method(out / "model.pte")
    reference = eager_reference(out)
    for batch in (1, 9):  # the export's example had 4
        inputs = inputs_at(out, batch)
        got = method.execute([inputs])[0]
        assert got.shape == (batch, 4)
        torch.testing.assert_close(got, reference(inputs), rtol=0, atol=1e-4)


def test_describe_pt2_tells_the_two_kinds_apart(default_run):
    out = default_run("05_torchscript_export").out_dir
    program, package = (lesson.describe_pt2(out / name)
                        for name in ("exported_program.pt2", "model_aoti.pt2"))
    assert program["kind"] == "ExportedProgram" and program["libraries"] == 0
    assert program["torch"] == torch.__version__ and program["schema"]
    assert package["kind"] == "AOTInductor package" and package["libraries"] >= 1


def test_a_failed_cpp_build_is_reported_and_the_lesson_goes_on(tmp_path, capsys):
    run = Run.start(str(tmp_path / "05_x.py"), make_parser(str(tmp_path / "05_x.py"), "x"),
                    ["--device", "cpu", "--out-dir", str(tmp_path / "out")])
    (run.out_dir / "model_aoti.pt2").write_bytes(b"")  # section 4 "built" its package
    failed = concurrent.futures.Future()
    failed.set_exception(RuntimeError("g++ could not build load_model.cpp: needs C++20"))
    figures = lesson.lesson_4b_cpp(run, failed, torch.nn.Identity(), torch.zeros(4, 1))
    assert figures == {"cpp_built": False}
    assert "SKIPPED: g++ could not build load_model.cpp: needs C++20" in capsys.readouterr().out
