"""01 --inspect against hostile files: every attack of issue 22 by name, then a seeded fuzz of
hostile pickles inside each container the inspector reads. The inspector must read and never
run: no canary file appears, no traceback, the right exit status, bounded memory."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import random
import struct
import sys
import textwrap
import time
import zipfile

import pytest
import torch

from common.models import SmallCNN
from tests import zygote
from tests.conftest import ROOT, load_script

lesson = load_script("01_basic_save_load")


def inspect_cli(path, capsys) -> tuple[int, str, str]:
    """`01_basic_save_load.py --inspect PATH` in this process: (status, stdout, stderr)."""
    with pytest.raises(SystemExit) as exited:
        lesson.main(["--inspect", str(path)])
    captured = capsys.readouterr()
    return exited.value.code, captured.out, captured.err


def assert_clean(out: str, err: str) -> None:
    """No traceback, nothing on stderr, one verdict line at most, no control characters."""
    assert err == "" and "Traceback" not in out
    assert sum(line.startswith("verdict:") for line in out.splitlines()) <= 1
    assert all(c.isprintable() for line in out.splitlines() for c in line), repr(out)


def global_op(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def text(value: str) -> bytes:
    raw = value.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(raw)) + raw


def zip_with(path, pickle_bytes: bytes, method=zipfile.ZIP_STORED) -> None:
    with zipfile.ZipFile(path, "w", compression=method) as archive:
        archive.writestr("archive/data.pkl", pickle_bytes)
        archive.writestr("archive/version", "3\n")


def legacy_with(path, pickle_bytes: bytes) -> None:
    header = b"".join(pickle.dumps(value, protocol=2) for value in
                      (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}))
    path.write_bytes(header + pickle_bytes)


def system_call(marker) -> bytes:
    """``os.system("touch marker")`` as protocol-2 opcodes."""
    return (global_op("os", "system") + text(f"touch {marker}") + b"\x85R")


def tensor_call(shape_ops: bytes) -> bytes:
    """``{"w": torch._utils._rebuild_tensor_v2(storage, 0, <shape>, (1,), False, {})}``."""
    storage = (b"(" + text("storage") + global_op("torch", "FloatStorage") + text("0")
               + text("cpu") + b"K\x01tQ")
    return (b"\x80\x02}" + text("w") + global_op("torch._utils", "_rebuild_tensor_v2") + b"("
            + storage + b"K\x00" + shape_ops + b"K\x01\x85\x89}t" + b"Rs.")


# ---- every attack of issue 22, by name --------------------------------------------------


def write_attack(name: str, folder, marker) -> object:
    """Write the hostile input ``name`` into ``folder``; return the path to --inspect."""
    path = folder / "evil.pt"
    if name == "dcp_dotted_os_system":  # protocol 4, STACK_GLOBAL with a dotted name
        (folder / "dcp").mkdir()
        payload = (b"\x80\x04" + b"\x8c\x27torch.distributed.checkpoint.filesystem"
                   + b"\x8c\x09os.system\x93" + text(f"touch {marker}") + b"\x85R.")
        (folder / "dcp" / ".metadata").write_bytes(payload)
        return folder / "dcp"
    if name == "dcp_torch_save_to_dcp":
        (folder / "dcp").mkdir()
        payload = (b"\x80\x02" + global_op("torch.distributed.checkpoint.format_utils",
                                           "torch_save_to_dcp")
                   + text(str(folder / "x.pt")) + text(str(folder / "out")) + b"\x86R.")
        (folder / "dcp" / ".metadata").write_bytes(payload)
        return folder / "dcp"
    if name.startswith("needs_"):  # globals the old deny-list missed
        module, _, function = name.removeprefix("needs_").replace("-", ".").rpartition(":")
        zip_with(path, b"\x80\x02" + global_op(module, function) + text("pass") + b"\x85R.")
        return path
    if name == "getattr_import":  # getattr(__import__('os'), 'system')('touch ...')
        zip_with(path, b"\x80\x02" + global_op("builtins", "getattr")
                 + global_op("builtins", "__import__") + text("os") + b"\x85R"
                 + text("system") + b"\x86R" + text(f"touch {marker}") + b"\x85R.")
        return path
    if name == "inst_obj_newobj_ex":
        zip_with(path, b"\x80\x04(" + text(f"touch {marker}") + b"ios\nsystem\n"
                 + b"(" + global_op("os", "system") + text(f"touch {marker}") + b"o"
                 + global_op("os", "system") + b")}\x92" + b"\x87.")
        return path
    if name == "billion_laughs":  # 60 levels of shared references: 2**60 leaves if walked
        body = b"\x80\x02" + text("lol") + b"q\x00"
        for level in range(60):
            body += b"h" + bytes([level]) + b"h" + bytes([level]) + b"\x86q" + bytes([level + 1])
        zip_with(path, body + b".")
        return path
    if name == "memo_bomb":  # LONG_BINPUT 2**26: the C unpickler grows its memo to 2**26
        zip_with(path, b"\x80\x02]r\x00\x00\x00\x04.")
        return path
    if name in ("zip_bomb_deflate", "zip_bomb_bzip2", "zip_bomb_lying_header"):
        method = zipfile.ZIP_BZIP2 if name.endswith("bzip2") else zipfile.ZIP_DEFLATED
        repeats = 2**10 if method == zipfile.ZIP_BZIP2 else 33 * 2**20  # refused unread
        zip_with(path, b"\x80\x02N" + b"0N" * repeats + b".", method)
        if name == "zip_bomb_lying_header":  # the sizes say 1,000 bytes; the stream says more
            data = bytearray(path.read_bytes())
            for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
                at = data.find(signature)
                data[at + offset:at + offset + 4] = struct.pack("<I", 1000)
            path.write_bytes(bytes(data))
        return path
    if name == "many_globals":  # 160,000 distinct globals (the old inspector: 85 s)
        body = b"".join(global_op("m", f"g{i}") + b"0" for i in range(160_000))
        zip_with(path, b"\x80\x02" + body + b"N.")
        return path
    if name.startswith("shape_"):
        shape = {"shape_text": text("abc"), "shape_huge": b"\x8b" + struct.pack("<i", 167)
                 + (10**400).to_bytes(167, "little") + b"\x85",
                 "shape_mixed": text("x") + b"G" + struct.pack(">d", 2e8) + b"\x86"}[name]
        zip_with(path, tensor_call(shape))
        return path
    if name in ("dcp_tuple_key", "dcp_huge_size"):
        (folder / "dcp").mkdir()
        key = b"K\x01K\x02\x86" if name == "dcp_tuple_key" else text("w")
        size = (b"\x8b" + struct.pack("<i", 167) + (10**400).to_bytes(167, "little")
                if name == "dcp_huge_size" else b"K\x02")
        meta = "torch.distributed.checkpoint.metadata"
        item = (global_op(meta, "TensorStorageMetadata") + b")\x81}" + text("size")
                + global_op("torch", "Size") + size + b"\x85\x85R" + b"sb")
        body = (b"\x80\x02" + global_op(meta, "Metadata") + b")\x81}" + text("state_dict_metadata")
                + b"}" + key + item + b"ssb.")
        (folder / "dcp" / ".metadata").write_bytes(body)
        return folder / "dcp"
    if name == "advice_not_a_name":  # a module that, printed as `import ...`, is code
        code = ",".join(str(b) for b in f"open({str(marker)!r},'w')".encode())
        zip_with(path, b"\x80\x02" + global_op(f"argparse;exec(bytes(({code},)))", "Namespace")
                 + b"\x85.")
        return path
    if name.startswith("hash_bomb"):  # (x, x) sixty times over: 2**60 values to hash
        deep = b"K\x01" + b"q\x00h\x00\x86" * 60
        body = {"hash_bomb_dict": b"}" + deep + b"K\x00s", "hash_bomb_frozenset":
                b"(" + deep + b"\x91", "hash_bomb_dcp": global_op(
                    "torch.distributed.checkpoint.metadata", "Metadata") + b"(" + deep
                + b"K\x00d\x85R"}.get(name, b"")
        if name == "hash_bomb_dcp_path":  # the deep tuple as a storage file's name
            meta, fs = "torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint"
            body = (global_op(meta, "Metadata") + b")\x81}" + text("state_dict_metadata")
                    + b"}s" + text("storage_data") + b"}K\x00"
                    + global_op(fs + ".filesystem", "_StorageInfo") + b")\x81}"
                    + text("relative_path") + deep + b"sbssb")
        if name.startswith("hash_bomb_dcp"):
            (folder / "dcp").mkdir()
            (folder / "dcp" / ".metadata").write_bytes(b"\x80\x02" + body + b".")
            return folder / "dcp"
        zip_with(path, b"\x80\x02" + body + b".")
        return path
    if name == "bytearray_bomb":  # an allowed global, a hostile argument: bytearray(2**30)
        zip_with(path, b"\x80\x02" + global_op("__builtin__", "bytearray") + b"\x8a\x05"
                 + (2**30).to_bytes(5, "little") + b"\x85R.")
        return path
    if name in ("dcp_outside_path", "dcp_past_end"):  # storage_data points out, or past
        import dataclasses
        import warnings

        import torch.distributed.checkpoint as dcp

        with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
            warnings.simplefilter("ignore")
            for folder_name, value in (("dcp", 0.0), ("outside", 7.0)):
                dcp.save({"w": torch.full((3,), value)}, checkpoint_id=folder / folder_name,
                         no_dist=True)
        metadata = pickle.loads((folder / "dcp" / ".metadata").read_bytes())  # the test's own
        for key, info in metadata.storage_data.items():
            metadata.storage_data[key] = dataclasses.replace(info, **(
                {"relative_path": "../outside/" + info.relative_path}
                if name == "dcp_outside_path" else {"length": 10**9}))
        (folder / "dcp" / ".metadata").write_bytes(pickle.dumps(metadata))
        return folder / "dcp"
    if name == "safetensors_length_0x80":  # its first byte, 0x80, looks like a pickle's
        from safetensors.torch import save

        path = folder / "model.safetensors"
        path.write_bytes(next(data for data in (save({"w" * n: torch.zeros(2)})
                                                for n in range(1, 400)) if data[0] == 0x80))
        return path
    if name == "lone_surrogate_name":
        torch.save({"w\ud800": torch.ones(2)}, path)
        return path
    raise AssertionError(name)


NEEDS = ["needs_cProfile:run", "needs_profile:run", "needs_timeit:timeit",
         "needs_torch-utils-collect_env:run", "needs_numpy-testing-_private-utils:runstring"]
# (attack, the exit statuses it may get, a phrase the one output line or report must hold)
ATTACKS = [
    ("dcp_dotted_os_system", {1}, "dotted name"),
    ("dcp_torch_save_to_dcp", {1}, "torch_save_to_dcp can run code"),
    *[(name, {1}, "can run code") for name in NEEDS],
    ("getattr_import", {1}, "getattr can run code"),
    ("inst_obj_newobj_ex", {1}, "INST"),
    ("billion_laughs", {0}, "loads as it is"),  # shared tuples: harmless, bounded
    ("memo_bomb", {0}, "loads as it is"),
    ("zip_bomb_deflate", {2}, "MAX_PICKLE_BYTES"),
    ("zip_bomb_bzip2", {2}, "zip method 12"),
    ("zip_bomb_lying_header", {2}, "not readable"),
    ("many_globals", {2}, "MAX_GLOBALS"),
    ("shape_text", {2}, "invalid shape"),
    ("shape_huge", {2}, "MAX_INT_BYTES"),  # 10**400 as a shape: refused as an integer
    ("shape_mixed", {2}, "invalid shape"),
    ("dcp_tuple_key", {2}, "key that is not text"),
    ("dcp_huge_size", {2}, "MAX_INT_BYTES"),
    ("lone_surrogate_name", {0, 2}, "\\ud800"),
    ("advice_not_a_name", {1}, "not a Python name"),
    ("hash_bomb_dict", {2}, "MAX_KEY_SIZE"),
    ("hash_bomb_frozenset", {2}, "MAX_KEY_SIZE"),
    ("hash_bomb_dcp", {2}, "MAX_KEY_SIZE"),
    ("hash_bomb_dcp_path", {2}, "not a plain file name"),
    ("bytearray_bomb", {2}, "MAX_CONFIRM_BYTES"),
    ("dcp_outside_path", {2}, "not a plain file name"),
    ("dcp_past_end", {2}, "past its end"),
    ("safetensors_length_0x80", {0}, "loads as it is"),
]


@pytest.mark.parametrize(("name", "statuses", "phrase"), ATTACKS, ids=[a[0] for a in ATTACKS])
def test_each_attack_of_issue_22_runs_nothing_and_gets_its_status(tmp_path, capsys, name,
                                                                  statuses, phrase):
    marker = tmp_path / "CANARY"
    target = write_attack(name, tmp_path, marker)
    status, out, err = inspect_cli(target, capsys)
    assert_clean(out, err)
    assert status in statuses, out
    assert phrase in out, out
    if status == 2:
        assert out.count("\n") == 1
    if status == 1:  # never advice for a file with a known or suspected danger
        assert "WARNING" in out or "INST" in out
        assert "safe_globals([" not in out
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_global_not_on_the_danger_list_is_never_called_harmless(tmp_path, capsys):
    path = tmp_path / "ns.pt"
    torch.save({"args": __import__("argparse").Namespace(lr=0.1)}, path)
    status, out, err = inspect_cli(path, capsys)
    assert_clean(out, err)
    assert status == 1 and "argparse.Namespace" in out and "can run code" not in out
    assert "review each global" in out


def test_the_advice_warns_that_its_imports_run_module_code(tmp_path, capsys):
    """`import antigravity` opens a web browser: the advice says importing runs code."""
    zip_with(tmp_path / "m.pt", b"\x80\x02" + global_op("antigravity", "geohash") + b"\x85.")
    status, out, err = inspect_cli(tmp_path / "m.pt", capsys)
    assert_clean(out, err)
    assert status == 1 and "import antigravity" in out and "import-time code" in out


def test_a_file_swapped_after_its_read_is_not_the_one_confirmed(tmp_path, capsys, monkeypatch):
    """Replaced between the inspector's read and torch.load's: refused, not confirmed."""
    path = tmp_path / "m.pt"
    torch.save({"w": torch.ones(2)}, path)
    torch.save({"other": torch.zeros(3)}, tmp_path / "other.pt")
    walk = lesson._walk

    def swap_then_walk(*args, **kwargs):
        if (tmp_path / "other.pt").exists():
            os.replace(tmp_path / "other.pt", path)
        return walk(*args, **kwargs)

    monkeypatch.setattr(lesson, "_walk", swap_then_walk)
    status, out, err = inspect_cli(path, capsys)
    assert_clean(out, err)
    assert status == 2 and "changed between the inspection and the confirming load" in out


def test_the_advice_line_works_in_a_fresh_interpreter(tmp_path):
    """The printed lines, run as they are in a new Python, load the file (no edits)."""
    torch.save(SmallCNN(), tmp_path / "whole.pt")
    lesson.lightning_style_checkpoint(tmp_path / "lightning.ckpt")
    program = ""
    for name in ("whole.pt", "lightning.ckpt"):  # one fresh interpreter runs both, as printed
        report = lesson.inspect_checkpoint(tmp_path / name)
        assert report.status == 1 and not report.dangerous
        advice = lesson.safe_globals_line(report.needs)
        program += (f"path = {str(tmp_path / name)!r}\n"
                    + advice.replace("    torch.load", "    loaded = torch.load")
                    + "\nprint(type(loaded).__name__)\n")
    done = zygote.run([sys.executable, "-c", program], capture_output=True, text=True,
                      cwd=ROOT, timeout=120, check=False)
    assert done.returncode == 0, program + "\n" + done.stderr[-1500:]
    assert done.stdout.split() == ["SmallCNN", "dict"]
    assert "import common.models" in lesson.safe_globals_line(["common.models.SmallCNN"])


def test_fifos_and_symlinks_out_of_the_folder_are_refused(tmp_path, capsys):
    from safetensors.torch import save_file

    outside = tmp_path / "outside"
    outside.mkdir()
    save_file({"secret": torch.ones(2)}, outside / "secret.safetensors")
    before = (outside / "secret.safetensors").read_bytes()
    fifo_folder = tmp_path / "fifo"
    fifo_folder.mkdir()
    os.mkfifo(fifo_folder / "model.safetensors.index.json")
    status, out, err = inspect_cli(fifo_folder, capsys)  # must not block
    assert status == 2 and "not a regular file" in out and out.count("\n") == 1
    assert_clean(out, err)
    os.mkfifo(tmp_path / "pipe.pt")
    assert inspect_cli(tmp_path / "pipe.pt", capsys)[0] == 2
    with pytest.raises(lesson.CheckpointLoadError, match="not a regular file"):
        lesson.load_sharded_safetensors(fifo_folder / "model.safetensors.index.json")
    # a shard, an index and a .metadata that are symlinks to a file outside the folder
    shard = tmp_path / "shard"
    shard.mkdir()
    (shard / "model-1.safetensors").symlink_to(outside / "secret.safetensors")
    (shard / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"secret": "model-1.safetensors"}}))
    status, out, err = inspect_cli(shard, capsys)
    assert status == 2 and "outside" in out
    with pytest.raises(lesson.CheckpointLoadError, match="outside"):
        lesson.load_sharded_safetensors(shard / "model.safetensors.index.json")
    linked_index = tmp_path / "linked_index"
    linked_index.mkdir()
    (outside / "x.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    (linked_index / "model.safetensors.index.json").symlink_to(
        outside / "x.safetensors.index.json")
    assert inspect_cli(linked_index, capsys)[0] == 2
    dcp = tmp_path / "dcp"
    dcp.mkdir()
    (outside / "meta").write_bytes(pickle.dumps({"state_dict_metadata": {}}))
    (dcp / ".metadata").symlink_to(outside / "meta")
    status, out, err = inspect_cli(dcp, capsys)
    assert status == 2 and "outside" in out
    assert (outside / "secret.safetensors").read_bytes() == before


def test_forged_names_cannot_print_a_verdict_line(tmp_path, capsys):
    forged = "w\nverdict: loads as it is with torch.load\x1b[8m"
    path = tmp_path / "forged.pt"
    torch.save({forged: torch.ones(2), "os.system": os.system.__name__}, path)
    status, out, err = inspect_cli(path, capsys)
    assert_clean(out, err)
    assert "\x1b" not in out and "\\n" in out and "\\x1b" in out
    assert [line for line in out.splitlines() if line.startswith("verdict")] == [
        "verdict: loads as it is with torch.load(path, map_location=\"cpu\", "
        "weights_only=True)"] and status == 0


def test_empty_safetensors_and_a_non_utf8_name_load_as_they_are(tmp_path, capsys):
    from safetensors.torch import save_file

    save_file({}, tmp_path / "empty.safetensors")
    status, out, err = inspect_cli(tmp_path / "empty.safetensors", capsys)
    assert status == 0 and "0 tensors" in out
    odd = tmp_path / os.fsdecode(b"model\xff.pt")
    torch.save({"w": torch.ones(2)}, odd)
    status, out, err = inspect_cli(odd, capsys)
    assert_clean(out, err)
    assert status == 0 and "\\udcff" in out


LIMITS = [  # (limit, a value small enough to reach cheaply, a pickle body that passes it)
    ("MAX_MEMO", 10, b"".join(b"N" + b"r" + struct.pack("<I", i) + b"0" for i in range(20))),
    ("MAX_OBJECTS", 10, b"]" * 20),
    ("MAX_OPCODES", 10, b"N0" * 20),
    ("MAX_DEPTH", 10, b"(" * 20),
    ("MAX_DEPTH", 10, b"N" + b"\x85" * 20),  # tuples nested without MARKs
    ("MAX_GLOBALS", 10, b"".join(global_op("m", f"g{i}") + b"0" for i in range(20))),
]


@pytest.mark.parametrize(("limit", "value", "body"), LIMITS, ids=[f"{a}-{i}" for i, (a, *_) in
                                                                  enumerate(LIMITS)])
def test_each_limit_stops_with_one_line_naming_it(tmp_path, capsys, monkeypatch, limit, value,
                                                  body):
    monkeypatch.setattr(lesson, limit, value)
    zip_with(tmp_path / "x.pt", b"\x80\x02" + global_op("os", "system") + b"0" + body + b"N.")
    status, out, err = inspect_cli(tmp_path / "x.pt", capsys)
    assert_clean(out, err)
    assert status == 2 and out.count("\n") == 1 and f"{limit} = {value}" in out
    assert "os.system can run code" in out  # what it saw before the stop is named


def test_the_safetensors_header_and_pickle_sizes_are_bounded(tmp_path, capsys, monkeypatch):
    (tmp_path / "huge.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"{}" + b" " * 99)
    os.truncate(tmp_path / "huge.safetensors", 2**41)  # sparse: the claim fits the file
    status, out, err = inspect_cli(tmp_path / "huge.safetensors", capsys)
    assert status == 2 and "MAX_SAFETENSORS_HEADER = 100000000" in out
    monkeypatch.setattr(lesson, "MAX_PICKLE_BYTES", 100)
    legacy_with(tmp_path / "legacy.pt", b"N" * 200 + b".")
    status, out, err = inspect_cli(tmp_path / "legacy.pt", capsys)
    assert status == 2 and "MAX_PICKLE_BYTES = 100" in out


MEMORY_CHILD = textwrap.dedent("""
    import contextlib, io, json, sys, time
    sys.path.insert(0, sys.argv[1])
    from tests.conftest import load_script
    lesson = load_script("01_basic_save_load")

    def peak():
        with open("/proc/self/status") as handle:
            return int(next(l for l in handle if l.startswith("VmHWM:")).split()[1]) * 1024

    def inspect(path):
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # the peak starts again from the current RSS
        start, before = time.perf_counter(), peak()
        with contextlib.redirect_stdout(io.StringIO()):
            status = lesson.inspect_checkpoint(path).status
        return {"status": status, "seconds": time.perf_counter() - start, "peak": peak()}

    baseline = inspect(sys.argv[2])["peak"]
    print(json.dumps({path: {**inspect(path), "above": inspect(path)["peak"] - baseline}
                      for path in sys.argv[3:]}))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux peak RSS")
def test_the_bombs_stay_within_memory_in_a_child(tmp_path):
    """Peak RSS above an --inspect of a small file, per attack, in one fresh process."""
    torch.save({"w": torch.ones(2)}, tmp_path / "small.pt")
    targets = []
    for name in ("billion_laughs", "memo_bomb", "zip_bomb_deflate", "zip_bomb_bzip2",
                 "zip_bomb_lying_header", "many_globals", "bytearray_bomb", "hash_bomb_dict"):
        folder = tmp_path / name
        folder.mkdir()
        targets.append(str(write_attack(name, folder, folder / "CANARY")))
    done = zygote.run([sys.executable, "-c", MEMORY_CHILD, str(ROOT),
                       str(tmp_path / "small.pt"), *targets], capture_output=True,
                      text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    for path, figures in json.loads(done.stdout).items():
        print(f"{os.path.basename(os.path.dirname(path))}: status {figures['status']}, "
              f"{figures['seconds']:.2f} s, peak {figures['above'] / 1e6:.0f} MB above baseline")
        assert figures["above"] < 300e6, (path, figures)
        assert figures["status"] in (0, 2)  # the harmless bombs load; the others stop


# ---- the fuzz: hostile pickles in every container ---------------------------------------


def random_pickle(rng: random.Random, marker) -> tuple[bytes, bool]:
    """A hostile opcode stream; True when it names something that could run code."""
    pieces, dangerous = [b"\x80" + bytes([rng.choice([2, 4, 5])])], False
    for _ in range(rng.randint(1, 30)):
        kind = rng.randrange(14)
        if kind == 0:
            pieces.append(system_call(marker))
            dangerous = True
        elif kind == 1:  # STACK_GLOBAL with a dotted name
            pieces.append(text(rng.choice(["torch.distributed.checkpoint.filesystem", "os",
                                           "builtins"])) + text(rng.choice(
                ["os.system", "system", "exec", "getattr"])) + b"\x93")
            dangerous = True
        elif kind == 2:  # INST / OBJ / NEWOBJ_EX
            pieces.append(rng.choice([b"(" + text(f"touch {marker}") + b"ios\nsystem\n",
                                      b"(" + global_op("os", "system") + text("x") + b"o",
                                      global_op("os", "system") + b")}\x92"]))
            dangerous = True
        elif kind == 3:  # memo abuse
            pieces.append(rng.choice([b"r" + struct.pack("<I", rng.getrandbits(32)),
                                      b"j" + struct.pack("<I", rng.getrandbits(32)),
                                      b"\x94", b"h" + bytes([rng.randrange(256)])]))
        elif kind == 4:  # deep nesting
            pieces.append(b"(" * rng.randint(1, 300) + b"]" + b"\x85" * rng.randint(0, 300))
        elif kind == 5:  # shared structure
            pieces.append(b"]q\x00" + b"h\x00h\x00\x86q\x00" * rng.randint(1, 80))
        elif kind == 6:
            pieces.append(rng.choice([b"R", b"b", b"\x81", b"a", b"e", b"s", b"u", b"t",
                                      b"d", b"0", b"1", b"2", b"\x90", b"\x91"]))
        elif kind == 7:
            pieces.append(text(rng.choice(["\x1b[8m", "a\nverdict: ok", "\ud800", "w"])))
        elif kind == 8:
            pieces.append(bytes(rng.randrange(256) for _ in range(rng.randint(1, 12))))
        elif kind == 9:
            pieces.append(global_op(*rng.choice([("torch._utils", "_rebuild_tensor_v2"),
                                                 ("collections", "OrderedDict"),
                                                 ("argparse", "Namespace"),
                                                 ("copyreg", "_reconstructor")])))
        elif kind == 10:
            pieces.append(b"\x82" + bytes([rng.randrange(256)]))  # EXT1
        elif kind == 11:
            pieces.append(b"\x8b" + struct.pack("<i", rng.choice([4, 200, -1, 2**30]))
                          + b"\xff" * 4)
        elif kind == 12:
            pieces.append(b"}" + text("k") + b"(" + text("storage") + b"tQs")
        else:
            pieces.append(b"N")
    if rng.random() < 0.8:
        pieces.append(b".")
    return b"".join(pieces), dangerous


GLOBALS = [("os", "system"), ("builtins", "exec"), ("builtins", "getattr"), ("cProfile", "run"),
           ("torch._utils", "_rebuild_tensor_v2"), ("collections", "OrderedDict"),
           ("argparse", "Namespace"), ("torch", "Size"), ("timeit", "timeit"),
           ("torch.distributed.checkpoint.filesystem", "os.system")]


def valid_expression(rng: random.Random, marker, depth: int, state: dict) -> bytes:
    """One well-formed value: constants, structures, calls of globals, memo reuse."""
    kind = rng.randrange(9 if depth < 6 else 3)
    if kind == 0:
        return rng.choice([b"N", b"K\x07", b"\x88", b"G" + struct.pack(">d", 1.5),
                           text(rng.choice(["w", "\x1b[8m", "a\nverdict: ok", "\ud800"]))])
    if kind == 1 and state["memo"]:
        return b"h" + bytes([rng.randrange(state["memo"])])
    if kind in (1, 2):
        return b"\x8a\x01\x05"
    inner = [valid_expression(rng, marker, depth + 1, state) for _ in range(rng.randint(0, 3))]
    if kind == 3:
        body = b"(" + b"".join(inner) + b"t"
    elif kind == 4:
        body = b"]" + (b"(" + b"".join(inner) + b"e" if inner else b"")
    elif kind == 5:
        body = b"}(" + b"".join(text(f"k{i}") + value for i, value in enumerate(inner)) + b"u"
    elif kind == 6:  # a call of a global, maybe dangerous
        module, name = rng.choice(GLOBALS)
        state["dangerous"] |= (module, name) not in (("torch._utils", "_rebuild_tensor_v2"),
                                                    ("collections", "OrderedDict"),
                                                    ("argparse", "Namespace"), ("torch", "Size"))
        argument = text(f"touch {marker}") if name in ("system", "os.system") else (
            b"(" + b"".join(inner) + b"t")
        body = global_op(module, name) + (argument + b"\x85" if name.endswith("system")
                                          else argument) + b"R"
    elif kind == 7:  # INST / OBJ / NEWOBJ_EX
        state["dangerous"] = True
        body = rng.choice([b"(" + text(f"touch {marker}") + b"ios\nsystem\n",
                           b"(" + global_op("os", "system") + text(f"touch {marker}") + b"o",
                           global_op("os", "system") + b")}\x92"])
    else:  # a call of a call's result
        state["dangerous"] = True
        body = (global_op("builtins", "getattr") + global_op("builtins", "__import__")
                + text("os") + b"\x85R" + text("system") + b"\x86R"
                + text(f"touch {marker}") + b"\x85R")
    if state["memo"] < 250 and rng.random() < 0.5:
        body += b"q" + bytes([state["memo"]])
        state["memo"] += 1
    return body


def valid_pickle(rng: random.Random, marker) -> tuple[bytes, bool]:
    """A well-formed pickle: a dict of a few random values; True if it names a danger."""
    state = {"memo": 0, "dangerous": False}
    entries = b"".join(text(f"e{i}") + valid_expression(rng, marker, 0, state)
                       for i in range(rng.randint(1, 5)))
    return b"\x80\x02}(" + entries + b"u.", state["dangerous"]


def random_container(rng: random.Random, folder, marker) -> tuple[object, bool]:
    """Write one example into ``folder``; return (path to inspect, dangerous)."""
    body, dangerous = (valid_pickle if rng.random() < 0.5 else random_pickle)(rng, marker)
    container = rng.choice(["zip", "legacy", "dcp", "safetensors", "index"])
    path = folder / "model.pt"
    if container == "zip":
        zip_with(path, body)
    elif container == "legacy":
        legacy_with(path, body)
    elif container == "dcp":
        (folder / ".metadata").write_bytes(body)
        path = folder
    elif container == "safetensors":
        header = rng.choice([json.dumps({"w": {"dtype": "F32", "shape": [rng.randint(-2, 9)],
                                               "data_offsets": [0, rng.randint(0, 40)]}}),
                             "{" * rng.randint(1, 5000), json.dumps({"__metadata__": {
                                 "a\nverdict: ok": "\x1b[8m"}}), body.decode("latin-1")])
        raw = header.encode("utf-8", "surrogatepass")
        size = rng.choice([len(raw), 2**40, len(raw) + 7])
        path = folder / "model.safetensors"
        path.write_bytes(struct.pack("<Q", size) + raw + b"\0" * 8)
    else:
        elsewhere = str(folder.parent / "elsewhere.safetensors")  # absolute, outside
        weight_map = rng.choice([{"w": "../x.safetensors"}, {"w": elsewhere}, {"w": 3},
                                 {"w": "model.pt"}, {"w": "a\nverdict: ok"}, []])
        path = folder / "model.safetensors.index.json"
        path.write_text(json.dumps({"weight_map": weight_map}))
        zip_with(folder / "model.pt", body)
    return path, dangerous


def test_fuzz_hostile_pickles_in_every_container(tmp_path):
    rng, examples, slowest = random.Random(22), 600, 0.0
    marker = tmp_path / "CANARY"
    statuses = {0: 0, 1: 0, 2: 0}
    for number in range(examples):
        folder = tmp_path / f"e{number}"
        folder.mkdir()
        path, dangerous = random_container(rng, folder, marker)
        start, out = time.perf_counter(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            report = lesson.inspect_checkpoint(path)  # never raises
            lesson.print_inspection(report)
        slowest = max(slowest, time.perf_counter() - start)
        statuses[report.status] += 1
        assert_clean(out.getvalue(), "")
        if dangerous:
            assert report.status in (1, 2), out.getvalue()
        assert not marker.exists(), out.getvalue()
    print(f"fuzz: {examples} hostile inputs, exit statuses {statuses}, "
          f"slowest {slowest:.3f} s")


def test_a_slow_file_stops_at_max_seconds(tmp_path, capsys, monkeypatch):
    """Allowed calls that allocate and free in a loop (bytearray(10**8), each overwritten
    under one dict key) stay under the memory cap and would run for minutes: the deadline
    (MAX_SECONDS, lowered here) stops the inspection with exit 2 naming it."""
    monkeypatch.setattr(lesson, "MAX_SECONDS", 1)
    step = b"K\x00h\x00J" + struct.pack("<i", 10**8) + b"\x85Rs"
    body = b"\x80\x02c__builtin__\nbytearray\nq\x00}q\x01" + step * 400 + b"."
    zip_with(tmp_path / "slow.pt", body)
    status, out, err = inspect_cli(tmp_path / "slow.pt", capsys)
    assert (status, err) == (2, "") and "MAX_SECONDS" in out, out


def test_the_confirming_load_prints_no_warning_of_the_files_calls(tmp_path, capsys):
    """A deprecated constructor the file calls (torch.sparse.FloatTensor) warns inside
    torch.load; the inspector's stderr stays empty and its verdict is the only verdict."""
    zip_with(tmp_path / "sparse.pt", b"\x80\x02ctorch.sparse\nFloatTensor\nK\x03\x85R.")
    status, out, err = inspect_cli(tmp_path / "sparse.pt", capsys)
    assert err == "" and status in (0, 1, 2), err
    assert "verdict" in out or "not readable" in out


def test_a_gpu_constructor_is_never_confirmed_on_a_gpu_machine(tmp_path, capsys, monkeypatch):
    """torch.cuda.FloatTensor is on weights_only's allow-list (a file may call it on 2**40); on
    a machine with a GPU the confirming load would allocate GPU memory, which the memory cap
    does not bound."""
    called = []
    monkeypatch.setattr(lesson, "_confirm_load", lambda *args, **kwargs: called.append(args))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    zip_with(tmp_path / "gpu.pt", b"\x80\x02ctorch.cuda\nFloatTensor\nK\x03\x85R.")
    status, out, err = inspect_cli(tmp_path / "gpu.pt", capsys)
    assert_clean(out, err)
    assert status == 2 and called == []
    assert "torch.cuda.FloatTensor, a constructor that allocates GPU memory" in out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU machine confirms
    inspect_cli(tmp_path / "gpu.pt", capsys)
    assert len(called) == 1


def test_a_gpu_checkpoint_of_torch_1_12_is_confirmed_on_a_gpu_machine(tmp_path, capsys,
                                                                      monkeypatch):
    """torch <= 1.12 named torch.cuda.FloatStorage as the storage type of every GPU tensor:
    weights_only never calls it, so the guard above must not refuse such a file."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with lesson.saved_as_if_on_cuda():
        torch.save({"w": torch.randn(3, 4)}, tmp_path / "modern.pt")
    with zipfile.ZipFile(tmp_path / "modern.pt") as archive:
        records = {name: archive.read(name) for name in archive.namelist()}
    pickled = next(name for name in records if name.endswith("/data.pkl"))
    old = records[pickled].replace(b"ctorch\nFloatStorage\n", b"ctorch.cuda\nFloatStorage\n")
    assert old != records[pickled]
    writer = torch._C.PyTorchFileWriter(str(tmp_path / "torch112.pt"))
    for name, data in records.items():
        record = name.split("/", 1)[1]
        if record.startswith((".data/", ".format_version", ".storage_alignment", "byteorder",
                              "version", "serialization_id")):
            continue  # the writer adds its own
        data = old if name == pickled else data
        writer.write_record(record, data, len(data))
    writer.write_end_of_file()
    del writer
    status, out, err = inspect_cli(tmp_path / "torch112.pt", capsys)
    assert_clean(out, err)
    assert status == 0 and "torch.cuda.FloatStorage" in out, out
