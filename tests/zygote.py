"""Fresh Python processes for tests without a fresh ``import torch`` each: a fork server.

Many tests start ``python SCRIPT ...`` or ``python -c CODE ...`` and look at what that process
does: its exit status, its output, the files it leaves, how it dies under SIGKILL. Each such
process spends about 2.3 s of CPU importing torch before it does anything, and the suite
starts dozens. This module starts one server that imports torch once; each request forks it,
and the fork runs the script or code as ``python`` would: its own pid (signals reach it),
argv, working folder, environment, sys.path, stdin/stdout/stderr, a fresh ``__main__``,
normal interpreter exit (threads joined, atexit, flush), exit status 1 and a traceback for an
uncaught exception, death by the signal that killed it.

``popen(args, **kwargs)`` and ``run(args, **kwargs)`` take subprocess's arguments. What the
fork cannot reproduce goes to a real ``subprocess`` instead, so a test never depends on the
difference: interpreter options (``-u``, ``-E``, ``-I -m``, ...; ``-c``, ``-m MODULE`` and
``-I`` before ``-c`` or a script are forked, the last with -I's sys.path), a program other
than sys.executable, an environment that differs from the
server's in a variable of STARTUP_PREFIXES (``PYTHON*``, ``OMP_*``, ``LD_*``, ...: not every
variable read before or while torch is imported, see there), a ``cwd`` that does not
exist, options subprocess has and these children do not (``preexec_fn``, ``pass_fds``,
``user``, ...), and any platform without ``fork`` and ``socket.send_fds``.

The server starts on first use (once per pytest process) and ends when that process closes
its end of the control socket or exits. Its children are those of a process that imported
torch and nothing of the project: ``sys.modules`` holds torch and what torch imports, as in a
fresh ``python -c "import torch"`` (the same 1,204 module names here, against 102 in a
python that imported nothing: a child that checks what is NOT imported must not run here).
Python's ``random`` reseeds in each fork by itself, numpy.random is not imported until a
child imports it (then it seeds from the OS), torch's default generator
(a fresh ``import torch`` seeds it from the OS) and multiprocessing's authkey are reseeded
here; the hash seed cannot be: every fork of one server has the server's, so two forks order
sets of strings alike where two real processes may not. A test whose claim is that two
children agree (or differ) must not let the hash seed decide it: give it
``PYTHONHASHSEED=random`` in the child's environment (a different startup variable: real
processes) if it may. What torch printed or warned while the server imported it is not in a
fork's output, and ``-m`` of a module the server imported with torch (``email.utils``,
``unittest.mock``...) prints runpy's RuntimeWarning that it was "found in sys.modules" where a
fresh python prints nothing.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading

# Variables read when the interpreter starts or torch is imported: a child whose environment
# differs from the server's in one of them runs as a real process. Not all of them: import
# torch also reads, among others, TORCHDYNAMO_*, TORCHEXPORT_*,
# TORCHINDUCTOR_FORCE_DISABLE_CACHES, FX_*, COMPILE_STROBELIGHT_*, KINETO_USE_DAEMON,
# NUMPY_MADVISE_HUGEPAGE, and in C DNNL_*/ONEDNN_*/MKLDNN_*, GFORTRAN_*, GLIBCXX_TUNABLES and
# OPENSSL_*; site reads HOME; a child that differs only in those is forked and sees the
# server's values.
STARTUP_PREFIXES = ("PYTHON", "OMP_", "KMP_", "MKL_", "GOMP_", "LD_", "MALLOC_", "TORCH_",
                    "PYTORCH_", "CUDA_", "NCCL_", "LC_", "LANG",
                    # numpy (torch imports it) loads OpenBLAS; time reads TZ on import
                    "OPENBLAS_", "GOTO_", "BLIS_", "NPY_", "TZ")
# ...except these, which the fork applies itself (the text layer of stdio, .pyc writing)
APPLIED_IN_CHILD = ("PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "PYTHONIOENCODING",
                    "PYTHONPATH")  # and a sitecustomize.py found on PYTHONPATH
MESSAGE_LIMIT = 1 << 22  # a request: argv, cwd and environment as JSON
# A larger request runs as a real process: one datagram must fit the socket's send buffer
# (about 200 KiB by default; a real process takes an environment of up to 2 MiB).
REQUEST_LIMIT = 1 << 17
_STDIO_ERRORS = "strict"  # the server's stdin/stdout error handler, set in serve()
# Signals whose disposition a child inherits, less those python itself sets (SIGPIPE, SIGXFSZ
# ignored) or that cannot change.
_CATCHABLE = [number for number in signal.valid_signals() if number not in (
    signal.SIGKILL, signal.SIGSTOP, signal.SIGPIPE, signal.SIGXFSZ)]


def _startup_view(env) -> dict[str, str]:
    return {k: v for k, v in env.items()
            if k.startswith(STARTUP_PREFIXES) and k not in APPLIED_IN_CHILD}


def fresh_sys_path(option: str) -> list[str]:
    """sys.path of ``python OPTION -c ...`` started now."""
    return json.loads(subprocess.run(
        [sys.executable, option, "-c", "import json, sys; print(json.dumps(sys.path))"],
        capture_output=True, text=True, check=True, cwd="/").stdout)


class _PlainPopen(subprocess.Popen):
    """subprocess.Popen with the ``__init__`` it had when this module was imported: a wrapper
    installed later (tests/confinement.py's, which confines the children a confined test
    starts) must not reach the server, whose audit hook every fork would inherit."""

    __init__ = subprocess.Popen.__init__


class _Server:
    """The fork server of this process: started on first use, one per pytest process."""

    lock = threading.Lock()
    instance: _Server | None = None
    failed = False

    def __init__(self, shared: dict | None = None) -> None:
        self.send_lock = threading.Lock()
        if shared is not None:  # another process's server (share()): its socket and facts
            self.control = socket.socket(fileno=shared["fd"])
            self.startup, self.process = shared["startup"], None
            self.base_path, self.isolated_path = shared["base_path"], shared["isolated_path"]
            return
        self.control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ)
        self.startup = _startup_view(env)
        self.base_path = fresh_sys_path("-E")[1:]  # after the script's folder or ''
        self.isolated_path = fresh_sys_path("-I")  # -I puts no folder first
        self.process = _PlainPopen(  # as a file, not tests.zygote: no package imported
            [sys.executable, os.path.abspath(__file__), str(theirs.fileno())],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env=env)
        theirs.close()

    @classmethod
    def get(cls) -> _Server | None:
        with cls.lock:
            if cls.instance is None and not cls.failed:
                try:
                    cls.instance = cls()
                except (OSError, subprocess.SubprocessError, ValueError):
                    cls.failed = True
            return cls.instance

    def eligible(self, args, env, cwd, extra: bool) -> bool:
        """Whether a fork of the server can be ``args`` run with ``env`` in ``cwd``."""
        if extra or len(args) < 2 or os.fsdecode(args[0]) != sys.executable:
            return False
        args = [os.fsdecode(a) for a in args[1:]]
        isolated = args[0] == "-I"
        if isolated:  # the fork gets -I's sys.path and ignores PYTHON*
            args = args[1:]
        if (not args or args[0].startswith("-") and args[0] not in ("-c", "-m")
                or args[0] in ("-c", "-m") and len(args) < 2 or args[0] == "-m" and isolated):
            return False
        if cwd is not None and not os.path.isdir(cwd):
            return False
        child_env = os.environ if env is None else env
        return (_startup_view(child_env) == self.startup
                and (self.process is None or self.process.poll() is None))

    def start(self, request: bytes, fds: list[int]) -> socket.socket:
        """Send a request with its stdio descriptors; the socket that will report its pid and
        exit status."""
        mine, theirs = socket.socketpair()
        try:
            with self.send_lock:
                socket.send_fds(self.control, [request], [*fds, theirs.fileno()])
        except OSError:
            mine.close()
            raise
        finally:
            theirs.close()
        return mine


class ZygotePopen(subprocess.Popen):
    """subprocess.Popen whose child is a fork of the server (see the module docstring), or a
    real process where the final arguments need one: this is decided in _execute_child,
    after Popen.__init__ (and any wrapper of it, as tests/confinement.py installs) has made
    the environment the child gets."""

    _forked = False  # True once the server forked the child; False: a real process

    def __init__(self, server: _Server, args, **kwargs) -> None:
        self._zygote = server  # before Popen.__init__, which calls _execute_child
        super().__init__(args, **kwargs)

    def _execute_child(self, args, executable, preexec_fn, close_fds, pass_fds, cwd, env,
                       startupinfo, creationflags, shell, p2cread, p2cwrite, c2pread, c2pwrite,
                       errread, errwrite, restore_signals, *rest):
        gid, gids, uid, umask, new_session, *group = rest  # process_group: 3.11 and later
        extra = (executable or preexec_fn or pass_fds or shell or not close_fds
                 or (gid, gids, uid) != (None, None, None) or umask != -1
                 or group not in ([], [-1]))
        request = None
        if self._zygote.eligible(list(args), env, cwd, bool(extra)):
            args = [os.fsdecode(a) for a in args]
            child_env = dict(os.environ if env is None else env)
            isolated = args[1] == "-I"
            request = json.dumps({
                "argv": args[2:] if isolated else args[1:], "isolated": isolated,
                "cwd": os.fsdecode(os.path.abspath(cwd)) if cwd is not None else os.getcwd(),
                "env": {os.fsdecode(k): os.fsdecode(v) for k, v in child_env.items()},
                "path": self._zygote.isolated_path if isolated else self._zygote.base_path,
                "new_session": bool(new_session), "ignored": _ignored_signals(),
                "caller": os.getpid()}).encode()
        status = None
        if request is not None and len(request) <= REQUEST_LIMIT:
            fds = [p2cread if p2cread != -1 else 0, c2pwrite if c2pwrite != -1 else 1,
                   errwrite if errwrite != -1 else 2]
            try:
                status = self._zygote.start(request, fds)
            except OSError:  # the server is gone (an attached one has no process to poll):
                pass  # nothing was forked, so it runs as a real process
        _log("real" if status is None else "fork", args)
        if status is None:
            return super()._execute_child(
                args, executable, preexec_fn, close_fds, pass_fds, cwd, env, startupinfo,
                creationflags, shell, p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite,
                restore_signals, *rest)
        try:
            self._status, self._status_buffer = status, b""
            line = self._read_line(block=True)
            if not line.startswith("pid "):
                raise subprocess.SubprocessError(f"the fork server did not start {args}: {line}")
            self.pid = int(line.split()[1])
            self._child_created = self._forked = True
        finally:
            self._close_pipe_fds(p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite)

    def _read_line(self, block: bool) -> str | None:
        while b"\n" not in self._status_buffer:
            self._status.setblocking(block)
            try:
                part = self._status.recv(4096)
            except BlockingIOError:
                return None
            if not part:
                return "lost"
            self._status_buffer += part
        line, self._status_buffer = self._status_buffer.split(b"\n", 1)
        return line.decode()

    def _try_wait(self, wait_flags):
        if not self._forked:
            return super()._try_wait(wait_flags)
        line = self._read_line(block=not wait_flags & os.WNOHANG)
        if line is None:
            return 0, 0
        self._status.close()
        if line.startswith("exit "):
            return self.pid, int(line.split()[1])
        return self.pid, 255 << 8  # the reaper is gone: report a failure, not a success

    def _internal_poll(self, _deadstate=None, **kwargs):
        if not self._forked:
            return super()._internal_poll(_deadstate, **kwargs)
        if self.returncode is None and self._waitpid_lock.acquire(False):
            try:
                if self.returncode is None:
                    pid, status = self._try_wait(os.WNOHANG)
                    if pid == self.pid:
                        self._handle_exitstatus(status)
            except OSError:
                if _deadstate is not None:
                    self.returncode = _deadstate
            finally:
                self._waitpid_lock.release()
        return self.returncode


# With TESTS_ZYGOTE_LOG=FILE, one line per child: how it ran and its first arguments. Opened
# here, at import (a confined test may not open a file outside its tmp_path), and taken out
# of the environment (a child that imports this module must not open it).
_LOG_PATH = os.environ.pop("TESTS_ZYGOTE_LOG", "")
_LOG = os.open(_LOG_PATH, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if _LOG_PATH else None


def _log(how: str, args) -> None:
    if _LOG is not None:
        os.write(_LOG, f"{how} {[os.fsdecode(a)[:60] for a in list(args)[1:3]]}\n".encode())


def _ignored_signals() -> list[int]:
    """The signals this process ignores: an exec'd child inherits SIG_IGN (python then keeps
    SIGINT ignored, without its KeyboardInterrupt handler); the rest start at SIG_DFL."""
    return [int(number) for number in _CATCHABLE if signal.getsignal(number) == signal.SIG_IGN]


def _server() -> _Server | None:
    """This process's server, started on first use; None without fork and socket.send_fds,
    with TESTS_NO_ZYGOTE set (to compare, or to rule the server out), or if it did not
    start."""
    usable = hasattr(socket, "send_fds") and hasattr(os, "fork") and not os.environ.get(
        "TESTS_NO_ZYGOTE")
    return _Server.get() if usable else None


def popen(args, **kwargs) -> subprocess.Popen:
    """``subprocess.Popen(args, **kwargs)``, run as a fork of the server where it can be."""
    server = _server()
    return subprocess.Popen(args, **kwargs) if server is None else ZygotePopen(
        server, args, **kwargs)


def share() -> tuple[int, str] | None:
    """For a process this one starts (tests/notebook_run.py, whose Jupyter kernel is forked
    here too): the descriptor to pass it (pass_fds) and the value of TESTS_ZYGOTE for its
    environment; None where there is no server."""
    server = _server()
    if server is None:
        return None
    fd = server.control.fileno()
    return fd, json.dumps({"fd": fd, "startup": server.startup, "base_path": server.base_path,
                           "isolated_path": server.isolated_path})


def attach() -> bool:
    """In a process started with share()'s descriptor and TESTS_ZYGOTE: use that server
    (requests from several processes on one socket: each is one datagram). Returns whether
    there was one to attach."""
    shared = os.environ.pop("TESTS_ZYGOTE", "")
    if not shared:
        return False
    with _Server.lock:
        _Server.instance = _Server(json.loads(shared))
    return True


def shutdown() -> None:
    """Stop the server (its children go on): pytest's session end calls this."""
    with _Server.lock:
        server, _Server.instance = _Server.instance, None
    if server is not None:
        server.control.close()  # the server sees EOF and returns
        if server.process is None:  # another process's server: it stops it
            return
        try:
            server.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


def run(args, *, input=None, capture_output=False, timeout=None, check=False, **kwargs):
    """``subprocess.run`` over ``popen``: the same arguments, results and exceptions."""
    if capture_output:
        kwargs["stdout"] = kwargs["stderr"] = subprocess.PIPE
    if input is not None:
        kwargs["stdin"] = subprocess.PIPE
    with popen(args, **kwargs) as process:
        try:
            stdout, stderr = process.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired as error:
            process.kill()
            error.stdout, error.stderr = process.communicate()
            raise
        except BaseException:
            process.kill()
            raise
        returncode = process.poll()
    if check and returncode:
        raise subprocess.CalledProcessError(returncode, process.args, stdout, stderr)
    return subprocess.CompletedProcess(process.args, returncode, stdout, stderr)


# --------------------------------------------------------------------------- the server side

def serve(control_fd: int) -> None:
    """The server: import torch once, then fork a reaper per request until the control
    socket closes. Single-threaded, so each fork copies a quiet process."""
    import torch  # noqa: F401 - the point of the server

    global _STDIO_ERRORS
    if ":" not in os.environ.get("PYTHONIOENCODING", ""):  # the server's own is the default
        _STDIO_ERRORS = sys.stdout.errors
    import gc

    gc.collect()
    gc.freeze()  # a fork's collections (one at exit) skip torch's objects

    control = socket.socket(fileno=control_fd)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # reapers are reaped by the kernel
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in pytest: the server goes at EOF
    while True:
        try:
            message, fds, _flags, _address = socket.recv_fds(control, MESSAGE_LIMIT, 4)
        except InterruptedError:
            continue
        if not message:
            return  # the pytest process closed its end or exited
        if os.fork() == 0:
            control.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            _reaper(json.loads(message), fds)  # never returns
        for fd in fds:
            os.close(fd)


def _reaper(request: dict, fds: list[int]) -> None:
    """Fork the worker, report its pid, wait for it, report its wait status, exit."""
    status = socket.socket(fileno=fds[3])
    ready_read, ready_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            status.close()
            os.close(ready_read)
            _worker(request, fds[:3], ready_write)  # never returns
        except BaseException:  # a failure before the program ran: never the server's loop
            import traceback

            traceback.print_exc()
        finally:
            os._exit(1)
    try:
        for fd in fds[:3]:
            os.close(fd)
        os.close(ready_write)
        group = os.read(ready_read, 32)  # its process group once its session is made, or b""
        os.close(ready_read)  # if it died first: as after exec, a caller's os.getpgid(pid)
        expected = pid if request["new_session"] else os.getpgid(0)  # gets the child's own
        if group and int(group) != expected:  # (Jupyter's does, then signals that group)
            os.kill(pid, signal.SIGKILL)
            status.sendall(f"group {int(group)} is not {expected}\n".encode())
            return
        status.sendall(f"pid {pid}\n".encode())
        _until_exit_or_orphaned(pid, status)
        while True:
            try:
                _, wait_status = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
        status.sendall(f"exit {wait_status}\n".encode())
    finally:
        os._exit(0)


def _until_exit_or_orphaned(pid: int, status: socket.socket) -> None:
    """Wait until the worker exits; if the pytest process dies first (its end of ``status``
    closes), exit: the worker is orphaned as a real child of pytest would be (os.getppid()
    becomes 1, which tests/test_07's other job watches for)."""
    import select

    if not hasattr(os, "pidfd_open"):
        return
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    poller.register(status, select.POLLIN)  # pytest never writes: readable means closed
    while True:
        ready = {fd for fd, _ in poller.poll()}
        if pidfd in ready:
            os.close(pidfd)
            return
        if status.fileno() in ready:
            os._exit(0)


def _worker(request: dict, stdio: list[int], ready: int) -> None:
    """Become ``python ARGV...`` in this forked process, then exit as it would; ``ready`` is
    closed once its signals and session are those the caller asked for."""
    import builtins
    import io
    import types

    ignored = set(request["ignored"])
    for number in _CATCHABLE:  # as exec leaves them: ignored stays ignored, the rest default
        try:
            signal.signal(number, signal.SIG_IGN if number in ignored else signal.SIG_DFL)
        except (OSError, ValueError):
            pass
    if signal.SIGINT not in ignored:  # python's own handler, as a fresh python has it
        signal.signal(signal.SIGINT, signal.default_int_handler)
    _reseed()
    if request["new_session"]:
        os.setsid()
    os.write(ready, str(os.getpgid(0)).encode())  # the reaper checks it, then reports the pid
    os.close(ready)
    for target, fd in enumerate(stdio):
        if fd != target:
            os.dup2(fd, target)
    for fd in set(stdio):
        if fd > 2:
            os.close(fd)
    env = request["env"]
    if env.get("JPY_PARENT_PID") == str(request["caller"]):  # Jupyter's "my parent": here the
        env["JPY_PARENT_PID"] = str(os.getppid())  # reaper, which goes when the caller goes
        # (ipykernel ignores a parent pid that is not its ppid, then only notices ppid 1: a
        # kernel orphaned under a subreaper, systemd --user's, would run on for ever)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(env)
    settings = {} if request["isolated"] else env  # -I ignores the PYTHON* variables
    sys.dont_write_bytecode = bool(settings.get("PYTHONDONTWRITEBYTECODE"))
    unbuffered = bool(settings.get("PYTHONUNBUFFERED"))
    encoding, _, errors = (settings.get("PYTHONIOENCODING") or "utf-8").partition(":")
    errors = errors or _STDIO_ERRORS
    sys.stdin = sys.__stdin__ = io.TextIOWrapper(
        open(0, "rb", closefd=False), encoding=encoding, errors=errors)
    sys.stdout = sys.__stdout__ = io.TextIOWrapper(
        open(1, "wb", buffering=0 if unbuffered else -1, closefd=False), encoding=encoding,
        errors=errors, line_buffering=os.isatty(1), write_through=unbuffered)
    sys.stderr = sys.__stderr__ = io.TextIOWrapper(
        open(2, "wb", buffering=0 if unbuffered else -1, closefd=False), encoding=encoding,
        errors="backslashreplace", line_buffering=True, write_through=unbuffered)
    argv = request["argv"]
    module = argv[1] if argv[0] == "-m" else None
    if module is not None:  # as python -m: the working folder first, runpy runs it
        source, filename, first = None, None, os.getcwd()
        sys.argv = ["-m", *argv[2:]]
    elif argv[0] == "-c":
        source, filename, first = argv[1], "<string>", ""
        sys.argv = ["-c", *argv[2:]]
    else:
        filename = os.path.abspath(argv[0])
        try:
            with open(filename, "rb") as handle:
                source = handle.read()
        except OSError as error:
            print(f"{sys.executable}: can't open file {filename!r}: [Errno {error.errno}] "
                  f"{error.strerror}", file=sys.stderr, flush=True)
            os._exit(2)
        first = os.path.dirname(filename)
        sys.argv = list(argv)
    if request["isolated"]:
        sys.path[:] = request["path"]
        sys.orig_argv = [sys.executable, "-I", *argv]
    else:
        pythonpath = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[:] = [first, *pythonpath, *request["path"]]
        sys.orig_argv = [sys.executable, *argv]
        _run_sitecustomize(pythonpath)
    main = types.ModuleType("__main__")
    main.__dict__.update(__builtins__=builtins, __spec__=None, __loader__=None,
                         __package__=None, __cached__=None)
    if filename not in ("<string>", None):
        main.__file__ = filename
    sys.modules["__main__"] = main
    code, interrupted = 0, False
    try:
        if module is not None:
            import runpy

            runpy._run_module_as_main(module)  # what python -m calls (alter_argv too)
        else:
            exec(compile(source, filename, "exec", dont_inherit=True), main.__dict__)
    except SystemExit as done:
        code = done.code
    except BaseException as error:
        tb = error.__traceback__
        while tb is not None and (tb.tb_frame.f_code.co_filename != filename if filename
                                  else tb.tb_frame.f_code.co_filename == __file__):
            tb = tb.tb_next  # show the program's frames (python -m: runpy's too), not ours
        error = error.with_traceback(tb)  # excepthook prints this one
        sys.excepthook(type(error), error, error.__traceback__)
        code, interrupted = 1, isinstance(error, KeyboardInterrupt)
    _exit(code, interrupted)


def _reseed() -> None:
    """What a fresh process draws at random and a fork would share with every other fork:
    torch's default seed (a fresh ``import torch`` seeds from the OS; two forks would draw the
    same "random" tensors, and two children that should differ would agree) and
    multiprocessing's authentication key. Python's ``random`` reseeds by itself, numpy.random
    is imported (and seeded) by the child; the hash seed cannot be changed after start-up."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.seed()
    process = sys.modules.get("multiprocessing.process")
    if process is not None:
        process.current_process().authkey = os.urandom(32)


def _run_sitecustomize(pythonpath: list[str]) -> None:
    """Python imports ``sitecustomize`` at start-up from the first folder of sys.path that
    has one; the server imported its own (if any) already, so run the one a PYTHONPATH
    folder adds (tests/confined_site's, which confines a child's writes)."""
    import importlib.util

    for folder in pythonpath:
        candidate = os.path.join(folder, "sitecustomize.py")
        if os.path.isfile(candidate):
            spec = importlib.util.spec_from_file_location("sitecustomize", candidate)
            module = importlib.util.module_from_spec(spec)
            sys.modules["sitecustomize"] = module
            try:
                spec.loader.exec_module(module)
            except Exception as error:  # python reports it and runs the program anyway
                del sys.modules["sitecustomize"]
                print("Error in sitecustomize; set PYTHONVERBOSE for traceback:\n"
                      f"{type(error).__name__}: {error}", file=sys.stderr, flush=True)
            return


def _exit(code, interrupted: bool) -> None:
    """End as python ends, nearly: join the non-daemon threads, run atexit, clear
    ``__main__`` (python's finalization starts with it: ``__del__`` of the program's objects
    runs, files it left open in its globals are flushed and closed) and collect, flush stdout
    and stderr, exit with ``code`` (a non-int one printed, then 1; python prints it before
    the threads and atexit, this after), or die by SIGINT after an uncaught
    KeyboardInterrupt. Then os._exit, skipping the rest of python's teardown of every module
    (0.6-0.9 s of CPU with torch imported): objects held only by other modules are not
    finalized (a suspended generator held there does not run its ``finally``). Atexit callbacks
    (logging.shutdown, weakref.finalize, multiprocessing's exit function) ran above."""
    import atexit
    import gc

    threading._shutdown()
    atexit._run_exitfuncs()
    main = sys.modules.get("__main__")
    if main is not None:  # python's finalization clears __main__ first: __del__ methods run
        main.__dict__.clear()  # and files the program left open are flushed and closed
    gc.collect()  # cheap: the server froze what it imported
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            code = code or 120  # python: 120 whatever the code, the error printed, closed
            # streams skipped; here a non-zero code is kept and a closed stream also gives 120
    if interrupted:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code or 0)


if __name__ == "__main__":
    serve(int(sys.argv[1]))
