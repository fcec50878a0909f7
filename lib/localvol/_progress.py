"""Progress files of an estimate: its finished samples, keyed by a fingerprint of the settings
and code and by the cost's values at three points near the anchor, so that a file written by
other settings, another cost or another version of localvol is refused, never resumed."""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from ._reduce import checksum64, row_dot64
from .code_version import source_hash
from .directions import sample_directions
from .priors import GaussianPrior


def fingerprint(anchor, cutoff, rtol, seed, prior, preconditioner, max_radius, n_samples,
                batch_size, block_size) -> str:
    """Hash of everything a progress file's samples depend on, except the cost (see cost_probe):
    localvol's source, the anchor, the settings and the batch schedule (k, batch and block size)."""
    a = anchor.detach()
    parts = [source_hash(), a.numel(), checksum64(a), float(row_dot64(a)), cutoff, rtol, seed, repr(prior), max_radius,
             n_samples, batch_size, block_size]
    if preconditioner is not None:
        parts.append(repr(preconditioner))
        for name in ("scales", "eigenvectors"):
            value = getattr(preconditioner, name, None)
            parts.append(None if value is None else checksum64(value))
    if isinstance(prior, GaussianPrior) and not isinstance(prior.sigma, float):
        parts.append(checksum64(prior.sigma))
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def cost_probe(cost, anchor, anchor_cost, seed) -> np.ndarray:
    """The cost at three fixed points near the anchor: a progress file written with another cost
    (another model or data set) does not match and is refused."""
    d = sample_directions(anchor.numel(), [2**31 - 1], seed=seed, dtype=anchor.dtype, device=anchor.device)[0]
    scale = max(float(row_dot64(anchor).sqrt()), 1.0)
    radii = torch.tensor([1e-3, 1e-2, 1e-1], dtype=anchor.dtype, device=anchor.device) * scale
    with torch.no_grad():
        values = cost(anchor[None] + radii[:, None] * d[None])
    return torch.as_tensor(values).detach().double().cpu().numpy().reshape(-1) - anchor_cost


def load_progress(path, fingerprint, probe, store, done) -> bool:
    """Add the finished samples of a matching progress file to store/done; False if there is
    no file. Raises ValueError for a file of other settings, cost or code, or an unreadable one."""
    path = Path(path)
    if not path.exists():
        return False
    try:
        f = np.load(path, allow_pickle=False)
        _ = f["fingerprint"], f["probe"], f["done"]
    except Exception as err:  # truncated, corrupted or foreign file
        raise ValueError(f"checkpoint {path} cannot be read ({err!r}); delete it to start afresh") from None
    with f:
        if str(f["fingerprint"]) != fingerprint:
            raise ValueError(
                f"checkpoint {path} was written with different settings (anchor, cutoff, rtol, seed, "
                "prior, preconditioner, k, batch or block size) or by another version of localvol (its source files "
                "differ); delete it (or its folder) to start afresh"
            )
        if not np.allclose(f["probe"], probe, rtol=1e-4, atol=1e-12, equal_nan=True):
            raise ValueError(
                f"checkpoint {path} was written with a different cost (its values near the anchor "
                f"differ: {f['probe']} vs {probe}); delete it (or its folder) to start afresh"
            )
        saved = f["done"]
        if saved.shape != done.shape:
            raise ValueError(f"checkpoint {path} holds {saved.size} samples, not {done.size}")
        both = saved & done
        if both.any() and not np.array_equal(f["samples"][both], store["samples"][both]):
            raise ValueError(
                f"checkpoint {path} holds samples that differ from the same samples already "
                "loaded or computed: processes of one estimate disagree (another device model, "
                "or a cost that is not deterministic); delete the folder to start afresh")
        for name in store:
            store[name][saved] = f[name][saved]
        done |= saved
        return True


def save_progress(path, fingerprint, probe, store, done) -> None:
    """Write store/done atomically (a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:  # a temporary name of its own: two writers never share one
        with os.fdopen(fd, "wb") as f:
            np.savez(f, fingerprint=np.array(fingerprint), probe=probe, done=done, **store)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
