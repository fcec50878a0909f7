"""Figure 1: local volume of the digits MLP under several preconditioners (paper §4.1;
REPLICATION.md §4, §5.1, §7.2).

:func:`estimate_stage` is the ``estimate_mlp`` stage as a plain function: it loads the trained
MLP, builds the cost (mean KL from the anchor on the held-out images), computes each curvature
quantity the requested preconditioners need (once), runs :func:`localvol.estimate_log_volume`
for the naive estimator and every preconditioner, and writes

- ``estimates_path`` (JSON): configuration, curvature timings and each estimate's
  ``VolumeEstimate.to_dict()`` aggregates (nats and log10, wall time, cost evaluations);
- ``metrics_path`` (JSON, a DVC metrics file): the headline numbers per estimate;
- ``samples_path`` (NPZ): per-sample terms ``<name>__samples`` (nats), ``__radii``,
  ``__cost_at_radius``, ``__direction_norms``, ``__evaluations``;
- ``spectra_path`` (NPZ): the curvature vectors (Hessian eigenvalues and diagonal, HesScale,
  Adam moments), for inspection.

Preconditioner kinds (the spectrum s of REPLICATION.md §4; p = 1/(|s|^exponent + eps),
normalised to unit determinant):

=================  =====================================================================
``hessian_paper``  eigenvalues of H = ∇²KL at θ0, applied as the paper's code did,
                   v = diag(p) Vᵀ u (:class:`localvol.PaperMatrixPreconditioner`)
``hessian``        the same, applied correctly, v = V diag(p) Vᵀ u
``diag_hessian``   diag(H) of the same dense H
``hesscale``       HesScale diagonal of the CE-loss Hessian on the TRAINING images and labels
``adam_mu``        |Adam first moment| (``exp_avg``, no bias correction)
``adam_nu``        Adam second moment (``exp_avg_sq``, no bias correction)
=================  =====================================================================

H is computed in float64 with :func:`localvol.hessian` and decomposed once with
``torch.linalg.eigh``; every ``hessian``/``hessian_paper`` entry reuses that decomposition.
"""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from localvol import digits
from localvol.code_version import source_hash
from localvol.records import clear_progress
from localvol.stages import save_npz_atomic, write_json_atomic, write_timings

__all__ = [
    "KINDS",
    "preconditioner_label",
    "needed_curvature",
    "compute_curvature",
    "build_preconditioner",
    "estimate_stage",
    "aggregates_table",
]

LN10 = math.log(10.0)
HESSIAN_CHUNK = 512  # Hessian-vector products per vmapped call (memory/speed only)

KINDS = {
    "hessian_paper": "Hessian (paper's Vᵀ only)",
    "hessian": "Hessian V diag(p) Vᵀ",
    "diag_hessian": "diag(H)",
    "hesscale": "HesScale",
    "adam_mu": "Adam μ",
    "adam_nu": "Adam ν",
}


def _format_eps(eps: float) -> str:
    exponent = math.log10(eps) if eps > 0 else None
    if exponent is not None and abs(exponent - round(exponent)) < 1e-9:
        return f"1e{int(round(exponent))}"
    return f"{eps:g}"


def preconditioner_label(kind: str, eps: float | None) -> str:
    """Legend label, e.g. ``"Adam ν, ε=1e-3"``; ``"naive"`` for kind ``"naive"``."""
    if kind == "naive":
        return "naive"
    return f"{KINDS[kind]}, ε={_format_eps(eps)}"


def needed_curvature(kinds: set[str]) -> set[str]:
    """Which curvature quantities a set of preconditioner kinds needs."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown preconditioner kind(s) {sorted(unknown)}; known: {list(KINDS)}")
    need = set()
    if kinds & {"hessian", "hessian_paper"}:
        need |= {"hessian_eigh", "hessian_diagonal"}
    if "diag_hessian" in kinds:
        need.add("hessian_diagonal")
    for kind in ("hesscale", "adam_mu", "adam_nu"):
        if kind in kinds:
            need.add(kind)
    return need


def compute_curvature(
    need: set[str],
    model: torch.nn.Sequential,
    heldout_images: torch.Tensor,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    optimizer_state: dict,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Compute the curvature quantities in ``need`` (see :func:`needed_curvature`).

    The Hessian is that of the held-out KL cost at the anchor (= the Fisher), on a float64 copy
    of the model; its diagonal is the diag(H) spectrum. HesScale is of the CE loss on the
    training images with their labels (as the paper's code did). Adam moments come from the
    saved ``optimizer_state``.

    Returns (vectors, wall_times): vectors maps ``hessian_eigenvalues`` (N,),
    ``hessian_eigenvectors`` (N, N, columns), ``hessian_diagonal``, ``hesscale``, ``adam_mu``,
    ``adam_nu`` (each (N,) float64) to tensors, as needed; wall_times maps step names to seconds.
    """
    import localvol

    out: dict[str, torch.Tensor] = {}
    times: dict[str, float] = {}
    if need & {"hessian_eigh", "hessian_diagonal"}:
        t0 = time.perf_counter()
        model64 = _copy_double(model)
        kl64 = localvol.ExpectedKL(model64, heldout_images.double())
        anchor64 = torch.nn.utils.parameters_to_vector(model64.parameters()).detach()
        H = localvol.hessian(kl64, anchor64, chunk_size=HESSIAN_CHUNK)  # (N, N), symmetric
        times["hessian_s"] = time.perf_counter() - t0
        out["hessian_diagonal"] = H.diagonal().clone()
        if "hessian_eigh" in need:
            t0 = time.perf_counter()
            eigenvalues, eigenvectors = torch.linalg.eigh(H)  # ascending; columns
            times["eigh_s"] = time.perf_counter() - t0
            out["hessian_eigenvalues"] = eigenvalues
            out["hessian_eigenvectors"] = eigenvectors
        del H
    if "hesscale" in need:
        t0 = time.perf_counter()
        out["hesscale"] = torch.as_tensor(
            localvol.hesscale_diagonal(model, train_images, targets=train_labels)).double()
        times["hesscale_s"] = time.perf_counter() - t0
    for kind, order in (("adam_mu", 1), ("adam_nu", 2)):
        if kind in need:
            out[kind] = torch.as_tensor(
                localvol.adam_moment(model, optimizer_state, order=order)).double()
    return out, times


def _copy_double(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model).double().eval()


def build_preconditioner(kind: str, eps: float, exponent: float,
                         curvature: dict[str, torch.Tensor]):
    """The preconditioner object for one kind (see the module docstring)."""
    import localvol

    if kind == "hessian":
        return localvol.MatrixPreconditioner.from_eigh(
            curvature["hessian_eigenvalues"], curvature["hessian_eigenvectors"], eps, exponent)
    if kind == "hessian_paper":
        return localvol.PaperMatrixPreconditioner.from_eigh(
            curvature["hessian_eigenvalues"], curvature["hessian_eigenvectors"], eps, exponent)
    if kind == "diag_hessian":
        return localvol.DiagonalPreconditioner(curvature["hessian_diagonal"], eps, exponent)
    if kind in ("hesscale", "adam_nu"):
        return localvol.DiagonalPreconditioner(curvature[kind], eps, exponent)
    if kind == "adam_mu":
        return localvol.DiagonalPreconditioner(curvature[kind].abs(), eps, exponent)
    raise ValueError(f"unknown preconditioner kind {kind!r}; known: {list(KINDS)}")


def _checkpoint_name(name: str, spec: dict, settings: dict, model_sha: str) -> str:
    """A checkpoint file name unique to (model weights, estimate settings, code version), so a
    rerun with other settings, another model or changed code never resumes a stale checkpoint."""
    key = repr((name, sorted(spec.items()), sorted(settings.items()), model_sha, source_hash()))
    return f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"


def estimate_stage(
    *,
    data_dir: str,
    split_path: str,
    model_dir: str,
    estimates_path: str,
    metrics_path: str,
    samples_path: str,
    spectra_path: str,
    checkpoint_dir: str,
    cutoff: float,
    sigma: float,
    rtol: float,
    seed: int,
    n_samples_naive: int,
    n_samples_preconditioned: int,
    batch_size: int,
    exponent: float,
    preconditioners: dict[str, dict[str, Any]],
    progress: bool = True,
) -> dict[str, Any]:
    """Run the ``estimate_mlp`` stage (see the module docstring). Returns the estimates JSON.

    ``preconditioners`` maps a name (used in file keys) to ``{"kind": ..., "eps": ...}``;
    the naive estimate (``n_samples_naive`` samples) is always run first, under name ``naive``.
    """
    import localvol

    specs = {"naive": {"kind": "naive", "eps": None, "n_samples": n_samples_naive}}
    for name, spec in preconditioners.items():
        if name == "naive" or "__" in name:
            raise ValueError(f"preconditioner name {name!r} is reserved or contains '__'")
        extra = set(spec) - {"kind", "eps"}
        if extra or "kind" not in spec or "eps" not in spec:
            raise ValueError(f"preconditioners.{name} must have exactly the keys kind and eps, "
                             f"got {sorted(spec)}")
        if spec["kind"] not in KINDS:
            raise ValueError(f"preconditioners.{name}.kind {spec['kind']!r} unknown; "
                             f"known: {list(KINDS)}")
        specs[name] = {"kind": spec["kind"], "eps": float(spec["eps"]),
                       "n_samples": n_samples_preconditioned}

    images, labels = digits.load_digits(data_dir)
    train_idx, heldout_idx = digits.load_split(split_path)
    x_train = torch.as_tensor(images[train_idx])  # (1024, 64)
    y_train = torch.as_tensor(labels[train_idx])  # (1024,)
    x_held = torch.as_tensor(images[heldout_idx])  # (773, 64)
    model, optimizer_state = digits.load_trained(model_dir)
    model_sha = hashlib.sha256((Path(model_dir) / digits.MODEL_FILE).read_bytes()).hexdigest()

    anchor = torch.nn.utils.parameters_to_vector(model.parameters()).detach()  # (N,) float32
    cost = localvol.ExpectedKL(model, x_held)
    prior = localvol.GaussianPrior(sigma)

    kinds = {s["kind"] for s in specs.values()} - {"naive"}
    curvature, curvature_times = compute_curvature(
        needed_curvature(kinds), model, x_held, x_train, y_train, optimizer_state)

    settings = {"cutoff": cutoff, "sigma": sigma, "rtol": rtol, "seed": seed,
                "exponent": exponent}
    results: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    wall_times: dict[str, float] = {}
    for name, spec in specs.items():
        precond = None
        if spec["kind"] != "naive":
            precond = build_preconditioner(spec["kind"], spec["eps"], exponent, curvature)
        ckpt = Path(checkpoint_dir) / _checkpoint_name(name, spec, settings, model_sha)
        if progress:
            print(f"{name}: {preconditioner_label(spec['kind'], spec['eps'])}, "
                  f"k = {spec['n_samples']}", flush=True)
        est = localvol.estimate_log_volume(
            cost, anchor, cutoff=cutoff, n_samples=spec["n_samples"], prior=prior,
            preconditioner=precond, rtol=rtol, batch_size=batch_size, seed=seed,
            progress=progress, checkpoint_path=ckpt,
        )
        results[name] = {
            "kind": spec["kind"], "eps": spec["eps"],
            "label": preconditioner_label(spec["kind"], spec["eps"]),
            **est.to_dict(),
        }
        arrays[f"{name}__samples"] = est.samples
        arrays[f"{name}__radii"] = est.radii
        arrays[f"{name}__cost_at_radius"] = est.cost_at_radius
        arrays[f"{name}__direction_norms"] = est.direction_norms
        arrays[f"{name}__evaluations"] = est.evaluations
        wall_times[name] = est.wall_time_s
        if progress:
            print(f"  log10 P = {est.log10_volume:.2f}  ({est.wall_time_s:.1f} s, "
                  f"{est.cost_evaluations} cost evaluations)", flush=True)

    first = next(iter(results.values()))
    summary = {
        "config": {
            **settings, "n_samples_naive": n_samples_naive,
            "n_samples_preconditioned": n_samples_preconditioned, "batch_size": batch_size,
            "preconditioners": preconditioners, "n_params": int(anchor.numel()),
            "n_heldout": int(len(x_held)), "n_train": int(len(x_train)),
            "cost": "mean KL(p_anchor || p_theta) over the held-out images",
            "model_sha256": model_sha,
        },
        "anchor_norm": float(anchor.double().norm()),
        "log_prior_at_anchor": first["log_prior_at_anchor"],
        "log10_prior_at_anchor": first["log10_prior_at_anchor"],
        "estimates": results,
    }
    save_npz_atomic(samples_path, **arrays)
    save_npz_atomic(spectra_path, **{k: v.numpy() for k, v in curvature.items()
                                     if k != "hessian_eigenvectors"})
    write_json_atomic(metrics_path, metrics_from_summary(summary))
    write_json_atomic(estimates_path, summary)
    write_timings(estimates_path, {"curvature_wall_time_s": curvature_times,
                                   "estimates": wall_times})
    clear_progress(checkpoint_dir)  # finished: no resume state is left behind
    return summary


def metrics_from_summary(summary: dict) -> dict:
    """The DVC metrics: headline numbers per estimate (log10 of probability)."""
    metrics: dict[str, Any] = {"log10_prior_at_anchor": summary["log10_prior_at_anchor"]}
    for name, r in summary["estimates"].items():
        metrics[name] = {
            "log10_volume": r["log10_volume"],
            "max_sample_log10": r["max_sample_log10"],
            "cost_evaluations": r["cost_evaluations"],
        }
    return metrics


def aggregates_table(summary: dict) -> pd.DataFrame:
    """One row per estimate: label, k, log10 volume (aggregate), max and median sample, the
    prior term log10 ρ(θ0)/ρ(0) and the neighbourhood term (aggregate − prior), both log10,
    the share of the largest sample and cost evaluations. (Wall times, which change from run to
    run, stay in the estimates JSON so that the committed table is reproducible.)"""
    rows = []
    for name, r in summary["estimates"].items():
        rows.append({
            "name": name,
            "preconditioner": r["label"],
            "k": r["n_samples"],
            "log10_volume": r["log10_volume"],
            "max_sample_log10": r["max_sample_log10"],
            "median_sample_log10": r["median_sample_log10"],
            "log10_prior_term": r["log10_prior_at_anchor"],
            "log10_neighbourhood": r["log10_volume"] - r["log10_prior_at_anchor"],
            "max_sample_share": r["max_sample_share"],
            "cost_evaluations": r["cost_evaluations"],
        })
    return pd.DataFrame(rows)
