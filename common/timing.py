"""``benchmark``: the one way every lesson measures speed (warm-up, repeats, median, p90)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from common.devices import synchronize


@dataclass(frozen=True)
class Timing:
    """Wall-clock figures of one benchmark, in milliseconds."""

    median_ms: float
    p90_ms: float
    min_ms: float
    repeats: int
    warmup: int

    def __str__(self) -> str:
        return f"median {self.median_ms:.3f} ms (p90 {self.p90_ms:.3f} ms, n={self.repeats})"


def benchmark(
    fn: Callable[[], object],
    *,
    warmup: int = 3,
    repeats: int = 20,
    device: torch.device | str = "cpu",
    setup: Callable[[], object] | None = None,
) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeats`` timed ones.

    ``setup`` (optional) runs untimed before every call, e.g. to wait for background work that
    should not be charged to the next call.

    On CUDA, kernels run asynchronously, so the device is synchronised before and after each
    call; without that a GPU timing measures only how fast work is queued. The median is robust
    to the odd slow run (another process, a page fault); p90 shows the tail.
    """
    return benchmark_interleaved({"fn": fn}, warmup=warmup, repeats=repeats, device=device,
                                 setup={"fn": setup} if setup is not None else None)["fn"]


def benchmark_interleaved(
    fns: Mapping[str, Callable[[], object]],
    *,
    warmup: int = 1,
    repeats: int = 3,
    device: torch.device | str = "cpu",
    setup: Mapping[str, Callable[[], object]] | None = None,
) -> dict[str, Timing]:
    """Time several operations in rounds; each round calls every one of them once.

    Use it to compare operations that share a resource, such as the disk: a slowdown that
    drifts over time (a virtual disk that is slow until its space has been written once,
    page-cache writeback, another process) then hits every operation alike, instead of
    whichever happened to run first. The first ``warmup`` rounds are not timed. ``setup``
    maps a name to an untimed call made before that operation each time.
    """
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    setup = setup or {}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for round_number in range(warmup + repeats):
        for name, fn in fns.items():
            if name in setup:
                setup[name]()
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            if round_number >= warmup:
                samples[name].append((time.perf_counter() - start) * 1000.0)
    return {name: _summarise(times, warmup) for name, times in samples.items()}


def _summarise(samples: list[float], warmup: int) -> Timing:
    samples = sorted(samples)
    p90_index = min(len(samples) - 1, round(0.9 * (len(samples) - 1)))
    return Timing(
        median_ms=statistics.median(samples),
        p90_ms=samples[p90_index],
        min_ms=samples[0],
        repeats=len(samples),
        warmup=warmup,
    )
