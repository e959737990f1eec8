"""tests/zygote.py: its forks behave as ``python`` processes would, and it forks only those
it can reproduce (the rest run as real processes)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

import pytest

from tests import zygote
from tests.conftest import ROOT


def run(*args, **kwargs):
    """A zygote run of ``python ARGS``, capturing text; also returns whether it was forked."""
    process = zygote.popen([sys.executable, *args], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, **kwargs)
    stdout, stderr = process.communicate(timeout=120)
    return process.returncode, stdout, stderr, getattr(process, "_forked", False)


def test_a_fork_sees_what_python_would_give_it(tmp_path):
    script = tmp_path / "show.py"
    script.write_text("import os, sys\n"
                      "print(__name__, __file__ == sys.argv[0], sys.argv[1:], sys.path[0],\n"
                      "      os.getcwd(), os.environ.get('ZYGOTE_TEST'), sys.stdin.read() == '')\n"
                      "print('to stderr', file=sys.stderr)\n"
                      "sys.exit(7)\n")
    code, out, err, forked = run(str(script), "a", "b c", cwd=tmp_path, stdin=subprocess.DEVNULL,
                                 env={**os.environ, "ZYGOTE_TEST": "yes"})
    assert forked and code == 7 and err == "to stderr\n"
    assert out.split() == ["__main__", "True", "['a',", "'b", "c']", str(tmp_path),
                           str(tmp_path), "yes", "True"]
    code, out, _, forked = run("-c", "import sys; print(sys.argv, repr(sys.path[0]))", "x")
    assert forked and code == 0 and out == "['-c', 'x'] ''\n"


def test_isolated_mode_keeps_the_project_off_sys_path(tmp_path):
    probe = "import importlib.util as u, sys; print(u.find_spec('common') is None, '' in sys.path)"
    assert run("-c", probe, cwd=ROOT)[1:] == ("False True\n", "", True)
    assert run("-I", "-c", probe, cwd=ROOT)[1:] == ("True False\n", "", True)


def test_an_uncaught_exception_is_exit_1_and_the_programs_own_traceback():
    code, out, err, forked = run("-c", "def f():\n    raise ValueError('boom')\nf()")
    assert forked and code == 1 and out == ""
    assert err.startswith("Traceback (most recent call last):\n  File \"<string>\", line 3")
    assert err.endswith("ValueError: boom\n") and "zygote" not in err
    assert run("-c", "import sys; sys.exit('a message')")[:3] == (1, "", "a message\n")
    assert run("-c", "raise KeyboardInterrupt")[0] == -signal.SIGINT  # as python dies of it


def test_exit_joins_threads_runs_atexit_and_flushes():
    program = ("import atexit, threading, time\n"
               "atexit.register(print, 'atexit')\n"
               "threading.Thread(target=lambda: (time.sleep(0.2), print('thread'))).start()\n"
               "print('main', end='')\n")
    assert run("-c", program)[:3] == (0, "mainthread\natexit\n", "")


def test_signals_reach_the_fork_and_its_own_session(tmp_path):
    process = zygote.popen([sys.executable, "-c", "import time; print('up', flush=True); "
                            "time.sleep(60)"], stdout=subprocess.PIPE, text=True,
                           start_new_session=True)
    assert process.stdout.readline() == "up\n" and process._forked
    assert os.getpgid(process.pid) == process.pid  # kill_group's process group
    os.killpg(process.pid, signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    process.stdout.close()


def test_a_sitecustomize_on_pythonpath_runs_first(tmp_path):
    (tmp_path / "sitecustomize.py").write_text("import builtins; builtins.MARK = 'site'\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    assert run("-c", "print(MARK)", env=env)[1:] == ("site\n", "", True)


def test_what_a_fork_cannot_reproduce_runs_as_a_real_process(tmp_path):
    seeded = {**os.environ, "PYTHONHASHSEED": "123"}  # read as the interpreter starts
    code, out, _, forked = run("-c", "print(hash('zygote'))", env=seeded)
    real = subprocess.run([sys.executable, "-c", "print(hash('zygote'))"], env=seeded,
                          capture_output=True, text=True, check=True)
    assert (code, out, forked) == (0, real.stdout, False)
    code, out, _, forked = run("-E", "-c", "print('e')")  # an interpreter option
    assert code == 0 and out == "e\n" and not forked
    with pytest.raises(FileNotFoundError):  # as subprocess says it
        zygote.popen([sys.executable, "-c", "pass"], cwd=tmp_path / "missing")


def test_a_server_started_in_a_confined_test_confines_no_later_child(tmp_path, monkeypatch):
    """The server starts on first use, maybe in a confined test: its forks must not inherit
    that test's confinement (they would refuse every later test's writes)."""
    from tests.confinement import confined

    zygote.shutdown()  # the next request starts a server, under the confinement below
    (tmp_path / "inside").mkdir()
    write = "import sys; open(sys.argv[1], 'w').close()"
    confinement = confined(tmp_path / "inside", monkeypatch)
    next(confinement)
    try:
        assert run("-c", write, str(tmp_path / "inside" / "f"))[:3] == (0, "", "")
        code, _, err, forked = run("-c", write, str(tmp_path / "outside"))
        assert forked and code == 1 and "confined test: refused open" in err
    finally:
        monkeypatch.undo()
        with pytest.raises(AssertionError, match="outside"):
            next(confinement)  # the child's refusal was logged for the test
    assert run("-c", write, str(tmp_path / "outside")) == (0, "", "", True)


def test_two_forks_draw_different_random_numbers():
    draw = ("import random, torch, multiprocessing as mp; "
            "print(torch.initial_seed(), float(torch.rand(1)), random.random(), "
            "bytes(mp.current_process().authkey).hex())")
    first, second = run("-c", draw), run("-c", draw)
    assert first[0] == second[0] == 0 and first[3] and second[3], (first, second)
    pairs = zip(first[1].split(), second[1].split(), strict=True)
    assert all(a != b for a, b in pairs), (first, second)


def test_failures_before_the_program_runs_are_reported_as_python_reports_them(tmp_path):
    missing = tmp_path / "missing.py"
    code, out, err, forked = run(str(missing))
    assert forked and (code, out) == (2, "") and err == (
        f"{sys.executable}: can't open file {str(missing)!r}: [Errno 2] No such file or "
        "directory\n")
    (tmp_path / "sitecustomize.py").write_text("raise RuntimeError('bad site')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    assert run("-c", "print('ran')", env=env) == (
        0, "ran\n", "Error in sitecustomize; set PYTHONVERBOSE for traceback:\n"
        "RuntimeError: bad site\n", True)
    code, _, err, forked = run("-c", "x = (")
    assert forked and code == 1 and "zygote" not in err and err.endswith("never closed\n")


def test_stdio_error_handler_and_a_large_environment_are_as_a_real_process_has_them():
    show = "import os, sys; print(os.fsdecode(b'\\xff'), sys.stdout.errors, len(os.environ['B2']))"
    env = {**os.environ, **{f"B{i}": "x" * 100_000 for i in range(3)}}  # over one datagram
    real = subprocess.run([sys.executable, "-c", show], capture_output=True, env=env, check=True)
    process = zygote.popen([sys.executable, "-c", show], stdout=subprocess.PIPE, env=env)
    assert (process.communicate(timeout=120)[0], process._forked) == (real.stdout, False)
    show = show.replace("len(os.environ['B2'])", "0")
    real = subprocess.run([sys.executable, "-c", show], capture_output=True, check=True)
    process = zygote.popen([sys.executable, "-c", show], stdout=subprocess.PIPE)
    assert (process.communicate(timeout=120)[0], process._forked) == (real.stdout, True)


def test_exit_finalizes_main_as_python_does(tmp_path):
    """python clears __main__ at exit: a file the program left open is flushed, __del__ runs."""
    program = ("import sys\nf = open(sys.argv[1], 'w'); f.write('data')\n"
               "class D:\n    def __del__(self): print('del ran')\nd = D()\n")
    assert run("-c", program, str(tmp_path / "left_open")) == (0, "del ran\n", "", True)
    assert (tmp_path / "left_open").read_text() == "data"


def test_a_different_openblas_setting_runs_as_a_real_process():
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}  # read when numpy (torch's) loads it
    assert run("-c", "pass", env=env) == (0, "", "", False)


def test_a_signal_ignored_here_stays_ignored_in_the_child_as_exec_leaves_it():
    show = ("import signal; print(signal.getsignal(signal.SIGINT) == signal.default_int_handler,"
            " int(signal.getsignal(signal.SIGHUP)))")
    assert run("-c", show) == (0, "True 0\n", "", True)
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    try:
        assert run("-c", show) == (0, "True 1\n", "", True)
    finally:
        signal.signal(signal.SIGHUP, before)


def test_bytes_arguments_and_cwd_are_forked_as_subprocess_accepts_them(tmp_path):
    process = zygote.popen([os.fsencode(sys.executable), b"-c", b"import os; print(os.getcwd())"],
                           stdout=subprocess.PIPE, cwd=os.fsencode(tmp_path))
    assert process.communicate(timeout=120)[0] == os.fsencode(tmp_path) + b"\n"
    assert process.returncode == 0 and process._forked


def test_a_fork_is_orphaned_when_the_process_that_started_it_goes():
    """pytest killed: its real children are orphaned (test_07's other job watches for
    os.getppid() == 1 to stop waiting). The reaper between them must not outlive pytest."""
    watch = ("import os, time\nfirst = os.getppid(); print(first, flush=True)\n"
             "deadline = time.monotonic() + 60\n"
             "while os.getppid() == first and time.monotonic() < deadline: time.sleep(0.02)\n"
             "print(os.getppid(), flush=True)\n")
    process = zygote.popen([sys.executable, "-c", watch], stdout=subprocess.PIPE, text=True)
    try:
        first = process.stdout.readline()
        assert process._forked and first.strip()
        process._status.close()  # what pytest's death does to the reaper's end
        assert process.stdout.readline() not in ("", first)
    finally:
        process.stdout.close()
        with contextlib.suppress(OSError):
            os.kill(process.pid, signal.SIGKILL)


def test_stdin_encoding_session_and_script_path_are_the_callers(tmp_path):
    done = zygote.run([sys.executable, "-c", "import sys; print(sys.stdin.read()[::-1])"],
                      input="olleh", capture_output=True, text=True, timeout=120)
    assert done.stdout == "hello\n"  # the caller's stdin, not the server's
    latin = {**os.environ, "PYTHONIOENCODING": "latin-1"}
    done = zygote.run([sys.executable, "-c", "print('\\u00e9')"], env=latin,
                      capture_output=True, timeout=120)
    assert done.stdout == b"\xe9\n"
    group = run("-c", "import os; print(os.getpgid(0))")
    assert group[1] == f"{os.getpgrp()}\n" and group[3]  # no start_new_session: our group
    (tmp_path / "where.py").write_text("print(__file__)\n")
    assert run("where.py", cwd=tmp_path)[1] == f"{tmp_path / 'where.py'}\n"  # absolute


def test_pass_fds_and_preexec_fn_get_a_real_process(tmp_path):
    read, write = os.pipe()
    try:
        process = zygote.popen([sys.executable, "-c", f"import os; os.write({write}, b'x')"],
                               pass_fds=[write])
        assert process.wait(timeout=120) == 0 and not getattr(process, "_forked", False)
        assert os.read(read, 1) == b"x"
    finally:
        os.close(read)
        os.close(write)
    process = zygote.popen([sys.executable, "-c", "pass"], preexec_fn=os.getpid)
    assert process.wait(timeout=120) == 0 and not getattr(process, "_forked", False)


def test_a_child_whose_reaper_dies_is_not_reported_as_a_success():
    process = zygote.popen([sys.executable, "-c", "import os, time; print(os.getppid(), "
                            "flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    reaper = int(process.stdout.readline())
    os.kill(reaper, signal.SIGKILL)
    try:
        assert process.wait(timeout=60) != 0
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.stdout.close()


def test_python_dash_m_runs_the_module_as_main_from_the_working_folder(tmp_path):
    (tmp_path / "shown.py").write_text("import sys\nprint(__name__, sys.argv, sys.path[0])\n")
    code, out, err, forked = run("-m", "shown", "x", cwd=tmp_path)
    assert (code, err, forked) == (0, "", True)
    assert out == f"__main__ ['{tmp_path / 'shown.py'}', 'x'] {tmp_path}\n"
    code, out, err, forked = run("-m", "no_such_module_here", cwd=tmp_path)
    assert (code, out, forked) == (1, "", True)
    assert err == f"{sys.executable}: No module named no_such_module_here\n"


def test_a_new_session_exists_when_popen_returns():
    """Jupyter reads os.getpgid(kernel.pid) right after Popen returns and signals that group:
    with the server's group (pytest's) there, an interrupt reached pytest."""
    process = zygote.popen([sys.executable, "-c", "import time; time.sleep(60)"],
                           start_new_session=True)
    try:
        assert process._forked and os.getpgid(process.pid) == process.pid
    finally:
        process.kill()
        process.wait(timeout=60)


def test_jupyters_parent_pid_is_the_forks_parent():
    """ipykernel exits when its ppid leaves JPY_PARENT_PID; a pid that is not its ppid it
    ignores, and an orphan under a subreaper (not pid 1) would then run on for ever."""
    env = {**os.environ, "JPY_PARENT_PID": str(os.getpid())}
    done = zygote.run([sys.executable, "-c", "import os; print(os.environ['JPY_PARENT_PID'] "
                       "== str(os.getppid()))"], env=env, capture_output=True, text=True,
                      timeout=120)
    assert done.stdout == "True\n"
