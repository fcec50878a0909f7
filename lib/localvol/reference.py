"""A reference estimate of the local volume: sequential Monte Carlo over directions, with an
error bar from independent runs (docs/method.md#reference-estimator).

The paper's estimator (eq. 15 / 19) averages importance weights w(u) of k directions u drawn
uniformly in the preconditioner's latent coordinates (v = P u):

    μ(S) = E_{u ~ Unif(S^(N−1))}[ w(u) ],   log w(u) = the per-sample term of eq. 15 / 19.

Its log is a Markov lower bound that sits at the largest sample (eq. 13-14). Here the same
weights define a path of distributions on the sphere of latent directions,

    τ_β(u) ∝ w(u)^β  (w.r.t. the uniform measure),   0 = β_0 < β_1 < ... < β_T = 1,

and a population of M particles is carried from the paper's proposal (β = 0) to the
distribution of directions in proportion to their share of the mass (β = 1): at each step the
next temperature is chosen so that the effective sample size of the incremental weights
w^(β'−β) is a fixed fraction of M, the particles are reweighted, resampled and moved by MCMC
kernels that leave τ_β' invariant. The product of the mean incremental weights estimates μ(S):
unbiased for a schedule and kernels fixed in advance (Del Moral, Doucet & Jasra 2006), and with
the temperatures and move shapes adapted from the particles, as here, consistent with a bias of
order 1/M (Beskos, Jasra, Kantas & Thiery 2016); with one temperature step (β_1 = 1) it is the
paper's estimator on M directions.

MCMC moves: preconditioned Crank-Nicolson in a lifted space. A direction u is lifted to
y = u·χ_N / |C^(−1/2) u| (χ_N a chi variate, an exact Gibbs draw of the radius of y under
N(0, C)); then y' = √(1−s²) y + s C^(1/2) ξ, u' = y'/|y'|, accepted with probability

    min(1, w(u')^β ACG_C(u) / (w(u)^β ACG_C(u'))),   ACG_C(u) ∝ (uᵀ C⁻¹ u)^(−N/2),

the angular central Gaussian density of C (det C = 1). The kernel leaves τ_β invariant for any
diagonal C > 0; C is adapted to the particles (their per-coordinate second moments) so that the
move follows the shape of τ_β, and s is adapted to an acceptance rate near 0.3. Each proposed
direction needs one radius search, started from its parent's radius.

Langevin moves (``moves="langevin"``, pCNL of Cotter, Roberts, Stuart & White 2013): the same
lift, then g' = ρ g + (1 − ρ) ∇Ψ(g) + s ξ (ρ = √(1−s²), Ψ = β log w − log A), accepted by
Metropolis-Hastings with both proposal densities. ∇ log w comes from the cost's gradient at the
crossing point (implicit differentiation of C(θ0 + r d̂) = cutoff), as the paper's closing
section suggests (gradient-informed directions). On smooth costs it mixes in fewer moves; on
costs with kinks (max, |x|) the gradient misleads and pCN is better (benchmarks/README.md).

Error bar: R ≥ 4 independent runs give log estimates L_r; by the log-normal central limit
theorem for SMC normalising constants (Bérard, Del Moral & Doucet 2014),
L_r ≈ N(log μ(S) − σ²/2, σ²). The estimate is mean(L) + s²/2 and the 95 % interval adds
± t_(R−1) s/√R and the radius search's bias bound (N-fold the relative radius error rtol allows,
measured per final particle). It covers the truth when the runs have mixed; runs that all miss
the same part of the mass agree and do not show it (docs/method.md#reference-estimator).
"""
from __future__ import annotations

import hashlib
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.special import logsumexp
from scipy.stats import rankdata
from scipy.stats import t as student_t
from tqdm import tqdm

from ._reduce import row_dot64, row_dots64
from ._progress import cost_probe, fingerprint
from .directions import sample_directions
from .estimator import LN10, VolumeRun, _check_count, default_batch_size
from .priors import GaussianPrior, LebesguePrior
from .ray_integral import log_gaussian_ray_integral

__all__ = ["ReferenceEstimate", "ReferenceRun", "estimate_log_volume_reference", "default_reference_rtol"]

MIXED_CORRELATION = 0.1
"""Moves at one temperature go on (past n_moves, up to max_moves) while the rank correlation
between the particles' log weights now and at the step's start exceeds this: a particle that
still sits where its parent put it in the weight order has not forgotten its start."""

TARGET_ACCEPTANCE = 0.3
"""Acceptance rate the pCN step size is steered to (0.2-0.4 is the usual range for random-walk
type moves in high dimension)."""

LANGEVIN_ACCEPTANCE = 0.5
"""Acceptance rate the Langevin (pCNL) step size is steered to (0.574 is optimal for MALA-type
moves in high dimension, Roberts & Rosenthal 1998; a little lower is robust)."""

MOVES = ("pcn", "langevin")


@dataclass
class ReferenceRun:
    """One sequential Monte Carlo run. Logs in nats.

    Attributes:
        log_volume: log of the run's estimate of μ(S) (consistent, bias O(1/M): module docstring).
        paper_log_volume: log-mean-exp of the M initial weights: the paper's estimator on the
            run's M directions (its one-temperature case).
        betas: (T+1,) temperatures, 0 first, 1 last.
        ess: (T,) effective sample size fraction of each step's incremental weights.
        acceptance: (T,) mean acceptance rate of the moves after each step.
        step_sizes: (T,) pCN step size s used at each step (last move).
        unique_ancestors: (T,) distinct parents after each resampling.
        cost_evaluations: cost evaluations of this run (searches, the exponent probe and, with
            Langevin moves, one gradient per particle at the start and per proposal).
        move_evaluations_per_search: mean evaluations of a radius search inside a move.
        rtol_bias_bound: bound on |bias| of log_volume from the radius tolerance, nats.
        local_exponent_min: smallest measured d log Δ / d log r at the final particles.
        n_unbounded: final particles whose ray never reaches the cutoff (Gaussian prior).
        final_shape: (N,) diagonal angular-central-Gaussian shape of the final particles (det 1),
            what a pilot hands to the next run's proposal.
        kappas: (T,) tail exponent κ of the moves' reference chosen at each step (1: Gaussian).
        moves: (T,) pCN moves made at each step (n_moves ... max_moves).
    """

    log_volume: float
    paper_log_volume: float
    betas: np.ndarray
    ess: np.ndarray
    acceptance: np.ndarray
    step_sizes: np.ndarray
    unique_ancestors: np.ndarray
    cost_evaluations: int
    move_evaluations_per_search: float
    rtol_bias_bound: float
    local_exponent_min: float
    n_unbounded: int
    final_shape: np.ndarray = None
    kappas: np.ndarray = None
    moves: np.ndarray = None

    @property
    def n_temperatures(self) -> int:
        return len(self.betas) - 1

    def to_dict(self) -> dict:
        return {
            "log_volume": self.log_volume,
            "paper_log_volume": self.paper_log_volume,
            "n_temperatures": self.n_temperatures,
            "min_ess_fraction": float(self.ess.min()) if self.ess.size else None,
            "mean_acceptance": float(self.acceptance.mean()) if self.acceptance.size else None,
            "min_unique_ancestors": int(self.unique_ancestors.min()) if self.unique_ancestors.size else None,
            "cost_evaluations": int(self.cost_evaluations),
            "move_evaluations_per_search": self.move_evaluations_per_search,
            "rtol_bias_bound": self.rtol_bias_bound,
            "local_exponent_min": self.local_exponent_min,
            "n_unbounded": self.n_unbounded,
            "kappas": None if self.kappas is None else [float(k) for k in self.kappas],
            "mean_moves": None if self.moves is None or not self.moves.size else float(self.moves.mean()),
            "max_moves_used": None if self.moves is None or not self.moves.size else int(self.moves.max()),
        }


@dataclass
class ReferenceEstimate:
    """Result of :func:`estimate_log_volume_reference`. Logs natural (nats) unless named log10.

    Attributes:
        log_volume: mean(L_r) + s²/2 over the runs' log estimates L_r (log-normal CLT).
        interval: 95 % (low, high), nats: ± t_(R−1, 0.975) s/√R ± rtol_bias_bound.
        runs: the R :class:`ReferenceRun`.
        spread: s, the standard deviation of L_r across runs, nats.
        converged: False when s > max_spread (the log-normal CLT is not to be trusted) or a
            run hit a diagnostic (see ``problems``).
        problems: what made ``converged`` False, in words.
        rtol_bias_bound: largest of the runs' bounds, nats (included in ``interval``).
        paper_log_volume: the paper's estimator (log-mean-exp) with the caller's preconditioner
            on M directions (the first pilot's initial ones; without pilots, all R·M of the runs).
    """

    log_volume: float
    interval: tuple[float, float]
    runs: list
    spread: float
    converged: bool
    problems: list
    rtol_bias_bound: float
    paper_log_volume: float
    log_prior_at_anchor: float | None
    n_params: int
    cutoff: float
    rtol: float
    seed: int
    n_particles: int
    n_moves: int
    prior: str
    preconditioner: str
    cost_evaluations: int
    wall_time_s: float = 0.0
    meta: dict = field(default_factory=dict)

    @property
    def log10_volume(self) -> float:
        return self.log_volume / LN10

    @property
    def log10_interval(self) -> tuple[float, float]:
        return (self.interval[0] / LN10, self.interval[1] / LN10)

    @property
    def half_width(self) -> float:
        return 0.5 * (self.interval[1] - self.interval[0])

    @property
    def run_log_volumes(self) -> np.ndarray:
        return np.array([r.log_volume for r in self.runs])

    def __repr__(self) -> str:
        lo, hi = self.interval
        return (
            f"ReferenceEstimate(log_volume={self.log_volume:.6g} nats [{lo:.6g}, {hi:.6g}] "
            f"(log10 {self.log10_volume:.6g}), runs={len(self.runs)}, spread={self.spread:.3g}, "
            f"converged={self.converged}, paper_log_volume={self.paper_log_volume:.6g}, "
            f"n_params={self.n_params}, cutoff={self.cutoff:g}, preconditioner={self.preconditioner}, "
            f"cost_evaluations={self.cost_evaluations})"
        )

    def to_dict(self) -> dict:
        """JSON-serialisable aggregates (no wall time: a rerun writes the same record)."""
        lp = self.log_prior_at_anchor
        return {
            "log_volume": self.log_volume,
            "log10_volume": self.log10_volume,
            "interval": list(self.interval),
            "log10_interval": list(self.log10_interval),
            "spread": self.spread,
            "converged": self.converged,
            "problems": list(self.problems),
            "rtol_bias_bound": self.rtol_bias_bound,
            "paper_log_volume": self.paper_log_volume,
            "log_prior_at_anchor": lp,
            "log_neighbourhood": None if lp is None else self.log_volume - lp,
            "n_params": self.n_params,
            "cutoff": self.cutoff,
            "rtol": self.rtol,
            "seed": self.seed,
            "n_particles": self.n_particles,
            "n_moves": self.n_moves,
            "prior": self.prior,
            "preconditioner": self.preconditioner,
            "cost_evaluations": int(self.cost_evaluations),
            "runs": [r.to_dict() for r in self.runs],
            **self.meta,
        }


def default_reference_rtol(n_params: int, bias_nats: float = 0.05) -> float:
    """rtol whose radius-search bias stays near ``bias_nats``: bias_nats / N, within [1e-8, 1e-2].

    A point accepted with |Δ − c| ≤ rtol·c has a relative radius error ≤ rtol/p for a cost that
    grows like r^p there (p = 2 for a quadratic cost, 1 for a norm), and each log term moves by
    about N times the relative radius error (eq. 15): rtol = bias/N keeps it at bias/p.
    """
    return float(min(1e-2, max(1e-8, bias_nats / int(n_params))))


def estimate_log_volume_reference(
    cost,
    anchor: torch.Tensor,
    *,
    cutoff: float,
    prior,
    preconditioner=None,
    seed: int = 0,
    n_particles: int = 256,
    n_runs: int = 4,
    n_moves: int = 8,
    max_moves: int | None = None,
    ess_fraction: float = 0.8,
    max_temperatures: int = 2000,
    max_spread: float = 1.5,
    n_pilots: int = 2,
    moves: str = "pcn",
    rtol: float | None = None,
    batch_size: int | None = None,
    max_radius: float | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    progress: bool = True,
) -> ReferenceEstimate:
    """Estimate log μ(S) with an error bar: tempered SMC over directions (module docstring).

    The star domain, cost, prior and preconditioner are those of
    :func:`localvol.estimate_log_volume`; the preconditioner sets the starting proposal (β = 0
    is the paper's estimator with it) and the coordinates in which moves are adapted.

    Args:
        cost: batched cost (B, N) -> (B,), deterministic (checked: two evaluations of one
            point must agree bit for bit).
        anchor: (N,) float32/float64 tensor θ0, any device (float64 recommended: the
            radius tolerance below is ~1e-5 at N ~ 5,000).
        cutoff: float > 0, cost units.
        prior: :class:`GaussianPrior` or :class:`LebesguePrior`.
        preconditioner: None (naive) or an object with ``apply`` and ``n`` (eq. 15-18).
        seed: int in [0, 2^32). Run r starts from directions r·M ... (r+1)·M − 1 of the
            estimator's stream for this seed; its MCMC draws are keyed by (seed, r, step).
        n_particles: M ≥ 16 particles per run.
        n_runs: R ≥ 4 independent runs (the error bar's sample).
        n_moves: pCN moves per temperature step at least (≥ 1).
        max_moves: pCN moves per temperature step at most (None: 4·n_moves): between the two,
            moves go on while the particles' log weights keep their order at the step's
            start (rank correlation > MIXED_CORRELATION).
        ess_fraction: in (0, 1): each step's incremental weights keep this fraction of M as
            effective sample size.
        max_temperatures: steps allowed to reach β = 1; beyond, ValueError (progress kept).
        max_spread: runs whose log estimates spread (sd) more than this, nats, are reported
            as not converged.
        n_pilots: pilot runs before the estimation runs (≥ 0): each fits a diagonal angular
            central Gaussian shape to its final particles, and the next run (pilot or
            estimation) starts from the proposal P0 ∘ diag(√c) (still unit determinant). The
            estimation runs use no pilot draw: the pilots' shape is a fixed proposal to them.
        moves: "pcn" (preconditioned Crank-Nicolson, needs cost values only) or "langevin"
            (pCN Langevin: the same lifted move with a drift along the gradient of the log
            weight, from the cost's gradient at each crossing point by implicit
            differentiation; one backward pass per proposal; the cost must be differentiable by
            torch.autograd and the preconditioner's ``apply`` built from torch operations).
        rtol: radius-search tolerance (None: :func:`default_reference_rtol`).
        batch_size: directions per cost call (None: the estimator's default for M).
        max_radius: as :func:`localvol.estimate_log_volume`.
        checkpoint_path: optional .npz; the state is written atomically after every
            temperature step and a rerun with the same settings, cost and code resumes it
            (bit-identical to an uninterrupted run); other settings are refused.
        progress: a tqdm bar per run over temperature steps.

    Returns:
        :class:`ReferenceEstimate`.

    Raises:
        ValueError: bad arguments (as the estimator, plus n_particles < 16, n_runs < 4,
            n_moves < 1, ess_fraction outside (0, 1)); a cost that is not deterministic; a
            Lebesgue body unbounded along some direction (infinite volume); particles that
            collapse onto one ancestor; a schedule that does not reach β = 1 within
            max_temperatures; a checkpoint of other settings. What was computed stays in
            checkpoint_path.
    """
    t0 = time.perf_counter()
    n_particles = _check_count(n_particles, "n_particles", "an integer ≥ 16")
    n_runs = _check_count(n_runs, "n_runs", "an integer ≥ 4")
    if isinstance(n_pilots, bool) or not isinstance(n_pilots, (int, np.integer)) or n_pilots < 0:
        raise ValueError(f"n_pilots must be an integer ≥ 0, got {n_pilots!r}")
    n_moves = _check_count(n_moves, "n_moves", "an integer ≥ 1")
    max_moves = 4 * n_moves if max_moves is None else _check_count(max_moves, "max_moves", f"an integer ≥ n_moves = {n_moves}")
    if max_moves < n_moves:
        raise ValueError(f"max_moves must be an integer ≥ n_moves = {n_moves}, got {max_moves}")
    max_temperatures = _check_count(max_temperatures, "max_temperatures", "an integer ≥ 1")
    if n_particles < 16:
        raise ValueError(f"n_particles must be an integer ≥ 16, got {n_particles}")
    if n_runs < 4:
        raise ValueError(f"n_runs must be an integer ≥ 4 (the error bar needs independent runs), got {n_runs}")
    if not (isinstance(ess_fraction, (int, float, np.floating)) and 0 < ess_fraction < 1):
        raise ValueError(f"ess_fraction must be in (0, 1), got {ess_fraction!r}")
    if moves not in MOVES:
        raise ValueError(f"moves must be one of {MOVES}, got {moves!r}")
    if not (isinstance(max_spread, (int, float)) and max_spread > 0):
        raise ValueError(f"max_spread must be > 0 nats, got {max_spread!r}")
    if not isinstance(anchor, torch.Tensor) or anchor.ndim != 1:
        raise ValueError(f"anchor must be a 1-D float32/float64 tensor, got {type(anchor).__name__} "
                         f"{tuple(getattr(anchor, 'shape', ()))}")
    n = anchor.numel()
    rtol = default_reference_rtol(n) if rtol is None else rtol
    if batch_size is None:
        batch_size = default_batch_size(n_particles, n)
    # VolumeRun validates everything the estimator does and holds the run constants; its own
    # sample store is not used (one sample, never searched)
    base = VolumeRun(cost, anchor, cutoff=cutoff, n_samples=1, prior=prior, preconditioner=preconditioner,
                     rtol=rtol, batch_size=batch_size, seed=seed, max_radius=max_radius)
    _check_deterministic(cost, base.anchor, seed)
    smc = _Sampler(base, n_particles, (n_moves, max_moves), ess_fraction, max_temperatures, batch_size, seed, moves)
    state_key = None
    saved = {}
    if checkpoint_path is not None:
        # max_temperatures only decides where a run stops, not its path: not in the key
        state_key = _state_key(base, n_particles, n_runs, (n_moves, max_moves), ess_fraction, n_pilots, batch_size,
                               moves)
        saved = _load_state(checkpoint_path, state_key)
    def save_as(r):
        def save(state):
            if checkpoint_path is not None:
                saved[r] = state
                _save_state(checkpoint_path, state_key, saved)
        save.keeps = checkpoint_path is not None  # whether a stopped run's steps are kept
        return save

    # pilot runs (numbered after the estimation runs): each fits the diagonal ACG shape of the
    # final particles, and the next run starts from the proposal with that shape
    shape, pilot_evaluations = None, 0
    for p in range(n_pilots):
        sampler = smc if shape is None else _Sampler(
            _shaped_base(base, shape), n_particles, (n_moves, max_moves), ess_fraction, max_temperatures, batch_size, seed, moves)
        pilot = sampler.run(n_runs + p, saved.get(n_runs + p), save_as(n_runs + p), progress)
        pilot_evaluations += pilot.cost_evaluations
        shape = pilot.final_shape if shape is None else _normalised(shape * pilot.final_shape)
    estimation = smc if shape is None else _Sampler(
        _shaped_base(base, shape), n_particles, (n_moves, max_moves), ess_fraction, max_temperatures, batch_size, seed, moves)
    runs = [estimation.run(r, saved.get(r), save_as(r), progress) for r in range(n_runs)]
    return _combine(runs, base, estimation, n_particles, n_moves, max_spread, time.perf_counter() - t0,
                    n_pilots, shape, pilot_evaluations, smc.initial_weights.get(n_runs),
                    checkpointed=checkpoint_path is not None)


def _combine(runs, base, smc, n_particles, n_moves, max_spread, wall, n_pilots, shape, pilot_evaluations,
             paper_weights=None, checkpointed=False):
    # evaluations: the anchor, the determinism check (2), the checkpoint's cost probe (3), the runs
    L = np.array([r.log_volume for r in runs])
    R = len(L)
    m, s = float(L.mean()), float(L.std(ddof=1))
    bias = float(max(r.rtol_bias_bound for r in runs))
    half = float(student_t.ppf(0.975, R - 1)) * s / math.sqrt(R)
    estimate = m + 0.5 * s * s
    problems = []
    if not math.isfinite(s) or s > max_spread:
        problems.append(f"the runs' log estimates spread by sd {s:.3g} nats > max_spread = {max_spread:g}: "
                        "the log-normal error bar is not to be trusted; use more particles, more moves "
                        "(n_moves) or a better preconditioner")
    if not math.isfinite(bias):
        problems.append("the radius tolerance's bias could not be bounded (a cost that does not grow at "
                        "the crossing); lower rtol")
    for i, r in enumerate(runs):
        if r.acceptance.size and r.acceptance.min() < 0.02:
            problems.append(f"run {i}: a move's acceptance rate fell to {r.acceptance.min():.3g}: the "
                            "particles hardly moved at some temperature")
    # the paper's estimator with the caller's preconditioner: the first pilot's initial weights
    # (or, without pilots, those of the estimation runs)
    initial = (paper_weights if paper_weights is not None
               else np.concatenate([smc.initial_weights[i] for i in range(R)]))
    return ReferenceEstimate(
        log_volume=estimate,
        interval=(estimate - half - bias, estimate + half + bias),
        runs=runs,
        spread=s,
        converged=not problems,
        problems=problems,
        rtol_bias_bound=bias,
        paper_log_volume=float(logsumexp(initial) - math.log(initial.size)),
        log_prior_at_anchor=base.log_prior_at_anchor,
        n_params=base.n,
        cutoff=base.cutoff,
        rtol=base.rtol,
        seed=base.seed,
        n_particles=n_particles,
        n_moves=n_moves,
        prior=repr(base.prior),
        preconditioner="naive" if base.preconditioner is None else repr(base.preconditioner),
        cost_evaluations=1 + 2 + 3 * checkpointed + sum(r.cost_evaluations for r in runs) + pilot_evaluations,
        wall_time_s=wall,
        meta={"n_pilots": n_pilots, "max_moves": smc.max_moves, "moves": smc.moves,
              "pilot_shape_log_sd": None if shape is None else float(np.log(shape).std())},
    )


class _Sampler:
    """The SMC of one run, over the latent directions of ``base`` (a VolumeRun)."""

    def __init__(self, base, n_particles, n_moves, ess_fraction, max_temperatures, batch_size, seed, moves="pcn"):
        self.base, self.M = base, n_particles
        self.moves = moves
        self.n_moves, self.max_moves = n_moves
        self.ess_fraction, self.max_temperatures = ess_fraction, max_temperatures
        self.batch_size, self.seed = batch_size, seed
        self.n = base.n
        self.dtype, self.device = base.anchor.dtype, base.anchor.device
        self.initial_weights = {}

    # -- weights -------------------------------------------------------------------------------
    def weights(self, z, guess, exponent=None):
        """log w of the (M, N) latent directions z, searched in batches; guess: (M,) radii or None.

        Returns (log w (M,), Euclidean radii (M,), evaluations (M,))."""
        out_w, out_r, out_e, out_p = [], [], [], []
        for s in range(0, len(z), self.batch_size):
            zb = z[s : s + self.batch_size].clone()  # a preconditioner may work in place
            gb = None if guess is None else guess[s : s + self.batch_size]
            if gb is None and out_r:  # later batches of the first search: the median so far
                finite = np.concatenate(out_r)
                finite = finite[np.isfinite(finite)]
                gb = None if finite.size == 0 else np.full(len(zb), float(np.median(finite)))
            pb = None if exponent is None else exponent[s : s + self.batch_size]
            w, res, _ = self.base.log_terms(zb, gb, first_index=s, exponent=pb)
            if isinstance(self.base.prior, LebesguePrior) and np.isinf(res.radius).any():
                i = s + int(np.flatnonzero(np.isinf(res.radius))[0])
                raise ValueError(
                    f"the body is unbounded along particle {i}'s direction (the cost stays below the "
                    f"cutoff {self.base.cutoff:g} up to max_radius = {self.base.max_radius:g}): its "
                    "Lebesgue volume is infinite; use a GaussianPrior or a cost that bounds the "
                    "neighbourhood")
            out_w.append(w), out_r.append(res.radius), out_e.append(res.evaluations), out_p.append(res.exponent)
        return np.concatenate(out_w), np.concatenate(out_r), np.concatenate(out_e), np.concatenate(out_p)

    # -- one run -------------------------------------------------------------------------------
    def run(self, r, state, save, progress) -> ReferenceRun:
        M, n = self.M, self.n
        if state is None:
            z = sample_directions(n, range(r * M, (r + 1) * M), seed=self.seed, dtype=self.dtype,
                                  device=self.device)  # (M, N)
            logw, radius, evals, exponent = self.weights(z, None)
            grad = np.zeros(0)
            if self.moves == "langevin":
                grad, grad_evals = self.log_weight_gradients(z, radius)
                evals = np.append(evals, grad_evals)
            state = dict(z=z.cpu().numpy(), logw=logw, radius=radius, exponent=exponent, grad=grad, initial=logw.copy(),
                         c=np.ones(n), kappas=np.zeros(0), step_size=np.array(0.5), betas=np.array([0.0]), log_z=np.array(0.0),
                         ess=np.zeros(0), acceptance=np.zeros(0), moves=np.zeros(0, np.int64), step_sizes=np.zeros(0),
                         ancestors=np.zeros(0, np.int64), evaluations=np.array(int(evals.sum())),
                         move_evaluations=np.array(0), move_searches=np.array(0))
            save(state)
        self.initial_weights[r] = state["initial"]
        bar = tqdm(total=1.0, initial=float(state["betas"][-1]), disable=not progress,
                   desc=f"reference run {r}", bar_format="{l_bar}{bar}| β={n:.4f} [{elapsed}]")
        while state["betas"][-1] < 1.0:
            t = len(state["betas"]) - 1
            if t >= self.max_temperatures:
                bar.close()
                raise ValueError(
                    f"reference run {r} reached only β = {state['betas'][-1]:.4g} after max_temperatures = "
                    f"{self.max_temperatures} steps: the proposal is too far from the target to bridge "
                    "within this budget; raise max_temperatures or start from a better preconditioner"
                    + (" (the steps so far are kept in the checkpoint)" if save.keeps else ""))
            state = self.step(r, t, state)
            save(state)
            bar.n = float(state["betas"][-1])
            bar.refresh()
        bar.close()
        return self.finish(r, state)

    def step(self, r, t, state) -> dict:
        """Temperature step t: next β by ESS, reweight, resample, adapt, move."""
        M = self.M
        beta = float(state["betas"][-1])
        logw = state["logw"]
        delta = _next_increment(logw, 1.0 - beta, self.ess_fraction)
        inc = delta * logw
        log_mean = float(logsumexp(inc) - math.log(M))
        ess = float(np.exp(2 * logsumexp(inc) - logsumexp(2 * inc))) / M
        new_beta = 1.0 if delta >= 1.0 - beta else beta + delta
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, r, t, 0]))
        parents = _systematic_resample(inc, rng)
        unique = int(np.unique(parents).size)
        if unique == 1:
            raise ValueError(
                f"reference run {r}: the particles collapsed onto one ancestor at β = {new_beta:.4g} "
                "(one direction holds all the weight): use more particles, or a preconditioner "
                "closer to the neighbourhood's shape")
        z = torch.as_tensor(state["z"][parents], device=self.device)
        logw, radius = logw[parents].copy(), state["radius"][parents].copy()
        exponent = np.asarray(state["exponent"], dtype=np.float64)[parents].copy()
        langevin = self.moves == "langevin"
        grad = state["grad"][parents].copy() if langevin else state["grad"]
        target_acceptance = LANGEVIN_ACCEPTANCE if langevin else TARGET_ACCEPTANCE
        c = np.asarray(state["c"], dtype=np.float64)
        kappa = float(state["kappas"][-1]) if len(state["kappas"]) else 1.0
        step_size = float(state["step_size"])
        acc_total, evals, searches, grad_evals = 0.0, 0, 0, 0
        gen = torch.Generator(device=self.device)
        halves = _ancestor_halves(parents)
        fitted = [(kappa, c), (kappa, c)]
        start_rank = _ranks(logw)
        j = 0
        while j < self.max_moves:
            for h, mine in enumerate(halves):
                # each half moves with a shape fitted to the other half (held fixed meanwhile), and
                # the copies of one parent are all in one half: a particle's proposal never
                # depends on itself or its siblings (no self-reinforcing fit)
                other = z[halves[1 - h]]
                fitted[h] = _fit_shape(other, fitted[h], choose_kappa=(j == 0))
                key = np.random.SeedSequence([self.seed, r, t, j + 1, h]).generate_state(1, np.uint64)[0]
                gen.manual_seed(int(key >> np.uint64(1)))
                if langevin:
                    zh, lh, rh, ph, gh, acc, e = self.move_langevin(
                        z[mine], logw[mine], radius[mine], exponent[mine], grad[mine], new_beta, fitted[h],
                        step_size, gen, rng)
                    grad[mine] = gh
                    grad_evals += len(mine)  # one cost gradient at each proposal's crossing
                else:
                    zh, lh, rh, ph, acc, e = self.move(z[mine], logw[mine], radius[mine], exponent[mine], new_beta,
                                                       fitted[h], step_size, gen, rng)
                z[mine], logw[mine], radius[mine], exponent[mine] = zh, lh, rh, ph
                evals += int(e.sum())
                searches += len(e)
                acc_total += acc * len(mine) / M
            # Robbins-Monro on log s towards the target acceptance
            step_size = float(np.clip(step_size * math.exp(acc_total / (j + 1) - target_acceptance), 1e-4, 1.0))
            j += 1
            # at least n_moves; then until the particles' log weights no longer remember their
            # order at the step's start (rank correlation ≤ MIXED_CORRELATION), or max_moves
            if j >= self.n_moves and not _rank_correlation(start_rank, _ranks(logw)) > MIXED_CORRELATION:
                break
        kappa, c = fitted[0]
        move_evals = evals
        return dict(
            z=z.cpu().numpy(), logw=logw, radius=radius, exponent=exponent, grad=grad, initial=state["initial"], c=c,
            kappas=np.append(state["kappas"], kappa), step_size=np.array(step_size), betas=np.append(state["betas"], new_beta),
            log_z=np.array(float(state["log_z"]) + log_mean), ess=np.append(state["ess"], ess),
            acceptance=np.append(state["acceptance"], acc_total / j), moves=np.append(state["moves"], j),
            step_sizes=np.append(state["step_sizes"], step_size),
            ancestors=np.append(state["ancestors"], unique),
            evaluations=np.array(int(state["evaluations"]) + evals + grad_evals),
            move_evaluations=np.array(int(state["move_evaluations"]) + move_evals),
            move_searches=np.array(int(state["move_searches"]) + searches),
        )

    def move(self, z, logw, radius, exponent, beta, shape, s, gen, rng):
        """One lifted pCN move of every particle, invariant for τ_β (module docstring).

        shape = (κ, c): the proposal's reference is the product density of y_j = √c_j sign(g_j)|g_j|^κ,
        g ~ N(0, I) (κ = 1: N(0, diag c)); the move is pCN on g."""
        M, n = z.shape
        kappa = shape[0]
        sd, g, log_a = _lift(z, shape, rng)
        xi = torch.randn(M, n, generator=gen, dtype=torch.float64, device=z.device)
        g = math.sqrt(1.0 - s * s) * g + s * xi
        y = sd * torch.sign(g) * g.abs() ** kappa
        # the proposal in the run's dtype, and its density where it is stored (exact MH ratio)
        z_new = (y / torch.linalg.vector_norm(y, dim=1, keepdim=True)).to(z.dtype)
        log_a_new, _ = _angular_log_density(z_new.double(), sd, kappa)
        guess = np.where(np.isfinite(radius), radius, self.base.max_radius)
        logw_new, radius_new, evals, exponent_new = self.weights(z_new, guess, exponent)
        # log acceptance: β Δlog w − [log A(u') − log A(u)], A the reference's angular density
        log_alpha = beta * (logw_new - logw) - (log_a_new - log_a)
        accept = np.log(rng.uniform(size=M)) < log_alpha
        acc_t = torch.as_tensor(accept, device=z.device)
        z = torch.where(acc_t[:, None], z_new, z)
        logw = np.where(accept, logw_new, logw)
        radius = np.where(accept, radius_new, radius)
        # the next search's first step: the exponent the proposal's search measured (a nearby
        # ray), accepted or not; the old one where it measured none
        exponent = np.where(np.isfinite(exponent_new), exponent_new, exponent)
        return z, logw, radius, exponent, float(accept.mean()), evals

    # -- Langevin moves ------------------------------------------------------------------------
    def log_weight_gradients(self, z, radius):
        """∇_u log w(u) at the (M, N) latent directions z, whose Euclidean radii along
        d̂ = P u / |P u| are ``radius``: (M, N) float64 array, and the cost evaluations (M).

        By implicit differentiation of C(θ0 + r(d̂) d̂) = cutoff at the crossing x = θ0 + r d̂:
        ∂r/∂d̂ = −r ∇C(x) / (∇C(x)·d̂). The log term (eq. 15 / 19) in latent coordinates is
        log w = const + L(r, d̂) − N log|P u| + N log|u|, with L = N log r (Lebesgue) or the log
        of the Gaussian ray integral Î(â, b̂, r), â = Σ d̂_j²/σ_j², b̂ = −Σ d̂_j θ0_j/σ_j², whose
        partial derivatives are ∂L/∂r = r^(N−1) e^(−âr²/2+b̂r)/Î, ∂L/∂â = −E[t²]/2, ∂L/∂b̂ = E[t]
        (moments of the ray's density, ratios of Î at N+2, N+1 and N). torch.autograd carries
        these through d̂(u) and the preconditioner. A ray that never reaches the cutoff (r = ∞,
        Gaussian prior) has ∂L/∂r = 0. The gradient's radial part does not matter (log w is
        homogeneous of degree 0 in u)."""
        base = self.base
        n = self.n
        out = []
        for s in range(0, len(z), self.batch_size):
            zb = z[s : s + self.batch_size].detach().double()
            rb = np.asarray(radius[s : s + self.batch_size], dtype=np.float64)
            finite = np.isfinite(rb)
            with torch.enable_grad():
                u = zb.clone().requires_grad_(True)
                try:
                    d = u if base.preconditioner is None else base.preconditioner.apply(u.clone())
                    d = d.double()
                except torch.cuda.OutOfMemoryError:
                    raise
                except RuntimeError as err:
                    raise ValueError(f"moves='langevin' needs a preconditioner whose apply torch.autograd can "
                                     f"differentiate ({err})") from err
                if not d.requires_grad:
                    raise ValueError(
                        "moves='langevin' needs a preconditioner whose apply torch.autograd can differentiate: "
                        f"{base.preconditioner!r} returned a tensor that does not depend on its input through "
                        "autograd (computed with numpy, detached or under torch.no_grad?); build apply from "
                        "torch operations or use moves='pcn'")
                d_norm = torch.linalg.vector_norm(d, dim=1)
                d_hat = d / d_norm[:, None]
                # the cost's gradient at each finite crossing
                r_t = torch.as_tensor(np.where(finite, rb, 0.0), dtype=torch.float64, device=zb.device)
                x = (base.anchor.double() + r_t[:, None] * d_hat.detach()).to(base.anchor.dtype)
                x = x.detach().requires_grad_(True)
                try:
                    c = base.cost(x)
                    (grad_c,) = torch.autograd.grad(torch.as_tensor(c).sum(), x)
                except torch.cuda.OutOfMemoryError:
                    raise  # the backward pass needs more memory than the searches: not a "no gradient"
                except RuntimeError as err:
                    raise ValueError(f"moves='langevin' needs a cost that torch.autograd can differentiate ({err}); "
                                     "use moves='pcn'") from err
                grad_c = grad_c.double()
                slope = (grad_c * d_hat.detach()).sum(1)  # dC/dr along the ray (> 0 at a crossing)
                # where the cost does not grow at the crossing (a plateau, a kink) ∂r/∂d̂ is not
                # defined: no drift from r there (the move stays exact, only less informed)
                fin_t = torch.as_tensor(finite, device=zb.device) & (slope > 0) & torch.isfinite(grad_c).all(1)
                dr_dd = torch.where(fin_t[:, None], -r_t[:, None] * grad_c / slope[:, None], torch.zeros_like(grad_c))
                if isinstance(base.prior, GaussianPrior):
                    inv_var = base.prior._inv_var(base.anchor)
                    inv_var = torch.as_tensor(inv_var, dtype=torch.float64, device=zb.device)
                    a_hat = (d_hat**2 * inv_var).sum(1)
                    b_hat = -(d_hat * base.anchor.double() * inv_var).sum(1)
                    a_np, b_np = a_hat.detach().cpu().numpy(), b_hat.detach().cpu().numpy()
                    r_np = np.where(finite, rb, np.inf)
                    l0 = log_gaussian_ray_integral(a_np, b_np, n, r_np)
                    e1 = np.exp(log_gaussian_ray_integral(a_np, b_np, n + 1, r_np) - l0)
                    e2 = np.exp(log_gaussian_ray_integral(a_np, b_np, n + 2, r_np) - l0)
                    with np.errstate(divide="ignore", invalid="ignore"):
                        dl_dr = np.where(finite, np.exp(-0.5 * a_np * rb**2 + b_np * rb + (n - 1) * np.log(rb) - l0), 0.0)
                    dl_dr, e1, e2 = (torch.as_tensor(v, dtype=torch.float64, device=zb.device) for v in (dl_dr, e1, e2))
                    surrogate = (dl_dr * (d_hat * dr_dd).sum(1) - 0.5 * e2 * a_hat + e1 * b_hat)
                else:
                    r_safe = torch.as_tensor(np.where(finite, rb, 1.0), dtype=torch.float64, device=zb.device)
                    surrogate = n * (d_hat * dr_dd).sum(1) / r_safe
                surrogate = surrogate - n * torch.log(d_norm) + n * torch.log(torch.linalg.vector_norm(u, dim=1))
                (g,) = torch.autograd.grad(surrogate.sum(), u)
            g = torch.where(torch.isfinite(g).all(1, keepdim=True), g, torch.zeros_like(g))
            out.append(g.detach().cpu().numpy())
        return np.concatenate(out), len(z)

    def _langevin_drift(self, g, grad_u, beta, sd, kappa):
        """Ψ(g) = β log w(u(g)) − log A(u(g)) up to its value (the caller has log w) and ∇_g Ψ,
        through u(g) = y/|y|, y_j = sd_j sign(g_j)|g_j|^κ, with ∇_u log w = grad_u (first order)."""
        with torch.enable_grad():
            g = g.detach().clone().requires_grad_(True)
            y = sd * torch.sign(g) * g.abs().clamp_min(1e-300) ** kappa
            u = y / torch.linalg.vector_norm(y, dim=1, keepdim=True)
            t = u.abs() / sd
            log_a = -0.5 * u.shape[1] * torch.log((t ** (2.0 / kappa)).sum(1))
            if kappa != 1.0:
                log_a = log_a + (1.0 / kappa - 1.0) * torch.log(u.abs().clamp_min(1e-300)).sum(1)
            psi = beta * (u * grad_u).sum(1) - log_a
            (drift,) = torch.autograd.grad(psi.sum(), g)
        return drift.detach()

    def move_langevin(self, z, logw, radius, exponent, grad, beta, shape, s, gen, rng):
        """One lifted pCN Langevin move of every particle (pCNL, Cotter, Roberts, Stuart & White
        2013), invariant for τ_β: the lift of :meth:`move`, then on g (target ∝ φ(g) e^Ψ(g),
        Ψ = β log w − log A) the proposal g' = ρ g + (1 − ρ) ∇Ψ(g) + s ξ, ρ = √(1 − s²),
        accepted by Metropolis-Hastings with both Gaussian proposal densities (exact for any
        drift). Returns what :meth:`move` returns plus the gradients of the new particles."""
        M, n = z.shape
        kappa = shape[0]
        sd, g, log_a = _lift(z, shape, rng)
        grad_t = torch.as_tensor(grad, dtype=torch.float64, device=z.device)
        rho = math.sqrt(1.0 - s * s)
        drift = self._langevin_drift(g, grad_t, beta, sd, kappa)
        xi = torch.randn(M, n, generator=gen, dtype=torch.float64, device=z.device)
        g_new = rho * g + (1.0 - rho) * drift + s * xi
        y = sd * torch.sign(g_new) * g_new.abs() ** kappa
        z_new = (y / torch.linalg.vector_norm(y, dim=1, keepdim=True)).to(z.dtype)
        log_a_new, _ = _angular_log_density(z_new.double(), sd, kappa)
        guess = np.where(np.isfinite(radius), radius, self.base.max_radius)
        logw_new, radius_new, evals, exponent_new = self.weights(z_new, guess, exponent)
        grad_new, _ = self.log_weight_gradients(z_new, radius_new)
        grad_new_t = torch.as_tensor(grad_new, dtype=torch.float64, device=z.device)
        drift_new = self._langevin_drift(g_new, grad_new_t, beta, sd, kappa)

        def log_q(to, frm, drift_frm):  # log N(to; ρ frm + (1−ρ) ∇Ψ(frm), s² I), up to a constant
            return (-0.5 * ((to - rho * frm - (1.0 - rho) * drift_frm) ** 2).sum(1) / (s * s)).cpu().numpy()

        log_target = (beta * logw - log_a - 0.5 * (g**2).sum(1).cpu().numpy())
        log_target_new = (beta * logw_new - log_a_new - 0.5 * (g_new**2).sum(1).cpu().numpy())
        log_alpha = log_target_new - log_target + log_q(g, g_new, drift_new) - log_q(g_new, g, drift)
        log_alpha = np.where(np.isfinite(log_alpha), log_alpha, -np.inf)
        accept = np.log(rng.uniform(size=M)) < log_alpha
        acc_t = torch.as_tensor(accept, device=z.device)
        z = torch.where(acc_t[:, None], z_new, z)
        logw = np.where(accept, logw_new, logw)
        radius = np.where(accept, radius_new, radius)
        grad = np.where(accept[:, None], grad_new, grad)
        exponent = np.where(np.isfinite(exponent_new), exponent_new, exponent)
        return z, logw, radius, exponent, grad, float(accept.mean()), evals

    def finish(self, r, state) -> ReferenceRun:
        """The run's result, with the radius tolerance's bias bound at the final particles."""
        z = torch.as_tensor(state["z"], device=self.device)
        exponent, sensitivity, evals = self._local_exponents(z, state["radius"])
        rtol = self.base.rtol
        with np.errstate(divide="ignore", invalid="ignore"):
            per_particle = np.where(np.isfinite(state["radius"]), sensitivity * -math.log1p(-rtol) / exponent, 0.0)
        finite = np.isfinite(state["radius"])
        bad = finite & ~(exponent > 0)
        bound = float("inf") if bad.any() else float(np.mean(np.abs(per_particle)))
        searches = int(state["move_searches"])
        return ReferenceRun(
            log_volume=float(state["log_z"]),
            paper_log_volume=float(logsumexp(state["initial"]) - math.log(len(state["initial"]))),
            betas=state["betas"], ess=state["ess"], acceptance=state["acceptance"],
            step_sizes=state["step_sizes"], unique_ancestors=state["ancestors"],
            cost_evaluations=int(state["evaluations"]) + evals,
            move_evaluations_per_search=float(state["move_evaluations"]) / searches if searches else float("nan"),
            rtol_bias_bound=bound,
            local_exponent_min=float(exponent[finite].min()) if finite.any() else float("nan"),
            n_unbounded=int((~finite).sum()),
            final_shape=_shrunk(_adapt_scales(z, state["c"]), len(z)),
            kappas=state["kappas"], moves=state["moves"],
        )

    def _local_exponents(self, z, radius):
        """p = d log Δ / d log r at each final particle's crossing (one more cost evaluation
        each) and the sensitivity d log w / d log r of its log term (no cost evaluation)."""
        base = self.base
        h = 1e-3
        M = len(z)
        exponent = np.full(M, np.nan)
        sensitivity = np.zeros(M)
        evals = 0
        for s in range(0, M, self.batch_size):
            idx = np.arange(s, min(s + self.batch_size, M))
            ok = idx[np.isfinite(radius[idx])]
            if ok.size == 0:
                continue
            u = z[ok].clone()
            v = u if base.preconditioner is None else base.preconditioner.apply(u)
            v = v.to(base.anchor.device, base.anchor.dtype)
            v_hat = v / torch.linalg.vector_norm(v, dim=1, keepdim=True)
            r_t = torch.as_tensor(radius[ok], dtype=base.anchor.dtype, device=base.anchor.device)
            pts = torch.cat([base.anchor + r_t[:, None] * v_hat, base.anchor + (r_t * (1 + h))[:, None] * v_hat])
            with torch.no_grad():
                vals = torch.as_tensor(base.cost(pts)).detach().double().cpu().numpy() - base.anchor_cost
            evals += len(pts)
            d0, d1 = vals[: len(ok)], vals[len(ok):]
            with np.errstate(divide="ignore", invalid="ignore"):
                exponent[ok] = np.log(d1 / d0) / math.log1p(h)
            sensitivity[ok] = _log_term_sensitivity(base, v_hat, radius[ok], h)
        return exponent, sensitivity, evals


class _ShapedPreconditioner:
    """P0 ∘ diag(√c): the proposal of a run that starts from a pilot's fitted shape c (det 1,
    so the estimator of eq. 15 stays unbiased)."""

    def __init__(self, inner, shape):
        self.inner = inner
        self.root = torch.as_tensor(np.sqrt(shape))
        self.n = len(shape)

    def apply(self, u):
        u = u * self.root.to(u.device, u.dtype)
        return u if self.inner is None else self.inner.apply(u)

    def __repr__(self):
        return f"Shaped({self.inner!r}, pilot shape sd(log c) = {float(torch.log(self.root).std() * 2):.3g})"


def _shaped_base(base, shape):
    """A copy of the VolumeRun ``base`` whose preconditioner starts from the pilot's shape."""
    import copy
    shaped = copy.copy(base)
    shaped.preconditioner = _ShapedPreconditioner(base.preconditioner, shape)
    return shaped


def _log_term_sensitivity(base, v_hat, radius, h):
    """d log w / d log r of the per-sample term at the radius (finite difference in log r):
    N for the Lebesgue measure; from the Gaussian ray integral otherwise."""
    if isinstance(base.prior, LebesguePrior):
        return np.full(len(radius), float(base.n))
    a, b = base.prior.ray_coefficients(base.anchor, v_hat)
    lo = log_gaussian_ray_integral(a, b, base.n, radius)
    hi = log_gaussian_ray_integral(a, b, base.n, radius * (1 + h))
    return (hi - lo) / math.log1p(h)


def _ranks(x) -> np.ndarray:
    """Ranks of the (M,) values x, ties averaged (the copies of one parent share a rank)."""
    return rankdata(x, method="average")


def _rank_correlation(a, b) -> float:
    """Spearman correlation of two rank vectors (NaN when one is constant)."""
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / den if den > 0 else float("nan")


def _next_increment(logw, remaining, ess_fraction) -> float:
    """Largest Δ ≤ remaining with ESS(exp(Δ log w)) ≥ ess_fraction · M (bisection)."""
    M = len(logw)
    if not np.all(np.isfinite(logw)):
        raise ValueError("a particle's log weight is not finite; the cost or the body is broken there")

    def ess(d):
        x = d * logw
        return math.exp(2 * logsumexp(x) - logsumexp(2 * x)) / M

    if ess(remaining) >= ess_fraction:
        return remaining
    lo, hi = 0.0, remaining
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if ess(mid) >= ess_fraction:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * max(hi, 1e-300):
            break
    if lo == 0.0:
        lo = hi  # one particle dominates even the smallest step: take the step, resampling keeps it
    return lo


def _systematic_resample(log_weights, rng) -> np.ndarray:
    """Systematic resampling: M parent indices in proportion to exp(log_weights)."""
    M = len(log_weights)
    w = np.exp(log_weights - logsumexp(log_weights))
    positions = (rng.uniform() + np.arange(M)) / M
    cum = np.cumsum(w)
    cum[-1] = 1.0
    return np.searchsorted(cum, positions, side="right").clip(0, M - 1)


KAPPAS = tuple(float(k) for k in np.exp(np.linspace(math.log(0.5), math.log(4.0), 10)))
"""Tail exponents κ the moves' reference may take (κ > 1: heavy-tailed, sparse directions; κ < 1:
light-tailed, directions towards the diagonals), chosen per temperature step by likelihood."""


def _lift(z, shape, rng):
    """The (M, N) unit rows z lifted to g with y_j = sd_j sign(g_j)|g_j|^κ in direction z and
    |g| ~ χ_N (an exact Gibbs draw of the radius given the direction, since g ~ N(0, I)).
    Returns (sd (N,) float64 tensor, g (M, N) float64, log A(z) (M,) of the reference)."""
    M, n = z.shape
    kappa, c = shape
    sd = torch.as_tensor(np.sqrt(c), dtype=torch.float64, device=z.device)
    z64 = z.double()
    log_a, g_norm = _angular_log_density(z64, sd, kappa)
    chi = np.sqrt(rng.chisquare(n, size=M))
    lift = torch.as_tensor(chi, dtype=torch.float64, device=z.device) / g_norm
    return sd, torch.sign(z64) * (z64.abs() / sd) ** (1.0 / kappa) * lift[:, None], log_a


def _angular_log_density(z, sd, kappa):
    """log A(u) (up to a constant of u) of the direction of y_j = sd_j sign(g_j)|g_j|^κ, g ~ N(0, I),
    at the (M, N) float64 unit rows z; and √S(u), S = Σ|u_j/sd_j|^(2/κ) (|g| = √(χ²_N) · ... ).

    y_j has density ∝ |y_j/sd_j|^(α−1) exp(−|y_j/sd_j|^γ / 2) with α = 1/κ, γ = 2/κ, so
    A(u) ∝ ∏|u_j|^(α−1) · S(u)^(−N/2) (∏ sd_j = 1); κ = 1 is the angular central Gaussian."""
    n = z.shape[1]
    t = z.abs() / sd
    S = (t ** (2.0 / kappa)).sum(1)
    log_a = -0.5 * n * torch.log(S)
    if kappa != 1.0:
        log_a = log_a + (1.0 / kappa - 1.0) * torch.log(z.abs()).sum(1)
    return log_a.cpu().numpy(), torch.sqrt(S)


def _ancestor_halves(parents):
    """Two halves of the particle indices with every copy of one parent in the same half
    (parents sorted or not): alternate halves by the parent's rank."""
    _, rank = np.unique(parents, return_inverse=True)
    return [np.flatnonzero(rank % 2 == h) for h in (0, 1)]


def _fit_shape(z, previous, choose_kappa=True, iterations: int = 20):
    """(κ, c) of the moves' reference fitted to the (M, N) particles z by maximum likelihood of
    its angular density (see :func:`_angular_log_density`): for each κ (all of KAPPAS when
    choose_kappa, else the previous one), Tyler-style fixed point for the scales,
    σ_j^γ ← (N/M) Σ_i |z_ij|^γ / S_i, normalised to geometric mean 1 (κ = 1: the angular central
    Gaussian's, Tyler 1987); κ by the profile likelihood. c = σ², started from the previous c."""
    M, n = z.shape
    z_abs = np.maximum(z.double().abs().cpu().numpy(), 1e-300)
    log_abs_sum = float(np.log(z_abs).sum())
    prev_kappa, prev_c = previous
    best = None
    for kappa in (KAPPAS if choose_kappa else (prev_kappa,)):
        gamma, alpha = 2.0 / kappa, 1.0 / kappa
        zg = z_abs**gamma
        s_g = np.asarray(prev_c, dtype=np.float64) ** (gamma / 2)
        for _ in range(iterations):
            q = zg @ (1.0 / s_g)
            s_g = (n / M) * (zg / q[:, None]).sum(0)
            s_g = np.maximum(s_g, 1e-12 * s_g.max())
            s_g = np.exp(np.log(s_g) - np.log(s_g).mean())
        q = zg @ (1.0 / s_g)
        # normalised log likelihood on the sphere (∏ σ_j = 1): constants of κ included
        ll = (M * (n * math.log(gamma / 2) - math.log(gamma / 2)) + (alpha - 1) * log_abs_sum
              - 0.5 * n * float(np.log(q).sum()))
        if best is None or ll > best[0]:
            best = (ll, kappa, s_g ** (2 / gamma))
    return best[1], best[2]


def _adapt_scales(z, previous, iterations: int = 20) -> np.ndarray:
    """Diagonal C for the moves, fitted to the particles' directions: the maximum-likelihood
    angular central Gaussian with diagonal C (Tyler's fixed point, c_j ← (N/M) Σ_i z_ij² / z_iᵀC⁻¹z_i),
    started from the previous C and normalised to geometric mean 1 (det C = 1)."""
    M, n = z.shape
    z2 = (z.double() ** 2).cpu().numpy()  # (M, N)
    c = np.asarray(previous, dtype=np.float64)
    for _ in range(iterations):
        q = z2 @ (1.0 / c)  # (M,) zᵀC⁻¹z
        c = (n / M) * ((z2 / q[:, None]).sum(0))
        c = np.maximum(c, 1e-12 * c.max())
        c = np.exp(np.log(c) - np.log(c).mean())
    return c


def _shrunk(c, m):
    """The fitted shape with its log shrunk towards 0 by the share of its spread that M particles'
    sampling noise explains (each log c_j has variance ≈ 2/M under a matched proposal, James-Stein
    style): a pilot of a proposal that already fits leaves it as it is."""
    log_c = np.log(c) - np.log(c).mean()
    spread = float(np.mean(log_c**2))
    keep = max(0.0, 1.0 - (2.0 / m) / spread) if spread > 0 else 0.0
    return np.exp(keep * log_c)


def _normalised(c):
    log_c = np.log(c)
    return np.exp(log_c - log_c.mean())


def _check_deterministic(cost, anchor, seed) -> None:
    """Two evaluations of the same point must agree bit for bit (a cost with dropout on, or one
    that samples its data, gives an SMC whose acceptances mean nothing)."""
    d = sample_directions(anchor.numel(), [2**31 - 2], seed=seed, dtype=anchor.dtype, device=anchor.device)
    point = anchor[None] + 1e-2 * max(float(row_dot64(anchor).sqrt()), 1.0) * d
    with torch.no_grad():
        first = torch.as_tensor(cost(point.clone())).detach().double().cpu().numpy()
        second = torch.as_tensor(cost(point.clone())).detach().double().cpu().numpy()
    if not np.array_equal(first, second, equal_nan=True):
        raise ValueError(
            f"the cost is not deterministic: two evaluations of one point gave {first.tolist()} and "
            f"{second.tolist()}; put the model in eval mode (dropout off), fix its data, or make its "
            "kernels deterministic (torch.use_deterministic_algorithms)")


# -- progress files -----------------------------------------------------------------------------
_RUN_FIELDS = ("z", "logw", "radius", "exponent", "grad", "initial", "c", "kappas", "step_size", "betas", "log_z", "ess", "acceptance", "moves",
               "step_sizes", "ancestors", "evaluations", "move_evaluations", "move_searches")


def _state_key(base, n_particles, n_runs, n_moves, ess_fraction, n_pilots, batch_size, moves="pcn") -> str:
    probe = cost_probe(base.cost, base.anchor, base.anchor_cost, base.seed)
    parts = [fingerprint(base.anchor, base.cutoff, base.rtol, base.seed, base.prior, base.preconditioner,
                         base.max_radius, 1, batch_size, base.block_size),
             n_particles, n_runs, n_moves, ess_fraction, n_pilots, probe.tobytes().hex()]
    if moves != "pcn":  # keys of pCN runs as before
        parts.append(moves)
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def _load_state(path, key) -> dict:
    path = Path(path)
    if not path.exists():
        return {}
    try:
        f = np.load(path, allow_pickle=False)
        saved_key = str(f["key"])
        runs = int(f["runs"])
    except Exception as err:
        raise ValueError(f"reference checkpoint {path} cannot be read ({err!r}); delete it to start afresh") from None
    with f:
        if saved_key != key:
            raise ValueError(
                f"reference checkpoint {path} was written with other settings, another cost or another "
                "version of localvol; delete it to start afresh")
        return {r: {name: f[f"{r}/{name}"] for name in _RUN_FIELDS} for r in range(runs) if f"{r}/z" in f.files}


def _save_state(path, key, saved) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"{r}/{name}": np.asarray(state[name]) for r, state in saved.items() for name in _RUN_FIELDS}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, key=np.array(key), runs=np.array(max(saved) + 1), **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

