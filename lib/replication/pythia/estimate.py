"""Stages ``estimate_figure4``, ``estimate_figure2`` and ``estimate_figure6`` (paper §4.3;
docs/experiments.md#pythia, docs/authors-code.md#script-slips,
docs/authors-code.md#prior-dominated-interpretation): the units of each figure, run through
:func:`replication.sweep.run_sweep` on the checkpoints' :class:`~replication.sweep.Point` s
(:mod:`.points`) and written by :func:`replication.sweep.write_sweep`.

- Figure 4 (:func:`figure4_stage`): every checkpoint, naive and Adam ν: ``ckpt_naive_step{N}``,
  ``ckpt_adam_step{N}``. At step 0 Adam's ν is 0 (never stepped): the preconditioner is the
  identity there.
- Figure 2 (:func:`figure2_stage`): the final checkpoint with more samples, for per-sample
  histograms: ``hist_naive``, ``hist_adam`` and, with ``compare_squared_gradients`` and
  ``adam_source: optimizer_state``, ``hist_sqgrad`` (the squared-gradient EMA ν) with the
  ``squared_gradient_comparison`` of the two ν.
- Figure 6 (:func:`figure6_stage`): a cutoff sweep at the final checkpoint: ``cutoff_naive_{i}``
  and ``cutoff_adam{j}_{i}`` for cutoff i and the j-th Adam ε.

Aggregates (logsumexp − log k) are stored and plotted, never the largest sample, each with its
prior term −|θ0|²/(2σ²) and neighbourhood term (docs/method.md#prior-and-neighbourhood-terms).
"""
from __future__ import annotations

from typing import Any

from replication.pythia.moments import compare_moments
from replication.pythia.points import CheckpointPoints, EstimateSettings, Setup, adam_label, prepare
from replication.sweep import (Sweep, Unit, check_counts, check_cutoffs, run_sweep, summary_metrics,
                               write_sweep)

__all__ = ["figure4_units", "figure2_units", "figure6_units", "squared_gradient_comparison",
           "figure4_stage", "figure2_stage", "figure6_stage"]

COMPARISON_HEADLINE = ("difference_log10", "log_nu_correlation", "log_scale_correlation")


def figure4_units(steps: list[int], *, cutoff: float, adam_eps: float, k: int,
                  label: str) -> list[Unit]:
    """Naive and Adam ν (series ``label``) at every step, cutoff in nats, k samples each."""
    units = []
    for step in steps:
        ckpt, meta = f"step{step}", {"figure": 4}
        units += [Unit(f"ckpt_naive_step{step}", ckpt, "naive", "naive", cutoff, k, meta=meta),
                  Unit(f"ckpt_adam_step{step}", ckpt, label, "adam", cutoff, k, eps=adam_eps,
                       meta=meta)]
    return units


def figure2_units(step: int, *, cutoff: float, adam_eps: float, k: int, label: str,
                  squared_gradients: bool) -> list[Unit]:
    """Naive, Adam ν and (if ``squared_gradients``) squared-gradient ν at ``step``."""
    ckpt, meta = f"step{step}", {"figure": 2}
    units = [Unit("hist_naive", ckpt, "naive", "naive", cutoff, k, meta=meta),
             Unit("hist_adam", ckpt, f"{label}, ε={adam_eps:g}", "adam", cutoff, k,
                  eps=adam_eps, meta=meta)]
    if squared_gradients:
        units.append(Unit("hist_sqgrad", ckpt, f"squared-gradient EMA ν, ε={adam_eps:g}",
                          "sqgrad", cutoff, k, eps=adam_eps, meta=meta))
    return units


def figure6_units(step: int, *, cutoffs: list[float], adam_eps: list[float], k: int,
                  label: str) -> list[Unit]:
    """Naive and one Adam ν series per ε at ``step``, for every cutoff (nats)."""
    ckpt, meta = f"step{step}", {"figure": 6}
    units = []
    for i, cut in enumerate(cutoffs):
        units.append(Unit(f"cutoff_naive_{i}", ckpt, "naive", "naive", cut, k, meta=meta))
        units += [Unit(f"cutoff_adam{j}_{i}", ckpt, f"{label}, ε={eps:g}", "adam", cut, k,
                       eps=eps, meta=meta) for j, eps in enumerate(adam_eps)]
    return units


def squared_gradient_comparison(records: dict[str, dict], nu, nu_sq, eps: float,
                                exponent: float) -> dict[str, Any]:
    """:func:`.moments.compare_moments` of the true and squared-gradient ν, with the Figure 2
    aggregates (log10) of naive, true ν and squared-gradient ν and their difference
    (squared-gradient − true, log10)."""
    out = compare_moments(nu, nu_sq, eps, exponent)
    out.update({"log10_volume_true_nu": records["hist_adam"]["log10_volume"],
                "log10_volume_squared_gradients": records["hist_sqgrad"]["log10_volume"],
                "log10_volume_naive": records["hist_naive"]["log10_volume"]})
    out["difference_log10"] = out["log10_volume_squared_gradients"] - out["log10_volume_true_nu"]
    return out


def _check_figure(section: str, *, cutoffs: list[float], adam_eps: list[float], k: int,
                  cutoff_key: str) -> None:
    check_cutoffs(cutoffs, key=f"{section}.{cutoff_key}")
    if not adam_eps or any(not e >= 0 for e in adam_eps):
        raise ValueError(f"{section}.adam_eps: Adam ε values must be ≥ 0, got {adam_eps}")
    check_counts(**{f"{section}.k": k})


def _run(setup: Setup, units: list[Unit], points: CheckpointPoints) -> Sweep:
    s = setup.settings
    sweep = run_sweep(units, points, prior=setup.prior, rtol=s.rtol, seed=s.seed,
                      batch_size=s.direction_batch_size, exponent=s.exponent,
                      progress_dir=s.progress_dir, salt=setup.salt, progress=s.progress)
    sweep.timings.update(points.timings)
    return sweep


def _write(setup: Setup, sweep: Sweep, *, config: dict, metrics: dict | None = None,
           extra: dict | None = None) -> dict[str, Any]:
    s = setup.settings
    return write_sweep(sweep, config=config, estimates_path=s.estimates_path,
                       samples_path=s.samples_path, metrics_path=s.metrics_path,
                       progress_dir=s.progress_dir, metrics=metrics,
                       extra={"eval_tokens": setup.eval_token_counts(), **(extra or {})})


def figure4_stage(*, cutoff: float, adam_eps: float, k: int, **settings: Any) -> dict[str, Any]:
    """Run ``estimate_figure4``. ``cutoff`` (nats), ``adam_eps``, ``k``: the
    ``estimate_figure4`` keys; ``settings``: :class:`.points.EstimateSettings`. Writes the
    estimates JSON (config, eval_tokens, training_history, estimates), per-sample NPZ and
    metrics (every aggregate with its prior and neighbourhood terms); returns the JSON.
    Raises ValueError naming the params.yaml key of a bad setting."""
    settings = EstimateSettings(**settings)
    _check_figure("estimate_figure4", cutoffs=[cutoff], adam_eps=[adam_eps], k=k,
                  cutoff_key="cutoff")
    setup = prepare(settings)
    units = figure4_units(setup.steps, cutoff=cutoff, adam_eps=adam_eps, k=k,
                          label=adam_label(settings.adam_source))
    sweep = _run(setup, units, CheckpointPoints(setup))
    return _write(setup, sweep, config=setup.config(cutoff=cutoff, adam_eps=adam_eps, k=k),
                  extra={"training_history": setup.manifest.get("history", [])})


def figure2_stage(*, cutoff: float, adam_eps: float, k: int, compare_squared_gradients: bool,
                  **settings: Any) -> dict[str, Any]:
    """Run ``estimate_figure2`` at the final checkpoint (arguments as :func:`figure4_stage`,
    plus ``compare_squared_gradients``). The estimates JSON adds the
    ``squared_gradient_comparison`` ({} unless compared); the metrics add its headline numbers
    under ``squared_gradients``."""
    settings = EstimateSettings(**settings)
    _check_figure("estimate_figure2", cutoffs=[cutoff], adam_eps=[adam_eps], k=k,
                  cutoff_key="cutoff")
    compare = compare_squared_gradients and settings.adam_source == "optimizer_state"
    setup = prepare(settings)
    final = setup.steps[-1]
    points = CheckpointPoints(setup, squared_gradients_at=(final,) if compare else ())
    units = figure2_units(final, cutoff=cutoff, adam_eps=adam_eps, k=k,
                          label=adam_label(settings.adam_source), squared_gradients=compare)
    sweep = _run(setup, units, points)
    metrics, comparison = summary_metrics(sweep.records), {}
    if compare:
        nus = points.nus[final]
        comparison = squared_gradient_comparison(sweep.records, nus["adam"], nus["sqgrad"],
                                                 adam_eps, settings.exponent)
        metrics["squared_gradients"] = {key: comparison[key] for key in COMPARISON_HEADLINE}
    config = setup.config(cutoff=cutoff, adam_eps=adam_eps, k=k,
                          compare_squared_gradients=compare_squared_gradients)
    return _write(setup, sweep, config=config, metrics=metrics,
                  extra={"squared_gradient_comparison": comparison})


def figure6_stage(*, cutoffs: list[float], adam_eps: list[float], k: int,
                  **settings: Any) -> dict[str, Any]:
    """Run ``estimate_figure6`` at the final checkpoint: every cutoff (nats, increasing), naive
    and one Adam ν series per ε of ``adam_eps``; other arguments as :func:`figure4_stage`."""
    settings = EstimateSettings(**settings)
    _check_figure("estimate_figure6", cutoffs=cutoffs, adam_eps=adam_eps, k=k,
                  cutoff_key="cutoffs")
    setup = prepare(settings)
    units = figure6_units(setup.steps[-1], cutoffs=cutoffs, adam_eps=adam_eps, k=k,
                          label=adam_label(settings.adam_source))
    sweep = _run(setup, units, CheckpointPoints(setup))
    return _write(setup, sweep, config=setup.config(cutoffs=cutoffs, adam_eps=adam_eps, k=k))
