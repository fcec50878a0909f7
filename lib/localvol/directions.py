"""Monte Carlo directions: direction i of an estimate depends only on (seed, i)."""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["direction_seed", "sample_directions"]


def direction_seed(seed: int, index: int) -> int:
    """The 63-bit generator seed of direction ``index`` under estimate seed ``seed``.

    Derived with ``numpy.random.SeedSequence([seed, index])`` (a hash of both integers), so no
    direction's stream coincides with an ordinary ``torch.manual_seed(j)`` stream for small j
    (which a model's initialisation may have used: a direction correlated with the weights
    biases the estimate). Depends only on (seed, index).
    """
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))


def sample_directions(n_params: int, indices, *, seed: int, dtype, device, out=None) -> torch.Tensor:
    """Isotropic unit vectors u_i (B, N), one independent stream per sample index.

    Row b is direction ``indices[b]``: a standard normal vector drawn IN FLOAT64 from a
    generator seeded with :func:`direction_seed` (seed, i), cast to ``dtype``, then normalised.
    It depends only on (seed, i) and on the device type (CPU and CUDA generators differ), not
    on the batch size, the batch's other indices, resuming, or which process or device of that
    type draws it; and a float32 run uses the float64 run's directions rounded to float32 (up
    to the rounding of the normalisation), not another stream. A float32 draw takes one float64
    row (8N bytes) of scratch memory.

    Args:
        n_params: N. indices: iterable of non-negative ints. seed: int in [0, 2^32).
        dtype: torch.float32 or torch.float64. device: where to draw and return.
        out: optional (B, N) tensor of that dtype and device to fill (a buffer reused from
            batch to batch: a fresh large tensor costs a page fault per 4 KiB on first write).

    Returns:
        (B, N) tensor of unit rows in ``dtype`` on ``device`` (``out`` if given).
    """
    if out is None:
        out = torch.empty(len(indices), n_params, dtype=dtype, device=device)
    elif (out.shape != (len(indices), n_params) or out.dtype != dtype or not out.is_contiguous()
          or out.device.type != torch.device(device).type):
        raise ValueError(f"out must be a contiguous ({len(indices)}, {n_params}) {dtype} tensor on "
                         f"{device}, got {tuple(out.shape)} {out.dtype} on {out.device}"
                         f"{'' if out.is_contiguous() else ', not contiguous'}")
    gen = torch.Generator(device=device)
    # float64 draws for every dtype (draw once, cast): the same directions whatever the dtype
    scratch = None if out.dtype == torch.float64 else torch.empty(n_params, dtype=torch.float64, device=device)
    for row, i in enumerate(indices):
        gen.manual_seed(direction_seed(seed, i))
        if scratch is None:
            torch.randn(n_params, generator=gen, dtype=torch.float64, device=device, out=out[row])
        else:
            torch.randn(n_params, generator=gen, dtype=torch.float64, device=device, out=scratch)
            out[row].copy_(scratch)
    return out.div_(torch.linalg.vector_norm(out, dim=1, keepdim=True))
