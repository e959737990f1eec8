"""Device choice, seeding and environment facts for summaries."""

from __future__ import annotations

import contextlib
import os
import platform
import random
import sys
from collections.abc import Iterator

import numpy as np
import torch


def pick_device(name: str = "auto") -> torch.device:
    """Return the device to run on: ``"auto"`` picks CUDA when present, else the CPU.

    Asking for ``"cuda"`` on a machine without it is an error, not a silent fallback: a reader
    who asked for the GPU should learn that they did not get it.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name} was asked for, but torch.cuda.is_available() is False")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise SystemExit(f"unknown device {name!r}: use auto, cpu or cuda")
    return torch.device(name)


@contextlib.contextmanager
def deterministic_kernels(device: torch.device, warn_only: bool = False) -> Iterator[None]:
    """On CUDA, deterministic kernels inside the block; the previous settings come back on
    exit. On the CPU it does nothing (the CPU kernels used here are deterministic already).

    cuDNN picks convolution algorithms per run (benchmark mode) and some CUDA backward
    kernels add with atomics, so two identical runs differ in the last bits. This sets
    torch.use_deterministic_algorithms(True) (``warn_only``: an op with no deterministic
    kernel warns instead of raising), cudnn.deterministic = True and cudnn.benchmark =
    False: repeatable on the same GPU model, driver and torch build. Earlier torch releases
    refused cuBLAS in this mode unless CUBLAS_WORKSPACE_CONFIG was ":4096:8" or ":16:8", so it
    is set for the block when absent (torch 2.14's libraries no longer hold that check; torch
    reads the variable when it creates a cuBLAS workspace, so to cover a whole run, export
    it before starting Python).
    """
    if device.type != "cuda":
        yield
        return
    cudnn = torch.backends.cudnn
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             cudnn.deterministic, cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        cudnn.deterministic, cudnn.benchmark = saved[2], saved[3]
        if saved[4] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work to finish; a no-op on the CPU. Call it before reading a clock."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def environment(device: torch.device | str) -> dict[str, str | int | bool]:
    """Facts a reader needs to compare a run with theirs (versions, device, threads)."""
    device = torch.device(device)
    facts: dict[str, str | int | bool] = {
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "cpu_count": os.cpu_count() or 1,
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
    }
    if device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
        facts["cuda"] = str(torch.version.cuda)
    return facts
