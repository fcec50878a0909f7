"""Figure 1: local volume of the digits MLP under several preconditioners (paper §4.1;
docs/method.md#preconditioners, docs/experiments.md#figure-1,
docs/authors-code.md#hessian-mis-application).

:func:`figure1_stage` is the ``estimate_figure1`` stage as a plain function: it loads the trained
MLP, builds the cost (mean KL from the anchor on the held-out images), computes each curvature
quantity the requested preconditioners need (once), and runs the naive estimate and one
estimate per preconditioner through :func:`replication.sweep.run_sweep`, which writes the
estimates JSON, the per-sample NPZ and the metrics; it also writes ``spectra_path`` (NPZ): the
curvature vectors (Hessian eigenvalues and diagonal, HesScale, Adam moments), for inspection.

Preconditioner kinds (the spectrum s of docs/method.md#preconditioners;
p = 1/(|s|^exponent + eps), normalised to unit determinant):

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
from pathlib import Path
from typing import Any

import torch

import localvol
from replication.mlp import curvature
from replication.mlp.curvature import KINDS, build_preconditioner, needed_curvature
from replication.mlp.data import load_split_data
from replication.mlp.model import MODEL_FILE, load_trained
from replication.pipeline.files import save_npz_atomic
from localvol.selection import check_seeds
from replication.sweep import (Point, Unit, check_counts, choose_point, number_grid, pilot_grid,
                              run_sweep, summary_metrics, write_sweep)

__all__ = ["KINDS", "preconditioner_label", "check_preconditioners", "check_selection", "figure1_units",
           "figure1_stage", "METRICS"]

COST = "mean KL(p_anchor || p_theta) over the held-out images"
CHECKPOINT = "final"  # the one anchor: the trained MLP
# per estimate in the DVC metrics file (log10 of probability; cost evaluations in total)
METRICS = ("log10_volume", "log10_prior_at_anchor", "log10_neighbourhood", "max_sample_log10",
           "cost_evaluations")


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


def check_preconditioners(preconditioners: dict[str, dict[str, Any]]) -> dict[str, dict]:
    """Validate ``estimate_figure1.preconditioners`` (name -> ``{"kind", "eps"}``).

    Returns name -> ``{"kind": str, "eps": float}`` in the given order. Raises ValueError for
    a reserved name (``naive``) or one containing ``__`` (the array-name separator), other keys
    than exactly kind and eps, an unknown kind (known: :data:`KINDS`), or eps ≤ 0.
    """
    specs = {}
    for name, spec in preconditioners.items():
        where = f"estimate_figure1.preconditioners.{name}"
        if name == "naive" or "__" in name:
            raise ValueError(f"preconditioner name {name!r} is reserved or contains '__': "
                             f"rename it in estimate_figure1.preconditioners")
        if not isinstance(spec, dict) or set(spec) != {"kind", "eps"}:
            got = sorted(spec) if isinstance(spec, dict) else spec
            raise ValueError(f"{where} must have exactly the keys kind and eps, got {got}")
        if spec["kind"] not in KINDS:
            raise ValueError(f"{where}.kind {spec['kind']!r} unknown; known: {list(KINDS)}")
        eps = spec["eps"]
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"{where}.eps must be a number > 0, got {eps!r}")
        specs[name] = {"kind": spec["kind"], "eps": float(eps)}
    return specs


def figure1_units(specs: dict[str, dict], *, cutoff: float, n_samples_naive: int,
                  n_samples_preconditioned: int) -> list[Unit]:
    """The estimates of Figure 1, in order: ``naive`` (k = ``n_samples_naive``), then one per
    entry of ``specs`` (from :func:`check_preconditioners`; k = ``n_samples_preconditioned``),
    keyed by its params.yaml name; each record's meta holds its ``kind`` and legend ``label``
    (also its ``series``)."""
    entries = {"naive": ("naive", None, n_samples_naive),
               **{name: (s["kind"], s["eps"], n_samples_preconditioned)
                  for name, s in specs.items()}}
    units = []
    for name, (kind, eps, k) in entries.items():
        label = preconditioner_label(kind, eps)
        units.append(Unit(key=name, checkpoint=CHECKPOINT, series=label, preconditioner=kind,
                          cutoff=cutoff, n_samples=k, eps=eps,
                          meta={"kind": kind, "eps": eps, "label": label}))
    return units


SELECTION_KEYS = {"n_pilot", "pilot_seed", "eps", "exponents"}


def check_selection(selection: dict[str, Any] | None, seed: int) -> list[tuple[float, float]]:
    """Validate ``estimate_figure1.selection`` ({n_pilot, pilot_seed, eps, exponents}) and
    return its grid of (ε, exponent) points, [] when it is off (n_pilot 0, or None).

    Raises ValueError naming the key: other keys, n_pilot not an integer ≥ 0, pilot_seed equal
    to ``seed``, an empty or non-positive grid (ε ≥ 0, exponent > 0)."""
    where = "estimate_figure1.selection"
    if selection is None:
        return []
    if not isinstance(selection, dict) or set(selection) != SELECTION_KEYS:
        got = sorted(selection) if isinstance(selection, dict) else selection
        raise ValueError(f"{where} must have exactly the keys {sorted(SELECTION_KEYS)}, got {got}")
    n_pilot = selection["n_pilot"]
    if isinstance(n_pilot, bool) or not isinstance(n_pilot, int) or n_pilot < 0:
        raise ValueError(f"{where}.n_pilot must be an integer ≥ 0 (0: off), got {n_pilot!r}")
    if n_pilot == 0:
        return []
    check_seeds(seed, selection["pilot_seed"], keys=("estimate_figure1.seed", f"{where}.pilot_seed"))
    eps_grid = number_grid(selection["eps"], f"{where}.eps", positive=False)
    exponents = number_grid(selection["exponents"], f"{where}.exponents", positive=True)
    return [(eps, x) for x in exponents for eps in eps_grid]


def _check_settings(cutoff, sigma, rtol, n_samples_naive, n_samples_preconditioned,
                    batch_size) -> None:
    check_counts(**{"estimate_figure1.n_samples_naive": n_samples_naive,
                    "estimate_figure1.n_samples_preconditioned": n_samples_preconditioned,
                    "estimate_figure1.batch_size": batch_size})
    for key, value in (("cutoff", cutoff), ("sigma", sigma), ("rtol", rtol)):
        if not value > 0:
            raise ValueError(f"estimate_figure1.{key} must be > 0, got {value!r}")


def figure1_stage(*, data_dir: str, split_path: str, model_dir: str, estimates_path: str,
                  samples_path: str, spectra_path: str, progress_dir: str, metrics_path: str,
                  cutoff: float, sigma: float, rtol: float, seed: int, n_samples_naive: int,
                  n_samples_preconditioned: int, batch_size: int, exponent: float,
                  preconditioners: dict[str, dict[str, Any]],
                  selection: dict[str, Any] | None = None, progress: bool = True) -> dict:
    """Run the ``estimate_figure1`` stage (see the module docstring). Returns the estimates JSON.

    ``cutoff`` in nats of mean KL; ``sigma`` the Gaussian prior's std (not variance); ``seed``
    fixes direction i of every estimate; ``batch_size`` directions per cost call; ``exponent``
    and each preconditioner's ``eps`` as p = 1/(|s|^exponent + eps). ``preconditioners`` maps a
    name (its record key) to ``{"kind", "eps"}`` (:func:`check_preconditioners`); the naive
    estimate is always run first, under ``naive``. ``selection`` (:func:`check_selection`),
    when its n_pilot > 0, adds one estimate per kind among the preconditioners, key
    ``{kind}_selected``, at the (ε, exponent) of its grid with the largest aggregate on n_pilot
    pilot directions of its pilot_seed, which the estimate does not reuse
    (docs/method.md#honest-selection); the pilots are reported under ``pilots``. Raises
    ValueError for bad settings, naming
    the params.yaml key, before any file is read. An interrupted run resumes from
    ``progress_dir``, which is removed once the stage has finished.
    """
    specs = check_preconditioners(preconditioners)
    grid = check_selection(selection, seed)
    clash = {f"{s['kind']}_selected" for s in specs.values()} & set(specs) if grid else set()
    if clash:
        raise ValueError(f"estimate_figure1.preconditioners: {sorted(clash)} would collide with "
                         "the estimates estimate_figure1.selection adds; rename them")
    _check_settings(cutoff, sigma, rtol, n_samples_naive, n_samples_preconditioned, batch_size)
    data = load_split_data(data_dir, split_path)
    x_held = torch.as_tensor(data["heldout_images"])  # (773, 64)
    model, optimizer_state = load_trained(model_dir)
    model_sha = hashlib.sha256((Path(model_dir) / MODEL_FILE).read_bytes()).hexdigest()
    anchor = torch.nn.utils.parameters_to_vector(model.parameters()).detach()  # (N,) float32
    kinds = {s["kind"] for s in specs.values()}
    vectors, curvature_times = curvature.compute_curvature(
        needed_curvature(kinds), model, x_held, torch.as_tensor(data["train_images"]),
        torch.as_tensor(data["train_labels"]), optimizer_state)
    point = Point(anchor=anchor, cost=localvol.ExpectedKL(model, x_held),
                  preconditioner=lambda kind, eps, exp, _dtype: build_preconditioner(
                      kind, eps, exp, vectors))  # float64 spectra, whatever the anchor's dtype
    units = figure1_units(specs, cutoff=cutoff, n_samples_naive=n_samples_naive,
                          n_samples_preconditioned=n_samples_preconditioned)
    common = dict(prior=localvol.GaussianPrior(sigma), rtol=rtol, seed=seed,
                  batch_size=batch_size, exponent=exponent, progress_dir=progress_dir,
                  salt=(model_sha, _checksum(x_held)), progress=progress)
    pilots = {}
    if grid:
        selected = list(dict.fromkeys(s["kind"] for s in specs.values()))
        pilot = run_sweep([u for kind in selected for u in pilot_grid(
            f"pilot/{kind}", CHECKPOINT, kind, grid, cutoff=cutoff,
            n_pilot=selection["n_pilot"], pilot_seed=selection["pilot_seed"])],
            lambda _: point, gather=True, **common)
        for kind in selected:
            (eps, x), pilots[kind] = choose_point(pilot.records, f"pilot/{kind}", grid)
            label = f"{KINDS[kind]}, chosen ε={_format_eps(eps)}, exponent {x:g}"
            units.append(Unit(key=f"{kind}_selected", checkpoint=CHECKPOINT, series=label,
                              preconditioner=kind, cutoff=cutoff,
                              n_samples=n_samples_preconditioned, eps=eps, exponent=x,
                              meta={"kind": kind, "eps": eps, "exponent": x, "label": label}))
    sweep = run_sweep(units, lambda _: point, **common)
    if grid:
        sweep.arrays.update(pilot.arrays)
        sweep.timings["pilots"] = pilot.timings
    sweep.timings["curvature_wall_time_s"] = curvature_times
    save_npz_atomic(spectra_path, **{k: v.numpy() for k, v in vectors.items()
                                     if k != "hessian_eigenvectors"})
    config = {"cutoff": cutoff, "sigma": sigma, "rtol": rtol, "seed": seed, "exponent": exponent,
              "n_samples_naive": n_samples_naive,
              "n_samples_preconditioned": n_samples_preconditioned, "batch_size": batch_size,
              "preconditioners": preconditioners, "selection": selection,
              "n_params": int(anchor.numel()),
              "n_heldout": int(len(x_held)), "n_train": int(len(data["train_images"])),
              "cost": COST, "model_sha256": model_sha}
    naive = sweep.records["naive"]
    extra = {"anchor_norm": float(anchor.double().norm()),
             "log_prior_at_anchor": naive["log_prior_at_anchor"],
             "log10_prior_at_anchor": naive["log10_prior_at_anchor"],
             **({"pilots": pilots} if pilots else {})}
    return write_sweep(sweep, config=config, extra=extra, estimates_path=estimates_path,
                       samples_path=samples_path, metrics_path=metrics_path,
                       progress_dir=progress_dir,
                       metrics=summary_metrics(sweep.records, fields=METRICS))


def _checksum(x: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes (the evaluation images key the resume files)."""
    return hashlib.sha256(x.contiguous().numpy().tobytes()).hexdigest()
