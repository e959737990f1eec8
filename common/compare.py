"""``max_abs_diff``, the figure behind every "identical" claim, and ``bit_identical``."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def max_abs_diff(
    a: torch.Tensor | Mapping[str, torch.Tensor], b: torch.Tensor | Mapping[str, torch.Tensor]
) -> float:
    """Largest ``|a - b|`` over two tensors, or over two state_dicts with the same keys.

    Tensors are compared on the CPU in float64, so integer buffers (BatchNorm's
    ``num_batches_tracked``) and tensors on different devices compare too. ``0.0`` means equal
    VALUES, not equal bits: ``-0.0`` and ``0.0`` differ by 0.0, and a NaN anywhere gives
    ``nan``. For bit identity use :func:`bit_identical`. Different keys or shapes are an
    error, never a silent ``inf``.
    """
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        if a.keys() != b.keys():
            raise KeyError(f"different keys: only in a {sorted(a.keys() - b.keys())}, "
                           f"only in b {sorted(b.keys() - a.keys())}")
        return max((max_abs_diff(a[k], b[k]) for k in a), default=0.0)
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        raise TypeError("compare two tensors or two mappings of tensors")
    if a.shape != b.shape:
        raise ValueError(f"different shapes: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.numel() == 0:
        return 0.0
    diff = a.detach().to("cpu", torch.float64) - b.detach().to("cpu", torch.float64)
    return float(diff.abs().max())


def bit_identical(
    a: torch.Tensor | Mapping[str, torch.Tensor], b: torch.Tensor | Mapping[str, torch.Tensor]
) -> bool:
    """True when two tensors (or state_dicts) hold the same dtype, shape and BYTES.

    ``torch.equal(torch.tensor(0.0), torch.tensor(-0.0))`` is True and NaN != NaN, so value
    comparisons cannot prove bit identity; this compares the raw bytes (an integer view).
    """
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(bit_identical(a[k], b[k]) for k in a)
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        raise TypeError("compare two tensors or two mappings of tensors")
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    as_bytes = [t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8) for t in (a, b)]
    return torch.equal(*as_bytes)
