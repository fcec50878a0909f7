"""Float64 reductions over long parameter vectors without a float64 copy of the whole vector.

At N = 1e9 a (B, N) float64 copy would take 8 GB per row; these sum in chunks of the last axis.
"""
from __future__ import annotations

import torch

_CHUNK = 1 << 22  # checksum64's chunk (its value is part of resume-file fingerprints)
_CACHE_ELEMENTS = 1 << 17  # row_dots64 reads blocks of about this many elements (fastest on a 2-core x86 VM)
_RUN = 1 << 10  # elements summed in order before their sums are added (_sum_last)


def row_dots64(*terms) -> list[torch.Tensor]:
    """Several weighted row dot products Σ_j x_ij y_ij w_j, accumulated in float64, in ONE pass.

    Each term is a tuple ``(x, y, weight)``: x is (B, N) or (N,); y is None (then y = x),
    (B, N) or (N,) (broadcast over rows, e.g. the anchor); weight is None, a Python float or an
    (N,) tensor. The tensors are read in column blocks of about 2^17 elements, each block of
    each distinct tensor copied once into a reused float64 buffer shared by every term that
    uses it: a (B, N) float64 copy is never made (at N = 1e9 it would take 8 GB per row) and
    the blocks stay in cache. Products are exact in float64 for float32 inputs.

    Returns:
        one float64 tensor per term, on x's device: (B,) for a (B, N) x, 0-d for an (N,) x.
    """
    device = terms[0][0].device
    n = terms[0][0].shape[-1]
    tensors = {}
    for x, y, weight in terms:
        for t in (x, y, weight):
            if isinstance(t, torch.Tensor):
                tensors[id(t)] = t
    rows = max(t.shape[0] if t.ndim == 2 else 1 for t in tensors.values())
    width = max(1, min(n, _CACHE_ELEMENTS // max(rows, 1)))
    buffers = {k: torch.empty(t.shape[:-1] + (width,), dtype=torch.float64, device=device)
               for k, t in tensors.items()}
    totals = [torch.zeros(torch.broadcast_shapes(x.shape[:-1], () if y is None else y.shape[:-1]),
                          dtype=torch.float64, device=device) for x, y, _ in terms]
    if rows == 0:
        return totals
    for s in range(0, n, width):
        w = min(width, n - s)
        block = {}
        for k, t in tensors.items():
            block[k] = buffers[k][..., :w]
            block[k].copy_(t[..., s : s + w])
        for total, (x, y, weight) in zip(totals, terms):
            xs = block[id(x)]
            ys = xs if y is None else block[id(y)]
            if isinstance(weight, torch.Tensor):
                xs = xs * block[id(weight)]
            total += _dot(xs, ys)
    for total, (_, _, weight) in zip(totals, terms):
        if weight is not None and not isinstance(weight, torch.Tensor):
            total *= float(weight)
    return totals


def _dot(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Row-wise dot product of float64 blocks, (B, W) or (W,) each, broadcast over rows."""
    return _sum_last(xs * ys)


def _sum_last(p: torch.Tensor) -> torch.Tensor:
    """Sum over the last axis in an order that does not depend on the thread count.

    PyTorch splits a large reduction over threads when it has a single output (as BLAS splits a
    gemv or dot), so its last bits depend on how many threads there are, and with them
    resume-file fingerprints and per-sample terms. Here runs of :data:`_RUN` consecutive
    elements are summed (many outputs, each summed by one thread), and the run sums again in
    runs, until at most :data:`_RUN` values are left: every partial sum covers a fixed range.
    """
    while p.shape[-1] > _RUN:
        width = p.shape[-1]
        cut = width - width % _RUN
        runs = p[..., :cut].reshape(*p.shape[:-1], cut // _RUN, _RUN).sum(-1)
        p = torch.cat([runs, p[..., cut:].sum(-1, keepdim=True)], dim=-1)
    return p.sum(-1)


def row_dot64(x: torch.Tensor, y: torch.Tensor | None = None, weight=None) -> torch.Tensor:
    """Σ_j x_ij y_ij w_j per row, accumulated in float64: (B, N) x (B or 1, N) -> (B,) float64.

    ``y`` defaults to ``x`` (squared norms); ``weight`` is None, a float, or an (N,) tensor.
    Works for 1-D x too (returns a 0-d tensor). One term of :func:`row_dots64`.
    """
    return row_dots64((x, y, weight))[0]


def checksum64(x: torch.Tensor) -> float:
    """Σ_j x_j w_j over the flattened tensor with fixed irrational weights w_j = frac(j φ) − ½.

    A cheap fingerprint of a long vector (order-sensitive, unlike a plain sum), chunked, the same
    whatever the thread count (processes of one job must agree on it).
    """
    flat = x.detach().reshape(-1)
    total = 0.0
    for s in range(0, flat.numel(), _CHUNK):
        chunk = flat[s : s + _CHUNK].double()
        j = torch.arange(s, s + chunk.numel(), device=chunk.device, dtype=torch.float64)
        w = torch.frac(j * 0.6180339887498949) - 0.5
        total += float(_sum_last(chunk * w))
    return total
