"""Progress files of an estimate: its finished samples, keyed by a fingerprint of the settings
and code (the preconditioner by its action on fixed probes, not its repr) and by an exact hash of
the cost's values at the anchor and three points near it and of its evaluation data, so that a
file written by other settings, another cost or another version of localvol is refused, never
resumed. Every file is checked on load: every array present, every finished sample a number."""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from ._reduce import row_dot64
from .code_version import source_hash
from .directions import sample_directions


_PROBE_SEED = 0x1F0C  # the fixed direction seed of the preconditioner probes (any run seed)
_PROBE_INDICES = (2**31 - 3, 2**31 - 4, 2**31 - 5)  # indices no estimate of k < 2^31 - 5 draws
_COST_DATA = ("inputs", "targets", "mask", "reference_parameters")
"""Tensor attributes of a cost that are its evaluation data (hashed into the cost probe): those of
the model costs (:mod:`localvol.costs`). A plain function has none: only its values count."""
_HASH_CHUNK = 1 << 24  # bytes per device-to-host copy while hashing a tensor


def tensor_digest(h, x) -> None:
    """Feed a tensor's dtype, shape and exact bytes into the hash ``h`` (in chunks: a large
    tensor on a GPU is never copied to the host whole)."""
    x = torch.as_tensor(x).detach()
    h.update(repr((str(x.dtype), tuple(x.shape))).encode())
    flat = x.contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    raw = flat.view(torch.uint8) if flat.numel() else flat.to(torch.uint8)
    for s in range(0, raw.numel(), _HASH_CHUNK):
        h.update(raw[s : s + _HASH_CHUNK].cpu().numpy().tobytes())


def preconditioner_probe(preconditioner, anchor) -> tuple[torch.Tensor, torch.Tensor]:
    """The preconditioner applied to three fixed probe directions: (u, P u), each (3, N).

    The probes are unit rows from :func:`sample_directions` (float64 standard normals drawn
    from generators of a fixed seed, cast to the anchor's dtype, on its device): independent of
    the global RNG and of the run's seed, the same in every process of one device type. A
    fresh copy is passed to ``apply`` (which may work in place)."""
    u = sample_directions(anchor.numel(), list(_PROBE_INDICES), seed=_PROBE_SEED, dtype=anchor.dtype,
                          device=anchor.device)
    with torch.no_grad():
        v = preconditioner.apply(u.clone())
    if not isinstance(v, torch.Tensor) or v.shape != u.shape:
        got = f"a tensor of shape {tuple(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(f"preconditioner.apply returned {got} for directions of shape {tuple(u.shape)}; "
                         "it must return the same shape")
    return u, v


def preconditioner_digest(preconditioner, anchor) -> str:
    """SHA-256 of what a preconditioner does: its ``n`` and the exact bytes (and dtype) of its
    action on the three probe directions of :func:`preconditioner_probe`. Not its repr: two
    preconditioners with one repr but another action differ, and any object with ``apply`` and
    ``n`` (no repr of its own needed) gets the same digest in every process."""
    h = hashlib.sha256()
    h.update(repr(getattr(preconditioner, "n", None)).encode())
    tensor_digest(h, preconditioner_probe(preconditioner, anchor)[1])
    return h.hexdigest()


def prior_digest(prior) -> str:
    """The prior: its repr (complete for a scalar σ and for Lebesgue) and, for a per-parameter
    σ (whose repr only gives its length), the SHA-256 of σ's exact bytes."""
    sigma = getattr(prior, "sigma", None)
    if isinstance(sigma, torch.Tensor):
        h = hashlib.sha256()
        tensor_digest(h, sigma)
        return f"{prior!r}:{h.hexdigest()}"
    return repr(prior)


def fingerprint(anchor, cutoff, rtol, seed, prior, preconditioner, max_radius, n_samples,
                batch_size, block_size) -> str:
    """Hash of everything a progress file's samples depend on, except the cost (see cost_probe):
    localvol's source, the anchor's exact bytes, the settings, the prior (:func:`prior_digest`),
    the preconditioner's action (:func:`preconditioner_digest`) and the batch schedule (k, batch
    and block size)."""
    a = hashlib.sha256()
    tensor_digest(a, anchor)
    parts = [source_hash(), a.hexdigest(), cutoff, rtol, seed, prior_digest(prior), max_radius,
             n_samples, batch_size, block_size]
    if preconditioner is not None:
        parts.append(preconditioner_digest(preconditioner, anchor))
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def cost_probe(cost, anchor, anchor_cost, seed) -> np.ndarray:
    """SHA-256 (32 uint8) of the cost's exact values at the anchor and at three fixed points
    near it, and of the exact bytes of its evaluation data (the tensors ``inputs``,
    ``targets``, ``mask`` and ``reference_parameters`` it holds, where it has them, as the model
    costs do): a progress file written with another cost (another model, another data set, a
    few evaluation inputs replaced) does not match and is refused. (A function wrapping a model
    cost has no such attributes: it does not match a file of the cost itself.)"""
    d = sample_directions(anchor.numel(), [2**31 - 1], seed=seed, dtype=anchor.dtype, device=anchor.device)[0]
    scale = max(float(row_dot64(anchor).sqrt()), 1.0)
    radii = torch.tensor([1e-3, 1e-2, 1e-1], dtype=anchor.dtype, device=anchor.device) * scale
    with torch.no_grad():
        values = cost(anchor[None] + radii[:, None] * d[None])
    values = torch.as_tensor(values).detach().double().cpu().numpy().reshape(-1)
    h = hashlib.sha256()
    h.update(np.float64(anchor_cost).tobytes() + values.tobytes())
    for name in _COST_DATA:
        value = getattr(cost, name, None)
        if isinstance(value, torch.Tensor):
            h.update(name.encode())
            tensor_digest(h, value)
    return np.frombuffer(h.digest(), dtype=np.uint8).copy()


def load_progress(path, fingerprint, probe, store, done) -> bool:
    """Add the finished samples of a matching progress file to store/done; False if there is
    no file. Raises ValueError, naming the file and the remedy (delete it), for a file of
    other settings, cost or code, and for one that cannot be read, lacks an array, or holds a
    finished sample that is not a number (see :func:`_check_finished`)."""
    path = Path(path)
    if not path.exists():
        return False
    remedy = "delete it to start afresh (its finished samples are lost, nothing else)"
    wanted = ("fingerprint", "probe", "done", *store)
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {name: f[name] for name in wanted if name in f.files}
    except Exception as err:  # truncated, corrupted (BadZipFile, CRC, zlib) or foreign file
        raise ValueError(f"checkpoint {path} cannot be read ({err!r}); {remedy}") from None
    missing = [name for name in wanted if name not in data]
    if missing:
        raise ValueError(f"checkpoint {path} lacks the array(s) {', '.join(missing)} (an incomplete "
                         f"or foreign file); {remedy}")
    if str(data["fingerprint"]) != fingerprint:
        raise ValueError(
            f"checkpoint {path} was written with different settings (anchor, cutoff, rtol, seed, "
            "prior, preconditioner, k, batch or block size) or by another version of localvol (its source files "
            "differ); delete it (or its folder) to start afresh"
        )
    if not np.array_equal(data["probe"], probe):
        raise ValueError(
            f"checkpoint {path} was written with a different cost (its exact values at the anchor and "
            "at three points near it, or its evaluation data, differ; or a cost whose value is not "
            "the same from process to process); delete it (or its folder) to start afresh"
        )
    saved = data["done"]
    if saved.dtype != np.bool_ or saved.shape != done.shape:
        raise ValueError(f"checkpoint {path} holds {saved.size} samples ({saved.dtype}), not {done.size}; {remedy}")
    for name in store:
        if data[name].dtype.kind not in "fiu":
            raise ValueError(f"checkpoint {path}: its array {name!r} is {data[name].dtype}, not numbers; {remedy}")
        if data[name].shape != done.shape:
            raise ValueError(f"checkpoint {path}: its array {name!r} has shape {data[name].shape}, not "
                             f"{done.shape}; {remedy}")
    _check_finished(path, data, saved, remedy)
    both = saved & done
    if both.any() and not np.array_equal(data["samples"][both], store["samples"][both]):
        raise ValueError(
            f"checkpoint {path} holds samples that differ from the same samples already "
            "loaded or computed: processes of one estimate disagree (another device model, "
            "or a cost that is not deterministic); delete the folder to start afresh")
    for name in store:
        store[name][saved] = data[name][saved]
    done |= saved
    return True


def _check_finished(path, data, saved, remedy) -> None:
    """Every finished sample must be one the estimator can write: no NaN in any field, a
    finite log term except the +inf of a Lebesgue volume along an unbounded direction (radius
    +inf), a positive radius (+inf: unbounded), and a finite cost at a finite radius."""
    radii = data["radii"][saved]
    unbounded = np.isposinf(radii)
    bad = {}
    for name in ("samples", "radii", "direction_norms", "evaluations", "multipliers"):
        if name in data:
            bad[name] = np.isnan(data[name][saved])
    samples = data["samples"][saved]
    bad["samples"] |= ~np.isfinite(samples) & ~(np.isposinf(samples) & unbounded)
    bad["radii"] |= ~(radii > 0)
    if "cost_at_radius" in data:
        bad["cost_at_radius"] = ~np.isfinite(data["cost_at_radius"][saved]) & ~unbounded
    index = np.flatnonzero(saved)
    for name, mask in bad.items():
        if mask.any():
            i = index[mask]
            raise ValueError(
                f"checkpoint {path} holds {mask.sum()} finished sample(s) whose {name!r} is not a valid "
                f"number (first: sample {int(i[0])} = {float(data[name][i[0]])!r}): the file is corrupted; {remedy}")


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
