"""Local volume of the clean and poisoned digits MLPs (stage ``estimate_poison_digits``;
docs/experiments.md#poisoned-digits, docs/method.md#honest-selection).

For every network of ``train_poison_digits``: the naive estimate, then one estimate per entry of
``preconditioners`` (a kind of :data:`replication.mlp.curvature.KINDS` with a grid of ε and of
exponents). Where the grid has more than one point, the point is chosen honestly
(:mod:`localvol.selection`): every grid point is estimated on the same ``n_pilot`` pilot
directions (seed ``pilot_seed``), the one with the largest pilot aggregate is chosen, and the
reported estimate uses ``n_samples`` fresh directions (seed ``seed``). The pilots are reported
(``pilots`` in the estimates JSON) but are no part of any estimate.

The cost is Figure 1's: mean KL(p_anchor ‖ p_θ) over the 773 held-out images, cutoff in nats;
the prior N(0, σ²I) with the same σ for every network, so that their prior terms compare.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import torch

import localvol
from localvol.selection import check_seeds
from replication.mlp import curvature
from replication.mlp.curvature import KINDS, build_preconditioner, needed_curvature
from replication.mlp.data import load_split_data
from replication.mlp.model import MODEL_FILE, load_trained
from replication.mlp.estimate import preconditioner_label
from replication.poison_digits.train import CONDITIONS, network_name
from replication.sweep import (Point, Unit, check_counts, choose_point, number_grid, pilot_grid,
                              run_sweep, summary_metrics, write_sweep)

__all__ = ["check_preconditioners", "pilot_units", "final_units", "estimate_stage", "METRICS"]

COST = "mean KL(p_anchor || p_theta) over the held-out images"
METRICS = ("log10_volume", "log10_prior_at_anchor", "log10_neighbourhood", "cost_evaluations")
SECTION = "estimate_poison_digits"


def check_preconditioners(preconditioners: dict[str, dict[str, Any]]) -> dict[str, dict]:
    """Validate ``estimate_poison_digits.preconditioners``: name -> ``{"kind", "eps",
    "exponents"}`` with ``eps`` and ``exponents`` numbers or lists of them (the grid; ε ≥ 0,
    exponent > 0). Returns name -> ``{"kind", "eps": [..], "exponents": [..]}``.

    Raises ValueError naming the key: a reserved name (``naive``) or one containing ``/`` or
    ``__``, other keys, an unknown kind (known: :data:`KINDS`), a bad grid value."""
    specs = {}
    for name, spec in preconditioners.items():
        where = f"{SECTION}.preconditioners.{name}"
        if name == "naive" or "/" in name or "__" in name:
            raise ValueError(f"preconditioner name {name!r} is reserved or contains '/' or '__': "
                             f"rename it in {SECTION}.preconditioners")
        if not isinstance(spec, dict) or set(spec) != {"kind", "eps", "exponents"}:
            got = sorted(spec) if isinstance(spec, dict) else spec
            raise ValueError(f"{where} must have exactly the keys kind, eps and exponents, got {got}")
        if spec["kind"] not in KINDS:
            raise ValueError(f"{where}.kind {spec['kind']!r} unknown; known: {list(KINDS)}")
        specs[name] = {"kind": spec["kind"],
                       "eps": number_grid(spec["eps"], f"{where}.eps", positive=False),
                       "exponents": number_grid(spec["exponents"], f"{where}.exponents",
                                                positive=True)}
    return specs


def _grid(spec: dict) -> list[tuple[float, float]]:
    return [(eps, x) for x in spec["exponents"] for eps in spec["eps"]]


def pilot_units(networks: list[str], specs: dict[str, dict], *, cutoff: float, n_pilot: int,
                pilot_seed: int) -> list[Unit]:
    """The pilot of every preconditioner whose grid has more than one point: per network and
    grid point (ε, exponent), ``n_pilot`` directions of ``pilot_seed``; key
    ``{network}/pilot/{name}/eps=..,exponent=..`` (:func:`replication.sweep.pilot_grid`)."""
    return [unit for net in networks for name, spec in specs.items() if len(_grid(spec)) > 1
            for unit in pilot_grid(f"{net}/pilot/{name}", net, spec["kind"], _grid(spec),
                                   cutoff=cutoff, n_pilot=n_pilot, pilot_seed=pilot_seed,
                                   meta={"network": net, "estimator": name})]


def final_units(networks: list[str], specs: dict[str, dict], choices: dict[tuple[str, str], tuple],
                *, cutoff: float, n_samples: int) -> list[Unit]:
    """Per network: ``naive``, then each preconditioner at its chosen (ε, exponent) (``choices``
    by (network, name); a one-point grid is its own choice); key ``{network}/{name}``; k =
    ``n_samples`` directions of the sweep's seed."""
    units = []
    for net in networks:
        units.append(Unit(key=f"{net}/naive", checkpoint=net, series="naive",
                          preconditioner="naive", cutoff=cutoff, n_samples=n_samples,
                          meta={"network": net, "estimator": "naive", "kind": "naive",
                                "exponent": None, "label": "naive"}))
        for name, spec in specs.items():
            grid = _grid(spec)
            eps, x = choices[(net, name)] if len(grid) > 1 else grid[0]
            units.append(Unit(
                key=f"{net}/{name}", checkpoint=net, series=name, preconditioner=spec["kind"],
                cutoff=cutoff, n_samples=n_samples, eps=eps, exponent=x,
                meta={"network": net, "estimator": name, "kind": spec["kind"], "exponent": x,
                      "label": _label(spec["kind"], len(grid), eps, x),
                      "grid_points": len(grid)}))
    return units


def _label(kind: str, grid_points: int, eps: float, exponent: float) -> str:
    """The estimator's label, the same for every network: ``"diag(H), ε and exponent chosen"``
    when each network chooses its own, else the one ε and exponent."""
    if grid_points > 1:
        return f"{KINDS[kind]}, ε and exponent chosen"
    return f"{preconditioner_label(kind, eps)}, exponent {exponent:g}"


def _choices(pilot, networks, specs) -> tuple[dict, dict]:
    """(network, name) -> chosen (ε, exponent), and the JSON report of every pilot."""
    choices, report = {}, {}
    for net in networks:
        for name, spec in specs.items():
            if len(_grid(spec)) > 1:
                choices[(net, name)], report.setdefault(net, {})[name] = choose_point(
                    pilot.records, f"{net}/pilot/{name}", _grid(spec))
    return choices, report


def estimate_stage(*, data_dir: str, split_path: str, models_dir: str, estimates_path: str,
                   samples_path: str, progress_dir: str, metrics_path: str, seeds: list[int],
                   cutoff: float, sigma: float, rtol: float, seed: int, pilot_seed: int,
                   n_samples: int, n_pilot: int, batch_size: int,
                   preconditioners: dict[str, dict[str, Any]], progress: bool = True) -> dict:
    """Run the ``estimate_poison_digits`` stage (see the module docstring). Returns the
    estimates JSON: ``config``, ``pilots`` (network -> preconditioner -> chosen point and every
    candidate's pilot aggregate, log10) and ``estimates`` (one record per network and
    estimator, key ``{network}/{name}``, with its prior and neighbourhood terms in log10).

    ``seeds``: the training seeds (``train_poison_digits.seeds``); ``cutoff`` nats; ``sigma`` the
    prior's std (not variance); ``seed`` and ``pilot_seed`` the direction seeds of the estimates
    and of the pilots (must differ). Raises ValueError naming the params.yaml key of a bad
    setting before any file is read. Resumes from ``progress_dir``; several processes
    (params.yaml ``scale.processes``) share the pilots and the estimates.
    """
    specs = check_preconditioners(preconditioners)
    check_counts(**{f"{SECTION}.n_samples": n_samples, f"{SECTION}.n_pilot": n_pilot,
                    f"{SECTION}.batch_size": batch_size})
    check_seeds(seed, pilot_seed, keys=(f"{SECTION}.seed", f"{SECTION}.pilot_seed"))
    for key, value in (("cutoff", cutoff), ("sigma", sigma)):
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{SECTION}.{key} must be a finite number > 0, got {value!r}")
    if not 0 < rtol < 1:
        raise ValueError(f"{SECTION}.rtol must be in (0, 1), got {rtol!r}")
    if (not seeds or len(set(seeds)) != len(seeds)
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds)):
        raise ValueError(f"train_poison_digits.seeds must be distinct integers ≥ 0, got {seeds!r}")
    networks = [network_name(c, s) for c in CONDITIONS for s in seeds]
    data = load_split_data(data_dir, split_path)
    x_held = torch.as_tensor(data["heldout_images"])  # (773, 64)
    need = needed_curvature({s["kind"] for s in specs.values()})
    points: dict[str, Point] = {}  # built once per network, shared by the pilots and estimates
    shas: dict[str, str] = {}

    def load(net: str) -> Point:
        if net not in points:
            model, optimizer_state = load_trained(Path(models_dir) / net)
            vectors, _ = curvature.compute_curvature(
                need, model, x_held, torch.as_tensor(data["train_images"]),
                torch.as_tensor(data["train_labels"]), optimizer_state, hessian_method="fisher")
            anchor = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
            condition, _, s = net.rpartition("-seed")
            points[net] = Point(
                anchor=anchor, cost=localvol.ExpectedKL(model, x_held),
                preconditioner=lambda kind, eps, x, _dtype, v=vectors: build_preconditioner(
                    kind, eps, x, v),
                info={"condition": condition, "training_seed": int(s),
                      "anchor_norm": float(anchor.double().norm())})
        return points[net]

    for net in networks:
        shas[net] = hashlib.sha256((Path(models_dir) / net / MODEL_FILE).read_bytes()).hexdigest()
    salt = (tuple(sorted(shas.items())), hashlib.sha256(x_held.numpy().tobytes()).hexdigest())
    common = dict(prior=localvol.GaussianPrior(sigma), rtol=rtol, seed=seed,
                  batch_size=batch_size, exponent=0.5, progress_dir=progress_dir, salt=salt,
                  progress=progress)
    pilot = run_sweep(pilot_units(networks, specs, cutoff=cutoff, n_pilot=n_pilot,
                                  pilot_seed=pilot_seed), load, gather=True, **common)
    choices, report = _choices(pilot, networks, specs)
    sweep = run_sweep(final_units(networks, specs, choices, cutoff=cutoff, n_samples=n_samples),
                      load, **common)
    sweep.arrays.update(pilot.arrays)
    sweep.timings["pilots"] = pilot.timings
    config = {"cutoff": cutoff, "sigma": sigma, "rtol": rtol, "seed": seed,
              "pilot_seed": pilot_seed, "n_samples": n_samples, "n_pilot": n_pilot,
              "batch_size": batch_size, "preconditioners": preconditioners, "seeds": list(seeds),
              "networks": networks, "n_heldout": int(len(x_held)), "cost": COST,
              "model_sha256": shas}
    return write_sweep(sweep, config=config, extra={"pilots": report},
                       estimates_path=estimates_path, samples_path=samples_path,
                       metrics_path=metrics_path, progress_dir=progress_dir,
                       metrics=summary_metrics(sweep.records, fields=METRICS))
