"""Device choice, seeding and environment facts for summaries."""

from __future__ import annotations

import os
import platform
import random
import sys

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
