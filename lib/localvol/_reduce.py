"""Float64 reductions over long parameter vectors without a float64 copy of the whole vector.

At N = 1e9 a (B, N) float64 copy would take 8 GB per row; these sum in chunks of the last axis.
"""
from __future__ import annotations

import torch

_CHUNK = 1 << 22  # checksum64's chunk (its value is part of resume-file fingerprints)
_CACHE_ELEMENTS = 1 << 16  # row_dots64 converts blocks of about this many elements (cache-sized)


def row_dots64(*terms) -> list[torch.Tensor]:
    """Several weighted row dot products Σ_j x_ij y_ij w_j, accumulated in float64, in ONE pass.

    Each term is a tuple ``(x, y, weight)``: x is (B, N) or (N,); y is None (then y = x),
    (B, N) or (N,) (broadcast over rows, e.g. the anchor); weight is None, a Python float or an
    (N,) tensor. The tensors are read in column blocks of about 2^16 elements: each block of
    each distinct tensor is converted to float64 once and shared by every term that uses it,
    so a (B, N) float64 copy is never made (at N = 1e9 it would take 8 GB per row) and the
    blocks stay in cache.

    Returns:
        one float64 tensor per term, on x's device: (B,) for a (B, N) x, 0-d for an (N,) x.
    """
    n = terms[0][0].shape[-1]
    rows = max([t[0].shape[0] if t[0].ndim == 2 else 1 for t in terms])
    width = max(1, _CACHE_ELEMENTS // rows)
    device = terms[0][0].device
    totals = [torch.zeros(t[0].shape[:-1], dtype=torch.float64, device=device) for t in terms]
    for s in range(0, n, width):
        block = {}

        def f64(t):  # this block of t in float64, converted once per block
            key = id(t)
            if key not in block:
                block[key] = t[..., s : s + width].to(device, torch.float64)
            return block[key]

        for total, (x, y, weight) in zip(totals, terms):
            xs = f64(x)
            prod = xs * xs if y is None or y is x else xs * f64(y)
            if isinstance(weight, torch.Tensor):
                prod *= f64(weight)
            elif weight is not None:
                prod *= float(weight)
            total += prod.sum(-1)
    return totals


def row_dot64(x: torch.Tensor, y: torch.Tensor | None = None, weight=None) -> torch.Tensor:
    """Σ_j x_ij y_ij w_j per row, accumulated in float64: (B, N) x (B or 1, N) -> (B,) float64.

    ``y`` defaults to ``x`` (squared norms); ``weight`` is None, a float, or an (N,) tensor.
    Works for 1-D x too (returns a 0-d tensor). One term of :func:`row_dots64`.
    """
    return row_dots64((x, y, weight))[0]


def checksum64(x: torch.Tensor) -> float:
    """Σ_j x_j w_j over the flattened tensor with fixed irrational weights w_j = frac(j φ) − ½.

    A cheap fingerprint of a long vector (order-sensitive, unlike a plain sum), chunked.
    """
    flat = x.detach().reshape(-1)
    total = 0.0
    for s in range(0, flat.numel(), _CHUNK):
        chunk = flat[s : s + _CHUNK].double()
        j = torch.arange(s, s + chunk.numel(), device=chunk.device, dtype=torch.float64)
        w = torch.frac(j * 0.6180339887498949) - 0.5
        total += float((chunk * w).sum())
    return total
