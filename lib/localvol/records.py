"""One estimate as a pipeline record: run :func:`localvol.estimate_log_volume` with a resumable
per-estimate progress file, and return its JSON-ready aggregates plus per-sample arrays.

Shared by the experiment stages (Pythia, ConvNeXt) so every stored estimate has the same keys:
``log10_volume`` (the aggregate, logsumexp − log k), ``log10_prior_at_anchor`` (−|θ0|²/(2σ²),
REPLICATION.md §7.5), ``log10_neighbourhood`` (the rest), ``cost_evaluations_per_sample`` and
``preconditioner_is_identity``, plus whatever the caller puts in ``meta``. Records hold no wall
times (a rerun must write the same bytes); those go to the caller's ``timings`` dict.
"""
from __future__ import annotations

import hashlib
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["run_estimate", "clear_progress", "check_stage_settings", "time_cost_call",
           "parameter_sha256", "check_distinct_steps"]

LN10 = math.log(10.0)


def _progress_name(*parts) -> str:
    """A progress-file name unique to the settings AND the code version (localvol's source)."""
    from localvol.code_version import source_hash

    return hashlib.sha256(repr((source_hash(), parts)).encode()).hexdigest()[:16] + ".npz"


def clear_progress(progress_dir: str | Path) -> None:
    """Delete a stage's progress folder once its results are written: a finished stage leaves no
    resume state behind that a later run (other code, other settings) could take for its own."""
    shutil.rmtree(progress_dir, ignore_errors=True)


def run_estimate(cost, anchor: torch.Tensor, *, prior, cutoff: float, n_samples: int,
                 nu: torch.Tensor | None = None, eps: float | None = None, exponent: float = 0.5,
                 rtol: float, seed: int, batch_size: int, progress_dir: str | Path, key: str,
                 meta: dict[str, Any] | None = None, salt: tuple = (), progress: bool = True,
                 timings: dict[str, Any] | None = None,
                 ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Estimate one log volume (naive, or Adam-moment preconditioned when ``nu`` is given).

    Args:
        cost: batched cost (B, N) -> (B,) (e.g. :class:`localvol.ExpectedKL`).
        anchor: (N,) float32/64 parameters θ0.
        prior: :class:`localvol.GaussianPrior` (σ as a std, not a variance).
        cutoff: cost cutoff (nats of mean KL).
        n_samples: k directions.
        nu, eps, exponent: optional (N,) Adam moment and the preconditioner
            p ∝ 1/(nu^exponent + eps) (paper eq. 15-18, :class:`DiagonalPreconditioner`).
        rtol, seed, batch_size: as :func:`localvol.estimate_log_volume` (batch = directions).
        progress_dir: folder of resumable progress files; the file name hashes ``key``, every
            setting that changes the samples, ``salt`` (what else the cost depends on: the
            evaluation data, the device) and the code version (a hash of localvol's source), so
            a changed setting or changed code starts afresh instead of resuming stale samples.
            Call :func:`clear_progress` when the stage has written its results.
        key: the record's name; meta: extra JSON fields (step, series, figure, ...).
        timings: optional dict; ``timings[key]`` receives the wall time and seconds per sample.

    Returns:
        (record, arrays): the JSON-ready dict and ``{key}__samples`` / ``{key}__radii`` (k,)
        float64 arrays (nats; radii in parameter units along the preconditioned direction).
    """
    import localvol

    precond = None if nu is None else localvol.DiagonalPreconditioner(nu, eps, exponent)
    path = Path(progress_dir) / _progress_name(
        key, str(anchor.dtype), float(anchor.double().sum()), cutoff, n_samples, eps, seed, rtol,
        repr(prior), exponent, None if nu is None else float(nu.double().sum()), salt)
    t0 = time.perf_counter()
    est = localvol.estimate_log_volume(
        cost, anchor, cutoff=cutoff, n_samples=n_samples, prior=prior, preconditioner=precond,
        rtol=rtol, batch_size=batch_size, seed=seed, progress=progress, checkpoint_path=path)
    record = est.to_dict()
    record.update(meta or {})
    record["log10_neighbourhood"] = record["log_neighbourhood"] / LN10
    record["cost_evaluations_per_sample"] = est.cost_evaluations / n_samples
    seconds = time.perf_counter() - t0
    if timings is not None:
        timings[key] = {"wall_time_s": seconds, "seconds_per_sample": seconds / n_samples}
    if progress:
        print(f"{key}: log10 volume {est.log10_volume:.6g} (prior {record['log10_prior_at_anchor']:.6g}, "
              f"neighbourhood {record['log10_neighbourhood']:.6g}), "
              f"{seconds / n_samples:.2f} s/sample", flush=True)
    return record, {f"{key}__samples": est.samples, f"{key}__radii": est.radii}


def check_stage_settings(*, cutoffs: list[float], **counts: int) -> None:
    """Validate an estimate stage's settings: every count (k, batch sizes, ...) ≥ 1 and the
    cutoff sweep positive and increasing. Raises ValueError naming the bad value."""
    for name, v in counts.items():
        if v < 1:
            raise ValueError(f"{name} must be ≥ 1, got {v}")
    if not cutoffs or any(not (c > 0) for c in cutoffs) or any(b <= a for a, b in zip(cutoffs, cutoffs[1:])):
        raise ValueError(f"cutoffs must be positive and increasing, got {cutoffs}")


def time_cost_call(cost, theta: torch.Tensor) -> float:
    """Seconds of one call ``cost(theta)`` (theta (B, N)), synchronising CUDA around it."""
    if theta.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    cost(theta)
    if theta.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def parameter_sha256(model: torch.nn.Module) -> str:
    """SHA-256 (hex) of a model's parameters: each name, dtype, shape and the raw bytes, in
    ``named_parameters`` order (the order of ``parameters_to_vector``)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        t = p.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def check_distinct_steps(hashes: dict, known_duplicates: list, *, key: str | None) -> None:
    """Refuse two checkpoint steps with identical weights (a mislabelled or re-uploaded revision:
    public Pythia revisions have been byte-identical across steps) unless the pair is listed.

    Args:
        hashes: {step: parameter SHA-256} (steps as str or int).
        known_duplicates: [[a, b], ...] step pairs allowed to be equal.
        key: the params.yaml key that lists them (named in the error), or None where no such
            key exists (the checkpoints were trained here: retrain them).

    Raises:
        ValueError naming both steps and the key.
    """
    allowed = {frozenset(int(s) for s in pair) for pair in known_duplicates}
    seen: dict[str, int] = {}
    for step, digest in hashes.items():
        step = int(step)
        if digest in seen and frozenset((seen[digest], step)) not in allowed:
            fix = (f"If the source really holds the same weights at both steps, add "
                   f"[{seen[digest]}, {step}] to {key}" if key else
                   "Rerun the stage that wrote the checkpoints")
            raise ValueError(
                f"checkpoints step {seen[digest]} and step {step} have identical weights (parameter "
                f"SHA-256 {digest[:12]}…): one of them is not the checkpoint it claims to be. {fix}")
        seen.setdefault(digest, step)

