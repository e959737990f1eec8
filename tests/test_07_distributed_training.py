"""Unit tests of 07's prefix helpers, plus runs under torchrun and two overlapping runs."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch
from torch import nn

from common.compare import max_abs_diff
from common.models import SmallCNN
from tests import zygote
from tests.conftest import ROOT, background_work, load_script

lesson = load_script("07_distributed_training")
SCRIPT = str(ROOT / "07_distributed_training.py")


@pytest.mark.parametrize("wrap", [
    lambda m: nn.DataParallel(m),
    lambda m: torch.compile(m),
    lambda m: torch.compile(nn.DataParallel(m)),
], ids=["DataParallel", "compile", "compile(DataParallel)"])
def test_portable_state_dict_strips_wrapper_prefixes(wrap):
    model = SmallCNN()
    wrapped = wrap(model).state_dict()
    assert not next(iter(wrapped)).startswith("backbone.")
    portable = lesson.portable_state_dict(wrapped)
    assert list(portable) == list(model.state_dict())
    plain = SmallCNN()
    plain.load_state_dict(portable)  # strict, and _metadata keys were renamed too
    assert max_abs_diff(plain.state_dict(), model.state_dict()) == 0.0


def test_a_submodule_called_module_is_not_stripped():
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = nn.Linear(2, 2)
            self.other = nn.Linear(2, 1)

    state_dict = Holder().state_dict()
    assert list(lesson.portable_state_dict(state_dict)) == list(state_dict)


def test_portable_state_dict_copies_cpu_tensors():
    state_dict = OrderedDict({"module.w": torch.ones(2)})
    portable = lesson.portable_state_dict(state_dict)
    assert list(portable) == ["w"] and portable["w"].device.type == "cpu"
    assert list(state_dict) == ["module.w"]  # the input is left alone
    assert portable["w"].data_ptr() != state_dict["module.w"].data_ptr()  # a copy, not a view
    state_dict["module.w"].add_(1)  # training goes on: the snapshot does not follow
    assert torch.equal(portable["w"], torch.ones(2))


@pytest.mark.cuda("portable_state_dict moves tensors from a GPU to the CPU")
def test_portable_state_dict_moves_gpu_tensors_to_the_cpu():
    on_gpu = OrderedDict({"module.w": torch.arange(3.0, device="cuda")})
    portable = lesson.portable_state_dict(on_gpu)
    assert list(portable) == ["w"] and portable["w"].device.type == "cpu"
    assert torch.equal(portable["w"], torch.arange(3.0)) and on_gpu["module.w"].is_cuda


def test_the_backend_is_decided_once_and_too_few_gpus_is_a_clear_error():
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    too_many = gpus + 1
    with pytest.raises(SystemExit, match=f"{too_many} processes per node need one GPU each"):
        lesson.torchrun_device_type("cuda", too_many)
    assert lesson.torchrun_device_type("auto", too_many) == "cpu"  # every rank: the same
    assert lesson.torchrun_device_type("cpu", 1) == "cpu"


def test_reshard_world_differs():
    for world in (1, 2, 3, 4):
        assert lesson.reshard_world(world) != world


def summary_of(out_dir):
    return json.loads((out_dir / "summary.json").read_text())


OVERLAP = """
import os, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from tests.conftest import load_script
lesson = load_script("07_distributed_training")
out_dir, other_job, release = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
start_processes = lesson.mp.start_processes


def waiting(until):  # poll, but never past 600 s or an orphaned parent (pytest killed)
    deadline = time.monotonic() + 600
    while not until() and time.monotonic() < deadline and os.getppid() != 1:
        time.sleep(0.05)


def start_alongside_the_other_job(*args, **kwargs):
    # in_world holds its rendezvous store by now, on the port its processes get
    print("store on port", kwargs["args"][3], flush=True)
    # after its section 3b the torchrun job is about to start a world of its own
    waiting(lambda: (other_job / "portable_model.pt").exists() or release.exists())
    start_processes(*args, **kwargs)
    waiting(release.exists)  # hold the store until the torchrun job has ended


lesson.mp.start_processes = start_alongside_the_other_job
run = lesson.setup(["--device", "cpu", "--out-dir", out_dir])
print(lesson.in_world(run, 2, lesson.lesson_2_ddp)["ddp_ranks_max_abs_diff"])
"""


@background_work
def torchrun_beside_another_job(tmp_path):
    """The test below, its processes run from the session's start (conftest's
    background_work): torchrun's CompletedProcess and out-dir, the other job's output and exit
    status."""
    release, torchrun_out = tmp_path / "release", tmp_path / "torchrun_out"
    other = zygote.popen([sys.executable, "-c", OVERLAP.format(root=str(ROOT)),
                          str(tmp_path / "other_out"), str(torchrun_out), str(release)],
                         cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    lines, completed = [], None
    try:  # wait until the other job holds its store: then start torchrun
        while not (lines and lines[-1].startswith("store on port")):
            lines.append(other.stdout.readline())
            assert lines[-1], "".join(lines)[-3000:]  # it ended before holding a store
        completed = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone",
             "--nproc_per_node=3", SCRIPT, "--device", "cpu", "--out-dir", str(torchrun_out)],
            cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
    finally:
        release.touch()
        if completed is None:  # the start failed: the other job is not left running
            other.kill()
    output = "".join(lines) + other.communicate(timeout=600)[0]
    return completed, torchrun_out, output, other.returncode


def test_runs_under_torchrun_while_another_job_starts_a_world(background_result):
    """torchrun's 3 processes are the saving world, and its rank 0 starts a world of 2 for
    lesson 4, while a second job on this machine holds a world's rendezvous store of its own
    and runs a world of 2 after the torchrun job's section 3b, as it moves to its own world:
    each gets its own port (the parent holds it), and neither waits for or joins the other."""
    completed, torchrun_out, output, other_status = background_result(
        torchrun_beside_another_job)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-3000:]
    metrics = summary_of(torchrun_out)["metrics"]
    assert metrics["save_world_size"] == 3 and metrics["reshard_world_size"] == 2
    assert metrics["dcp_files"] == 3
    assert metrics["reshard_max_abs_diff"] == 0.0
    assert metrics["reshard_optimizer_max_abs_diff"] == 0.0  # Adam's state resharded too
    assert metrics["ddp_ranks_max_abs_diff"] == 0.0
    assert metrics["dcp_no_dist_max_abs_diff"] == 0.0
    assert other_status == 0, output[-3000:]
    assert output.strip().splitlines()[-1] == "0.0"
    assert "======== 2. DDP" in output  # the lesson's banner and rank 0's lines came back
