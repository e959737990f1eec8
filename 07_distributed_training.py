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

Run it:   python 07_distributed_training.py [--device cpu|cuda] [--out-dir DIR] [--seed N]
          (spawns its own process groups: 2 processes, then 3, with gloo on the CPU)
   or:    torchrun --standalone --nproc_per_node=N 07_distributed_training.py [...]
          (any N; then the torchrun processes are the training world)
Takes:    about 16 s on a 2-core CPU (each of the 5 processes imports torch).
Next:     you have the whole path; the README's "Common problems" maps errors to sections.

Multi-GPU and multi-node notes:
  - Backend: gloo runs on CPUs (and here on a laptop); nccl is the GPU backend. Each process
    drives ONE GPU: torch.cuda.set_device(LOCAL_RANK) and device = f"cuda:{LOCAL_RANK}".
    LOCAL_RANK is the GPU index within a node; RANK is global across nodes (rank 8 of a
    2 x 8-GPU job is LOCAL_RANK 0 on the second node: never f"cuda:{RANK}"). Choose the
    backend ONCE for the whole job: if some ranks picked nccl and others gloo, the job hangs.
    Here, asking for CUDA with fewer GPUs than processes per node is a clear error.
  - Multi-node: torchrun --nnodes=2 --node_rank=K --rdzv-endpoint=HOST:PORT on each node;
    checkpoints must go to storage every node sees (a shared file system or object store).
  - Saving on rank 0 only (a full state_dict) is simple and portable but gathers the whole
    model into one process's memory; sharded saves (DCP) write in parallel, one file per rank,
    and never hold the full model anywhere.
  - Loading: map_location=device (this rank's cuda:LOCAL_RANK) keeps every rank off GPU 0. For
    full state_dicts on big models, StateDictOptions(full_state_dict=True, cpu_offload=True,
    broadcast_from_rank0=True) loads on rank 0 and broadcasts, instead of N copies in RAM.
"""

from __future__ import annotations

import datetime
import gc
import multiprocessing
import os
import shutil
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

from common.compare import max_abs_diff
from common.data import make_image_classification
from common.distributed import call_in_script
from common.models import SmallCNN
from common.run import Run, format_bytes, in_notebook, make_parser, script_file

HERE = script_file(globals(), "07_distributed_training.py")  # a notebook kernel has no __file__
SAVE_WORLD = 2  # processes that train and save (in the default, self-spawning mode)
# A collective that waits longer than this raises instead of hanging forever. torch's defaults:
# 10 min for nccl (torch.distributed.constants.default_pg_nccl_timeout), 30 min for gloo.
GROUP_TIMEOUT = datetime.timedelta(minutes=3)
NO_DIST_WARNING = "torch.distributed is disabled, unavailable or uninitialized"

# ############################################################################################
# Reusable pieces: copy these into your own code.
# ############################################################################################

WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP, torch.compile


def portable_state_dict(state_dict: Mapping[str, torch.Tensor]) -> OrderedDict:
    """A state_dict any plain model can load: wrapper prefixes stripped, tensors on the CPU.

    A prefix is stripped only when EVERY key has it (a model may legitimately own a submodule
    called "module"), repeatedly, so nested wrappers ("_orig_mod.module.") go too. It uses
    torch's own consume_prefix_in_state_dict_if_present, which also fixes the _metadata
    (module versions, see 03) that load_state_dict reads.
    """
    result = OrderedDict((k, v.detach().cpu()) for k, v in state_dict.items())
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
    context = mp.get_context(START_METHOD)
    if START_METHOD == "forkserver":  # the server imports these once; each child is a fork
        context.set_forkserver_preload(["torch", "torch.distributed.checkpoint",
                                        "torch.distributed.fsdp", "common.distributed"])
    results = context.SimpleQueue()
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


# "forkserver" starts one small server process that imports torch once; every world after the
# first forks its processes from it in about a second instead of re-importing torch in each
# (5 s a world here). Where it does not exist (Windows), "spawn" is the portable choice. Both
# start clean processes: never "fork" a process that may have initialised CUDA or threads.
START_METHOD = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"

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


def setup(argv: list[str] | None = None) -> Run:
    """Start the run (one process: the parent of the worlds that lessons 2-4 spawn)."""
    run = Run.start(HERE, make_parser(HERE, __doc__.splitlines()[0]), argv)
    clean_outputs(run.out_dir)
    return run


if in_notebook():
    run = setup()



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
    train_steps(model, optimizer, device, epochs=1, seed=seed + 1)  # training goes on...
    future.result()  # ...and the write is waited for before anything reads it or we exit
    log0(f"  dcp.async_save returned after {async_seconds * 1000:.1f} ms; training went on "
         "while it wrote; future.result() waited for it")
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
# broadcast_from_rank0=True)) sends each rank its shards (the other ranks pass an empty
# dict). One surprise, measured below: it CONSUMES that dict on rank 0, replacing entries
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
# process (it warns that torch.distributed is not initialised: that is the point), and
# torch.distributed.checkpoint.format_utils.dcp_to_torch_save(folder, "model.pt") converts the
# whole checkpoint into one ordinary file; torch_save_to_dcp goes the other way (below).
# Both exist as a command too: python -m torch.distributed.checkpoint.format_utils
# dcp_to_torch SRC DST, or torch_to_dcp SRC DST. Trusted files only: torch_save_to_dcp runs
# torch.load(weights_only=False) on its input (the weights_only path is in section 4b), and
# dcp.load / dcp_to_torch_save of a folder you did not write runs its .metadata pickle
# (FileSystemReader.read_metadata is a plain pickle.load) and torch.load(weights_only=False)
# on its non-tensor values: check such a folder first with
#   python 01_basic_save_load.py --inspect FOLDER   (01 section 13)


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
    if expected:
        print(f"  (expected warning, as no process group exists here: {expected[0][:60]}...)")
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


# %% Summary
# What the run measured, the files it wrote (also in summary.json), and what to try next.
RECAP = [
    "save the unwrapped module (or portable_state_dict): no 'module.'/'_orig_mod.', CPU tensors",
    "DDP: rank 0 saves, barrier, every rank loads with its own map_location",
    "FSDP2: dcp.save/load with get_state_dict/set_state_dict; a DCP checkpoint reshards "
    "to any world size; full_state_dict for one portable file",
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
    run.record_all(lesson_1_prefixes(run))
    run.record_all(in_world(run, SAVE_WORLD, lesson_2_ddp, lesson_3_fsdp2,
                            lesson_3b_full_and_async))  # one world of SAVE_WORLD processes
    run.record_all(in_world(run, reshard_world(SAVE_WORLD), lesson_4_reshard,
                            lesson_4b_full_into_fsdp2))
    run.record_all(lesson_5_no_process_group(run))
    return finish(run, SAVE_WORLD, reshard_world(SAVE_WORLD))


def main_under_torchrun(argv: list[str] | None) -> dict | None:
    """torchrun started N processes: they are the saving world (lessons 2-3b run on all of
    them); rank 0 then spawns a world of another size for lesson 4 and reports."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    parser = make_parser(HERE, __doc__.splitlines()[0])
    args = parser.parse_args(argv)
    device_type = torchrun_device_type(args.device, int(os.environ.get("LOCAL_WORLD_SIZE",
                                                                       world)))
    device = rank_device(device_type, int(os.environ.get("LOCAL_RANK", 0)))
    init_process_group(device)  # env:// rendezvous, set up by torchrun
    try:
        run = setup(argv) if rank == 0 else None
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
        dist.barrier()  # the other ranks wait while rank 0 reshards and reports
        summary = finish(run, world, reshard_world(world)) if run is not None else None
        end_cleanly()
        return summary
    finally:
        dist.destroy_process_group()


if __name__ == "__main__" and not in_notebook():
    main()
