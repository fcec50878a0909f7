"""The local-volume estimator: paper §3, eq. 10 (naive), 15 (preconditioned), 19 (Gaussian).

    log vol ≈ logsumexp_i(log w_i) − log k,
    log w_i = log|S^(N−1)| + log ∫_0^{r(v̂_i)} ρ(θ0 + t v̂_i) t^(N−1) dt − N log|v_i|   (eq. 19)

with u_i uniform on the unit sphere, v_i = P u_i, and r(v̂_i) the radius at which the cost
crosses the cutoff (:func:`localvol.radius.find_radius`). For the Lebesgue measure the ray
integral is r^N / N (eq. 15). The estimate is unbiased for the mass; its log is a
high-probability lower bound (Markov, eq. 14).
"""
from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from scipy.special import logsumexp
from tqdm import tqdm

from ._reduce import row_dot64, row_dots64
from ._progress import cost_probe, fingerprint, load_progress, preconditioner_probe, save_progress
from .directions import direction_seed, sample_directions
from .preconditioners import DiagonalPreconditioner, MatrixPreconditioner, PaperMatrixPreconditioner
from .priors import GaussianPrior, LebesguePrior
from .radius import _check_search_args, evaluate_anchor_cost, find_radius

__all__ = ["VolumeEstimate", "estimate_log_volume", "sample_directions", "direction_seed", "default_batch_size"]

LN10 = math.log(10.0)


@dataclass
class VolumeEstimate:
    """Result of :func:`estimate_log_volume`. Logs are natural (nats) unless named log10.

    Attributes:
        log_volume: logsumexp(samples) − log k, nats: the log prior mass (or log volume) of
            the neighbourhood.
        samples: (k,) float64 per-sample log terms log w_i, nats (eq. 15 / 19).
        radii: (k,) float64 Euclidean radii along v̂_i, parameter units (inf: unbounded).
        cost_at_radius: (k,) float64, C(θ0 + r_i v̂_i) − C(θ0) as evaluated at each radius.
        direction_norms: (k,) float64 |v_i| = |P u_i| / |u_i| (1 for naive).
        evaluations: (k,) int64 cost evaluations spent per direction.
        cost_evaluations: total points at which the cost was evaluated, anchor included.
        log_prior_at_anchor: −|θ0/σ|²/2 = log ρ(θ0) − log ρ(0), nats (Gaussian prior only,
            else None): the "prior term" (docs/method.md#prior-and-neighbourhood-terms).
        preconditioner_is_identity: True for the naive estimator and for a preconditioner
            that does not change any direction, within a tolerance (:func:`is_identity`: its
            scales all equal within relative 1e-6, e.g. Adam ν of an optimizer that never
            stepped, or all zeros but a 1e-30; or, without scales, P u ∥ u on probe
            directions): the estimate is then the naive one, whatever its label says.
        n_unbounded: directions along which the cost stayed below the cutoff up to max_radius
            (radius inf; the whole ray counts).
    """

    log_volume: float
    samples: np.ndarray
    radii: np.ndarray
    cost_at_radius: np.ndarray
    direction_norms: np.ndarray
    evaluations: np.ndarray
    cost_evaluations: int
    log_prior_at_anchor: float | None
    n_params: int
    cutoff: float
    rtol: float
    seed: int
    prior: str
    preconditioner: str
    preconditioner_is_identity: bool = True
    n_unbounded: int = 0
    wall_time_s: float = 0.0
    meta: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        lp = "" if self.log_prior_at_anchor is None else f", log_prior_at_anchor={self.log_prior_at_anchor:.6g}"
        return (
            f"VolumeEstimate(log_volume={self.log_volume:.6g} nats (log10 {self.log10_volume:.6g}), "
            f"k={self.n_samples}, n_params={self.n_params}, cutoff={self.cutoff:g}{lp}, "
            f"prior={self.prior}, preconditioner={self.preconditioner}, "
            f"cost_evaluations={self.cost_evaluations}, max_sample_share={self.max_sample_share:.3g})"
        )

    @property
    def n_samples(self) -> int:
        return int(self.samples.size)

    @property
    def log10_volume(self) -> float:
        """log_volume / ln 10 (base-10 log of the probability, as the paper's figures plot)."""
        return self.log_volume / LN10

    @property
    def log_neighbourhood(self) -> float | None:
        """log_volume − log_prior_at_anchor, nats: what the neighbourhood adds to the prior term."""
        if self.log_prior_at_anchor is None:
            return None
        return self.log_volume - self.log_prior_at_anchor

    @property
    def max_sample_share(self) -> float:
        """Share of the largest sample in the sum exp(samples): 1 means one sample decides all."""
        if not np.isfinite(self.log_volume):
            return float("nan")
        return float(np.exp(self.samples.max() - logsumexp(self.samples)))

    @property
    def markov(self) -> str:
        """The Markov statement of eq. 14 for this k."""
        k = self.n_samples
        return (
            f"P(log_volume − true log volume ≥ log k = {math.log(k):.4g} nats) ≤ 1/k = {1 / k:.3g} "
            f"(Markov, eq. 14); the largest of the k = {k} samples holds {self.max_sample_share:.3g} of the sum"
        )

    def to_dict(self) -> dict:
        """JSON-serialisable aggregates (no per-sample arrays, no wall time): a pure function of
        the inputs, so a rerun writes the same record (the wall time is ``self.wall_time_s``)."""
        lp = self.log_prior_at_anchor
        return {
            "log_volume": self.log_volume,
            "log10_volume": self.log10_volume,
            "log_prior_at_anchor": lp,
            "log10_prior_at_anchor": None if lp is None else lp / LN10,
            "log_neighbourhood": self.log_neighbourhood,
            "max_sample_log10": float(self.samples.max() / LN10),
            "median_sample_log10": float(np.median(self.samples) / LN10),
            "max_sample_share": self.max_sample_share,
            "markov": self.markov,
            "n_samples": self.n_samples,
            "n_params": self.n_params,
            "cutoff": self.cutoff,
            "rtol": self.rtol,
            "seed": self.seed,
            "prior": self.prior,
            "preconditioner": self.preconditioner,
            "preconditioner_is_identity": self.preconditioner_is_identity,
            "n_unbounded": self.n_unbounded,
            "cost_evaluations": int(self.cost_evaluations),
            "median_evaluations_per_sample": float(np.median(self.evaluations)),
            **self.meta,
        }


def default_batch_size(n_samples: int, n_params: int) -> int:
    """Directions per cost call when the caller does not choose: min(k, 64, 2^26 // N), ≥ 1.

    64: on the digits MLP (2 CPU cores) 64 directions per pass took 0.50 ms per sample against
    0.61 at 256 (the activations of 256 directions fall out of cache) and 0.63 at 16
    (benchmarks/README.md). 2^26 // N keeps each of the estimator's two (B, N) buffers
    (directions and points) under 2^26 elements, 256 MiB in float32: one direction per pass
    from N = 2^26 ≈ 67 M parameters on. Changing the batch size changes the first guesses of
    later batches, so estimates with different batch sizes differ within the search's rtol.
    """
    return max(1, min(int(n_samples), 64, 2**26 // int(n_params)))


BLOCK_SIZE = 256
"""Samples per block (:class:`VolumeRun`): blocks are computed independently of each other."""
PILOT_SIZE = 16
"""Directions of the pilot batch (samples 0, 1, ...) whose radii give every block its first guess."""


def estimate_log_volume(
    cost,
    anchor: torch.Tensor,
    *,
    cutoff: float,
    n_samples: int,
    prior,
    preconditioner=None,
    rtol: float = 1e-2,
    batch_size: int | None = None,
    seed: int = 0,
    progress: bool = True,
    max_radius: float | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    block_size: int = BLOCK_SIZE,
) -> VolumeEstimate:
    """Estimate the log prior mass of the star domain {θ0 + t v̂ : C < cutoff} (paper §3).

    Args:
        cost: batched cost, (B, N) -> (B,) (e.g. :class:`localvol.ExpectedKL`). Its value at
            the anchor is subtracted, so it need not be 0 there; it must not go below it. Its
            (B, N) argument is a buffer reused from call to call: a cost must not keep it.
        anchor: (N,) float32/float64 tensor θ0 on any device; all work stays there.
        cutoff: float > 0, cost units (nats for KL).
        n_samples: k ≥ 1 Monte Carlo directions.
        prior: :class:`GaussianPrior` (probability, eq. 19) or :class:`LebesguePrior` (volume).
        preconditioner: None (naive, eq. 10) or an object with ``apply((B, N)) -> (B, N)``
            and ``n`` == N, unit determinant (eq. 15-18).
        rtol: relative tolerance of the cost at the returned radius (see find_radius). It biases
            each log term by up to ~N·rtol/2 nats in either direction (radius error rtol/2
            for a locally quadratic cost); lower it when comparing estimates that differ by less.
        batch_size: directions per cost call (None: :func:`default_batch_size`).
        seed: int; direction i depends only on (seed, i).
        progress: show a tqdm progress bar over samples.
        max_radius: Euclidean radius beyond which a direction counts as unbounded (None:
            |θ0| + max σ·(√N + 50) for the Gaussian prior, where the remaining mass is
            negligible; 1e8 for Lebesgue).
        checkpoint_path: optional .npz path; finished samples are written there atomically
            after every batch, and a rerun with the same settings resumes from it, with the
            same result bit for bit as a run never interrupted. The file records a hash of the
            settings (the anchor's exact bytes; the preconditioner by its exact action on fixed
            probe directions, not its repr), of the cost (its exact values at the anchor and
            three points near it, and its evaluation data: ``inputs``, ``targets``, ``mask``,
            ``reference_parameters`` where it has them) and of localvol's source files
            (:func:`localvol.code_version.source_hash`): one written with other settings,
            another cost or another version of the code raises ValueError instead of being
            resumed, and so does one that cannot be read, lacks an array or holds a NaN sample
            (the error names the file; delete it to start afresh).
        block_size: samples per block (:class:`VolumeRun`); the search's first guesses come
            from the block's own earlier batches and the pilot, so the result does not depend
            on how blocks are spread over processes (:mod:`localvol.distributed`).

    Returns:
        VolumeEstimate (log_volume in nats; +inf for Lebesgue with an unbounded direction).
        Directions that stay below the cutoff up to max_radius are counted in ``n_unbounded``
        and warned about under either prior.

    Raises:
        ValueError: cutoff ≤ 0 or NaN, n_samples < 1 or too many for memory (checked before
            anything is allocated), bad rtol/batch_size/block_size/max_radius, an anchor other
            than the cost's ``reference_parameters`` (ExpectedKL: the model's parameters when it
            was built) where the cost is not ~0,
            anchor not a finite 1-D float32/64 tensor, wrong prior or preconditioner size, a
            cost not finite at the anchor or below it along a ray, radius-search failures.
    """
    run = VolumeRun(cost, anchor, cutoff=cutoff, n_samples=n_samples, prior=prior,
                    preconditioner=preconditioner, rtol=rtol, batch_size=batch_size, seed=seed,
                    max_radius=max_radius, block_size=block_size,
                    resumable=checkpoint_path is not None)
    if checkpoint_path is not None:
        run.load(checkpoint_path)
    run.run(save_to=checkpoint_path, progress=progress)
    return run.result()


class VolumeRun:
    """One estimate of :func:`estimate_log_volume`, split into blocks that can be computed in
    any order, by any process, and resumed from progress files.

    Samples 0..k−1 are cut into blocks of ``block_size`` consecutive indices, and each block
    into batches of ``batch_size`` directions on a fixed schedule. The radius search of a batch
    starts from the median radius (per unit |v|) of the *pilot* (the first min(k, 16,
    batch_size) samples, block 0's first batch, searched from a default guess) and of the
    block's earlier batches. So every sample depends only on the settings and its block, never
    on which other blocks were computed before it, by which process, or whether the run was
    interrupted: any split of the blocks over processes gives the same samples bit for bit
    (on one device type, with the same number of threads per process where a cost's float
    operations depend on it). With k ≤ block_size this is the schedule of a single pass.

    Use: ``run = VolumeRun(cost, anchor, ...)``; ``run.load(path)`` for every progress file to
    resume from; ``run.run(blocks, save_to=path)``; ``run.result()`` once every sample is done.
    Arguments as :func:`estimate_log_volume`; ``resumable``: the run will load or save progress
    files (three cost evaluations near the anchor fingerprint the cost, counted in
    ``cost_evaluations``).
    """

    def __init__(self, cost, anchor, *, cutoff, n_samples, prior, preconditioner=None,
                 rtol=1e-2, batch_size=None, seed=0, max_radius=None, block_size=BLOCK_SIZE,
                 resumable=False):
        self.t_start = time.perf_counter()
        cutoff, rtol, _ = _check_search_args(cutoff, rtol, 1.0)
        n_samples = _check_count(n_samples, "n_samples", "an integer ≥ 1")
        _check_memory(n_samples)  # before anything of size k is allocated
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
            raise ValueError(f"seed must be an integer in [0, 2^32), got {seed!r}")
        if not isinstance(anchor, torch.Tensor) or anchor.ndim != 1 or anchor.dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"anchor must be a 1-D float32/float64 tensor, got "
                f"{type(anchor).__name__} {getattr(anchor, 'dtype', '')} {tuple(getattr(anchor, 'shape', ()))}"
            )
        anchor = anchor.detach()
        anchor_norm = math.sqrt(float(row_dot64(anchor)))  # float64: finite iff every entry is
        if not math.isfinite(anchor_norm):
            raise ValueError("anchor has non-finite entries" if not torch.isfinite(anchor).all()
                             else "anchor's norm overflows float64")
        if not isinstance(prior, (GaussianPrior, LebesguePrior)):
            raise ValueError(f"prior must be GaussianPrior or LebesguePrior, got {prior!r}")
        n = anchor.numel()
        if preconditioner is not None and getattr(preconditioner, "n", n) != n:
            raise ValueError(f"preconditioner is for {preconditioner.n} parameters but the anchor has {n}")
        if batch_size is None:
            batch_size = default_batch_size(n_samples, n)
        batch_size = _check_count(batch_size, "batch_size", "a positive integer")
        block_size = _check_count(block_size, "block_size", "a positive integer")
        if isinstance(prior, GaussianPrior):  # anchor-only quantities: computed once
            self.inv_var = prior._inv_var(anchor)  # validates sigma's length
            self.log_ray_constant = prior.log_ray_constant(anchor)
            self.log_prior_at_anchor = prior.log_density_at(anchor)
            default_max = anchor_norm + prior.sigma_max * (math.sqrt(n) + 50.0)
        else:
            self.inv_var = self.log_ray_constant = self.log_prior_at_anchor = None
            default_max = 1e8
        max_radius = default_max if max_radius is None else max_radius
        _check_search_args(cutoff, rtol, max_radius)
        self.cost, self.anchor, self.anchor_norm, self.n = cost, anchor, anchor_norm, n
        self.cutoff, self.n_samples, self.prior, self.preconditioner = cutoff, n_samples, prior, preconditioner
        self.rtol, self.batch_size, self.seed, self.max_radius = rtol, batch_size, seed, max_radius
        self.block_size = block_size
        self.pilot = np.arange(min(n_samples, PILOT_SIZE, batch_size, block_size))
        self.schedule = _schedule(n_samples, batch_size, block_size, len(self.pilot))
        self.store = {f: np.full(n_samples, np.nan) for f in _FIELDS}
        self.done = np.zeros(n_samples, bool)
        self.anchor_cost = evaluate_anchor_cost(cost, anchor)
        _check_reference(cost, anchor, self.anchor_cost, cutoff)
        self.fingerprint = self.probe = None
        if resumable:
            self.fingerprint = fingerprint(anchor, cutoff, rtol, seed, prior, preconditioner,
                                           max_radius, n_samples, batch_size, block_size)
            self.probe = cost_probe(cost, anchor, self.anchor_cost, seed)
        self._buffers = None

    @property
    def n_blocks(self) -> int:
        return len(self.schedule)

    def load(self, path) -> bool:
        """Take the finished samples of a progress file (written by :meth:`run` with the same
        settings, cost and code); False if the file does not exist. Raises ValueError for a
        file of other settings, another cost or code, or one that cannot be read."""
        if self.fingerprint is None:
            raise ValueError("a VolumeRun made with resumable=False cannot load progress files")
        return load_progress(path, self.fingerprint, self.probe, self.store, self.done)

    def run(self, blocks=None, *, save_to=None, progress=True) -> None:
        """Compute the unfinished samples of ``blocks`` (block numbers; default all), batch by
        batch, writing the store to ``save_to`` (atomically) after every batch."""
        blocks = range(self.n_blocks) if blocks is None else list(blocks)
        if save_to is not None and self.fingerprint is None:
            raise ValueError("a VolumeRun made with resumable=False cannot save progress files")
        mine = [batch for b in blocks for batch in self.schedule[b]]
        total = sum(len(batch) for batch in mine)
        finished = sum(int(self.done[batch].sum()) for batch in mine)
        bar = tqdm(total=total, initial=finished, disable=not progress, desc="local volume", unit="dir")
        if finished < total and not self.done[self.pilot].all():
            # the pilot guides every block: searched first (here too when block 0 is elsewhere)
            self._search(self.pilot, None)
            self._save(save_to)
            if 0 in blocks:
                bar.update(len(self.pilot))
        for b in blocks:
            start = int(self.schedule[b][0][0])
            for batch in self.schedule[b]:
                if self.done[batch].all():
                    continue
                guide = np.union1d(self.pilot, np.arange(start, int(batch[0])))
                _check_done(self.done, guide)  # earlier batches of the block come first
                self._search(batch, guide)
                self._save(save_to)
                bar.update(len(batch))
        bar.close()

    def _save(self, path) -> None:
        if path is not None:
            save_progress(path, self.fingerprint, self.probe, self.store, self.done)

    def _search(self, idx, guide) -> None:
        """Radii and log terms of samples ``idx``, first guesses from the samples ``guide``."""
        n, anchor = self.n, self.anchor
        if self._buffers is None or self._buffers.shape[1] < len(idx):
            # directions u and points θ0 + m v: (B, N) each, allocated once for all batches
            width = max(len(batch) for blocks in self.schedule for batch in blocks)
            self._buffers = torch.empty(2, width, n, dtype=anchor.dtype, device=anchor.device)
        buffers = self._buffers
        u = sample_directions(n, idx, seed=self.seed, dtype=anchor.dtype, device=anchor.device,
                              out=buffers[0, : len(idx)])  # (B, N)
        def guess(v_norm):  # the median multiplier of the guiding samples, times |v_i|
            return None if guide is None else _initial_radii(self.store["multipliers"][guide], v_norm)

        samples, res, log_u_norm = self.log_terms(u, guess, int(idx[0]), points_buffer=buffers[1])
        store = self.store
        store["samples"][idx] = samples
        store["radii"][idx] = res.radius
        store["cost_at_radius"][idx] = res.cost
        store["direction_norms"][idx] = res.direction_norms / np.exp(log_u_norm)
        store["evaluations"][idx] = res.evaluations
        store["multipliers"][idx] = res.multiplier
        self.done[idx] = True

    def log_terms(self, u, guess=None, first_index=0, points_buffer=None, exponent=None):
        """Radius search and per-sample log terms log w (eq. 15 / 19, nats) of the directions u.

        Args:
            u: (B, N) draws in the anchor's dtype and device (any length: only the direction of
                P u counts; the preconditioner may work on u in place).
            guess: None (a default first radius), a (B,) float64 array of first Euclidean
                radii along P u, or a callable mapping the (B,) |P u| to such an array (or None).
            first_index: the first row's number in error messages.
            points_buffer: optional (≥ B, N) buffer for the search's points.
            exponent: optional (B,) first power-law exponents of the searches (find_radius's
                ``initial_exponent``; None: 2).

        Returns:
            (samples (B,) float64 log w_i, the :class:`RadiusResult` along v = P u, log|u_i| (B,)).
        """
        n, anchor, prior = self.n, self.anchor, self.prior
        if self.preconditioner is None:
            v = u
        else:  # |u| first: a preconditioner may work in place on u
            log_u_norm = _ray_sums(u, anchor, None)[0]
            v = self.preconditioner.apply(u)  # (B, N)
            if not isinstance(v, torch.Tensor) or v.shape != u.shape:
                raise ValueError(f"preconditioner.apply returned {_describe(v)} for directions of "
                                 f"shape {tuple(u.shape)}; it must return the same shape")
        # the search runs along v in the anchor's dtype; the prior's coefficients use v as the
        # preconditioner returned it (float64 for a float32 anchor, say), as they always have
        v_search = v.to(anchor.device, anchor.dtype)
        log_v_norm, v_norm, a, b = _ray_sums(v_search, anchor, self.inv_var, coefficients_of=v)
        if self.preconditioner is None:
            log_u_norm = log_v_norm
        v = v_search
        if callable(guess):
            guess = guess(v_norm)
        if guess is None:
            guess = 1e-3 * max(self.anchor_norm, 1.0)  # find_radius's own default, without its anchor pass
        res = find_radius(
            self.cost, anchor, v, cutoff=self.cutoff, rtol=self.rtol, max_radius=self.max_radius,
            initial_radius=guess, anchor_cost=self.anchor_cost, first_index=first_index,
            direction_norms=v_norm, points_buffer=points_buffer, initial_exponent=exponent,
        )
        if isinstance(prior, GaussianPrior):
            samples = prior.log_terms_from_coefficients(n, self.log_ray_constant, a, b, res.multiplier, log_u_norm)
        else:
            samples = prior.log_terms(anchor, v, res.multiplier, log_u_norm)
        return samples, res, log_u_norm

    def result(self) -> VolumeEstimate:
        """The estimate of all k samples. ``cost_evaluations`` counts what one uninterrupted
        process needs (the anchor, the three probe points of a resumable run, every sample's
        search), not work repeated by resuming or by processes sharing blocks.

        Raises ValueError naming the unfinished samples."""
        _check_done(self.done, np.arange(self.n_samples))
        store, n_samples = self.store, self.n_samples
        samples = store["samples"]
        n_unbounded = int(np.isinf(store["radii"]).sum())
        if n_unbounded:
            consequence = ("the neighbourhood has infinite Lebesgue volume" if isinstance(self.prior, LebesguePrior)
                           else "their whole rays count: the cost never reaches the cutoff along them "
                                "(a cutoff above the cost's range, or a cost that does not bound the "
                                "neighbourhood)")
            advice = "" if n_unbounded < n_samples else "; " + self._all_unbounded_advice()
            warnings.warn(
                f"{n_unbounded} of {n_samples} directions stay below the cutoff up to "
                f"max_radius = {self.max_radius:g}: {consequence}{advice}"
            )
        evaluations = store["evaluations"].astype(np.int64)
        return VolumeEstimate(
            log_volume=float(logsumexp(samples) - math.log(n_samples)),
            samples=samples,
            radii=store["radii"],
            cost_at_radius=store["cost_at_radius"],
            direction_norms=store["direction_norms"],
            evaluations=evaluations,
            cost_evaluations=1 + (3 if self.fingerprint is not None else 0) + int(evaluations.sum()),
            log_prior_at_anchor=self.log_prior_at_anchor,
            n_params=self.n,
            cutoff=self.cutoff,
            rtol=self.rtol,
            seed=self.seed,
            prior=repr(self.prior),
            preconditioner=repr(self.preconditioner) if self.preconditioner is not None else "naive",
            preconditioner_is_identity=is_identity(self.preconditioner, self.anchor),
            n_unbounded=n_unbounded,
            wall_time_s=time.perf_counter() - self.t_start,
        )


    def _all_unbounded_advice(self) -> str:
        """What to change when no direction reaches the cutoff: the cutoff, sigma and eps, with
        their current values."""
        prior, precond = self.prior, self.preconditioner
        if isinstance(prior, GaussianPrior):
            now = f"{prior.sigma:g}" if isinstance(prior.sigma, float) else f"per parameter, max {prior.sigma_max:g}"
            sigma = (f"sigma (now {now}: the prior's whole mass along every ray lies inside the "
                     "neighbourhood; a larger sigma, e.g. the scale of the model's initialisation, "
                     "spreads it past it, and the default max_radius = |θ0| + max σ·(√N + 50) grows with it)")
        else:
            sigma = (f"sigma (none here: under the Lebesgue prior max_radius = {self.max_radius:g} "
                     "bounds the search)")
        eps = getattr(precond, "eps", None)
        if precond is None:
            eps = "eps (none here: naive directions, no preconditioner)"
        elif eps is None:
            eps = f"eps (none here: {type(precond).__name__} has no eps; try another preconditioner)"
        else:
            eps = (f"eps (now {eps:g}: raise it; a small eps stretches P u along flat, "
                   "low-curvature coordinates, where the cost barely rises)")
        return (f"every direction is unbounded, so the estimate measures the prior, not the "
                f"neighbourhood. Change the cutoff (now {self.cutoff:g}: lower it below what the cost "
                f"reaches within max_radius), {sigma}, or {eps}")


_FIELDS = ("samples", "radii", "cost_at_radius", "direction_norms", "evaluations", "multipliers")
_BYTES_PER_SAMPLE = 8 * len(_FIELDS) + 1 + 8
"""Memory per sample: the store (float64 per field), ``done`` and the schedule's int64 indices."""
REFERENCE_RTOL = 1e-6
"""An anchor other than a cost's ``reference_parameters`` is accepted only where the cost there
is at most this fraction of the cutoff (:func:`_check_reference`)."""
IDENTITY_RTOL = 1e-6
"""A preconditioner counts as the identity when it moves no probe direction, or none of its
scales, by more than this (relative; :func:`is_identity`)."""


def _schedule(n_samples: int, batch_size: int, block_size: int, pilot: int) -> list[list[np.ndarray]]:
    """Per block, its batches of sample indices: block 0 starts with the pilot [0, pilot)."""
    blocks = []
    for start in range(0, n_samples, block_size):
        stop = min(start + block_size, n_samples)
        first = start + pilot if start == 0 else start
        batches = [np.arange(0, pilot)] if start == 0 else []
        batches += [np.arange(s, min(s + batch_size, stop)) for s in range(first, stop, batch_size)]
        blocks.append(batches)
    return blocks


def _check_count(value, name: str, what: str) -> int:
    if (isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating))
            or not math.isfinite(value) or int(value) != value or value < 1):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)


def _check_done(done, idx) -> None:
    missing = np.asarray(idx)[~done[idx]]
    if missing.size:
        raise ValueError(f"{missing.size} samples are not finished (first: {missing[:5].tolist()}); "
                         "run the blocks that hold them")


def is_identity(preconditioner, anchor=None) -> bool:
    """Whether the preconditioner leaves every direction unchanged, within a tolerance.

    None (naive) is. A :class:`DiagonalPreconditioner` or :class:`MatrixPreconditioner` is when
    its scales p are all equal within relative :data:`IDENTITY_RTOL` (max p / min p − 1 ≤ 1e-6):
    then P = c·I to that precision, and only the direction of P u counts, so the estimate is the
    naive one to ~1e-6 (bit for bit where the scales round to one value in the anchor's dtype,
    e.g. Adam ν of all zeros but one 1e-30). Any other preconditioner (a
    :class:`PaperMatrixPreconditioner`, whose Vᵀ rotates even at p = 1, or a user's own) is when
    on the three probe directions of the resume fingerprint (``anchor`` gives their dtype and
    device; without it: False) every |P u/|P u| − u/|u|| ≤ 1e-6 (float64 anchor; 1e-4 for
    float32, its rounding)."""
    if preconditioner is None:
        return True
    scales = getattr(preconditioner, "scales", None)
    if (scales is not None and not isinstance(preconditioner, PaperMatrixPreconditioner)
            and type(preconditioner).apply in _SCALE_APPLIES):
        s = torch.as_tensor(scales).double()
        return bool(s.min() > 0) and float(s.max() / s.min()) - 1.0 <= IDENTITY_RTOL
    if anchor is None:
        return False
    u, v = preconditioner_probe(preconditioner, anchor)
    u, v = u.double(), v.double()
    u_hat = u / torch.linalg.vector_norm(u, dim=1, keepdim=True)
    v_hat = v / torch.linalg.vector_norm(v, dim=1, keepdim=True)
    tol = IDENTITY_RTOL if anchor.dtype == torch.float64 else 1e-4
    return bool(torch.isfinite(v_hat).all()) and float((v_hat - u_hat).norm(dim=1).max()) <= tol


_SCALE_APPLIES = (DiagonalPreconditioner.apply, MatrixPreconditioner.apply)  # P = c·I iff p all equal


def _check_memory(n_samples: int) -> None:
    """Refuse a k whose per-sample arrays (``_BYTES_PER_SAMPLE`` bytes each) would not fit in the
    machine's physical memory, before any is allocated (k = 10**11 once grew until killed)."""
    need = n_samples * _BYTES_PER_SAMPLE
    have = _physical_memory()
    if have is not None and need > have:
        raise ValueError(
            f"n_samples = {n_samples} needs {need / 1e9:.3g} GB for its per-sample arrays "
            f"({_BYTES_PER_SAMPLE} bytes per sample) but this machine has {have / 1e9:.3g} GB of "
            f"memory in all; use fewer samples (at most {have // _BYTES_PER_SAMPLE})")


def _physical_memory() -> int | None:
    """Bytes of physical memory (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _check_reference(cost, anchor, anchor_cost: float, cutoff: float) -> None:
    """A cost that knows its reference parameters (``cost.reference_parameters``, (N,); e.g.
    :class:`localvol.ExpectedKL`: the model's parameters when it was built) must be given them
    as the anchor: another anchor (a perturbed copy; the parameters after ``load_state_dict``,
    with a cost built before) measures around one point with the KL to another. Accepted: the
    same values, or an anchor where the cost is at most :data:`REFERENCE_RTOL` × cutoff.
    Raises ValueError naming both, how they differ, and the remedy."""
    ref = getattr(cost, "reference_parameters", None)
    if ref is None:
        return
    ref = torch.as_tensor(ref).detach()
    if ref.shape != anchor.shape:
        raise ValueError(
            f"the anchor has shape {tuple(anchor.shape)} but the cost's reference parameters "
            f"(cost.reference_parameters, the model's parameters when the cost was built) "
            f"{tuple(ref.shape)}; pass parameters_to_vector(model.parameters()) as the anchor")
    ref = ref.to(anchor.device)
    if torch.equal(ref.to(anchor.dtype), anchor) or abs(anchor_cost) <= REFERENCE_RTOL * cutoff:
        return
    diff = (anchor.double() - ref.double()).abs()
    raise ValueError(
        f"the anchor is not the cost's reference parameters (cost.reference_parameters, the model's "
        f"parameters when the cost was built): max |anchor − reference| = {float(diff.max()):.3g} "
        f"(index {int(diff.argmax())}; {int((diff > 0).sum())} of {anchor.numel()} entries differ; "
        f"|anchor| = {float(anchor.double().norm()):.6g}, |reference| = {float(ref.double().norm()):.6g}), "
        f"and the cost at the anchor is {anchor_cost:.3g}, not ~0 (cutoff {cutoff:g}). Pass the "
        "model's current parameters as the anchor (parameters_to_vector(model.parameters())), or "
        "rebuild the cost after changing the model (e.g. after load_state_dict)")


def _initial_radii(multipliers, v_norm):
    """Median of the finite ``multipliers`` (radius per unit |v|) times |v_i| (None if none)."""
    m = multipliers[np.isfinite(multipliers)]
    if m.size == 0:
        return None
    return float(np.median(m)) * v_norm


def _describe(x) -> str:
    return f"a tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def _ray_sums(v, anchor, inv_var, coefficients_of=None):
    """The batch's float64 reductions in one pass over v and the anchor.

    Args:
        v: (B, N) directions. anchor: (N,). inv_var: 1/σ² of a Gaussian prior (float or (N,)
            tensor), or None. coefficients_of: the (B, N) tensor whose ray coefficients are
            wanted, if not v (the same directions in another dtype).

    Returns:
        log|v_i| (B,), |v_i| (B,), and the Gaussian prior's ray coefficients a_i = Σ v²/σ²,
        b_i = −Σ v θ0/σ² (eq. 19; see GaussianPrior.ray_coefficients), or None, None
        without one. All float64 NumPy arrays.
    """
    c = v if coefficients_of is None else coefficients_of
    terms = [(v, None, None)]
    if inv_var is not None:
        terms += [(c, None, inv_var), (c, anchor, inv_var)]
    sums = [x.cpu().numpy() for x in row_dots64(*terms)]
    a, b = (sums[1], -sums[2]) if inv_var is not None else (None, None)
    return 0.5 * np.log(sums[0]), np.sqrt(sums[0]), a, b
