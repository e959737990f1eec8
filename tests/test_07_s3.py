"""07's object-storage sections (6-13) against real SeaweedFS servers on free loopback ports.

The session's server (conftest's ScriptRuns.s3_server) is the one 07's notebook run uses through
--s3-endpoint, the way a reader would use their own: the tests check what that run measured and
what it left there, with a second client (a plain FsspecReader, not the script). The default run
starts and removes its own server; test_two_servers_at_once_do_not_collide starts another.
"""

from __future__ import annotations

import copy
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from common.compare import max_abs_diff
from common.models import SmallCNN
from common.s3server import missing_requirement, start_s3_server
from tests.conftest import load_script

pytestmark = pytest.mark.skipif(missing_requirement() is not None,
                                reason=str(missing_requirement()))
lesson = load_script("07_distributed_training")
STEM = "07_distributed_training"


@pytest.fixture(scope="module")
def server(script_runs):
    started = script_runs.s3_server()
    if started is None:
        pytest.fail(script_runs.s3_problem)  # weed and s3fs are here (pytestmark): a real failure
    return started


@pytest.fixture(scope="module")
def s3_run(server, notebook_run):
    """07's notebook run: every section, with --s3-endpoint (the session's server) for 6-13."""
    run = notebook_run(STEM)
    assert run.returncode == 0, run.stderr[-4000:]
    return run


def test_s3_sections_hold_against_a_given_endpoint(s3_run, server):
    metrics = s3_run.summary["metrics"]
    assert metrics["s3_one_file_max_abs_diff"] == 0.0
    assert metrics["s3_reshard_max_abs_diff"] == 0.0  # saved by 2 ranks, loaded by 3
    assert metrics["s3_killed_upload_visible"] is False
    assert metrics["s3_pending_uploads_after_kill"] == 1
    assert metrics["s3_pending_uploads_after_abort"] == 0
    assert metrics["s3_killed_save_objects_left"] >= 1  # the killed save left data objects...
    assert metrics["s3_resumed_step"] == 1  # ...and resume took the newest COMPLETE one
    assert metrics["s3_resume_bit_identical"] is True
    assert metrics["s3_conditional_write_honoured"] is True  # SeaweedFS 4.48 honours it
    assert metrics["s3_hostile_metadata_refused"] is True
    assert metrics["s3_hostile_bytes_refused"] is True
    assert metrics["s3_restricted_load_max_abs_diff"] == 0.0
    assert metrics["s3_save_vs_raw_put"] > 0 and metrics["s3_load_vs_raw_get"] > 0
    assert not (s3_run.out_dir / "s3_target.json").exists()  # no surprise file left
    assert (s3_run.out_dir / s3_run.summary["artifacts"]["s3_speed_chart"]).stat().st_size > 5000
    assert server.process.poll() is None  # --s3-endpoint: the script did not stop OUR server


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_a_second_client_reads_the_s3_checkpoint(s3_run, server):
    """A plain FsspecReader, not the script, reads s3_dcp_checkpoint: 07's weights."""
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    url = s3_run.summary["artifacts"]["s3_dcp_checkpoint"]
    assert url.startswith(f"s3://{server.bucket}/")
    state = SmallCNN().state_dict()
    dcp.load(state, storage_reader=FsspecReader(url, **server.storage_options()), no_dist=True)
    reference = torch.load(s3_run.out_dir / "portable_model.pt", map_location="cpu",
                           weights_only=True)
    assert max_abs_diff(state, reference) == 0.0


def test_default_run_starts_its_own_server(default_run):
    run = default_run(STEM)
    metrics = run.metrics
    assert metrics["s3_reshard_max_abs_diff"] == 0.0
    assert metrics["s3_killed_upload_visible"] is False
    assert metrics["s3_resumed_step"] == 1 and metrics["s3_resume_bit_identical"] is True
    assert metrics["s3_save_vs_raw_put"] > 0 and metrics["s3_load_vs_raw_get"] > 0
    assert run.summary["artifacts"]["s3_dcp_checkpoint"].startswith("s3://ckpt/")
    assert "started SeaweedFS on http://127.0.0.1:" in run.stdout


def test_two_servers_at_once_do_not_collide(server, tmp_path):
    import s3fs

    other = start_s3_server("ckpt", root=str(tmp_path))
    try:
        assert set(other.ports.values()).isdisjoint(server.ports.values())
        mine = s3fs.S3FileSystem(**other.storage_options(), skip_instance_cache=True)
        theirs = s3fs.S3FileSystem(**server.storage_options(), skip_instance_cache=True)
        mine.pipe("ckpt/only-here", b"1")
        assert not theirs.exists("ckpt/only-here")
    finally:
        other.stop()
    assert other.process.poll() is not None and not other.folder.exists()
    assert not [p for p in tmp_path.iterdir()]  # its folder, sockets and logs are gone


def test_a_hostile_latest_marker_is_refused(server):
    import s3fs

    url = "s3://ckpt/hostile_marker"
    s3fs.S3FileSystem(**server.storage_options()).pipe(f"{url}/latest", b"../../other/run")
    with pytest.raises(ValueError, match="is not a checkpoint name"):
        lesson.load_latest_s3({}, url, server.storage_options())
    assert lesson.load_latest_s3({}, "s3://ckpt/no_such_run", server.storage_options()) is None


def test_metadata_unpickler_allows_dcp_metadata_only(default_run):
    import io

    metadata = (default_run(STEM).out_dir / "dcp_checkpoint" / ".metadata").read_bytes()
    loaded = lesson.MetadataUnpickler(io.BytesIO(metadata)).load()
    assert "model.backbone.0.weight" in loaded.state_dict_metadata
    for payload in (lesson._Payload(), print, os.system, shutil.rmtree):
        with pytest.raises(pickle.UnpicklingError, match="not allowed"):
            lesson.MetadataUnpickler(io.BytesIO(pickle.dumps(payload))).load()


def test_missing_binary_prints_skipped(monkeypatch, capsys, tmp_path):
    import common.s3server

    monkeypatch.setattr(common.s3server.shutil, "which", lambda name: None)
    run = lesson.setup(["--device", "cpu", "--out-dir", str(tmp_path / "out")])
    assert lesson.s3_setup(run) is None
    assert "SKIPPED (no S3): the SeaweedFS `weed` binary is not on PATH" in capsys.readouterr().out


def _reduce(module: str, name: str, args: tuple) -> bytes:
    """A pickle that calls module.name(*args), as a hostile .metadata would."""
    return (b"\x80\x02c" + f"{module}\n{name}\n".encode() + pickle.dumps(args, protocol=2)[2:-1]
            + b"R.")


FS = "torch.distributed.checkpoint.filesystem"
HOSTILE_METADATA = {  # each was admitted by a whole-module allow-list
    "137 GB tensor": _reduce(FS, "Tensor", (2**31, 16)),
    "a device mesh (starts torch.distributed)": _reduce("torch.distributed.tensor",
                                                        "DeviceMesh", ("cpu", [0])),
    "unknown layout (KeyError)": _reduce("torch.serialization", "_get_layout", ("nope",)),
    "a writer": _reduce(FS, "FileSystemWriter", ("writer",)),
    "a path class imported by filesystem": _reduce(FS, "Path", ("x",)),
    "a functional Enum": _reduce(FS, "Enum", ("X", "a b")),
    "a Future": _reduce(FS, "Future", ()),
    "a Size of strings": _reduce("torch", "Size", (("a",),)),
    "TensorProperties with 9 args (TypeError)": _reduce(
        "torch.distributed.checkpoint.metadata", "TensorProperties", tuple(range(9))),
    "a plain dict, not Metadata": pickle.dumps({"state_dict_metadata": {}}),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_METADATA))
def test_metadata_unpickler_refuses_every_hostile_class(case, tmp_path, monkeypatch):
    import io

    monkeypatch.chdir(tmp_path)  # a writer or path it built would land here
    with pytest.raises(pickle.UnpicklingError, match=r"\.metadata"):
        lesson.MetadataUnpickler(io.BytesIO(HOSTILE_METADATA[case])).load()
    assert list(tmp_path.iterdir()) == []


def test_a_damaged_metadata_is_one_unpickling_error(default_run):
    """Every truncation and many byte flips of a real .metadata: a Metadata or one clear
    UnpicklingError, never a raw EOFError, KeyError or RuntimeError."""
    import io

    metadata = (default_run(STEM).out_dir / "dcp_checkpoint" / ".metadata").read_bytes()
    damaged = [metadata[:cut] for cut in range(0, len(metadata), max(1, len(metadata) // 60))]
    for offset in range(2, len(metadata), max(1, len(metadata) // 200)):
        for value in (0x00, 0xFF, metadata[offset] ^ 0x01):
            damaged.append(metadata[:offset] + bytes([value]) + metadata[offset + 1:])
    outcomes = set()
    for data in damaged:
        try:
            lesson.MetadataUnpickler(io.BytesIO(data)).load()
            outcomes.add("Metadata")
        except pickle.UnpicklingError:
            outcomes.add("refused")
    assert "refused" in outcomes


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_a_repeated_step_never_overwrites_the_named_checkpoint(server, monkeypatch):
    """Step 1 saved (A); step 1 saved again (B: a resumed run) and killed before .metadata
    and the marker: resume still loads A, bit-exactly, not a mix with B's objects."""
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    url, options = "s3://ckpt/repeated_step", server.storage_options()
    first = {"w": torch.arange(8.0), "b": torch.full((8,), 7.0)}
    saved = lesson.save_checkpoint_s3({"model": first}, url, 1, options)

    def killed(self, metadata, results):
        raise RuntimeError("killed before .metadata")

    monkeypatch.setattr(FsspecWriter, "finish", killed)
    with pytest.raises(CheckpointException, match="killed before .metadata"):
        lesson.save_checkpoint_s3({"model": {"w": torch.arange(8.0) + 100,
                                             "b": torch.full((8,), -1.0)}}, url, 1, options)
    monkeypatch.undo()
    state = {"model": {key: torch.zeros_like(value) for key, value in first.items()}}
    assert lesson.load_latest_s3(state, url, options) == saved.rsplit("/", 1)[1]
    assert all(torch.equal(state["model"][key], first[key]) for key in first)


@pytest.mark.parametrize("marker", ["step_００００01-0123456789ab".encode(), b"\xff\xfe",
                                    b"step_000001", b"../other/step_000001-0123456789ab",
                                    b"step_000001-0123456789ab1", b""])
def test_a_hostile_marker_is_one_value_error(server, marker):
    import s3fs

    url, options = "s3://ckpt/hostile_markers", server.storage_options()
    s3fs.S3FileSystem(**options).pipe(f"{url}/latest", marker)
    with pytest.raises(ValueError, match=r"hostile_markers/latest: .* is not a checkpoint name"):
        lesson.load_latest_s3({"w": torch.zeros(2)}, url, options)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_a_marker_with_a_trailing_newline_loads(server):
    import s3fs

    url, options = "s3://ckpt/newline_marker", server.storage_options()
    name = lesson.save_checkpoint_s3({"w": torch.arange(3.0)}, url, 4, options).rsplit("/")[-1]
    s3fs.S3FileSystem(**options).pipe(f"{url}/latest", name.encode() + b"\n")
    state = {"w": torch.zeros(3)}
    assert lesson.load_latest_s3(state, url, options) == name
    assert torch.equal(state["w"], torch.arange(3.0))


def test_a_port_weed_falls_back_from_is_a_failed_start(tmp_path, monkeypatch):
    """A chosen gRPC port taken before weed binds it: weed logs "finding alternative" and
    binds port + 1 (maybe another server's). That start is stopped and retried on new ports,
    and no socket of either attempt stays in /tmp (weed's fixed place for them)."""
    import socket

    import common.s3server as s3server

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    held = holder.getsockname()[1]
    chosen = []
    real_free_ports = s3server.free_ports

    def first_one_taken(count):
        ports = real_free_ports(count)
        if not chosen:
            ports[s3server.PORT_FLAGS.index("master.port.grpc")] = held
        chosen.append(ports)
        return ports

    monkeypatch.setattr(s3server, "free_ports", first_one_taken)
    try:
        started = s3server.start_s3_server("ckpt", root=str(tmp_path), attempts=3)
        started.stop()
    finally:
        holder.close()
    assert len(chosen) >= 2 and started.ports["master.port.grpc"] != held
    sockets = [s3server.grpc_socket(flag.split(".")[0], port)
               for ports in chosen for flag, port in zip(s3server.PORT_FLAGS, ports, strict=True)
               if flag.endswith(".grpc")] + [s3server.grpc_socket("master", held + 1)]
    assert [path for path in sockets if path.exists()] == []
    assert list(tmp_path.iterdir()) == []


def test_the_readiness_probe_cannot_outlast_the_timeout(monkeypatch, tmp_path):
    """A listener that accepts and never answers: the probe's client must not use botocore's
    60 s read timeout with retries (one probe then outlasts start_s3_server's timeout)."""
    import socket

    import s3fs

    import common.s3server as s3server

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    seen = {}

    class Recorder(s3fs.S3FileSystem):
        def __init__(self, *args, **kwargs):
            seen.update(copy.deepcopy(kwargs.get("config_kwargs") or {}))
            super().__init__(*args, **kwargs)

        def ls(self, *args, **kwargs):
            raise OSError("recorded; not waiting on the silent listener")

    monkeypatch.setattr(s3fs, "S3FileSystem", Recorder)
    fake = s3server.S3Server("http://x", "ckpt", "k", "s", tmp_path, None,
                             {"s3.port": silent.getsockname()[1]})
    try:
        assert s3server._answers(fake) is False
    finally:
        silent.close()
    assert seen.get("read_timeout", 60) <= 5 and seen.get("connect_timeout", 60) <= 5
    assert seen.get("retries", {}).get("total_max_attempts") == 1  # no retry


class _WritesAFile:
    """A bytes entry whose unpickling creates `path` (what a hostile data object does)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').write('x')",)


def test_a_payload_in_a_bytes_entry_is_refused_by_the_safe_planner(tmp_path):
    """.metadata passes the restricted unpickler (BytesStorageMetadata is allowed); the data
    object is torch.load(weights_only=False) by the default planner, so SafeLoadPlanner."""
    folder, proof = tmp_path / "ck", tmp_path / "PWNED"
    with lesson.single_process():
        dcp.save({"w": torch.ones(2), "step": _WritesAFile(proof)}, checkpoint_id=folder,
                 no_dist=True)
        assert not proof.exists()
        target = {"w": torch.zeros(2), "step": torch.zeros(())}
        with pytest.raises(dcp.api.CheckpointException, match="Unsupported global"):
            dcp.load(target, storage_reader=lesson.restricted_reader(str(folder)),
                     planner=lesson.SafeLoadPlanner(), no_dist=True)
        assert not proof.exists()
        dcp.load(target, storage_reader=lesson.restricted_reader(str(folder)), no_dist=True)
    assert proof.exists()  # the default planner runs it: the reason SafeLoadPlanner exists


def test_the_safe_planner_loads_an_honest_bytes_entry(tmp_path):
    folder = tmp_path / "ck"
    with lesson.single_process():
        dcp.save({"w": torch.arange(3.0), "lr": 0.25, "nested": {"n": 7}}, checkpoint_id=folder,
                 no_dist=True)
        target = {"w": torch.zeros(3), "lr": 0.0, "nested": {"n": 0}}
        dcp.load(target, storage_reader=lesson.restricted_reader(str(folder)),
                 planner=lesson.SafeLoadPlanner(), no_dist=True)
    assert target["lr"] == 0.25 and target["nested"]["n"] == 7
    assert torch.equal(target["w"], torch.arange(3.0))


def test_the_checkpoint_url_says_when_our_own_server_removes_it(capsys, tmp_path):
    run = lesson.setup(["--device", "cpu", "--out-dir", str(tmp_path)])
    ours = lesson.S3Target("s3://ckpt/p", {}, server=object())
    lesson.record_s3_checkpoint(run, ours)
    assert "(removed with the local server" in capsys.readouterr().out
    lesson.record_s3_checkpoint(run, lesson.S3Target("s3://ckpt/p", {}))
    assert "removed" not in capsys.readouterr().out
    assert run.artifacts["s3_dcp_checkpoint"] == "s3://ckpt/p/dcp_model"


def test_section_12_refuses_a_bytes_payload_in_s3(server, capsys):
    refusal = lesson.refused_bytes_payload(f"s3://{server.bucket}/t12/hostile_bytes",
                                           server.storage_options())
    assert refusal is not None and "Unsupported global" in refusal
    assert "payload ran" not in capsys.readouterr().out
