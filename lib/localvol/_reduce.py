"""Float64 reductions over long parameter vectors without a float64 copy of the whole vector.

At N = 1e9 a (B, N) float64 copy would take 8 GB per row; these sum in chunks of the last axis.
"""
from __future__ import annotations

import torch

_CHUNK = 1 << 22


def row_dot64(x: torch.Tensor, y: torch.Tensor | None = None, weight=None) -> torch.Tensor:
    """Σ_j x_ij y_ij w_j per row, accumulated in float64: (B, N) x (B or 1, N) -> (B,) float64.

    ``y`` defaults to ``x`` (squared norms); ``weight`` is None, a float, or an (N,) tensor.
    Works for 1-D x too (returns a 0-d tensor).
    """
    y = x if y is None else y
    n = x.shape[-1]
    total = torch.zeros(x.shape[:-1], dtype=torch.float64, device=x.device)
    for s in range(0, n, _CHUNK):
        xs = x[..., s : s + _CHUNK].double()
        ys = y[..., s : s + _CHUNK].double()
        prod = xs * ys
        if isinstance(weight, torch.Tensor):
            prod = prod * weight[s : s + _CHUNK].to(x.device, torch.float64)
        elif weight is not None:
            prod = prod * float(weight)
        total = total + prod.sum(-1)
    return total


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
