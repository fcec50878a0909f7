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
