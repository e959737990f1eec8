"""``benchmark``: the one way every lesson measures speed (warm-up, repeats, median, p90)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
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
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    samples = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append((time.perf_counter() - start) * 1000.0)
    samples.sort()
    p90_index = min(len(samples) - 1, round(0.9 * (len(samples) - 1)))
    return Timing(
        median_ms=statistics.median(samples),
        p90_ms=samples[p90_index],
        min_ms=samples[0],
        repeats=repeats,
        warmup=warmup,
    )
