"""One estimate as a pipeline record: run :func:`localvol.estimate_log_volume` with a resumable
per-estimate progress file, and return its JSON-ready aggregates plus per-sample arrays.

Shared by the experiment stages (Pythia, ConvNeXt) so every stored estimate has the same keys:
``log10_volume`` (the aggregate, logsumexp − log k), ``log10_prior_at_anchor`` (−|θ0|²/(2σ²),
REPLICATION.md §7.5), ``log10_neighbourhood`` (the rest), ``seconds_per_sample`` and
``cost_evaluations_per_sample``, plus whatever the caller puts in ``meta``.
"""
from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["run_estimate", "check_stage_settings", "time_cost_call"]

LN10 = math.log(10.0)


def _progress_name(*parts) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16] + ".npz"


def run_estimate(cost, anchor: torch.Tensor, *, prior, cutoff: float, n_samples: int,
                 nu: torch.Tensor | None = None, eps: float | None = None, exponent: float = 0.5,
                 rtol: float, seed: int, batch_size: int, progress_dir: str | Path, key: str,
                 meta: dict[str, Any] | None = None, salt: tuple = (), progress: bool = True
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
            setting that changes the samples and ``salt`` (what else the cost depends on: the
            evaluation data, the device), so a changed setting starts afresh instead of
            resuming stale samples.
        key: the record's name; meta: extra JSON fields (step, series, figure, ...).

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
    record["seconds_per_sample"] = (time.perf_counter() - t0) / n_samples
    record["cost_evaluations_per_sample"] = est.cost_evaluations / n_samples
    if progress:
        print(f"{key}: log10 volume {est.log10_volume:.6g} (prior {record['log10_prior_at_anchor']:.6g}, "
              f"neighbourhood {record['log10_neighbourhood']:.6g}), "
              f"{record['seconds_per_sample']:.2f} s/sample", flush=True)
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
